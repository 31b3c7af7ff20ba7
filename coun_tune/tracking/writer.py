"""MLflow writes off the caller's thread: a queue of records and one writer thread.

Why: Tune calls its callbacks on the driver's event loop. An MLflow call there that waits on a
slow or stopped server freezes every trial's progress (a server down for 33 s froze the trials
table; Tune warned "on_trial_result took 61.8 s"). The callback only enqueues; this thread
writes, in order, one record at a time.

What a record is, and how to write it, is the owner's business (`apply(client, record)`): it
must be idempotent (writing a record twice leaves MLflow as writing it once), because a request
that fails may have reached the server, and a record is retried until it is written. `apply`
returns an optional `commit` callable, run under `lock` together with dropping the record from
the queue: what the owner saves (the queue via `pending()`, and whatever `commit` changes) is
then always consistent, so a record is either still pending or its effect is saved, never
neither.

Faults: a transient failure (no connection, a timeout, a 5xx or 429, a locked database) keeps
the record at the head of the queue and retries it with exponential back-off (BACKOFF_START_S
doubling up to BACKOFF_MAX_S). The first failure prints one line, "MLflow unreachable at
<uri>, N records buffered; retrying"; when the queue is drained again, one line "MLflow
reachable again, N records written". A permanent failure (MLflow refused the record: a 4xx)
prints one line and drops that record, so one bad value cannot stall the search's logging.

MLflow's own HTTP client retries a request 7 times with back-off 2 and a 120 s timeout (minutes
per call against a stopped server). Those settings are read from the environment at every
request (process-wide); this thread alone reads them as MAX_RETRIES 0 and a REQUEST_TIMEOUT_S
timeout (`thread_http_settings`), so the back-off here governs and the driver's other MLflow
calls keep MLflow's defaults.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 10.0
REQUEST_TIMEOUT_S = 10  # connect / read timeout per request (MLFLOW_HTTP_REQUEST_TIMEOUT wins if set)
FLUSH_TIMEOUT_S = 60.0  # the longest the end of a search waits for a stopped server

_http = threading.local()
_patch_lock = threading.Lock()


def thread_http_settings() -> dict[str, Any]:
    """The MLflow HTTP settings of the writer thread: no retries inside MLflow's client (each
    failure comes back to the writer at once), no back-off there, a short timeout."""
    try:
        timeout = int(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") or REQUEST_TIMEOUT_S)
    except ValueError:  # MLflow itself would fail on it; the writer keeps its own
        timeout = REQUEST_TIMEOUT_S
    return {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": 0,
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": 0,
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": 0.0,
        "MLFLOW_HTTP_REQUEST_TIMEOUT": timeout,
    }


def _install_thread_overrides() -> None:
    """Let a thread see its own values of MLflow's HTTP settings (`_http.settings`): each
    setting object's `get` (what mlflow.utils.rest_utils and the artifact repositories call at
    every request) answers from the thread's overrides when it has them, else as before."""
    from mlflow import environment_variables as ev

    with _patch_lock:
        for name in thread_http_settings():
            var = getattr(ev, name)
            if "get" in vars(var):  # already installed
                continue
            original = var.get

            def get(original=original, name=name):
                settings = getattr(_http, "settings", None)
                return settings[name] if settings and name in settings else original()

            var.get = get


def is_transient(e: BaseException) -> bool:
    """A failure worth retrying: the server is unreachable, slow, overloaded or failing, or the
    store is locked. An MLflow refusal (4xx: bad value, no such run) is not."""
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        try:
            status = int(e.get_http_status_code())
        except Exception:  # noqa: BLE001  (an unknown error code: treat as a server error)
            status = 500
        return status >= 500 or status == 429
    if isinstance(e, (OSError, TimeoutError, ConnectionError)):  # requests' errors are OSErrors
        return True
    return type(e).__name__ in ("OperationalError", "DisconnectionError")  # SQLAlchemy: locked, gone


def short_reason(e: BaseException) -> str:
    text = str(e)
    for needle, said in (
        ("Connection refused", "connection refused"),
        ("timed out", "timed out"),
        ("RemoteDisconnected", "connection closed by the server"),
        ("Connection aborted", "connection closed by the server"),
        ("Connection reset", "connection reset"),
        ("database is locked", "database is locked"),
    ):
        if needle in text:
            return said
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {first}"[:160]


