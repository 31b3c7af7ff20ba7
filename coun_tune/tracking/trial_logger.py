"""The single MLflow writer of a search: a Tune `Callback` on the driver, keyed by trial id.

Why a driver-side callback (and not `setup_mlflow` inside trials): one writer, one run per
trial, and its trial-id -> run-id map is saved with the Tune experiment (get_state/set_state),
so a retried trial or a restored search continues the same child run instead of making a new
one. Metrics of one report go in one batched request.

The callback never calls MLflow itself (Tune runs it on the driver's event loop, where a slow
or stopped server froze every trial): each event becomes a record in a queue that a writer
thread (tracking.writer) writes in order, retrying with back-off while the server is away. The
records not yet written are part of the state Tune saves with the experiment, so a driver that
dies, or a search that ends while MLflow is still down, loses none of them: `--resume` writes
them. Every record is idempotent, so writing one twice (a request that timed out after the
server acted, a record saved as pending and written just after) changes nothing:
- start: the trial's run is looked up by its tags (parent run id, trial id) before it is
  created, on every attempt, so a create that timed out after the server made the run, or a
  run a dead driver made, is adopted, never duplicated; params are set to the same values.
- metrics: one batch per report at the report's (step, timestamp); a step the run already has
  (an epoch Ray delivers again after a restore) is skipped.
- complete / error: tags, artifacts at fixed paths, and a logged model only if the run has none.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from coun_tune.calibration import is_split_metric
from coun_tune.core.metrics import DIAGNOSTICS, METRICS
from coun_tune.tracking.describe import TRIAL_NUMBER, run_name
from coun_tune.tracking.mlflow_store import PARENT, ROLE, TRIAL_ID, log_params

# What a trial reports that is worth a metric series in MLflow (Ray adds bookkeeping keys).
METRIC_KEYS = tuple(METRICS) + tuple(d for d in DIAGNOSTICS if d != "epoch")
# Every report also carries the trial's planned number of epochs, so anyone holding its last
# result (the searcher, this logger) can tell a trial stopped early by the scheduler.
EPOCHS_PLANNED = "epochs_planned"


def pruned_at_epoch(result: dict) -> int | None:
    """The epoch a trial was stopped at, if its last result falls short of its planned epochs
    (only a scheduler stops a trial early without an error); None for a trial that ran its budget."""
    epoch, planned = result.get("epoch"), result.get(EPOCHS_PLANNED)
    if epoch is None or planned is None or int(epoch) >= int(planned):
        return None
    return int(epoch)


class MLflowTrialLogger(Callback):
    # Records still unwritten when the last search on this driver ended, by parent run id: the
    # runner reads it (a restored Tuner unpickles its own copy of this callback, so no
    # reference survives to ask), and when MLflow is still down it leaves the search resumable
    # without calling MLflow.
    unwritten_by_parent: dict[str, int] = {}

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, base_params: dict[str, Any]):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.base_params = base_params
        self.runs: dict[str, str] = {}  # trial id -> MLflow run id (set by the writer thread)
        self.last_step: dict[str, int] = {}  # trial id -> last epoch reported
        self.numbers: dict[str, str] = {}  # trial id -> its number (1, 2, ... in order of first start)
        self._writer = None
        self._parent_params: dict | None = None
        self._steps: dict[str, set[int]] = {}  # run id -> steps it holds (writer thread only)

    def __getstate__(self):  # the writer holds a thread and a client: never pickle them with the tuner
        state = self.__dict__.copy()
        state["_writer"] = None
        state["_steps"] = {}
        state.pop("_client", None)
        return state

    def __setstate__(self, state):  # a logger pickled by an older coun-tune lacks the newer fields
        self.__dict__.update(state)
        self.__dict__.setdefault("numbers", {tid: "?" for tid in self.runs})
        self.__dict__.setdefault("_writer", None)
        self.__dict__.setdefault("_steps", {})
        self.__dict__.setdefault("_parent_params", None)

    @property
    def writer(self):
        if self._writer is None:
            from coun_tune.tracking.writer import MLflowWriter

            self._writer = MLflowWriter(self.tracking_uri, self._apply)
        return self._writer

    # --- state Tune saves with the experiment ----------------------------------------------
    def get_state(self) -> dict:
        writer = self._writer
        with writer.lock if writer is not None else contextlib.nullcontext():
            return {
                "runs": dict(self.runs),
                "last_step": dict(self.last_step),
                "numbers": dict(self.numbers),
                "pending": writer.pending() if writer is not None else [],
            }

    def set_state(self, state: dict) -> None:
        self.runs.update(state.get("runs", {}))
        self.last_step.update(state.get("last_step", {}))
        self.numbers.update(state.get("numbers", {}))
        for tid in self.runs:  # a state saved before trials were numbered here: keep the count
            self.numbers.setdefault(tid, "?")
        if state.get("pending"):  # unwritten when the state was saved: written first now
            self.writer.put_many(state["pending"])

    def flush(self, timeout: float | None = None) -> int:
        """Wait for the records so far to be written (up to `timeout` s, default
        writer.FLUSH_TIMEOUT_S). Returns how many are still unwritten."""
        from coun_tune.tracking.writer import FLUSH_TIMEOUT_S

        if self._writer is None:
            return 0
        return self._writer.flush(FLUSH_TIMEOUT_S if timeout is None else timeout)

    # --- Tune's events: records, nothing else ----------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        number = self.numbers.get(trial.trial_id)
        if number is None:  # in order of first start; the map survives a restore, so does the count
            number = self.numbers[trial.trial_id] = str(len(self.numbers) + 1)
        self.writer.put({"op": "start", "trial": trial.trial_id, "number": number, "config": dict(trial.config)})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step, ts = int(result.get("epoch", result.get("training_iteration", 0))), int(time.time() * 1000)
        self.last_step[trial.trial_id] = max(step, self.last_step.get(trial.trial_id, 0))
        metrics = {
            k: float(result[k])
            for k in result
            if (k in METRIC_KEYS or is_split_metric(k)) and isinstance(result[k], (int, float))
        }
        if metrics:
            self.writer.put({"op": "metrics", "trial": trial.trial_id, "step": step, "ts": ts, "metrics": metrics})

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.writer.put(
            {
                "op": "complete",
                "trial": trial.trial_id,
                "pruned_at_epoch": pruned_at_epoch(trial.last_result or {}),
                "checkpoint": trial.checkpoint,
                "step": self.last_step.get(trial.trial_id, 0),
                "ts": int(time.time() * 1000),
            }
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        reason = "unknown error"
        if trial.error_file and Path(trial.error_file).is_file():
            lines = [l for l in Path(trial.error_file).read_text().strip().splitlines() if l.strip()]
            reason = lines[-1][:500] if lines else reason
        self.writer.put({"op": "error", "trial": trial.trial_id, "reason": reason})

    def on_experiment_end(self, trials, **info):
        """The end of `tuner.fit()` (finished, interrupted or failed; Tune saved the experiment,
        pending records included, just before): write what is buffered, waiting a bounded time
        for a server that is down."""
        from coun_tune.tracking.writer import FLUSH_TIMEOUT_S

        writer = self._writer
        left = 0
        if writer is not None:
            left = writer.flush(2.0)
            if left:
                _say(f"MLflow: writing {left} buffered records (waiting up to {FLUSH_TIMEOUT_S:.0f} s)")
                left = writer.flush(FLUSH_TIMEOUT_S)
            writer.stop()
            if left:
                _say(
                    f"MLflow at {self.tracking_uri} still unreachable: {left} records not written. They are "
                    "saved with the search: continue it with --resume once the server answers (nothing "
                    "is lost or logged twice)."
                )
        MLflowTrialLogger.unwritten_by_parent[self.parent_run_id] = left

    # --- the writer thread: one record, idempotently -----------------------------------------
    def _apply(self, client, record: dict):
        op = record["op"]
        if op == "start":
            return self._write_start(client, record)
        run_id = self.runs.get(record["trial"])
        if run_id is None:  # the trial's start was refused by MLflow (reported then): nowhere to write
            return None
        try:
            {"metrics": self._write_metrics, "complete": self._write_complete, "error": self._write_error}[op](
                client, run_id, record
            )
        except Exception:
            self._steps.pop(run_id, None)  # a request may have landed: ask MLflow again on the retry
            raise
        return None

    def _trial_runs(self, client, trial_id: str) -> list:
        """This search's runs of the trial, oldest first (normally one or none)."""
        found = client.search_runs(
            [self.experiment_id],
            max_results=50,
            filter_string=f"tags.`{PARENT}` = '{self.parent_run_id}' and tags.`{TRIAL_ID}` = '{trial_id}'",
        )
        return sorted(found, key=lambda r: (r.info.start_time or 0, r.info.run_id))

    def _write_start(self, client, record: dict):
        tid = record["trial"]
        run_id = self.runs.get(tid)
        if run_id is not None:  # a retry or a restored search: same run, running again
            client.update_run(run_id, status="RUNNING")
            self._steps.pop(run_id, None)  # Ray may repeat epochs now: ask MLflow what it holds
            return None
        # Not in the map: the map is saved with Tune's experiment state, which may predate a
        # driver crash, and a create whose reply was lost may have made the run: look first.
        existing = self._trial_runs(client, tid)
        if existing:
            run_id = existing[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            self._steps.pop(run_id, None)
        else:
            number = record["number"]
            run = client.create_run(
                self.experiment_id,
                run_name=run_name(number, record["config"]),
                tags={PARENT: self.parent_run_id, ROLE: "trial", TRIAL_ID: tid, TRIAL_NUMBER: number},
            )
            run_id = run.info.run_id
            # an earlier attempt whose reply was lost may have been committed after the search
            # above: keep the oldest run, delete the others (made just now, nothing in them)
            runs = self._trial_runs(client, tid)
            keep = runs[0].info.run_id if runs else run_id
            for r in runs:
                if r.info.run_id != keep:
                    client.delete_run(r.info.run_id)
            if keep == run_id:
                self._steps[run_id] = set()
            run_id = keep
        log_params(client, run_id, self._params(client, record["config"]))  # same values: idempotent

        def commit():
            self.runs[tid] = run_id

        return commit

    def _params(self, client, sampled: dict) -> dict:
        """A trial's params: the search's scenario params and split_hash (from the parent), every
        hyperparameter of the method with defaults filled in, then the fixed and sampled values."""
        from coun_tune.core.engine import resolve_hparams
        from coun_tune.errors import UsageError

        if getattr(self, "_parent_params", None) is None:  # (a logger restored from an older state lacks it)
            params = client.get_run(self.parent_run_id).data.params
            self._parent_params = {k: v for k, v in params.items() if k.startswith("scenario.") or k == "split_hash"}
        given = {k: v for k, v in {**self.base_params, **sampled}.items() if k != "method"}
        try:
            resolved = resolve_hparams(self.base_params["method"], given) if "method" in self.base_params else {}
        except UsageError:  # the trial itself reports the bad value; params stay as given
            resolved = {}
        return {**self._parent_params, **resolved, **self.base_params, **sampled}

    def _logged_steps(self, client, run_id: str, keys) -> set[int]:
        """The steps the run holds (one batch per report: a step is there whole or not at all)."""
        if run_id not in self._steps:
            key = "retain_acc" if "retain_acc" in keys else sorted(keys)[0]
            self._steps[run_id] = {m.step for m in client.get_metric_history(run_id, key)}
        return self._steps[run_id]

    def _write_metrics(self, client, run_id: str, record: dict) -> None:
        from mlflow.entities import Metric

        step, ts, values = record["step"], record["ts"], record["metrics"]
        steps = self._logged_steps(client, run_id, values)
        if step in steps:
            return  # an epoch repeated after a restore, or a batch whose reply was lost: logged once
        client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v in values.items()])
        steps.add(step)

    def _write_complete(self, client, run_id: str, record: dict) -> None:
        epoch, ckpt = record["pruned_at_epoch"], record["checkpoint"]
        if epoch is not None:  # stopped at a rung: not a result to review or export by default
            if not any(m.step == epoch for m in client.get_metric_history(run_id, "pruned_at_epoch")):
                client.log_metric(run_id, "pruned_at_epoch", epoch, timestamp=record["ts"], step=epoch)
            if ckpt is not None:  # its config, to re-run at full budget if the user asks
                with tempfile.TemporaryDirectory() as tmp:
                    local = Path(ckpt.to_directory(tmp)) / "config.yaml"
                    if local.is_file():
                        client.log_artifact(run_id, str(local), artifact_path="model")
            client.set_tag(run_id, "status", "pruned")
            client.set_tag(run_id, "pruned_at_epoch", str(epoch))
            client.set_terminated(run_id, status="KILLED")
            return
        if ckpt is not None:
            with tempfile.TemporaryDirectory() as tmp:
                self._log_model(client, run_id, Path(ckpt.to_directory(tmp)), record["step"])
        client.set_tag(run_id, "status", "completed")
        client.set_terminated(run_id, status="FINISHED")

    def _log_model(self, client, run_id: str, local: Path, step: int) -> None:
        """The trial's files as plain `model/` artifacts (model.pt, config.yaml resolved,
        metrics.json) and its final network as an MLflow PyTorch model named `trial_<number>`,
        with the run's params and final metrics on it (Models tab, registry; models.log_model);
        when the latter fails (a checkpoint without a loadable state dict), the reason is the
        tag `model_error`. A run that has its model already (a retried record) gets no second."""
        from coun_tune.tracking.models import (
            log_model_from_files,
            log_run_metrics_to_model,
            logged_model_of,
            resolve_config_file,
        )
        from coun_tune.tracking.writer import is_transient

        try:  # every hyperparameter, defaults included (a copy: `local` is a download of the checkpoint)
            resolve_config_file(local / "config.yaml")
        except Exception:  # noqa: S110  (an unreadable config is logged as it is, and fails below)
            pass
        for f in ("model.pt", "config.yaml", "metrics.json"):
            if (local / f).is_file():
                client.log_artifact(run_id, str(local / f), artifact_path="model")
        done = logged_model_of(client, run_id)
        if done is not None:
            log_run_metrics_to_model(client, run_id, done.model_id)  # (the step a lost reply may have missed)
            return
        try:
            log_model_from_files(client, run_id, local, step=step)
        except Exception as e:  # the search goes on; the trial's metrics stand without a model
            if is_transient(e):
                raise  # MLflow is away, not the model at fault: the writer retries the record
            client.set_tag(run_id, "model_error", f"{type(e).__name__}: {e}"[:500])

    def _write_error(self, client, run_id: str, record: dict) -> None:
        client.set_tag(run_id, "status", "failed")
        client.set_tag(run_id, "error", record["reason"])
        client.set_terminated(run_id, status="FAILED")


def _say(line: str) -> None:
    from coun_tune.tracking.writer import _say as say

    say(line)
