"""`coun-tune search --address` against a real Ray head with token authentication (Ray 2.60's
default): a client without the cluster's token is refused by the GCS, which Ray logs once a
second while ray.init retries, ending ~20 s later in a bare "Failed to connect to Ray cluster".
coun-tune must say, in one line and within seconds, that authentication failed and what to set.

The head runs with its own HOME (its token in HOME/.ray/auth_token) and temp dir, in its own
session; the CLI runs with another HOME, so nothing here reads or writes the user's ~/.ray.
Everything started is stopped by PID (never `ray stop`).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from _search_helpers import child_env, free_ports, run_cli, stop_session, stop_until_gone, write_spec

from coun_tune.search.ray_session import pids_naming


def _ray(*args: str, env: dict, sessions: list[int], timeout: float = 120) -> subprocess.CompletedProcess:
    """`ray ARGS` in its own session (recorded: `ray start` leaves its daemons in it)."""
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    sessions.append(proc.pid)
    out, _ = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(args, proc.returncode, out, "")


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    """A one-CPU Ray head with token auth; yields (address, its token)."""
    base = Path(tmp_path_factory.mktemp("auth"))
    home, temp = base / "head_home", Path("/tmp") / f"ctauth-{base.name[-8:]}"  # short: socket paths
    home.mkdir()
    env = child_env(HOME=str(home), RAY_AUTH_MODE="token")
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(var, None)
    sessions: list[int] = []
    try:
        gen = _ray("get-auth-token", "--generate", env=env, sessions=sessions)
        token_file = home / ".ray" / "auth_token"
        assert token_file.is_file(), gen.stdout
        gcs, agent, metrics, client = free_ports(4)
        started = _ray(
            "start",
            "--head",
            "--port",
            str(gcs),
            "--ray-client-server-port",  # not the default 10001: other tests' clusters may run at once
            str(client),
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            "1",
            "--memory",
            str(1024**3),
            "--object-store-memory",
            str(100 * 1024**2),
            "--include-dashboard=false",
            "--dashboard-agent-listen-port",
            str(agent),
            "--metrics-export-port",
            str(metrics),
            "--temp-dir",
            str(temp),
            "--disable-usage-stats",
            env=env,
            sessions=sessions,
        )
        assert started.returncode == 0, started.stdout[-3000:]
        yield f"127.0.0.1:{gcs}", token_file.read_text().strip()
    finally:
        for sid in sessions:
            stop_session(sid, grace=8)
        left = stop_until_gone(lambda: pids_naming(str(temp)), grace=8)
        assert not left, f"Ray processes of this test still running: {left}"


@pytest.mark.parametrize(
    "case, client_env, why",
    [
        ("no_auth_mode", {}, "RAY_AUTH_MODE is not 'token' here"),
        ("wrong_token", {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, "the token here is not the cluster's"),
    ],
)
def test_a_refused_token_is_one_line_that_says_authentication(tmp_path, token_head, case, client_env, why):
    address, _ = token_head
    write_spec(
        tmp_path / "spec.yaml",
        "auth",
        cache_dir=tmp_path / "cache",
        storage_path=tmp_path / "results",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        num_samples=1,
    )
    (tmp_path / "home").mkdir()  # no ~/.ray/auth_token for the client
    env = child_env(HOME=str(tmp_path / "home"), COUN_TUNE_CACHE=str(tmp_path / "cc"), **client_env)
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        if var not in client_env:
            env.pop(var, None)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_cli(["search", "spec.yaml", "--address", address], cwd=tmp_path, env=env, timeout=120, expect_rc=2)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"coun-tune: error: --address {address}: the Ray cluster refused"), lines[0]
    assert "authentication" in lines[0] and why in lines[0] and "RAY_AUTH_MODE=token" in lines[0]
    # no MLflow store, no search directory (the runner leaves an empty storage_path behind, as
    # for any connection failure: tests/test_faults.py tolerates it the same way)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "results") == before
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


def test_the_refusal_ends_the_probe_at_once(tmp_path, token_head, monkeypatch):
    """The probe (a real `ray.init` in a child process) stops at Ray's first refusal instead
    of waiting for its ~20 s give-up (timed alone: the CLI's start-up varies with the load)."""
    from coun_tune.errors import UsageError
    from coun_tune.search.ray_session import probe_connect

    address, _ = token_head
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    t0 = time.monotonic()
    with pytest.raises(UsageError, match="refused this client's authentication"):
        probe_connect(address, 60)
    assert time.monotonic() - t0 < 12


def test_the_right_token_connects_and_the_driver_catches_sigterm(tmp_path, token_head):
    """With the cluster's token the probe passes (the refusals above are about the token), and a
    driver connected to the cluster (the `ray job submit` case: `ray job stop` sends SIGTERM)
    has SIGTERM routed to Ctrl-C's path while connected, Ray's sys.exit handler replaced, and the
    handler from before put back after."""
    address, token = token_head
    code = (
        "import signal, sys\n"
        "from coun_tune.search.ray_session import RaySession, probe_connect, sigterm_as_sigint\n"
        "probe_connect(sys.argv[1], 60)\n"
        "with RaySession(sys.argv[1]):\n"
        "    assert signal.getsignal(signal.SIGTERM) is sigterm_as_sigint, signal.getsignal(signal.SIGTERM)\n"
        "assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, signal.getsignal(signal.SIGTERM)\n"
        "print('connected')\n"
    )
    (tmp_path / "home").mkdir()
    env = child_env(
        HOME=str(tmp_path / "home"), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, COUN_TUNE_CACHE=str(tmp_path / "cc")
    )
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    proc = subprocess.run([sys.executable, "-c", code, address], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "connected" in proc.stdout, proc.stderr[-3000:]
