"""The unlearning engine on one real digits scenario (recipe "tiny", prepared once per session
in conftest.py): FT and CoUn, the forget-data guard, hyperparameter checks, divergence,
exact resume, the base-model cache and FLOPs."""

from __future__ import annotations

import copy
import math
import shutil

import pytest
import torch

from coun_tune.core.batching import DeviceSplit
from coun_tune.core.engine import DivergedError, resolve_hparams
from coun_tune.core.methods import METHODS, ForgetDataAccessError, ForgetGuard
from coun_tune.core.methods.ft import FT, CoUn
from coun_tune.core.pipeline import prepare, unlearn
from coun_tune.errors import UsageError


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def one_epoch_runs(prepared):
    """FT and CoUn, one epoch each, from the same theta_o."""
    before = copy.deepcopy(prepared.base.original.state_dict())
    out = {m: unlearn(prepared, m, {"epochs": 1}) for m in ("ft", "coun")}
    return before, out


# ------------------------------------------------------------------------- FT and CoUn


@pytest.mark.parametrize("method", ["ft", "coun"])
def test_one_epoch_metrics_finite_and_weights_changed(prepared, one_epoch_runs, method):
    before, runs = one_epoch_runs
    model, metrics = runs[method]
    for k in (
        "retain_acc",
        "forget_acc",
        "unlearn_acc",
        "test_acc",
        "mia_efficacy",
        "mia_loss_attack_acc",
        "retain_gap",
        "forget_gap",
        "test_gap",
        "mia_gap",
        "avg_gap",
        "flops",
        "wall_seconds",
        "loss",
    ):
        assert k in metrics and math.isfinite(metrics[k]), k
    for k in ("retain_acc", "forget_acc", "test_acc", "mia_efficacy"):
        assert 0.0 <= metrics[k] <= 100.0
    assert metrics["unlearn_acc"] == pytest.approx(100.0 - metrics["forget_acc"])
    assert metrics["epoch"] == 1
    # one epoch of lr 0.05 from a trained model keeps it a decent classifier
    assert metrics["retain_acc"] > 50.0
    # the weights moved, and theta_o itself was not touched
    assert not all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(v, prepared.base.original.state_dict()[k]) for k, v in before.items())


def test_coun_differs_from_ft(one_epoch_runs):
    _, runs = one_epoch_runs
    assert not _states_equal(runs["ft"][0], runs["coun"][0])


def _rows_one_epoch(prepared) -> int:
    n, b = len(prepared.scen_data.retain), prepared.batch_size
    return n - (1 if n % b == 1 else 0)  # a last batch of one sample is dropped


def test_flops_ft_by_hand(one_epoch_runs, prepared):
    """The paper's convention, (views + 2) forward-equivalents per trained sample: FT (one view)
    3 per retain row, equal to the true work (forward + backward = 3 forwards); FLOPs = 2 x MACs."""
    _, runs = one_epoch_runs
    ft = runs["ft"][1]
    from coun_tune.core.models import count_forward_macs

    macs = count_forward_macs(prepared.base.original, prepared.scen_data.image_shape)
    rows = _rows_one_epoch(prepared)
    assert ft["flops"] == 3 * (2 * macs) * rows
    assert ft["flops_true"] == 3 * (2 * macs) * rows


def test_flops_coun_four_thirds_of_ft(one_epoch_runs, prepared):
    """CoUn (two views) 4 per retain row in the paper's convention, 6 in true work: CoUn/FT is
    4/3 in `flops` and 2 in `flops_true` at equal epochs."""
    _, runs = one_epoch_runs
    ft, coun = runs["ft"][1], runs["coun"][1]
    from coun_tune.core.models import count_forward_macs

    macs = count_forward_macs(prepared.base.original, prepared.scen_data.image_shape)
    rows = _rows_one_epoch(prepared)
    assert coun["flops"] == 4 * (2 * macs) * rows
    assert coun["flops_true"] == 6 * (2 * macs) * rows
    assert coun["flops"] * 3 == ft["flops"] * 4


# ------------------------------------------------------------------------- forget guard


def test_forget_guard_raises_on_any_access():
    g = ForgetGuard("ft")
    with pytest.raises(ForgetDataAccessError):
        g.x
    with pytest.raises(ForgetDataAccessError):
        g.y
    with pytest.raises(ForgetDataAccessError):
        len(g)
    with pytest.raises(ForgetDataAccessError, match="ft"):
        g.anything


class _Stop(Exception):
    """Ends a run right after the engine built the MethodContext (no training needed)."""


