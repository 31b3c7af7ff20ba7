"""`coun-tune search SPEC`, as named steps:

    make_plan          validate everything, claim the search directory      (plan.py; no Ray yet)
    RaySession         local Ray of our own, or a cluster; cleaned up after  (ray_session.py)
    train_base_models  original + oracle in the cache, by a Ray task
    open_parent_run    the MLflow parent run and the search state
    build_tuner        Tuner (OptunaSearch, multi-objective) or Tuner.restore on --resume
    fit_trials         run; read from the trials' ends whether the search finished
    conclude           interrupted -> resumable; failed; finished -> Pareto review + export

Every step takes the plan and returns what the next needs; the result is an `Outcome`.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from coun_tune.config.search_spec import Domain, SearchSpec
from coun_tune.core import storage
from coun_tune.report import STDOUT
from coun_tune.search.plan import SearchPlan, SearchState, make_plan

FINISHED, INTERRUPTED, FAILED, ALREADY_FINISHED = "finished", "interrupted", "failed", "already_finished"
EXPORT_NAME = "exported_knee.yaml"


@dataclass
class RunInfo:
    """What every trial needs besides its sampled config (passed to the trainable as a dict)."""

    scenario: dict
    method: str
    fixed: dict
    batch_size: int | None
    seed: int
    cache_dir: str
    mia_every: int
    cpus: float
    mia_epochs: list[int]  # early-stopping rungs where an objective needs the MIA (else [])
    rung_epochs: list[int]  # the scheduler's rungs (else []): a trial checkpoints there
    checkpoint_every: int  # and every this many epochs, and at its last (trainable.checkpoint_epoch)
    calibration_seeds: list[int]  # split seeds every trial is scored on (the first: the scenario's)
    objectives: list[str]  # reported per split and with their std over the splits

    @classmethod
    def of(cls, plan: SearchPlan) -> RunInfo:
        s = plan.spec
        return cls(
            scenario=s.scenario.to_dict(),
            method=s.method,
            fixed=dict(s.fixed),
            batch_size=s.batch_size,
            seed=s.scenario.seed,
            cache_dir=plan.cache_dir,
            mia_every=s.mia_every,
            cpus=s.resources_per_trial["cpu"],
            mia_epochs=mia_rung_epochs(s),
            rung_epochs=scheduler_rung_epochs(s),
            checkpoint_every=s.checkpoint_every,
            calibration_seeds=list(s.calibration_seeds),
            objectives=list(s.objectives),
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Outcome:
    status: str  # finished | interrupted | failed | already_finished
    parent_run_id: str
    experiment_id: str
    review: dict | None = None
    export_path: str | None = None

    @property
    def exit_code(self) -> int:
        return {INTERRUPTED: 130, FAILED: 1}.get(self.status, 0)


# --- Optuna / Tune configuration (one place to change the searcher or add a scheduler) --------


def optuna_space(space: dict[str, Domain]) -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for name, d in space.items():
        if d.kind == "choice":
            out[name] = CategoricalDistribution(list(d.choices))
        elif d.kind == "int":
            out[name] = IntDistribution(int(d.low), int(d.high))
        else:
            out[name] = FloatDistribution(d.low, d.high, log=d.kind == "log")
    return out


def make_sampler(spec: SearchSpec, seed: int | None = None):
    """`seed`: the sampler's seed if not the spec's (a warm-started search, see make_searcher)."""
    import optuna

    seed = spec.seed if seed is None else seed

    # Every model-based sampler starts with random configs for about half the budget.
    half = max(2, spec.num_samples // 2)
    if spec.sampler == "nsga2":
        # NSGA-II's first generation is random; a population of about half the budget lets a
        # small search see at least one generation of selection.
        from coun_tune.search.samplers import NoRepeatNSGAII

        return NoRepeatNSGAII(population_size=min(50, half), seed=seed)
    # TPE and GP draw their first n_startup_trials at random (Optuna's default: 10), so a search
    # of 10 trials or fewer never used the model (measured: at 8 trials, tpe and gp proposed
    # exactly random's configs); at most Optuna's 10.
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=min(10, half))
    if spec.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=min(10, half))
    return optuna.samplers.RandomSampler(seed=seed)


def make_searcher(
    spec: SearchSpec,
    study_name: str | None = None,
    journal: str | None = None,
    warm_start=None,
    study_attrs: dict | None = None,
):
    """The searcher; with `journal`, its study `study_name` lives in that JournalStorage file
    (optuna-dashboard reads it; `study_attrs` become its user attrs), else in memory.
    `warm_start`: configs enqueued as the first trials (search.warm_start)."""
    # tells trials the scheduler stopped to Optuna as PRUNED (Ray's OptunaSearch: COMPLETE)
    from coun_tune.search.samplers import PruningOptunaSearch

    return PruningOptunaSearch(
        space=optuna_space(spec.space),
        metric=list(spec.objectives),
        mode=list(spec.objectives.values()),
        sampler=make_sampler(spec, warm_seed(spec.seed, warm_start)),
        seed=spec.seed,
        study_name=study_name,
        storage=open_journal(journal) if journal else None,
        points_to_evaluate=list(warm_start or []) or None,
        study_attrs=study_attrs,
    )


def warm_seed(seed: int, warm_start) -> int | None:
    """A warm-started search's sampler seed: the spec's seed mixed with the queued configs. With
    the spec's own seed a search warm-started from an earlier run of the same spec replays that
    run's random draws after the queue, and so re-runs the very configs it was given (seen: the
    README's main job warm-started from itself ran its knee config twice)."""
    if not warm_start:
        return None
    return (seed * 1_000_003 + zlib.crc32(json.dumps(warm_start, sort_keys=True).encode())) % 2**31


