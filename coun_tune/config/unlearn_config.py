"""The config of one unlearning run: what `coun-tune unlearn --config` reads and what
`coun-tune export` writes.

    scenario: {dataset: digits, forget: "random:0.1", seed: 0, arch: small_cnn, recipe: digits}
    method: coun
    hparams: {temperature: 0.1, cl_weight: 1.0, lr: 0.05, epochs: 10}
    batch_size: 64          # optional: the dataset's default
    seed: 0                 # optional: augmentation/batch-order seed, default the scenario's

Flags given on the command line override the file. Every problem is a UsageError.

Renamed hyperparameters (RENAMED_HPARAMS): a config written before a rename still runs what it
ran then, converted with a one-line deprecation warning on stderr, or is refused in one line
naming the new key where no value of the new one means the same; never silently with defaults.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from coun_tune.core.datasets import IMAGE_SIZES, check_dataset_name
from coun_tune.core.engine import resolve_hparams
from coun_tune.core.methods import METHODS, method_hparams
from coun_tune.core.models import ARCH_INPUT_SIZE, ARCHITECTURES
from coun_tune.core.recipes import RECIPES, Scenario
from coun_tune.core.splits import parse_forget_spec
from coun_tune.errors import UsageError

TOP_KEYS = {"scenario", "method", "hparams", "batch_size", "seed"}
SCENARIO_KEYS = {"dataset", "forget", "seed", "arch", "recipe", "data_root", "split_seed"}


@dataclass
class UnlearnConfig:
    scenario: Scenario
    method: str
    hparams: dict[str, Any]
    batch_size: int | None = None
    seed: int | None = None
    source: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {
            "scenario": {k: v for k, v in self.scenario.to_dict().items() if v is not None},
            "method": self.method,
            "hparams": dict(self.hparams),
        }
        if self.batch_size is not None:
            out["batch_size"] = self.batch_size
        if self.seed is not None:
            out["seed"] = self.seed
        return out


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key, line: int):
        super().__init__(f"key {key!r} appears twice (line {line})")
        self.key, self.line = key, line


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping key given twice (plain YAML keeps the last one
    silently: an objective or a domain listed twice would be merged without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges; a key written here may override a merged one
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise DuplicateKeyError(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, UniqueKeyLoader.construct_mapping)


def read_yaml(path: str | Path, what: str = "config") -> dict:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what} file {str(p)!r} does not exist")
    try:
        doc = yaml.load(p.read_text(), Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except DuplicateKeyError as e:
        raise UsageError(f"{what} file {str(p)!r}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UsageError(f"{what} file {str(p)!r} is not valid YAML{where}") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{what} file {str(p)!r} must hold a mapping at the top level")
    return doc


def _unknown(keys: set, allowed: set, where: str) -> None:
    extra = sorted(set(keys) - allowed)
    if extra:
        raise UsageError(f"unknown key {extra[0]!r} in {where}; allowed: {', '.join(sorted(allowed))}")


def validate_scenario(d: dict, where: str = "scenario") -> Scenario:
    if not isinstance(d, dict):
        raise UsageError(f"{where} must be a mapping")
    _unknown(set(d), SCENARIO_KEYS, where)
    dataset = str(d.get("dataset", "digits"))
    check_dataset_name(dataset)
    forget = d.get("forget", "random:0.1")
    if isinstance(forget, (list, tuple)):  # sequential forgetting: requests applied in turn
        if not forget:
            raise UsageError(f"{where}.forget: an empty list of requests")
        forget = tuple(str(f) for f in forget) if len(forget) > 1 else str(forget[0])
    else:
        forget = str(forget)
    for f in forget if isinstance(forget, tuple) else (forget,):
        parse_forget_spec(f)
    seed, split_seed = d.get("seed", 0), d.get("split_seed")
    for name, v in (("seed", seed), ("split_seed", split_seed)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise UsageError(f"{where}.{name} must be a non-negative integer, got {v!r}")
    arch, recipe = d.get("arch"), d.get("recipe")
    if arch is not None and arch not in ARCHITECTURES:
        raise UsageError(f"unknown architecture {arch!r}; choose one of {', '.join(sorted(ARCHITECTURES))}")
    if recipe is not None and recipe not in RECIPES:
        raise UsageError(f"unknown recipe {recipe!r}; choose one of {', '.join(sorted(RECIPES))}")
    need = ARCH_INPUT_SIZE.get(arch or "")
    if need is not None and IMAGE_SIZES.get(dataset) != need:
        raise UsageError(
            f"architecture {arch!r} takes {need}x{need} images; {dataset} has "
            f"{IMAGE_SIZES.get(dataset)}x{IMAGE_SIZES.get(dataset)}"
        )
    root = d.get("data_root")
    if root is not None and not Path(str(root)).is_dir():
        raise UsageError(f"{dataset}: data directory {str(root)!r} does not exist")
    return Scenario(
        dataset=dataset,
        forget=forget,
        seed=seed,
        arch=arch,
        recipe=recipe,
        data_root=None if root is None else str(root),
        split_seed=split_seed,
    )


# Issue 15 made two epoch-counted hyperparameters shares of the run's epochs, so a setting means
# the same at 5 and at 50 epochs: old name -> new name. An old value n at a run of E epochs is
# the share n / E of it (base.budget_epochs(n / E, E) == n for 0 <= n <= E).
RENAMED_HPARAMS = {"l1_epochs": "l1_fraction", "scrub_max_steps": "scrub_max_fraction"}


def _whole(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x == int(x)


def _warn(line: str) -> None:
    print(line, file=sys.stderr)


def upgrade_renamed_hparams(
    method: str, hp: dict[str, Any], where: str = "hparams", warn: Callable[[str], None] = _warn
) -> dict[str, Any]:
    """`hp` with every old name in RENAMED_HPARAMS replaced by its new one, for the run's epochs
    (hp's `epochs`, else the method's default), so the run does what the old config did:
    - l1_epochs n (l1 decaying to 0 over the first n epochs) -> l1_fraction n / epochs, when
      n <= epochs; beyond, the old decay (over n epochs, cut at `epochs`) has no equal: refused;
    - scrub_max_steps n (a max pass in the first n epochs) -> scrub_max_fraction min(n, epochs) /
      epochs (n >= epochs: every epoch, 1.0).
    One line to `warn` per converted name; a UsageError naming the new key when both names are
    given, or the old value is not a whole number >= 0. Names the method does not have are left
    for resolve_hparams to refuse."""
    hp = dict(hp)
    declared = method_hparams(method)
    for old, new in RENAMED_HPARAMS.items():
        if old not in hp or new not in declared:
            continue
        if new in hp:
            raise UsageError(f"{where}: {old!r} is the old name of {new!r} and both are given; keep {new!r} only")
        n = hp.pop(old)
        if not _whole(n) or n < 0:
            raise UsageError(
                f"{where}.{old} (renamed {new}, a share of the run's epochs) must be a whole number >= 0, got {n!r}"
            )
        n = int(n)
        epochs = hp.get("epochs", declared["epochs"].default)
        if not _whole(epochs) or epochs < 1:
            raise UsageError(
                f"{where}.{old}: renamed {new}; epochs must be an integer >= 1 to convert it, got {epochs!r}"
            )
        epochs = int(epochs)
        if old == "l1_epochs" and n > epochs:
            raise UsageError(
                f"{where}.{old} {n} is more than epochs {epochs} and has no equal under its new name {new!r} "
                f"(the share of the run's epochs over which the l1 weight decays to 0, at most 1.0): set {new}"
            )
        hp[new] = min(n, epochs) / epochs
        warn(
            f"coun-tune: warning: {where}.{old} is deprecated, renamed {new} (a share of the run's epochs): "
            f"{old} {n} of epochs {epochs} -> {new} {hp[new]:.4g}"
        )
    return hp


def build_unlearn_config(doc: dict, overrides: dict[str, Any], warn: Callable[[str], None] = _warn) -> UnlearnConfig:
    """Merge a config document (possibly empty) with flag overrides and validate the result.
    `overrides` keys: dataset, forget, seed, arch, recipe, data_root, method, batch_size,
    unlearn_seed, and any hyperparameter name; None means "not given"."""
    _unknown(set(doc), TOP_KEYS, "config")
    scen = dict(doc.get("scenario") or {})
    for k in SCENARIO_KEYS:
        if overrides.get(k) is not None:
            scen[k] = overrides[k]
    scenario = validate_scenario(scen)
    method = str(overrides.get("method") or doc.get("method") or "coun")
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of {', '.join(sorted(METHODS))}")
    hp = dict(doc.get("hparams") or {})
    for k, v in (overrides.get("hparams") or {}).items():
        if v is not None:
            hp[k] = v
    hparams = resolve_hparams(method, upgrade_renamed_hparams(method, hp, warn=warn))
    batch_size = overrides.get("batch_size") or doc.get("batch_size")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 2):
        raise UsageError(f"batch_size must be an integer >= 2, got {batch_size!r}")
    seed = overrides.get("unlearn_seed")
    seed = doc.get("seed") if seed is None else seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise UsageError(f"seed must be a non-negative integer, got {seed!r}")
    return UnlearnConfig(scenario, method, hparams, batch_size, seed, source=doc)
