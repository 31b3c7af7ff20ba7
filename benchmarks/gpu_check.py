"""GPU check: one CoUn epoch of CIFAR-10-sized data on ResNet-18, per fast-path setting, in one run.

    PYTHONPATH=. python benchmarks/gpu_check.py --out results.json          # a GPU box, < 8 min on an H100
    PYTHONPATH=. python benchmarks/gpu_check.py --quick --out results.json  # any CPU, tiny sizes, ~1 min

Needs torch and torchvision only (no scikit-learn, Ray, Optuna or MLflow): runs from the source
tree on a bare box. Writes one JSON file and prints a table.

What it measures, all on synthetic CIFAR-10-sized data (uint8 50k x 3x32x32, 10 classes; 45k
retain, 5k forget) and coun_tune's ResNet-18 (CIFAR stem), batch 256, CoUn (CE + CL, two views):
1. settings: the engine itself (`run_unlearning`, evaluation stubbed out: its SVC MIA needs
   scikit-learn, and evaluation is not unlearning cost; the engine's wall_seconds excludes it
   anyway) for two epochs; the second is timed (the first warms up cuDNN autotuning and
   torch.compile). Rows: fp32 baseline (the engine as it was: per-step NaN check, no cuDNN
   autotuning), channels_last + bf16 (the CUDA default: also one NaN check per epoch, cuDNN
   autotuning), + fused views, + compile, + fused views + compile. Seconds per
   epoch, images/s, model FLOPs utilisation = 12 x MACs (FLOPs = 2 x MACs; forward + backward
   = 3 forwards; two views) x images/s / the GPU's dense bf16 peak (table below; every row,
   fp32 included, is measured against the bf16 peak).
2. dataloader: the usual pipeline at its best of 0, 4, 8, 16 workers: a torchvision Dataset
   over the same uint8 arrays, per-sample PIL RandomCrop(32, 4) + RandomHorizontalFlip +
   ToTensor + Normalize applied twice, DataLoader(shuffle) and the same model, loss and compute
   setting as the CUDA default (channels_last + bf16): the difference is the data path only.
   Timed over a fixed number of steps after a warm-up (worker start-up falls in the warm-up).
3. concurrency: 1, 2, 4 trial processes sharing the GPU, each running the engine (CUDA
   default setting) on its own copy of the data; they start their timed epoch together (a
   file barrier) and the aggregate images/s is all their images / (last end - first start).
   This is what a fractional `resources_per_trial.gpu` (0.5 in the CIFAR specs) buys.
A time budget (--budget-s) skips what would not fit, and says so in the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the source tree, also without PYTHONPATH

# Idle OpenMP threads sleep instead of spinning (read once, when torch loads OpenMP): on a small
# shared CPU, spinning threads made steps up to 10x slower. No effect on GPU kernels.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from coun_tune.core import engine  # noqa: E402
from coun_tune.core.batching import Augmenter, DeviceSplit  # noqa: E402
from coun_tune.core.datasets import AugmentPolicy  # noqa: E402
from coun_tune.core.fastpath import FastPath  # noqa: E402
from coun_tune.core.losses import contrastive_loss  # noqa: E402
from coun_tune.core.models import build_model, count_forward_macs  # noqa: E402

CIFAR_POLICY = AugmentPolicy(crop_padding=4, flip=True, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
HPARAMS = {"epochs": 2, "lr": 0.05, "cl_weight": 1.0, "temperature": 0.1}
HEAVY = ("ray", "optuna", "mlflow", "sklearn")
TARGET_EPOCH_S = 3.0  # issue 8: a CIFAR-10 ResNet-18 CoUn epoch in at most 3 s on an H100

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets, matched
# against torch.cuda.get_device_name() in this order (first match wins).
PEAK_BF16_TFLOPS = (
    ("H200 NVL", 835.0),
    ("H200", 989.4),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
)

SETTINGS = (  # name, FastPath; every field explicit, so the CPU quick run takes the same paths
    ("fp32 baseline", FastPath(channels_last=False, bf16_autocast=False, check_every=1, cudnn_benchmark=False)),
    ("channels_last+bf16", FastPath(channels_last=True, bf16_autocast=True, check_every=0, cudnn_benchmark=True)),
    (
        "+fused views",
        FastPath(channels_last=True, bf16_autocast=True, fused_views=True, check_every=0, cudnn_benchmark=True),
    ),
    ("+compile", FastPath(channels_last=True, bf16_autocast=True, compile=True, check_every=0, cudnn_benchmark=True)),
    (
        "+fused+compile",
        FastPath(
            channels_last=True, bf16_autocast=True, fused_views=True, compile=True, check_every=0, cudnn_benchmark=True
        ),
    ),
)
DEFAULT_CUDA = SETTINGS[1][1]  # what FastPath() resolves to on a CUDA device


def sizes(quick: bool) -> dict:
    if quick:  # seconds on a CPU: a smoke test of every path, not a measurement
        return dict(
            n_train=80,
            n_retain=48,
            n_test=16,
            batch=16,
            arch="small_cnn",
            ref_warmup=1,
            ref_steps=2,
            workers=[0, 2],
            procs=[1, 2],
            proc_steps=2,
        )
    return dict(
        n_train=50_000,
        n_retain=45_000,
        n_test=1_000,
        batch=256,
        arch="resnet18",
        ref_warmup=10,
        ref_steps=60,
        workers=[0, 4, 8, 16],
        procs=[1, 2, 4],
        proc_steps=80,
    )


def peak_bf16_flops(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "no GPU: no peak, no MFU"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12, f"{name}: dense bf16 {tflops:g} TFLOP/s (data sheet, matched {key!r})"
    return None, f"{name}: not in the peak table, no MFU"


def synthetic(n_train: int, n_test: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n_train + n_test, 3, 32, 32) images and int64 labels in [0, 10)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n_train + n_test, 3, 32, 32), dtype=np.uint8)
    return x, rng.integers(0, 10, size=n_train + n_test).astype(np.int64)


def scenario_on(device: torch.device, x: np.ndarray, y: np.ndarray, n_retain: int, n_train: int) -> engine.ScenarioData:
    def put(a: slice) -> DeviceSplit:
        return DeviceSplit(torch.from_numpy(x[a]).to(device), torch.from_numpy(y[a]).to(device))

    return engine.ScenarioData(
        retain=put(slice(0, n_retain)),
        forget=put(slice(n_retain, n_train)),
        test=put(slice(n_train, None)),
        augmenter=Augmenter(CIFAR_POLICY, device),
        num_classes=10,
        image_shape=(3, 32, 32),
        split_hash="synthetic",
    )


@contextlib.contextmanager
def no_evaluation():
    """Each epoch's evaluation returns {} (see the module docstring)."""
    saved = engine.evaluate_scenario
    engine.evaluate_scenario = lambda *a, **k: {}
    try:
        yield
    finally:
        engine.evaluate_scenario = saved


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_engine(arch: str, init: dict, scen, fast: FastPath, batch: int, on_epoch=None) -> list[float]:
    """The engine for HPARAMS["epochs"] epochs; returns each epoch's training seconds."""
    device = scen.retain.x.device
    model = build_model(arch, 3, 10).to(device)
    model.load_state_dict(init)
    original = copy.deepcopy(model)
    walls: list[float] = []

    def record(epoch, metrics, _make_checkpoint):
        walls.append(metrics["wall_seconds"])
        if on_epoch is not None:
            on_epoch(epoch)

    with no_evaluation():
        engine.run_unlearning(
            model.train(), original, scen, "coun", HPARAMS, batch_size=batch, seed=0, on_epoch=record, fast_path=fast
        )
    return [walls[0]] + [b - a for a, b in zip(walls, walls[1:])]


