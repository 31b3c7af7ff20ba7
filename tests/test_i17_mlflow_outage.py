"""Issue 17: MLflow logging off the driver's event loop. An MLflow server down for 33 s froze the
trials table (Tune later warned "on_trial_result took 61.8 s"): the trial logger called MLflow
from Tune's callbacks. Now the callbacks enqueue and a writer thread writes (tracking.writer).

Every fault here is real: a real `mlflow server` (SQLite backend, 127.0.0.1) stopped with
SIGTERM and started again on the same port and store; a loopback TCP proxy that forwards a
request to the server and then closes the connection instead of relaying the reply (a reply
lost after the server acted). Nothing of MLflow is mocked.

- The writer, driven by hand (a real MLflowTrialLogger with fake trial objects): Tune's
  callbacks return at once while the server is down, one line says it is unreachable and one
  that it is back, and every record is then written exactly once; a search that ends while the
  server is still down waits a bounded time, says so, and leaves its unwritten records in the
  state Tune saves, which a restored logger writes, without duplicates.
- A reply lost after the server created the run (or logged a batch) is retried without a
  second run (or a second point).
- End to end: `coun-tune search` against the server, which is stopped once the first trial
  result is in MLflow and restarted once the search has said so and a trial has reported an
  epoch since: trials report epochs while it is down (the trials table goes on), the two lines
  are printed once each, and afterwards every trial's metric history in MLflow equals Tune's
  results, one point per (metric, epoch).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from _search_helpers import SPACE, child_env, cli_command, free_port, stop_session, write_spec

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

SERVER_START_TIMEOUT = 120  # ~6 s on an idle 2-core machine; other people's jobs share the cores
UNREACHABLE, REACHABLE = "MLflow unreachable at ", "MLflow reachable again, "


def _healthy(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


class Server:
    """`mlflow server` on 127.0.0.1:port over root/srv.db, stoppable and restartable (same port,
    same store). Every process it starts is in its own session, stopped by PID."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> float:
        """Start and wait until healthy; returns the seconds it took."""
        t0 = time.monotonic()
        self.starts += 1
        log = self.root / f"server{self.starts}.log"
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mlflow",
                    "server",
                    "--backend-store-uri",
                    f"sqlite:///{self.root / 'srv.db'}",
                    "--artifacts-destination",
                    str(self.root / "artifacts"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    "1",
                ],
                cwd=self.root,
                env=child_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while not _healthy(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"mlflow server not healthy:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)
        return time.monotonic() - t0

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        stop_session(self.proc.pid, grace=5)  # a uvicorn worker that outlived its parent
        self.proc = None
        deadline = time.monotonic() + 15
        while _healthy(self.url) and time.monotonic() < deadline:
            time.sleep(0.2)


class LostReplyProxy:
    """127.0.0.1:port -> the server. `lose_reply_to(path)`: the next request whose line names
    `path` reaches the server, which answers, but the client gets no reply (the connection is
    closed): to the client, a request that failed; to the server, one that was done."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.lose: bytes | None = None
        self.lost = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def lose_reply_to(self, path: str) -> None:
        self.lose = path.encode()

    def close(self) -> None:
        self._closed = True
        self.listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            conn = {"drop": False}
            threading.Thread(target=self._up, args=(client, upstream, conn), daemon=True).start()
            threading.Thread(target=self._down, args=(client, upstream, conn), daemon=True).start()

    def _up(self, client, upstream, conn) -> None:
        try:
            while data := client.recv(65536):
                first = data.split(b"\r\n", 1)[0]
                if self.lose and first.startswith(b"POST ") and self.lose in first:
                    self.lose, conn["drop"] = None, True
                upstream.sendall(data)
        except OSError:
            pass

    def _down(self, client, upstream, conn) -> None:
        try:
            while data := upstream.recv(65536):
                if conn["drop"]:  # the server answered: the client never hears it
                    self.lost += 1
                    break
                client.sendall(data)
        except OSError:
            pass
        for s in (client, upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow_outage"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def search(server, request):
    """An experiment and a parent run of its own on the (running) server."""
    from coun_tune.tracking.mlflow_store import ROLE, client_for, ensure_experiment, log_params

    if server.proc is None:
        server.start()
    client = client_for(server.url)
    exp = ensure_experiment(client, server.url, request.node.name[:200])
    parent = client.create_run(exp, tags={ROLE: "search"}).info.run_id
    log_params(client, parent, {"split_hash": "abc", "scenario.dataset": "digits"})
    return client, exp, parent


@pytest.fixture
def quick_backoff(monkeypatch):
    from coun_tune.tracking import writer

    monkeypatch.setattr(writer, "BACKOFF_MAX_S", 1.0)
    monkeypatch.setattr(writer, "BACKOFF_START_S", 0.2)


def fake_trial(trial_id: str, planned: int = 3):
    return SimpleNamespace(
        trial_id=trial_id,
        config={"lr": 0.05, "epochs": planned},
        last_result={},
        checkpoint=None,
        error_file=None,
    )


def result(epoch: int, planned: int = 3) -> dict:
    return {"epoch": epoch, "epochs_planned": planned, "retain_acc": 90.0 + epoch, "forget_gap": 10.0 - epoch}


def timed_feed(logger, trial, epochs, planned=3) -> float:
    """Report epochs as Tune would; returns the longest a callback took."""
    worst = 0.0
    for e in epochs:
        r = result(e, planned)
        t0 = time.monotonic()
        logger.on_trial_result(0, [trial], trial, r)
        worst = max(worst, time.monotonic() - t0)
        trial.last_result = r
    return worst


def points(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def trial_runs(client, exp: str, parent: str) -> list:
    from coun_tune.tracking.mlflow_store import PARENT

    return client.search_runs([exp], filter_string=f"tags.`{PARENT}` = '{parent}'")


def lines_with(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


# --- the writer, by hand --------------------------------------------------------------------


def test_only_the_writer_thread_reads_mlflow_http_settings_of_its_own(monkeypatch):
    """MLflow's client would retry a request to a stopped server 7 times over minutes; in the
    writer thread it fails at once (the writer's back-off governs), elsewhere nothing changes."""
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

    from coun_tune.tracking.writer import REQUEST_TIMEOUT_S, MLflowWriter

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    seen = {}

    def apply(client, record):
        seen.update(retries=MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), timeout=MLFLOW_HTTP_REQUEST_TIMEOUT.get())

    w = MLflowWriter("unused://", apply, client_factory=lambda uri: None)
    w.put({"op": "probe"})
    assert w.flush(10) == 0
    w.stop()
    assert seen == {"retries": 0, "timeout": REQUEST_TIMEOUT_S}
    assert (MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), MLFLOW_HTTP_REQUEST_TIMEOUT.get()) == (7, 120)


