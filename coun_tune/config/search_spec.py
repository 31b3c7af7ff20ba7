"""The search spec: one YAML file says what to search, how, and where results go. Everything
is validated here, before Ray starts: one line naming the problem, exit code 2, nothing logged.

    name: digits_quick                   # the MLflow experiment (Ray's and MLflow's word)
    scenario: {dataset: digits, forget: "random:0.1", seed: 0}
    method: coun
    objectives: {forget_gap: min, retain_acc: max}     # two or three metrics the engine logs
    space:                                # any hyperparameter the method declares
      temperature: {log: [0.02, 0.3]}     # log-uniform
      cl_weight: {log: [0.1, 6.0]}
      lr: {uniform: [0.01, 0.1]}          # linear
      epochs: {int: [1, 3]}               # integer range (inclusive)
      # batch-free examples: {choice: [0.05, 0.1, 0.2]}, or a plain value to fix it
    sampler: nsga2                        # nsga2 | tpe | gp | random
    num_samples: 8                        # trials
    max_concurrent_trials: 2
    resources_per_trial: {cpu: 1, gpu: 0}   # fractional GPUs allowed, e.g. 0.25
    seed: 0                               # sampler seed
    storage_path: ./coun_tune_results     # Tune's experiments: a path (NFS on a cluster) or s3://bucket/prefix
    storage_endpoint: null                # S3-compatible server, e.g. http://10.0.0.5:9000 (else $AWS_ENDPOINT_URL)
    tracking_uri: sqlite:///mlflow.db     # MLflow; an http://host:port server works the same
    cache_dir: null                       # base models, path or s3:// (default $COUN_TUNE_CACHE, ~/.cache/coun-tune)
    scheduler: null                       # or {type: mo_asha, grace_epochs: 1, reduction_factor: 3}
    batch_size: null                      # default: the dataset's
    mia_every: 0                          # SVC MIA cadence in epochs; 0 = final epoch only
    calibration: {split_seeds: [0, 1, 2]} # forget sets every trial is scored on (the mean is
                                          # the objective); default [the scenario's split seed]
    holdout: {split_seeds: [100, 101]}    # forget sets no trial saw: the front is re-run on them
                                          # after the trials, and picks use their means
    oracle_seeds: 3                       # oracles per seed on the first calibration split: the
                                          # noise floor of every gap (1 = not measured)
    max_failures: 3                       # retries of a failed trial or a lost base-model task (a
                                          # lost spot node): it resumes from its last checkpoint;
                                          # -1 = forever, 0 = none
    checkpoint_every: 1                   # a trial's checkpoint every N epochs (and always at its
                                          # last epoch and at mo_asha's rungs); a resumed or
                                          # retried trial re-runs at most N-1 epochs
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coun_tune.config.unlearn_config import RENAMED_HPARAMS, read_yaml, validate_scenario
from coun_tune.core.methods import METHODS, method_hparams
from coun_tune.core.metrics import METRICS
from coun_tune.core.recipes import Scenario
from coun_tune.errors import UsageError

SAMPLERS = ("nsga2", "tpe", "gp", "random")
DOMAIN_KINDS = ("log", "uniform", "int", "choice")
# Every metric a trial's final report holds: what objectives may name.
LOGGED_METRICS = tuple(METRICS)
KEYS = {
    "name",
    "scenario",
    "method",
    "objectives",
    "space",
    "sampler",
    "num_samples",
    "max_concurrent_trials",
    "resources_per_trial",
    "seed",
    "storage_path",
    "tracking_uri",
    "cache_dir",
    "batch_size",
    "mia_every",
    "description",
    "storage_endpoint",
    "scheduler",
    "calibration",
    "holdout",
    "oracle_seeds",
    "max_failures",
    "checkpoint_every",
}
SCHEDULERS = {"mo_asha": {"grace_epochs": 1, "reduction_factor": 2}}  # type -> {key: lowest allowed}
TRACKING_SCHEMES = ("sqlite:///", "http://", "https://", "postgresql", "mysql", "databricks")


@dataclass
class Domain:
    """A searchable hyperparameter: kind in DOMAIN_KINDS with (low, high) or `choices`."""

    kind: str
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None

    def to_dict(self) -> dict:
        return {self.kind: list(self.choices) if self.kind == "choice" else [self.low, self.high]}


@dataclass
class SearchSpec:
    name: str
    scenario: Scenario
    method: str
    objectives: dict[str, str]
    space: dict[str, Domain]
    fixed: dict[str, Any]
    sampler: str = "nsga2"
    num_samples: int = 8
    max_concurrent_trials: int = 2
    resources_per_trial: dict[str, float] = field(default_factory=lambda: {"cpu": 1, "gpu": 0})
    seed: int = 0
    storage_path: str = "./coun_tune_results"
    tracking_uri: str = "sqlite:///mlflow.db"
    cache_dir: str | None = None
    batch_size: int | None = None
    mia_every: int = 0
    storage_endpoint: str | None = None
    scheduler: dict | None = None  # {type: mo_asha, grace_epochs: int, reduction_factor: int}
    calibration_seeds: tuple[int, ...] = (0,)  # split seeds every trial is scored on (first: the scenario's)
    holdout_seeds: tuple[int, ...] = ()  # split seeds the front is validated on after the trials
    oracle_seeds: int = 1  # oracles (seeds) on the first calibration split; >= 2 measures the noise floor
    max_failures: int = (
        3  # retries of a trial (node died or raised; Tune's FailureConfig) and of a lost base-model task; -1: forever
    )
    checkpoint_every: int = 1  # epochs between a trial's checkpoints (also at its last epoch and the rungs)
    source: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return self.source


def _number(x: Any, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise UsageError(f"{where} must be a finite number, got {x!r}")
    return float(x)


def _domain(name: str, value: Any, kind_of: str) -> Domain | Any:
    """A dict with one key in DOMAIN_KINDS is a domain; anything else is a fixed value."""
    where = f"space.{name}"
    if not isinstance(value, dict):
        _number(value, where)
        return value
    if len(value) != 1 or next(iter(value)) not in DOMAIN_KINDS:
        raise UsageError(f"{where} must be a number or one of {{log|uniform|int|choice: ...}}, got {value!r}")
    kind, arg = next(iter(value.items()))
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise UsageError(f"{where}: empty domain (choice needs a non-empty list)")
        for a in arg:
            _number(a, where)
        return Domain("choice", choices=tuple(arg))
    if not isinstance(arg, list) or len(arg) != 2:
        raise UsageError(f"{where}: {kind} needs [low, high], got {arg!r}")
    low, high = _number(arg[0], where), _number(arg[1], where)
    if not low < high if kind != "int" else not low <= high:
        raise UsageError(f"{where}: empty domain [{arg[0]}, {arg[1]}] (low must be below high)")
    if kind == "log" and low <= 0:
        raise UsageError(f"{where}: a log domain needs low > 0, got {arg[0]}")
    if kind == "int" and (low != int(low) or high != int(high)):
        raise UsageError(f"{where}: int bounds must be integers, got {arg!r}")
    if kind_of == "int" and kind not in ("int", "choice"):
        raise UsageError(f"{where}: {name} is an integer; use {{int: [low, high]}} or choice")
    return Domain(kind, low, high)


def check_tracking_uri_form(uri: Any, where: str = "tracking_uri") -> str:
    """The same rule for the spec's tracking_uri and every --tracking-uri flag."""
    if not isinstance(uri, str) or not uri.startswith(TRACKING_SCHEMES):
        raise UsageError(f"{where} {uri!r}: use sqlite:///FILE or an MLflow server URL (http://host:port)")
    return uri


