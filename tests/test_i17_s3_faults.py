"""Faults that must end cleanly (issue 17, items 7 and 8), each through the real `coun-tune` CLI
in a subprocess against a real S3-protocol server (moto on 127.0.0.1):

- an unreachable endpoint, or a bucket that does not exist, is ONE line on stderr naming the
  endpoint and the S3 operation, exit 2, before Ray starts, nothing written, no bucket created;
- a bucket lost in the middle of a search ends with coun-tune's one line saying so (not "on a
  cluster, cache_dir must be s3://"), no MLflow run left RUNNING, and --resume says it in one
  line;
- the parent MLflow run is never left RUNNING after an exception (FAILED) or an interrupt
  outside Tune's loop (KILLED), checked on run_search with its steps replaced;
- --resume of a search whose Tune state is gone is one line, exit 2, before Ray starts;
- a corrupted cached model is exactly one line on stderr (no Ray log line before it), exit 2,
  and leaves no coun_tune_results/ directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from _s3_helpers import aws_env, moto_server
from _search_helpers import SPACE, child_env, cli_command, stop_session, write_spec

pytest_plugins = ["_s3_helpers"]  # the moto server fixtures: s3_server, s3_env

ERROR = "coun-tune: error: "


def _s3(endpoint: str):
    """This test's own S3 client (pyarrow, not coun_tune.core.storage)."""
    from pyarrow import fs

    return fs.S3FileSystem(
        endpoint_override=endpoint.split("://", 1)[1],
        scheme="http",
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        allow_bucket_creation=True,
        allow_bucket_deletion=True,
    )


def _upload(endpoint: str, local: Path, dest: str) -> None:
    """Copy a local directory tree to s3://dest (this test's own client)."""
    from pyarrow import fs

    fs.copy_files(str(local), dest, source_filesystem=fs.LocalFileSystem(), destination_filesystem=_s3(endpoint))


def _bucket_exists(endpoint: str, bucket: str) -> bool:
    from pyarrow import fs

    return _s3(endpoint).get_file_info(bucket).type != fs.FileType.NotFound


def _env(endpoint: str, root: Path, **extra) -> dict:
    # credentials only: the endpoint comes from the spec's storage_endpoint, as on a cluster
    creds = {k: v for k, v in aws_env(endpoint).items() if k != "AWS_ENDPOINT_URL"}
    env = child_env(COUN_TUNE_CACHE=str(root / "cc"), **creds, **extra)
    env.pop("AWS_ENDPOINT_URL", None)
    env.pop("AWS_SESSION_TOKEN", None)
    return env


