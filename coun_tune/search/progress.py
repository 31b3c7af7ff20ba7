"""What a person watching a search sees: one compact line per trial event, and a one-screen
summary at the end. Tune's own per-trial result dump is off (RunConfig(verbose=0)).

    trial  status      epoch  forget_gap  retain_acc  temperature  cl_weight      lr  tune_id
    1      started         -           -           -       0.0612       1.25  0.0312  a1b2_00000
    1      running       1/3        3.12       97.80       0.0612       1.25  0.0312  a1b2_00000
    1      done          3/3        1.04       98.90       0.0612       1.25  0.0312  a1b2_00000

`trial` is the trial's number, the one its MLflow run name (`trial 7 · ...`), the front table,
pareto.png and export use: the trial logger numbers trials 1, 2, ... in the order Tune starts
them, and this callback counts starts the same way (both see each on_trial_start, both keep
their count across a restore). The Tune id comes last, for matching Ray's own logs.

The callback is also the record of how each trial ended: Tune marks the trials it stops on
Ctrl-C as TERMINATED, like finished ones, so "did the search finish" is read from the ends seen
here (on_trial_complete / on_trial_error), which Tune saves and restores with the experiment.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from ray.tune import Callback

from coun_tune.report import table
from coun_tune.tracking.trial_logger import pruned_at_epoch

# Test-only (tests/test_faults.py): when set, the driver sends itself SIGINT, as a Ctrl-C would
# arrive, once the sampler has created the search's last trial and that trial has reported the
# epoch the variable names (1: its first): a deterministic "late Ctrl-C". At 2 or later the
# trial's earlier checkpoints are registered, so its resume goes on from one (at 1 the stop can
# come before Tune registers the first, and the trial reruns from scratch, ending the same).
# Read at call time, so a --resume without it runs on.
TEST_SIGINT_ENV = "COUN_TUNE_TEST_SIGINT_AFTER_LAST_TRIAL_STARTS"

COMPLETED, FAILED, INTERRUPTED, PRUNED = "done", "failed", "interrupted", "pruned"  # pruned: early-stopped
SUMMARY_ROWS = 30  # one screen; MLflow holds every trial


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) >= 1 or v == 0 else f"{v:.3g}"
    return str(v)


def _epoch(row: dict) -> str:
    """`2/5` (Tune may hand the epoch back as a float: 2.0)."""
    if row.get("epoch") is None:
        return "-"
    e = row["epoch"]
    return f"{int(e) if float(e).is_integer() else e}/{row.get('epochs') or '?'}"


class TrialProgress(Callback):
    # How each search's trials ended, by experiment name, for the runner on this driver (a
    # restored Tuner unpickles its own copy of this callback, so no reference survives to ask).
    ends_by_search: dict[str, dict] = {}

    def __init__(
        self,
        search_name: str,
        objectives: list[str],
        params: list[str],
        num_samples: int,
        fixed_epochs: int | None = None,
    ):
        self.search_name, self.objectives, self.params = search_name, list(objectives), list(params)
        self.num_samples, self.fixed_epochs = num_samples, fixed_epochs
        self.trials: dict[str, dict] = {}  # trial id -> {status, epoch, epochs, objectives..., params...}
        self._header_shown = False
        self._t0 = time.time()

    # --- state Tune saves with the experiment ---------------------------------------------
    def get_state(self) -> dict:
        return {"trials": self.trials}

    def set_state(self, state: dict) -> None:
        self.trials.update(state.get("trials", {}))

    # --- the lines -------------------------------------------------------------------------
    def _columns(self) -> list[str]:
        return ["trial", "status", "epoch", *self.objectives, *self.params, "tune_id"]

    def _widths(self) -> list[int]:
        return [5, 11, 6] + [max(10, len(c)) for c in self.objectives + self.params] + [0]

    def _line(self, cells: list[str]) -> str:
        w = self._widths()
        return "  ".join(
            c.ljust(w[i]) if i < 2 or i == len(cells) - 1 else c.rjust(w[i]) for i, c in enumerate(cells)
        ).rstrip()

    def _show(self, trial_id: str, status: str) -> None:
        row = self.trials[trial_id]
        row["status"] = status
        if not self._header_shown:
            _write_line(self._line(self._columns()))
            self._header_shown = True
        epoch = _epoch(row)
        cells = [
            number_of(row),
            status,
            epoch,
            *[_fmt(row.get(k)) for k in self.objectives],
            *[_fmt(row.get("config", {}).get(k)) for k in self.params],
            trial_id,
        ]
        _write_line(self._line(cells))

    def _row(self, trial) -> dict:
        config = {k: trial.config.get(k) for k in self.params}
        return self.trials.setdefault(
            trial.trial_id,
            {
                "n": len(self.trials),
                "config": config,
                "epoch": None,
                "status": "pending",
                "epochs": trial.config.get("epochs", self.fixed_epochs),
            },
        )

    def on_trial_start(self, iteration, trials, trial, **info):
        row = self._row(trial)
        if row.get("number") is None:  # the trial logger's rule: numbered in order of first start
            row["number"] = 1 + sum(r.get("number") is not None for r in self.trials.values())
        self._show(trial.trial_id, "resumed" if row.get("epoch") else "started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        row = self._row(trial)
        row["epoch"] = result.get("epoch", result.get("training_iteration"))
        for k in self.objectives:
            if isinstance(result.get(k), (int, float)):
                row[k] = float(result[k])
        self._show(trial.trial_id, "running")
        if (
            os.environ.get(TEST_SIGINT_ENV)
            and len(trials) >= self.num_samples
            and trial is trials[-1]
            and int(row["epoch"] or 0) >= int(os.environ[TEST_SIGINT_ENV])
            and not row.get("test_sigint_sent")
        ):
            row["test_sigint_sent"] = True
            os.kill(os.getpid(), signal.SIGINT)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._row(trial)
        self._show(trial.trial_id, PRUNED if pruned_at_epoch(trial.last_result or {}) is not None else COMPLETED)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._row(trial)
        self._show(trial.trial_id, FAILED)

    def on_experiment_end(self, trials, **info):
        for t in trials:  # created but never ended (stopped by Ctrl-C, or never started)
            row = self._row(t)
            if row["status"] not in (COMPLETED, FAILED, PRUNED):
                row["status"] = INTERRUPTED
        TrialProgress.ends_by_search[self.search_name] = {tid: dict(r) for tid, r in self.trials.items()}


def number_of(row: dict) -> str:
    """A progress row's trial number (as its MLflow run is named); "-" for a trial never started."""
    return "-" if row.get("number") is None else str(row["number"])


