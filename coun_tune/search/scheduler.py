"""Pareto-aware asynchronous successive halving (MOASHA) as a Ray Tune scheduler.

Rungs sit at epochs grace x eta^k (k = 0, 1, ...). When a trial reports at a rung epoch, it
is ranked against every trial that has reached that rung so far (asynchronous, as ASHA: no
waiting for a full rung): by non-dominated rank over the spec's objectives, ties broken by
crowding distance within the front (larger first), as Syne Tune's MOASHA does. It continues
only if it is among the top ceil(n / eta) of the n trials at the rung. A trial whose `epochs`
ends before the next rung simply completes; a trial whose last epoch is a rung is recorded
there (later arrivals are ranked against it) and completes, never counting as pruned.

The decision logic (`RungDecisions`) is pure Python + numpy, unit-tested with fake trials;
`MOASHA` is the thin Tune glue. Tune saves no scheduler state, so the rungs are written to a
small JSON file beside the experiment and read back on `--resume`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from coun_tune import pareto
from coun_tune.tracking.trial_logger import EPOCHS_PLANNED

CONTINUE, STOP = "CONTINUE", "STOP"
TIME_ATTR = "epoch"  # what a trial reports after each epoch (1-based), beside EPOCHS_PLANNED


# --- ranking: pure functions (the Pareto sorting itself is coun_tune.pareto's) -----------------


def priority_positions(values: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """(n, m) raw metric values -> (n,) int: how many points rank strictly ahead of each one,
    ordering by non-dominated rank, then by larger crowding distance within the front. Equal
    keys share a position (a tie never stops the later arrival alone). Rows with a NaN (an
    objective missing) rank after every other row."""
    v = np.asarray(values, dtype=float).reshape(len(values), -1)
    ranks = pareto.non_dominated_ranks(v, modes)
    ranks = np.where(ranks < 0, len(v), ranks)
    crowd = np.zeros(len(ranks))
    for r in np.unique(ranks[ranks < len(v)]):
        members = np.flatnonzero(ranks == r)
        crowd[members] = pareto.crowding_distance(v[members], modes)
    key = list(zip(ranks, -crowd))
    return np.array([sum(k < key[i] for k in key) for i in range(len(key))], dtype=int)


def rung_epochs(grace_epochs: int, reduction_factor: int, up_to: int) -> list[int]:
    """The rung epochs grace x eta^k that are <= up_to."""
    out, e = [], grace_epochs
    while e <= up_to:
        out.append(e)
        e *= reduction_factor
    return out


# --- decisions: pure bookkeeping --------------------------------------------------------------


class RungDecisions:
    """Asynchronous successive halving over several objectives.

    objectives: {metric: "min" | "max"} (the spec's, in order). recorded[rung][trial_id] is
    the trial's objective values at that rung epoch; decided[rung][trial_id] what it was told,
    so a repeated report (Tune's duplicate final result, epochs repeated after a restore)
    gets the same answer instead of being ranked again against itself."""

    def __init__(self, objectives: dict[str, str], grace_epochs: int = 1, reduction_factor: int = 3):
        if grace_epochs < 1 or reduction_factor < 2:
            raise ValueError(
                f"mo_asha needs grace_epochs >= 1 and reduction_factor >= 2, got {grace_epochs}, {reduction_factor}"
            )
        self.objectives = dict(objectives)
        self.grace, self.eta = int(grace_epochs), int(reduction_factor)
        self.recorded: dict[int, dict[str, list[float]]] = {}
        self.decided: dict[int, dict[str, str]] = {}

    def is_rung(self, epoch: int) -> bool:
        if epoch < self.grace or epoch % self.grace:
            return False
        q = epoch // self.grace
        while q % self.eta == 0:
            q //= self.eta
        return q == 1

    def on_result(self, trial_id: str, epoch: int, metrics: dict, epochs_planned: float = math.inf) -> str:
        """CONTINUE or STOP for a trial that just finished `epoch` of `epochs_planned`."""
        if not self.is_rung(epoch):
            return CONTINUE
        done = self.decided.setdefault(epoch, {})
        if trial_id in done:
            return done[trial_id]
        values = [_number(metrics.get(k)) for k in self.objectives]
        rung = self.recorded.setdefault(epoch, {})
        rung[trial_id] = values
        if epoch >= epochs_planned:  # its budget ends here: it completes, and counts at this rung
            done[trial_id] = CONTINUE
            return CONTINUE
        ids = list(rung)
        positions = priority_positions(np.array([rung[t] for t in ids]), list(self.objectives.values()))
        keep = math.ceil(len(ids) / self.eta)
        done[trial_id] = CONTINUE if positions[ids.index(trial_id)] < keep else STOP
        return done[trial_id]

    def state(self) -> dict:
        return {
            "recorded": {str(k): v for k, v in self.recorded.items()},
            "decided": {str(k): v for k, v in self.decided.items()},
        }

    def load(self, state: dict) -> None:
        self.recorded = {int(k): dict(v) for k, v in state.get("recorded", {}).items()}
        self.decided = {int(k): dict(v) for k, v in state.get("decided", {}).items()}


def _number(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan  # an objective missing at a rung ranks last


# --- Tune glue --------------------------------------------------------------------------------


class MOASHA(FIFOScheduler):
    """The Tune scheduler: feeds each result's epoch, planned epochs and objective values to
    RungDecisions and returns its CONTINUE / STOP. state_path: JSON file the rungs are kept in
    (beside the experiment), read back when a search resumes."""

    # decisions must be applied to the result they were made on (as Tune's ASHA does)
    _supports_buffered_results = False

    def __init__(
        self,
        objectives: dict[str, str],
        grace_epochs: int = 1,
        reduction_factor: int = 3,
        state_path: str | None = None,
    ):
        super().__init__()
        self.rungs = RungDecisions(objectives, grace_epochs, reduction_factor)
        self.state_path = state_path
        self._loaded = False
        self.num_stopped = 0

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # the objectives come with the scheduler; Tune's single metric is unused

    def _load(self) -> None:
        self._loaded = True
        if self.state_path and Path(self.state_path).is_file():
            self.rungs.load(json.loads(Path(self.state_path).read_text()))

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if not self._loaded:
            self._load()
        if TIME_ATTR not in result:
            return TrialScheduler.CONTINUE
        decision = self.rungs.on_result(
            trial.trial_id, int(result[TIME_ATTR]), result, float(result.get(EPOCHS_PLANNED, math.inf))
        )
        if self.state_path:
            tmp = f"{self.state_path}.tmp"
            Path(tmp).write_text(json.dumps(self.rungs.state()))
            os.replace(tmp, self.state_path)
        if decision == STOP:
            self.num_stopped += 1
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def debug_string(self) -> str:
        rungs = ", ".join(f"epoch {e}: {len(t)}" for e, t in sorted(self.rungs.recorded.items()))
        return (
            f"MOASHA (grace {self.rungs.grace}, eta {self.rungs.eta}): {self.num_stopped} stopped; rungs {rungs or '-'}"
        )
