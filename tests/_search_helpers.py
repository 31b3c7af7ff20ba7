"""Helpers shared by the end-to-end search tests (test_search_mlflow_server.py,
test_search_cluster.py): search specs, running the `coun-tune` CLI in a subprocess, a
brute-force Pareto set, and finding / stopping the processes a test started, by PID.

Processes are tracked by session: everything a test starts is started with
`start_new_session=True`, so the started process is a session leader and every process it
spawns (Ray's gcs_server, raylet, workers; uvicorn's worker) inherits its session id. Ray
processes change their process group (setpgrp) but not their session. Other people's
processes on the machine are never in these sessions, so sweeping a session is safe.
Never `ray stop` (it stops every Ray process on the machine).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

SPACE = {"temperature": {"log": [0.03, 0.3]}, "cl_weight": {"log": [0.1, 6.0]}, "lr": {"log": [0.01, 0.1]}, "epochs": 1}
SEARCHED = ("temperature", "cl_weight", "lr")
OBJECTIVES = {"forget_gap": "min", "retain_acc": "max"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """n distinct free ports (held open together while choosing, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def write_spec(
    path: Path,
    name: str,
    *,
    cache_dir: Path,
    storage_path: Path,
    tracking_uri: str,
    num_samples: int = 3,
    max_concurrent_trials: int = 2,
    **extra,
) -> Path:
    doc = {
        "name": name,
        "scenario": {"dataset": "digits", "forget": "random:0.1", "seed": 0, "recipe": "tiny"},
        "method": "coun",
        "objectives": dict(OBJECTIVES),
        "space": SPACE,
        "sampler": "nsga2",
        "num_samples": num_samples,
        "max_concurrent_trials": max_concurrent_trials,
        "resources_per_trial": {"cpu": 1, "gpu": 0},
        "seed": 0,
        "cache_dir": str(cache_dir),
        "storage_path": str(storage_path),
        "tracking_uri": tracking_uri,
    }
    doc.update(extra)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        env.pop(var, None)  # nothing from the caller's shell may redirect the run
    env.update(
        {
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def cli_command() -> list[str]:
    exe = Path(sys.executable).with_name("coun-tune")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "coun_tune"]


def _tail(text: str, n: int = 4000) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def run_cli(
    args: list[str], *, cwd: Path, env: dict | None = None, timeout: float = 300, expect_rc: int = 0
) -> subprocess.CompletedProcess:
    """`coun-tune ARGS` in its own session; fails the test (with the output's tail) on an exit
    code other than `expect_rc` or a timeout. Whatever the command leaves running in its
    session (a local Ray it started, say) is stopped afterwards."""
    proc = subprocess.Popen(
        cli_command() + list(args),
        cwd=cwd,
        env=env or child_env(),
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
        pytest.fail(
            f"`coun-tune {' '.join(args)}` ran over {timeout:.0f} s\n--- stdout\n{_tail(out)}\n--- stderr\n{_tail(err)}"
        )
    finally:
        stop_session(proc.pid, grace=10)
    if proc.returncode != expect_rc:
        pytest.fail(
            f"`coun-tune {' '.join(args)}` exited {proc.returncode}\n--- stdout\n{_tail(out)}\n--- stderr\n{_tail(err)}"
        )
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# --- processes ------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, session id) of a live process, None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[3])


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def session_pids(sid: int) -> list[int]:
    """Live processes whose session id is `sid` (the PID of a process started with start_new_session)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None and st[1] == sid and st[0] not in ("Z", "X"):
                out.append(int(entry))
    return sorted(out)


def cmdline(pid: int) -> str:
    """A process's command line, space-joined; "" if it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def pids_with_arg(fragment: str) -> list[int]:
    """Live processes whose command line contains `fragment` (a unique temp dir, say)."""
    return sorted(
        int(e)
        for e in os.listdir("/proc")
        if e.isdigit() and int(e) != os.getpid() and fragment in cmdline(int(e)) and _alive(int(e))
    )


def stop_pids(pids: list[int], grace: float = 15.0) -> list[int]:
    """SIGTERM each PID, wait up to `grace` seconds, SIGKILL what is left. Returns the PIDs
    that had to be killed."""
    pids = [p for p in pids if p != os.getpid() and _alive(p)]
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    killed = [p for p in pids if _alive(p)]
    for p in killed:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return killed


def stop_until_gone(find, grace: float = 15.0, rounds: int = 4) -> list[int]:
    """Stop the PIDs `find()` returns, again and again while it returns any (a dying raylet
    may still spawn a worker); up to `rounds` rounds. Returns what is left (should be [])."""
    for _ in range(rounds):
        pids = find()
        if not pids:
            return []
        stop_pids(pids, grace)
        time.sleep(0.5)
    return find()


def stop_session(sid: int, grace: float = 15.0) -> list[int]:
    """Stop every live process of session `sid` (by PID). Returns what is left (should be [])."""
    return stop_until_gone(lambda: session_pids(sid), grace)


# --- Pareto ---------------------------------------------------------------------------------


def brute_force_front(points: dict[str, dict[str, float]], objectives: dict[str, str]) -> set[str]:
    """Keys of the non-dominated points, by comparing every pair. points: key -> {metric: value}.

    Values are rounded to 9 decimals first, as the project's Pareto review documents: metrics
    are percentages of counts, and the same gap computed along two float paths (say
    1.3888888888889 and 1.3888888888888715, both 2/144) must tie, not dominate."""

    def as_min(p: dict[str, float]) -> list[float]:
        return [round(p[m] if mode == "min" else -p[m], 9) for m, mode in objectives.items()]

    vals = {k: as_min(p) for k, p in points.items()}
    front = set()
    for k, a in vals.items():
        dominated = any(
            all(bj <= aj for aj, bj in zip(a, b)) and any(bj < aj for aj, bj in zip(a, b))
            for j, b in vals.items()
            if j != k
        )
        if not dominated:
            front.add(k)
    return front