def test_callbacks_never_wait_for_a_stopped_server_and_nothing_is_lost_or_doubled(
    server, search, quick_backoff, capsys
):
    from coun_tune.tracking.trial_logger import MLflowTrialLogger

    client, exp, parent = search
    logger = MLflowTrialLogger(server.url, exp, parent, {"method": "coun"})
    a, b = fake_trial("a"), fake_trial("b")
    logger.on_trial_start(0, [a], a)
    timed_feed(logger, a, [1])
    assert logger.flush(60) == 0
    run_a = logger.runs["a"]

    server.stop()
    t0 = time.monotonic()
    worst = timed_feed(logger, a, [2, 3])
    logger.on_trial_complete(0, [a], a)
    logger.on_trial_start(0, [b], b)  # a trial whose run is created only once the server is back
    worst = max(worst, timed_feed(logger, b, [1, 2]))
    took = time.monotonic() - t0
    assert worst < 0.5 and took < 2, f"callbacks waited for MLflow: worst {worst:.2f} s, all {took:.2f} s"
    assert logger.flush(3) > 0  # nothing can be written now
    saved = logger.get_state()
    assert [r["op"] for r in saved["pending"]] == ["metrics", "metrics", "complete", "start", "metrics", "metrics"]

    server.start()
    assert logger.flush(60) == 0
    out = capsys.readouterr().out
    down, up = lines_with(out, UNREACHABLE), lines_with(out, REACHABLE)
    assert (
        len(down) == 1
        and down[0].startswith(f"{UNREACHABLE}{server.url}, ")
        and "records buffered; retrying" in down[0]
    )
    assert up == ["MLflow reachable again, 6 records written"], out

    assert points(client, run_a, "retain_acc") == [(1, 91.0), (2, 92.0), (3, 93.0)]
    assert points(client, run_a, "forget_gap") == [(1, 9.0), (2, 8.0), (3, 7.0)]
    assert client.get_run(run_a).info.status == "FINISHED"
    assert points(client, logger.runs["b"], "retain_acc") == [(1, 91.0), (2, 92.0)]
    runs = trial_runs(client, exp, parent)
    assert sorted(r.data.tags["coun_tune.trial_id"] for r in runs) == ["a", "b"]
    assert client.get_run(logger.runs["b"]).data.params["lr"] == "0.05"


