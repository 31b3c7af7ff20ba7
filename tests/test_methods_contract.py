"""One contract for every registered unlearning method, with the CL plug-in off and on.

Runs on the conftest's digits scenario (theta_o trained with the "tiny" recipe), with the
retain set cut to 384 samples so that each run is a few optimiser steps:
- a 2-epoch run ends with finite metrics and weights that moved away from theta_o;
- interrupted after epoch 1 and resumed from the (deep-copied) epoch checkpoint, it ends with
  bit-identical weights, buffers and metrics (CPU, fixed seed);
- the plug-in adds exactly cl_weight * contrastive_loss(z1_r, z2, tau) over the retain rows of
  a batch from the method's own epoch plan, recomputed here from the very views the engine
  drew (`engine.step_loss` is the loop's own step);
- methods that must not read D_u run behind the ForgetGuard; the others raise behind it;
- SalUn leaves the weights outside its mask bit-identical to theta_o.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from coun_tune.core.batching import DeviceSplit
from coun_tune.core.engine import resolve_hparams, run_unlearning, step_loss
from coun_tune.core.losses import contrastive_loss
from coun_tune.core.methods import METHODS, ForgetDataAccessError, ForgetGuard, MethodContext, get_method
from coun_tune.core.methods.relabel import saliency_mask

NO_FORGET = {"ft", "coun", "l1_sparse", "not"}  # methods that must never read D_u
N_RETAIN, BATCH, SEED = 384, 128, 0
# (method, cl_weight): None keeps the method's default (CoUn's is 1.0; CoUn at 0 would be FT)
CASES = [(m, cl) for m in METHODS for cl in ((None,) if m == "coun" else (0.0, 0.5))]


@pytest.fixture(scope="module")
def small(prepared):
    """(scenario data with a 384-sample retain set, theta_o)."""
    torch.set_num_threads(2)
    sd = prepared.scen_data
    keep = torch.randperm(len(sd.retain), generator=torch.Generator().manual_seed(0))[:N_RETAIN]
    return dataclasses.replace(sd, retain=DeviceSplit(sd.retain.x[keep], sd.retain.y[keep])), prepared.base.original


def _hp(cl):
    return {"epochs": 2} if cl is None else {"epochs": 2, "cl_weight": cl}


def _unlearn(small, method, cl, **kw):
    scen, original = small
    model = copy.deepcopy(original).train().requires_grad_(True)
    metrics = run_unlearning(model, original, scen, method, _hp(cl), batch_size=BATCH, seed=SEED, **kw)
    return model, metrics


_RUNS: dict = {}


def _run(small, method, cl):
    """The uninterrupted 2-epoch run (cached: the SalUn test reuses it) and its epoch-1 checkpoint."""
    if (method, cl) not in _RUNS:
        ckpts = {}
        model, metrics = _unlearn(
            small, method, cl, on_epoch=lambda e, m, make: ckpts.__setitem__(e, copy.deepcopy(make()))
        )
        _RUNS[method, cl] = (model, metrics, ckpts[1])
    return _RUNS[method, cl]


@pytest.mark.parametrize("method,cl", CASES, ids=[f"{m}-cl{cl}" for m, cl in CASES])
def test_run_finishes_changes_weights_and_resumes_bit_identically(small, method, cl):
    _, original = small
    model, metrics, ckpt = _run(small, method, cl)
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    assert not bad, f"non-finite metrics: {bad}"
    assert metrics["epoch"] == 2 and metrics["flops"] > 0
    orig = original.state_dict()
    assert any(not torch.equal(p, orig[k]) for k, p in model.named_parameters()), "no weight moved"

    resumed, resumed_metrics = _unlearn(small, method, cl, resume=ckpt)
    final = model.state_dict()
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, final[k]), f"{k} differs after resume"
    for k in ("retain_acc", "forget_acc", "test_acc", "mia_efficacy", "loss", "flops"):
        assert resumed_metrics[k] == metrics[k], k


class _Recorder:
    """The run's augmenter, keeping every view it hands out (retain views and forget batches)."""

    def __init__(self, inner):
        self.inner, self.views = inner, []

    def __call__(self, x, generator):
        self.views.append(self.inner(x, generator))
        return self.views[-1]

    def normalize(self, x):
        return self.inner.normalize(x)