def _storage_uri(value: Any, key: str) -> str:
    text = str(value)
    if "://" in text and not text.startswith("s3://"):
        raise UsageError(f"{key} {text!r}: use a path (NFS on a cluster) or s3://bucket/prefix")
    if text.startswith("s3://") and not text[5:].split("/", 1)[0]:
        raise UsageError(f"{key} {text!r}: an s3:// URI needs a bucket (s3://bucket/prefix)")
    return text


def _endpoint(value: Any) -> str | None:
    if value is None:
        return None
    from urllib.parse import urlparse

    u = urlparse(str(value))
    if u.scheme not in ("http", "https") or not u.netloc:
        raise UsageError(f"storage_endpoint {value!r}: use http://host:port or https://host")
    return str(value)


def _scheduler(value: Any) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in SCHEDULERS:
        raise UsageError(f"scheduler must be {{type: {' | '.join(SCHEDULERS)}, ...}}, got {value!r}")
    lows = SCHEDULERS[value["type"]]
    extra = sorted(set(value) - {"type", *lows})
    if extra:
        raise UsageError(f"unknown key {extra[0]!r} in scheduler; allowed: type, {', '.join(lows)}")
    out = {"type": value["type"]}
    for k, low in lows.items():
        v = value.get(k, low)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise UsageError(f"scheduler.{k} must be an integer >= {low}, got {v!r}")
        out[k] = v
    return out


