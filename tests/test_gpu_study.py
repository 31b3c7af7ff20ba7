"""benchmarks/gpu_study.py --quick on the CPU, as a subprocess into temporary directories (its
own COUN_TUNE_CACHE): the JSON and the Markdown table agree with each other and with numbers
recomputed here from the JSON's per-split values (means, sample stds, gaps to each split's own
oracle, the paired plug-in effect with its t interval); and an original that does not
memorize (noise images in Fashion-MNIST's IDX format) stops the study with exit code 3."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_study.py"
VARIANTS = ["FT", "CoUn", "NegGrad+", "NegGrad+ +CL"]
METHOD = {"FT": "ft", "CoUn": "coun", "NegGrad+": "neggrad_plus", "NegGrad+ +CL": "neggrad_plus"}
GAP_OF = {"retain_gap": "retain_acc", "forget_gap": "unlearn_acc", "test_gap": "test_acc", "mia_gap": "mia_efficacy"}
COLUMNS = {"RA": "retain_acc", "UA": "unlearn_acc", "TA": "test_acc", "MIA": "mia_efficacy", "Avg. Gap": "avg_gap"}
T_975_DF2 = 4.302652729911275  # Student t, two-sided 95%, 2 degrees of freedom (tables)


def run_study(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COUN_TUNE_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out-dir", str(tmp / "out"), *args],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_study")
    proc = run_study(tmp, "--dataset", "digits", "--workers", "2")  # the worker processes a GPU run uses
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp / "out" / "gpu_study.json").read_text())
    md = (tmp / "out" / "gpu_study.md").read_text()
    return doc, md, proc.stderr


def md_table(md: str) -> dict[str, dict[str, str]]:
    """The main table's cells: {row label: {column header: cell}}."""
    lines = [ln for ln in md.splitlines() if ln.startswith("| model |")]
    assert len(lines) == 1, md
    start = md.splitlines().index(lines[0])
    body = md.splitlines()[start:]
    headers = [c.strip() for c in body[0].strip("|").split("|")]
    out = {}
    for ln in body[2:]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        out[cells[0]] = dict(zip(headers[1:], cells[1:]))
    return out


def test_the_memorization_check_ran_first_and_passed(study):
    doc, md, log = study
    check = doc["check"]
    assert check["passed"] and check["train_acc_augmented"] >= 99.0 and check["min_train_acc"] == 99.0
    assert log.index("memorization check") < log.index("split 1 FT")  # before any unlearning
    assert f"{check['train_acc_augmented']:.2f}% with one crop+flip draw" in md and "**passed**" in md


def test_the_variants_configs_and_splits(study):
    doc, _, _ = study
    assert doc["quick"] is True and doc["split_seeds"] == [1, 2, 3] and doc["workers"] == 2
    assert doc["scenario"]["arch"] == "small_cnn" and doc["scenario"]["recipe"] == "tiny"
    assert list(doc["rows"]) == VARIANTS and list(doc["reference"]) == ["Oracle", "Original"]
    cfg = doc["configs"]
    assert {k: c["method"] for k, c in cfg.items()} == METHOD
    for label, c in cfg.items():  # same lr and epochs for all; the plug-in on exactly where named
        assert c["hparams"]["lr"] == 0.05 and c["hparams"]["epochs"] == 2
        assert c["hparams"]["cl_weight"] == (1.0 if label in ("CoUn", "NegGrad+ +CL") else 0.0)
    assert cfg["NegGrad+"]["hparams"]["neggrad_beta"] == cfg["NegGrad+ +CL"]["hparams"]["neggrad_beta"] == 0.999
    for row in [*doc["rows"].values(), *doc["reference"].values()]:
        assert [r["split_seed"] for r in row["per_split"]] == [1, 2, 3]


