"""`coun-tune search SPEC --warm-start EXPERIMENT`: another search's Pareto configs as the first
trials of this one (enqueued in the Optuna study, ahead of anything the sampler proposes).

The front is read from MLflow as `coun-tune pareto` and `export` read it: the search's completed
trial runs, on hold-out means when the search re-ran its front on hold-out forget sets
(review.pick_basis), non-dominated on that search's own objectives (pareto.non_dominated_mask).
Every refusal is one line (UsageError, exit 2) raised before anything is written."""

from __future__ import annotations

import math

import numpy as np

from coun_tune.config.search_spec import Domain, SearchSpec
from coun_tune.errors import UsageError


def _value(name: str, raw: str, d: Domain, where: str):
    """The logged (string) param as a value of this spec's domain, or a one-line refusal."""
    if d.kind == "choice":
        for c in d.choices:
            if str(c) == str(raw):
                return c
        raise UsageError(f"{where}: {name}={raw} is not one of this spec's choices {list(d.choices)}")
    try:
        v = float(raw)
    except ValueError:
        raise UsageError(f"{where}: {name}={raw!r} is not a number, as this spec's {d.kind} domain needs") from None
    if d.kind == "int":
        if v != int(v):
            raise UsageError(f"{where}: {name}={raw} is not an integer, as this spec's int domain needs")
        v = int(v)
    if not (math.isfinite(v) and d.low <= v <= d.high):
        raise UsageError(f"{where}: {name}={raw} is outside this spec's space [{d.low}, {d.high}]")
    return v


def front_configs(spec: SearchSpec, tracking_uri: str, experiment: str) -> tuple[list[dict], str]:
    """(configs of `experiment`'s latest search front, each over this spec's searched
    parameters, in trial-number order and at most num_samples of them; the line to print)."""
    from coun_tune.pareto import non_dominated_mask
    from coun_tune.tracking.mlflow_store import check_tracking_uri, client_for, find_parent_run
    from coun_tune.tracking.review import objectives_of, pick_basis, trial_rows

    flag = f"--warm-start {experiment}"
    check_tracking_uri(tracking_uri, must_exist=True)
    client = client_for(tracking_uri)
    if client.get_experiment_by_name(experiment) is None:
        raise UsageError(f"{flag}: no MLflow experiment of that name in {tracking_uri}")
    parent = find_parent_run(client, experiment)
    objectives = objectives_of(parent)
    rows, basis = pick_basis(trial_rows(client, parent), list(objectives))
    if not rows:
        raise UsageError(f"{flag}: its latest search (run {parent.info.run_id}) has no completed trial")
    values = np.array([[r.get(k, np.nan) for k in objectives] for r in rows], dtype=float)
    front = [r for r, on in zip(rows, non_dominated_mask(values, list(objectives.values()))) if on]
    if not front:
        raise UsageError(f"{flag}: no completed trial of its latest search has every objective {list(objectives)}")
    configs, numbers = [], []
    for r in front:
        where = f"{flag}: front trial {r.get('trial_number') or r['trial_id']}"
        point = {}
        for name, d in spec.space.items():
            raw = r.get(f"param.{name}")
            if raw is None:
                raise UsageError(f"{where} has no parameter {name!r}, which this spec searches")
            point[name] = _value(name, raw, d, where)
        if point not in configs:
            configs.append(point)
            numbers.append(str(r.get("trial_number") or r["trial_id"]))
    n = min(len(configs), spec.num_samples)
    plural, trials = "s" if n != 1 else "", ", ".join(numbers[:n])
    line = f"warm start: {n} Pareto config{plural} of {experiment} (its trials {trials}; front on {basis} values"
    line += f", the first {n} of {len(configs)}: num_samples is {n})" if n < len(configs) else ")"
    return configs[:n], line + " run first"
