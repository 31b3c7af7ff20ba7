"""Talking to MLflow through an explicit `MlflowClient` (no fluent global state, so a Ray
driver, a test and a CLI command can each point at their own store).

Tags that carry coun-tune's structure:
  coun_tune.role      "search" (parent) | "trial" (child)
  coun_tune.trial_id  Ray Tune's trial id (child)
  mlflow.parentRunId  nests a child under its search
  pareto              "true" | "false" on children, set by the Pareto review
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

from coun_tune.errors import UsageError

ROLE, TRIAL_ID, PARENT = "coun_tune.role", "coun_tune.trial_id", "mlflow.parentRunId"


def client_for(tracking_uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # against an http server MLflow prints two "View run/experiment at" lines for every run it
    # ends, which break the trials table; the search prints its one review link itself
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def command_next_to_python(script: str, module: str) -> list[str]:
    """How to run a console script of this environment from any shell, venv activated or not:
    the script beside the running interpreter (`.venv/bin/mlflow`), by absolute path (the
    interpreter's own path, not resolved: a venv's python is a symlink out of the venv), else
    `<interpreter> -m <module>`."""
    python = Path(sys.executable).absolute() if sys.executable else Path("python3")
    exe = python.with_name(script)
    if exe.is_file() and os.access(exe, os.X_OK):
        return [str(exe)]
    return [str(python), "-m", module]


def coun_tune_command(*args: str) -> str:
    """A `coun-tune ...` command line to print: it works pasted into a fresh shell."""
    return shlex.join([*command_next_to_python("coun-tune", "coun_tune"), *args])


def mlflow_ui_command(db: Path, port: int = 5000) -> str:
    """The light command that serves the UI over a SQLite store, to paste into any shell: this
    environment's mlflow by absolute path, one worker, MLflow's job runner (huey, a process per
    job type) off; ~2 processes and 0.5 GB instead of ~15 and 3 GB. `--artifacts-destination`:
    artifacts of experiments created in the UI go beside the database (as coun-tune's own do,
    see artifact_root_for), not into ./mlartifacts of whatever directory the shell is in."""
    db = Path(db).resolve()
    argv = [
        *command_next_to_python("mlflow", "mlflow"),
        "ui",
        "--backend-store-uri",
        f"sqlite:///{db}",
        "--artifacts-destination",
        str(db.parent / "mlartifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    return shlex.join(["env", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false", *argv])


def sqlite_path(tracking_uri: str) -> Path | None:
    return Path(tracking_uri[len("sqlite:///") :]) if tracking_uri.startswith("sqlite:///") else None


def check_tracking_uri(tracking_uri: str, must_exist: bool) -> None:
    """Fail fast, before Ray starts or anything is logged: a SQLite store that must exist does,
    and a server answers /health (MLflow's client would retry for minutes)."""
    import urllib.error
    import urllib.request

    db = sqlite_path(tracking_uri)
    if db is not None:
        if must_exist and not db.is_file():
            raise UsageError(f"no MLflow database at {db} (tracking URI {tracking_uri})")
        if not db.parent.resolve().is_dir():
            raise UsageError(f"tracking URI {tracking_uri}: directory {db.parent} does not exist")
        return
    if tracking_uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=10) as r:
                r.read()
        except (urllib.error.URLError, OSError) as e:
            raise UsageError(f"MLflow server {tracking_uri} does not answer ({getattr(e, 'reason', e)})") from None


def ensure_store(tracking_uri: str) -> None:
    """Create a fresh SQLite store's tables once, under an exclusive file lock beside the
    database: two searches starting at once on a new store would both try to create them, and
    one fails with `table ... already exists`. Servers create their own store."""
    db = sqlite_path(tracking_uri)
    if db is None:
        return
    import fcntl

    lock = db.parent / f".{db.name}.lock"
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            client_for(tracking_uri).search_experiments(max_results=1)  # creates (or migrates) the tables
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def artifact_root_for(tracking_uri: str, name: str) -> str | None:
    """With a SQLite store, artifacts go beside the database file (absolute), not to ./mlruns
    of whichever process happens to create the experiment. A server decides for itself."""
    db = sqlite_path(tracking_uri)
    return (db.resolve().parent / "mlartifacts" / name).as_uri() if db is not None else None


def ensure_experiment(client, tracking_uri: str, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root_for(tracking_uri, name))


def find_parent_run(client, ref: str):
    """A parent run by id, else the latest search run of the experiment named `ref`."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(ref)
    if exp is None:
        try:
            run = client.get_run(ref)
        except MlflowException:
            raise UsageError(
                f"{ref!r} is neither an MLflow experiment name nor a run id in this tracking store"
            ) from None
        if run.data.tags.get(ROLE) != "search":
            raise UsageError(f"run {ref} is not a coun-tune search (parent) run")
        return run
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{ROLE}` = 'search'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise UsageError(f"experiment {ref!r} has no coun-tune search run")
    return runs[0]


def child_runs(client, parent) -> list:
    """Every trial run nested under `parent` (all pages)."""
    out, token = [], None
    while True:
        page = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`{PARENT}` = '{parent.info.run_id}'",
            max_results=1000,
            page_token=token,
        )
        out.extend(page)
        token = page.token
        if not token:
            return out


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=items[i : i + 100])
