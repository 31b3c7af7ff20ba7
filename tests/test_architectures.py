"""The architectures of models.ARCHITECTURES beyond the small CNN: forward/backward on a
CIFAR-shaped batch, the features()/classifier() split, parameter counts and forward MACs, each
checked against a count worked out independently from the layer shapes below."""

from __future__ import annotations

import pytest
import torch

from coun_tune.core.models import ARCHITECTURES, build_model, count_forward_macs
from coun_tune.core.models_extra import VGG16_CFG

K = 10  # CIFAR-10


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def vgg16_bn_expected(cin: int, k: int) -> tuple[int, int]:
    """(parameters, MACs at 32x32) of VGG16BN from its layer shapes."""
    params = macs = 0
    side = 32
    for v in VGG16_CFG:
        if v == "M":
            side //= 2
            continue
        params += cin * v * 9 + v + 2 * v  # conv weight + bias, BN weight + bias
        macs += side * side * cin * v * 9
        cin = v
    params += 512 * 1024 + 2 * 1024 + 1024 * k + k  # Linear(512, 1024, no bias), BN1d, fc
    macs += 512 * 1024 + 1024 * k
    return params, macs


def vit_small_expected(cin: int, k: int, image_size: int = 32) -> tuple[int, int]:
    """(parameters, MACs counted over Linear layers) of ViTSmall: patch 4, dim 512, depth 6,
    12 heads x 64 = inner 768, MLP 1024."""
    dim, inner, mlp, depth = 512, 12 * 64, 1024, 6
    patches = (image_size // 4) ** 2
    tokens = patches + 1
    patch_dim = cin * 16
    embed = 2 * patch_dim + (patch_dim * dim + dim) + 2 * dim  # LN, Linear, LN
    attn = 2 * dim + dim * 3 * inner + (inner * dim + dim)  # LN, qkv (no bias), out proj
    ff = 2 * dim + (dim * mlp + mlp) + (mlp * dim + dim)  # LN, Linear, Linear
    params = embed + dim + tokens * dim + depth * (attn + ff) + 2 * dim + (dim * k + k)  # + cls, pos, LN, fc
    macs = patches * patch_dim * dim + depth * tokens * (dim * 3 * inner + inner * dim + 2 * dim * mlp) + dim * k
    return params, macs


CASES = {
    # arch: (feature_dim, expected parameters, expected MACs at 3x32x32)
    "vgg16_bn": (1024, *vgg16_bn_expected(3, K)),
    "vit_small": (512, *vit_small_expected(3, K)),
}


def test_hand_counts():
    # the figures quoted in the models_extra docstrings
    assert vgg16_bn_expected(3, 10)[0] == 15_259_722
    assert vit_small_expected(3, 10)[0] == 15_819_370
    assert vit_small_expected(3, 200, image_size=64)[0] == 16_015_144


@pytest.mark.parametrize("arch", sorted(CASES))
def test_forward_backward_and_counts(arch):
    feature_dim, want_params, want_macs = CASES[arch]
    torch.manual_seed(0)
    model = build_model(arch, 3, K)
    params = n_params(model)
    print(f"{arch}: {params:,} parameters")
    assert params == want_params
    assert model.feature_dim == feature_dim

    x = torch.randn(2, 3, 32, 32)
    model.train()
    z = model.features(x)
    assert z.shape == (2, feature_dim)
    logits = model.classifier(z)
    assert logits.shape == (2, K)
    logits.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert float(model.fc.weight.grad.abs().sum()) > 0
    first = next(model.parameters())  # the first layer's weight: the gradient reached the input end
    assert float(first.grad.abs().sum()) > 0

    model.eval()  # deterministic (no dropout, BN running stats): forward == classifier(features)
    with torch.no_grad():
        torch.testing.assert_close(model(x[:1]), model.classifier(model.features(x[:1])))

    macs = count_forward_macs(model, (3, 32, 32))
    print(f"{arch}: {macs:,} forward MACs at 3x32x32")
    assert macs == want_macs > 0
    assert not model.training  # count_forward_macs restores the mode it found


def test_vit_small_64_takes_tinyimagenet_inputs():
    model = build_model("vit_small_64", 3, 200).eval()
    assert n_params(model) == vit_small_expected(3, 200, image_size=64)[0]
    with torch.no_grad():
        assert model.features(torch.zeros(1, 3, 64, 64)).shape == (1, 512)
    with pytest.raises(ValueError, match="32x32"):
        build_model("vit_small", 3, 10).features(torch.zeros(1, 3, 64, 64))


def test_vgg16_bn_takes_64x64_28x28_and_one_channel():
    with torch.no_grad():
        assert build_model("vgg16_bn", 3, 200).eval().features(torch.zeros(2, 3, 64, 64)).shape == (2, 1024)
        assert build_model("vgg16_bn", 1, 10).eval()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_resnet18_parameter_count():
    model = build_model("resnet18", 3, K)
    params = n_params(model)
    print(f"resnet18: {params:,} parameters")
    assert params == 11_173_962  # the usual ~11.17M of CIFAR ResNet-18 with 10 classes
    assert count_forward_macs(model, (3, 32, 32)) > 0


def test_registered():
    assert {"small_cnn", "resnet18", "vgg16_bn", "vit_small", "vit_small_64"} <= set(ARCHITECTURES)


def test_resnet18_macs_match_the_papers_cost_figure():
    """The paper's cost unit: ResNet-18 (CIFAR stem) at 0.557 GMACs per 32x32 forward. Our
    count (Conv2d + Linear only) is within 0.5% of it, and with the paper's convention
    (metrics.flops_from_work) 40 CoUn epochs on 45k retain images give its 8.02 PFLOPs."""
    from coun_tune.core.metrics import flops_from_work

    macs = count_forward_macs(build_model("resnet18", 3, K), (3, 32, 32))
    assert macs == pytest.approx(0.557e9, rel=5e-3)
    # each retain sample trained once per epoch with two views: (2 + 2) forward-equivalents
    coun = flops_from_work({"trained": 45_000 * 40, "views": 45_000 * 40, "forward_only": 0}, macs)
    assert coun["flops"] == pytest.approx(8.02e15, rel=5e-3)
