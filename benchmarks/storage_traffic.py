"""Storage traffic of a search on S3: requests and bytes per trial-epoch as the trial count grows.

    .venv/bin/python benchmarks/storage_traffic.py --trials 4 16 64 --epochs 2

Setup: moto's S3 server (`moto_server`, on 127.0.0.1, stopped by PID) behind a small counting
HTTP proxy started in this process; the search's `storage_path` is s3://bench/results/<N>t with
`storage_endpoint` the proxy, so every request Tune and coun-tune make to the bucket passes
through it. `coun-tune search` runs as a user runs it (a subprocess, local Ray, 2 trials at a
time, one CPU each): digits, the tiny recipe, CoUn, `--epochs` epochs, random sampler. The base
models are trained into a local cache first (not on S3: what is measured is the search's
results traffic; the cache's reads are per trial and the same at any trial count) and MLflow
is a local SQLite store.

Counted per search: every HTTP request the proxy forwards (method and key), its request body
bytes (up) and its response body bytes (down); headers are not counted. moto's own request log
(one werkzeug line per request) is read too, and its count is printed beside the proxy's as a
cross-check. Keys are grouped: trial checkpoints (`checkpoint_*`), other trial files
(result.json, progress.csv, params...), experiment state (experiment_state-*.json, tuner.pkl,
searcher and callback state), coun-tune's own files (search_state.json, ...) and bucket-level
requests. trial-epochs = trials x epochs (what the trials reported: every trial runs all its
epochs here).

Output: one block per trial count, a table of totals, then per group the requests and KB per
trial-epoch at each trial count, a trial's share of the snapshot (the largest experiment_state
upload divided by the trials), KB per trial-epoch, and last the requests per trial-epoch.

What grows with trials is Tune's experiment snapshot (experiment_state-*.json): it holds every
trial and is uploaded whole at every snapshot, and Tune snapshots at every trial checkpoint
(CheckpointConfig(num_to_keep=1) forces it, so that the saved state never names a checkpoint that
was deleted) and at least every ~10 s. With N trials, E epochs, a checkpoint every k epochs and
a per-trial entry of s bytes, the snapshots alone are about (E/k) N snapshots of up to N s bytes:
per trial-epoch about s N / (2 k) bytes, linear in N. coun-tune cuts s (a finished trial's entry
drops Tune's metric_n_steps: coun_tune/search/trial_files.py); the slope remains.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "bench"
SCENARIO = {"dataset": "digits", "forget": "random:0.1", "seed": 0, "recipe": "tiny"}
SPACE = {"temperature": {"log": [0.03, 0.3]}, "cl_weight": {"log": [0.1, 6.0]}, "lr": {"log": [0.01, 0.1]}}
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- moto and the counting proxy -------------------------------------------------------------


def start_moto(log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "moto.server"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*cmd, "-H", "127.0.0.1", "-p", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    endpoint = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://{endpoint}/moto-api/", timeout=2):
                return proc, endpoint
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    f"moto_server did not start:\n{log_path.read_text(errors='replace')[-2000:]}"
                ) from None
            time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the session this script started (by its leader's PID), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass


class Counts:
    """What the proxy saw since the last reset: one (method, path, up, down) per request."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, int, int]] = []

    def add(self, method: str, path: str, up: int, down: int) -> None:
        with self.lock:
            self.requests.append((method, path, up, down))

    def take(self) -> list[tuple[str, str, int, int]]:
        with self.lock:
            out, self.requests = self.requests, []
            return out


def _read_chunked(rfile) -> bytes:
    body = b""
    while True:
        size = int(rfile.readline().split(b";", 1)[0].strip(), 16)
        if size == 0:
            while rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return body
        body += rfile.read(size)
        rfile.readline()


def make_proxy(upstream: str, counts: Counts) -> ThreadingHTTPServer:
    host, port = upstream.split(":")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _forward(self) -> None:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = _read_chunked(self.rfile)
            else:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {
                k: v for k, v in self.headers.items() if k.lower() not in ("expect", "transfer-encoding", "connection")
            }
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection(host, int(port), timeout=120)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response_only(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
            finally:
                conn.close()
            counts.add(self.command, urllib.parse.unquote(self.path.split("?", 1)[0]), len(body), len(data))

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="s3-proxy", daemon=True).start()
    return server


