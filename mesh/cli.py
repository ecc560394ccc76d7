"""``mesh``: prepare models, generate through a running chain, serve the API, or do it all (up)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from mesh.config import (
    API,
    COORDINATOR_TIMEOUTS,
    JOIN,
    LOOPBACK,
    POLICIES,
    SPECULATIVE_MODES,
    STAGE,
    CoordinatorConfig,
    SpeculationConfig,
    is_loopback,
)
from mesh.errors import MeshError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Run one GGUF model split by layers across stage processes."""


@main.command()
@click.argument("spec", default="default")
def model(spec: str) -> None:
    """Resolve SPEC (a .gguf path or 'default') and print the file path and its facts."""
    from mesh.model.families import family
    from mesh.model.slicing import model_info, range_allowed
    from mesh.model.source import resolve_model

    try:
        path = resolve_model(spec)
        info = model_info(path)
    except MeshError as exc:
        _fail(str(exc))
    click.echo(f"{path}\narch={info.arch} layers={info.n_layer} n_embd={info.n_embd} "
               f"n_vocab={info.n_vocab} sha256={info.sha256[:16]}")
    reason = family(info.arch).size_dependent(info.n_layer)
    if reason is None:
        cuts = [c for c in range(1, info.n_layer)
                if range_allowed(info, 0, c) and range_allowed(info, c, info.n_layer)]
        click.echo(f"split: exact (parity-tested family); may be cut in two after layers "
                   f"{_spans(cuts)}" + ("" if len(cuts) == info.n_layer - 1 else
                                        " (its family fixes some layers by index)"))
    else:
        click.echo(f"split: refused ({reason}); it runs whole on one stage")
    mib = 1 << 20
    click.echo(f"weights: {sum(info.layer_bytes) / mib:.1f} MiB in layers, "
               f"head {info.head_bytes / mib:.1f} MiB (final stage)")
    click.echo("bytes per layer (MiB): " + " ".join(
        f"{i}:{b / mib:.1f}" for i, b in enumerate(info.layer_bytes)))
    if any(info.kv_cell_bytes):
        click.echo(f"KV per cell: {sum(info.kv_cell_bytes) / 1024:.1f} KiB (f16 K and V over "
                   f"all layers; a session of C cells at a stage holding layers a:b takes C x "
                   f"their share)")


def _spans(values: list[int]) -> str:
    """1, 2, 3, 5 -> "1-3, 5"."""
    if not values:
        return "none"
    spans, first, last = [], values[0], values[0]
    for v in values[1:] + [None]:
        if v is not None and v == last + 1:
            last = v
            continue
        spans.append(f"{first}-{last}" if last > first else str(first))
        if v is not None:
            first = last = v
    return ", ".join(spans)


def _secret_option(fn):
    return click.option("--secret", "secret_file", envvar="MESH_SECRET_FILE", default=None,
                        type=click.Path(dir_okay=False),
                        help="The mesh secret, or a coordinator identity (`mesh secret MASTER "
                             "--member coordinator FILE`): CURVE to the stages.")(fn)


def _mesh_keys(secret_file: str | None):
    """A coordinator's keys from a master secret or a coordinator identity (else one line)."""
    from mesh.transport.security import ROLE_COORDINATOR, load_keys

    return load_keys(Path(secret_file), ROLE_COORDINATOR) if secret_file else None


