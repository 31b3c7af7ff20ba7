"""Optuna samplers of our own (module level, so Tune can pickle the searcher that holds them)."""

from __future__ import annotations

import optuna


class NoRepeatNSGAII(optuna.samplers.NSGAIISampler):
    """NSGA-II that never proposes a config already tried.

    With a small population, crossover of one elite with itself reproduces it (measured: 8
    repeats in 20 seeded 8-trial searches of digits_quick's space), and a repeat spends a trial
    on a known answer. A repeat is replaced by NSGA-II's own fallback for parameters it does
    not sample jointly: a random draw."""

    def sample_relative(self, study, trial, search_space):
        params = super().sample_relative(study, trial, search_space)
        # compare on the jointly sampled keys only: the rest (an int domain, say) is drawn
        # independently and repeats a small range by chance
        if params and any(all(t.params.get(k) == v for k, v in params.items())
                          for t in study.get_trials(deepcopy=False) if t.number != trial.number):
            return {}
        return params