def test_a_search_ending_while_the_server_is_down_leaves_its_records_to_resume(
    server, search, quick_backoff, monkeypatch, capsys
):
    from coun_tune.tracking import writer
    from coun_tune.tracking.trial_logger import MLflowTrialLogger

    client, exp, parent = search
    monkeypatch.setattr(writer, "FLUSH_TIMEOUT_S", 3.0)
    first = MLflowTrialLogger(server.url, exp, parent, {"method": "coun"})
    t = fake_trial("t", planned=2)
    first.on_trial_start(0, [t], t)
    timed_feed(first, t, [1], planned=2)
    assert first.flush(60) == 0
    run_id = first.runs["t"]

    server.stop()
    timed_feed(first, t, [2], planned=2)
    first.on_trial_complete(0, [t], t)
    saved = first.get_state()  # Tune saves the experiment, then ends the callbacks
    t0 = time.monotonic()
    first.on_experiment_end([t])
    waited = time.monotonic() - t0
    assert 2.5 < waited < 15, waited  # bounded: FLUSH_TIMEOUT_S (+ the quick first try)
    assert MLflowTrialLogger.unwritten_by_parent[parent] == 2
    out = capsys.readouterr().out
    assert "still unreachable: 2 records not written" in out and "--resume" in out, out
    assert [r["op"] for r in saved["pending"]] == ["metrics", "complete"]

    server.start()
    # --resume: Tune restores the callback from its saved state; the pending records go first
    second = MLflowTrialLogger(server.url, exp, parent, {"method": "coun"})
    second.set_state(saved)
    second.on_experiment_end([t])
    assert MLflowTrialLogger.unwritten_by_parent[parent] == 0
    assert points(client, run_id, "retain_acc") == [(1, 91.0), (2, 92.0)]
    assert client.get_run(run_id).info.status == "FINISHED"
    # and the first driver's records, had they been written after all, change nothing
    third = MLflowTrialLogger(server.url, exp, parent, {"method": "coun"})
    third.set_state(saved)
    assert third.flush(60) == 0
    assert points(client, run_id, "retain_acc") == [(1, 91.0), (2, 92.0)]
    assert len(trial_runs(client, exp, parent)) == 1


def test_a_lost_reply_makes_no_second_run_and_no_second_point(server, search, quick_backoff, capsys):
    from coun_tune.tracking.trial_logger import MLflowTrialLogger

    client, exp, parent = search
    proxy = LostReplyProxy(server.port)
    try:
        logger = MLflowTrialLogger(proxy.url, exp, parent, {"method": "coun"})
        t = fake_trial("x")
        proxy.lose_reply_to("/runs/create")
        logger.on_trial_start(0, [t], t)
        assert logger.flush(60) == 0
        assert proxy.lost == 1
        runs = trial_runs(client, exp, parent)
        assert [r.info.run_id for r in runs] == [logger.runs["x"]], "the create whose reply was lost made a second run"

        proxy.lose_reply_to("/runs/log-batch")
        timed_feed(logger, t, [1, 2])
        assert logger.flush(60) == 0
        assert proxy.lost == 2
        assert points(client, logger.runs["x"], "retain_acc") == [(1, 91.0), (2, 92.0)]
        assert points(client, logger.runs["x"], "forget_gap") == [(1, 9.0), (2, 8.0)]
    finally:
        proxy.close()
    out = capsys.readouterr().out
    assert len(lines_with(out, UNREACHABLE)) == 2 and len(lines_with(out, REACHABLE)) == 2, out


# --- end to end: a real search, the server stopped mid-search -------------------------------

OUTAGE_MAX_S = 120  # the server stays down until a trial reports an epoch (seconds), at most this
EPOCHS = 4
# The driver's bounded wait at the end of a search for a stopped server (writer.FLUSH_TIMEOUT_S,
# 60 s): what it waits for never comes in the test that ends while the server is down, so there
# it is set shorter; the driver is the `coun-tune` CLI otherwise unchanged.
FLUSH_TIMEOUT_S = 5.0
_DRIVER = (
    "import sys; from coun_tune.tracking import writer; writer.FLUSH_TIMEOUT_S = float(sys.argv.pop(1)); "
    "from coun_tune.cli import main; sys.exit(main())"
)


def _tune_results(results_dir: Path) -> dict[str, list[dict]]:
    """trial id -> its reports, from Tune's own result.json files."""
    out: dict[str, list[dict]] = {}
    for f in results_dir.rglob("result.json"):
        for line in f.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out.setdefault(r["trial_id"], []).append(r)
    return out


