"""Optuna's hyperparameter importances per objective, from a search's trial rows in MLflow.

The study the search ran lives inside Tune's searcher (or, once persisted, in an Optuna
storage); this rebuilds an in-memory study from what MLflow holds, so the review works on any
finished search: each completed trial becomes `optuna.trial.create_trial(params, distributions,
values)` with the distributions of the spec's space (`log`, `uniform`, `int`, `choice`), and
`optuna.importance.get_param_importances(study, target=<one objective>)` is asked once per
objective. The evaluator is fANOVA (Optuna's default; a random forest, seeded here so a second
review gives the same numbers). Importances per objective sum to 1 over the searched
hyperparameters; with fewer than 2 completed trials, or nothing varied, there is nothing to say.
"""

from __future__ import annotations

from typing import Any

IMPORTANCE_PREFIX = "param_importance"  # parent metrics param_importance/<objective>/<param>


def _distribution(entry: Any, values: list):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    kind, arg = next(iter(entry.items())) if isinstance(entry, dict) and len(entry) == 1 else (None, None)
    if kind == "log":
        return FloatDistribution(float(arg[0]), float(arg[1]), log=True)
    if kind == "uniform":
        return FloatDistribution(float(arg[0]), float(arg[1]))
    if kind == "int":
        return IntDistribution(int(arg[0]), int(arg[1]))
    if kind == "choice":
        return CategoricalDistribution([_number(c) for c in arg])
    return CategoricalDistribution(sorted(set(values), key=str))  # no spec: the values seen


def _number(v: Any) -> Any:
    """MLflow keeps params as strings: back to int / float where they were numbers."""
    if isinstance(v, str):
        for cast in (int, float):
            try:
                return cast(v)
            except ValueError:
                pass
    return v


def param_importances(
    rows: list[dict], objectives: dict[str, str], space: dict[str, Any], params: list[str], seed: int = 0
) -> dict[str, dict[str, float]]:
    """{objective: {param: importance}} (each objective's importances sum to 1), or {} when
    fewer than two completed trials vary a searched hyperparameter. rows: trial rows with
    `param.<name>` (strings as MLflow holds them) and the objectives' values."""
    import optuna

    names = list(objectives)
    rows = [r for r in rows if all(isinstance(r.get(k), (int, float)) for k in names)]
    rows = [r for r in rows if all(f"param.{p}" in r for p in params)]
    if len(rows) < 2 or not params:
        return {}
    quiet = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in memory" line
    try:
        return _importances(rows, objectives, space, params, seed)
    finally:
        optuna.logging.set_verbosity(quiet)


def _importances(rows, objectives, space, params, seed):
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    names = list(objectives)
    dists = {p: _distribution(space.get(p), [_number(r[f"param.{p}"]) for r in rows]) for p in params}
    study = optuna.create_study(directions=["minimize" if m == "min" else "maximize" for m in objectives.values()])
    for r in rows:
        values = {p: _number(r[f"param.{p}"]) for p in params}
        for p, d in dists.items():  # a float logged as "0.05" of an int domain, etc.
            if isinstance(d, optuna.distributions.IntDistribution):
                values[p] = int(round(float(values[p])))
            elif isinstance(d, optuna.distributions.FloatDistribution):
                values[p] = float(values[p])
        study.add_trial(
            optuna.trial.create_trial(params=values, distributions=dists, values=[float(r[k]) for k in names])
        )
    out = {}
    for i, k in enumerate(names):
        try:
            got = get_param_importances(
                study, evaluator=FanovaImportanceEvaluator(seed=seed), target=lambda t, i=i: t.values[i]
            )
        except (RuntimeError, ValueError):  # e.g. every trial has the same value of everything
            continue
        out[k] = {p: float(v) for p, v in got.items()}
    return out
