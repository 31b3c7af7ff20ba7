"""The GPU fast path's options, on CPU: defaults change nothing (bit-identical to a plain loop
written out here), fused views equal two forwards exactly when nothing couples the samples
(no batch norm) and differ when batch norm does, the deferred NaN check still names the epoch,
and torch.compile runs. Tiny synthetic scenarios: no base models are trained."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coun_tune.core.batching import Augmenter, DeviceSplit, shuffled_batches
from coun_tune.core.datasets import AugmentPolicy
from coun_tune.core.engine import ScenarioData, cosine_floor, run_unlearning, step_loss
from coun_tune.core.fastpath import FastPath, NonFiniteWatch, compiled_features
from coun_tune.core.losses import contrastive_loss
from coun_tune.core.methods import Batch, ForgetGuard, MethodContext, get_method
from coun_tune.core.models import FeatureClassifier, SmallCNN
from coun_tune.errors import DivergedError, UsageError

POLICY = AugmentPolicy(crop_padding=1, flip=True, mean=(0.5,), std=(0.25,))
HP = {"epochs": 2, "lr": 0.05, "cl_weight": 1.0, "temperature": 0.1}


class NoNorm(FeatureClassifier):
    """conv -> relu -> global mean -> 6-d features -> linear: each sample's features depend on
    that sample alone (no batch norm), so a 2N forward equals two N forwards."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)
        self.feature_dim = 6

    def features(self, x):
        return torch.relu(self.conv(x)).mean((2, 3))


def _scenario(n_retain=48, seed=0) -> ScenarioData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n_retain + 24, 1, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (n_retain + 24,), generator=g)
    return ScenarioData(
        retain=DeviceSplit(x[:n_retain], y[:n_retain]),
        forget=DeviceSplit(x[n_retain : n_retain + 12], y[n_retain : n_retain + 12]),
        test=DeviceSplit(x[n_retain + 12 :], y[n_retain + 12 :]),
        augmenter=Augmenter(POLICY, "cpu"),
        num_classes=3,
        image_shape=(1, 8, 8),
        split_hash="fastpath-test",
    )


def _model(kind: str, seed: int = 0) -> FeatureClassifier:
    torch.manual_seed(seed)
    return NoNorm() if kind == "nonorm" else SmallCNN(1, 3, width=4)


def _run(kind, fast, hp=HP, scen=None):
    model = _model(kind)
    metrics = run_unlearning(
        model, copy.deepcopy(model), scen or _scenario(), "coun", hp, batch_size=16, seed=3, fast_path=fast
    )
    return model, metrics


