"""Each trial's result.json and params.json, written where Tune keeps the trial (its directory
in the search's storage), one file when it changes.

Why not Tune's own loggers (JSON, CSV, TensorBoard; off through TUNE_DISABLE_AUTO_CALLBACK_LOGGERS,
set by run_search): they write into the driver's staging directory, and Ray 2.60 uploads that
whole directory at every experiment snapshot (and Tune forces a snapshot per trial checkpoint
when CheckpointConfig.num_to_keep is set). So each snapshot re-uploaded every trial's files:
S3 requests per trial-epoch grew with the number of trials. Here a result appends one line to
its trial's result.json and uploads that file alone, so a trial-epoch costs the same requests
whatever the number of trials; the snapshot is down to Tune's few state files.

Tune also keeps an (empty, now) staging directory per trial, and the snapshot's copy makes a
directory marker (one PUT) for each of them every time. A finished trial's empty one is removed
(a running trial's stays: Tune writes a failure's error.txt there without creating it).

The snapshot itself (experiment_state-*.json) still holds every trial, and Tune uploads it whole at
every snapshot (at every checkpoint, as num_to_keep asks, and every ~10 s): its bytes grow with
trials x snapshots. About half of a trial's entry (~15 of ~31 KB with coun-tune's ~30 numeric
metrics) is run_metadata.metric_n_steps: two deques per metric (the last 5 and 10 values, for
Tune's last-5-avg/last-10-avg), each cloudpickled and hex-encoded. They serve only the next
result's update of metric_analysis, and a TERMINATED trial gets no more results (a resumed search
skips finished trials), so a finished trial's are dropped before the next snapshot;
metric_analysis (max/min/avg/last and the last-n averages, what ExperimentAnalysis ranks by) is
kept whole. A finished trial's entry is then ~16 KB, and the snapshot's growth per trial about
halves: it still grows (see benchmarks/storage_traffic.py).

The files keep Tune's format (result.json: one JSON object per report, what Tune's
JsonLoggerCallback writes; ResultGrid and ExperimentAnalysis read it back; params.json: the
trial's config). progress.csv and TensorBoard event files are no longer written (coun-tune's
view of the trials is MLflow).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import PurePosixPath

from ray.tune import Callback

RESULT_FILE = "result.json"
PARAMS_FILE = "params.json"
DISABLE_TUNE_LOGGERS = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"  # Ray's switch for its default loggers

log = logging.getLogger(__name__)


def _encoder():
    from ray.tune.utils.util import SafeFallbackEncoder  # what Tune's JSON logger uses (numpy, NaN)

    return SafeFallbackEncoder


def compact_finished(trial) -> None:
    """A TERMINATED trial's snapshot entry without metric_n_steps (see the module docstring).
    Only for TERMINATED trials: a trial that may still report (running, paused, errored and
    resumable) needs them, update_metric indexing them for every metric it already has."""
    meta = getattr(trial, "run_metadata", None)
    if trial.status == "TERMINATED" and getattr(meta, "metric_n_steps", None):
        meta.metric_n_steps = {}  # an attribute set: Tune's cached JSON of the entry is redone


class TrialFiles(Callback):
    """Driver-side callback: result.json (appended and uploaded on every result) and params.json
    (on every start of a trial) in the trial's directory. Holds no saved state: after a restore it
    reads a trial's result.json back once, at the trial's first new result."""

    def __init__(self) -> None:
        self._lines: dict[str, list[str]] = {}
        self._made: set[str] = set()  # trial dirs created (local storage only)
        self._swept: set[str] = set()  # finished trials whose staging directory was removed
        self._warned = False

    def __getstate__(self) -> dict:  # pickled with the Tuner: none of what this process wrote
        return {"version": 1}  # (not empty: pickle skips __setstate__ for a falsy state)

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def _where(self, trial) -> tuple:
        storage = trial.storage
        return storage.storage_filesystem, storage.trial_fs_path

    def _write(self, trial, name: str, text: str) -> None:
        fs, base = self._where(trial)
        try:
            if fs.type_name == "local" and base not in self._made:  # S3 has no directories to make
                fs.create_dir(base, recursive=True)
                self._made.add(base)
            with fs.open_output_stream(str(PurePosixPath(base, name))) as f:
                f.write(text.encode())
        except Exception as e:  # a result file is a record, not the search: never stop it for one
            if not self._warned:
                self._warned = True
                log.warning("coun-tune: could not write %s of trial %s (%s: %s)", name, trial, type(e).__name__, e)

    def _earlier(self, trial) -> list[str]:
        """result.json as a process before this one left it (a resumed search), else []."""
        fs, base = self._where(trial)
        try:
            with fs.open_input_stream(str(PurePosixPath(base, RESULT_FILE))) as f:
                text = f.readall().decode()
        except Exception:  # not written yet (a new trial)
            return []
        return [line for line in text.splitlines() if line.strip()]

    def on_step_begin(self, iteration, trials, **info) -> None:
        """Before the step's snapshot, for each newly finished trial: drop its metric_n_steps
        from the snapshot and remove its empty staging directory."""
        for t in trials:
            if t.status == "TERMINATED" and t.trial_id not in self._swept:
                self._swept.add(t.trial_id)
                compact_finished(t)
                try:
                    os.rmdir(t.local_path)
                except (OSError, TypeError):  # holds a file (an error of an earlier try), or gone
                    pass

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._write(trial, PARAMS_FILE, json.dumps(trial.config, indent=2, sort_keys=True, cls=_encoder()))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        lines = self._lines.get(trial.trial_id)
        if lines is None:
            lines = self._lines[trial.trial_id] = self._earlier(trial)
        lines.append(json.dumps(result, cls=_encoder()))
        self._write(trial, RESULT_FILE, "\n".join(lines) + "\n")