def _say(line: str, stream=None) -> None:
    stream = stream or sys.stdout
    stream.write(line + "\n")  # one write: the line cannot interleave with the trials table's
    stream.flush()


class MLflowWriter:
    """One queue, one daemon thread (started on the first record). Thread-safe `put`."""

    def __init__(
        self,
        tracking_uri: str,
        apply: Callable[[Any, dict], Callable[[], None] | None],
        *,
        backoff_start_s: float | None = None,
        backoff_max_s: float | None = None,
        client_factory: Callable[[str], Any] | None = None,
    ):
        self.tracking_uri = tracking_uri
        self._apply = apply
        self.backoff_start_s = BACKOFF_START_S if backoff_start_s is None else backoff_start_s
        self.backoff_max_s = BACKOFF_MAX_S if backoff_max_s is None else backoff_max_s
        self._client_factory = client_factory
        self._queue: collections.deque[dict] = collections.deque()
        self.lock = threading.RLock()
        self._cond = threading.Condition(self.lock)
        self._thread: threading.Thread | None = None
        self._stop = False
        self._failures = 0
        self._down = False  # the "unreachable" line was printed and "reachable again" not yet
        self._written_since_down = 0
        self.written = 0
        self.dropped = 0

    # --- the owner's side ----------------------------------------------------------------
    def put(self, record: dict) -> None:
        self.put_many([record])

    def put_many(self, records: Iterable[dict]) -> None:
        with self._cond:
            self._queue.extend(records)
            self._stop = False  # (a thread told to stop but still in a request goes on)
            if self._queue and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(target=self._run, name="coun-tune-mlflow-writer", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def pending(self) -> list[dict]:
        """The records not yet written, oldest first (take `lock` to read it together with
        what the commits change)."""
        with self.lock:
            return list(self._queue)

    @property
    def unreachable(self) -> bool:
        return self._down

    def flush(self, timeout: float = FLUSH_TIMEOUT_S) -> int:
        """Wait up to `timeout` seconds for the queue to drain. Returns how many records are
        still pending (0: everything was written)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue and self._thread is not None and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 1.0))
            return len(self._queue)

    def stop(self, join_timeout: float = 5.0) -> None:
        """Stop the thread after the record in hand (pending records stay in `pending()`)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(join_timeout)

    # --- the thread ----------------------------------------------------------------------
    def _client(self):
        if self._client_factory is not None:
            return self._client_factory(self.tracking_uri)
        from coun_tune.tracking.mlflow_store import client_for

        return client_for(self.tracking_uri)

    def _run(self) -> None:
        _install_thread_overrides()
        _http.settings = thread_http_settings()
        client = None
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                record = self._queue[0]
            commit, failure = None, None
            try:
                if client is None:
                    client = self._client()
                commit = self._apply(client, record)
            except Exception as e:  # noqa: BLE001  (sorted below: retried or reported)
                failure = e
            if failure is not None and is_transient(failure):
                self._wait_after_failure(failure)
                continue
            with self._cond:
                if failure is None:
                    if commit is not None:
                        commit()
                    self.written += 1
                else:
                    self.dropped += 1
                if self._queue and self._queue[0] is record:
                    self._queue.popleft()
                self._failures = 0
                if self._down:
                    self._written_since_down += failure is None
                    if not self._queue:
                        self._down = False
                        _say(f"MLflow reachable again, {self._written_since_down} records written")
                self._cond.notify_all()
            if failure is not None:
                what = record.get("op", "record")
                _say(
                    f"MLflow refused a {what} record (trial {record.get('trial', '-')}), skipped: "
                    f"{short_reason(failure)}",
                    sys.stderr,
                )

    def _wait_after_failure(self, failure: BaseException) -> None:
        with self._cond:
            self._failures += 1
            if not self._down:
                self._down, self._written_since_down = True, 0
                _say(
                    f"MLflow unreachable at {self.tracking_uri}, {len(self._queue)} records buffered; "
                    f"retrying ({short_reason(failure)})"
                )
            delay = min(self.backoff_max_s, self.backoff_start_s * 2 ** (self._failures - 1))
            deadline = time.monotonic() + delay
            while not self._stop and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
