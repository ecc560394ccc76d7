"""Drafting and verify-window planning on the coordinator, as plain data (no chain)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.config import SpeculationConfig
from mesh.coordinator.drafting import NgramDrafter
from mesh.coordinator.speculation import Speculator


def test_the_drafter_continues_the_last_earlier_occurrence_of_the_longest_ending():
    drafter = NgramDrafter([1, 2, 3, 4, 9, 2, 3, 5, 6, 7, 1, 2, 3])
    # "2 3" last continued with "5 6 ..."; but "1 2 3" (longer) continued with "4 9"
    assert drafter.propose(3) == [4, 9, 2]
    assert NgramDrafter([1, 2, 3, 4]).propose(3) == []  # the ending never occurred before
    assert NgramDrafter([5, 6, 5]).propose(3) == []  # one token is not enough to go on


def test_a_draft_runs_on_into_its_own_tokens_and_past_the_tokens_in_flight():
    drafter = NgramDrafter([7, 8, 9, 7, 8])
    assert drafter.propose(7) == [9, 7, 8, 9, 7, 8, 9]  # a loop continues as a loop
    drafter.extend([9])
    assert drafter.propose(2, assumed=[7, 8]) == [9, 7]


def run(spec: Speculator, model: list[int], budget: int) -> tuple[list[int], list]:
    """Drive ``spec`` against a model whose output is ``model`` (what a final stage would
    sample): answer every window as the final stage does, in order, dropping stale ones."""
    out: list[int] = []
    sent = []
    spec.take(model[0])
    out.append(model[0])
    pending = spec.next_windows(budget - len(out), True)
    queue = list(pending)
    sent += pending
    stale_from = None
    while queue and len(out) < budget:
        window = queue.pop(0)
        if stale_from is not None and (window.pos, window.tokens[0]) != stale_from:
            continue  # the final stage drops it
        stale_from = None
        assert window.tokens[0] == out[-1] and window.pos == len(PROMPT) + len(out) - 1
        for i in range(window.n):
            token = model[window.pos + i + 1 - len(PROMPT)]
            assert spec.awaited(window.pos + i + 1)
            spec.take(token)
            out.append(token)
            more = spec.next_windows(budget - len(out), True) if len(out) < budget else []
            queue += more
            sent += more
            if len(out) >= budget:
                break
            if i >= len(window.draft) or token != window.draft[i]:
                if i < len(window.draft):
                    stale_from = (window.pos + i + 1, token)
                break
    return out, sent


PROMPT = list(range(100, 110))  # 10 tokens, the first sampled token takes position 10


def speculator(**config) -> Speculator:
    cells = config.pop("cells", None)
    rows = config.pop("rows", 9)
    return Speculator(SpeculationConfig(**config), PROMPT, rows, cells, NgramDrafter)


def test_a_repeating_output_goes_out_in_chained_windows_and_comes_back_whole():
    model = [1, 2, 3, 4] * 12
    spec = speculator(draft_max=4, max_windows=3)
    out, sent = run(spec, model, 40)
    assert out == model[:40]
    drafted = [w for w in sent if w.draft]
    assert spec.streak > 1 and any(len(w.draft) == w.n for w in drafted)  # chained
    assert all(w.n <= 5 for w in sent)
    assert spec.stats.accepted > 0.7 * spec.stats.drafted and len(drafted) < 20


def test_a_rejection_drops_the_windows_after_it_and_shrinks_the_next_one():
    model = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9]
    spec = speculator(draft_max=8)
    out, _ = run(spec, model, 20)
    assert out == model
    assert spec.stats.accepted < spec.stats.drafted


def test_windows_respect_the_budget_the_rows_and_the_exact_cells():
    spec = speculator(draft_max=8, rows=4)
    spec.drafter.extend([1, 2, 1, 2, 1])
    spec.take(2)
    windows = spec.next_windows(3, True)
    assert sum(w.n for w in windows) <= 3 and all(w.n <= 4 for w in windows)
    late = speculator(draft_max=8, cells=12)
    late.drafter.extend([1, 2, 1, 2, 1])
    late.take(2)
    (only,) = late.next_windows(50, True)
    assert only.pos + only.n <= 12
    later = speculator(draft_max=8, cells=11)
    later.drafter.extend([1, 2, 1, 2, 1])
    later.take(2)
    assert [(w.n, w.draft) for w in later.next_windows(50, True)] == [(1, [])]


def test_without_speculation_every_step_is_one_plain_token():
    spec = speculator(mode="none")
    out, sent = run(spec, [1, 2] * 10, 20)
    assert out == [1, 2] * 10 and all(w.n == 1 and not w.draft for w in sent)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=2, max_size=60), st.integers(1, 16),
       st.integers(1, 4), st.integers(2, 9), st.integers(1, 60))
def test_any_model_output_comes_back_unchanged_whatever_is_drafted(model, draft_max, windows,
                                                                   rows, budget):
    spec = speculator(draft_max=draft_max, max_windows=windows, rows=rows)
    budget = min(budget, len(model))
    out, sent = run(spec, model, budget)
    assert out == model[:budget]
    assert all(w.n <= rows and len(w.draft) in (w.n - 1, w.n) for w in sent)


def test_windows_pay_where_hops_cost_more_than_the_rows_a_window_adds():
    """Costs as probed on Gemma 3 270M (2 threads, 0:17 | 17:18, microseconds): the head makes
    every row cost about as much as a step, so on one host windows pay only for text that
    repeats, over 10 ms links for most text, and not for novel text once eight sessions
    share each step."""
    from mesh.coordinator.speculation import StageCosts, windows_pay

    first = StageCosts((6300, 11400, 12100, 12900, 16000, 19000, 22300),
                       (6300, 7900, 9000, 10100, 11500, 12600, 13800))
    final = StageCosts((8000, 19400, 25000, 30000, 41000, 55000, 67000),
                       (8000, 8400, 8800, 9200, 9600, 10000, 10400))
    stages = [first, final]
    assert final.window(3) == 25000  # a verify window samples every row: a batch's cost
    assert first.batch(9) == 22300 + 2 * 3300  # past the table: its last step per row
    assert not windows_pay(stages, 2000, 1, 0.4, 7)  # one host, novel text
    assert windows_pay(stages, 2000, 1, 0.97, 7)  # one host, repeating text
    assert windows_pay(stages, 30000, 1, 0.6, 7)  # three 10 ms hops
    assert windows_pay(stages, 30000, 4, 0.9, 7)  # ... and with four sessions
    assert not windows_pay(stages, 30000, 8, 0.5, 7)  # eight sessions of novel text


def test_plain_steps_score_the_drafter_so_repeating_text_turns_windows_on():
    model = [1, 2, 3, 4] * 8
    spec = speculator(draft_max=4)
    assert spec.scores and spec.acceptance == 0.5  # the prior
    spec.take(model[0])
    out = [model[0]]
    while len(out) < 24:
        (window,) = spec.next_windows(64, False)  # plain steps: the policy said no
        assert window.n == 1 and not window.draft
        spec.take(model[len(out)])
        out.append(model[len(out)])
    assert spec.acceptance > 0.8  # its guesses came true once the text repeated
    assert spec.stats.windows == 0  # and nothing was verified
    windows = spec.next_windows(64, True)
    assert windows and windows[0].draft  # the policy may now send windows


def test_a_drafter_that_computes_is_not_scored_on_plain_steps():
    class Costly(NgramDrafter):
        free = False

    spec = Speculator(SpeculationConfig(), PROMPT, 9, None, Costly)
    spec.take(5)
    (window,) = spec.next_windows(8, False)
    assert window.guess is None and not spec.scores