def trial_rows(search_name: str) -> dict[str, dict]:
    """trial id -> {number, status: done | failed | interrupted, epoch, epochs, objectives, config}, as
    the last fit() of this search on this driver saw them."""
    return dict(TrialProgress.ends_by_search.get(search_name, {}))


def summary(
    progress_rows: dict[str, dict], objectives: list[str], params: list[str], num_samples: int, wall_s: float
) -> str:
    """The end-of-search screen: counts, then up to SUMMARY_ROWS trials in trial order."""
    status = [r.get("status") for r in progress_rows.values()]
    pruned = f", {status.count(PRUNED)} pruned by early stopping" if PRUNED in status else ""
    head = (
        f"{status.count(COMPLETED)} of {num_samples} trials completed{pruned}, {status.count(FAILED)} failed, "
        f"{status.count(INTERRUPTED)} interrupted; {wall_s:.0f} s"
    )
    rows = []
    order = sorted(
        progress_rows.items(), key=lambda kv: (kv[1].get("number") is None, kv[1].get("number") or 0, kv[1].get("n", 0))
    )
    for tid, r in order[:SUMMARY_ROWS]:
        ep = _epoch(r)
        rows.append(
            [
                number_of(r),
                r.get("status"),
                ep,
                *[_fmt(r.get(k)) for k in objectives],
                *[_fmt(r.get("config", {}).get(k)) for k in params],
                tid,
            ]
        )
    more = len(progress_rows) - SUMMARY_ROWS
    tail = f"\n... and {more} more trials (all of them are in MLflow)" if more > 0 else ""
    return head + "\n" + table(["trial", "status", "epoch", *objectives, *params, "tune_id"], rows) + tail


def _write_line(line: str) -> None:
    """One write per row: print() writes the text and the newline separately, and the MLflow
    writer thread's own line could land between them ("...6c73d77aMLflow unreachable ...")."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