def _context(small, method, hparams):
    """A MethodContext built as run_unlearning builds it (with the guard where it applies)."""
    scen, original = small
    m = get_method(method)
    ctx = MethodContext(
        model=copy.deepcopy(original).train().requires_grad_(True),
        original=copy.deepcopy(original).eval().requires_grad_(False),
        retain=scen.retain,
        forget=scen.forget if m.reads_forget else ForgetGuard(m.name),
        augmenter=_Recorder(scen.augmenter),
        num_classes=scen.num_classes,
        batch_size=BATCH,
        epochs=2,
        generator=torch.Generator().manual_seed(SEED),
        hparams=resolve_hparams(method, hparams),
    )
    m.prepare(ctx)
    return m, ctx


@pytest.mark.parametrize("method", list(METHODS))
def test_plugin_adds_exactly_the_contrastive_term(small, method):
    cl = 1.0 if method == "coun" else 0.5
    m, ctx = _context(small, method, {"cl_weight": cl})
    tau = ctx.hparams["temperature"]
    # the first batch of the method's own plan with retain rows (SCRUB's max steps have none)
    batch = next(b for b in m.epoch_batches(ctx, 0) if b.forget is None or int((~b.forget).sum()) >= 2)
    retain_rows = slice(None) if batch.forget is None else ~batch.forget
    state = ctx.generator.get_state()
    ctx.augmenter.views.clear()
    loss_off = step_loss(m, ctx, batch, 0, 0, 0.0, tau)
    views_off = list(ctx.augmenter.views)
    ctx.generator.set_state(state)
    ctx.augmenter.views.clear()
    loss_on = step_loss(m, ctx, batch, 0, 0, cl, tau)
    views_on = ctx.augmenter.views
    # the same draws up to view 2, which is one extra draw at the end, of the retain rows only
    assert len(views_on) == len(views_off) + 1
    assert all(torch.equal(a, b) for a, b in zip(views_off, views_on))
    assert views_on[-1].shape[0] == batch.x[retain_rows].shape[0]
    with torch.no_grad():
        term = contrastive_loss(ctx.model.features(views_on[0])[retain_rows], ctx.model.features(views_on[-1]), tau)
    assert torch.equal(loss_on.detach(), loss_off.detach() + cl * term), (loss_on - loss_off, cl * term)


@pytest.mark.parametrize("method", list(METHODS))
def test_forget_access_is_declared_and_enforced(small, method, monkeypatch):
    cls = METHODS[method]
    assert cls.reads_forget == (method not in NO_FORGET)
    if not cls.reads_forget:
        return  # these ran behind the ForgetGuard in the run contract above without raising
    # a forget-reading method that declared otherwise would be handed the guard, and raise
    monkeypatch.setattr(cls, "reads_forget", False)
    with pytest.raises(ForgetDataAccessError):
        _unlearn(small, method, 0.0)


@pytest.mark.parametrize("cl", [0.0, 0.5])
def test_salun_holds_weights_outside_the_mask_at_theta_o(small, cl):
    _, original = small
    model, _, _ = _run(small, "salun", cl)
    _, ctx = _context(small, "salun", {})
    mask = saliency_mask(original, ctx, ctx.hparams["salun_threshold"])
    kept = sum(int(v.sum()) for v in mask.values())
    total = sum(v.numel() for v in mask.values())
    assert kept == int(total * ctx.hparams["salun_threshold"])
    orig = dict(original.named_parameters())
    moved = 0
    for name, p in model.named_parameters():
        assert torch.equal(p[~mask[name]], orig[name][~mask[name]]), f"{name} moved outside the mask"
        moved += int((p[mask[name]] != orig[name][mask[name]]).sum())
    assert moved > 0