def test_each_split_is_measured_against_its_own_oracle(study):
    """Every gap, recomputed here from the unlearned model's and that split's oracle's metrics."""
    doc, _, _ = study
    oracles = doc["reference"]["Oracle"]["per_split"]
    assert len({json.dumps({k: o[k] for k in GAP_OF.values()}) for o in oracles}) == 3  # three oracles
    for label in [*VARIANTS, "Original"]:
        rows = (doc["rows"].get(label) or doc["reference"][label])["per_split"]
        for r, o in zip(rows, oracles):
            for gap, metric in GAP_OF.items():
                assert r[gap] == pytest.approx(abs(r[metric] - o[metric]), abs=1e-9), (label, gap)
            assert r["avg_gap"] == pytest.approx(sum(r[g] for g in GAP_OF) / 4, abs=1e-9)
            assert r["unlearn_acc"] == pytest.approx(100.0 - r["forget_acc"], abs=1e-9)


def test_the_summaries_and_the_markdown_agree_with_the_per_split_values(study):
    doc, md, _ = study
    table = md_table(md)
    assert list(table) == ["Oracle", "Original", *VARIANTS]
    for label in table:
        row = doc["rows"].get(label) or doc["reference"][label]
        for header, key in COLUMNS.items():
            values = [r[key] for r in row["per_split"]]
            mean = sum(values) / 3
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)  # sample std, by hand
            assert row["summary"][key]["mean"] == pytest.approx(mean, abs=1e-9)
            assert row["summary"][key]["std"] == pytest.approx(std, abs=1e-9)
            assert table[label][header] == f"{mean:.2f} ± {std:.2f}", (label, header)


def test_the_plugin_effect_is_paired_over_the_same_splits(study):
    doc, md, _ = study
    for without, with_ in (("FT", "CoUn"), ("NegGrad+", "NegGrad+ +CL")):
        d = [
            b["avg_gap"] - a["avg_gap"]
            for a, b in zip(doc["rows"][without]["per_split"], doc["rows"][with_]["per_split"])
        ]
        mean = sum(d) / 3
        half = T_975_DF2 * float(np.std(d, ddof=1)) / math.sqrt(3)
        p = doc["plugin_effect"][f"{with_} - {without}"]
        assert p["mean"] == pytest.approx(mean, abs=1e-9)
        assert (p["lo"], p["hi"]) == pytest.approx((mean - half, mean + half), abs=1e-9)
        reading = "no difference detected at this budget" if p["lo"] <= 0 <= p["hi"] else "the plug-in is"
        assert f"| {with_} - {without} | {mean:.2f} | [{mean - half:.2f}, {mean + half:.2f}] | {reading}" in md


def test_the_full_configs_are_ones_the_engine_accepts():
    """The documented GPU configs (10 epochs) resolve without a usage error, and differ only in
    the method and the plug-in."""
    from coun_tune.core.engine import resolve_hparams

    spec = importlib.util.spec_from_file_location("gpu_study", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    resolved = {label: resolve_hparams(method, hp) for label, method, hp in mod.CONFIGS}
    assert list(resolved) == VARIANTS
    assert {(r["lr"], r["epochs"]) for r in resolved.values()} == {(0.05, 10)}
    assert {label: r["cl_weight"] for label, r in resolved.items()} == {
        "FT": 0.0,
        "CoUn": 1.0,
        "NegGrad+": 0.0,
        "NegGrad+ +CL": 1.0,
    }


def _write_noise_fashion_mnist(root: Path, n_train: int = 40, n_test: int = 20) -> None:
    """Fashion-MNIST's IDX files (big-endian headers, as tests/test_datasets_files.py writes
    them) holding uniform noise with random labels: nothing a model can learn in 8 steps."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    root.mkdir(parents=True)
    for name, a in arrays.items():
        header = struct.pack(">I", 0x00000800 | a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
        (root / name).write_bytes(header + a.tobytes())


def test_an_original_that_does_not_memorize_stops_the_study(tmp_path):
    data = tmp_path / "fmnist"
    _write_noise_fashion_mnist(data)
    proc = run_study(tmp_path, "--dataset", "fashion_mnist", "--data-root", str(data))
    assert proc.returncode == 3, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "gpu_study.json").read_text())
    assert doc["check"]["passed"] is False and doc["check"]["train_acc_augmented"] < 99.0
    assert "rows" not in doc and doc["scenario"]["dataset"] == "fashion_mnist"
    md = (tmp_path / "out" / "gpu_study.md").read_text()
    assert "**FAILED**" in md and "no comparison was run" in md and "| model |" not in md
    assert "split 1 FT" not in proc.stderr  # nothing was unlearned