def moto_log_requests(log_path: Path, start: int) -> int:
    """Request lines moto (werkzeug) logged after byte offset `start`, other than /moto-api/."""
    with open(log_path, "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # werkzeug colours its lines
    return sum(1 for m in re.finditer(r'"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP', text) if "/moto-api" not in m.group(2))


# --- the search ------------------------------------------------------------------------------


def kind(path: str, prefix: str) -> str:
    """The group of one request (path-style: /bucket/key): directory markers (keys ending in
    "/": pyarrow's create_dir), trial checkpoints, trial files (result.json, params.json, Tune's
    logger files), experiment state (Tune's snapshot files, tuner.pkl, the storage marker),
    coun-tune files (its search state and exports) and bucket (requests on the bucket itself:
    existence checks, listings)."""
    key = path.lstrip("/")
    key = key[len(BUCKET) :].lstrip("/") if key.startswith(BUCKET) else key
    if key.endswith("/"):
        return "directory markers"
    if not key.startswith(prefix):
        return "bucket"
    parts = key[len(prefix) :].lstrip("/").split("/")
    if any(p.startswith("checkpoint_") for p in parts):
        return "trial checkpoints"
    if len(parts) >= 3 and parts[1].startswith("unlearn_trial_"):
        return "trial files"
    name = parts[-1]
    tune_state = ("experiment_state", "tuner.pkl", "searcher-state", "search_gen_state", "callback-states", ".validate")
    if name.startswith(tune_state) or name.endswith(".pkl"):
        return "experiment state"
    return "coun-tune files"


def make_bucket(endpoint: str) -> None:
    """The bucket, made on moto directly (a search refuses a storage_path whose bucket is missing)."""
    from pyarrow import fs

    keys = {"access_key": AWS["AWS_ACCESS_KEY_ID"], "secret_key": AWS["AWS_SECRET_ACCESS_KEY"]}
    s3 = fs.S3FileSystem(
        endpoint_override=endpoint, scheme="http", region="us-east-1", allow_bucket_creation=True, **keys
    )
    s3.create_dir(BUCKET)


def checkpoints_per_trial(reqs: list) -> list[int]:
    """How many checkpoints each trial uploaded (distinct checkpoint_* directories written
    under it, state.pt's upload being the mark), sorted."""
    dirs: dict[str, set] = {}
    for method, path, _, _ in reqs:
        m = re.search(r"/(unlearn_trial_[^/]+)/(checkpoint_\d+)/state\.pt$", path)
        if m and method in ("PUT", "POST"):
            dirs.setdefault(m.group(1), set()).add(m.group(2))
    return sorted(len(v) for v in dirs.values())


def snapshot_counts(reqs: list) -> dict:
    """snapshots: uploads of Tune's experiment state (one per snapshot); snapshot_max_bytes: the
    largest of them (the last, with every trial: divided by the trials, a trial's share of every
    snapshot, what makes snapshot bytes grow with trials); result_uploads_per_trial:
    uploads of each trial's result.json, sorted; trial_dir_markers: directory markers (PUT of
    an empty .../unlearn_trial_*/ key) made for trial directories."""
    put = [p for m, p, _, _ in reqs if m == "PUT"]
    results: Counter = Counter()
    for p in put:
        m = re.search(r"/(unlearn_trial_[^/]+)/result\.json$", p)
        if m:
            results[m.group(1)] += 1
    state = [u for m, p, u, _ in reqs if m == "PUT" and re.search(r"/experiment_state-[^/]+\.json$", p)]
    return {
        "snapshots": len(state),
        "snapshot_max_bytes": max(state, default=0),
        "result_uploads_per_trial": sorted(results.values()),
        "trial_dir_markers": sum(1 for p in put if re.search(r"/unlearn_trial_[^/]+/$", p)),
    }


def prepare_cache(cache: Path) -> None:
    """The original and oracle in the local cache before any measured search."""
    code = (
        "import sys; from coun_tune.core.pipeline import prepare; from coun_tune.core.recipes import Scenario; "
        f"prepare(Scenario(**{SCENARIO!r}), sys.argv[1], log=lambda s: None)"
    )
    subprocess.run([sys.executable, "-c", code, str(cache)], check=True, cwd=cache.parent)


def run_search(
    work: Path, cache: Path, proxy: str, n: int, epochs: int, extra: dict, timeout: float
) -> tuple[float, str]:
    import yaml

    name = f"traffic_{n}t"
    spec = {
        "name": name,
        "scenario": SCENARIO,
        "method": "coun",
        "objectives": {"forget_gap": "min", "retain_acc": "max"},
        "space": {**SPACE, "epochs": epochs},
        "sampler": "random",
        "num_samples": n,
        "max_concurrent_trials": 2,
        "resources_per_trial": {"cpu": 1, "gpu": 0},
        "seed": 0,
        "cache_dir": str(cache),
        "storage_path": f"s3://{BUCKET}/results/{n}t",
        "storage_endpoint": f"http://{proxy}",
        "tracking_uri": f"sqlite:///{work}/mlflow.db",
        **extra,
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    exe = Path(sys.executable).with_name("coun-tune")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "coun_tune"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS", "MLFLOW_"))}
    env.update(AWS, MLFLOW_DISABLE_TELEMETRY="true", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    t0 = time.time()
    proc = subprocess.Popen(
        [*cmd, "search", str(path)],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        out, _ = proc.communicate()
        raise SystemExit(f"the {n}-trial search ran over {timeout:.0f} s:\n{out[-3000:]}") from None
    finally:
        stop(proc)  # whatever it left in its session
    if proc.returncode != 0:
        raise SystemExit(f"the {n}-trial search exited {proc.returncode}:\n{out[-4000:]}")
    return time.time() - t0, out


def make_row(n: int, epochs: int, wall: float, reqs: list, moto_requests: int | None) -> dict:
    te = n * epochs
    groups: dict[str, Counter] = {}
    for method, path, up, down in reqs:
        g = groups.setdefault(kind(path, f"results/{n}t"), Counter())
        g["requests"] += 1
        g[method] += 1
        g["up"] += up
        g["down"] += down
    up, down = sum(r[2] for r in reqs), sum(r[3] for r in reqs)
    return {
        "trials": n,
        "trial_epochs": te,
        "wall_s": round(wall, 1),
        "requests": len(reqs),
        "moto_log_requests": moto_requests,
        "bytes_up": up,
        "bytes_down": down,
        "requests_per_trial_epoch": round(len(reqs) / te, 2),
        "bytes_per_trial_epoch": round((up + down) / te),
        "groups": {k: dict(v) for k, v in sorted(groups.items())},
        "checkpoints_per_trial": checkpoints_per_trial(reqs),
        **snapshot_counts(reqs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, nargs="+", default=[4, 16, 64], help="trial counts (default 4 16 64)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--spec", default="{}", help="extra spec keys as JSON, e.g. '{\"checkpoint_every\": 1}'")
    ap.add_argument("--timeout", type=float, default=1500, help="seconds per search")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--cache", help="base-model cache to use (default: a new one in the work directory)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument(
        "--snapshot-period",
        type=float,
        help="seconds between Tune's periodic snapshots (TUNE_GLOBAL_CHECKPOINT_S; default Tune's: "
        "about 10). A large value leaves the snapshots a checkpoint forces, whose count does not "
        "depend on how fast the machine is",
    )
    args = ap.parse_args()
    extra = json.loads(args.spec)
    if args.snapshot_period is not None:
        os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = str(args.snapshot_period)  # the searches inherit it

    work = Path(tempfile.mkdtemp(prefix="storage-traffic-"))
    moto_log = work / "moto.log"
    moto, upstream = start_moto(moto_log)
    counts = Counts()
    proxy = make_proxy(upstream, counts)
    endpoint = f"127.0.0.1:{proxy.server_address[1]}"
    rows = []
    try:
        make_bucket(upstream)
        cache = Path(args.cache) if args.cache else work / "cache"
        prepare_cache(cache)
        for n in args.trials:
            counts.take()
            log_start = moto_log.stat().st_size
            wall, out = run_search(work, cache, endpoint, n, args.epochs, extra, args.timeout)
            time.sleep(0.5)  # let moto flush its log line for the last request
            reqs = counts.take()
            row = make_row(n, args.epochs, wall, reqs, moto_log_requests(moto_log, log_start))
            rows.append(row)
            print(f"--- {n} trials x {args.epochs} epochs ({wall:.0f} s)", flush=True)
            print(json.dumps(row, indent=1), flush=True)
            if args.keep:
                (work / f"search_{n}t.log").write_text(out)
                (work / f"requests_{n}t.tsv").write_text("".join(f"{m}\t{p}\t{u}\t{d}\n" for m, p, u, d in reqs))
    finally:
        proxy.shutdown()
        stop(moto)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory kept: {work}")
    print()
    print(f"{'trials':>6} {'requests':>9} {'bytes up':>12} {'bytes down':>11} {'req/trial-ep':>12} {'B/trial-ep':>11}")
    for r in rows:
        print(
            f"{r['trials']:>6} {r['requests']:>9} {r['bytes_up']:>12} {r['bytes_down']:>11} "
            f"{r['requests_per_trial_epoch']:>12} {r['bytes_per_trial_epoch']:>11}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print()
    print(per_group_table(rows))
    print(
        "snapshot KB per trial (largest experiment_state upload / trials): "
        + ", ".join(f"{r['trials']} trials {r['snapshot_max_bytes'] / r['trials'] / 1000:.1f}" for r in rows)
    )
    print(
        "KB per trial-epoch: "
        + ", ".join(f"{r['trials']} trials {r['bytes_per_trial_epoch'] / 1000:.0f}" for r in rows)
    )
    print(
        "requests per trial-epoch: " + ", ".join(f"{r['trials']} trials {r['requests_per_trial_epoch']}" for r in rows)
    )


def per_group_table(rows: list[dict]) -> str:
    """Requests and KB (up + down) per trial-epoch of each group, one column pair per trial count."""
    groups = sorted({g for r in rows for g in r["groups"]})
    head = f"{'per trial-epoch':<18}" + "".join(f" {str(r['trials']) + ' trials req':>15} {'KB':>8}" for r in rows)
    lines = [head]
    for g in [*groups, "all"]:
        cells = []
        for r in rows:
            te = r["trial_epochs"]
            if g == "all":
                req, nbytes = r["requests"], r["bytes_up"] + r["bytes_down"]
            else:
                c = r["groups"].get(g, {})
                req, nbytes = c.get("requests", 0), c.get("up", 0) + c.get("down", 0)
            cells.append(f" {req / te:>15.1f} {nbytes / te / 1000:>8.1f}")
        lines.append(f"{g:<18}" + "".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