def _api_options(fn):
    """API keys, and what one key may take (mesh.api.limits): the command gets ``limits``."""
    from mesh.api.limits import ApiLimits

    defaults = ApiLimits()
    names = ("requests_per_key", "key_share", "request_contexts", "request_timeout_s",
             "stream_stall_s")

    @functools.wraps(fn)
    def command(*args, **kwargs):
        kwargs["limits"] = ApiLimits(**{name: kwargs.pop(name) for name in names})
        return fn(*args, **kwargs)

    for flag, name, kind, text in reversed((
            ("--max-requests-per-key", "requests_per_key", click.IntRange(1),
             "Requests one API key (or client host, without keys) may have in flight, queued "
             "ones included; more get 429."),
            ("--key-share", "key_share", click.FloatRange(0.0, 1.0, min_open=True),
             "Share of the mesh's session slots one key may hold at once; waiting keys take "
             "turns."),
            ("--max-request-contexts", "request_contexts", click.IntRange(1),
             "Tokens one request may generate over all its choices (n x max_tokens), in "
             "contexts."),
            ("--request-timeout", "request_timeout_s", click.FloatRange(1.0),
             "Seconds one request may run; then it ends with finish_reason \"length\"."),
            ("--stream-stall", "stream_stall_s", click.FloatRange(1.0),
             "Seconds in total a stream may wait for its reader before it is cut."))):
        command = click.option(flag, name, default=getattr(defaults, name), show_default=True,
                               type=kind, help=text)(command)
    command = click.option("--insecure", is_flag=True,
                           help="Serve without API keys on a non-loopback host.")(command)
    return click.option("--api-key", "api_keys", multiple=True,
                        help="Bearer key for /v1/* and /metrics (repeat; or MESH_API_KEYS, "
                             "comma-separated). Each key is a tenant: prefixes are reused "
                             "only within a key.")(command)


def _speculation_options(fn):
    from mesh.transport.wire import MAX_DRAFT_TOKENS

    fn = click.option("--draft-model", default=None, type=click.Path(dir_okay=False),
                      help="A small GGUF with the target's vocabulary that drafts in the "
                           "coordinator's process (pays on slow links and large targets); "
                           "without it, drafts come from n-gram lookup.")(fn)
    fn = click.option("--draft-max", default=SpeculationConfig.draft_max, show_default=True,
                      type=click.IntRange(1, MAX_DRAFT_TOKENS),
                      help="Most drafted tokens in one verify window.")(fn)
    fn = click.option("--speculate-when", "speculate_when", default=SpeculationConfig.policy,
                      show_default=True, type=click.Choice(POLICIES),
                      help="cost: send verify windows while they are expected to pay, from "
                           "the stages' probed compute, the measured round trips and how "
                           "often each session's drafts come true; always: whenever a draft "
                           "is found.")(fn)
    return click.option("--speculative", default=SpeculationConfig.mode, show_default=True,
                        type=click.Choice(SPECULATIVE_MODES),
                        help="Speculative decoding: draft tokens from the text so far (ngram) "
                             "and verify them through the chain in one pass; never changes "
                             "the output.")(fn)


def _speculation(speculative: str, draft_max: int, draft_model: str | None,
                 speculate_when: str):
    from mesh.model.source import resolve_model

    model = str(resolve_model(draft_model)) if draft_model else None
    return SpeculationConfig(mode=speculative, draft_max=draft_max, draft_model=model,
                             policy=speculate_when)


