// mesh console: draws /v1/mesh/status every second and streams from the mesh's own API.
// Hand-written, no framework and nothing from the network but this server (the page's
// Content-Security-Policy allows nothing else).
"use strict";

(() => {
  const STATUS_URL = "/v1/mesh/status";
  const KEY_STORE = "mesh.apiKey";
  const params = new URLSearchParams(location.search);
  const INTERVAL_MS = Math.max(250, Number(params.get("interval")) || 1000);
  const SVG_NS = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);

  let latest = null; // the last status document
  let waitingForKey = false;
  let playing = null; // the AbortController of the playground's stream

  // ---- small helpers ---------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") node.textContent = value;
      else node.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  const nf = (digits) => new Intl.NumberFormat("en-US", { maximumFractionDigits: digits });
  function num(value, digits = 0) {
    return value === null || value === undefined ? "n/a" : nf(digits).format(value);
  }
  function bytes(value) {
    if (value === null || value === undefined) return "not known yet";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let v = value;
    let u = 0;
    while (v >= 1024 && u < units.length - 1) { v /= 1024; u += 1; }
    return `${nf(1).format(v)} ${units[u]}`;
  }
  function percent(share) {
    return share === null || share === undefined ? "n/a" : `${nf(0).format(share * 100)}%`;
  }

  function setText(id, text) {
    // Only when it changed: a live region re-read every second would drown a screen reader.
    const node = $(id);
    if (node.textContent !== text) node.textContent = text;
  }

  function authHeaders() {
    const key = sessionStorage.getItem(KEY_STORE);
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  // ---- the API key -----------------------------------------------------------------------
  function askForKey(message) {
    waitingForKey = true;
    $("key-section").hidden = false;
    $("key-error").textContent = message || "";
    $("summary").textContent = "An API key is needed to show this mesh.";
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORE, key);
    $("key-input").value = "";
    $("key-section").hidden = true;
    waitingForKey = false;
    poll();
  });

  // ---- polling ---------------------------------------------------------------------------
  let timer = null;
  async function poll() {
    clearTimeout(timer);
    if (waitingForKey) return;
    try {
      const response = await fetch(STATUS_URL, { headers: authHeaders(), cache: "no-store" });
      if (response.status === 401) {
        const had = sessionStorage.getItem(KEY_STORE);
        sessionStorage.removeItem(KEY_STORE);
        askForKey(had ? "That key was refused. Try another." : "");
        return;
      }
      if (!response.ok) throw new Error(`status ${response.status}`);
      latest = await response.json();
      render(latest);
    } catch (err) {
      setText("summary", `The mesh does not answer (${err.message}); retrying.`);
    }
    timer = setTimeout(poll, INTERVAL_MS);
  }

  // ---- drawing ---------------------------------------------------------------------------
  function render(status) {
    const model = status.model;
    const state = status.ready ? "ready" : `NOT READY: ${status.down || "starting"}`;
    setText("summary", `${model.id}: ${state}, ${status.stages.length} stages.`);
    setText("model-line", `Model ${model.id} (${model.arch || "?"}), ` +
      `${num(model.n_layer)} layers, context ${num(model.context_length)} tokens per session, ` +
      `${num(model.slots)} session slots` +
      (model.base_model ? ". Base model (no chat template)." : "."));
    renderChain(status);
    renderCharts(status.series);
    renderFacts(status);
    renderPlan(status.plan);
    renderPlaygroundFacts(model);
  }

  function renderChain(status) {
    const chain = $("chain");
    const items = [el("li", {}, el("div", { class: "node", "data-node": "coordinator" },
      el("h3", { text: "Coordinator" }),
      el("dl", {},
        el("dt", { text: "serves" }), el("dd", { text: location.host }),
        el("dt", { text: "queue" }),
        el("dd", { text: `${num(status.admission.queue_depth)} waiting` }))))];
    for (const stage of status.stages) {
      const layers = stage.layers ? `${stage.layers[0]}:${stage.layers[1]}` : "not known";
      const count = stage.layers ? ` (${stage.layers[1] - stage.layers[0]} layers)` : "";
      const up = stage.up ? "\u2713 up" : "\u2717 DOWN";
      const link = stage.link_up === null ? null
        : (stage.link_up ? "\u2713 up" : "\u2717 DOWN");
      const kv = stage.kv_capacity === null ? "n/a"
        : `${num(stage.kv_used)} used / ${num(stage.kv_reserved)} reserved / ` +
          `${num(stage.kv_capacity)} cells`;
      const meter = stage.kv_capacity ? el("meter", {
        min: 0, max: stage.kv_capacity, value: stage.kv_used || 0,
        "aria-label": `stage ${stage.index} KV cells used`,
      }) : null;
      const rows = [
        ["host", stage.host],
        ["layers", `${layers}${count}`, "layers"],
        ["weights", bytes(stage.weight_bytes)],
        ["KV", kv, "kv"],
        ["sessions", num(stage.sessions), "sessions"],
        ["prefix records", num(stage.records)],
        ["busy", percent(stage.busy_share)],
        ["rows / step", num(stage.decode_rows_per_step, 2)],
        ["round trip", stage.rtt_ms === null ? "n/a" : `${num(stage.rtt_ms, 2)} ms`],
      ];
      if (link !== null) rows.push(["link to next", link]);
      const dl = el("dl", {});
      for (const [name, value, field] of rows) {
        dl.append(el("dt", { text: name }),
          el("dd", { text: value, "data-field": field || null }));
        if (field === "kv" && meter) dl.append(el("dt", { text: "" }), el("dd", {}, meter));
      }
      items.push(el("li", {}, el("div", {
        class: stage.up ? "node" : "node down", "data-stage": stage.index,
      }, el("h3", {}, `Stage ${stage.index} `, el("span", { class: "state", text: up })), dl)));
    }
    chain.replaceChildren(...items);
    setText("hop-line", status.hop_ms === null ? ""
      : `Measured cost of a decode step beyond the stages' compute (links, queues): ` +
        `${num(status.hop_ms, 2)} ms.`);
  }

  const CHARTS = [
    ["requests_per_s", "Requests per second", "req/s", 2],
    ["tokens_per_s", "Tokens per second", "tok/s", 1],
    ["ttft_ms", "Time to first token", "ms", 0],
    ["time_per_token_ms", "Time per token", "ms", 1],
  ];

  function renderCharts(series) {
    setText("window-min", num(series.window_s / 60, 1));
    const figures = CHARTS.map(([field, title, unit, digits]) => {
      const values = series.points.map((p) => p[field]);
      const known = values.filter((v) => v !== null);
      const last = [...values].reverse().find((v) => v !== null);
      const max = known.length ? Math.max(...known) : null;
      const now = last === undefined ? "none yet" : `${num(last, digits)} ${unit}`;
      const summary = `${title}: latest ${now}` +
        (max === null ? "" : `, highest ${num(max, digits)} ${unit}`) +
        ` over the last ${num(series.window_s / 60, 1)} minutes.`;
      return el("figure", { class: "chart", "data-chart": field },
        el("figcaption", {}, el("span", { text: title }),
          el("span", { class: "value", text: now })),
        sparkline(values, max, summary),
        el("p", { class: "small", text: max === null ? "No requests in this window."
          : `highest ${num(max, digits)} ${unit}` }));
    });
    $("charts").replaceChildren(...figures);
  }

  function sparkline(values, max, summary) {
    const width = 300;
    const height = 60;
    const svg = document.createElementNS(SVG_NS, "svg");
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", summary);
    const axis = document.createElementNS(SVG_NS, "line");
    for (const [k, v] of Object.entries({ x1: 0, y1: height - 1, x2: width, y2: height - 1 })) {
      axis.setAttribute(k, v);
    }
    axis.setAttribute("class", "axis");
    svg.append(axis);
    const top = max && max > 0 ? max : 1;
    const step = values.length > 1 ? width / (values.length - 1) : width;
    let d = "";
    let pen = false;
    values.forEach((v, i) => {
      if (v === null) { pen = false; return; }
      const x = (i * step).toFixed(1);
      const y = (height - 3 - (v / top) * (height - 8)).toFixed(1);
      d += `${pen ? "L" : "M"}${x} ${y} `;
      pen = true;
      const alone = (i === 0 || values[i - 1] === null)
        && (i === values.length - 1 || values[i + 1] === null);
      if (alone) { // a point with no neighbour draws no line: mark it
        const dot = document.createElementNS(SVG_NS, "circle");
        dot.setAttribute("cx", x);
        dot.setAttribute("cy", y);
        dot.setAttribute("r", 3);
        dot.setAttribute("class", "dot");
        svg.append(dot);
      }
    });
    if (d) {
      const path = document.createElementNS(SVG_NS, "path");
      path.setAttribute("d", d.trim());
      path.setAttribute("class", "line");
      svg.append(path);
    }
    return svg;
  }

  function renderFacts(status) {
    const spec = status.speculation;
    const errors = status.errors;
    const codes = Object.entries(errors.by_code).map(([c, n]) => `${c}: ${n}`).join(", ");
    const rows = [
      ["Admission queue", `${num(status.admission.queue_depth)} requests waiting; ` +
        `${num(status.admission.slots_reserved)} of ${num(status.admission.slots)} ` +
        "session slots taken"],
      ["Speculation", spec.enabled
        ? `${num(spec.accepted)} of ${num(spec.drafted)} drafted tokens accepted` +
          (spec.acceptance === null ? "" : ` (${percent(spec.acceptance)})`) +
          ` in ${num(spec.windows)} verify windows`
        : "off"],
      ["Errors", errors.total ? `${num(errors.total)} since start (${codes})`
        : "none since start"],
      ["Retries", `${num(errors.retries)} requests re-run after a chain failure`],
    ];
    $("facts").replaceChildren(...rows.flatMap(([name, value]) =>
      [el("dt", { text: name }), el("dd", { text: value })]));
  }

  function renderPlan(plan) {
    const box = $("plan");
    if (plan === null) {
      setText("plan", "No placement plan: the layers are placed by hand (each stage's " +
        "--layers). When hosts join instead (mesh serve without --stage), the mesh's plan, " +
        "its members and its re-plans show here.");
      return;
    }
    // Rebuilt only when it changed, for the same reason as setText.
    const key = JSON.stringify(plan);
    if (box.dataset.key === key) return;
    box.dataset.key = key;
    const rows = plan.stages.map((s) => el("tr", null,
      el("td", { text: s.member }), el("td", { text: `${s.start}:${s.end}` }),
      el("td", { text: `${num(s.stage_ms, 2)} ms` }), el("td", { text: `${num(s.hop_ms, 2)} ms` })));
    const head = el("tr", null, ...["member", "layers", "stage", "hop"].map(
      (name) => el("th", { scope: "col", text: name })));
    const table = el("table", null, el("caption", {
      text: `Predicted ${num(plan.predicted_tok_s, 1)} tok/s for one stream ` +
            `(placed for ${num(plan.sessions)} session${plan.sessions === 1 ? "" : "s"}).` }),
      el("thead", null, head), el("tbody", null, ...rows));
    const members = el("ul", null, ...plan.members.map((m) => el("li", {
      text: `${m.name} at ${m.url}: ${bytes(m.mem_bytes)} offered, ` +
            (m.layer_us ? `${num(m.layer_us)} µs a layer, head ${num(m.head_us)} µs` :
              "not measured (no model file)") +
            `, round trip ${m.rtt_ms === null ? "n/a" : num(m.rtt_ms, 2) + " ms"}` +
            (plan.excluded[m.name] ? ` — left out: ${plan.excluded[m.name]}` : "") })));
    const facts = [
      `Re-plans made: ${num(plan.moves)}.`,
      plan.last_decision ? `Last decision: ${plan.last_decision.action} ` +
        `(${plan.last_decision.reason}).` : "No re-plan considered yet.",
      plan.stuck ? `Cannot serve: ${plan.stuck}` : null,
    ].filter(Boolean).join(" ");
    box.replaceChildren(table, el("p", { text: "Members:" }), members, el("p", { text: facts }));
  }

  let modeChosen = false;
  function renderPlaygroundFacts(model) {
    const note = $("base-note");
    if (model.base_model) {
      note.hidden = false;
      setText("base-note", "Base model: no chat template, use plain completion. It continues " +
        "the prompt's text rather than answering it.");
      if (!modeChosen) $("mode").value = "completion";
    } else if (model.base_model === false) {
      note.hidden = true;
      if (!modeChosen) $("mode").value = "chat";
    }
    if (model.context_length) {
      setText("ctx-note", `Context length: ${num(model.context_length)} tokens ` +
        "(prompt and answer together).");
      $("max-tokens").max = model.context_length;
    }
  }
  $("mode").addEventListener("change", () => { modeChosen = true; });

  // ---- the playground ----------------------------------------------------------------------
  function* sseData(buffer) {
    // Yields the data of each complete event in buffer.text, keeping the rest.
    let at;
    while ((at = buffer.text.search(/\r\n\r\n|\n\n|\r\r/)) >= 0) {
      const sep = buffer.text.slice(at).match(/^(\r\n\r\n|\n\n|\r\r)/)[0].length;
      const block = buffer.text.slice(0, at);
      buffer.text = buffer.text.slice(at + sep);
      const data = block.split(/\r\n|\n|\r/).filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data) yield data;
    }
  }

  async function play(event) {
    event.preventDefault();
    if (playing) return;
    const chat = $("mode").value === "chat";
    const body = {
      model: latest ? latest.model.id : "mesh",
      max_tokens: Number($("max-tokens").value),
      temperature: Number($("temperature").value),
      top_p: Number($("top-p").value),
      stream: true,
      stream_options: { include_usage: true },
    };
    const prompt = $("prompt").value;
    if (chat) body.messages = [{ role: "user", content: prompt }];
    else body.prompt = prompt;
    const answer = $("answer");
    const status = $("play-status");
    answer.textContent = "";
    answer.setAttribute("aria-busy", "true"); // read once it is whole, not token by token
    status.textContent = "Streaming…";
    playing = new AbortController();
    $("send").disabled = true;
    $("stop").disabled = false;
    const started = performance.now();
    let tokens = null;
    let finish = null;
    try {
      const response = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json", ...authHeaders() },
        body: JSON.stringify(body),
        signal: playing.signal,
      });
      if (!response.ok) {
        let message = `HTTP ${response.status}`;
        try { message += `: ${(await response.json()).error.message}`; } catch (_) { /* */ }
        if (response.status === 401) askForKey("The API key was refused.");
        throw new Error(message);
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      const buffer = { text: "" };
      reading: for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer.text += decoder.decode(value, { stream: true });
        for (const data of sseData(buffer)) {
          if (data === "[DONE]") break reading;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) tokens = chunk.usage.completion_tokens;
          for (const choice of chunk.choices || []) {
            const piece = chat ? (choice.delta && choice.delta.content) : choice.text;
            if (piece) answer.append(piece);
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
      }
      const seconds = (performance.now() - started) / 1000;
      status.textContent = `Done in ${num(seconds, 2)} s` +
        (tokens === null ? "" : `, ${num(tokens)} tokens`) +
        (finish ? ` (finish: ${finish})` : "") + ".";
    } catch (err) {
      status.textContent = err.name === "AbortError" ? "Stopped."
        : `The request failed: ${err.message}`;
    } finally {
      playing = null;
      answer.setAttribute("aria-busy", "false");
      $("send").disabled = false;
      $("stop").disabled = true;
    }
  }

  $("play-form").addEventListener("submit", play);
  $("stop").addEventListener("click", () => { if (playing) playing.abort(); });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      $("play-form").requestSubmit();
    }
  });

  poll();
})();