def _start_search(cwd: Path, *args: str, flush_timeout_s: float | None = None):
    """`coun-tune search spec.yaml ARGS` in its own session; its stdout lines are collected
    with the time each arrived. Returns (process, lines, reader thread). With flush_timeout_s,
    the driver's writer.FLUSH_TIMEOUT_S is that (the CLI's `main` run by `python -c`)."""
    driver = cli_command() if flush_timeout_s is None else [sys.executable, "-c", _DRIVER, str(flush_timeout_s)]
    proc = subprocess.Popen(
        [*driver, "search", "spec.yaml", *args],
        cwd=cwd,
        env=child_env(COUN_TUNE_CACHE=str(cwd / "cc")),
        stdout=subprocess.PIPE,
        stderr=open(cwd / "stderr.txt", "a"),  # noqa: SIM115  (closed with the process)
        text=True,
        start_new_session=True,
    )
    lines: list[tuple[float, str]] = []  # (monotonic time, stdout line)
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), s.rstrip("\n")) for s in proc.stdout))
    reader.start()
    return proc, lines, reader


def _wait_for_first_result(client, name: str, proc) -> None:
    deadline = time.monotonic() + 600
    while True:
        exp = client.get_experiment_by_name(name)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if any("retain_acc" in r.data.metrics for r in runs):
            return
        assert proc.poll() is None, "the search ended before the server was stopped"
        assert time.monotonic() < deadline, "no trial result reached MLflow"
        time.sleep(0.5)


def _progress(line: str) -> bool:
    return line.split()[1:2] in (["running"], ["done"])


def _wait_while_down(lines: list, proc, t_down: float) -> None:
    """Until the search has said MLflow is unreachable and a trial has reported an epoch more
    than a second after the server went down (the trials table went on), the search ended, or
    OUTAGE_MAX_S passed (the assertions after say which)."""
    deadline = t_down + OUTAGE_MAX_S
    while time.monotonic() < deadline and proc.poll() is None:
        seen = list(lines)
        if any(UNREACHABLE in s for _, s in seen) and any(t > t_down + 1 and _progress(s) for t, s in seen):
            return
        time.sleep(0.2)


def _assert_mlflow_holds_tunes_results(client, name: str, results_dir: Path, num_trials: int) -> None:
    """Every trial's metric history in MLflow equals Tune's reports (its result.json files),
    one point per (metric, epoch); every trial run FINISHED."""
    from coun_tune.calibration import is_split_metric
    from coun_tune.tracking.trial_logger import METRIC_KEYS

    tune = _tune_results(results_dir)
    assert len(tune) == num_trials, sorted(tune)
    exp = client.get_experiment_by_name(name)
    children = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("coun_tune.role") == "trial"]
    assert sorted(c.data.tags["coun_tune.trial_id"] for c in children) == sorted(tune)
    for c in children:
        reports = tune[c.data.tags["coun_tune.trial_id"]]
        epochs = [int(r["epoch"]) for r in reports]
        assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) == int(reports[-1]["epochs_planned"])
        assert c.info.status == "FINISHED"
        keys = {
            k
            for r in reports
            for k, v in r.items()
            if (k in METRIC_KEYS or is_split_metric(k)) and isinstance(v, (int, float))
        }
        assert "retain_acc" in keys and "forget_gap" in keys
        for key in keys:
            history = client.get_metric_history(c.info.run_id, key)
            steps = [m.step for m in history]
            assert len(steps) == len(set(steps)), (c.info.run_id, key, sorted(steps))
            logged = {m.step: m.value for m in history}
            expected = {int(r["epoch"]): float(r[key]) for r in reports if isinstance(r.get(key), (int, float))}
            assert logged == pytest.approx(expected, abs=1e-9), (key, logged, expected)


