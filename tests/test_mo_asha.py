"""MOASHA's decisions on fake trials, no cluster: every expected CONTINUE / STOP below is worked
out by hand in the comments (non-dominated ranks, crowding distances, keep = ceil(n / eta))."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from coun_tune.search.scheduler import (
    CONTINUE,
    MOASHA,
    STOP,
    RungDecisions,
    priority_positions,
    rung_epochs,
)

GAP_ACC = {"forget_gap": "min", "retain_acc": "max"}


def report(sched: RungDecisions, trial: str, epoch: int, gap: float, acc: float, planned: int = 9) -> str:
    return sched.on_result(trial, epoch, {"forget_gap": gap, "retain_acc": acc}, planned)


def test_rungs_are_grace_times_powers_of_eta():
    s = RungDecisions(GAP_ACC, grace_epochs=1, reduction_factor=3)
    assert [e for e in range(1, 30) if s.is_rung(e)] == [1, 3, 9, 27]
    s = RungDecisions(GAP_ACC, grace_epochs=2, reduction_factor=2)
    assert [e for e in range(1, 20) if s.is_rung(e)] == [2, 4, 8, 16]
    assert rung_epochs(2, 3, 20) == [2, 6, 18]
    with pytest.raises(ValueError):
        RungDecisions(GAP_ACC, reduction_factor=1)


def test_priority_by_rank_then_crowding_by_hand():
    # (gap min, acc max): C(1,95) and D(2,99) trade off (front 0); E(3,97) is dominated by D
    # only (front 1); A(5,90) by C, D, E (front 2); B(6,89) by A too (front 3); NaN last
    pts = np.array([[5, 90], [6, 89], [1, 95], [2, 99], [3, 97], [np.nan, 99]])
    assert priority_positions(pts, ["min", "max"]).tolist() == [3, 4, 0, 0, 2, 5]
    # retain_acc minimised instead: A(5,90), B(6,89) and C(1,95) trade off (front 0: B and C
    # are the extremes, A interior); C dominates D(2,99) and E(3,97), a front of two (ties)
    assert priority_positions(pts[:5], ["min", "min"]).tolist() == [2, 0, 0, 3, 3]
    # one front of four, both objectives span 10: interior (1,9) has crowding 5/10 + 5/10 = 1.0,
    # interior (5,5) 9/10 + 9/10 = 1.8, the extremes infinity; a dominated point comes last
    front = np.array([[0, 10], [1, 9], [5, 5], [10, 0], [20, 20]])
    assert priority_positions(front, ["min", "min"]).tolist() == [0, 3, 2, 0, 4]


def test_asynchronous_decisions_at_a_rung():
    s = RungDecisions(GAP_ACC, grace_epochs=1, reduction_factor=3)
    assert report(s, "A", 1, 5, 90) == CONTINUE  # alone at the rung: keep ceil(1/3) = 1
    assert report(s, "B", 1, 6, 89) == STOP  # dominated by A; n=2, keep 1, B is 2nd
    assert report(s, "C", 1, 1, 95) == CONTINUE  # dominates A; n=3, keep 1, C is 1st
    assert report(s, "D", 1, 2, 99) == CONTINUE  # on the front with C (both extremes, tie); n=4, keep 2
    assert report(s, "E", 1, 3, 97) == STOP  # dominated by D: rank 1, two ahead; n=5, keep 2
    # A arrived first and continued: later arrivals never revoke a decision (asynchronous)
    assert s.decided[1]["A"] == CONTINUE
    # epochs between rungs always continue
    assert report(s, "C", 2, 0, 100) == CONTINUE
    # the next rung (epoch 3) starts empty: C is alone there
    assert report(s, "C", 3, 1, 96) == CONTINUE
    assert report(s, "D", 3, 2, 95) == STOP  # dominated by C at epoch 3; n=2, keep 1


def test_modes_decide_the_direction():
    # the same arrivals with retain_acc to be minimised: B(6,89) is no longer dominated by A(5,90)
    s = RungDecisions({"forget_gap": "min", "retain_acc": "min"}, grace_epochs=1, reduction_factor=3)
    assert report(s, "A", 1, 5, 90) == CONTINUE
    assert report(s, "B", 1, 6, 89) == CONTINUE  # A and B trade off: both extremes of one front, tie
    # with both maximised, B (6, 89) vs A (5, 90) trade off as well; C(1,95) vs A: C has lower gap
    s = RungDecisions({"forget_gap": "max", "retain_acc": "max"}, grace_epochs=1, reduction_factor=2)
    assert report(s, "A", 1, 5, 90) == CONTINUE
    assert report(s, "F", 1, 4, 80) == STOP  # dominated by A when both are maximised; n=2, keep 1


def test_ties_on_the_front_are_broken_by_crowding_distance():
    s = RungDecisions({"forget_gap": "min", "test_gap": "min"}, grace_epochs=1, reduction_factor=2)
    at = lambda t, a, b: s.on_result(t, 1, {"forget_gap": a, "test_gap": b}, 4)  # noqa: E731
    assert at("P5", 20, 20) == CONTINUE  # alone
    assert at("P6", 30, 30) == STOP  # dominated; n=2, keep 1
    assert at("P1", 0, 10) == CONTINUE  # front {P1}; n=3, keep 2
    assert at("P2", 10, 0) == CONTINUE  # front {P1, P2}, both extremes; n=4, keep 2
    assert at("P4", 5, 5) == CONTINUE  # front {P1, P4, P2}: P4 crowding 1 + 1, two ahead; n=5, keep 3
    # P3 is on the front too, but crowded: 1.0 against P4's 1.8 -> three ahead; n=6, keep 3
    assert at("P3", 1, 9) == STOP


def test_a_trial_whose_budget_ends_before_the_next_rung_completes():
    s = RungDecisions(GAP_ACC, grace_epochs=1, reduction_factor=3)
    assert report(s, "A", 1, 1, 99, planned=2) == CONTINUE
    assert report(s, "A", 2, 1, 99, planned=2) == CONTINUE  # epoch 2 is no rung: it just finishes
    # a trial whose last epoch is a rung completes even when it ranks last, and counts there:
    assert report(s, "W", 3, 9, 50, planned=3) == CONTINUE
    assert report(s, "X", 3, 8, 60, planned=9) == CONTINUE  # beats W; n=2, keep 1
    assert report(s, "Y", 3, 9.5, 40, planned=9) == STOP  # below X and W; n=3, keep 1


def test_a_repeated_report_gets_the_same_answer():
    s = RungDecisions(GAP_ACC, grace_epochs=1, reduction_factor=3)
    assert report(s, "A", 1, 5, 90) == CONTINUE
    for t, gap in (("B", 1), ("C", 2), ("D", 0.5)):
        report(s, t, 1, gap, 99)
    # Tune's duplicate final result, or an epoch repeated after a restore: not ranked again
    assert report(s, "A", 1, 5, 90) == CONTINUE
    assert len(s.recorded[1]) == 4


def test_a_missing_objective_ranks_last():
    s = RungDecisions(GAP_ACC, grace_epochs=1, reduction_factor=2)
    assert report(s, "A", 1, 50, 10) == CONTINUE
    assert s.on_result("B", 1, {"retain_acc": 99.0}, 9) == STOP  # no forget_gap: behind even a poor A


def test_tune_glue_returns_tune_decisions_and_resumes_from_its_state_file(tmp_path):
    state = tmp_path / "mo_asha.json"
    sched = MOASHA(GAP_ACC, grace_epochs=1, reduction_factor=3, state_path=str(state))
    trial = lambda tid: SimpleNamespace(trial_id=tid)  # noqa: E731
    res = lambda e, gap, acc, planned=5: {
        "epoch": e,
        "epochs_planned": planned,
        "forget_gap": gap,  # noqa: E731
        "retain_acc": acc,
        "training_iteration": e,
    }
    assert sched.set_search_properties(None, None)
    assert sched.on_trial_result(None, trial("a"), res(1, 1, 99)) == MOASHA.CONTINUE
    assert sched.on_trial_result(None, trial("b"), res(1, 2, 98)) == MOASHA.STOP
    assert sched.num_stopped == 1 and state.is_file()
    # a resumed search builds a new scheduler: it reads the rungs back and decides the same way
    again = MOASHA(GAP_ACC, grace_epochs=1, reduction_factor=3, state_path=str(state))
    assert again.on_trial_result(None, trial("b"), res(1, 2, 98)) == MOASHA.STOP
    assert again.on_trial_result(None, trial("c"), res(1, 3, 97)) == MOASHA.STOP  # n=3, keep 1, third
    assert again.on_trial_result(None, trial("a"), res(2, 1, 99)) == MOASHA.CONTINUE
    assert again.on_trial_result(None, trial("a"), res(3, 1, 99)) == MOASHA.CONTINUE
    assert "MOASHA" in again.debug_string()


# --- one real search with the scheduler on ---------------------------------------------------

E2E_SPEC = """\
name: asha
scenario: {{dataset: digits, forget: "random:0.1", seed: 0, recipe: tiny}}
method: coun
objectives: {{avg_gap: min, retain_acc: max}}
space:
  temperature: {{log: [0.03, 0.3]}}
  cl_weight: {{log: [0.1, 6.0]}}
  lr: {{log: [0.001, 0.1]}}
  epochs: 3
