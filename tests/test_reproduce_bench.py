"""benchmarks/reproduce.py without running a search: the equal budget in every variant's spec,
and claims phrased from the intervals (a CI that spans 0 never becomes an ordering)."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def repro():
    spec = importlib.util.spec_from_file_location("reproduce_bench", ROOT / "benchmarks" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(**kw):
    base = dict(
        trials=16,
        epoch_range=(2, 30),
        calibration_seeds=[0, 1, 2],
        held_out_seeds=[100, 101, 102, 103, 104],
        concurrent=2,
        oracle_seeds=2,
    )
    base.update(kw)
    return SimpleNamespace(**base)


def test_every_variant_gets_the_same_budget(repro, tmp_path):
    base = yaml.safe_load((ROOT / "search_spaces" / "digits_half.yaml").read_text())
    specs = [repro.variant_spec(base, m, cl, _args(), tmp_path) for m, cl in repro.VARIANTS]
    assert len({s["name"] for s in specs}) == len(specs)
    for s in specs:
        assert s["space"]["epochs"] == {"int": [2, 30]}
        assert s["num_samples"] == 16
        assert s["sampler"] == base["sampler"] and s["seed"] == base["seed"]
        assert s["calibration"] == {"split_seeds": [0, 1, 2]}
        assert "holdout" not in s  # the study's held-out splits are the test set; nothing picks on them
        assert s["objectives"] == base["objectives"]
    cl_specs = [s for s, (m, cl) in zip(specs, repro.VARIANTS, strict=True) if cl]
    assert cl_specs and all("cl_weight" in s["space"] and s["space"]["cl_weight"] != 0.0 for s in cl_specs)


def test_parse_seeds(repro):
    assert repro.parse_seeds("100-104") == [100, 101, 102, 103, 104]
    assert repro.parse_seeds("0,5-7") == [0, 5, 6, 7]
    assert repro.parse_seeds("3") == [3]


def _recs(vals, key="avg_gap"):
    return [{"split_seed": 100 + i, key: v, "forget_gap": v} for i, v in enumerate(vals)]


def test_verdict_follows_the_interval(repro):
    # CoUn lower on every split by 1 +- a little: the CI lies below 0
    coun, ft = _recs([0.5, 0.6, 0.4, 0.55, 0.5]), _recs([1.5, 1.7, 1.3, 1.5, 1.6])
    t = repro.paired(coun, ft, "avg_gap")
    assert t.hi < 0
    assert repro.verdict(t, "CoUn", "ft") == "CoUn closer to the oracle"
    assert repro.ordering_status(t) == "held"
    assert repro.ordering_status(repro.paired(ft, coun, "avg_gap")) == "reversed"
    # means differ (0.8 vs 1.0) but the differences change sign: the CI spans 0
    a, b = _recs([0.2, 1.4, 0.3, 1.5, 0.6]), _recs([1.0, 0.9, 1.2, 0.8, 1.1])
    t = repro.paired(a, b, "avg_gap")
    assert t.lo < 0 < t.hi
    assert repro.verdict(t, "CoUn", "x") == "no difference detected at this budget"
    assert repro.ordering_status(t) == "not detected"


def test_paired_uses_the_splits_both_have(repro):
    a = _recs([1.0, 2.0, 3.0])
    b = [{"split_seed": 101, "avg_gap": 1.0}, {"split_seed": 102, "avg_gap": 1.0}, {"split_seed": 999, "avg_gap": 9}]
    t = repro.paired(a, b, "avg_gap")
    # common splits 101, 102: differences 1.0 and 2.0 -> mean 1.5
    assert t.n == 2 and t.mean_diff == pytest.approx(1.5)
    assert repro.paired(a, [{"split_seed": 100, "avg_gap": 0.0}], "avg_gap") is None


def _result(name, vals):
    recs = _recs(vals)
    cal = {"epochs": 10, "lr": 0.05, "avg_gap": 1.0, "forget_gap": 1.0}
    return {
        "name": name,
        "front": [[1.0, 99.0], [0.5, 98.0]],
        "picks": {r: {"calibration": cal} for r in ("knee", "best_avg_gap")},
        "held_out": {"knee": recs, "best_avg_gap": recs},
        "trials_completed": 16,
        "search_seconds": 60.0,
        "wall_seconds": 90.0,
    }


def test_render_states_the_budget_and_both_picks(repro):
    results = {
        "coun": _result("coun", [0.5, 0.6, 0.4, 0.55, 0.5]),
        "ft": _result("ft", [1.5, 1.7, 1.3, 1.5, 1.6]),
        "not": _result("not", [0.2, 1.4, 0.3, 1.5, 0.6]),
    }
    refs = {
        "oracle": _recs([0.0] * 5),
        "original": _recs([1.6, 1.8, 1.7, 1.5, 1.9]),
        "noise": _recs([0.2, 0.3, 0.25, 0.2, 0.3]),
        "num_retain": 700,
        "batch_size": 64,
        "steps_per_epoch": 11,
    }
    base = yaml.safe_load((ROOT / "search_spaces" / "digits_half.yaml").read_text())
    text = repro.render(base, _args(), results, refs, 120.0, ["scrub"], "python benchmarks/reproduce.py")
    assert "11 SGD steps per epoch" in text and "330 at the range's maximum of 30 epochs" in text
    assert "Pick: knee" in text and "Pick: best calibration-mean avg_gap" in text
    assert "**Incomplete**" in text and "scrub" in text
    assert "| ft | " in text and "CoUn closer to the oracle" in text
    assert "| not | " in text and "no difference detected at this budget" in text
    # the paper's ordering coun < not (0.25 vs 0.30) is not detected here; coun < ft held
    assert "| coun < not (paper 0.25 vs 0.30) |" in text
    row = next(line for line in text.splitlines() if line.startswith("| coun < not"))
    assert "not detected" in row and "held" not in row
    row = next(line for line in text.splitlines() if line.startswith("| coun < ft"))
    assert row.count("| held |") == 2
