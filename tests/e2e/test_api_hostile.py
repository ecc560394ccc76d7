"""Hostile but well-formed requests against a live mesh (issue M): each gets a 4xx within 2 s
while /health answers within 100 ms and another key's stream keeps flowing; one key at its
limits cannot keep another from being served; streams and requests end when their client goes.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx
import pytest

from mesh.api.app import error_response
from mesh.errors import StageError
from tests.support.apiutil import HealthWatch, held_stream, serving
from tests.support.linkdelay import DelayedLink
from tests.support.meshutil import running_mesh

KEYS = ("key-alpha", "key-beta")
SLOTS = 4
LIMIT_ARGS = ("--max-requests-per-key", "4", "--stream-stall", "2", "--request-timeout", "60")


@pytest.fixture(scope="module")
def mesh(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api-hostile")
    with running_mesh(tiny_llama, [(0, 2), (2, 4)], tmp, ctx=512, slots=SLOTS) as mesh:
        yield mesh


@pytest.fixture(scope="module")
def api(mesh, tiny_llama, tmp_path_factory):
    args = tuple(arg for key in KEYS for arg in ("--api-key", key)) + LIMIT_ARGS
    log = tmp_path_factory.mktemp("api-hostile-serve") / "serve.log"
    with serving(tiny_llama, mesh.urls, log, args) as base:
        yield base


def _auth(key: str = KEYS[0]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@contextlib.contextmanager
def flowing_stream(base: str, key: str = KEYS[1]):
    """A greedy stream of another key, read on a thread; yields its chunk arrival times."""
    times: list[float] = []

    def read():
        body = {"prompt": [1, 40, 41], "max_tokens": 400, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=_auth(key),
                          timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    times.append(time.monotonic())

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not times and time.monotonic() < deadline:
        time.sleep(0.01)
    assert times, "the other key's stream never started"
    yield times
    thread.join(60)


def _hostile(base: str, path: str, content: bytes) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    response = httpx.post(f"{base}{path}", content=content, timeout=30,
                          headers={**_auth(), "Content-Type": "application/json"})
    return response, time.monotonic() - t0


def _punct(i: int) -> str:
    """A distinct run of punctuation per i: names a converter folds into one rule name."""
    marks = " .,;:!?/_~*+=@#$%^&|"
    return marks[i % 20] + marks[i // 20 % 20] + marks[i // 400 % 20]


def _schema_body(schema: dict) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
            "response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}


HOSTILE = {
    # 7.5 MB of prompt text, under the body limit: refused before it is tokenized
    "huge_prompt": ("/v1/completions", {"prompt": "word " * 1_500_000, "max_tokens": 4}),
    # just under the body limit (a context's worth of the longest tokens, 4x, plus 1 MiB):
    # refused before it is tokenized
    "large_prompt": ("/v1/completions", {"prompt": "word " * 200_000, "max_tokens": 4}),
    # the same through chat, in one message and in many system messages
    "huge_message": ("/v1/chat/completions",
                     {"messages": [{"role": "user", "content": "word " * 1_500_000}]}),
    "many_messages": ("/v1/chat/completions",
                      {"messages": [{"role": "system", "content": "x" * 20}] * 150_000
                       + [{"role": "user", "content": "hi"}]}),
    # tools the built-in template used to join quadratically
    "many_tools": ("/v1/chat/completions",
                   {"messages": [{"role": "user", "content": "hi"}],
                    "tools": [{"type": "function", "function": {"name": f"f{i}"}}
                              for i in range(60_000)]}),
    # a deep array the JSON parser recurses into
    "deep_json": ("/v1/chat/completions",
                  b'{"messages": [{"role": "user", "content": "hi"}], "tools": '
                  + b"[" * 200_000 + b"]" * 200_000 + b"}"),
    # a token-list prompt of a million ids
    "token_list": ("/v1/completions", {"prompt": [5] * 1_000_000, "max_tokens": 2}),
    # schemas whose grammar used to kill the final stage, or whose conversion froze the API
    "schema_max_length": ("/v1/chat/completions", _schema_body(
        {"type": "string", "maxLength": 32000})),
    "schema_min_length": ("/v1/chat/completions", _schema_body(
        {"type": "string", "minLength": 50_000_000})),
    "schema_colliding": ("/v1/chat/completions", _schema_body(
        {"type": "object", "properties": {"a" + _punct(i): {"type": "string"}
                                          for i in range(6000)}})),
    "tool_schema": ("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
        "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {
                "s": {"type": "string", "maxLength": 32000}}}}}]}),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_bodies_get_4xx_fast_while_health_and_streams_flow(api, name):
    path, body = HOSTILE[name]
    # Encoded first: json.dumps of megabytes here would hold this process's GIL, and the
    # watchdog's thread with it.
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with HealthWatch(api) as health, flowing_stream(api) as chunks:
        response, took = _hostile(api, path, content)
        during = len(chunks)
        time.sleep(0.3)
        assert len(chunks) > during or len(chunks) >= 400, "the other stream stalled"
    print(f"{name}: {response.status_code} in {took * 1e3:.0f} ms, /health worst "
          f"{health.worst_s * 1e3:.0f} ms over {health.answers} polls")
    assert 400 <= response.status_code < 500, response.text[:300]
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert took < 2.0, f"{name}: answered after {took:.2f} s"
    assert health.answers > 3 and health.worst_s < 0.1, f"/health took {health.worst_s:.3f} s"
    ok = httpx.post(f"{api}/v1/completions", json={"prompt": [1, 5], "max_tokens": 2},
                    headers=_auth(), timeout=30)
    assert ok.status_code == 200


def test_a_stage_refusing_a_clients_input_is_a_400_without_internals():
    exc = StageError("invalid_input", "the grammar allows no token of this model's vocabulary",
                     "stage 2:4 at tcp://10.0.0.7:7502")
    response = error_response(exc)
    assert response.status_code == 400
    assert b"10.0.0.7" not in response.body and b"tcp://" not in response.body
    down = error_response(StageError("downstream_unavailable", "next stage tcp://10.0.0.8:1 "
                                     "is not accepting frames", "stage 0:2 at tcp://10.0.0.7:1"))
    assert down.status_code == 503 and b"10.0.0." not in down.body


def test_one_key_at_its_limits_cannot_keep_another_from_being_served(mesh, tiny_llama, tmp_path):
    """Key alpha opens 4 streams it never reads (the most it may have in flight): it holds 3
    of the 4 slots (its share) and queues the fourth; a fifth request is refused at once, and
    key beta is served at once."""
    args = tuple(arg for key in KEYS for arg in ("--api-key", key)) + (
        "--max-requests-per-key", "4", "--stream-stall", "60")
    with serving(tiny_llama, mesh.urls, tmp_path / "serve.log", args) as base:
        hogs = [held_stream(base, KEYS[0], [1, 20 + i]) for i in range(4)]
        try:
            queued = wait_metric(base, "mesh_admission_queue_depth", lambda v: v >= 1,
                                 timeout_s=20)
            assert queued == 1
            over = httpx.post(f"{base}/v1/completions", json={"prompt": [1, 5], "max_tokens": 2},
                              headers=_auth(KEYS[0]), timeout=30)
            assert over.status_code == 429 and over.headers.get("retry-after")
            t0 = time.monotonic()
            other = httpx.post(f"{base}/v1/completions",
                               json={"prompt": [1, 5], "max_tokens": 2},
                               headers=_auth(KEYS[1]), timeout=30)
            assert other.status_code == 200 and time.monotonic() - t0 < 10
        finally:
            for sock in hogs:
                sock.close()
        assert idle(base)


def test_choices_times_max_tokens_is_bounded(api):
    response = httpx.post(f"{api}/v1/completions", headers=_auth(), timeout=30,
                          json={"prompt": [1, 5], "n": 5, "max_tokens": 500})
    assert response.status_code == 400 and "n (5)" in response.json()["error"]["message"]


def test_a_non_streamed_request_stops_when_its_client_goes(tiny_llama, tmp_path):
    """Over links slow enough that the answer would take ~20 s, a client that gives up after
    1 s takes its sessions with it within a few seconds. (A mesh of its own: a coordinator
    reaching the stages through delaying links re-points their next stage at those links.)"""
    with contextlib.ExitStack() as stack:
        mesh = stack.enter_context(running_mesh(tiny_llama, [(0, 2), (2, 4)], tmp_path / "m",
                                                ctx=512))
        slow = [stack.enter_context(DelayedLink("127.0.0.1", int(u.rsplit(":", 1)[1]), 30))
                for u in mesh.urls]
        args = ("--api-key", KEYS[0], "--speculative", "none")
        base = stack.enter_context(serving(tiny_llama, [link.url for link in slow],
                                           tmp_path / "serve.log", args))
        t0 = time.monotonic()
        with contextlib.suppress(httpx.TimeoutException):
            httpx.post(f"{base}/v1/completions", headers=_auth(), timeout=1.0,
                       json={"prompt": [1, 7], "max_tokens": 200, "n": 2, "temperature": 0})
        cancelled = wait_metric(
            base, 'mesh_requests_total{endpoint="completions",status="cancelled"}',
            lambda v: v >= 1)
        assert cancelled >= 1
        assert idle(base) and time.monotonic() - t0 < 10


def idle(base: str, timeout_s: float = 10.0) -> bool:
    """Whether every stage reports no live session within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = httpx.get(f"{base}/metrics", headers=_auth(), timeout=5).text
        values = [float(line.split()[-1]) for line in text.splitlines()
                  if line.startswith("mesh_stage_sessions{")]
        if values and max(values) == 0:
            return True
        time.sleep(0.1)
    return False


