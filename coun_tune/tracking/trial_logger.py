"""The single MLflow writer of a search: a Tune `Callback` on the driver, keyed by trial id.

Why a driver-side callback (and not `setup_mlflow` inside trials): one writer, one run per
trial, and its trial-id -> run-id map is saved with the Tune experiment (get_state/set_state),
so a retried trial or a restored search continues the same child run instead of making a new
one. Metrics of one report go in one batched request.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from coun_tune.calibration import is_split_metric
from coun_tune.core.metrics import DIAGNOSTICS, METRICS
from coun_tune.tracking.describe import TRIAL_NUMBER, run_name
from coun_tune.tracking.mlflow_store import PARENT, ROLE, TRIAL_ID, client_for, log_params

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
    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, base_params: dict[str, Any]):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.base_params = base_params
        self.runs: dict[str, str] = {}  # trial id -> MLflow run id
        self.last_step: dict[str, int] = {}  # trial id -> last epoch logged
        self._client = None
        self._parent_params: dict | None = None

    @property
    def client(self):
        if self._client is None:
            self._client = client_for(self.tracking_uri)
        return self._client

    def __getstate__(self):  # the client holds a DB engine: never pickle it with the tuner
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    def get_state(self) -> dict:
        return {"runs": dict(self.runs), "last_step": dict(self.last_step)}

    def set_state(self, state: dict) -> None:
        self.runs.update(state.get("runs", {}))
        self.last_step.update(state.get("last_step", {}))

    def on_trial_start(self, iteration, trials, trial, **info):
        run_id = self.runs.get(trial.trial_id)
        if run_id is not None:  # a retry or a restored search: same run, running again
            self.client.update_run(run_id, status="RUNNING")
            # Ray delivers results at least once: a trial restored from a checkpoint older than
            # its last report repeats those epochs. MLflow is the truth of what was logged.
            logged = [m.step for m in self.client.get_metric_history(run_id, "retain_acc")]
            self.last_step[trial.trial_id] = max(logged, default=0)
            return
        # The map is saved with Tune's experiment state, which may predate a driver crash: a run
        # created for this trial just before it would be orphaned. Look for it before creating.
        existing = self.client.search_runs(
            [self.experiment_id],
            max_results=1,
            filter_string=f"tags.`{PARENT}` = '{self.parent_run_id}' and tags.`{TRIAL_ID}` = '{trial.trial_id}'",
        )
        if existing:
            self.runs[trial.trial_id] = existing[0].info.run_id
            return self.on_trial_start(iteration, trials, trial, **info)
        number = str(len(self.runs) + 1)  # in order of start; the map survives a restore, so does the count
        run = self.client.create_run(
            self.experiment_id,
            run_name=run_name(number, trial.config),
            tags={PARENT: self.parent_run_id, ROLE: "trial", TRIAL_ID: trial.trial_id, TRIAL_NUMBER: number},
        )
        self.runs[trial.trial_id] = run.info.run_id
        log_params(self.client, run.info.run_id, self._params(trial.config))

    def _params(self, sampled: dict) -> dict:
        """A trial's params: the search's scenario params and split_hash (from the parent), every
        hyperparameter of the method with defaults filled in, then the fixed and sampled values."""
        from coun_tune.core.engine import resolve_hparams
        from coun_tune.errors import UsageError

        if getattr(self, "_parent_params", None) is None:  # (a logger restored from an older state lacks it)
            params = self.client.get_run(self.parent_run_id).data.params
            self._parent_params = {k: v for k, v in params.items() if k.startswith("scenario.") or k == "split_hash"}
        given = {k: v for k, v in {**self.base_params, **sampled}.items() if k != "method"}
        try:
            resolved = resolve_hparams(self.base_params["method"], given) if "method" in self.base_params else {}
        except UsageError:  # the trial itself reports the bad value; params stay as given
            resolved = {}
        return {**self._parent_params, **resolved, **self.base_params, **sampled}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric

        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        step, ts = int(result.get("epoch", result.get("training_iteration", 0))), int(time.time() * 1000)
        if step <= self.last_step.get(trial.trial_id, 0):
            return  # an epoch repeated after a restore: logged once already (same values on CPU)
        self.last_step[trial.trial_id] = step
        metrics = [
            Metric(k, float(result[k]), ts, step)
            for k in result
            if (k in METRIC_KEYS or is_split_metric(k)) and isinstance(result[k], (int, float))
        ]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        epoch = pruned_at_epoch(trial.last_result or {})
        if epoch is not None:  # stopped at a rung: not a result to review or export by default
            self.client.log_metric(run_id, "pruned_at_epoch", epoch, step=epoch)
            if trial.checkpoint is not None:  # its config, to re-run at full budget if the user asks
                with tempfile.TemporaryDirectory() as tmp:
                    local = Path(trial.checkpoint.to_directory(tmp)) / "config.yaml"
                    if local.is_file():
                        self.client.log_artifact(run_id, str(local), artifact_path="model")
            self.client.set_tag(run_id, "status", "pruned")
            self.client.set_tag(run_id, "pruned_at_epoch", str(epoch))
            self.client.set_terminated(run_id, status="KILLED")
            return
        ckpt = trial.checkpoint
        if ckpt is not None:
            with tempfile.TemporaryDirectory() as tmp:
                self._log_model(run_id, Path(ckpt.to_directory(tmp)), self.last_step.get(trial.trial_id, 0))
        self.client.set_tag(run_id, "status", "completed")
        self.client.set_terminated(run_id, status="FINISHED")

    def _log_model(self, run_id: str, local: Path, step: int) -> None:
        """The trial's files as plain `model/` artifacts (model.pt, config.yaml resolved,
        metrics.json) and its final network as an MLflow PyTorch model named `trial_<number>`,
        with the run's params and final metrics on it (Models tab, registry; models.log_model);
        when the latter fails (a checkpoint without a loadable state dict), the reason is the
        tag `model_error`."""
        from coun_tune.tracking.models import log_model_from_files, resolve_config_file

        try:  # every hyperparameter, defaults included (a copy: `local` is a download of the checkpoint)
            resolve_config_file(local / "config.yaml")
        except Exception:  # noqa: S110  (an unreadable config is logged as it is, and fails below)
            pass
        for f in ("model.pt", "config.yaml", "metrics.json"):
            if (local / f).is_file():
                self.client.log_artifact(run_id, str(local / f), artifact_path="model")
        try:
            log_model_from_files(self.client, run_id, local, step=step)
        except Exception as e:  # the search goes on; the trial's metrics stand without a model
            self.client.set_tag(run_id, "model_error", f"{type(e).__name__}: {e}"[:500])

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        reason = "unknown error"
        if trial.error_file and Path(trial.error_file).is_file():
            lines = [l for l in Path(trial.error_file).read_text().strip().splitlines() if l.strip()]
            reason = lines[-1][:500] if lines else reason
        self.client.set_tag(run_id, "status", "failed")
        self.client.set_tag(run_id, "error", reason)
        self.client.set_terminated(run_id, status="FAILED")