def _run(args: list[str], cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """`coun-tune ARGS` in its own session; whatever it leaves running is stopped after."""
    proc = subprocess.Popen(
        cli_command() + args,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_session(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"`coun-tune {' '.join(args)}` ran over {timeout} s\n{out[-3000:]}\n{err[-3000:]}")
    finally:
        stop_session(proc.pid, grace=10)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2 and exactly one line on stderr (coun-tune's), holding every needle."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert lines[0].startswith(ERROR), lines
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _spec(root: Path, name: str, endpoint: str, *, cache: str, results: str, **extra) -> Path:
    return write_spec(
        root / "spec.yaml",
        name,
        cache_dir=cache,
        storage_path=results,
        tracking_uri=f"sqlite:///{root}/mlflow.db",
        num_samples=2,
        max_concurrent_trials=1,
        sampler="random",
        storage_endpoint=endpoint,
        **extra,
    )


def _runs(root: Path, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    parents = [r for r in runs if r.data.tags.get("coun_tune.role") == "search"]
    children = [r for r in runs if r.data.tags.get("coun_tune.role") == "trial"]
    return parents, children


# --- before Ray starts: unreachable endpoint, missing bucket ------------------------------------


def test_unreachable_endpoint_is_one_line_before_ray(tmp_path):
    """The S3 server is gone (started, then stopped): one line naming the endpoint and the
    operation, exit 2 within seconds, and nothing started or written (no Ray, no results dir)."""
    with moto_server(tmp_path) as endpoint:
        pass  # stopped: nothing listens there any more
    _spec(tmp_path, "unreach", endpoint, cache="s3://gone/cache", results="s3://gone/results")
    t0 = time.monotonic()
    proc = _run(["search", "spec.yaml"], tmp_path, _env(endpoint, tmp_path))
    line = _one_line(proc, endpoint, "unreachable", "HeadBucket", "storage_path", "s3://gone/results")
    assert time.monotonic() - t0 < 60, line
    assert proc.stdout == ""  # no Ray, no base models: nothing ran
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "cc" / "runs").exists()


@pytest.mark.parametrize("missing", ["storage_path", "cache_dir"])
def test_missing_bucket_is_one_line_and_is_not_created(s3_server, tmp_path, missing):
    """A spec naming a bucket that does not exist (lost, or mistyped): one line naming it, the
    endpoint and the operation, exit 2, before Ray; the search does not create the bucket."""
    endpoint = s3_server["endpoint"]
    present, absent = f"here-{missing.replace('_', '-')}", f"lost-{missing.replace('_', '-')}"
    _s3(endpoint).create_dir(present)
    buckets = {"storage_path": present, "cache_dir": present, missing: absent}
    _spec(
        tmp_path,
        f"nobucket_{missing}",
        endpoint,
        cache=f"s3://{buckets['cache_dir']}/cache",
        results=f"s3://{buckets['storage_path']}/results",
    )
    proc = _run(["search", "spec.yaml"], tmp_path, _env(endpoint, tmp_path), timeout=240)
    _one_line(proc, missing, f"bucket {absent!r} does not exist", endpoint, "HeadBucket")
    assert proc.stdout == ""
    assert not _bucket_exists(endpoint, absent)
    assert s3_server["objects"](present) == []  # nothing written to the bucket that exists


# --- a bucket lost in the middle of a search --------------------------------------------------


def _delete_bucket(endpoint: str, bucket: str) -> None:
    """Delete a bucket that a running search keeps writing into (retried: an object may land
    between emptying it and deleting it)."""
    s3 = _s3(endpoint)
    for _ in range(100):
        try:
            s3.delete_dir(bucket)
            return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"could not delete bucket {bucket}")


@pytest.mark.slow
def test_bucket_lost_mid_search_ends_cleanly(s3_server, tmp_path, prepared, session_cache_dir):
    """storage_path and cache_dir in one bucket; the bucket is deleted once the first trial has
    reported epoch 1 of 3. The search must end with coun-tune's own line naming the lost bucket
    and the endpoint (exit 2), never blame the cache_dir setting, leave no MLflow run RUNNING
    and not bring the bucket back; --resume then says in one line that the bucket is gone.
    The cache in the bucket starts as a copy of the session cache (`prepared`): the search
    trains trials only."""
    endpoint = s3_server["endpoint"]
    bucket = "lost-mid"
    _s3(endpoint).create_dir(bucket)
    _upload(endpoint, session_cache_dir, f"{bucket}/cache")
    name = "lostmid"
    _spec(
        tmp_path,
        name,
        endpoint,
        cache=f"s3://{bucket}/cache",
        results=f"s3://{bucket}/results",
        space={**SPACE, "epochs": 3},
        # each trial is retried once after the bucket is gone (the retry's restore and the
        # fresh start both meet the lost bucket); the default 3 retries only repeat that
        max_failures=1,
    )
    # the cores are shared: a raylet may take minutes to register
    env = _env(endpoint, tmp_path, RAY_raylet_start_wait_time_s="300")
    out_path, err_path = tmp_path / "first.out", tmp_path / "first.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(
            cli_command() + ["search", "spec.yaml"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 400
        while not any(
            line.split()[1:3] == ["running", "1/3"] for line in out_path.read_text().splitlines() if line.strip()
        ):
            assert proc.poll() is None, (
                f"the search ended before epoch 1:\n{out_path.read_text()[-3000:]}\n{err_path.read_text()[-3000:]}"
            )
            assert time.monotonic() < deadline, "no trial reported epoch 1 within 400 s"
            time.sleep(0.1)
        _delete_bucket(endpoint, bucket)
        rc = proc.wait(timeout=400)
    finally:
        stop_session(proc.pid)
    stdout, stderr = out_path.read_text(), err_path.read_text()
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    assert rc == 2, (
        f"exit {rc}\n--- stdout\n{stdout[-2000:]}\n--- stderr (unindented lines)\n"
        + "\n".join(line[:300] for line in stderr.splitlines() if line[:1] not in (" ", ""))[-4000:]
    )
    assert last.startswith(ERROR) and f"bucket {bucket!r} does not exist" in last and endpoint in last, last
    assert "cache_dir must be" not in stdout + stderr, stderr[-5000:]
    assert not _bucket_exists(endpoint, bucket)  # nothing recreated it, empty
    parents, children = _runs(tmp_path, name)
    (parent,) = parents
    assert parent.info.status == "FAILED" and parent.data.tags["status"] == "failed", parent.data.tags
    assert children and all(c.info.status != "RUNNING" for c in children), [c.info.status for c in children]

    resumed = _run(["search", "spec.yaml", "--resume"], tmp_path, env)
    _one_line(resumed, "storage_path", f"bucket {bucket!r} does not exist", endpoint)
    _s3(endpoint).create_dir(bucket)  # an empty bucket of the same name: the search's state is gone
    resumed = _run(["search", "spec.yaml", "--resume"], tmp_path, env)
    _one_line(resumed, "--resume", "no search named")


# --- the parent run is never left RUNNING ------------------------------------------------------


@pytest.fixture
def stubbed_search(tmp_path, monkeypatch, session_cache_dir):
    """run_search with Ray and Tune replaced: the parent run opens (real MLflow, SQLite), then
    the step `fit_trials` does what the test says. Returns (run, client)."""
    from mlflow.tracking import MlflowClient

    from coun_tune.config.search_spec import load_search_spec
    from coun_tune.search import runner

    class NoRay:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def refresh_record(self):
            pass

    import coun_tune.search.ray_session as ray_session

    monkeypatch.setattr(ray_session, "RaySession", NoRay)
    monkeypatch.setattr("ray.put", lambda data: data)
    monkeypatch.setattr(runner, "train_base_models", lambda plan, data_ref, out: _BASE)
    monkeypatch.setattr(runner, "build_tuner", lambda *a, **k: None)
    monkeypatch.setattr("coun_tune.search.resources.check_cluster", lambda *a, **k: None)
    monkeypatch.setenv("COUN_TUNE_CACHE", str(tmp_path / "cc"))
    spec_path = write_spec(
        tmp_path / "spec.yaml",
        "stubbed",
        cache_dir=session_cache_dir,
        storage_path=tmp_path / "results",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
    )
    spec = load_search_spec(str(spec_path))

    def run(fault: BaseException):
        def fit(plan, tuner):
            raise fault

        monkeypatch.setattr(runner, "fit_trials", fit)
        with pytest.raises(type(fault)):
            runner.run_search(spec, spec_path=str(spec_path), out=open(os.devnull, "w"))
        client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        exp = client.get_experiment_by_name("stubbed")
        (parent,) = [
            r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("coun_tune.role") == "search"
        ]
        (exp_dir,) = (tmp_path / "results").iterdir()
        return parent, json.loads((exp_dir / "coun_tune_search.json").read_text())

    return run


_BASE = {
    "split_hash": "h",
    "original": {"retain_acc": 100.0},
    "oracle": {"retain_acc": 99.0},
    "splits": {},
    "from_cache": {"original": True, "oracle": True},
}


def test_an_error_after_the_parent_run_opened_ends_it_failed(stubbed_search):
    parent, state = stubbed_search(RuntimeError("S3 bucket 'x' does not exist\nat the endpoint"))
    assert parent.info.status == "FAILED"
    assert parent.data.tags["status"] == "failed"
    assert parent.data.tags["error"] == "S3 bucket 'x' does not exist at the endpoint"
    assert state["status"] == "failed"


def test_an_interrupt_outside_tune_ends_the_parent_killed_and_resumable(stubbed_search):
    parent, state = stubbed_search(KeyboardInterrupt())
    assert (parent.info.status, parent.data.tags["status"]) == ("KILLED", "interrupted")
    assert state["status"] == "interrupted"


# --- --resume of a search whose state is gone --------------------------------------------------


def test_resume_without_tune_state_is_one_line_before_ray(tmp_path):
    """The search's state file is there but Tune's experiment (tuner.pkl) is not (lost with its
    storage, or deleted): --resume says so in one line, exit 2, instead of a traceback after
    Ray started."""
    from mlflow.tracking import MlflowClient

    from coun_tune.config.search_spec import load_search_spec
    from coun_tune.search.plan import SEARCH_STATE, spec_hash

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec_path = write_spec(
        tmp_path / "spec.yaml",
        "stateless",
        cache_dir=tmp_path / "cache",
        storage_path=tmp_path / "results",
        tracking_uri=uri,
    )
    client = MlflowClient(uri)
    parent = client.create_run(client.create_experiment("stateless"), tags={"coun_tune.role": "search"})
    client.set_terminated(parent.info.run_id, status="KILLED")
    exp_dir = tmp_path / "results" / "stateless_20260101-000000"
    exp_dir.mkdir(parents=True)
    state = {
        "parent_run_id": parent.info.run_id,
        "experiment_id": parent.info.experiment_id,
        "tracking_uri": uri,
        "spec_hash": spec_hash(load_search_spec(str(spec_path))),
        "status": "interrupted",
    }
    (exp_dir / SEARCH_STATE).write_text(json.dumps(state))
    proc = _run(["search", "spec.yaml", "--resume"], tmp_path, child_env(COUN_TUNE_CACHE=str(tmp_path / "cc")))
    _one_line(proc, "--resume", "stateless_20260101-000000", "tuner.pkl", "without --resume")
    assert proc.stdout == ""
    assert client.get_run(parent.info.run_id).info.status == "KILLED"


# --- a corrupted cached model: one line, no Ray log before it, nothing written ----------------------


def test_corrupt_cached_model_is_one_line_and_writes_nothing(tmp_path, prepared, session_cache_dir):
    cache = tmp_path / "cache"
    shutil.copytree(session_cache_dir, cache)
    models = sorted(cache.glob("models/*/model.pt"))
    assert models, "the session cache holds no model"
    for m in models:  # whichever the search reads first fails its checksum
        data = bytearray(m.read_bytes())
        data[len(data) // 2] ^= 0xFF
        m.write_bytes(bytes(data))
    write_spec(
        tmp_path / "spec.yaml",
        "corrupt",
        cache_dir=cache,
        storage_path="coun_tune_results",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
    )
    proc = _run(["search", "spec.yaml"], tmp_path, child_env(COUN_TUNE_CACHE=str(tmp_path / "cc")))
    _one_line(proc, "fails its checksum", "to retrain")
    assert not (tmp_path / "coun_tune_results").exists()


# --- pyarrow's S3 errors as one line ------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, needles",
    [
        (
            "When getting information for bucket 'b': AWS Error NETWORK_CONNECTION during HeadBucket operation: "
            "curlCode: 7, Could not connect to server; Details: Failed to connect to 127.0.0.1 port 9 after 0 ms",
            ["S3 endpoint http://127.0.0.1:9 unreachable", "HeadBucket for s3://b/p", "Could not connect to server"],
        ),
        (
            "When initiating multiple part upload for key 'a/b' in bucket 'other': AWS Error NO_SUCH_BUCKET during "
            "CreateMultipartUpload operation: The specified bucket does not exist (Request ID: XYZ)",
            ["bucket 'other' does not exist at http://127.0.0.1:9", "CreateMultipartUpload for s3://b/p"],
        ),
        (
            "When reading information for key 'k' in bucket 'b': AWS Error ACCESS_DENIED during HeadObject "
            "operation: No response body.\n(Request ID: R)",
            ["S3 HeadObject for s3://b/p at http://127.0.0.1:9 failed (No response body.)"],
        ),
        (
            "Bucket 'gone' not found. To create buckets, enable the allow_bucket_creation option.",
            ["bucket 'gone' does not exist at http://127.0.0.1:9", "(sync for s3://b/p)"],
        ),
    ],
)
def test_s3_errors_read_as_one_line(monkeypatch, raw, needles):
    from coun_tune.core import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert storage.is_s3_failure(OSError(raw))
    line = str(storage.s3_error("s3://b/p", OSError(raw), "sync"))
    assert "\n" not in line and "Request ID" not in line and "curlCode" not in line, line
    for n in needles:
        assert n in line, (n, line)