OPTUNA_JOURNAL = "optuna.journal"


def open_journal(path: str):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    os.makedirs(os.path.dirname(path), exist_ok=True)
    return JournalStorage(JournalFileBackend(path))


def study_journal(plan: SearchPlan) -> str:
    """Where the search's Optuna study lives (study name: the search's directory name). The
    driver writes it, so it is a file the driver's machine (the head, on a cluster) holds: in
    the search's directory when that is local; else beside a SQLite MLflow store; else in the
    head's cache dir. A journal holds many studies (file-locked appends), so searches that
    share one stay apart by name."""
    from coun_tune.tracking.mlflow_store import sqlite_path

    if not storage.is_remote(plan.exp_uri):
        return os.path.join(os.path.abspath(plan.exp_uri), OPTUNA_JOURNAL)
    db = sqlite_path(plan.tracking_uri)
    if db is not None:
        return str(db.resolve().parent / OPTUNA_JOURNAL)
    root = os.environ.get("COUN_TUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "coun-tune")
    return os.path.join(os.path.abspath(root), "optuna", OPTUNA_JOURNAL)


def absolute_tracking_uri(uri: str) -> str:
    """A SQLite URI by absolute path (the study is read from anywhere), others as they are."""
    from coun_tune.tracking.mlflow_store import sqlite_path

    db = sqlite_path(uri)
    return f"sqlite:///{db.resolve()}" if db is not None else uri


def dashboard_command(journal: str) -> str:
    """optuna-dashboard on the journal, by the executable beside this interpreter (works in a
    shell where the venv is not activated). optuna-dashboard is an optional extra and has no
    `python -m` entry: when it is missing, the line says how to install it."""
    python = Path(sys.executable).absolute()
    exe = python.with_name("optuna-dashboard")
    cmd = shlex.join([str(exe), journal])
    if exe.is_file() and os.access(exe, os.X_OK):
        return cmd
    return f"{shlex.join([str(python), '-m', 'pip', 'install', 'optuna-dashboard'])} && {cmd}"


def make_scheduler(plan: SearchPlan):
    """None (every trial runs its budget), or MOASHA with its rungs kept beside a local
    experiment (Tune saves no scheduler state; on s3:// a resumed search starts empty rungs)."""
    cfg = getattr(plan.spec, "scheduler", None)
    if not cfg:
        return None
    from coun_tune.search.scheduler import MOASHA

    state = None if storage.is_remote(plan.exp_uri) else os.path.join(plan.exp_uri, "mo_asha_state.json")
    return MOASHA(plan.spec.objectives, cfg["grace_epochs"], cfg["reduction_factor"], state_path=state)


MIA_OBJECTIVES = ("mia_efficacy", "mia_loss_attack_acc", "mia_gap", "avg_gap")


def mia_rung_epochs(spec: SearchSpec) -> list[int]:
    """The rung epochs when an objective needs the SVC MIA, which is otherwise computed at the
    last epoch only."""
    return scheduler_rung_epochs(spec) if any(m in MIA_OBJECTIVES for m in spec.objectives) else []


def scheduler_rung_epochs(spec: SearchSpec) -> list[int]:
    """The scheduler's rung epochs, up to the largest epochs the space allows ([] without one)."""
    cfg = getattr(spec, "scheduler", None)
    if not cfg:
        return []
    from coun_tune.core.engine import resolve_hparams
    from coun_tune.search.scheduler import rung_epochs

    d = spec.space.get("epochs")
    top = (
        resolve_hparams(spec.method, dict(spec.fixed))["epochs"]
        if d is None
        else max(d.choices)
        if d.kind == "choice"
        else d.high
    )
    return rung_epochs(cfg["grace_epochs"], cfg["reduction_factor"], int(top))


def tune_config(spec: SearchSpec, searcher, scheduler=None):
    from ray import tune

    return tune.TuneConfig(
        search_alg=searcher,
        num_samples=spec.num_samples,
        scheduler=scheduler,
        max_concurrent_trials=spec.max_concurrent_trials,
        # one actor per slot, kept across trials: a fresh actor (a Python process importing torch
        # and Ray, then taking the data from the object store) cost 7-10 s per trial on 2 CPU
        # cores. The trainable keeps no state between calls (unlearn_trial builds everything).
        reuse_actors=True,
    )


# --- the steps --------------------------------------------------------------------------------


def run_search(
    spec: SearchSpec,
    address: str | None = None,
    tracking_uri: str | None = None,
    resume: bool = False,
    out=STDOUT,
    spec_path: str | None = None,
    warm_start: list[dict] | None = None,
) -> Outcome:
    """Run (or resume) a search; see the module docstring for the steps. `spec_path`: the spec
    file as given, for the --resume command printed on an interruption."""
    from coun_tune.search.ray_session import RaySession

    plan = make_plan(spec, address, tracking_uri, resume)
    if spec_path:
        plan.spec_path = os.path.abspath(spec_path)
    if plan.state is not None and plan.state.status == FINISHED:
        print(
            f"search {plan.name} already finished (MLflow parent run {plan.state.parent_run_id}); "
            "nothing to resume. Run the spec without --resume to start a new search.",
            file=out,
        )
        return Outcome(ALREADY_FINISHED, plan.state.parent_run_id, plan.state.experiment_id)
    if plan.resume:
        check_resumable(plan)
    # The SVC MIA (and so mia_*, avg_gap) may be computed only at the last epoch; Optuna reads
    # only the last report, so Tune must not insist every report holds every objective.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # num_to_keep=1 forces a (cheap, small) experiment snapshot per checkpoint; Tune warns about
    # every one of them on short trials, which buries the progress view.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's default loggers stage every trial's files on the driver, and every snapshot then
    # re-uploads all of them (S3 traffic per epoch growing with the trials): TrialFiles writes
    # result.json / params.json of the one trial that reported instead.
    from coun_tune.search.trial_files import DISABLE_TUNE_LOGGERS

    os.environ[DISABLE_TUNE_LOGGERS] = "1"
    # Tune's classic output engine at verbose=0 prints nothing; the new one still prints a
    # config box and paths into the (removed) Ray temp dir. TrialProgress is the view.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    state_written = resume
    parent = None  # (client, state) once the MLflow parent run is open: never left RUNNING
    try:
        with RaySession(address, log=lambda s: print(s, file=out, flush=True)) as session:
            import ray

            from coun_tune.search.resources import check_cluster

            # a request no node can hold would hang for ever: one line and exit 2 instead
            check_cluster(plan.spec.resources_per_trial, plan.spec.max_concurrent_trials, out)
            data_ref = ray.put(plan.data)
            base = train_base_models(plan, data_ref, out)
            session.refresh_record()  # the workers and agents exist now
            client, state = parent = open_parent_run(plan, base)
            state_written = True
            tuner = build_tuner(plan, state, data_ref, warm_start)
            journal = study_journal(plan)
            if os.path.isfile(journal):  # a search resumed from before the journal has none
                where = " (on this machine, the driver's)" if storage.is_remote(plan.exp_uri) else ""
                print(
                    f"optuna study {plan.name}: {journal}{where}; view it: {dashboard_command(journal)}",
                    file=out,
                    flush=True,
                )
            status, rows, wall = fit_trials(plan, tuner)
            return conclude(plan, client, state, status, rows, wall, out, data_ref, base)
    except BaseException as error:
        if parent is not None:
            end_parent_after_error(plan, *parent, error, out)
        raise
    finally:
        if not state_written:  # nothing was started for this search: leave no empty directory
            storage.remove_tree(plan.exp_uri)


TUNER_STATE = "tuner.pkl"  # Tune's saved experiment, written when the Tuner is created


def check_resumable(plan: SearchPlan) -> None:
    """--resume needs Tune's saved experiment beside the search state; without it (its storage
    lost or emptied since) Tuner.restore would end in a traceback after Ray started."""
    from coun_tune.errors import UsageError

    uri = storage.join(plan.exp_uri, TUNER_STATE)
    if not storage.exists(uri):
        raise UsageError(
            f"--resume: search {plan.name} cannot be continued: its Tune state {uri} is gone "
            "(deleted or lost with its storage); run the spec without --resume to start a new search"
        )


def end_parent_after_error(plan: SearchPlan, client, state: SearchState, error: BaseException, out) -> None:
    """The search ended by an exception after its MLflow parent run was opened (a lost bucket,
    an MLflow or Ray failure, a Ctrl-C outside Tune's loop): leave no run RUNNING. An interrupt
    ends them interrupted and resumable (mark_interrupted); anything else FAILED, the parent
    with the reason as its `error` tag. Best effort: the failure may be the store itself."""
    from coun_tune.tracking.mlflow_store import child_runs

    parent_id = state.parent_run_id
    try:
        if client.get_run(parent_id).info.status != "RUNNING":
            return  # conclude ended it before the error
        if isinstance(error, KeyboardInterrupt):
            mark_interrupted(plan, client, state, out)
            return
        for run in child_runs(client, client.get_run(parent_id)):
            if run.info.status == "RUNNING":
                client.set_tag(run.info.run_id, "status", "failed")
                client.set_terminated(run.info.run_id, status="FAILED")
        client.set_tag(parent_id, "status", "failed")
        client.set_tag(parent_id, "error", (" ".join(str(error).split()) or type(error).__name__)[:500])
        client.set_terminated(parent_id, status="FAILED")
    except Exception:  # the original error is what the user must see
        return
    try:
        state.status = FAILED
        state.save(plan.exp_uri)
    except Exception:  # the storage may be what failed
        pass


def train_base_models(plan: SearchPlan, data_ref, out) -> dict:
    """The original and every split's oracle in the cache (trainable.ensure_splits: Ray tasks,
    on a cluster on nodes with the trial's resources). Returns the first calibration split's
    task result with `splits`: {seed: {role, split_hash, num_forget, original, oracle}} for
    every calibration and hold-out split, and `oracle_noise` (when oracle_seeds >= 2)."""
    from coun_tune.search.trainable import ensure_splits

    spec = plan.spec
    results = ensure_splits(
        spec.scenario,
        [*spec.calibration_seeds, *spec.holdout_seeds],
        plan.cache_dir,
        data_ref,
        spec.resources_per_trial,
        out,
        oracle_seeds=spec.oracle_seeds,
        max_failures=spec.max_failures,
    )
    base = results[spec.calibration_seeds[0]]
    for role in ("original", "oracle"):
        how = "from the cache" if base["from_cache"][role] else "trained now (Ray task)"
        print(
            f"{role}: {how}; retain_acc {base[role]['retain_acc']:.2f}, forget_acc {base[role]['forget_acc']:.2f}, "
            f"test_acc {base[role]['test_acc']:.2f}",
            file=out,
        )
    base["splits"] = {
        seed: {
            "role": "calibration" if seed in spec.calibration_seeds else "holdout",
            "split_hash": r["split_hash"],
            "num_forget": r["num_forget"],
            "original": r["original"],
            "oracle": r["oracle"],
        }
        for seed, r in results.items()
    }
    return base


def open_parent_run(plan: SearchPlan, base: dict):
    """The MLflow parent run: created (with the spec and base-model metrics) for a new search,
    reopened on --resume. Returns (client, search state), the state saved beside Tune's."""
    import json

    from coun_tune.tracking.mlflow_store import ROLE, client_for, ensure_experiment, ensure_store, log_params

    spec = plan.spec
    ensure_store(plan.tracking_uri)
    client = client_for(plan.tracking_uri)
    if plan.state is not None:
        state = plan.state
        client.update_run(state.parent_run_id, status="RUNNING")
        client.set_tag(state.parent_run_id, "status", "running")
    else:
        experiment_id = ensure_experiment(client, plan.tracking_uri, spec.name)
        parent = client.create_run(
            experiment_id,
            run_name=plan.name,
            tags={
                ROLE: "search",
                "coun_tune.method": spec.method,
                "status": "running",
                "coun_tune.objectives": json.dumps(spec.objectives),
                "coun_tune.search_dir": plan.exp_uri,
            },
        )
        log_params(
            client,
            parent.info.run_id,
            {
                "sampler": spec.sampler,
                "num_samples": spec.num_samples,
                "method": spec.method,
                "max_concurrent_trials": spec.max_concurrent_trials,
                "split_hash": base["split_hash"],
                **{f"scenario.{k}": v for k, v in spec.scenario.to_dict().items()},
            },
        )
        client.log_dict(parent.info.run_id, spec.to_dict(), "spec.yaml")
        client.log_dict(
            parent.info.run_id,
            {
                "original": base["original"],
                "oracle": base["oracle"],
                "oracle_noise": base.get("oracle_noise", {}),
                "splits": {str(k): v for k, v in base.get("splits", {}).items()},
            },
            "base_models.json",
        )
        client.set_tag(parent.info.run_id, "coun_tune.calibration_seeds", json.dumps(list(spec.calibration_seeds)))
        client.set_tag(parent.info.run_id, "coun_tune.holdout_seeds", json.dumps(list(spec.holdout_seeds)))
        state = SearchState(parent.info.run_id, experiment_id, plan.tracking_uri, plan.spec_hash)
    state.status = "running"
    state.save(plan.exp_uri)
    return client, state


def _tune_storage(exp_uri: str):
    """(storage_filesystem or None, the experiment's path inside it). Local paths go to Tune
    as plain paths (as they always did); s3:// through pyarrow's S3 filesystem."""
    fs, path = storage.filesystem(exp_uri)
    if not storage.is_remote(exp_uri):
        return None, path
    # Tune's files are small (results, experiment state, most checkpoint files): with delayed
    # open pyarrow sends one PUT for a file under its part size, not a 3-request multipart upload
    rebuild, (options,) = fs.__reduce__()
    return rebuild({**options, "allow_delayed_open": True}), path


def build_tuner(plan: SearchPlan, state: SearchState, data_ref, warm_start=None):
    from ray import tune

    from coun_tune.core.engine import resolve_hparams
    from coun_tune.search.progress import TrialProgress
    from coun_tune.search.trainable import unlearn_trial
    from coun_tune.search.trial_files import TrialFiles
    from coun_tune.tracking.trial_logger import MLflowTrialLogger

    spec, res = plan.spec, plan.spec.resources_per_trial
    trainable = tune.with_resources(
        tune.with_parameters(unlearn_trial, data=data_ref, run_info=RunInfo.of(plan).to_dict()),
        {"cpu": res["cpu"], "gpu": res["gpu"]},
    )
    fs, path = _tune_storage(plan.exp_uri)
    if plan.resume:  # callbacks (and their saved state) come back with the experiment
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    logger = MLflowTrialLogger(
        plan.tracking_uri, state.experiment_id, state.parent_run_id, {"method": spec.method, **spec.fixed}
    )
    epochs = None if "epochs" in spec.space else resolve_hparams(spec.method, dict(spec.fixed))["epochs"]
    progress = TrialProgress(plan.name, list(spec.objectives), list(spec.space), spec.num_samples, epochs)
    return tune.Tuner(
        trainable,
        tune_config=tune_config(
            spec,
            make_searcher(
                spec,
                plan.name,
                study_journal(plan),
                warm_start,
                {
                    "mlflow_tracking_uri": absolute_tracking_uri(plan.tracking_uri),
                    "mlflow_experiment_id": state.experiment_id,
                    "mlflow_parent_run_id": state.parent_run_id,
                },
            ),
            make_scheduler(plan),
        ),
        run_config=tune.RunConfig(
            name=plan.name,
            storage_path=path.rsplit("/", 1)[0],
            storage_filesystem=fs,
            callbacks=[logger, progress, TrialFiles()],
            # a trial whose node was lost (a spot preemption) resumes from its last checkpoint
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            verbose=0,  # our TrialProgress prints one line per trial event instead
            # resume and the MLflow model artifact need only the latest
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    )


def fit_trials(plan: SearchPlan, tuner) -> tuple[str, dict, float]:
    """Run the trials. Returns (finished | interrupted | failed, trial rows, wall seconds).

    Interrupted is read from how each trial ended, not from counts: on Ctrl-C Tune saves its
    state, then marks the trials it stops TERMINATED like finished ones, so a Ctrl-C after the
    sampler created its last trial looked like a finished search."""
    from coun_tune.search.progress import COMPLETED, PRUNED, trial_rows
    from coun_tune.search.progress import FAILED as TRIAL_FAILED

    t0 = time.time()
    tuner.fit()
    rows = trial_rows(plan.name)
    ends = [r["status"] for r in rows.values()]
    if len(ends) < plan.spec.num_samples or any(e not in (COMPLETED, TRIAL_FAILED, PRUNED) for e in ends):
        return INTERRUPTED, rows, time.time() - t0
    return (FINISHED if COMPLETED in ends else FAILED), rows, time.time() - t0


HOLDOUT_RECORDS = "holdout_records.json"


def mark_interrupted(plan: SearchPlan, client, state: SearchState, out) -> None:
    """Tune (or the hold-out check) saved its state: leave the search resumable, with no run
    claiming to be running."""
    from coun_tune.tracking.mlflow_store import child_runs

    parent_id = state.parent_run_id
    for run in child_runs(client, client.get_run(parent_id)):
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, "status", "interrupted")
            client.set_terminated(run.info.run_id, status="KILLED")
    client.set_tag(parent_id, "status", "interrupted")
    client.set_terminated(parent_id, status="KILLED")
    state.status = INTERRUPTED
    state.save(plan.exp_uri)
    from coun_tune.tracking.mlflow_store import coun_tune_command

    print(
        # from the directory the search ran in: a spec's relative storage_path / tracking_uri
        # resolve against it, so the line works pasted into any shell
        f"\nsearch interrupted; continue it with:\n  cd {shlex.quote(os.getcwd())} && "
        f"{coun_tune_command('search', plan.spec_path, '--resume')}",
        file=out,
    )


def run_holdout(plan: SearchPlan, client, state: SearchState, data_ref, base: dict, out) -> None:
    """The hold-out check (tracking.holdout.validate_front): the calibration front re-run on the
    spec's hold-out splits as Ray tasks with the trial's resources. Finished runs are kept in
    the search directory, so a resumed search repeats none of them."""
    import json

    from coun_tune.search.holdout import run_configs
    from coun_tune.tracking.holdout import validate_front

    spec = plan.spec
    seeds = list(spec.holdout_seeds)
    uri = storage.join(plan.exp_uri, HOLDOUT_RECORDS)
    records = json.loads(storage.read_bytes(uri)) if storage.exists(uri) else []
    splits = base.get("splits", {})
    reference = {s: splits[s]["original"] for s in seeds if s in splits}
    print(
        f"\nhold-out check: re-running the front on {len(seeds)} unseen forget sets (Ray tasks)", file=out, flush=True
    )
    validate_front(
        client,
        state.parent_run_id,
        seeds,
        lambda configs, done, on_record, labels: run_configs(
            configs,
            seeds,
            plan.cache_dir,
            data_ref,
            spec.resources_per_trial,
            done,
            on_record,
            log=lambda line: print(line, file=out, flush=True),
            labels=labels,
        ),
        reference,
        base.get("oracle_noise", {}),
        records=records,
        save=lambda recs: storage.write_bytes(uri, json.dumps(recs).encode()),
        out=out,
    )


def annotate_optuna_study(plan: SearchPlan, review: dict) -> None:
    """The review's trial numbers, knee and hold-out means on the Optuna study (search.study_notes);
    optuna-dashboard is a view, so a failure here is a warning, never the search's failure."""
    from coun_tune.search.study_notes import annotate_study

    try:
        annotate_study(open_journal(study_journal(plan)), plan.name, review["all_rows"], list(plan.spec.objectives))
    except Exception as e:  # noqa: BLE001
        print(f"coun-tune: warning: the Optuna study was not annotated ({type(e).__name__}: {e})", file=sys.stderr)


def conclude(
    plan: SearchPlan, client, state: SearchState, status: str, rows: dict, wall: float, out, data_ref=None, base=None
) -> Outcome:
    from coun_tune.search.progress import summary
    from coun_tune.tracking.export import export_config
    from coun_tune.tracking.review import review_pareto

    spec, parent_id = plan.spec, state.parent_run_id
    print("\n" + summary(rows, list(spec.objectives), list(spec.space), spec.num_samples, wall), file=out)
    outcome = Outcome(status, parent_id, state.experiment_id)
    from coun_tune.tracking.trial_logger import MLflowTrialLogger

    if MLflowTrialLogger.unwritten_by_parent.get(parent_id):
        # MLflow still down when the trials ended (the logger said so): call it no more; the
        # unwritten records are saved with Tune's experiment and --resume writes them, then ends
        # the search as it would have ended now
        from coun_tune.tracking.mlflow_store import coun_tune_command

        outcome.status = state.status = INTERRUPTED
        state.save(plan.exp_uri)
        print(
            f"\nsearch left resumable; once MLflow answers, continue it with:\n  cd {shlex.quote(os.getcwd())} && "
            f"{coun_tune_command('search', plan.spec_path, '--resume')}",
            file=out,
        )
        return outcome
    if status == INTERRUPTED:
        mark_interrupted(plan, client, state, out)
        return outcome
    if status == FAILED:
        client.set_tag(parent_id, "status", "failed")
        client.set_terminated(parent_id, status="FAILED")
        state.status = FAILED
        state.save(plan.exp_uri)
        print(
            f"\nno trial completed (their reasons are the `error` tags of the child runs in MLflow "
            f"experiment {spec.name!r})",
            file=out,
        )
        return outcome
    if spec.holdout_seeds:
        import signal
        import threading

        # Tune's SIGINT handler outlives tuner.fit() and only sets a stop flag Tune no longer
        # reads: a Ctrl-C during the check must raise here instead
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.default_int_handler) if main else None
        try:
            run_holdout(plan, client, state, data_ref, base or {}, out)
        except KeyboardInterrupt:  # the trials are done; --resume re-runs only the unfinished hold-out runs
            outcome.status = INTERRUPTED
            mark_interrupted(plan, client, state, out)
            return outcome
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
    client.set_tag(parent_id, "status", "completed")
    client.log_metric(parent_id, "search_wall_seconds", wall)
    outcome.review = review_pareto(client, parent_id, spec.objectives, out=out)
    annotate_optuna_study(plan, outcome.review)
    export_uri = storage.join(plan.exp_uri, EXPORT_NAME)
    with tempfile.TemporaryDirectory() as d:
        export_config(client, parent_id, "knee", Path(d) / EXPORT_NAME, stream=out)
        storage.write_bytes(export_uri, (Path(d) / EXPORT_NAME).read_bytes())
    outcome.export_path = export_uri if storage.is_remote(export_uri) else os.path.relpath(export_uri)
    client.set_terminated(parent_id, status="FINISHED")
    state.status = FINISHED
    state.save(plan.exp_uri)
    print(f"\nexported the knee config to {outcome.export_path}", file=out)
    if not storage.is_remote(export_uri):
        from coun_tune.tracking.mlflow_store import coun_tune_command

        apply = coun_tune_command("unlearn", "--config", os.path.abspath(export_uri), "--output", "out/")
        print(f"  apply it: {apply}", file=out)
    # the review printed the link to this search's runs (and how to serve a SQLite store) above
    print(f"MLflow: experiment {spec.name!r}, parent run {parent_id} (the review link is above)", file=out)
    return outcome