def bench_settings(
    arch, init, scen, batch, flops_per_image, peak, deadline, log, skip_compile: str = "", compiled: bool = False
) -> list[dict]:
    """The rows of SETTINGS with compile == `compiled` (compiling rows run last: they are the
    slowest to start and the budget may skip them)."""
    rows = []
    n = len(scen.retain)
    for name, fast in SETTINGS:
        if fast.compile != compiled:
            continue
        row = {
            "name": name,
            **{
                k: getattr(fast, k)
                for k in ("channels_last", "bf16_autocast", "compile", "fused_views", "check_every", "cudnn_benchmark")
            },
        }
        need = 120 if fast.compile else 20
        if fast.compile and skip_compile:
            row["skipped"] = skip_compile
        elif time.monotonic() + need > deadline:
            row["skipped"] = f"time budget (needs ~{need} s more)"
        else:
            try:
                epochs = run_engine(arch, init, scen, fast, batch)
                sec = epochs[-1]
                row.update(
                    first_epoch_seconds=epochs[0],
                    epoch_seconds=sec,
                    images_per_s=n / sec,
                    mfu=(flops_per_image * n / sec / peak) if peak else None,
                )
            except Exception as e:  # one failed setting (e.g. no compiler for torch.compile) must not lose the rest
                row["error"] = f"{type(e).__name__}: {e}"[:500]
        rows.append(row)
        log(f"  {name}: {row.get('epoch_seconds', row.get('skipped', row.get('error')))}")
    return rows


