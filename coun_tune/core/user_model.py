"""The user's model for `coun-tune apply`: built, loaded from a state dict, and split into
`features()` and `classifier()` (the engine's contract, see models.py).

`arch` is one of:
  - a coun-tune architecture name (small_cnn, resnet18, ...): built by models.build_model;
  - `package.module:factory`: called with num_classes= / in_channels= where its signature takes
    them. If the module it returns has features() and classifier(), they are used as they are;
    otherwise (a plain classifier such as torchvision.models:resnet18) its last nn.Linear is
    taken as the classifier and everything before it as features (LastLinearClassifier).

State dicts are read with torch.load(weights_only=True) and loaded strictly; the unlearned one
is written back as the user's own class and keys (user_module), so it loads into the user's class.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from coun_tune.core.models import ARCHITECTURES, FeatureClassifier, build_model
from coun_tune.errors import UsageError


class LastLinearClassifier(FeatureClassifier):
    """A plain classifier split at its last nn.Linear (in definition order), no hooks:
    features(x) = net(x) with that Linear swapped for nn.Identity, flattened to (N, D);
    classifier(z) = the Linear, (N, D) -> (N, K). Right when that Linear is the network's last
    operation (torchvision's ResNets, VGGs, MobileNets, ...): check_model verifies it."""

    def __init__(self, net: nn.Module):
        super().__init__()
        linears = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise UsageError(f"{type(net).__name__} has no nn.Linear layer to take as the classifier")
        self.fc_path = linears[-1]
        fc = net.get_submodule(self.fc_path)
        parent_path, _, attr = self.fc_path.rpartition(".")
        setattr(net.get_submodule(parent_path) if parent_path else net, attr, nn.Identity())
        self.net, self.fc, self.feature_dim = net, fc, fc.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.net(x), 1)


def user_module(model: nn.Module) -> nn.Module:
    """A copy of the model as the user's own class: a LastLinearClassifier's network with its
    Linear back in place (its state dict then has the user's keys and loads into their class)."""
    import copy

    if not isinstance(model, LastLinearClassifier):
        return copy.deepcopy(model)
    net, fc = copy.deepcopy(model.net), copy.deepcopy(model.fc)
    parent_path, _, attr = model.fc_path.rpartition(".")
    setattr(net.get_submodule(parent_path) if parent_path else net, attr, fc)
    return net


def resolve_factory(spec: str) -> Callable[..., nn.Module]:
    """`package.module:factory` -> the callable. The working directory is importable, as for
    uvicorn/gunicorn's app strings."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(
            f"--arch {spec!r}: give a coun-tune architecture ({', '.join(sorted(ARCHITECTURES))}) "
            "or package.module:factory"
        )
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module's own error at import time
        raise UsageError(f"--arch {spec!r}: cannot import {module_name!r} ({type(e).__name__}: {e})") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise UsageError(f"--arch {spec!r}: module {module_name!r} has no {attr!r}")
    if not callable(obj):
        raise UsageError(f"--arch {spec!r}: {attr!r} is not callable")
    return obj


def build_user_model(arch: str, in_channels: int, num_classes: int) -> FeatureClassifier | nn.Module:
    """An untrained model of `arch` (see the module docstring) for (in_channels, H, W) images."""
    if arch in ARCHITECTURES:
        return build_model(arch, in_channels, num_classes)
    factory = resolve_factory(arch)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    # num_classes also through **kwargs (torchvision's builders pass it on to the model class);
    # in_channels only when named (torchvision's classes would reject it)
    kwargs = {"num_classes": num_classes} if "num_classes" in params or takes_any else {}
    if "in_channels" in params:
        kwargs["in_channels"] = in_channels
    try:
        net = factory(**kwargs)
    except Exception as e:
        raise UsageError(f"--arch {arch!r}: the factory failed ({type(e).__name__}: {e})") from None
    if not isinstance(net, nn.Module):
        raise UsageError(f"--arch {arch!r}: the factory returned a {type(net).__name__}, not a torch.nn.Module")
    if (
        callable(getattr(net, "features", None))
        and callable(getattr(net, "classifier", None))
        and not isinstance(net.features, nn.Module)
    ):
        return net  # the user's own split (torchvision's VGG has *modules* named features/classifier: not this)
    return LastLinearClassifier(net)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict saved with torch.save, read with weights_only=True. UsageError on a missing,
    corrupted or non-state-dict file. A dict holding a `state_dict`/`model` entry is unwrapped."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"model file {str(p)!r} does not exist")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a pickle of arbitrary objects, not a torch file at all
        raise UsageError(
            f"model file {str(p)!r} is not a state dict torch.load(weights_only=True) can read ({type(e).__name__})"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(f"model file {str(p)!r} does not hold a state dict (a mapping of names to tensors)")
    return obj


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], arch: str) -> None:
    """Strict load into the user's own keys; the first mismatch in one line."""
    target = model.net if isinstance(model, LastLinearClassifier) else model
    if isinstance(model, LastLinearClassifier):  # put the Linear back for the load, under its own key
        state_dict = dict(state_dict)
        prefix = model.fc_path + "."
        fc_sd = {k[len(prefix) :]: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix)}
        try:
            model.fc.load_state_dict(fc_sd, strict=True)
        except RuntimeError as e:
            raise UsageError(
                f"the model's classifier {model.fc_path!r} does not match {arch}: {_first_line(e)}"
            ) from None
    try:
        target.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise UsageError(f"the model's weights do not match {arch}: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    detail = next((ln for ln in lines[1:] if ln), lines[0] if lines else str(e))
    return detail.rstrip(".")[:300]


@torch.no_grad()
def check_model(model: nn.Module, image: torch.Tensor, num_classes: int, arch: str) -> int:
    """A dry forward on one normalised image (1, C, H, W): the model must take it, give
    (1, num_classes) logits, and forward(x) must equal classifier(features(x)) (else the split is
    wrong and the contrastive term would see the wrong representation). Returns the feature size."""
    was = model.training
    model.eval()
    try:
        try:
            z = model.features(image)
            logits = model(image)
        except Exception as e:
            raise UsageError(
                f"{arch} does not take {tuple(image.shape[1:])} (C, H, W) images: {type(e).__name__}: {_first_line(e)}"
            ) from None
        if z.ndim != 2 or z.shape[0] != 1:
            raise UsageError(f"{arch}: features() must return (N, D), got {tuple(z.shape)}")
        if tuple(logits.shape) != (1, num_classes):
            raise UsageError(
                f"{arch} outputs {tuple(logits.shape[1:])} logits per image; the data has {num_classes} classes"
            )
        if not torch.allclose(model.classifier(z), logits, rtol=1e-4, atol=1e-5):
            raise UsageError(
                f"{arch}: forward(x) differs from classifier(features(x)); its last nn.Linear is "
                "not its last operation: give an architecture with features() and classifier()"
            )
        return int(z.shape[1])
    finally:
        model.train(was)