@pytest.mark.slow
def test_search_goes_on_while_the_mlflow_server_is_down(server, tmp_path, prepared, session_cache_dir):
    from mlflow.tracking import MlflowClient

    name = "outage"
    write_spec(
        tmp_path / "spec.yaml",
        name,
        cache_dir=session_cache_dir,
        storage_path=tmp_path / "results",
        tracking_uri=server.url,
        num_samples=3,
        max_concurrent_trials=2,
        sampler="random",
        space={**SPACE, "epochs": EPOCHS},
    )
    proc, lines, reader = _start_search(tmp_path)
    client = MlflowClient(tracking_uri=server.url)
    try:
        _wait_for_first_result(client, name, proc)
        t_stopping = time.monotonic()
        server.stop()
        t_down = time.monotonic()
        _wait_while_down(lines, proc, t_down)
        t_restart = time.monotonic()
        server.start()
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            stop_session(proc.pid)
        reader.join(30)
        stop_session(proc.pid, grace=10)
        if server.proc is None:
            server.start()
    out = "\n".join(s for _, s in lines)
    marks = {"server stopping": t_stopping, "server down": t_down, "restarting": t_restart}
    timed = sorted([(t, s) for t, s in lines] + [(t, f"--- {m}") for m, t in marks.items()])
    (tmp_path / "stdout.txt").write_text("\n".join(f"{t - t_stopping:8.1f}  {s}" for t, s in timed))
    err = (tmp_path / "stderr.txt").read_text(errors="replace")
    assert proc.returncode == 0, f"search exited {proc.returncode}\n{out[-4000:]}\n--- stderr\n{err[-4000:]}"

    # the trials table went on while the server was down
    during = [s for t, s in lines if t_down + 1 < t < t_restart and _progress(s)]
    assert during, f"no trial progress while MLflow was down:\n{(tmp_path / 'stdout.txt').read_text()}"
    down, up = lines_with(out, UNREACHABLE), lines_with(out, REACHABLE)
    assert len(down) == 1 and down[0].startswith(f"{UNREACHABLE}{server.url}, "), out
    assert len(up) == 1, out
    when_down = next(t for t, s in lines if s.startswith(UNREACHABLE))
    assert t_stopping < when_down < t_restart, "the unreachable line came late"
    assert "on_trial_result took" not in err, err[-3000:]

    # every trial's metrics in MLflow are Tune's results, one point per (metric, epoch)
    _assert_mlflow_holds_tunes_results(client, name, tmp_path / "results", 3)


@pytest.mark.slow
def test_a_search_ending_while_mlflow_is_down_is_resumed_with_nothing_lost(
    server, tmp_path, prepared, session_cache_dir
):
    """The server stops after the first result and stays down past the end of the trials: the
    search waits a bounded time (writer.FLUSH_TIMEOUT_S, FLUSH_TIMEOUT_S here), says so, exits
    130 resumable without calling MLflow again; once the server is back, --resume writes the
    buffered records (kept in Tune's saved experiment) and ends the search as it would have
    ended."""
    from mlflow.tracking import MlflowClient

    name = "outage_at_end"
    write_spec(
        tmp_path / "spec.yaml",
        name,
        cache_dir=session_cache_dir,
        storage_path=tmp_path / "results",
        tracking_uri=server.url,
        num_samples=2,
        max_concurrent_trials=2,
        sampler="random",
        space={**SPACE, "epochs": 2},
    )
    proc, lines, reader = _start_search(tmp_path, flush_timeout_s=FLUSH_TIMEOUT_S)
    client = MlflowClient(tracking_uri=server.url)
    try:
        _wait_for_first_result(client, name, proc)
        server.stop()
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            stop_session(proc.pid)
        reader.join(30)
        stop_session(proc.pid, grace=10)
        if server.proc is None:
            server.start()
    out = "\n".join(s for _, s in lines)
    err = (tmp_path / "stderr.txt").read_text(errors="replace")
    assert proc.returncode == 130, f"search exited {proc.returncode}\n{out[-4000:]}\n--- stderr\n{err[-4000:]}"
    assert len(lines_with(out, UNREACHABLE)) == 1 and not lines_with(out, REACHABLE), out
    assert len([s for s in out.splitlines() if "still unreachable:" in s and "records not written" in s]) == 1, out
    assert "search left resumable" in out and "--resume" in out and "Pareto front" not in out, out
    (search_dir,) = [p for p in (tmp_path / "results").iterdir() if p.is_dir()]
    assert json.loads((search_dir / "coun_tune_search.json").read_text())["status"] == "interrupted"

    proc, lines, reader = _start_search(tmp_path, "--resume")
    try:
        proc.wait(timeout=900)
    finally:
        reader.join(30)
        stop_session(proc.pid, grace=10)
    out = "\n".join(s for _, s in lines)
    err = (tmp_path / "stderr.txt").read_text(errors="replace")
    assert proc.returncode == 0, f"--resume exited {proc.returncode}\n{out[-4000:]}\n--- stderr\n{err[-4000:]}"
    assert "Pareto front" in out and not lines_with(out, UNREACHABLE), out
    _assert_mlflow_holds_tunes_results(client, name, tmp_path / "results", 2)
    exp = client.get_experiment_by_name(name)
    parents = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("coun_tune.role") == "search"]
    assert [p.info.status for p in parents] == ["FINISHED"]
