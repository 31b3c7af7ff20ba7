"""The project's own Optuna searcher (runner.make_searcher -> samplers.PruningOptunaSearch),
driven by hand as Tune drives it (suggest, then on_trial_complete), without starting Ray: its
study's directions follow the objectives' min/max, a trial the scheduler stopped short of its
planned epochs is told to Optuna as PRUNED (no values; the rung in user attrs), a trial that ran
its budget as COMPLETE with its values, and NSGA-II's population is half the budget."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.study import StudyDirection
from optuna.trial import TrialState

from coun_tune.config.search_spec import load_search_spec
from coun_tune.search.runner import make_searcher
from coun_tune.search.samplers import NoRepeatNSGAII, PruningOptunaSearch
from coun_tune.tracking.trial_logger import EPOCHS_PLANNED

SPEC = Path(__file__).parent.parent / "search_spaces" / "digits_quick.yaml"


def _spec(objectives: dict[str, str], num_samples: int = 8, sampler: str = "nsga2"):
    spec = load_search_spec(SPEC)
    spec.objectives, spec.num_samples, spec.sampler = objectives, num_samples, sampler
    return spec


@pytest.mark.parametrize(
    "objectives,directions",
    [
        ({"forget_gap": "min", "retain_acc": "max"}, [StudyDirection.MINIMIZE, StudyDirection.MAXIMIZE]),
        ({"retain_acc": "max", "avg_gap": "min"}, [StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE]),
        ({"test_acc": "max"}, [StudyDirection.MAXIMIZE]),
    ],
)
def test_directions_follow_the_objectives(objectives, directions):
    searcher = make_searcher(_spec(objectives))
    assert isinstance(searcher, PruningOptunaSearch)
    assert searcher._ot_study.directions == directions


def test_a_stopped_trial_is_told_as_pruned_and_a_finished_one_as_complete():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    searcher = make_searcher(_spec({"forget_gap": "min", "retain_acc": "max"}))
    a, b = searcher.suggest("a"), searcher.suggest("b")
    assert set(a) == set(b) == {"temperature", "cl_weight", "lr", "epochs"}
    # "a" stopped by the scheduler at epoch 2 of 5; "b" ran all its epochs
    searcher.on_trial_complete("a", {"forget_gap": 3.5, "retain_acc": 91.0, "epoch": 2, EPOCHS_PLANNED: 5})
    searcher.on_trial_complete("b", {"forget_gap": 1.25, "retain_acc": 97.5, "epoch": 5, EPOCHS_PLANNED: 5})
    ta, tb = searcher._ot_study.get_trials(deepcopy=False)
    assert ta.state == TrialState.PRUNED and ta.values is None
    assert ta.user_attrs["pruned_at_epoch"] == 2
    assert ta.user_attrs["values_at_pruning"] == {"forget_gap": 3.5, "retain_acc": 91.0}
    assert tb.state == TrialState.COMPLETE and tb.values == [1.25, 97.5]
    assert "pruned_at_epoch" not in tb.user_attrs
    # a second report for a trial already told changes nothing (Tune may call twice on errors)
    searcher.on_trial_complete("a", {"forget_gap": 0.0, "retain_acc": 99.0, "epoch": 2, EPOCHS_PLANNED: 5})
    assert [t.state for t in searcher._ot_study.get_trials(deepcopy=False)] == [TrialState.PRUNED, TrialState.COMPLETE]
    # an errored trial without a result is FAIL, not PRUNED
    searcher.suggest("c")
    searcher.on_trial_complete("c", None, error=True)
    assert searcher._ot_study.get_trials(deepcopy=False)[2].state == TrialState.FAIL


@pytest.mark.parametrize("num_samples,population", [(8, 4), (16, 8), (3, 2), (200, 50)])
def test_nsga2_population_is_half_the_budget(num_samples, population):
    """Half of num_samples, at least 2 and at most 50."""
    sampler = make_searcher(_spec({"forget_gap": "min", "retain_acc": "max"}, num_samples))._ot_study.sampler
    assert isinstance(sampler, NoRepeatNSGAII)
    assert sampler._population_size == population