def _record_and_stop(seen):
    def prepare(self, ctx):
        seen.append(ctx.forget)
        raise _Stop

    return prepare


@pytest.mark.parametrize("cls", [FT, CoUn])
def test_engine_hands_ft_and_coun_a_guard(prepared, monkeypatch, cls):
    """Run the real method under its own name, with a prepare() that records what the engine
    passed as ctx.forget."""
    assert cls.reads_forget is False
    seen = []
    monkeypatch.setitem(METHODS, cls.name, type(f"Probe{cls.__name__}", (cls,), {"prepare": _record_and_stop(seen)}))
    with pytest.raises(_Stop):
        unlearn(prepared, cls.name, {"epochs": 1})
    assert len(seen) == 1 and isinstance(seen[0], ForgetGuard)
    with pytest.raises(ForgetDataAccessError):
        seen[0].x


class _Peeker(FT):
    """Declares it never reads the forget set, then reads it."""

    name = "peeker"

    def loss(self, ctx, step):
        ctx.forget.x  # noqa: B018
        return super().loss(ctx, step)


def test_reading_forget_without_declaring_it_fails_the_run(prepared, monkeypatch):
    monkeypatch.setitem(METHODS, "peeker", _Peeker)
    with pytest.raises(ForgetDataAccessError):
        unlearn(prepared, "peeker", {"epochs": 1})


def test_declared_reader_gets_the_forget_split(prepared, monkeypatch):
    seen = []
    reader = type("Reader", (FT,), {"name": "reader", "reads_forget": True, "prepare": _record_and_stop(seen)})
    monkeypatch.setitem(METHODS, "reader", reader)
    with pytest.raises(_Stop):
        unlearn(prepared, "reader", {"epochs": 1})
    (forget,) = seen
    assert isinstance(forget, DeviceSplit) and len(forget) == len(prepared.split.forget_idx)


# -------------------------------------------------------------------------- hparams


def test_resolve_hparams_defaults():
    ft, coun = resolve_hparams("ft", {}), resolve_hparams("coun", {})
    assert ft["cl_weight"] == 0.0 and coun["cl_weight"] == 1.0
    assert coun["temperature"] == 0.1 and isinstance(coun["epochs"], int)
    assert resolve_hparams("coun", {"epochs": "3", "lr": "0.02", "cl_weight": None})["epochs"] == 3
    assert resolve_hparams("coun", {"cl_weight": None})["cl_weight"] == 1.0


@pytest.mark.parametrize(
    "method,given",
    [
        ("coun", {"temperature": -0.1}),
        ("coun", {"temperature": 0}),
        ("coun", {"cl_weight": -1.0}),
        ("ft", {"cl_weight": -0.5}),
        ("ft", {"momentum": 0.5}),  # unknown hyperparameter
        ("coun", {"lr": float("nan")}),
        ("coun", {"lr": float("inf")}),
        ("coun", {"lr": 0.0}),
        ("coun", {"lr": "fast"}),
        ("coun", {"epochs": 0}),
        ("nope", {}),  # unknown method
    ],
)
def test_resolve_hparams_rejects(method, given):
    with pytest.raises(UsageError):
        resolve_hparams(method, given)


def test_bad_hparams_rejected_before_training(prepared):
    with pytest.raises(UsageError):
        unlearn(prepared, "coun", {"epochs": 1, "temperature": -1.0})


@pytest.mark.parametrize("lr", [1e6, 1e30])
def test_huge_lr_diverges(prepared, lr):
    with pytest.raises(DivergedError):
        unlearn(prepared, "ft", {"epochs": 1, "lr": lr})


# ---------------------------------------------------------------------------- resume


class _Interrupt(Exception):
    pass


