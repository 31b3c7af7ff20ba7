"""Unlearning methods, by the name used in flags, YAML and MLflow."""

from __future__ import annotations

from coun_tune.core.methods.ascent import GA, NegGradPlus
from coun_tune.core.methods.base import (
    COMMON_HPARAMS,
    Batch,
    ForgetDataAccessError,
    ForgetGuard,
    HParam,
    Method,
    MethodContext,
    Step,
)
from coun_tune.core.methods.distill import SCRUB, BadTeacher
from coun_tune.core.methods.ft import FT, CoUn
from coun_tune.core.methods.ft_variants import L1Sparse, NoT
from coun_tune.core.methods.relabel import RL, SalUn
from coun_tune.errors import UsageError

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (FT, CoUn, GA, NegGradPlus, RL, L1Sparse, SalUn, SCRUB, BadTeacher, NoT)
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]()


def method_hparams(name: str) -> dict[str, HParam]:
    """Every hyperparameter a method accepts (common ones first), by name. A method's own
    declaration of a common name (GA's lr) replaces the common range."""
    cls = type(get_method(name))  # UsageError, not KeyError, for an unknown name
    out = {h.name: h for h in COMMON_HPARAMS}
    out["cl_weight"] = HParam("cl_weight", cls.default_cl_weight, 0.1, 6.0, log=True, help=out["cl_weight"].help)
    out.update({h.name: h for h in cls.hparams})
    return out


__all__ = [
    "METHODS",
    "get_method",
    "method_hparams",
    "Method",
    "MethodContext",
    "Batch",
    "Step",
    "HParam",
    "ForgetGuard",
    "ForgetDataAccessError",
    "COMMON_HPARAMS",
]
