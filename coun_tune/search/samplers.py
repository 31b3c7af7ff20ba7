"""Optuna samplers and the Tune searcher of our own (module level, so Tune can pickle them)."""

from __future__ import annotations

import warnings

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from coun_tune.tracking.trial_logger import pruned_at_epoch

# user attr of a trial asked before an interrupt and lost with Tune's unsaved state
ORPHANED = "coun_tune_orphaned_by_resume"
TUNE_TRIAL_ID = "tune_trial_id"  # user attr: the trial's Tune id


class NoRepeatNSGAII(optuna.samplers.NSGAIISampler):
    """NSGA-II that never proposes a config already tried.

    With a small population, crossover of one elite with itself reproduces it (measured: 8
    repeats in 20 seeded 8-trial searches of digits_quick's space), and a repeat spends a trial
    on a known answer. A repeat is replaced by NSGA-II's own fallback for parameters it does
    not sample jointly: a random draw."""

    # Tune pickles the searcher with the Tuner (tuner.pkl, --resume). Optuna 5.1's NSGA-II holds
    # a threading lock (`_thread_lock`), which cannot be pickled: drop it and make a fresh one.
    def __getstate__(self):
        state = self.__dict__.copy()
        if "_thread_lock" in state:
            state["_thread_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if "_thread_lock" in state:
            import threading

            self._thread_lock = threading.Lock()

    def sample_relative(self, study, trial, search_space):
        params = super().sample_relative(study, trial, search_space)
        # compare on the jointly sampled keys only: the rest (an int domain, say) is drawn
        # independently and repeats a small range by chance
        if params and any(
            all(t.params.get(k) == v for k, v in params.items())
            for t in study.get_trials(deepcopy=False)
            if t.number != trial.number
        ):
            return {}
        return params


class PruningOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna the truth about early-stopped trials.

    Ray's OptunaSearch tells every trial that ended without error as COMPLETE with its last
    values; a trial the scheduler stopped at a rung would then teach the sampler a truncated
    result as if it were final. Here such a trial (its last result short of its planned
    epochs, see `pruned_at_epoch`) is told as PRUNED, without values (Optuna keeps values for
    COMPLETE trials only); the epoch and the values at the rung go into its user attrs."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if self._told_before(trial_id):
            self._completed_trials.add(trial_id)
            return
        epoch = None if error or not result else pruned_at_epoch(result)
        if epoch is None or trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result=result, error=error)
        ot_trial = self._ot_trials[trial_id]
        ot_trial.set_user_attr("pruned_at_epoch", epoch)
        names = self.metric if isinstance(self.metric, list) else [self.metric]
        ot_trial.set_user_attr("values_at_pruning", {m: result.get(m) for m in names})
        self._ot_study.tell(ot_trial, None, state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)

    # --- a persistent study (a JournalStorage file the driver writes) across --resume ---------

    def __init__(self, *args, study_attrs: dict | None = None, **kwargs):
        self._study_attrs = dict(study_attrs or {})  # before super(): it sets the study up
        super().__init__(*args, **kwargs)

    def _setup_study(self, mode):
        """The study as optuna-dashboard shows it: objectives by name (not "Objective 0"), and
        where the search lives in MLflow as study user attrs. Optuna's "A new study created"
        log line is left out: the search prints its own line with the journal's path."""
        quiet = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            super()._setup_study(mode)
        finally:
            optuna.logging.set_verbosity(quiet)
        if self._storage is None:
            return
        if isinstance(self._metric, list):
            with warnings.catch_warnings():  # experimental since Optuna 3.2, still in 5.0
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self._ot_study.set_metric_names(list(self._metric))
        for k, v in self._study_attrs.items():
            self._ot_study.set_user_attr(k, v)

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        if self._storage is not None and trial_id in self._ot_trials:
            # the study's trial numbers are Optuna's (ask order, from 0); the Tune id ties a
            # trial in optuna-dashboard to its MLflow run (tag coun_tune.trial_id)
            self._ot_trials[trial_id].set_user_attr(TUNE_TRIAL_ID, trial_id)
        return config

    def _told_before(self, trial_id: str) -> bool:
        """True when the storage already holds this trial as finished: a resumed search reruns
        a trial Tune's last checkpoint saw running although its result reached the storage
        before the interrupt (a SIGKILL between the tell and Tune's snapshot). Telling it again
        raises; its values are already there, so nothing is told twice."""
        if self._storage is None or trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return False
        frozen = self._storage.get_trial(self._ot_trials[trial_id]._trial_id)
        return frozen.state.is_finished()

    def restore(self, checkpoint_path: str):
        """Tune's restore unpickles the study, whose storage is the same journal file (an
        absolute path), so the resumed searcher reads and writes the study it left. A trial
        asked after the checkpoint Tune restores was never run by Tune and never will be (Tune
        asks anew): it would stay RUNNING in the storage for ever, so it is ended FAIL, marked."""
        super().restore(checkpoint_path)
        if self._storage is None or self._ot_study is None:
            return
        known = {t._trial_id for t in self._ot_trials.values()}
        for frozen in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if frozen._trial_id not in known:
                self._storage.set_trial_user_attr(frozen._trial_id, ORPHANED, True)
                self._storage.set_trial_state_values(frozen._trial_id, TrialState.FAIL)
