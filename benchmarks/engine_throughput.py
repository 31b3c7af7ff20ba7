"""CoUn retain-training throughput: the engine against the loop it replaced, and against the usual DataLoader loop.

Part 1, no regression: `run_unlearning` itself (method coun, FastPath defaults: on a CPU every
fast-path option off) against `legacy_unlearning` below, a faithful copy of the engine's
training loop as it was before the fast path and the epoch-plan restructuring (commit f2efb8c:
shuffled retain batches, view 1, CE, view 2, contrastive term, a per-step isfinite check,
SGD + cosine step). Both time each epoch's training the engine's way (wall_seconds; the
engine's evaluation is stubbed out, it is not training and its MIA needs scikit-learn); runs
alternate so load bursts hit both; the ratio is median legacy epoch / median engine epoch
(>= 1: no regression). On a CPU the two must also end with identical weights (printed).
On CUDA the engine's defaults are channels_last + bf16, so there the ratio is the speed-up.

Part 2, against a DataLoader:

What is timed (images/second of retain training, evaluation excluded): one CoUn step =
two augmented views of a batch, features of both, CE(classifier(z1), y) + cl_weight *
contrastive_loss(z1, z2, tau), backward, SGD (momentum 0.9, wd 5e-4) + cosine lr step.

  (a) engine:    images live on the device as uint8; `shuffled_batches` gives index batches and
                 `Augmenter` makes both views with batched tensor ops - the inner loop of
                 `coun_tune.core.engine.run_unlearning`, reproduced step for step (incl. its
                 per-step isfinite check) without the epoch-end evaluation.
  (b) reference: what most unlearning codebases do: a torch `Dataset` over the same uint8 images
                 that returns two views through per-sample PIL transforms (RandomCrop(padding) ->
                 RandomHorizontalFlip -> ToTensor -> Normalize, applied twice), a
                 `DataLoader(shuffle=True, num_workers=w, persistent_workers=False)` for w in 0, 1, 2
                 (--workers changes the list), and a plain loop with the same loss and model.
                 The best w is the reference.

Why: to check the engine's premise that dropping PIL/DataLoader/workers costs nothing on a CPU and
pays on a GPU, where per-sample PIL work, collation and host copies can starve the model (how much
depends on the worker count the box affords: try --workers 0,2,4,8 on a many-core GPU host).
Both sides use the same seeded synthetic uint8 data (formats do not matter for throughput), the
same initial weights, batch size, warm-up and timed step count. Timing covers whole steps with
time.perf_counter: on CUDA images / total time (synchronised at both ends); on CPU images per
step / median step time, robust to other jobs' bursts on a shared box. Warm-up and timed steps
lie inside one epoch (the synthetic set has at least batch x (warm-up + timed) images): worker
start-up falls in the warm-up, as on real datasets, where its per-epoch cost is spread over
hundreds of steps. On a 2-core CPU the rows are a few steps each: indicative only, and
meaningless while other jobs load the box (the script warns when the load average exceeds the
core count).

Usage:  python benchmarks/engine_throughput.py [--quick] [--device cpu|cuda] [--threads N] [--amp]
                                              [--workers 0,1,2] [--only regression|dataloader]
The last lines printed are `no-regression ratio: X` (part 1, small CNN) and `ratio: X` = engine /
best-reference img/s for the small CNN at 28x28 (part 2).
Needs torch + torchvision only (run from the source tree with PYTHONPATH=. on a bare GPU box).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the source tree

# Idle OpenMP threads sleep instead of spinning (read once, when torch loads OpenMP): on a small
# shared CPU, spinning threads made steps up to 10x slower. No effect on GPU kernels.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from coun_tune.core import engine as engine_module
from coun_tune.core.batching import Augmenter, DeviceSplit, shuffled_batches, steps_per_epoch
from coun_tune.core.datasets import AugmentPolicy
from coun_tune.core.losses import contrastive_loss
from coun_tune.core.models import ResNet18, SmallCNN, count_forward_macs

LR, MOMENTUM, WEIGHT_DECAY, FINAL_LR = 0.05, 0.9, 5e-4, 1e-4  # the engine's recipe
CL_WEIGHT, TAU, MIN_IMAGES, SEED = 1.0, 0.1, 4096, 0

# name, model factory, (C, H, W), augmentation; (batch, warm-up steps, timed steps) on cpu / cuda / --quick
CONFIGS = [
    dict(
        name="small_cnn 28x28",
        key="small_cnn",
        model=lambda: SmallCNN(1, 10),
        shape=(1, 28, 28),
        policy=AugmentPolicy(crop_padding=2, flip=True, mean=(0.286,), std=(0.353,)),
        cpu=(256, 2, 8),
        cuda=(256, 10, 200),
        quick=(256, 1, 4),
        # part 1: (batch, retain images, epochs per run, runs of each loop)
        regression=dict(cpu=(256, 2048, 4, 3), cuda=(256, 25600, 3, 2), quick=(64, 128, 2, 1)),
    ),
    dict(
        name="resnet18 32x32",
        key="resnet18",
        model=lambda: ResNet18(3, 10),
        shape=(3, 32, 32),
        policy=AugmentPolicy(crop_padding=4, flip=True, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
        cpu=(16, 1, 3),
        cuda=(128, 5, 64),
        quick=(16, 1, 1),
        regression=dict(cpu=(16, 64, 3, 2), cuda=(256, 12800, 3, 2), quick=(8, 16, 2, 1)),
    ),
]
REGRESSION_HP = {"epochs": 1, "lr": LR, "cl_weight": CL_WEIGHT, "temperature": TAU}  # epochs set per config


def legacy_unlearning(model, original, scenario, hp: dict, batch_size: int, seed: int) -> list[float]:
    """The engine's training loop before the fast path (commit f2efb8c), for method coun,
    without its evaluation: returns each epoch's training seconds, timed as the engine does."""
    device = scenario.retain.x.device
    epochs, cl_weight, tau = hp["epochs"], hp["cl_weight"], hp["temperature"]
    steps = steps_per_epoch(len(scenario.retain), batch_size)
    generator = torch.Generator(device=device).manual_seed(seed)
    original = copy.deepcopy(original).eval().requires_grad_(False)  # as the old loop did (teachers, masks)
    optimizer = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps, eta_min=FINAL_LR)
    count_forward_macs(model, scenario.image_shape)  # its FLOPs count, before the first epoch
    seconds = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        model.train()
        for step_i, idx in enumerate(shuffled_batches(len(scenario.retain), batch_size, generator, device)):
            x, y = scenario.retain.x[idx], scenario.retain.y[idx]
            x1 = scenario.augmenter(x, generator)  # step_loss as it was: view 1, CE (FT's loss), view 2, L_CL
            z1 = model.features(x1)
            loss = F.cross_entropy(model.classifier(z1), y)
            if cl_weight > 0:
                z2 = model.features(scenario.augmenter(x, generator))
                loss = loss + cl_weight * contrastive_loss(z1, z2, tau)
            if not torch.isfinite(loss):
                raise RuntimeError(f"loss is {loss.item()} at epoch {epoch + 1}, step {step_i + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        sync(device)
        seconds.append(time.perf_counter() - t0)
        float(loss.item())  # the epoch's reported loss
    return seconds


def engine_unlearning(model, original, scenario, hp: dict, batch_size: int, seed: int) -> list[float]:
    """`run_unlearning` with its defaults (evaluation stubbed out): each epoch's wall_seconds."""
    walls: list[float] = []
    saved = engine_module.evaluate_scenario
    engine_module.evaluate_scenario = lambda *a, **k: {}
    try:
        engine_module.run_unlearning(
            model,
            original,
            scenario,
            "coun",
            hp,
            batch_size=batch_size,
            seed=seed,
            on_epoch=lambda e, m, _ckpt: walls.append(m["wall_seconds"]),
        )
    finally:
        engine_module.evaluate_scenario = saved
    return [walls[0]] + [b - a for a, b in zip(walls, walls[1:])]


def bench_regression(cfg, device: torch.device, quick: bool) -> tuple[float, float, float, bool]:
    """Part 1: (engine img/s, legacy img/s, legacy / engine median epoch time, identical weights)."""
    batch, n, epochs, runs = cfg["regression"]["quick" if quick else device.type]
    rng = np.random.default_rng(SEED)
    x = torch.from_numpy(rng.integers(0, 256, size=(n + 8, *cfg["shape"]), dtype=np.uint8)).to(device)
    y = torch.from_numpy(rng.integers(0, 10, size=n + 8).astype(np.int64)).to(device)
    split = DeviceSplit(x[:n], y[:n])
    scen = engine_module.ScenarioData(
        retain=split,
        forget=DeviceSplit(x[n:], y[n:]),
        test=DeviceSplit(x[n:], y[n:]),
        augmenter=Augmenter(cfg["policy"], device),
        num_classes=10,
        image_shape=cfg["shape"],
        split_hash="benchmark",
    )
    hp = {**REGRESSION_HP, "epochs": epochs}
    torch.manual_seed(SEED)
    init = cfg["model"]().to(device)
    times = {"engine": [], "legacy": []}
    finals = {}
    for r in range(runs):
        for name, loop in (
            (("engine", engine_unlearning), ("legacy", legacy_unlearning))
            if r % 2 == 0
            else (("legacy", legacy_unlearning), ("engine", engine_unlearning))
        ):
            model = copy.deepcopy(init).train()
            seconds = loop(model, init, scen, hp, batch, SEED)
            times[name] += seconds[1:] if len(seconds) > 1 else seconds  # the first epoch warms up
            finals[name] = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    identical = all(torch.equal(finals["engine"][k], finals["legacy"][k]) for k in finals["legacy"])
    eng, leg = float(np.median(times["engine"])), float(np.median(times["legacy"]))
    return n / eng, n / leg, leg / eng, identical


class TwoViewDataset(torch.utils.data.Dataset):
    """The reference pipeline: HWC uint8 array -> PIL image -> two independent transform draws."""

    def __init__(self, x_nchw: np.ndarray, y: np.ndarray, policy: AugmentPolicy):
        self.x = np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1))  # stored HWC, as torchvision's CIFAR10 does
        self.y = y
        self.transform = transforms.Compose(
            [
                transforms.RandomCrop(self.x.shape[1], padding=policy.crop_padding),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(policy.mean, policy.std),
            ]
        )

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        img = self.x[i]
        img = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
        return self.transform(img), self.transform(img), int(self.y[i])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(step, batches, warmup: int, steps: int, device: torch.device) -> float:
    """Images/second over `steps` steps after `warmup`; `batches` is an endless iterator.

    CUDA: images / total time (steps run asynchronously; synchronised at both ends only).
    CPU: images per step / median step time. Each step (fetching its batch included) is
    synchronous there, and the median shrugs off bursts of other jobs on a shared box.
    """
    for _ in range(warmup):
        step(*next(batches))
    sync(device)
    times, images = [], []
    t0 = time.perf_counter()
    for _ in range(steps):
        images.append(step(*next(batches)))
        times.append(time.perf_counter())
    sync(device)
    if device.type == "cuda":
        return sum(images) / (time.perf_counter() - t0)
    durations = np.diff([t0] + times)
    return float(np.median(images) / np.median(durations))


