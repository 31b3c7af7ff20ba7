"""`ray job submit` / `ray job stop` of a real search on a two-node loopback Ray cluster (issue
17, item 4), the way the README's cluster walkthrough runs it:

    ray job submit --address http://127.0.0.1:<dashboard> -- coun-tune search spec.yaml --address auto

The head runs Ray's job server (its dashboard, from `ray[default]`), bound to 127.0.0.1, with
token auth and `RAY_JOB_STOP_WAIT_TIME_S=120` as cluster.yaml sets it. Once a trial has
reported epoch 1 of 4, `ray job stop` sends the driver SIGTERM (to the entrypoint's process and
every process below it). The search must end as a Ctrl-C does: exit 130, no traceback, the
parent MLflow run and the running trials KILLED / interrupted (none RUNNING), the search state
interrupted; `--resume` then finishes it without logging any epoch twice.

Everything started here is stopped by PID (the `ray start` sessions and anything naming this
test's temp dir). Never `ray stop`.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from _search_helpers import (
    SPACE,
    child_env,
    cli_command,
    cmdline,
    free_ports,
    pids_with_arg,
    run_cli,
    session_pids,
    stop_until_gone,
    write_spec,
)

NODE_MEMORY = 2 * 1024**3  # each `ray start` would otherwise claim the machine's memory
NODE_OBJECT_STORE = 100 * 1024**2
NAME = "jobstop"
EPOCHS = 30  # per trial: the stop must land while a trial is still running
STATUS_EVERY_S = 10  # how often the wait for epoch 1 asks whether the job is still running


def _ray(*args: str, env: dict, timeout: float = 180, sessions: list[int] | None = None) -> str:
    """`ray ARGS` (the venv's), in its own session; its output, or the test fails."""
    exe = Path(sys.executable).with_name("ray")
    assert exe.is_file(), f"no `ray` next to {sys.executable}"
    proc = subprocess.Popen(
        [str(exe), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    if sessions is not None:
        sessions.append(proc.pid)  # `ray start`'s daemons keep this session id after it exits
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"`ray {' '.join(args)}` ran over {timeout} s:\n{out[-3000:]}")
    if proc.returncode != 0:
        pytest.fail(f"`ray {' '.join(args)}` exited {proc.returncode}:\n{out[-3000:]}")
    return out


@pytest.fixture
def job_cluster(tmp_path):
    """A head (job server on 127.0.0.1) and a worker node, one CPU each; yields {"address",
    "dashboard", "env"}."""
    base = Path(tempfile.mkdtemp(prefix="ctj-", dir="/tmp"))  # short: Ray's socket paths
    gcs, dash, client, agent_h, agent_w, grpc_h, grpc_w, metrics_h, metrics_w = free_ports(9)
    env = child_env(
        RAY_AUTH_MODE="token",
        RAY_JOB_STOP_WAIT_TIME_S="120",  # as cluster.yaml: time for the driver's clean stop
        COUN_TUNE_CACHE=str(tmp_path / "cc"),
        RAY_raylet_start_wait_time_s="300",  # the cores are shared: a raylet may take minutes to register
    )
    common = [
        "--node-ip-address",
        "127.0.0.1",
        "--num-cpus",
        "1",
        "--num-gpus",
        "0",
        "--memory",
        str(NODE_MEMORY),
        "--object-store-memory",
        str(NODE_OBJECT_STORE),
        "--disable-usage-stats",
    ]
    sessions: list[int] = []
    try:
        _ray(
            "start",
            "--head",
            "--port",
            str(gcs),
            "--include-dashboard=true",
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dash),
            "--ray-client-server-port",
            str(client),
            "--dashboard-agent-listen-port",
            str(agent_h),
            "--dashboard-agent-grpc-port",
            str(grpc_h),
            "--metrics-export-port",
            str(metrics_h),
            "--temp-dir",
            str(base / "h"),
            *common,
            env=env,
            sessions=sessions,
            timeout=420,  # minutes when the cores are shared
        )
        _ray(
            "start",
            "--address",
            f"127.0.0.1:{gcs}",
            "--dashboard-agent-listen-port",
            str(agent_w),
            "--dashboard-agent-grpc-port",
            str(grpc_w),
            "--metrics-export-port",
            str(metrics_w),
            "--temp-dir",
            str(base / "w"),
            *common,
            env=env,
            sessions=sessions,
            timeout=420,  # minutes when the cores are shared
        )
        for d in ("h", "w"):
            assert any(cmdline(p).split(" ")[0].endswith("/raylet") for p in pids_with_arg(str(base / d))), (
                f"no raylet running with temp dir {base / d}"
            )
        yield {"address": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    finally:

        def ours() -> list[int]:
            pids = set(pids_with_arg(str(base)))
            for sid in sessions:
                pids |= set(session_pids(sid))
            return sorted(pids)

        left = stop_until_gone(ours, grace=8)
        shutil.rmtree(base, ignore_errors=True)
        assert not left, f"Ray processes of this test still running: {left}"


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(NAME)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    parents = [r for r in runs if r.data.tags.get("coun_tune.role") == "search"]
    children = [r for r in runs if r.data.tags.get("coun_tune.role") == "trial"]
    return client, parents, children


@pytest.mark.slow
def test_ray_job_stop_ends_the_search_like_ctrl_c_and_resume_completes_it(
    job_cluster, tmp_path, prepared, session_cache_dir
):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    write_spec(
        tmp_path / "spec.yaml",
        NAME,
        cache_dir=session_cache_dir,  # the base models are there: the job trains trials only
        storage_path=tmp_path / "results",
        tracking_uri=uri,
        num_samples=2,
        max_concurrent_trials=1,  # one trial after the other: `ray job stop` lands mid-search
        sampler="random",
        # long enough that the stop lands mid-trial on a quiet box too (at 4 epochs the search
        # could finish between the first report and the driver's SIGTERM, and exit 0)
        space={**SPACE, "epochs": EPOCHS},
    )
    out, err, rc = tmp_path / "job.out", tmp_path / "job.err", tmp_path / "job.rc"
    search = shlex.join([*cli_command(), "search", "spec.yaml", "--address", "auto"])
    # `ray job submit -- ARGS` quotes each argument: the shell line goes in as `sh -c LINE`.
    # The shell traps SIGTERM (it runs the trap only once its foreground command has ended), so
    # it outlives the stop long enough to record the driver's exit code; the driver gets its
    # own SIGTERM from `ray job stop`, which signals every process of the job.
    entrypoint = (
        f"cd {shlex.quote(str(tmp_path))} && trap : TERM; "
        f"{search} > {shlex.quote(str(out))} 2> {shlex.quote(str(err))}; echo $? > {shlex.quote(str(rc))}"
    )
    job_id = f"ctune-{uuid.uuid4().hex[:8]}"
    env, dashboard = job_cluster["env"], job_cluster["dashboard"]
    t0 = time.monotonic()
    _ray(
        "job",
        "submit",
        "--address",
        dashboard,
        "--submission-id",
        job_id,
        "--no-wait",
        "--",
        "sh",
        "-c",
        entrypoint,
        env=env,
    )
    deadline = time.monotonic() + 400
    next_status = time.monotonic()
    while not (
        out.exists()
        and any(
            line.split()[1:3] == ["running", f"1/{EPOCHS}"] for line in out.read_text().splitlines() if line.strip()
        )
    ):
        # the driver's stdout is read often (the stop should follow the report closely), the
        # job's state now and then: each `ray job status` is a Python start of seconds of CPU
        if time.monotonic() >= next_status:
            status = _ray("job", "status", "--address", dashboard, job_id, env=env, timeout=60)
            if "RUNNING" not in status and "PENDING" not in status:
                logs = _ray("job", "logs", "--address", dashboard, job_id, env=env, timeout=60)
                pytest.fail(
                    f"the job is not running:\n{_plain(status)[-2000:]}\n--- job logs\n{_plain(logs)[-3000:]}\n"
                    f"--- stdout\n{out.read_text()[-3000:] if out.exists() else ''}\n"
                    f"--- stderr\n{err.read_text()[-3000:] if err.exists() else ''}"
                )
            next_status = time.monotonic() + STATUS_EVERY_S
        assert time.monotonic() < deadline, "no trial reported epoch 1 within 400 s"
        time.sleep(0.2)
    _ray("job", "stop", "--address", dashboard, job_id, env=env, timeout=200)
    deadline = time.monotonic() + 200
    while not (rc.exists() and rc.read_text().strip()):
        assert time.monotonic() < deadline, "the job's driver did not exit within 200 s of `ray job stop`"
        time.sleep(0.5)
    stopped_s = time.monotonic() - t0
    status = _ray("job", "status", "--address", dashboard, job_id, env=env, timeout=60)
    stdout, stderr = out.read_text(), err.read_text()
    assert rc.read_text().strip() in ("130", "143"), (rc.read_text(), stdout[-2000:], stderr[-3000:])
    assert "was stopped" in _plain(status), _plain(status)  # Ray's words for JobStatus.STOPPED
    assert "Traceback" not in stderr and "SystemExit" not in stderr, stderr[-3000:]
    assert "search interrupted" in stdout and "--resume" in stdout and "Pareto front" not in stdout, stdout[-3000:]
    (exp_dir,) = sorted(p for p in (tmp_path / "results").iterdir() if p.is_dir())
    assert json.loads((exp_dir / "coun_tune_search.json").read_text())["status"] == "interrupted"
    _, parents, children = _runs(uri)
    (parent,) = parents
    assert (parent.info.status, parent.data.tags["status"]) == ("KILLED", "interrupted")
    assert children and all(c.info.status != "RUNNING" for c in children), [c.info.status for c in children]
    assert ("KILLED", "interrupted") in {(c.info.status, c.data.tags.get("status")) for c in children}

    resumed = run_cli(
        ["search", "spec.yaml", "--resume", "--address", job_cluster["address"]], cwd=tmp_path, env=env, timeout=500
    )
    assert "exported the knee config" in resumed.stdout
    client, parents, children = _runs(uri)
    (parent,) = parents
    assert (parent.info.status, parent.data.tags["status"]) == ("FINISHED", "completed")
    assert len(children) == 2
    for c in children:
        assert c.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "retain_acc")]
        assert sorted(steps) == list(range(1, EPOCHS + 1))  # the interrupted trial went on from its checkpoint
    print(f"job submitted, stopped at epoch 1 and the driver out: {stopped_s:.0f} s")