def wait_metric(base: str, line_start: str, predicate, timeout_s: float = 10.0) -> float:
    deadline = time.monotonic() + timeout_s
    while True:
        text = httpx.get(f"{base}/metrics", headers=_auth(), timeout=5).text
        values = [float(line.split()[-1]) for line in text.splitlines()
                  if line.startswith(line_start)]
        value = values[0] if values else 0.0
        if predicate(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def test_a_stream_its_reader_holds_back_is_cut(api):
    """A reader that takes a few bytes now and then is cut once it has held the stream back
    for --stream-stall (2 s) in total: its session ends while the reader is still reading."""
    sock = held_stream(api, KEYS[0], [1, 9], n=3)
    stop = threading.Event()
    received = bytearray()

    def read_slowly():
        while not stop.wait(0.05):
            data = sock.recv(256)
            if not data:
                return
            received.extend(data)

    reader = threading.Thread(target=read_slowly, daemon=True)
    reader.start()
    try:
        assert wait_metric(api, "mesh_stage_sessions{", lambda v: v >= 1) >= 1
        assert idle(api, timeout_s=30), "the held-back stream was never cut"
        assert wait_metric(api, 'mesh_requests_total{endpoint="completions",status="stalled"}',
                           lambda v: v >= 1) >= 1
        assert reader.is_alive()  # cut while its reader still reads
        assert b"data:" in received
    finally:
        stop.set()
        reader.join(5)
        sock.close()
