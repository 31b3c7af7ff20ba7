"""The honest front end to end (issue 14): a real search (local Ray, Optuna, SQLite MLflow, the
real CLI) whose trials are scored on 3 calibration splits and whose front is re-run on 3
hold-out splits; a Ctrl-C while the last trial is mid-way (after its first of 2 epochs on every
split), --resume, a Ctrl-C during the hold-out check, --resume.

What must hold: every trial run holds the three per-split values and forget_gap equals their
mean (and each per-split value equals an independent `unlearn` on that split); every front
trial holds holdout_forget_gap_mean (the mean of its holdout.parquet rows); the Ctrl-C leaves a
resumable search and --resume repeats no finished hold-out run; the export says it picked on
hold-out values, and picks the knee of the hold-out means (re-derived here by hand)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from _search_helpers import SPACE, child_env, run_cli, stop_session, write_spec

from coun_tune.search.holdout import TEST_SIGINT_ENV
from coun_tune.search.progress import TEST_SIGINT_ENV as SIGINT_MID_TRIAL

pytestmark = pytest.mark.slow

CAL, HOLD = [0, 1, 2], [100, 101, 102]
SCENARIO = {"dataset": "digits", "forget": "random:0.3", "seed": 0, "recipe": "tiny"}
STOP_AFTER = 2  # hold-out runs finished before the Ctrl-C


def _runs(uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    every = client.search_runs([exp.experiment_id])
    parents = [r for r in every if r.data.tags.get("coun_tune.role") == "search"]
    trials = [r for r in every if r.data.tags.get("coun_tune.role") == "trial"]
    return client, parents, trials


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    root = tmp_path_factory.mktemp("honest")
    uri = f"sqlite:///{root}/mlflow.db"
    write_spec(
        root / "spec.yaml",
        "honest",
        cache_dir=root / "cache",
        storage_path=root / "results",
        tracking_uri=uri,
        num_samples=3,
        scenario=SCENARIO,
        calibration={"split_seeds": CAL},
        holdout={"split_seeds": HOLD},
        space={**SPACE, "epochs": 3},
    )
    env = child_env(COUN_TUNE_CACHE=str(root / "cc"))
    out = {"root": root, "uri": uri}
    out["mid_trial"] = run_cli(
        ["search", "spec.yaml"], cwd=root, env={**env, SIGINT_MID_TRIAL: "2"}, expect_rc=130, timeout=600
    )
    out["first"] = run_cli(
        ["search", "spec.yaml", "--resume"],
        cwd=root,
        env={**env, TEST_SIGINT_ENV: str(STOP_AFTER)},
        expect_rc=130,
        timeout=600,
    )
    (exp_dir,) = [p for p in (root / "results").iterdir() if p.is_dir()]
    out["exp_dir"] = exp_dir
    client, parents, trials = _runs(uri, "honest")
    out["interrupted"] = {
        "parent_status": parents[0].info.status,
        "trial_status": sorted(t.info.status for t in trials),
        "state": json.loads((exp_dir / "coun_tune_search.json").read_text()),
        "records": json.loads((exp_dir / "holdout_records.json").read_text()),
        "exported": (exp_dir / "exported_knee.yaml").exists(),
    }
    # the resume command the search printed, pasted into a fresh shell: another directory, no
    # venv on PATH (it names the executable, the spec and the search's directory itself)
    printed = out["first"].stdout.split("continue it with:\n", 1)[1].splitlines()[0].strip()
    out["printed_resume"] = printed
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    proc = subprocess.Popen(
        ["bash", "-c", printed],
        cwd=elsewhere,
        env={**env, "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        stop_session(proc.pid, grace=10)
    assert proc.returncode == 0, (printed, stdout[-3000:], stderr[-3000:])
    out["resumed"] = subprocess.CompletedProcess(printed, 0, stdout, stderr)
    return out


def test_ctrl_c_during_the_holdout_check_leaves_a_resumable_search(honest):
    """...and the resume command it printed works pasted into a fresh shell (the fixture runs it
    from another directory with no venv on PATH)."""
    assert honest["printed_resume"].startswith("cd /") and "/coun-tune search /" in honest["printed_resume"]
    seen = honest["interrupted"]
    assert "hold-out run 2/" in honest["first"].stdout and "search interrupted" in honest["first"].stdout
    assert seen["state"]["status"] == "interrupted" and seen["parent_status"] == "KILLED"
    assert seen["trial_status"] == ["FINISHED"] * 3  # the trials had finished; none left RUNNING
    assert len(seen["records"]) == STOP_AFTER and not seen["exported"]
    total = int(honest["first"].stdout.split("hold-out run 1/")[1].split(":")[0])
    resumed = honest["resumed"].stdout
    # only the runs not finished before the Ctrl-C: numbered 1..total-2 of total-2
    assert f"hold-out run {total - STOP_AFTER}/{total - STOP_AFTER}:" in resumed
    assert f"hold-out run {total - STOP_AFTER + 1}/" not in resumed
    records = json.loads((honest["exp_dir"] / "holdout_records.json").read_text())
    assert len(records) == total and len({(r["key"], r["split_seed"]) for r in records}) == total
    assert json.loads((honest["exp_dir"] / "coun_tune_search.json").read_text())["status"] == "finished"


def test_a_trial_interrupted_mid_way_resumes_every_split_from_its_checkpoint(honest):
    """The Ctrl-C came after the last trial's second epoch (of 3, on all 3 splits). After
    --resume a new process went on from a checkpoint (its first report is past epoch 1), and
    each trial logged every epoch once, per split too. That the resumed splits each continued
    from their own state is checked by re-deriving the per-split values from scratch in
    test_a_per_split_value_is_what_unlearn_gives_on_that_split (every split resumed from split
    0's state fails it)."""
    assert "1 interrupted" in honest["mid_trial"].stdout and "hold-out" not in honest["mid_trial"].stdout
    resumed = []
    for f in (honest["exp_dir"]).glob("unlearn_trial_*/result.json"):
        reports = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        pids = list(dict.fromkeys(r["pid"] for r in reports))
        if len(pids) > 1:
            resumed.append(min(r["epoch"] for r in reports if r["pid"] == pids[-1]))
    assert resumed and min(resumed) > 1, resumed  # went on from a checkpoint, not from scratch
    client, _, trials = _runs(honest["uri"], "honest")
    for t in trials:
        for k in ("forget_gap", "forget_gap_split1", "retain_acc_split2"):
            steps = [m.step for m in client.get_metric_history(t.info.run_id, k)]
            assert sorted(steps) == [1, 2, 3], (k, steps)


def test_every_trial_reports_the_mean_of_its_calibration_splits(honest):
    _, _, trials = _runs(honest["uri"], "honest")
    assert len(trials) == 3
    for t in trials:
        m = t.data.metrics
        for k in ("forget_gap", "retain_acc"):
            per = [m[f"{k}_split{s}"] for s in CAL]
            assert m[k] == pytest.approx(sum(per) / 3, abs=1e-9)
            mean = sum(per) / 3
            assert m[f"{k}_std"] == pytest.approx((sum((v - mean) ** 2 for v in per) / 2) ** 0.5, abs=1e-9)


def test_a_per_split_value_is_what_unlearn_gives_on_that_split(honest):
    """Re-derived outside the search: each trial's config unlearned from scratch on each
    calibration split in this process gives the trial's forget_gap_split<seed>."""
    import torch
    import yaml

    from coun_tune.config.unlearn_config import build_unlearn_config
    from coun_tune.core.pipeline import prepare, unlearn

    client, _, trials = _runs(honest["uri"], "honest")
    torch.set_num_threads(1)
    for t in trials:  # the one interrupted mid-way included
        path = client.download_artifacts(t.info.run_id, "model/config.yaml", str(honest["root"]))
        cfg = build_unlearn_config(yaml.safe_load(open(path)), {})
        for s in CAL:
            prep = prepare(cfg.scenario.with_split(s), honest["root"] / "cache", "cpu", log=lambda _: None)
            _, m = unlearn(prep, cfg.method, cfg.hparams, batch_size=cfg.batch_size, seed=cfg.seed)
            assert m["forget_gap"] == pytest.approx(t.data.metrics[f"forget_gap_split{s}"], abs=1e-6), (t, s)


def _front(points):
    """Brute force: (gap min, acc max) points no other point dominates."""

    def dom(a, b):
        return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])

    return [not any(dom(q, p) for q in points) for p in points]