def _generation_options(fn):
    from mesh.coordinator.generation import GenerationParams as Params

    options = [
        click.option("--max-tokens", default=Params.max_tokens, show_default=True),
        click.option("--temperature", default=Params.temperature, show_default=True,
                     help="0 means greedy."),
        click.option("--top-p", default=Params.top_p, show_default=True),
        click.option("--seed", default=Params.seed, show_default=True),
        click.option("--stop", "stop", multiple=True, help="Stop string (repeatable)."),
        click.option("--json", "as_json", is_flag=True,
                     help="Print one JSON object on the last stdout line."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _print_running_plan(url: str, api_key: str | None) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        status = httpx.get(url.rstrip("/") + "/v1/mesh/status", headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        _fail(f"cannot reach {url}: {exc}")
    if status.status_code != 200:
        _fail(f"{url} answered {status.status_code}: {status.text[:200]}")
    placed = status.json().get("plan")
    if placed is None:
        _fail(f"{url} serves stages placed by hand (--stage): no plan")
    click.echo(f"{'member':<16} {'layers':>9} {'stage ms':>9} {'hop ms':>8}")
    for s in placed["stages"]:
        click.echo(f"{s['member']:<16} {s['start']}:{s['end']:<6} {s['stage_ms']:>9.2f} "
                   f"{s['hop_ms']:>8.2f}")
    click.echo(f"predicted: {placed['predicted_tok_s']} tok/s at 1 session; re-plans made: "
               f"{placed['moves']}")
    for m in placed["members"]:
        left_out = placed["excluded"].get(m["name"])
        click.echo(f"member {m['name']} at {m['url']}" + (f": left out: {left_out}"
                                                          if left_out else ""))
    if placed["last_decision"]:
        click.echo(f"last decision: {placed['last_decision']['action']}: "
                   f"{placed['last_decision']['reason']}")
    if placed["stuck"]:
        click.echo(f"cannot serve: {placed['stuck']}")
        sys.exit(1)


@main.command()
@click.option("--model", "model_spec", default="default", show_default=True)
@click.option("--stage", "stages", multiple=True, required=True,
              help="Stage URL, in chain order (repeat).")
@click.option("--prompt", required=True)
@click.option("--prefill-chunk", default=CoordinatorConfig.prefill_chunk, show_default=True,
              help="Prompt tokens per frame (prefix reuse snaps to multiples of it).")
@click.option("--connect-timeout", default=COORDINATOR_TIMEOUTS.handshake_s, show_default=True,
              help="Seconds to wait for every stage's handshake.")
@_secret_option
@_speculation_options
@_generation_options
def generate(model_spec, stages, prompt, prefill_chunk, connect_timeout, secret_file, speculative,
             speculate_when, draft_max, draft_model, max_tokens, temperature, top_p, seed, stop,
             as_json) -> None:
    """Raw-text completion through a running chain of stages."""
    from mesh.coordinator.core import GenerationParams
    from mesh.logs import configure
    from mesh.model.source import resolve_model

    configure("warning")
    params = GenerationParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                              seed=seed, stop=tuple(stop))
    try:
        path = resolve_model(model_spec)
        config = CoordinatorConfig(prefill_chunk=prefill_chunk, speculation=_speculation(
            speculative, draft_max, draft_model, speculate_when))
        asyncio.run(_generate(path, list(stages), prompt, params, config, as_json,
                              connect_timeout, _mesh_keys(secret_file)))
    except MeshError as exc:
        _fail(str(exc))


async def _generate(path: Path, stages: list[str], prompt: str, params,
                    config: CoordinatorConfig, as_json: bool,
                    connect_timeout: float = COORDINATOR_TIMEOUTS.fresh_chain_handshake_s,
                    mesh_keys=None) -> None:
    from mesh.coordinator.core import Completion, Coordinator

    coord = Coordinator(path, stages, config, keys=mesh_keys)
    await coord.start(handshake_timeout_s=connect_timeout)
    try:
        result = None
        async for item in coord.stream(prompt, params):
            if isinstance(item, Completion):
                result = item
            elif not as_json:
                click.echo(item.text, nl=False)
        if result is None:
            raise RuntimeError("the stream ended without a Completion")
        if as_json:
            click.echo(json.dumps({
                "prompt_token_ids": result.prompt_token_ids, "token_ids": result.token_ids,
                "text": result.text, "finish_reason": result.finish_reason,
                "usage": result.usage, "timings": result.timings,
                "speculation": result.speculation,
            }))
        else:
            click.echo("")
    finally:
        await coord.close()


DEFAULT_MODEL_NOTE = (
    "note: the default model, Gemma 3 270M, is a small base model for trying the mesh: chat "
    "replies continue the text rather than answer it. For chat, give --model an "
    "instruction-tuned GGUF (any local path).")


@main.command()
@click.option("--model", "model_spec", default="default", show_default=True)
@click.option("--stages", "n_stages", default=2, show_default=True)
@click.option("--ctx", default=STAGE.ctx, show_default=True,
              help="KV cells of one session (each of --slots sessions gets its own).")
@click.option("--slots", default=STAGE.slots, show_default=True,
              help="Sessions (and resident prefixes) each stage holds at once.")
@click.option("--threads", default=STAGE.threads, show_default=True, help="Threads per stage.")
@click.option("--host", default=API.host, show_default=True)
@click.option("--port", default=API.port, show_default=True)
@click.option("--prompt", default=None, help="Generate once and exit instead of serving.")
@_api_options
@_speculation_options
@_generation_options
def up(model_spec, n_stages, ctx, slots, threads, host, port, prompt, api_keys, insecure,
       limits, speculative, speculate_when, draft_max, draft_model, max_tokens, temperature,
       top_p, seed, stop, as_json) -> None:
    """Prepare the model, start a local chain of stages, then serve the API (or generate)."""
    from mesh.coordinator.core import GenerationParams
    from mesh.launcher import LocalMesh, balanced_split, even_split
    from mesh.logs import configure
    from mesh.model.slicing import model_info, range_allowed, slice_model
    from mesh.model.source import resolve_model
    from mesh.transport.security import write_secret

    configure("warning")
    api_keys = _checked_keys(host, api_keys, insecure) if prompt is None else ()
    try:
        path = resolve_model(model_spec)
        info = model_info(path)
        ranges = (balanced_split(list(info.layer_bytes), info.head_bytes, n_stages,
                                 functools.partial(range_allowed, info))
                  if info.layer_bytes else even_split(info.n_layer, n_stages))
        if model_spec == "default":
            click.echo(DEFAULT_MODEL_NOTE, err=True)
        click.echo(f"preparing {n_stages} stages of {path.name}: "
                   f"{', '.join(f'{a}:{b}' for a, b in ranges)}", err=True)
        for start, end in ranges:
            slice_model(path, start, end)
    except MeshError as exc:
        _fail(str(exc))
    log_dir = Path(tempfile.mkdtemp(prefix="mesh-up-"))
    secret = log_dir / "mesh.secret"  # this chain's own: only its members talk to its stages
    write_secret(secret)
    mesh_keys = _mesh_keys(str(secret))
    try:
        speculation = _speculation(speculative, draft_max, draft_model, speculate_when)
    except MeshError as exc:
        _fail(str(exc))
    # SIGTERM ends `mesh up` as Ctrl-C does, through the `with` that stops the stages. The
    # default action would end this process at once and leave them running: uvicorn takes
    # SIGTERM while it serves, and raises it again once it has shut down.
    signal.signal(signal.SIGTERM, _terminated)
    with LocalMesh(str(path), ranges, log_dir, ctx=ctx, slots=slots, threads=threads,
                   secret=secret) as local:
        click.echo(f"stages: {' '.join(local.urls)} (logs in {log_dir})", err=True)
        try:
            if prompt is not None:
                params = GenerationParams(max_tokens=max_tokens, temperature=temperature,
                                          top_p=top_p, seed=seed, stop=tuple(stop))
                asyncio.run(_generate(path, local.urls, prompt, params,
                                      CoordinatorConfig(speculation=speculation), as_json,
                                      mesh_keys=mesh_keys))
            else:
                _serve(path, local.urls, host, port, announce=True,
                       config=CoordinatorConfig(speculation=speculation), api_keys=api_keys,
                       mesh_keys=mesh_keys, limits=limits)
        except MeshError as exc:
            local.check_running()
            _fail(str(exc))
        except KeyboardInterrupt:
            pass


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt


DECODE_GROUPS_HELP = ("Groups that concurrent sessions' decode steps travel in; more than one "
                      "lets stages on separate hosts compute different groups at once, which "
                      "pays only for compute-bound loads (see mesh/coordinator/pacer.py).")


def _join_options(fn):
    """Where hosts join, and how many to wait for (``mesh serve`` without --stage, ``mesh
    plan``)."""
    fn = click.option("--sessions", default=1, show_default=True, type=click.IntRange(1),
                      help="Sessions the placement expects to decode at once: 1 minimises "
                           "one stream's time per token, more balance the stages.")(fn)
    fn = click.option("--members", "n_members", default=JOIN.members, show_default=True,
                      type=click.IntRange(1),
                      help="Hosts to wait for before placing the model.")(fn)
    return click.option("--join-listen", default=None,
                        help=f"Where hosts join [default: tcp://0.0.0.0:{JOIN.port} with "
                             f"--secret, else tcp://{LOOPBACK}:{JOIN.port}].")(fn)


def _gather(path: Path, join_listen: str | None, n_members: int, sessions: int,
            secret_file: str | None, mesh_keys, insecure: bool):
    """Take joins until the model can be placed; print the plan. Returns (plan, members,
    membership)."""
    from mesh.coordinator.membership import Membership
    from mesh.coordinator.placing import join_urls, settled_plan
    from mesh.model.slicing import model_info
    from mesh.placement import describe

    url = join_listen or (f"tcp://0.0.0.0:{JOIN.port}" if secret_file
                          else f"tcp://{LOOPBACK}:{JOIN.port}")
    if "://" not in url:
        url = f"tcp://{url}"
    if mesh_keys is None and not insecure and not is_loopback(url):
        _fail(f"refusing to take joins on {url} without a mesh secret: give --secret FILE, "
              "or --insecure")
    from mesh.shipping.sender import SliceSender

    info = model_info(path)
    sender = SliceSender(path)
    probe = info.n_layer // 2 if info.n_layer >= 3 else None
    if probe is not None:  # what a host without the model measures; sliced once, here
        sender.prepare(probe, probe + 1)
    try:
        membership = Membership(url, info.sha256, mesh_keys, sender=sender, probe_layer=probe)
    except Exception as exc:
        _fail(f"cannot take joins on {url}: {exc}")
    secret = f" --secret {secret_file}" if secret_file else ""
    click.echo(f"mesh: waiting for {n_members} host(s) to join; on each host run:", err=True)
    for join_url in join_urls(membership.bound_url):
        click.echo(f"  mesh-stage --join {join_url}{secret}", err=True)
    click.echo("(a host that has the model file adds --model PATH and measures its speed on "
               "it; the others receive only their layers from here)", err=True)
    plan, members = settled_plan(info, membership, n_members, sessions, JOIN.settle_s)
    click.echo(describe(plan), err=True)
    return plan, members, membership


@main.command()
@click.option("--model", "model_spec", default="default", show_default=True)
@_join_options
@_secret_option
@click.option("--insecure", is_flag=True, help="Take joins beyond loopback without a secret.")
@click.option("--url", default=None,
              help="Instead: print the running plan of the mesh serving at this URL "
                   "(http://HOST:PORT), and why it cannot serve if it cannot.")
@click.option("--api-key", default=None, envvar="MESH_API_KEY", help="With --url.")
def plan(model_spec, join_listen, n_members, sessions, secret_file, insecure, url,
         api_key) -> None:
    """Take joins, print the placement the mesh would apply to the hosts that joined, and exit
    without moving anything; or (--url) print a serving mesh's plan."""
    from mesh.logs import configure
    from mesh.model.source import resolve_model

    if url is not None:
        _print_running_plan(url, api_key)
        return
    configure("warning")
    try:
        path = resolve_model(model_spec)
        keys = _mesh_keys(secret_file)
    except MeshError as exc:
        _fail(str(exc))
    _plan, _members, membership = _gather(path, join_listen, n_members, sessions, secret_file,
                                          keys, insecure)
    membership.close()


@main.command()
@click.option("--model", "model_spec", default="default", show_default=True)
@click.option("--stage", "stages", multiple=True,
              help="Stage URL, in chain order (repeat). Without any: hosts join "
                   "(`mesh-stage --join`) and the mesh places the model's layers on them.")
@_join_options
@click.option("--host", default=API.host, show_default=True)
@click.option("--port", default=API.port, show_default=True)
@click.option("--decode-groups", default=CoordinatorConfig.decode_groups, show_default=True,
              type=click.IntRange(1, 64), help=DECODE_GROUPS_HELP)
@click.option("--retry-wait", "retry_wait_s", default=CoordinatorConfig.retry_wait_s,
              show_default=True,
              help="Seconds a request that streamed nothing waits for a failed chain to come "
                   "back before it is answered 503.")
@_api_options
@_secret_option
@_speculation_options
def serve(model_spec, stages, join_listen, n_members, sessions, host, port, decode_groups,
          retry_wait_s, api_keys, insecure, limits, secret_file, speculative, speculate_when,
          draft_max, draft_model) -> None:
    """Serve the OpenAI-compatible API over a chain of stages: the running ones given, or
    hosts that join."""
    from mesh.logs import configure
    from mesh.model.source import resolve_model

    configure("info")
    api_keys = _checked_keys(host, api_keys, insecure)
    membership = None
    try:
        config = CoordinatorConfig(
            decode_groups=decode_groups, retry_wait_s=retry_wait_s,
            speculation=_speculation(speculative, draft_max, draft_model, speculate_when))
        path = resolve_model(model_spec)
        mesh_keys = _mesh_keys(secret_file)
        urls = list(stages)
        placement: Callable[..., Any] | None = None
        if not urls:
            from mesh.coordinator.placing import assignments
            from mesh.coordinator.replanning import Replanner
            from mesh.model.slicing import model_info

            placed, members, membership = _gather(path, join_listen, n_members, sessions,
                                                  secret_file, mesh_keys, insecure)
            if not placed.feasible:
                _fail(f"cannot place the model: {placed.reason}")
            ranges, standby = assignments(placed, members)
            by_name = membership.assign(ranges, standby, JOIN.load_s)
            urls = [by_name[stage.member] for stage in placed.stages]
            joined, info = membership, model_info(path)

            def placement(coordinator):
                return Replanner(joined, info, coordinator, placed, sessions)
        _serve(path, urls, host, port, announce=False, config=config, api_keys=api_keys,
               mesh_keys=mesh_keys, limits=limits, placement=placement)
    except MeshError as exc:
        _fail(str(exc))
    finally:
        if membership is not None:
            membership.close()


def _serve(path: Path, stages: list[str], host: str, port: int, announce: bool,
           config: CoordinatorConfig | None = None, api_keys: tuple[str, ...] = (),
           mesh_keys=None, limits=None, placement=None) -> None:
    """Build the coordinator over ``stages`` and serve the API over it until a signal."""
    from mesh.api.app import ApiSettings, run_server
    from mesh.api.limits import ApiLimits
    from mesh.coordinator.core import Coordinator
    from mesh.transport.security import salt_key_of

    limits = limits or ApiLimits()
    # With keys, one key may hold only its share of the slots; without, clients share them.
    config = dataclasses.replace(config or CoordinatorConfig(),
                                 tenant_share=limits.key_share if api_keys else 1.0)
    coordinator = Coordinator(path, stages, config, keys=mesh_keys)
    settings = ApiSettings(model_id=path.stem, api_keys=api_keys, limits=limits,
                           announce_url=f"http://{host}:{port}" if announce else None,
                           salt_key=salt_key_of(mesh_keys),
                           placement=placement(coordinator) if placement else None)
    run_server(coordinator, settings, host, port)


@main.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--member", nargs=2, default=None, metavar="ROLE OUT",
              type=(click.Choice(["stage", "coordinator"]),
                    click.Path(dir_okay=False, path_type=Path)),
              help="Instead: from the mesh secret PATH, write the identity of one member "
                   "(stage or coordinator) to OUT.")
def secret(path: Path, member: tuple[str, Path] | None) -> None:
    """Write a new mesh secret to PATH (mode 0600; an existing file is never overwritten).

    Whoever holds the secret can act as any member. On one host, give it to every stage
    (`mesh-stage --secret`) and coordinator (`mesh serve --secret`, `mesh generate --secret`).
    Across hosts, give each a member identity instead (`--member stage OUT`, `--member
    coordinator OUT`): a stage's cannot act as a coordinator (handshake, stop or read others'
    sessions).
    """
    from mesh.transport.security import write_member, write_secret

    try:
        if member is None:
            write_secret(path)
        else:
            write_member(path, member[0], member[1])
    except MeshError as exc:
        _fail(str(exc))
    if member is None:
        click.echo(f"wrote a new mesh secret to {path}", err=True)
    else:
        click.echo(f"wrote a {member[0]} identity of the mesh {path} to {member[1]}", err=True)


def _checked_keys(host: str, api_keys: tuple[str, ...], insecure: bool) -> tuple[str, ...]:
    """API keys from --api-key and MESH_API_KEYS; an API reachable from other hosts needs one."""
    keys = tuple(k for k in api_keys if k) + tuple(
        k.strip() for k in os.environ.get("MESH_API_KEYS", "").split(",") if k.strip())
    if not keys and not insecure and not is_loopback(host):
        _fail(f"refusing to serve on {host} without an API key: give --api-key KEY (or "
              "MESH_API_KEYS), or --insecure to serve it open")
    return keys


def _fail(message: str) -> NoReturn:
    click.echo(f"mesh: {message}", err=True)
    sys.exit(1)



if __name__ == "__main__":
    main()
