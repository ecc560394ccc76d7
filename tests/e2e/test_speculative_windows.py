"""Speculative decoding through real stage processes: verify windows never change the output.

Greedy runs equal a single-process llama.cpp run token for token, at 2 and 3 stages; seeded
sampling draws the same tokens with and without windows; windows rejected at every position,
stale windows in flight, stop strings and max_tokens inside a window all leave the output as
plain decode steps give it.
"""

import contextlib
import dataclasses

import pytest

from mesh.config import SpeculationConfig
from mesh.coordinator.core import GenerationParams
from tests.support.meshutil import running_mesh, with_coordinator
from tests.support.parity import single_greedy

pytestmark = pytest.mark.gemma

CODE = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n" * 2 + "def add"
NOVEL = "Photosynthesis is the process by which"
OFF = SpeculationConfig(mode="none")
ON = SpeculationConfig(mode="ngram", draft_max=8, policy="always")  # every drafted window
EXACT = ["--batching", "exact"]  # outputs equal a single-process llama.cpp run


@pytest.fixture(scope="module")
def mesh2(gemma_path, tmp_path_factory):
    with running_mesh(gemma_path, [(0, 9), (9, 18)], tmp_path_factory.mktemp("spec2"),
                      ctx=1024, slots=8, threads=1, extra_args=EXACT) as mesh:
        yield mesh


def _complete(model, urls, prompts, params, speculation, drafter=None):
    async def body(coord):
        if drafter is not None:
            coord.runner.drafter_factory = drafter
        return [await coord.complete(p, params) for p in prompts]
    return with_coordinator(model, urls, body, speculation=speculation)


def test_greedy_with_windows_equals_a_single_process_run_at_two_and_three_stages(
        gemma_path, mesh2, tmp_path):
    greedy = GenerationParams(max_tokens=48)
    two = _complete(gemma_path, mesh2.urls, [CODE, NOVEL], greedy, ON)
    with running_mesh(gemma_path, [(0, 6), (6, 12), (12, 18)], tmp_path, ctx=1024, slots=8,
                      threads=1, extra_args=EXACT) as mesh3:
        three = _complete(gemma_path, mesh3.urls, [CODE, NOVEL], greedy, ON)
    for a, b in zip(two, three, strict=True):
        reference = single_greedy(gemma_path, a.prompt_token_ids, 48)
        assert a.token_ids == reference and b.token_ids == reference
    code = two[0].speculation
    assert code["windows"] > 0 and code["accepted"] >= 0.5 * code["drafted"]
    assert three[0].speculation["accepted"] > 0 and two[1].speculation["drafted"] > 0


class ScriptedDrafter:
    """Drafts the true output, wrong at every generated index i with i % period == wrong:
    windows are rejected at every position of a window as the test moves ``wrong``, and
    wholly accepted windows in between let several be in flight when one is rejected."""

    def __init__(self, prompt, truth, period, wrong):
        self.tokens, self.prompt, self.truth = list(prompt), len(prompt), truth
        self.period, self.wrong = period, wrong

    def extend(self, tokens):
        self.tokens += tokens

    def close(self):
        pass

    def propose(self, count, assumed=None):
        start = len(self.tokens) + len(assumed or []) - self.prompt
        out = []
        for i in range(start, min(start + count, len(self.truth))):
            bad = i % self.period == self.wrong
            out.append((self.truth[i] + 1) % 1000 if bad else self.truth[i])
        return out


@pytest.mark.parametrize("period", [6, 23])
def test_windows_rejected_at_every_position_leave_the_output_unchanged(gemma_path, mesh2,
                                                                       period):
    greedy = GenerationParams(max_tokens=40)
    (truth,) = _complete(gemma_path, mesh2.urls, [NOVEL], greedy, OFF)
    for wrong in range(period) if period < 10 else (9, 17):
        (result,) = _complete(
            gemma_path, mesh2.urls, [NOVEL], greedy, dataclasses.replace(ON, draft_max=5),
            lambda prompt, w=wrong: ScriptedDrafter(prompt, truth.token_ids, period, w))
        assert result.token_ids == truth.token_ids, (period, wrong)
        spec = result.speculation
        assert spec["accepted"] < spec["drafted"]  # the wrong guesses were rejected


def test_stop_strings_and_max_tokens_inside_a_window_end_where_plain_steps_end(
        gemma_path, mesh2):
    cases = [GenerationParams(max_tokens=n) for n in (1, 2, 5, 9, 17)]
    cases += [GenerationParams(max_tokens=40, stop=(s,)) for s in ("b\n", "sub(", "\n\n")]

    async def body(coord):  # one coordinator for every case: its start costs a second
        return [await coord.complete(CODE, params) for params in cases]
    offs, ons = (with_coordinator(gemma_path, mesh2.urls, body, speculation=config)
                 for config in (OFF, ON))
    for params, off, on in zip(cases, offs, ons, strict=True):
        assert (on.token_ids, on.text, on.finish_reason, on.usage) == (
            off.token_ids, off.text, off.finish_reason, off.usage), params