def test_resume_is_bit_identical(prepared):
    hp = {"epochs": 2, "lr": 0.05}
    full_epoch1 = {}
    full_model, full_metrics = unlearn(
        prepared, "coun", hp, on_epoch=lambda e, m, mk: full_epoch1.update(m) if e == 1 else None
    )

    saved = {}

    def stop_after_first(epoch, metrics, make_checkpoint):
        saved["ckpt"] = copy.deepcopy(make_checkpoint())
        saved["metrics"] = dict(metrics)
        raise _Interrupt

    with pytest.raises(_Interrupt):
        unlearn(prepared, "coun", hp, on_epoch=stop_after_first)
    ckpt = saved["ckpt"]
    assert ckpt["epoch"] == 1 and saved["metrics"]["epoch"] == 1
    # the same seed gives the same first epoch (determinism, before any resume)
    assert {k: v for k, v in saved["metrics"].items() if k != "wall_seconds"} == {
        k: v for k, v in full_epoch1.items() if k != "wall_seconds"
    }

    epochs_seen = []
    resumed_model, resumed_metrics = unlearn(
        prepared, "coun", hp, resume=ckpt, on_epoch=lambda e, m, mk: epochs_seen.append(e)
    )
    assert epochs_seen == [2]
    sa, sb = full_model.state_dict(), resumed_model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for k, v in full_metrics.items():
        if k != "wall_seconds":
            assert resumed_metrics[k] == v, k
    # the checkpoint was not at the end: resuming really ran the second epoch
    assert not torch.equal(ckpt["model"]["fc.weight"], sb["fc.weight"])
    # wall_seconds continues from the checkpoint's: a checkpoint that says 1000 s resumes above it
    late = dict(ckpt, wall_seconds=1000.0)
    _, late_metrics = unlearn(prepared, "coun", hp, resume=late)
    assert 1000.0 < late_metrics["wall_seconds"] < 1000.0 + 600.0
    assert resumed_metrics["wall_seconds"] > ckpt["wall_seconds"] > 0.0


# ------------------------------------------------------------------------ base models


def test_second_prepare_reads_the_cache(prepared, scenario, session_cache_dir, digits):
    # `prepared` may or may not have trained (another test can fill the session cache first);
    # what is pinned here is that a prepare after it trains nothing and reads the same models.
    logs = []
    again = prepare(scenario, cache_dir=session_cache_dir, device="cpu", log=logs.append, data=digits)
    assert again.base.from_cache == {"original": True, "oracle": True}
    assert again.base.original_metrics == prepared.base.original_metrics
    assert again.base.oracle_metrics == prepared.base.oracle_metrics
    assert again.split.split_hash == prepared.split.split_hash
    assert _states_equal(again.base.original, prepared.base.original)
    assert _states_equal(again.base.oracle, prepared.base.oracle)
    assert not _states_equal(again.base.original, again.base.oracle)
    assert any("loaded from cache" in line for line in logs)
    assert not any("training" in line for line in logs)


def test_base_models_learned(prepared):
    om, rm = prepared.base.original_metrics, prepared.base.oracle_metrics
    assert om["retain_acc"] > 90.0 and rm["retain_acc"] > 90.0 and rm["test_acc"] > 85.0
    assert "avg_gap" in om  # the original's gaps to the oracle are reported beside it


def test_corrupted_cached_model_raises(prepared, scenario, session_cache_dir, digits, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(session_cache_dir, cache)
    model_pt = cache / prepared.base.cache_entries["original"].relative_to(session_cache_dir) / "model.pt"
    data = bytearray(model_pt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_pt.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="checksum"):
        prepare(scenario, cache_dir=cache, device="cpu", log=lambda s: None, data=digits)


def test_corrupted_meta_raises(prepared, scenario, session_cache_dir, digits, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(session_cache_dir, cache)
    meta = cache / prepared.base.cache_entries["oracle"].relative_to(session_cache_dir) / "meta.json"
    meta.write_text("{not json")
    with pytest.raises(UsageError):
        prepare(scenario, cache_dir=cache, device="cpu", log=lambda s: None, data=digits)


def test_cache_key_covers_augmentation_and_training_code(prepared, scenario, digits, monkeypatch):
    """A change of augmentation policy or of the training code gives a new base model."""
    import dataclasses

    from coun_tune.core import base_models

    for role in ("original", "oracle"):
        key, inputs = base_models.cache_key(digits, prepared.split, scenario, role)
        assert inputs["augment"] == dataclasses.asdict(digits.augment)
        flipped = dataclasses.replace(digits, augment=dataclasses.replace(digits.augment, flip=not digits.augment.flip))
        padded = dataclasses.replace(digits, augment=dataclasses.replace(digits.augment, crop_padding=2))
        assert base_models.cache_key(flipped, prepared.split, scenario, role)[0] != key
        assert base_models.cache_key(padded, prepared.split, scenario, role)[0] != key
        monkeypatch.setattr(base_models, "TRAINING_CODE_VERSION", base_models.TRAINING_CODE_VERSION + 1)
        assert base_models.cache_key(digits, prepared.split, scenario, role)[0] != key
        monkeypatch.undo()
        assert base_models.cache_key(digits, prepared.split, scenario, role)[0] == key
