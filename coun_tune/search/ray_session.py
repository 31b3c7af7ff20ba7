"""The Ray this run of coun-tune uses: connect to a cluster, or start a local Ray of our own,
and leave nothing behind, even when the driver is killed.

Local Ray gets a temp dir of its own (the default /tmp/ray is shared by every Ray user of the
machine). Right after it starts, a run record is written to `<runs dir>/<driver pid>.json`:
the driver's PID and start time, the temp dir, and the PID + start time of every process the
driver started (refreshed once workers exist). A clean exit removes Ray, the temp dir and the record.
A SIGKILLed driver cannot; the next `coun-tune search` (or --resume) finds records whose driver
is dead and stops what they name (PIDs only if the start time still matches, so a reused PID is
never hit; plus any process still naming the record's unique temp dir), then removes the temp
dir and the record. A live driver's record is left alone.

The runs dir is local to the machine (PIDs are): $COUN_TUNE_CACHE/runs, else
~/.cache/coun-tune/runs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

from coun_tune.errors import UsageError

# The whole ray.init(address=...), which Ray itself retries for ever. The variable exists for
# tests (a listener that never answers); the default keeps a failed connect under a minute.
CONNECT_TIMEOUT_ENV = "COUN_TUNE_RAY_CONNECT_TIMEOUT_S"


def runs_dir() -> Path:
    root = os.environ.get("COUN_TUNE_CACHE") or str(Path.home() / ".cache" / "coun-tune")
    if "://" in root:  # a remote cache holds no PIDs: those are per machine
        root = str(Path.home() / ".cache" / "coun-tune")
    return Path(root) / "runs"


# --- processes ------------------------------------------------------------------------------


def start_time(pid: int) -> int | None:
    """A process's start time (clock ticks since boot, /proc/PID/stat field 22); None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(root: int) -> list[int]:
    """Live processes below `root` in the process tree (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        try:
            raw = Path(f"/proc/{e}/stat").read_text()
        except OSError:
            continue
        children.setdefault(int(raw[raw.rindex(")") + 2 :].split()[1]), []).append(int(e))
    out, todo = [], list(children.get(root, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return sorted(out)


def pids_naming(fragment: str) -> list[int]:
    """Live processes (not this one) whose command line contains `fragment`."""
    out = []
    for e in os.listdir("/proc"):
        if e.isdigit() and int(e) != os.getpid() and fragment in _cmdline(int(e)) and start_time(int(e)):
            out.append(int(e))
    return sorted(out)


def _stop(procs: list[tuple[int, int]], grace: float = 5.0) -> None:
    """SIGTERM (pid, start time) pairs that still match, wait, SIGKILL the rest."""

    def live():
        return [p for p, t in procs if start_time(p) == t]

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in live():
            try:
                os.kill(p, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while live() and time.monotonic() < deadline:
            time.sleep(0.1)


# --- run records ----------------------------------------------------------------------------


def write_record(temp_dir: str) -> Path:
    """Record (or refresh) what this driver's local Ray consists of now: its processes are the
    driver's descendants (Ray's agents and workers rename themselves `ray::...`, so only the
    tree finds them once the driver is gone) and anything naming the temp dir."""
    pid = os.getpid()
    procs = [(p, start_time(p)) for p in sorted(set(descendants(pid)) | set(pids_naming(temp_dir)))]
    record = {
        "driver_pid": pid,
        "driver_start": start_time(pid),
        "temp_dir": temp_dir,
        "processes": [[p, t] for p, t in procs if t is not None],
    }
    path = runs_dir() / f"{pid}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)
    return path


def clean_dead_runs(log=lambda s: None) -> list[dict]:
    """Stop and remove what earlier coun-tune runs whose driver is dead left behind. Returns
    the records cleaned."""
    cleaned = []
    d = runs_dir()
    for path in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            rec = json.loads(path.read_text())
            pid, started, temp_dir = int(rec["driver_pid"]), rec["driver_start"], str(rec["temp_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours to judge; a half-written record has a .tmp name anyway
        if start_time(pid) == started and started is not None:
            continue  # that run is alive
        procs = [(int(p), int(t)) for p, t in rec.get("processes", [])]
        if temp_dir.startswith(tempfile.gettempdir()) and Path(temp_dir).name.startswith("ctune-ray-"):
            # also anything Ray started later (workers, agents): they name the unique temp dir
            procs += [(p, start_time(p)) for p in pids_naming(temp_dir)]
            _stop([(p, t) for p, t in procs if t is not None])
            shutil.rmtree(temp_dir, ignore_errors=True)
        else:
            _stop(procs)
        path.unlink(missing_ok=True)
        log(f"cleaned up after an earlier coun-tune run (driver {pid}, gone): {len(procs)} Ray process(es), {temp_dir}")
        cleaned.append(rec)
    return cleaned


# --- connecting -----------------------------------------------------------------------------


def check_address(address: str) -> None:
    """A cluster address must answer before Ray is asked to connect: Ray retries for ever."""
    if address == "auto" or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address {address!r}: use host:port (e.g. 127.0.0.1:6379) or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=10):
            pass
    except OSError as e:
        raise UsageError(
            f"--address {address}: nothing answers there ({e.strerror or e}); is the Ray head running?"
        ) from None


# What Ray's GCS client logs, once a second until ray.init gives up with a bare "Failed to
# connect to Ray cluster" (about 20 s), when the cluster refuses this client's token.
AUTH_FAILURE_MARKS = ("InvalidAuthToken", "AuthenticationError", "Unauthenticated")


def auth_failure_message(address: str) -> str:
    mode = os.environ.get("RAY_AUTH_MODE", "")
    why = (
        "RAY_AUTH_MODE is not 'token' here"
        if mode != "token"
        else "the token here is not the cluster's (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)"
    )
    return (
        f"--address {address}: the Ray cluster refused this client's authentication ({why}); "
        "export RAY_AUTH_MODE=token and use the cluster's token (copy ~/.ray/auth_token from the head)"
    )


def probe_connect(address: str, timeout: float) -> None:
    """Connect once from a throw-away process, under a timeout: Ray's connect retries for ever
    and cannot be cancelled from inside (a thread left in it aborts the interpreter at exit).
    Its stderr is read as it comes, so a refused token ends the probe at Ray's first complaint
    and says so, instead of Ray's "Failed to connect" 20 s later."""
    import queue
    import subprocess
    import sys

    code = "import sys, ray; ray.init(address=sys.argv[1], log_to_driver=False); ray.shutdown()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline, seen, refused = time.monotonic() + timeout, [], False
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise UsageError(
                    f"--address {address}: no answer within {timeout:.0f} s (is it a Ray head's GCS port?)"
                ) from None
            if line is None:
                break
            seen.append(line)
            if any(mark in line for mark in AUTH_FAILURE_MARKS):
                refused = True
                break
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: nothing else is in it
            except ProcessLookupError:
                pass
        proc.wait()
    if refused:
        raise UsageError(auth_failure_message(address))
    if proc.returncode != 0:
        last = [line.strip() for line in seen if line.strip()][-1:] or ["no reason given"]
        raise UsageError(f"--address {address}: Ray could not connect ({last[0][:300]})")


