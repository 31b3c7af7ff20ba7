"""One trial identity on every screen: the live progress lines and the end-of-search table
number trials exactly as the trial logger names their MLflow runs (`trial N · ...`, tag
coun_tune.trial_number), which is also the number the front table, pareto.png and export use.
The Tune id stays, last, for matching Ray's own logs.

Real parts: Tune's Trial objects, the real MLflowTrialLogger on a SQLite store and the real
TrialProgress, called in the order the runner registers them (logger, then progress). Trials
start out of creation order (t_b before t_a), so a number taken from the Tune id's suffix or
from creation order would disagree with MLflow's."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _trial(tid: str, lr: float):
    from ray.tune.experiment import Trial

    return Trial("noop", config={"lr": lr, "epochs": 2}, trial_id=tid, stub=True)


@pytest.fixture
def store(tmp_path):
    from coun_tune.tracking.mlflow_store import client_for, ensure_experiment

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = client_for(uri)
    exp = ensure_experiment(client, uri, "identity")
    parent = client.create_run(exp, run_name="identity_search").info.run_id
    return uri, client, exp, parent


def _numbers_in_mlflow(client, exp, parent) -> dict[str, str]:
    from coun_tune.tracking.describe import TRIAL_NUMBER
    from coun_tune.tracking.mlflow_store import PARENT, TRIAL_ID

    runs = client.search_runs([exp], filter_string=f"tags.`{PARENT}` = '{parent}'")
    for r in runs:  # the run name starts with the same number
        assert r.info.run_name.startswith(f"trial {r.data.tags[TRIAL_NUMBER]} · ")
    return {r.data.tags[TRIAL_ID]: r.data.tags[TRIAL_NUMBER] for r in runs}


def test_progress_lines_and_summary_use_the_mlflow_trial_number(store, capsys):
    from coun_tune.search.progress import TrialProgress, summary, trial_rows
    from coun_tune.tracking.trial_logger import MLflowTrialLogger

    uri, client, exp, parent = store
    logger = MLflowTrialLogger(uri, exp, parent, base_params={})
    progress = TrialProgress("identity", ["forget_gap", "retain_acc"], ["lr"], num_samples=4, fixed_epochs=None)
    a, b, c = _trial("zz_00000", 0.1), _trial("zz_00001", 0.2), _trial("zz_00002", 0.3)
    trials = [a, b, c]

    def start(t):
        for cb in (logger, progress):  # the runner's callback order
            cb.on_trial_start(0, trials, t)

    start(b)  # Tune started the second-created trial first
    start(a)
    result = {"epoch": 2.0, "forget_gap": 1.5, "retain_acc": 98.25, "epochs_planned": 2}
    progress.on_trial_result(0, trials, b, result)
    b.run_metadata.last_result = result  # what Tune holds when it calls on_trial_complete
    progress.on_trial_complete(0, trials, b)

    # a driver restart: both callbacks come back from Tune's saved state (taken once the
    # logger's writer thread had written what it was handed)
    assert logger.flush() == 0
    logger2 = MLflowTrialLogger(uri, exp, parent, base_params={})
    logger2.set_state(logger.get_state())
    progress2 = TrialProgress("identity", ["forget_gap", "retain_acc"], ["lr"], num_samples=4, fixed_epochs=None)
    progress2.set_state(progress.get_state())
    for cb in (logger2, progress2):
        cb.on_trial_start(0, trials, c)
    progress2.on_experiment_end(trials)
    assert logger2.flush() == 0

    in_mlflow = _numbers_in_mlflow(client, exp, parent)
    assert in_mlflow == {"zz_00001": "1", "zz_00000": "2", "zz_00002": "3"}  # by hand: order of start

    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header[:3] == ["trial", "status", "epoch"] and header[-1] == "tune_id"
    body = [line.split() for line in lines if line.split()[0] != "trial"]  # (the restored callback heads again)
    assert body, lines
    for cells in body:  # every line: the number MLflow shows, the Tune id last
        assert cells[0] == in_mlflow[cells[-1]], cells
    assert ["1", "done", "2/2", "1.50", "98.25", "0.2", "zz_00001"] in body

    text = summary(trial_rows("identity"), ["forget_gap", "retain_acc"], ["lr"], 4, 1.0)
    rows = [line.split() for line in text.splitlines()[1:] if line.split() and line.split()[0].isdigit()]
    assert [(r[0], r[-1]) for r in rows] == [("1", "zz_00001"), ("2", "zz_00000"), ("3", "zz_00002")]