def _states(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- options


def test_auto_is_off_on_cpu_and_on_for_cuda():
    cpu = FastPath().resolve("cpu")
    assert (
        cpu.channels_last,
        cpu.bf16_autocast,
        cpu.compile,
        cpu.fused_views,
        cpu.check_every,
        cpu.cudnn_benchmark,
    ) == (False, False, False, False, 1, False)
    cuda = FastPath().resolve("cuda")
    assert cuda.channels_last is True and cuda.check_every == 0 and cuda.compile is False and cuda.cudnn_benchmark
    assert cuda.fused_views is False  # changes batch-norm statistics: never on unless asked for
    # explicit values win over the device's choice
    assert FastPath(channels_last=False, check_every=5).resolve("cuda").channels_last is False
    assert FastPath(check_every=5).resolve("cuda").check_every == 5


def test_from_dict_checks_its_input():
    assert FastPath.from_dict({"fused_views": True, "check_every": 10}) == FastPath(fused_views=True, check_every=10)
    assert FastPath.from_dict(None) == FastPath()
    for bad in ({"fused": True}, {"compile": "yes"}, {"check_every": -1}, {"check_every": 1.5}, {"check_every": True}):
        with pytest.raises(UsageError):
            FastPath.from_dict(bad)


# ---------------------------------------------------------------- defaults change nothing


def _plain_loop(kind: str) -> dict:
    """The CoUn loop written out without the engine: shuffled retain batches, view 1, CE, view 2,
    contrastive term, SGD (momentum 0.9, wd 5e-4), cosine per step; the same RNG draws in the
    same order (permutation, view 1, view 2)."""
    scen, model = _scenario(), _model(kind)
    gen = torch.Generator().manual_seed(3)
    opt = torch.optim.SGD(model.parameters(), lr=HP["lr"], momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = 3  # 48 retain images, batch 16
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=HP["epochs"] * steps_per_epoch, eta_min=cosine_floor(HP["lr"])
    )
    for _ in range(HP["epochs"]):
        model.train()
        for idx in shuffled_batches(len(scen.retain), 16, gen, torch.device("cpu")):
            x, y = scen.retain.x[idx], scen.retain.y[idx]
            z1 = model.features(scen.augmenter(x, gen))
            loss = F.cross_entropy(model.classifier(z1), y)
            loss = loss + HP["cl_weight"] * contrastive_loss(
                z1, model.features(scen.augmenter(x, gen)), HP["temperature"]
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return _states(model)


@pytest.mark.parametrize("kind", ["smallcnn", "nonorm"])
def test_defaults_on_cpu_are_bit_identical_to_the_plain_loop(kind):
    expected = _plain_loop(kind)
    for fast in (None, FastPath(), FastPath(check_every=0), FastPath(check_every=2)):
        got = _states(_run(kind, fast)[0])
        assert got.keys() == expected.keys()
        for k in expected:
            assert torch.equal(got[k], expected[k]), (fast, k)


def test_channels_last_and_bf16_run_on_cpu_and_stay_close():
    ref = _states(_run("smallcnn", None)[0])
    model, metrics = _run("smallcnn", FastPath(channels_last=True))
    assert model.body[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    got = _states(model)
    assert all(torch.allclose(got[k].float(), ref[k].float(), atol=1e-4) for k in ref)
    model, metrics = _run("smallcnn", FastPath(bf16_autocast=True))
    assert math.isfinite(metrics["loss"])
    assert all(v.dtype == ref[k].dtype for k, v in model.state_dict().items())  # weights stay fp32


# ------------------------------------------------------------------------- fused views


def _one_step_loss(kind: str, fused: bool) -> torch.Tensor:
    scen, model = _scenario(), _model(kind)
    model.train()
    gen = torch.Generator().manual_seed(11)
    ctx = MethodContext(
        model=model,
        original=model,
        retain=scen.retain,
        forget=ForgetGuard("coun"),
        augmenter=scen.augmenter,
        num_classes=3,
        batch_size=16,
        epochs=1,
        generator=gen,
        hparams={},
        optimizer=None,
    )
    batch = Batch(scen.retain.x[:16], scen.retain.y[:16])
    return step_loss(get_method("coun"), ctx, batch, 0, 0, 1.0, 0.1, fused_views=fused)


def _hand_loss(kind: str, stats_over_both: bool) -> torch.Tensor:
    """The same step by hand: views drawn with the same generator, view 1 then view 2."""
    scen, model = _scenario(), _model(kind)
    model.train()
    gen = torch.Generator().manual_seed(11)
    x, y = scen.retain.x[:16], scen.retain.y[:16]
    x1, x2 = scen.augmenter(x, gen), scen.augmenter(x, gen)
    if stats_over_both:
        z = model.features(torch.cat([x1, x2]))
        z1, z2 = z[:16], z[16:]
    else:
        z1, z2 = model.features(x1), model.features(x2)
    return F.cross_entropy(model.classifier(z1), y) + contrastive_loss(z1, z2, 0.1)


def test_fused_views_equal_two_forwards_without_batch_norm():
    two, fused = _one_step_loss("nonorm", False), _one_step_loss("nonorm", True)
    assert torch.allclose(two, _hand_loss("nonorm", False), rtol=0, atol=1e-6)
    assert torch.allclose(fused, two, rtol=0, atol=1e-6)


def test_fused_views_change_the_loss_with_batch_norm():
    two, fused = _one_step_loss("smallcnn", False), _one_step_loss("smallcnn", True)
    assert torch.allclose(two, _hand_loss("smallcnn", False), rtol=0, atol=1e-6)
    assert torch.allclose(fused, _hand_loss("smallcnn", True), rtol=0, atol=1e-6)  # BN over all 2N
    assert (fused - two).detach().abs().item() > 1e-4


def test_fused_views_runs_in_the_engine():
    ref = _states(_run("nonorm", None)[0])
    got = _states(_run("nonorm", FastPath(fused_views=True))[0])
    # no batch norm and CoUn draws nothing itself: the same views, the same training
    assert all(torch.allclose(got[k], ref[k], atol=1e-5) for k in ref)
    # with batch norm the engine's run changes (the option reached step_loss)
    ref, got = _states(_run("smallcnn", None)[0]), _states(_run("smallcnn", FastPath(fused_views=True))[0])
    assert not torch.allclose(got["fc.weight"], ref["fc.weight"], atol=1e-5)


# ----------------------------------------------------------------- the non-finite check


def test_watch_remembers_the_first_bad_step():
    for every in (0, 3):
        w = NonFiniteWatch(every)
        for i, v in enumerate([1.0, 2.0, float("nan"), float("inf"), 3.0]):
            w.observe(torch.tensor(v), i)
        step, value = w.first_bad()
        assert step == 2 and math.isnan(value)
        assert [w.due(i) for i in range(6)] == ([False] * 6 if every == 0 else [False, False, True] * 2)
        with pytest.raises(DivergedError, match=r"epoch 4, step 3"):
            w.raise_if_bad(3)
        w.reset()
        w.observe(torch.tensor(0.5), 0)
        assert w.first_bad() is None
    eager = NonFiniteWatch(1)
    eager.observe(torch.tensor(1.0), 0)
    eager.observe(torch.tensor(float("-inf")), 1)
    assert eager.first_bad() == (1, float("-inf")) and eager.due(0)


@pytest.mark.parametrize("every", [0, 1, 2])
def test_divergence_still_raises_naming_the_epoch(every):
    with pytest.raises(DivergedError, match=r"at epoch 1, step \d+"):
        _run("smallcnn", FastPath(check_every=every), hp={**HP, "lr": 1e30})


# -------------------------------------------------------------------------------- compile


def test_compiled_features_are_removed_after_use():
    model = _model("nonorm")
    with compiled_features(model, False, {}):
        assert "features" not in model.__dict__
    cache = {}
    with compiled_features(model, True, cache):
        assert "features" in model.__dict__
    assert "features" not in model.__dict__ and "features" in cache
    copy.deepcopy(model)  # nothing compiled is left on the model


def test_compile_option_trains_like_eager(monkeypatch):
    """Slow (~15-40 s: inductor compiles the tiny model's forward and backward once)."""
    compiled = []
    real_compile = torch.compile

    def recording_compile(fn, **kw):  # the real torch.compile, recording what it was given
        compiled.append(getattr(fn, "__name__", fn))
        return real_compile(fn, **kw)

    monkeypatch.setattr(torch, "compile", recording_compile)
    scen = _scenario(n_retain=40)  # 2 full batches of 16 + a short one of 8, run eagerly
    ref = _states(_run("nonorm", None, scen=scen)[0])
    model, metrics = _run("nonorm", FastPath(compile=True), scen=_scenario(n_retain=40))
    got = _states(model)
    assert compiled == ["features"]  # once per run, not once per epoch
    assert "features" not in model.__dict__
    assert all(torch.allclose(got[k], ref[k], atol=1e-4) for k in ref)
    assert math.isfinite(metrics["loss"])
