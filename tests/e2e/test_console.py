"""The web console (``/``) and its status endpoint (``/v1/mesh/status``), against a real
2-stage mesh on the tiny model, in a real headless browser (Debian's chromium driven by
selenium through chromedriver: nothing is downloaded).

The browser test writes the README's screenshots, ``docs/console/desktop.png`` and
``docs/console/phone.png``.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.support.apiutil import serving
from tests.support.meshutil import running_mesh

CTX = 2048
KEY = "console-test-key"
# Greedy, the tiny model's answer to this prompt runs to max_tokens without an end token:
# a stream of a few seconds, long enough to watch the stages' KV grow.
PROMPT = "hello"
LONG = 1500
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "console"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def mesh(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console")
    with running_mesh(tiny_llama, [(0, 2), (2, 4)], tmp, ctx=CTX) as mesh:
        yield mesh


@pytest.fixture(scope="module")
def api(mesh, tiny_llama, tmp_path_factory):
    log = tmp_path_factory.mktemp("console-serve") / "serve.log"
    with serving(tiny_llama, mesh.urls, log) as base:
        yield base


@pytest.fixture(scope="module")
def keyed_api(mesh, tiny_llama, tmp_path_factory):
    log = tmp_path_factory.mktemp("console-keyed") / "serve.log"
    with serving(tiny_llama, mesh.urls, log, ("--api-key", KEY)) as base:
        yield base


def _until(predicate, timeout_s: float, what: str, every_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every_s)


def _stream_in_background(base: str, headers: dict[str, str] | None = None):
    """A long greedy completion streamed by a thread; returns (thread, {'events': n})."""
    seen = {"events": 0}

    def run():
        body = {"prompt": PROMPT, "max_tokens": LONG, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=headers,
                          timeout=60) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data:"):
                    seen["events"] += 1

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, seen


def test_status_tells_both_stages_and_kv_follows_a_streaming_request(api):
    status = httpx.get(f"{api}/v1/mesh/status", timeout=5).json()
    assert [s["layers"] for s in status["stages"]] == [[0, 2], [2, 4]]
    assert [s["index"] for s in status["stages"]] == [0, 1]
    assert all(s["host"].startswith("127.0.0.1:") and s["up"] for s in status["stages"])
    assert status["model"]["n_layer"] == 4 and status["model"]["context_length"] == CTX
    assert status["model"]["base_model"] is True  # the tiny GGUF has no chat template
    assert status["ready"] is True and status["plan"] is None
    assert status["series"]["bucket_s"] > 0 and len(status["series"]["points"]) >= 10
    # Weight bytes are read off the event loop at start; then the final stage's include the
    # output head, so they exceed the first's (each holds two blocks of the same size).
    status = _until(lambda: (s := httpx.get(f"{api}/v1/mesh/status").json())["stages"][1][
        "weight_bytes"] and s, 10, "weight bytes")
    first, last = status["stages"]
    assert 0 < first["weight_bytes"] < last["weight_bytes"]
    _until(lambda: httpx.get(f"{api}/v1/mesh/status").json()["stages"][0]["kv_capacity"],
           5, "a first Pong")

    thread, seen = _stream_in_background(api)
    kv_seen: set[int] = set()
    while thread.is_alive():  # poll while it streams, as the console does
        stage0 = httpx.get(f"{api}/v1/mesh/status", timeout=5).json()["stages"][0]
        if seen["events"] and stage0["sessions"]:
            kv_seen.add(stage0["kv_used"])
        time.sleep(0.1)
    thread.join()
    assert seen["events"] > LONG // 2  # it streamed
    growing = sorted(v for v in kv_seen if v > 0)
    assert len(growing) >= 2, f"KV in use did not change while the request streamed: {kv_seen}"

    # The finished request is in the series: a rate, and its time to first token.
    def counted():
        points = httpx.get(f"{api}/v1/mesh/status").json()["series"]["points"]
        return [p for p in points if p["requests_per_s"] > 0]
    point = _until(counted, 5, "the request in the series")[-1]
    assert point["tokens_per_s"] > 0 and point["ttft_ms"] > 0
    assert point["time_per_token_ms"] > 0


def test_with_keys_the_status_needs_a_key_and_health_stays_open(keyed_api):
    assert httpx.get(f"{keyed_api}/v1/mesh/status").status_code == 401
    wrong = httpx.get(f"{keyed_api}/v1/mesh/status", headers={"Authorization": "Bearer no"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    keyed = httpx.get(f"{keyed_api}/v1/mesh/status", headers={"Authorization": f"Bearer {KEY}"})
    assert keyed.status_code == 200 and len(keyed.json()["stages"]) == 2
    assert httpx.get(f"{keyed_api}/health").status_code == 200
    # The page itself is a shell that holds no figures: it asks for the key.
    page = httpx.get(f"{keyed_api}/")
    assert page.status_code == 200 and 'id="key-form"' in page.text
    assert "connect-src 'self'" in page.headers["content-security-policy"]


def test_the_console_files_ship_in_the_package_and_only_they_are_served(api):
    from importlib import resources

    console = resources.files("mesh.api") / "console"
    for name in ("index.html", "console.js", "console.css"):
        assert (console / name).is_file()
    assert httpx.get(f"{api}/console/console.js").headers["content-type"].startswith(
        "text/javascript")
    assert httpx.get(f"{api}/console/..%2Fapp.py").status_code == 404
    assert httpx.get(f"{api}/console/app.py").status_code == 404
    page = httpx.get(f"{api}/").text
    for url in ("http://", "https://", "//"):  # nothing from elsewhere, even by accident
        assert f'src="{url}' not in page and f'href="{url}' not in page


# ---- in a real browser --------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium and chromedriver are not installed "
                    "(apt-get install chromium chromium-driver; .ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--disable-extensions", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _requested_urls(driver) -> list[str]:
    """Every URL the browser asked for since the last call (the DevTools performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def _whole_page_screenshot(driver, width: int, path: Path) -> None:
    """The page from its top, in a window as tall as the page at ``width``."""
    driver.set_window_size(width, 900)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, min(height + 140, 6000))  # the window's frame included
    driver.execute_script("document.activeElement.blur(); window.scrollTo(0, 0);")
    driver.save_screenshot(str(path))