def sigterm_as_sigint(signum, frame) -> None:
    """SIGTERM (`ray job stop`, `docker stop`, systemd, `kill`) takes the path of Ctrl-C.

    Inside `tuner.fit()` the SIGINT handler is Tune's own: it ends the run gracefully (trials
    stopped, experiment state saved), so the search ends interrupted and resumable. Elsewhere
    it is Python's, which raises KeyboardInterrupt (the CLI's exit 130). Calling whichever is
    current keeps one path for both signals; a second SIGTERM, like a second Ctrl-C, finds
    Tune's handler already restored to Python's and stops at once."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:  # SIGINT ignored or default (a process started in the background): still stop
        raise KeyboardInterrupt


# Ray's own INFO lines at start ("Started a local Ray instance", ...) and its notice that token
# auth is on (it is: nothing here turns it off) would come before coun-tune's lines, a one-line
# error included; Ray's warnings and errors still show.
RAY_LOGGING_LEVEL = logging.WARNING


class _DropTokenAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("Token authentication is enabled")


def _quiet_token_notice() -> None:
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropTokenAuthNotice) for f in log.filters):
        log.addFilter(_DropTokenAuthNotice())


def env_vars_for_workers() -> dict[str, str]:
    """What trials on every node must see as the driver does (an S3-compatible endpoint; that
    no bucket may be created, see coun_tune.core.storage)."""
    from coun_tune.core.storage import CREATE_BUCKETS_ENV

    return {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", CREATE_BUCKETS_ENV) if os.environ.get(k)}


class RaySession:
    """`with RaySession(address, num_cpus) as s:` Ray is up inside; torn down (if we started it)
    after, with its temp dir and run record."""

    def __init__(self, address: str | None, num_cpus: int | None = None, log=lambda s: None):
        self.address, self.num_cpus, self.log = address, num_cpus, log
        self.temp_dir: str | None = None
        self.record: Path | None = None
        self.started = False
        self._sigterm_before = None

    def __enter__(self) -> RaySession:
        import ray

        if ray.is_initialized():
            return self
        sigterm_before = signal.getsignal(signal.SIGTERM)
        clean_dead_runs(self.log)
        runtime_env = {"env_vars": env_vars_for_workers()} if env_vars_for_workers() else None
        if self.address:
            probe_connect(self.address, float(os.environ.get(CONNECT_TIMEOUT_ENV, 45)))
            _quiet_token_notice()
            ray.init(
                address=self.address, log_to_driver=False, runtime_env=runtime_env, logging_level=RAY_LOGGING_LEVEL
            )
            self.started = True
            self._catch_sigterm(sigterm_before)
            return self
        # short: Ray's socket paths must fit 107 bytes
        self.temp_dir = tempfile.mkdtemp(prefix="ctune-ray-")
        self.started = True
        _quiet_token_notice()
        try:
            # No dashboard (its headless process listens on 127.0.0.1 only). GCS, raylet, object
            # manager and worker gRPC ports listen on all interfaces in Ray 2.60 whatever the node
            # IP (a 127.0.0.1 node IP is rewritten to the machine's address): token auth, on by
            # default, is what guards them; nothing here turns it off.
            ray.init(
                num_cpus=self.num_cpus or os.cpu_count(),
                include_dashboard=False,
                log_to_driver=False,
                _temp_dir=self.temp_dir,
                runtime_env=runtime_env,
                logging_level=RAY_LOGGING_LEVEL,
            )
        finally:
            self.record = write_record(self.temp_dir)
        self._catch_sigterm(sigterm_before)
        return self

    def _catch_sigterm(self, before) -> None:
        """After ray.init, whose own SIGTERM handler calls sys.exit wherever the driver is (a
        traceback, MLflow runs left RUNNING, no resumable state): route SIGTERM to the SIGINT
        path; __exit__ puts back the handler from before ray.init."""
        if threading.current_thread() is threading.main_thread():
            self._sigterm_before = signal.SIG_DFL if before is None else before
            signal.signal(signal.SIGTERM, sigterm_as_sigint)

    def refresh_record(self) -> None:
        """Re-record the processes (workers and agents started since ray.init)."""
        if self.temp_dir:
            self.record = write_record(self.temp_dir)

    def __exit__(self, *exc) -> None:
        import ray

        if not self.started:
            return
        restore = self._sigterm_before
        if restore is not None:  # the teardown must finish: a second SIGTERM waits for it
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            ray.shutdown()
            if self.temp_dir:
                leftovers = [(p, start_time(p)) for p in pids_naming(self.temp_dir)]
                _stop([(p, t) for p, t in leftovers if t is not None])
                shutil.rmtree(self.temp_dir, ignore_errors=True)
            if self.record:
                self.record.unlink(missing_ok=True)
        finally:
            if restore is not None:
                signal.signal(signal.SIGTERM, restore)
                self._sigterm_before = None
