"""What the review found, written back into the search's Optuna study, so optuna-dashboard
shows the same trial identity and the same validation as MLflow.

Optuna numbers trials in ask order from 0; coun-tune (MLflow run names, the CLI tables,
export) numbers them in start order from 1, and the Tune id ties the two (the searcher sets it
as each Optuna trial's `tune_trial_id` user attr). A finished Optuna trial's user attrs cannot
change, so the review's results go on the study as one user attr, `coun_tune_trials`:

    {"<optuna number>": {"trial": "<coun-tune number>", "run_id": "<MLflow run>",
                         "is_knee": bool, "is_pareto": bool,
                         "holdout_<objective>_mean": float, ...}}   # hold-out keys when checked

optuna-dashboard lists it under the study's user attributes."""

from __future__ import annotations

from coun_tune.search.samplers import TUNE_TRIAL_ID

STUDY_TRIALS = "coun_tune_trials"


def trial_notes(optuna_ids: dict[str, int], rows: list[dict], objectives: list[str]) -> dict[str, dict]:
    """optuna_ids: {Tune id: Optuna number}; rows: the review's rows (trial_id, trial_number,
    run_id, is_knee, is_pareto, holdout_<m>_mean). Trials Optuna never saw are left out."""
    notes = {}
    for r in rows:
        number = optuna_ids.get(r.get("trial_id"))
        if number is None:
            continue
        note = {
            "trial": str(r.get("trial_number") or ""),
            "run_id": r["run_id"],
            "is_knee": bool(r.get("is_knee")),
            "is_pareto": bool(r.get("is_pareto")),
        }
        for m in objectives:
            for stat in ("mean", "std"):
                v = r.get(f"holdout_{m}_{stat}")
                if isinstance(v, (int, float)):
                    note[f"holdout_{m}_{stat}"] = float(v)
        notes[str(number)] = note
    return notes


def annotate_study(storage, study_name: str, rows: list[dict], objectives: list[str]) -> int:
    """Set the study's `coun_tune_trials` user attr from the review's rows (every completed
    trial); returns how many trials it names. Idempotent (a second review writes the same)."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage)
    ids = {
        t.user_attrs[TUNE_TRIAL_ID]: t.number for t in study.get_trials(deepcopy=False) if TUNE_TRIAL_ID in t.user_attrs
    }
    notes = trial_notes(ids, rows, objectives)
    study.set_user_attr(STUDY_TRIALS, notes)
    return len(notes)