class TwoViewDataset(torch.utils.data.Dataset):
    """The reference pipeline: HWC uint8 -> PIL image -> two independent transform draws."""

    def __init__(self, x_nchw: np.ndarray, y: np.ndarray):
        from torchvision import transforms

        self.x = np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1))  # stored HWC, as torchvision's CIFAR10
        self.y = y
        self.transform = transforms.Compose(
            [
                transforms.RandomCrop(32, padding=CIFAR_POLICY.crop_padding),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(CIFAR_POLICY.mean, CIFAR_POLICY.std),
            ]
        )

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        from PIL import Image

        img = Image.fromarray(self.x[i])
        return self.transform(img), self.transform(img), int(self.y[i])


def bench_dataloader(arch, init, x, y, n_retain, batch, warmup, steps, workers, device, deadline, log) -> dict:
    """Images/s of the DataLoader + PIL loop per worker count (same model, loss, compute setting)."""
    fast = DEFAULT_CUDA
    per: dict[str, float | str] = {}
    ds = TwoViewDataset(x[:n_retain], y[:n_retain])
    for w in workers:
        if time.monotonic() + 30 > deadline:
            per[str(w)] = "skipped: time budget"
            continue
        model = build_model(arch, 3, 10).to(device)
        model.load_state_dict(init)
        fast.prepare(device, model)  # channels_last weights, cuDNN autotuning, as the engine does
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=batch, shuffle=True, num_workers=w, drop_last=True, pin_memory=device.type == "cuda"
        )
        it = iter(loader)
        t0 = 0.0
        for i in range(warmup + steps):
            if i == warmup:
                sync(device)
                t0 = time.perf_counter()
            x1, x2, yb = (t.to(device, non_blocking=True) for t in next(it))
            with fast.autocast(device):
                z1 = model.features(x1)
                loss = F.cross_entropy(model.classifier(z1), yb) + contrastive_loss(z1, model.features(x2), 0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        per[str(w)] = batch * steps / (time.perf_counter() - t0)
        del it  # shuts its workers down
        log(f"  dataloader workers={w}: {per[str(w)]:.0f} img/s")
    measured = {int(k): v for k, v in per.items() if isinstance(v, float)}
    best = max(measured, key=measured.get) if measured else None
    return {
        "per_workers_images_per_s": per,
        "best_workers": best,
        "best_images_per_s": measured.get(best) if best is not None else None,
        "epoch_seconds_at_best": n_retain / measured[best] if best is not None else None,
        "setting": "channels_last+bf16",
        "warmup_steps": warmup,
        "timed_steps": steps,
    }


def worker_main(args) -> None:
    """One concurrent trial process: warm-up epoch, barrier, timed epoch; writes its result."""
    device = torch.device(args.device)
    sz = sizes(args.quick)
    n = args.worker_steps * sz["batch"]
    x, y = synthetic(n + 64, 32, seed=args.worker_index)
    scen = scenario_on(device, x, y, n, n + 64)
    torch.manual_seed(0)
    init = build_model(sz["arch"], 3, 10).state_dict()
    times = {}

    def at_epoch(epoch: int) -> None:
        if epoch == 1:  # warm-up done: wait for everybody, then time epoch 2
            Path(args.ready).write_text("ready")
            limit = time.monotonic() + 600
            while not Path(args.go).exists():
                if time.monotonic() > limit:
                    raise TimeoutError("no go signal")
                time.sleep(0.005)
            times["start"] = time.time()
        else:
            times["end"] = time.time()

    fast = DEFAULT_CUDA if device.type == "cuda" else FastPath()
    epochs = run_engine(sz["arch"], init, scen, fast, sz["batch"], on_epoch=at_epoch)
    heavy = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
    Path(args.result).write_text(json.dumps({"images": n, "epoch_seconds": epochs[-1], **times, "heavy": heavy}))


def bench_concurrency(args, sz, deadline, log) -> list[dict]:
    rows = []
    for k in sz["procs"]:
        if time.monotonic() + 30 + 10 * k > deadline:
            rows.append({"procs": k, "skipped": "time budget"})
            continue
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
            tmp = Path(tmp)
            go = tmp / "go"
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                "--device",
                args.device,
                "--worker-steps",
                str(sz["proc_steps"]),
                "--go",
                str(go),
            ] + (["--quick"] if args.quick else [])
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
            procs = [
                subprocess.Popen(
                    cmd
                    + [
                        "--worker-index",
                        str(i),
                        "--ready",
                        str(tmp / f"ready{i}"),
                        "--result",
                        str(tmp / f"result{i}.json"),
                    ],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                for i in range(k)
            ]
            limit = time.monotonic() + 300
            while not all((tmp / f"ready{i}").exists() for i in range(k)):
                if time.monotonic() > limit or any(p.poll() not in (None, 0) for p in procs):
                    break
                time.sleep(0.01)
            go.write_text("go")
            try:
                wait_s = min(600.0, max(60.0, deadline - time.monotonic() + 60))
                outs = [p.communicate(timeout=wait_s)[0] for p in procs]
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                rows.append({"procs": k, "error": "timed out"})
                continue
            if any(p.returncode != 0 for p in procs):
                rows.append(
                    {
                        "procs": k,
                        "error": "; ".join(
                            o.strip().splitlines()[-1] for o, p in zip(outs, procs) if p.returncode != 0 and o.strip()
                        )[:500],
                    }
                )
                continue
            res = [json.loads((tmp / f"result{i}.json").read_text()) for i in range(k)]
        span = max(r["end"] for r in res) - min(r["start"] for r in res)
        rows.append(
            {
                "procs": k,
                "aggregate_images_per_s": sum(r["images"] for r in res) / span,
                "per_process_images_per_s": [r["images"] / r["epoch_seconds"] for r in res],
                "heavy_modules": sorted({m for r in res for m in r["heavy"]}),
            }
        )
        log(f"  {k} processes: {rows[-1]['aggregate_images_per_s']:.0f} img/s aggregate")
    one = next((r.get("aggregate_images_per_s") for r in rows if r["procs"] == 1), None)
    for r in rows:
        r["speedup_vs_1"] = r["aggregate_images_per_s"] / one if one and "aggregate_images_per_s" in r else None
    return rows


def print_table(out: dict) -> None:
    print(f"\n{out['device']['name']} | torch {out['device']['torch']} | {out['device']['peak_source']}")
    print(
        f"{out['config']['arch']}, {out['config']['n_retain']} retain images, batch {out['config']['batch']}, CoUn "
        f"two views, {out['config']['flops_per_image'] / 1e9:.2f} GFLOP per image-step"
    )
    print(f"{'setting':<20} {'epoch s':>8} {'img/s':>9} {'MFU':>6} {'x base':>7} {'1st epoch s':>11}")
    for r in out["settings"]:
        if "epoch_seconds" not in r:
            print(f"{r['name']:<20} {r.get('skipped') or r.get('error')}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(
            f"{r['name']:<20} {r['epoch_seconds']:>8.2f} {r['images_per_s']:>9.0f} {mfu:>6} "
            f"{r['speedup_vs_baseline']:>7.2f} {r['first_epoch_seconds']:>11.2f}"
        )
    d = out["dataloader"]
    if "error" in d:
        d = {"per_workers_images_per_s": {}, "best_workers": d["error"]}
    per = ", ".join(
        f"w={k}: {v:.0f}" if isinstance(v, float) else f"w={k}: {v}" for k, v in d["per_workers_images_per_s"].items()
    )
    print(f"DataLoader+PIL (channels_last+bf16): {per} img/s; best w={d['best_workers']}")
    for r in out["concurrency"] if isinstance(out["concurrency"], list) else [{"procs": "?", **out["concurrency"]}]:
        if "aggregate_images_per_s" in r:
            print(
                f"{r['procs']} concurrent trial processes: {r['aggregate_images_per_s']:.0f} img/s aggregate "
                f"({r['speedup_vs_1']:.2f}x one)"
            )
        else:
            print(f"{r['procs']} concurrent trial processes: {r.get('skipped') or r.get('error')}")
    for k, v in out["summary"].items():
        print(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_check.json", help="the JSON file to write")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and small_cnn: a smoke test on any CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--budget-s",
        type=float,
        help="skip what would not end within this many seconds (default 450; none with --quick)",
    )
    ap.add_argument(
        "--cpu-compile",
        action="store_true",
        help="with --quick on a CPU, also time torch.compile (minutes of C++ compilation)",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--worker-steps", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--ready", help=argparse.SUPPRESS)
    ap.add_argument("--go", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick and args.device == "cpu":
        torch.set_num_threads(1)  # a smoke test: one thread per process shares a small box best
    if args.worker:
        return worker_main(args)
    t_start = time.monotonic()
    deadline = t_start + (args.budget_s or (float("inf") if args.quick else 450.0))
    device = torch.device(args.device)
    sz = sizes(args.quick)

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f} s] {msg}", flush=True)

    peak, peak_source = peak_bf16_flops(device)
    x, y = synthetic(sz["n_train"], sz["n_test"])
    scen = scenario_on(device, x, y, sz["n_retain"], sz["n_train"])
    torch.manual_seed(0)
    init = build_model(sz["arch"], 3, 10).state_dict()
    macs = count_forward_macs(build_model(sz["arch"], 3, 10), (3, 32, 32))
    flops_per_image = 12 * macs
    out = {
        "device": {
            "name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "type": device.type,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "peak_bf16_flops": peak,
            "peak_source": peak_source,
        },
        "config": {
            "quick": args.quick,
            "arch": sz["arch"],
            "n_train": sz["n_train"],
            "n_retain": sz["n_retain"],
            "batch": sz["batch"],
            "hparams": HPARAMS,
            "macs_per_forward": macs,
            "flops_per_image": flops_per_image,
            "flops_convention": "12 x MACs per retain image: FLOPs = 2 x MACs, forward + backward = 3 "
            "forwards, two views; MFU against the dense bf16 peak for every row",
        },
    }

    def save() -> None:  # after every section: a run cut short still leaves what it measured
        Path(args.out).write_text(json.dumps(out, indent=1))

    def section(name: str, fn):
        log(name)
        try:
            return fn()
        except Exception as e:  # record it and go on: one shot on a lent GPU must bring back the rest
            log(f"  {name} failed: {type(e).__name__}: {e}")
            return {"error": f"{type(e).__name__}: {e}"[:500]}

    skip_compile = (
        "--quick on a CPU: inductor's C++ compilation takes minutes on a small box (--cpu-compile "
        "times it; tests/test_fastpath.py runs the compile option)"
        if args.quick and device.type == "cpu" and not args.cpu_compile
        else ""
    )
    # order: eager settings, the DataLoader reference, concurrency, then the compiling settings
    eager = section(
        f"settings ({sz['arch']}, {sz['n_retain']} retain images)",
        lambda: bench_settings(sz["arch"], init, scen, sz["batch"], flops_per_image, peak, deadline - 240, log),
    )
    out["settings"] = eager if isinstance(eager, list) else []
    save()
    out["dataloader"] = section(
        "dataloader reference",
        lambda: bench_dataloader(
            sz["arch"],
            init,
            x,
            y,
            sz["n_retain"],
            sz["batch"],
            sz["ref_warmup"],
            sz["ref_steps"],
            sz["workers"],
            device,
            deadline - 200,
            log,
        ),
    )
    save()
    out["concurrency"] = section("concurrent trial processes", lambda: bench_concurrency(args, sz, deadline - 150, log))
    save()
    comp = section(
        "compiled settings",
        lambda: bench_settings(
            sz["arch"], init, scen, sz["batch"], flops_per_image, peak, deadline, log, skip_compile, compiled=True
        ),
    )
    out["settings"] += comp if isinstance(comp, list) else [{"name": "compile", "error": comp["error"]}]
    order = [name for name, _ in SETTINGS]
    out["settings"].sort(key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
    base = out["settings"][0].get("images_per_s") if out["settings"] else None
    for r in out["settings"]:
        r["speedup_vs_baseline"] = r["images_per_s"] / base if base and "images_per_s" in r else None
    default = next((r for r in out["settings"] if r["name"] == "channels_last+bf16"), {})
    measured = [r for r in out["settings"] if "epoch_seconds" in r]
    fastest = min(measured, key=lambda r: r["epoch_seconds"]) if measured else None
    out["summary"] = {
        "default_epoch_seconds": default.get("epoch_seconds"),
        "fastest_setting": fastest["name"] if fastest else None,
        "fastest_epoch_seconds": fastest["epoch_seconds"] if fastest else None,
        "target_epoch_seconds": TARGET_EPOCH_S,
        "target_met": (
            bool(fastest and fastest["epoch_seconds"] <= TARGET_EPOCH_S)
            if device.type == "cuda" and not args.quick
            else None
        ),  # a CIFAR-sized GPU run only
        "engine_vs_best_dataloader": (
            default["images_per_s"] / out["dataloader"]["best_images_per_s"]
            if "images_per_s" in default and out["dataloader"].get("best_images_per_s")
            else None
        ),
        "heavy_modules_loaded": sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY)),
        "wall_seconds": time.monotonic() - t_start,
    }
    save()
    print_table(out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