def test_seeded_sampling_draws_the_same_tokens_and_logprobs_with_windows(gemma_path, mesh2):
    params = GenerationParams(max_tokens=48, temperature=0.7, seed=11, logprobs=2,
                              repeat_penalty=1.05)
    (off,) = _complete(gemma_path, mesh2.urls, [CODE], params, OFF)
    deltas = {}
    for name, config in (("off", OFF), ("on", ON)):
        async def body(coord, config=config):
            return [d async for d in coord.stream(CODE, params)]
        deltas[name] = with_coordinator(gemma_path, mesh2.urls, body, speculation=config)
    on = deltas["on"][-1]
    assert on.token_ids == off.token_ids and on.speculation["accepted"] > 0
    logprobs = {name: [lp for d in items[:-1] for lp in d.logprobs]
                for name, items in deltas.items()}
    assert logprobs["on"] == logprobs["off"] and len(logprobs["on"]) == len(off.token_ids)


def test_with_two_threads_exact_windows_end_where_rows_would_leave_the_exact_path(
        gemma_path, tmp_path):
    """``--batching exact``: past 256 cells a lone row takes another attention path at >1
    thread: windows stop there, and the output still equals a single-process run across the
    boundary."""
    prompt = CODE * 4
    with running_mesh(gemma_path, [(0, 9), (9, 18)], tmp_path, ctx=1024, slots=4,
                      threads=2, extra_args=EXACT) as mesh:
        async def body(coord):
            limits = coord.runner._window_limits()
            return limits, await coord.complete(prompt, GenerationParams(max_tokens=64))
        (rows, cells), result = with_coordinator(gemma_path, mesh.urls, body, speculation=ON)
    assert cells == 256 and 2 <= rows <= 9
    n = len(result.prompt_token_ids)
    assert n < 256 < n + 64  # the run crosses the boundary
    assert result.token_ids == single_greedy(gemma_path, result.prompt_token_ids, 64)
    assert result.speculation["accepted"] > 0


def test_with_two_threads_default_windows_run_at_any_length(gemma_path, tmp_path):
    """The default mode has no 256-cell limit: windows verify past it at 2 threads, and the
    tokens and logprob floats are those of plain decode steps."""
    prompt = CODE * 6
    params = GenerationParams(max_tokens=64, logprobs=2)
    with running_mesh(gemma_path, [(0, 9), (9, 18)], tmp_path, ctx=1024, slots=4,
                      threads=2) as mesh:
        async def body(coord):
            return (coord.runner._window_limits(),
                    [d async for d in coord.stream(prompt, params)])
        (rows, cells), on = with_coordinator(gemma_path, mesh.urls, body, speculation=ON)
        _, off = with_coordinator(gemma_path, mesh.urls, body, speculation=OFF)
    assert cells is None and 2 <= rows <= 9
    assert len(on[-1].prompt_token_ids) > 300  # every window is past 256 cells
    assert on[-1].speculation["accepted"] > 20
    assert on[-1].token_ids == off[-1].token_ids
    assert ([lp for d in on[:-1] for lp in d.logprobs]
            == [lp for d in off[:-1] for lp in d.logprobs])


def test_a_draft_model_drafts_novel_text_without_changing_it(gemma_path, mesh2):
    """The target drafting for itself (its draft context batches rows the chain ran one at a
    time, so a near tie can go the other way): most guesses hold, and the output is the output
    without drafts."""
    greedy = GenerationParams(max_tokens=32)
    (off,) = _complete(gemma_path, mesh2.urls, [NOVEL], greedy, OFF)
    (on,) = _complete(gemma_path, mesh2.urls, [NOVEL], greedy,
                      dataclasses.replace(ON, draft_model=str(gemma_path)))
    assert on.token_ids == off.token_ids
    assert on.speculation["drafted"] > 20
    assert on.speculation["accepted"] >= 0.6 * on.speculation["drafted"]


def test_the_cost_policy_turns_windows_on_where_they_pay(gemma_path, mesh2):
    """The default policy weighs windows with the stages' probed costs (StageInfo) and the
    round trips plain steps measure: over 10 ms links a repeating text is verified in windows,
    and its tokens are the tokens without them."""
    from tests.support.linkdelay import DelayedLink

    params = GenerationParams(max_tokens=40)
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(DelayedLink("127.0.0.1", int(url.rsplit(":", 1)[1]), 10))
                .url for url in mesh2.urls]

        async def body(coord):
            infos = [conn.info for conn in coord.chain.connections]
            return infos, await coord.complete(CODE, params), coord.runner.hop_us
        infos, on, hop_us = with_coordinator(gemma_path, urls, body,
                                             speculation=SpeculationConfig())
        _, off, plain_hop_us = with_coordinator(gemma_path, urls, body, speculation=OFF)
    for info in infos:
        assert len(info.batch_us) == len(info.window_us) == info.exact_rows > 1
        assert all(us > 0 for us in info.batch_us)
    assert plain_hop_us > 10_000  # three 10 ms hops a step: measured, less the probed compute
    # Where the probed costs alone make windows pay (a window of 2 rows under 1.5 single rows,
    # as on some hosts), every step of the speculating run is a window and none is timed.
    assert hop_us is None or hop_us > 10_000
    assert on.token_ids == off.token_ids
    assert on.speculation["windows"] > 0 and on.speculation["accepted"] > 0