sampler: random
num_samples: 6
max_concurrent_trials: 1
resources_per_trial: {{cpu: 1, gpu: 0}}
seed: 0
scheduler: {{type: mo_asha, grace_epochs: 1, reduction_factor: 3}}
storage_path: {root}/results
tracking_uri: sqlite:///{root}/mlflow.db
cache_dir: {root}/cache
"""


def brute_force_continues(points: list[tuple[float, float]], eta: int) -> list[bool]:
    """Independent re-derivation of the rung rule for points arriving one by one (avg_gap min,
    retain_acc max): pairwise dominance peeled into fronts, NSGA-II crowding inside the front,
    continue iff fewer than ceil(n / eta) points rank strictly ahead."""

    def dominates(a, b):
        return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])

    out = []
    for n in range(1, len(points) + 1):
        seen, left, rank = points[:n], set(range(n)), {}
        r = 0
        while left:
            front = {i for i in left if not any(dominates(seen[j], seen[i]) for j in left if j != i)}
            rank.update({i: r for i in front})
            left -= front
            r += 1
        crowd = {}
        for f in set(rank.values()):
            members = [i for i in rank if rank[i] == f]
            crowd.update({i: 0.0 for i in members})
            for j in range(2):
                order = sorted(members, key=lambda i: seen[i][j])
                span = seen[order[-1]][j] - seen[order[0]][j]
                crowd[order[0]] = crowd[order[-1]] = math.inf
                for k in range(1, len(order) - 1):
                    if span > 0 and crowd[order[k]] != math.inf:
                        crowd[order[k]] += (seen[order[k + 1]][j] - seen[order[k - 1]][j]) / span
        me = n - 1
        ahead = sum((rank[i], -crowd[i]) < (rank[me], -crowd[me]) for i in range(n))
        out.append(ahead < math.ceil(n / eta))
    return out


@pytest.mark.slow
def test_a_search_with_mo_asha_prunes_honestly(tmp_path):
    import glob
    import os
    import pickle
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    (tmp_path / "spec.yaml").write_text(E2E_SPEC.format(root=tmp_path))
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "coun_tune", "search", "spec.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("asha").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("coun_tune.role") == "search")
    trials = sorted((r for r in runs if r.data.tags.get("coun_tune.role") == "trial"), key=lambda r: r.info.start_time)
    assert len(trials) == 6

    def steps(run, key):
        return [m.step for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]

    # one trial at a time, so the arrival order at the epoch-1 rung is the start order
    at_rung = [
        tuple(
            next(m.value for m in client.get_metric_history(t.info.run_id, k) if m.step == 1)
            for k in ("avg_gap", "retain_acc")
        )
        for t in trials
    ]
    expected = brute_force_continues(at_rung, eta=3)
    assert [t.info.status for t in trials] == ["FINISHED" if c else "KILLED" for c in expected]
    pruned = [t for t in trials if t.info.status == "KILLED"]
    finished = [t for t in trials if t.info.status == "FINISHED"]
    assert pruned and finished, at_rung  # both paths ran
    for t in pruned:
        assert t.data.metrics["pruned_at_epoch"] == 1 and t.data.tags["status"] == "pruned"
        assert steps(t, "retain_acc") == [1] and steps(t, "avg_gap") == [1]
        assert "pareto" not in t.data.tags
    for t in finished:
        assert steps(t, "retain_acc") == [1, 2, 3]
        assert steps(t, "avg_gap") == [1, 3]  # the MIA (hence avg_gap) at the rung and the end only
        assert t.data.tags["pareto"] in ("true", "false")
    # the front, hypervolume and trials table are built from the finished trials only
    parent = client.get_run(parent.info.run_id)
    assert parent.data.metrics["pareto_size"] == sum(t.data.tags["pareto"] == "true" for t in finished)

    # Optuna was told the truth: Tune's saved searcher state holds the study
    exp_dir = next(p for p in glob.glob(str(tmp_path / "results" / "asha*")) if os.path.isdir(p))
    with open(sorted(glob.glob(os.path.join(exp_dir, "searcher-state-*.pkl")))[-1], "rb") as f:
        study = pickle.load(f)["_ot_study"]
    by_lr = {round(t.params["lr"], 12): t for t in study.trials}
    for t in trials:
        ot = by_lr[round(float(t.data.params["lr"]), 12)]
        if t.info.status == "KILLED":
            assert ot.state == TrialState.PRUNED and ot.values is None
            assert ot.user_attrs["pruned_at_epoch"] == 1
        else:
            assert ot.state == TrialState.COMPLETE
            assert ot.values == pytest.approx([t.data.metrics["avg_gap"], t.data.metrics["retain_acc"]])
