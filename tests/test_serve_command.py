"""The commands coun-tune prints work pasted into a fresh shell: no venv activated (a plain
PATH, on which `mlflow` and `coun-tune` are not found), another working directory.

The serve command is the one `coun-tune search` / `coun-tune pareto` print with the review link
(review.print_review_link -> describe.ui_command). Pasted into `bash -c`, it must serve this
store's UI on 127.0.0.1 within 30 s, light (one worker, MLflow's job runner off: a few processes,
not ~15), and write nothing into the shell's directory. Only its port is changed (5000 may be
taken on a shared machine)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import time
import urllib.request

import pytest

from tests._search_helpers import free_port, session_pids, stop_session

SERVE_WITHIN_S = 30
PLAIN_PATH = "/usr/local/bin:/usr/bin:/bin"


def fresh_shell_env(home) -> dict:
    """What a new login shell has: a plain PATH, no VIRTUAL_ENV, no MLFLOW_* variables."""
    return {"PATH": PLAIN_PATH, "HOME": str(home), "LANG": "C.UTF-8", "MLFLOW_DISABLE_TELEMETRY": "true"}


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status, r.read().decode(errors="replace")
    except OSError:
        return 0, ""


@pytest.fixture
def store(tmp_path):
    """A real SQLite store in a directory with a space in its name, with one search run."""
    from coun_tune.tracking.mlflow_store import ROLE, client_for, ensure_experiment, ensure_store

    uri = f"sqlite:///{tmp_path / 'my store' / 'mlflow.db'}"
    (tmp_path / "my store").mkdir()
    ensure_store(uri)
    client = client_for(uri)
    exp = ensure_experiment(client, uri, "served_search")
    parent = client.create_run(exp, run_name="served_search_search", tags={ROLE: "search"}).info.run_id
    return uri, exp, parent


def printed_serve_command(uri: str, exp: str, parent: str) -> str:
    from coun_tune.tracking.review import print_review_link

    buf = io.StringIO()
    print_review_link(uri, exp, parent, out=buf)
    found = re.search(r"serve it first: (.+)\):\s*$", buf.getvalue(), re.M)
    assert found, buf.getvalue()
    return found.group(1)


def test_the_printed_serve_command_serves_the_ui_from_a_fresh_shell(store, tmp_path):
    uri, exp, parent = store
    cmd = printed_serve_command(uri, exp, parent)
    assert "--workers 1" in cmd and "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in cmd
    assert re.search(r" --port 5000( |$)", cmd), cmd
    port = free_port()
    cmd = re.sub(r" --port 5000(?= |$)", f" --port {port}", cmd)
    env = fresh_shell_env(tmp_path)
    # the premise: on a fresh shell's PATH there is no mlflow (a bare `mlflow ui` would fail)
    assert subprocess.run(["bash", "-c", "command -v mlflow"], env=env, capture_output=True).returncode != 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    log = tmp_path / "serve.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            ["bash", "-c", cmd], env=env, cwd=elsewhere, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        status, page = 0, ""
        while time.monotonic() - t0 < SERVE_WITHIN_S and proc.poll() is None:
            status, page = _get(base + "/")
            if status == 200:
                break
            time.sleep(0.5)
        took = time.monotonic() - t0
        assert status == 200, f"no page after {took:.0f} s (exit {proc.poll()}):\n{log.read_text()[-3000:]}"
        assert "<title>MLflow</title>" in page or "MLflow" in page
        # this store, not a default ./mlflow.db: the search's experiment is there
        status, body = _get(f"{base}/ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name=served_search")
        assert status == 200 and json.loads(body)["experiment"]["experiment_id"] == exp
        # light: the mlflow CLI and its one uvicorn worker (plus at most the shell), no job runner
        procs = session_pids(proc.pid)
        assert len(procs) <= 3, [open(f"/proc/{p}/cmdline", "rb").read().replace(b"\0", b" ") for p in procs]
        assert list(elsewhere.iterdir()) == []  # nothing written where the shell happened to be
        print(f"served in {took:.1f} s with {len(procs)} processes")
    finally:
        assert stop_session(proc.pid, grace=10) == []


def test_a_printed_coun_tune_command_runs_from_a_fresh_shell(tmp_path):
    from coun_tune.tracking.mlflow_store import coun_tune_command

    env = fresh_shell_env(tmp_path)
    assert subprocess.run(["bash", "-c", "command -v coun-tune"], env=env, capture_output=True).returncode != 0
    done = subprocess.run(
        ["bash", "-c", coun_tune_command("export", "--help")], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "--pick" in done.stdout
