"""Crashes and restarts leave nothing behind, and clients see latency instead of errors."""

import asyncio
import signal
import subprocess
import sys
import time

import httpx
import pytest

from mesh.config import COORDINATOR_TIMEOUTS
from mesh.coordinator.core import Coordinator, GenerationParams
from mesh.coordinator.sessions import Sessions
from mesh.errors import MeshError
from mesh.launcher import free_port
from mesh.transport import frames as fr
from mesh.transport.messages import PrefillEmbd
from mesh.transport.security import derive_keys, load_secret, write_secret
from tests.support import netns
from tests.support.apiutil import is_ready
from tests.support.meshutil import running_mesh, with_coordinator
from tests.support.rawpeer import RawPeer

PROMPT = [1, 50, 60, 70, 80]
COUNT = "Counting from one to a thousand: one, two, three, four, five,"


def _live_sessions(urls) -> list[int]:
    out = []
    for url in urls:
        # A fresh routing id per poll: a reused one may reconnect before the stage saw it go.
        with RawPeer(url, learn_epoch=False) as peer:
            pong = peer.ping()
            assert pong is not None, f"{url} answers a Ping"
            out.append(pong.sessions)
    return out


def _wait(predicate, timeout_s: float, what: str) -> float:
    """Seconds until ``predicate()`` holds (polled), or fail naming ``what``."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout_s, f"{what} within {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - t0


def _serve(model, urls, log, port):
    args = [sys.executable, "-m", "mesh.cli", "serve", "--model", str(model), "--port", str(port)]
    for url in urls:
        args += ["--stage", url]
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.gemma  # sessions that stay in flight: a tiny random model ends them too soon
def test_a_crashed_coordinators_sessions_expire_and_a_new_one_serves(gemma_path, tmp_path):
    lease = 2.0
    with running_mesh(gemma_path, [(0, 9), (9, 18)], tmp_path, ctx=1024, slots=4, threads=1,
                      extra_args=["--lease-s", str(lease)]) as mesh:
        port = free_port()
        first = _serve(gemma_path, mesh.urls, tmp_path / "serve1.log", port)
        base = f"http://127.0.0.1:{port}"
        try:
            _wait(lambda: is_ready(base), 60, "the first coordinator ready")
            streams = [httpx.stream("POST", f"{base}/v1/completions", timeout=30,
                                    json={"prompt": COUNT, "max_tokens": 900, "stream": True,
                                          "temperature": 0})
                       for _ in range(4)]
            responses = [s.__enter__() for s in streams]
            lines = [r.iter_lines() for r in responses]  # kept: a dropped one disconnects
            for line in lines:  # every slot holds a live session
                next(line)
            first.send_signal(signal.SIGKILL)
            crashed = time.monotonic()
            first.wait(10)
        finally:
            if first.poll() is None:
                first.kill()
        assert _live_sessions(mesh.urls) == [4, 4]  # orphans, until their lease runs out
        drained = _wait(lambda: _live_sessions(mesh.urls) == [0, 0], lease + 5,
                        "stages back to 0 live sessions")
        second = _serve(gemma_path, mesh.urls, tmp_path / "serve2.log", port)
        try:
            _wait(lambda: is_ready(base), 60, "the second coordinator ready")
            ok = httpx.post(f"{base}/v1/completions", json={"prompt": COUNT, "max_tokens": 4},
                            timeout=30)
            assert ok.status_code == 200
            served = time.monotonic() - crashed
        finally:
            second.terminate()
            second.wait(10)
    print(f"sessions dropped {drained:.1f} s after the crash was seen, served {served:.1f} s "
          "after the crash")
    assert served < 15


@pytest.mark.parametrize(("which", "outage_s"), [(0, 0.0), (1, 0.0), (1, 3.0)])
def test_a_stage_restart_is_noticed_and_serves_the_same_text(tiny_llama, tmp_path, which,
                                                             outage_s):
    with running_mesh(tiny_llama, [(0, 2), (2, 4)], tmp_path, ctx=256) as mesh:
        async def body(coord: Coordinator):
            params = GenerationParams(max_tokens=12)
            before = await coord.complete(PROMPT, params)
            stage = mesh.stages[which]
            stage.kill(signal.SIGKILL)
            # Same address; 0 s is well within the 2 s that count as down, 3 s is beyond.
            await asyncio.sleep(outage_s)
            stage.launch()
            await asyncio.to_thread(_live_sessions, [stage.url])  # answers: the process is up
            up = time.monotonic()
            after = await coord.complete(PROMPT, params)
            return before, after, time.monotonic() - up, coord.runner.retries
        before, after, seconds, retries = with_coordinator(tiny_llama, mesh.urls, body)
    assert after.token_ids == before.token_ids and len(before.token_ids) == 12
    assert seconds < 5
    print(f"stage {which} restarted after {outage_s:.0f} s: served {seconds:.2f} s after it was "
          f"up ({retries} retries)")


def test_a_clean_coordinator_exit_stops_its_sessions(tiny_llama, tmp_path):
    with running_mesh(tiny_llama, [(0, 2), (2, 4)], tmp_path, ctx=512,
                      extra_args=["--lease-s", "60"]) as mesh:
        async def body(coord: Coordinator):
            stream = coord.stream(PROMPT, GenerationParams(max_tokens=400))
            await anext(stream)  # a live session on every stage
            return _live_sessions(mesh.urls)

        assert with_coordinator(tiny_llama, mesh.urls, body) == [1, 1]
        # with_coordinator closed the coordinator: its Stops left before the sockets closed.
        _wait(lambda: _live_sessions(mesh.urls) == [0, 0], 5, "sessions stopped on close")


@pytest.mark.gemma  # a generation that stays in flight while the link is cut
@pytest.mark.skipif(not netns.available(), reason="needs root and network namespaces")
def test_a_cut_link_between_stages_fails_in_time_naming_it_and_serves_when_back(gemma_path,
                                                                                 tmp_path):
    secret = tmp_path / "mesh.secret"
    write_secret(secret)
    with netns.Hosts(2) as hosts, running_mesh(
            gemma_path, [(0, 9), (9, 18)], tmp_path, ctx=1024, slots=4, threads=1,
            hosts=hosts.addresses, wrappers=hosts.wrappers, secret=secret) as mesh:
        async def body(coord: Coordinator):
            params = GenerationParams(max_tokens=900)
            stream = coord.stream(COUNT, params)
            await anext(stream)
            hosts.cut(0)  # stage 0 can no longer reach stage 1; both still answer us
            cut = time.monotonic()
            with pytest.raises(MeshError) as failed:
                async for _ in stream:
                    pass
            failed_after = time.monotonic() - cut
            # A request that has streamed nothing waits for the link instead of failing.
            waiting = asyncio.create_task(coord.complete(COUNT, GenerationParams(max_tokens=8)))
            await asyncio.sleep(1.0)
            assert not waiting.done()
            hosts.cut(0, False)
            healed = time.monotonic()
            result = await waiting
            return failed.value, failed_after, time.monotonic() - healed, result

        exc, failed_after, served_after, result = with_coordinator(
            gemma_path, mesh.urls, body, keys=derive_keys(load_secret(secret)))
    assert "stage 0 → stage 1" in str(exc), str(exc)
    assert failed_after < 5
    assert len(result.token_ids) == 8
    print(f"link cut: request failed {failed_after:.1f} s after the cut ({exc}); a waiting "
          f"request was served {served_after:.1f} s after the link came back")


def test_a_restarted_coordinator_rebuilds_its_prefix_index_from_the_stages(tiny_llama, tmp_path):
    long_prompt = [1, *range(100, 227)]  # two whole prompt chunks: reuse snaps to them
    with running_mesh(tiny_llama, [(0, 2), (2, 4)], tmp_path, ctx=512) as mesh:
        async def first(coord: Coordinator):
            done = await coord.complete(long_prompt, GenerationParams(max_tokens=4))
            # The record exists once the final stage confirms the keep.
            while not len(coord.prefixes.index):
                await asyncio.sleep(0.01)
            return done

        async def second(coord: Coordinator):
            restored = len(coord.prefixes.index)
            again = await coord.complete(long_prompt + [7, 8], GenerationParams(max_tokens=4))
            return restored, again

        before = with_coordinator(tiny_llama, mesh.urls, first)
        restored, after = with_coordinator(tiny_llama, mesh.urls, second)
    assert before.cached_tokens == 0
    assert restored == 1
    assert after.cached_tokens == len(long_prompt)


def test_a_session_waiting_on_an_idle_chain_fails_by_its_progress_deadline(tiny_llama, tmp_path):
    with running_mesh(tiny_llama, [(0, 2), (2, 4)], tmp_path, ctx=256) as mesh:
        async def body(coord: Coordinator):
            session, inbox = coord.sessions.open()
            # A non-final chunk gets no reply: as if the frame carrying the reply were lost.
            coord.runner._send_work(PrefillEmbd, session, 0, PROMPT)
            t0 = time.monotonic()
            with pytest.raises(MeshError) as stalled:
                await Sessions.next(inbox)
            coord.sessions.close(session)
            coord.prefixes.stop(session, None, b"")
            served = await coord.complete(PROMPT, GenerationParams(max_tokens=4))
            return stalled.value, time.monotonic() - t0, served

        exc, seconds, served = with_coordinator(tiny_llama, mesh.urls, body)
    assert "no progress" in str(exc) and "stage 0" in str(exc)
    assert COORDINATOR_TIMEOUTS.progress_deadline_s <= seconds < 5
    assert len(served.token_ids) == 4


def test_a_stage_drops_sessions_its_owner_left_out_of_two_lists_in_a_row(tiny_llama, tmp_path):
    with running_mesh(tiny_llama, [(0, 4)], tmp_path, ctx=256) as mesh:
        with RawPeer(mesh.urls[0], timeout_ms=60_000) as owner:
            owner.send(owner.prompt(1, PROMPT), owner.prompt(2, PROMPT))
            assert [owner.recv().kind for _ in range(2)] == [fr.TOKEN, fr.TOKEN]
            assert owner.ping().sessions == 2
            assert owner.ping(sessions=[2]).sessions == 2  # one list: 1 is only suspect
            with RawPeer(mesh.urls[0]) as other:  # another peer's list touches nothing of ours
                other.ping(sessions=[])
                other.ping(sessions=[])
            assert owner.ping(sessions=[2]).sessions == 2  # pongs precede the drop
            _wait(lambda: owner.ping().sessions == 1, 5, "session 1 dropped")
            owner.send(owner.work(fr.DECODE, 2, len(PROMPT), [5]))
            assert owner.recv().kind == fr.TOKEN  # the listed one still decodes


def test_slow_links_cost_latency_and_are_not_taken_for_failures(tiny_llama, tmp_path):
    from tests.support.linkdelay import DelayedLink

    delay_ms = 40.0  # one way, on every hop: 3 hops a token
    with running_mesh(tiny_llama, [(0, 2), (2, 4)], tmp_path, ctx=256) as mesh:
        ports = [int(url.rsplit(":", 1)[1]) for url in mesh.urls]
        with DelayedLink("127.0.0.1", ports[0], delay_ms) as first, \
                DelayedLink("127.0.0.1", ports[1], delay_ms) as second:
            async def body(coord: Coordinator):
                t0 = time.monotonic()
                done = await coord.complete(PROMPT, GenerationParams(max_tokens=40))
                return done, time.monotonic() - t0, coord.runner.retries

            done, seconds, retries = with_coordinator(tiny_llama, [first.url, second.url], body)
    steps = len(done.token_ids)
    assert steps == 40 and retries == 0  # 3+ s of generation, no stage or link "down"
    assert seconds >= steps * 3 * delay_ms / 1e3