def _off_host(urls: list[str]) -> list[str]:
    """The URLs that would leave this host: any over the network (http, https, ws, ...)
    to another host than loopback, and any scheme not known to stay inside the browser
    (its own chrome:// pages, data: URLs)."""
    internal = ("chrome", "chrome-untrusted", "data", "about", "blob", "devtools")
    return [u for u in urls if urlsplit(u).scheme not in internal
            and urlsplit(u).hostname not in ("127.0.0.1", "localhost", "::1")]


def _console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _text(driver, selector: str) -> str:
    """The rendered text of the first match ('' if none), read in one script: the console
    redraws its figures every poll, so an element found first may be gone when read."""
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';",
        selector)


def test_the_console_shows_the_chain_live_and_the_playground_streams(api, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    driver = browser
    driver.set_window_size(1280, 1000)
    driver.get(f"{api}/?interval=250")
    stage = '[data-stage="{}"] [data-field="{}"]'
    _until(lambda: _text(driver, stage.format(1, "layers")), 15, "the stages drawn")
    assert _text(driver, stage.format(0, "layers")).startswith("0:2")
    assert _text(driver, stage.format(1, "layers")).startswith("2:4")
    _until(lambda: "used" in _text(driver, stage.format(0, "kv")), 10, "a KV figure")
    assert "Base model: no chat template, use plain completion" in _text(driver, "#base-note")
    assert Select(driver.find_element(By.ID, "mode")).first_selected_option.get_attribute(
        "value") == "completion"
    assert f"{CTX:,}" in _text(driver, "#ctx-note")  # the model's context length

    # Fill the playground and send it from the keyboard.
    prompt = driver.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(PROMPT)
    for field, value in (("max-tokens", str(LONG)), ("temperature", "0")):
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    driver.find_element(By.ID, "send").send_keys(Keys.ENTER)

    lengths, kv_texts = [], []
    deadline = time.monotonic() + 60
    while not _text(driver, "#play-status").startswith(("Done", "The request failed")):
        assert time.monotonic() < deadline, "the playground's stream did not end"
        lengths.append(len(_text(driver, "#answer")))
        kv_texts.append(_text(driver, stage.format(0, "kv")))
        time.sleep(0.05)
    status = _text(driver, "#play-status")
    assert status.startswith("Done") and f"{LONG:,} tokens" in status, status
    answer = _text(driver, "#answer")
    partial = sorted({n for n in lengths if 0 < n < len(answer)})
    assert len(partial) >= 3, f"the answer did not appear bit by bit: {partial[:10]}"
    used = {text.split(" used")[0] for text in kv_texts if "used" in text}
    assert len(used - {"0"}) >= 2, f"the KV figure did not change while streaming: {used}"

    # The charts picked up the request; every chart has its figure in text.
    _until(lambda: "none yet" not in _text(driver, '[data-chart="requests_per_s"]'), 10,
           "the request in the charts")
    labels = driver.execute_script("return [...document.querySelectorAll('figure.chart')]"
                                   ".map(f => f.querySelector('svg').getAttribute('aria-label'))")
    assert len(labels) == 4 and all("latest" in label for label in labels)

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    _whole_page_screenshot(driver, 1280, SCREENSHOTS / "desktop.png")
    _whole_page_screenshot(driver, 375, SCREENSHOTS / "phone.png")
    width = driver.execute_script("return document.documentElement.scrollWidth")
    inner = driver.execute_script("return window.innerWidth")
    assert width <= inner, f"the page is {width} px wide at phone width ({inner} px)"

    assert _console_errors(driver) == []
    urls = _requested_urls(driver)
    assert any(url.endswith("/v1/mesh/status") for url in urls)
    assert any(url.endswith("/v1/completions") for url in urls)
    assert _off_host(urls) == []


def test_with_keys_the_console_asks_for_one_and_then_shows_the_mesh(keyed_api, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = browser
    driver.set_window_size(1280, 1000)
    driver.get(f"{keyed_api}/?interval=250")
    _until(lambda: driver.find_element(By.ID, "key-section").is_displayed(), 10,
           "the key prompt")
    assert _text(driver, '[data-stage="0"]') == ""  # nothing shown without the key
    box = driver.find_element(By.ID, "key-input")
    box.send_keys("not-the-key", Keys.ENTER)
    _until(lambda: "refused" in _text(driver, "#key-error"), 10, "the wrong key refused")
    box = driver.find_element(By.ID, "key-input")
    box.send_keys(KEY, Keys.ENTER)
    _until(lambda: _text(driver, '[data-stage="1"] [data-field="layers"]'), 10,
           "the stages, with the key")
    assert not driver.find_element(By.ID, "key-section").is_displayed()
    # The refused key's 401s are the browser's network errors, not the page's.
    errors = [e for e in _console_errors(driver) if "401" not in e]
    assert errors == []
    assert _off_host(_requested_urls(driver)) == []
