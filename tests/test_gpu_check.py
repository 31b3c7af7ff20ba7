"""benchmarks/gpu_check.py --quick on CPU, in a subprocess that cannot import Ray, Optuna,
MLflow or scikit-learn (a sitecustomize on PYTHONPATH blocks them in the script and in the
trial processes it starts), as on a bare GPU box with only torch and torchvision."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("ray", "optuna", "mlflow", "sklearn")
# Importing a blocked module raises ModuleNotFoundError; find_spec gives a spec without an origin
# (torch._dynamo probes optional packages with find_spec and must not fail on the probe).
BLOCKER = f"""
import importlib.abc, importlib.machinery, sys
class _Block(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ModuleNotFoundError("blocked on a bare GPU box: " + spec.name, name=spec.name)
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, _Block())
"""


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_gpu_check_quick_on_cpu(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)
    probe = subprocess.run(
        [sys.executable, "-c", "import sklearn"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")),
    )
    assert probe.returncode != 0 and "blocked on a bare GPU box" in probe.stderr  # the blocker works
    out = tmp_path / "results.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(ROOT)]), CUDA_VISIBLE_DEVICES="")
    run = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--quick", "--device", "cpu", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    res = json.loads(out.read_text())

    assert res["device"]["type"] == "cpu" and res["device"]["peak_bf16_flops"] is None
    assert res["config"]["quick"] is True and _positive(res["config"]["flops_per_image"])
    assert res["config"]["flops_per_image"] == 12 * res["config"]["macs_per_forward"]

    names = [r["name"] for r in res["settings"]]
    assert names == ["fp32 baseline", "channels_last+bf16", "+fused views", "+compile", "+fused+compile"]
    for r in res["settings"]:
        assert "error" not in r, r
        if r["compile"]:  # minutes of C++ compilation on a small CPU; tests/test_fastpath.py compiles
            assert "--cpu-compile" in r["skipped"] and "epoch_seconds" not in r
            continue
        assert "skipped" not in r, r
        assert _positive(r["epoch_seconds"]) and _positive(r["first_epoch_seconds"])
        assert r["images_per_s"] == res["config"]["n_retain"] / r["epoch_seconds"]
        assert r["mfu"] is None  # no GPU: no peak
    assert res["settings"][0]["speedup_vs_baseline"] == 1.0
    assert [r["compile"] for r in res["settings"]] == [False, False, False, True, True]
    assert [r["fused_views"] for r in res["settings"]] == [False, False, True, False, True]

    d = res["dataloader"]
    assert set(d["per_workers_images_per_s"]) == {"0", "2"}
    assert all(_positive(v) for v in d["per_workers_images_per_s"].values())
    assert d["best_images_per_s"] == max(d["per_workers_images_per_s"].values())
    assert d["per_workers_images_per_s"][str(d["best_workers"])] == d["best_images_per_s"]

    conc = res["concurrency"]
    assert [r["procs"] for r in conc] == [1, 2]
    for r in conc:
        assert "error" not in r and "skipped" not in r, r
        assert _positive(r["aggregate_images_per_s"]) and len(r["per_process_images_per_s"]) == r["procs"]
        assert all(_positive(v) for v in r["per_process_images_per_s"])
        assert r["heavy_modules"] == []
    assert conc[0]["speedup_vs_1"] == 1.0

    s = res["summary"]
    assert s["heavy_modules_loaded"] == []
    assert _positive(s["default_epoch_seconds"]) and s["target_epoch_seconds"] == 3.0 and s["target_met"] is None
    assert s["fastest_epoch_seconds"] == min(r["epoch_seconds"] for r in res["settings"] if "epoch_seconds" in r)
    assert "channels_last+bf16" in run.stdout and f"wrote {out}" in run.stdout  # the printed table