def _split_seeds(value: Any, key: str, default: tuple[int, ...] | None) -> tuple[int, ...]:
    """`{split_seeds: [s, ...]}`: distinct integers >= 0, at least one."""
    if value is None:
        return default or ()
    if not isinstance(value, dict) or set(value) != {"split_seeds"}:
        raise UsageError(f"{key} must be {{split_seeds: [seed, ...]}}, got {value!r}")
    seeds = value["split_seeds"]
    if not isinstance(seeds, list) or not seeds:
        raise UsageError(f"{key}.split_seeds must be a non-empty list of integers, got {seeds!r}")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise UsageError(f"{key}.split_seeds: each seed must be an integer >= 0, got {s!r}")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"{key}.split_seeds lists a seed twice: {seeds}")
    return tuple(seeds)


def _splits(doc: dict, scenario: Scenario) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(calibration seeds, hold-out seeds, oracle seeds), checked: a hold-out split must be one
    no trial is scored on, or it measures nothing the search did not already see."""
    calibration = _split_seeds(doc.get("calibration"), "calibration", (scenario.forget_seed,))
    holdout = _split_seeds(doc.get("holdout"), "holdout", None)
    both = sorted(set(calibration) & set(holdout))
    if both:
        raise UsageError(f"holdout.split_seeds {both} are calibration splits too: a hold-out split must be unseen")
    oracle_seeds = doc.get("oracle_seeds", 1)
    if isinstance(oracle_seeds, bool) or not isinstance(oracle_seeds, int) or oracle_seeds < 1:
        raise UsageError(f"oracle_seeds must be an integer >= 1, got {oracle_seeds!r}")
    return calibration, holdout, oracle_seeds


def _check_grace(scheduler: dict | None, method: str, space: dict, fixed: dict) -> None:
    """mo_asha's first rung must be reachable: grace_epochs above every trial's epochs would
    stop nothing and compare nothing."""
    if not scheduler:
        return
    from coun_tune.core.engine import resolve_hparams

    d = space.get("epochs")
    top = (
        resolve_hparams(method, dict(fixed))["epochs"]
        if d is None
        else (max(d.choices) if d.kind == "choice" else d.high)
    )
    if scheduler["grace_epochs"] > top:
        raise UsageError(
            f"scheduler.grace_epochs {scheduler['grace_epochs']} is above the largest epochs "
            f"a trial can run ({int(top)})"
        )


def _objectives(value: Any) -> dict[str, str]:
    objectives = value or {"forget_gap": "min", "retain_acc": "max"}
    if not isinstance(objectives, dict) or not 2 <= len(objectives) <= 3:
        raise UsageError("objectives must map two or three metrics to min or max")
    for m, mode in objectives.items():
        if m not in LOGGED_METRICS:
            raise UsageError(
                f"objective {m!r} is not a metric the engine logs; choose from {', '.join(LOGGED_METRICS)}"
            )
        if mode not in ("min", "max"):
            raise UsageError(f"objective {m}: mode must be min or max, got {mode!r}")
    return dict(objectives)


def _space(value: Any, method: str) -> tuple[dict[str, Domain], dict[str, Any]]:
    """(searched domains, fixed values) of the spec's `space`, every corner of it a config the
    engine accepts: the fixed values and each domain's ends (or choices) are checked now, not in
    trials after Ray and MLflow have started."""
    from coun_tune.core.engine import resolve_hparams

    declared = method_hparams(method)
    space_doc = value or {}
    if not isinstance(space_doc, dict):
        raise UsageError("space must be a mapping of hyperparameter -> domain or value")
    space, fixed = {}, {}
    for hp, v in space_doc.items():
        if hp in RENAMED_HPARAMS and RENAMED_HPARAMS[hp] in declared:
            # a searched epoch count has no single share of the epochs (the epochs vary per trial):
            # name the new key instead of converting
            new = RENAMED_HPARAMS[hp]
            raise UsageError(
                f"space.{hp}: renamed {new}, a share of the trial's epochs (n of E epochs is {new} n/E); "
                f"search {new} in [0, 1] instead"
            )
        if hp not in declared:
            raise UsageError(
                f"space.{hp}: method {method!r} has no hyperparameter {hp!r}; it has {', '.join(sorted(declared))}"
            )
        d = _domain(hp, v, declared[hp].kind)
        (space if isinstance(d, Domain) else fixed)[hp] = d
    if not space:
        raise UsageError("space has no searchable hyperparameter")
    for hp, v in fixed.items():  # a bad fixed value is named by its own key
        try:
            resolve_hparams(method, {hp: v})
        except UsageError as e:
            raise UsageError(f"space.{hp}: {e}") from None
    for hp, d in space.items():
        for v in d.choices if d.kind == "choice" else (d.low, d.high):
            try:
                resolve_hparams(method, {**fixed, hp: v})
            except UsageError as e:
                raise UsageError(f"space.{hp}: {e}") from None
    return space, fixed


INT_KEYS = (  # (key, default, lowest allowed)
    ("num_samples", 8, 1),
    ("max_concurrent_trials", 2, 1),
    ("seed", 0, 0),
    ("mia_every", 0, 0),
    ("max_failures", 3, -1),  # -1: retry for ever (Tune's convention)
    ("checkpoint_every", 1, 1),
)


def _ints(doc: dict) -> dict[str, int]:
    ints = {}
    for k, default, low in INT_KEYS:
        v = doc.get(k, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise UsageError(f"{k} must be an integer >= {low}, got {v!r}")
        ints[k] = v
    return ints


def _resources(value: Any) -> dict[str, float]:
    res = value or {"cpu": 1, "gpu": 0}
    if not isinstance(res, dict) or set(res) - {"cpu", "gpu"}:
        raise UsageError(f"resources_per_trial takes cpu and gpu, got {res!r}")
    cpu = _number(res.get("cpu", 1), "resources_per_trial.cpu")
    gpu = _number(res.get("gpu", 0), "resources_per_trial.gpu")
    if cpu <= 0 or gpu < 0 or (gpu > 1 and gpu != int(gpu)):
        raise UsageError(
            f"resources_per_trial: cpu must be > 0 and gpu a fraction in [0, 1] or a whole number, got {res!r}"
        )
    return {"cpu": cpu, "gpu": gpu}


def validate_search_spec(doc: dict, where: str = "spec") -> SearchSpec:
    """The spec document checked key by key, in the order a user reads it; the first problem is
    one UsageError line."""
    extra = sorted(set(doc) - KEYS)
    if extra:
        raise UsageError(f"unknown key {extra[0]!r} in {where}; allowed: {', '.join(sorted(KEYS))}")
    name = doc.get("name")
    if not isinstance(name, str) or not name.strip():
        raise UsageError(f"{where} needs a `name` (the MLflow experiment)")
    scenario = validate_scenario(doc.get("scenario") or {}, "scenario")
    if scenario.sequential:
        raise UsageError(
            "scenario.forget: sequential requests run with `coun-tune unlearn`; a search tunes one request"
        )
    method = str(doc.get("method", "coun"))
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of {', '.join(sorted(METHODS))}")
    objectives = _objectives(doc.get("objectives"))
    space, fixed = _space(doc.get("space"), method)
    sampler = doc.get("sampler", "nsga2")
    if sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    ints = _ints(doc)
    resources = _resources(doc.get("resources_per_trial"))
    batch_size = doc.get("batch_size")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 2):
        raise UsageError(f"batch_size must be an integer >= 2, got {batch_size!r}")
    storage_path = _storage_uri(doc.get("storage_path", "./coun_tune_results"), "storage_path")
    cache_dir = None if doc.get("cache_dir") is None else _storage_uri(doc["cache_dir"], "cache_dir")
    tracking_uri = check_tracking_uri_form(str(doc.get("tracking_uri", "sqlite:///mlflow.db")))
    scheduler = _scheduler(doc.get("scheduler"))
    _check_grace(scheduler, method, space, fixed)
    calibration, holdout, oracle_seeds = _splits(doc, scenario)
    return SearchSpec(
        name=name.strip(),
        scenario=scenario,
        method=method,
        objectives=objectives,
        space=space,
        fixed=fixed,
        sampler=sampler,
        resources_per_trial=resources,
        storage_path=storage_path,
        tracking_uri=tracking_uri,
        cache_dir=cache_dir,
        batch_size=batch_size,
        storage_endpoint=_endpoint(doc.get("storage_endpoint")),
        scheduler=scheduler,
        calibration_seeds=calibration,
        holdout_seeds=holdout,
        oracle_seeds=oracle_seeds,
        source=dict(doc),
        **ints,
    )


def load_search_spec(path: str | Path) -> SearchSpec:
    return validate_search_spec(read_yaml(path, "spec"), f"spec {Path(path).name}")