def test_front_trials_hold_their_holdout_means_and_the_export_picks_on_them(honest):
    import pyarrow.parquet as pq

    client, parents, trials = _runs(honest["uri"], "honest")
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    cal = [(t.data.metrics["forget_gap"], t.data.metrics["retain_acc"]) for t in trials]
    on_front = _front(cal)
    table = pq.read_table(client.download_artifacts(parent.info.run_id, "holdout.parquet", str(honest["root"])))
    rows = table.to_pylist()
    assert sorted(r["split_seed"] for r in rows if r["key"] == "original") == HOLD  # the do-nothing reference
    validated = []
    for t, front in zip(trials, on_front):
        m = t.data.metrics
        if not front:
            assert "holdout_forget_gap_mean" not in m
            continue
        mine = [r["forget_gap"] for r in rows if r["key"] == t.info.run_id]
        assert sorted(r["split_seed"] for r in rows if r["key"] == t.info.run_id) == HOLD
        assert m["holdout_forget_gap_mean"] == pytest.approx(np.mean(mine), abs=1e-9)
        assert m["holdout_forget_gap_std"] == pytest.approx(np.std(mine, ddof=1), abs=1e-9)
        assert m["holdout_flag"] in (0.0, 1.0)
        validated.append((t, m["holdout_forget_gap_mean"], m["holdout_retain_acc_mean"]))
    assert validated
    # the knee by hand: the hold-out front, min-max scaled per objective, closest to the ideal
    pts = [(g, a) for _, g, a in validated]
    front = [v for v, f in zip(validated, _front(pts)) if f]
    g = np.array([f[1] for f in front])
    a = -np.array([f[2] for f in front])

    def scaled(v):
        return (v - v.min()) / (v.max() - v.min()) if v.max() > v.min() else v * 0

    knee = front[int(np.argmin(np.hypot(scaled(g), scaled(a))))][0]
    header = (honest["exp_dir"] / "exported_knee.yaml").read_text()
    assert "picked on hold-out means over 3 forget sets" in header
    assert knee.info.run_id in header
    assert "picked on hold-out means" in honest["resumed"].stdout
    assert "hold-out" in honest["resumed"].stdout.split("Pareto front")[1].splitlines()[0]
    tables = json.loads(client.get_run(parent.info.run_id).data.tags["mlflow.loggedArtifacts"])
    assert {"path": "holdout.json", "type": "table"} in tables
    # optuna-dashboard shows the same validation: the study's note of each validated trial
    # carries the hold-out mean MLflow holds (matched by run id), and names the same knee
    import optuna

    from coun_tune.search.runner import OPTUNA_JOURNAL, open_journal

    study = optuna.load_study(
        study_name=honest["exp_dir"].name, storage=open_journal(str(honest["exp_dir"] / OPTUNA_JOURNAL))
    )
    notes = {v["run_id"]: v for v in study.user_attrs["coun_tune_trials"].values()}
    for t, gap, _ in validated:
        assert notes[t.info.run_id]["holdout_forget_gap_mean"] == pytest.approx(gap, abs=1e-9)
    assert [r for r, v in notes.items() if v["is_knee"]] == [knee.info.run_id]
