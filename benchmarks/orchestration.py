"""Orchestration: how busy a search keeps its trial slots, and what each trial costs beyond its
own training and evaluation, on a real TWO-NODE Ray cluster on loopback (CPU, a real search).

    .venv/bin/python benchmarks/orchestration.py --trials 6 --epochs 40

Setup: two `ray start` nodes (head + worker, one CPU each, bounded --memory and
--object-store-memory, token auth, temp dirs of their own) and `coun-tune search SPEC --address`
in a subprocess, exactly as a user runs it: digits, small_cnn, CoUn with FIXED hyperparameters
(every trial is the same work), `--epochs` epochs per trial (chosen so a trial lasts >= 30 s on
this machine), max_concurrent_trials = slots = 2, one CPU per trial, random sampler. The base
models are trained into the cache before the search, so the search takes them from the cache.
Everything this script starts is stopped by PID (never `ray stop`).

Timestamps, all wall-clock time.time() of this one machine:
- a trial's start: Tune's `run_metadata.start_time` (the driver set the trial RUNNING, its actor
  started), from the experiment state file; its end: the MLflow run's end_time (the driver's
  callback ended the run after logging the model). tune_wall = end - start.
- inside the trial: Tune's `time_total_s` (the trainable's clock), the trial's `wall_seconds`
  (training only) and the per-epoch `time_this_iter_s` from result.json.
- evaluation: not reported by a trial, so measured here: evaluate_scenario() on the same
  scenario and architecture, one thread as in a trial, without and with the MIA (a trial
  evaluates every epoch, with the MIA at its last), median of 3.
- the driver's phases: each stdout line of the CLI stamped on arrival.

busy fraction   = sum(tune_wall) / (slots x (last trial end - first trial start))
useful fraction = sum(training + evaluation) / the same slot-time
overhead/trial  = tune_wall - training - evaluation (actor start, trial setup, checkpoints,
                  result handling, MLflow logging); the driver's fixed costs are separate.
Ratios are printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = {"dataset": "digits", "forget": "random:0.1", "seed": 0, "recipe": "tiny"}
HPARAMS = {"lr": 0.03, "cl_weight": 1.0}  # fixed; temperature is a one-value "search" (a spec needs one)
TEMPERATURE = 0.1
NODE_MEMORY = 2 * 1024**3
NODE_OBJECT_STORE = 100 * 1024**2


# --- processes (everything started here is a session leader: stop its session by PID) -------


def _session_of(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = raw[raw.rindex(")") + 2 :].split()
    return None if f[0] in ("Z", "X") else int(f[3])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def ours(sessions: list[int], fragment: str) -> list[int]:
    """Live processes in one of `sessions` or naming `fragment` (our unique temp dir)."""
    pids = [int(e) for e in os.listdir("/proc") if e.isdigit() and int(e) != os.getpid()]
    return sorted(
        p for p in pids if _session_of(p) is not None and (_session_of(p) in sessions or fragment in _cmdline(p))
    )


def stop(sessions: list[int], fragment: str, grace: float = 8.0) -> list[int]:
    """SIGTERM, a grace period, SIGKILL; repeated while anything of ours is left."""
    for _ in range(4):
        pids = ours(sessions, fragment)
        if not pids:
            return []
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in pids:
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while sig == signal.SIGTERM and time.monotonic() < deadline and any(_session_of(p) for p in pids):
                time.sleep(0.2)
        time.sleep(0.5)
    return ours(sessions, fragment)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def child_env(cache: Path) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")
    }
    env.update(
        RAY_AUTH_MODE="token",
        MLFLOW_DISABLE_TELEMETRY="true",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
        COUN_TUNE_CACHE=str(cache),
    )
    return env


def start_cluster(base: Path, env: dict, sessions: list[int]) -> str:
    """`ray start --head` and one `ray start --address` node, one CPU each. Returns the address."""
    ray = str(Path(sys.executable).with_name("ray"))
    gcs, agent_h, agent_w, metrics_h, metrics_w = free_ports(5)
    common = [
        "--node-ip-address",
        "127.0.0.1",
        "--num-cpus",
        "1",
        "--memory",
        str(NODE_MEMORY),
        "--object-store-memory",
        str(NODE_OBJECT_STORE),
        "--disable-usage-stats",
    ]
    nodes = [
        [
            "--head",
            "--port",
            str(gcs),
            "--include-dashboard=false",
            "--dashboard-agent-listen-port",
            str(agent_h),
            "--metrics-export-port",
            str(metrics_h),
            "--temp-dir",
            str(base / "h"),
            *common,
        ],
        [
            "--address",
            f"127.0.0.1:{gcs}",
            "--dashboard-agent-listen-port",
            str(agent_w),
            "--metrics-export-port",
            str(metrics_w),
            "--temp-dir",
            str(base / "w"),
            *common,
        ],
    ]
    for args in nodes:
        proc = subprocess.Popen(
            [ray, "start", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        sessions.append(proc.pid)  # its daemons keep this session id after `ray start` exits
        out, _ = proc.communicate(timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"`ray start {' '.join(args)}` exited {proc.returncode}:\n{out[-3000:]}")
    return f"127.0.0.1:{gcs}"


def run_cli_stamped(args: list[str], cwd: Path, env: dict, sessions: list[int], timeout: float) -> list:
    """`coun-tune ARGS`; returns [(time.time() at arrival, stdout line)], the exit time last."""
    exe = Path(sys.executable).with_name("coun-tune")
    proc = subprocess.Popen(
        [str(exe), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=open(cwd / "cli_stderr.txt", "w"),
        text=True,
        start_new_session=True,
    )
    sessions.append(proc.pid)
    lines = [(time.time(), "<exec>")]

    def pump():
        for line in proc.stdout:
            lines.append((time.time(), line.rstrip("\n")))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    rc = proc.wait(timeout=timeout)
    lines.append((time.time(), "<exit>"))
    reader.join(timeout=10)
    if rc != 0:
        tail = "\n".join(line for _, line in lines[-40:])
        raise RuntimeError(f"coun-tune exited {rc}:\n{tail}\n{(cwd / 'cli_stderr.txt').read_text()[-3000:]}")
    return lines


# --- measurements ------------------------------------------------------------------------------


def warm_cache_and_time_eval(cache: Path) -> dict:
    """Train the base models into the cache (untimed: not part of the search), then time one
    evaluation of a small_cnn on this scenario, one thread, without and with the MIA."""
    import torch

    from coun_tune.core.engine import evaluate_scenario
    from coun_tune.core.pipeline import prepare
    from coun_tune.core.recipes import Scenario

    torch.set_num_threads(1)
    prep = prepare(Scenario(**SCENARIO), cache, log=lambda s: None)
    out = {}
    for mia in (False, True):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            evaluate_scenario(prep.base.original, prep.scen_data, prep.base.oracle_metrics, with_mia=mia)
            times.append(time.perf_counter() - t0)
        out["eval_mia_s" if mia else "eval_s"] = statistics.median(times)
    return out


def trial_records(storage: Path, name: str, tracking_uri: str) -> list[dict]:
    """One dict per trial: start/end (driver), time_total_s, training, per-epoch times."""
    from mlflow.tracking import MlflowClient

    (exp_dir,) = sorted(storage.glob(f"{name}_*"))
    state = json.loads(sorted(exp_dir.glob("experiment_state-*.json"))[-1].read_text())
    meta = {}
    for trial_json, run_json in state["trial_data"]:
        t, r = json.loads(trial_json), json.loads(run_json)
        meta[t["trial_id"]] = r
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(name)
    runs = {
        r.data.tags.get("coun_tune.trial_id"): r
        for r in client.search_runs([exp.experiment_id], max_results=100)
        if r.data.tags.get("coun_tune.role") == "trial"
    }
    out = []
    for f in sorted(exp_dir.glob("*/result.json")):
        results = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        tid = results[-1]["trial_id"]
        run = runs[tid]
        out.append(
            {
                "trial": tid,
                "start": meta[tid]["start_time"],
                "last_result": meta[tid]["last_result_time"],
                "end": run.info.end_time / 1000,
                "status": run.info.status,
                "epochs": results[-1]["epoch"],
                "time_total_s": results[-1]["time_total_s"],
                "training_s": results[-1]["wall_seconds"],
                "iter_s": [r["time_this_iter_s"] for r in results],
                "train_epoch_s": [
                    b["wall_seconds"] - a for a, b in zip([0.0] + [r["wall_seconds"] for r in results[:-1]], results)
                ],
            }
        )
    return sorted(out, key=lambda r: r["start"])


def idle_split(recs: list[dict], slots: int) -> dict:
    """Where the slots' idle time went. handover: each trial after the first `slots` takes the
    slot the (i - slots)-th trial to end freed (Tune starts no more than `slots` at once), so
    its wait is start_i - that end (a new actor: worker process, imports, the trainable).
    Idle slot-seconds before the last trial start (work was waiting) vs after it (the drain:
    nothing left to start while the last trials finish)."""
    starts = sorted(r["start"] for r in recs)
    ends = sorted(r["end"] for r in recs)
    handover = [starts[i] - ends[i - slots] for i in range(slots, len(starts))]
    last_start, first = starts[-1], starts[0]
    events = sorted([(t, 1) for t in starts] + [(t, -1) for t in ends])
    idle_before = idle_after = 0.0
    running, prev = 0, first
    for t, d in events:
        gap = (slots - running) * (t - prev)
        if t <= last_start:
            idle_before += gap
        elif prev >= last_start:
            idle_after += gap
        else:
            idle_before += (slots - running) * (last_start - prev)
            idle_after += (slots - running) * (t - last_start)
        running, prev = running + d, t
    return {"handover_s": handover, "idle_before_last_start": idle_before, "idle_drain": idle_after}


def first_line(lines: list, needle: str) -> float | None:
    return next((t for t, line in lines if needle in line), None)


def write_spec(path: Path, name: str, work: Path, trials: int, epochs: int, slots: int) -> Path:
    import yaml

    doc = {
        "name": name,
        "scenario": dict(SCENARIO),
        "method": "coun",
        "objectives": {"forget_gap": "min", "retain_acc": "max"},
        "space": {"temperature": {"choice": [TEMPERATURE]}, **HPARAMS, "epochs": epochs},
        "sampler": "random",
        "num_samples": trials,
        "max_concurrent_trials": slots,
        "resources_per_trial": {"cpu": 1, "gpu": 0},
        "seed": 0,
        "cache_dir": str(work / "cache"),
        "storage_path": str(work / "results"),
        "tracking_uri": f"sqlite:///{work}/mlflow.db",
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=6, help="num_samples of the search")
    ap.add_argument(
        "--epochs",
        type=int,
        default=40,
        help="epochs per trial (a trial should last >= 30 s: 40 gave 31-35 s on a quiet 2-core box)",
    )
    ap.add_argument("--quick", action="store_true", help="2 trials of 1 epoch (a smoke run, not a measurement)")
    ap.add_argument("--json", default=None, help="also write every figure here")
    args = ap.parse_args(argv)
    trials, epochs, slots = (2, 1, 2) if args.quick else (args.trials, args.epochs, 2)
    load_before = os.getloadavg()
    base = Path(tempfile.mkdtemp(prefix="cto-", dir="/tmp"))  # short: Ray's Unix sockets live under it
    sessions: list[int] = []
    try:
        return _measure(base, sessions, trials, epochs, slots, load_before, args.json)
    finally:
        left = stop(sessions, str(base))
        shutil.rmtree(base, ignore_errors=True)
        if left:
            print(f"WARNING: processes of this benchmark still running: {left}", file=sys.stderr)


def _measure(base: Path, sessions: list[int], trials: int, epochs: int, slots: int, load_before, json_path) -> int:
    work, name = base / "work", "orchestration"
    work.mkdir()
    env = child_env(work / "cache")
    ev = warm_cache_and_time_eval(work / "cache")
    for attempt in (1, 2):  # on a loaded box `ray start` may time out waiting for its GCS: once more
        t0 = time.time()
        try:
            address = start_cluster(base / f"c{attempt}", env, sessions)
            break
        except RuntimeError as e:
            stop(sessions, str(base))
            if attempt == 2:
                raise
            print(f"cluster start failed, retrying: {str(e).splitlines()[-1]}", file=sys.stderr)
    ray_start_s = time.time() - t0
    spec = write_spec(work / "spec.yaml", name, work, trials, epochs, slots)
    lines = run_cli_stamped(["search", str(spec), "--address", address], work, env, sessions, timeout=3600)
    load_after = os.getloadavg()
    t0 = time.time()
    left = stop(sessions, str(base))
    ray_stop_s = time.time() - t0
    recs = trial_records(work / "results", name, f"sqlite:///{work}/mlflow.db")

    for r in recs:  # evaluation: every epoch, the MIA at the last (mia_every 0)
        r["eval_s"] = (r["epochs"] - 1) * ev["eval_s"] + ev["eval_mia_s"]
        r["tune_wall"] = r["end"] - r["start"]
        r["overhead"] = r["tune_wall"] - r["training_s"] - r["eval_s"]
        r["outside"] = r["tune_wall"] - r["time_total_s"]  # actor start -> first train(); last result -> run ended
        r["setup"] = r["iter_s"][0] - r["train_epoch_s"][0] - (ev["eval_s"] if r["epochs"] > 1 else ev["eval_mia_s"])
        r["logging"] = r["end"] - r["last_result"]
    first, last = min(r["start"] for r in recs), max(r["end"] for r in recs)
    span = last - first
    exec_t, exit_t = lines[0][0], lines[-1][0]
    base_done = first_line(lines, "oracle:") or exec_t
    export_t = first_line(lines, "exported the knee config") or exit_t
    fixed = {
        "ray_start_s (2 nodes)": ray_start_s,
        "cli start -> base models from cache": base_done - exec_t,
        "base models -> first trial start (MLflow parent, tuner)": first - base_done,
        "last trial end -> export written (review, export)": export_t - last,
        "export -> cli exit (disconnect)": exit_t - export_t,
        "ray_stop_s (by PID)": ray_stop_s,
    }

    from coun_tune.report import table

    print(
        f"\nload average (1/5/15 min): before {'/'.join(f'{x:.1f}' for x in load_before)}, "
        f"after {'/'.join(f'{x:.1f}' for x in load_after)} on {os.cpu_count()} CPUs (box shared)"
    )
    print(
        f"{len(recs)} trials x {epochs} epochs, {slots} slots on 2 nodes; evaluation measured here: "
        f"{ev['eval_s']:.2f} s, with MIA {ev['eval_mia_s']:.2f} s"
    )
    rows = [
        [
            r["trial"],
            r["status"],
            f"{r['start'] - first:.1f}",
            f"{r['end'] - first:.1f}",
            f"{r['tune_wall']:.1f}",
            f"{r['time_total_s']:.1f}",
            f"{r['training_s']:.1f}",
            f"{r['eval_s']:.1f}",
            f"{r['overhead']:.1f}",
            f"{r['outside']:.1f}",
            f"{r['setup']:.1f}",
            f"{r['logging']:.1f}",
        ]
        for r in recs
    ]
    print(
        table(
            [
                "trial",
                "status",
                "start",
                "end",
                "tune_wall",
                "time_total",
                "training",
                "eval",
                "overhead",
                "outside_fn",
                "setup",
                "log_end",
            ],
            rows,
        )
    )
    print(
        "(seconds; start/end from the first trial's start; outside_fn = tune_wall - time_total_s; setup = "
        "first epoch's time beyond its training and evaluation; log_end = last result -> MLflow run ended)"
    )
    cached = not any("trained now" in line for _, line in lines)
    print(f"\ndriver fixed costs (base models {'from the cache' if cached else 'TRAINED in the search'}):")
    print(table(["phase", "s"], [[k, f"{v:.1f}"] for k, v in fixed.items()]))

    n = len(recs)
    busy = sum(r["tune_wall"] for r in recs) / (slots * span)
    useful = sum(r["training_s"] + r["eval_s"] for r in recs) / (slots * span)
    overhead = sum(r["overhead"] for r in recs) / n
    trial_time = sum(r["tune_wall"] for r in recs) / n
    figures = {
        "load_before": load_before,
        "load_after": load_after,
        "trials": n,
        "epochs": epochs,
        "slots": slots,
        "span_s": span,
        "busy_fraction": busy,
        "useful_fraction": useful,
        "overhead_s_per_trial": overhead,
        "mean_trial_s": trial_time,
        "overhead_pct_of_trial": 100 * overhead / trial_time,
        "min_trial_s": min(r["tune_wall"] for r in recs),
        "fixed": fixed,
        "eval": ev,
        "trials_detail": recs,
        "left_running": left,
        "cli_lines": [(round(t - exec_t, 2), line) for t, line in lines],
    }
    print(
        f"\nsearch span (first trial start -> last trial end): {span:.1f} s; mean trial (tune_wall) "
        f"{trial_time:.1f} s, shortest {figures['min_trial_s']:.1f} s"
    )
    idle = idle_split(recs, slots)
    figures["idle"] = idle
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=1, default=str))
    hand = idle["handover_s"]
    if hand:
        print(
            f"slot handover (a trial ends -> the next starts in its slot): mean {statistics.mean(hand):.1f} s "
            f"({', '.join(f'{h:.1f}' for h in hand)})"
        )
    print(
        f"idle slot-seconds: {idle['idle_before_last_start']:.1f} while trials waited to start, "
        f"{idle['idle_drain']:.1f} in the drain after the last start"
    )
    print(f"busy fraction of trial slots: {busy:.3f}")
    print(f"useful fraction (training + evaluation / slot time): {useful:.3f}")
    print(f"overhead per trial: {overhead:.2f} s ({figures['overhead_pct_of_trial']:.1f}% of trial time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