def make_training(init_state: dict, model_fn, device: torch.device, total_steps: int):
    torch.manual_seed(SEED)
    model = model_fn().to(device)
    model.load_state_dict(copy.deepcopy(init_state))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps, eta_min=FINAL_LR)
    return model, opt, sched


def bench_engine(cfg, x_u8, y, init_state, device, batch, warmup, steps, amp: bool) -> float:
    """(a): the inner loop of run_unlearning with method CoUn (CE + the CL plug-in)."""
    model, opt, sched = make_training(init_state, cfg["model"], device, warmup + steps)
    X, Y = torch.from_numpy(x_u8).to(device), torch.from_numpy(y).to(device)
    augmenter = Augmenter(cfg["policy"], device)
    generator = torch.Generator(device=device).manual_seed(SEED)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else contextlib.nullcontext

    def step(idx: torch.Tensor) -> int:
        x, yb = X[idx], Y[idx]
        with autocast():
            x1 = augmenter(x, generator)
            z1 = model.features(x1)
            loss = F.cross_entropy(model.classifier(z1), yb)
            z2 = model.features(augmenter(x, generator))
            loss = loss + CL_WEIGHT * contrastive_loss(z1, z2, TAU)
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss is {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return idx.numel()

    def batches():
        while True:
            for idx in shuffled_batches(len(Y), batch, generator, device):
                yield (idx,)

    return measure(step, batches(), warmup, steps, device)


def bench_reference(cfg, x_u8, y, init_state, device, batch, warmup, steps, workers: int) -> float:
    """(b): Dataset with per-sample PIL transforms + DataLoader + plain loop."""
    model, opt, sched = make_training(init_state, cfg["model"], device, warmup + steps)
    loader = torch.utils.data.DataLoader(
        TwoViewDataset(x_u8, y, cfg["policy"]),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        persistent_workers=False,
        pin_memory=device.type == "cuda",
    )

    def step(x1: torch.Tensor, x2: torch.Tensor, yb: torch.Tensor) -> int:
        x1, x2, yb = (t.to(device, non_blocking=True) for t in (x1, x2, yb))
        z1 = model.features(x1)
        loss = F.cross_entropy(model.classifier(z1), yb)
        z2 = model.features(x2)
        loss = loss + CL_WEIGHT * contrastive_loss(z1, z2, TAU)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return yb.shape[0]

    def batches():
        while True:
            yield from loader  # a fresh iterator (and fresh workers) every epoch

    it = batches()
    try:
        return measure(step, it, warmup, steps, device)
    finally:
        it.close()  # shut the workers down before the next measurement


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few steps: a smoke test, not a measurement")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--amp", action="store_true", help="CUDA only: also time the engine under bf16 autocast")
    ap.add_argument("--workers", default="0,1,2", help="DataLoader num_workers values for the reference")
    ap.add_argument("--only", choices=["regression", "dataloader"], help="run one part only")
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    heavy = sorted({m.split(".")[0] for m in sys.modules} & {"sklearn", "ray", "optuna", "mlflow", "pyarrow"})
    if heavy:
        print(f"warning: importing coun_tune.core pulled in {', '.join(heavy)}")
    print(
        f"device {device} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
        f"synthetic uint8 images | cl_weight {CL_WEIGHT}, tau {TAU}"
    )
    if device.type == "cpu" and hasattr(os, "getloadavg") and os.getloadavg()[0] > os.cpu_count():
        print(
            f"warning: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: other jobs skew these numbers"
        )
    t_start, regression = time.perf_counter(), {}
    if args.only != "dataloader":
        print("part 1: the engine (FastPath defaults) vs the pre-change loop, images/s from median epoch times")
        print(f"{'config':<16} {'engine':>8} {'legacy':>8} {'ratio':>6}  identical weights")
        for cfg in CONFIGS:
            eng, leg, ratio, identical = bench_regression(cfg, device, args.quick)
            regression[cfg["key"]] = ratio
            print(f"{cfg['name']:<16} {eng:>8.1f} {leg:>8.1f} {ratio:>6.2f}  {identical}", flush=True)
        if args.only == "regression":
            print(f"total wall time {time.perf_counter() - t_start:.1f} s")
            print(f"resnet18 no-regression ratio: {regression['resnet18']:.2f}")
            print(f"no-regression ratio: {regression['small_cnn']:.2f}")
            return
        print("part 2: the engine's step vs a DataLoader + PIL loop")
    refs_head = " ".join(f"{f'ref w={w}':>8}" for w in workers)
    head = f"{'config':<16} {'batch':>5} {'steps':>5} {'engine':>8} {refs_head} {'best ref':>8} {'ratio':>6}"
    stat = "images / total time" if device.type == "cuda" else "batch / median step time"
    print(f"{head}   (img/s = {stat})")
    ratios, amp_lines = {}, []
    for cfg in CONFIGS:
        batch, warmup, steps = cfg["quick"] if args.quick else cfg["cuda" if device.type == "cuda" else "cpu"]
        n_images = max(MIN_IMAGES, batch * (warmup + steps))  # the measurement stays in one epoch
        rng = np.random.default_rng(SEED)
        x_u8 = rng.integers(0, 256, size=(n_images, *cfg["shape"]), dtype=np.uint8)
        y = rng.integers(0, 10, size=n_images).astype(np.int64)
        torch.manual_seed(SEED)
        init_state = {k: v.clone() for k, v in cfg["model"]().state_dict().items()}
        common = (cfg, x_u8, y, init_state, device, batch, warmup, steps)
        engine = bench_engine(*common, amp=False)
        refs = [bench_reference(*common, workers=w) for w in workers]
        best = max(refs)
        ratios[cfg["key"]] = engine / best
        print(
            f"{cfg['name']:<16} {batch:>5} {steps:>5} {engine:>8.1f} "
            + " ".join(f"{r:>8.1f}" for r in refs)
            + f" {best:>8.1f} {engine / best:>6.2f}",
            flush=True,
        )
        if args.amp and device.type == "cuda":
            amp = bench_engine(*common, amp=True)
            amp_lines.append(f"{cfg['key']} engine bf16 autocast: {amp:.1f} img/s ({amp / best:.2f}x best reference)")
    for line in amp_lines:
        print(line)
    if args.amp and device.type != "cuda":
        print("--amp ignored: bf16 autocast is timed on CUDA only")
    load = f", load average now {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"total wall time {time.perf_counter() - t_start:.1f} s{load}")
    for key, r in regression.items():
        print(f"{'' if key == 'small_cnn' else key + ' '}no-regression ratio: {r:.2f}")
    print(f"resnet18 ratio: {ratios['resnet18']:.2f}")
    print(f"ratio: {ratios['small_cnn']:.2f}")


if __name__ == "__main__":
    main()
