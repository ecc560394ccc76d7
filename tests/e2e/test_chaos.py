"""A short chaos run (``tests/chaos.py``; ``scripts/chaos.py`` runs it for minutes): stages and
the coordinator killed and restarted under mixed load, link cuts too where network namespaces
work. No request fails before its first token, and nothing is left behind."""

import pytest

from tests.support import netns
from tests.support.chaos import Chaos, soak


@pytest.mark.gemma
def test_a_short_chaos_run_fails_nothing_unstreamed_and_leaks_nothing(gemma_path, tmp_path):
    chaos = Chaos(gemma_path, [(0, 9), (9, 18)], tmp_path, clients=3, use_netns=netns.available(),
                  seed=7, gap_s=(2, 5))
    report = chaos.run(40)
    print("\n".join(report.lines()))
    assert sum(report.events.values()) >= 5
    assert report.outcomes["ok"] > 0
    failed = {k: n for k, n in report.outcomes.items() if k.startswith("FAILED")}
    assert failed == {}
    assert report.leaked_sessions == 0
    assert all(stage.records <= 8 for stage in report.stages)


@pytest.mark.gemma
def test_a_short_soak_ends_every_request_well_and_leaves_no_session(gemma_path, tmp_path):
    report = soak(gemma_path, [(0, 9), (9, 18)], tmp_path, requests=40, clients=3, samples=2)
    print("\n".join(report.lines()))
    assert {k for k in report.outcomes} <= {"ok", "ok (dropped by client)"}
    assert all(stage.sessions == 0 for stage in report.stages)
