"""`coun-tune search SPEC`: validate -> Ray -> base models (Ray task) -> Tuner with
OptunaSearch (multi-objective) -> MLflow child runs -> Pareto review -> exported config."""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from coun_tune.config.search_spec import Domain, SearchSpec
from coun_tune.core.base_models import default_cache_dir
from coun_tune.core.datasets import load_dataset
from coun_tune.errors import UsageError
from coun_tune.tracking.mlflow_store import check_tracking_uri

SEARCH_STATE = "coun_tune_search.json"  # parent run id etc., beside Tune's experiment state


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


def make_sampler(spec: SearchSpec):
    import optuna

    if spec.sampler == "nsga2":
        # NSGA-II's first generation is random; a population of about half the budget lets a
        # small search see at least one generation of selection.
        from coun_tune.search.samplers import NoRepeatNSGAII

        return NoRepeatNSGAII(population_size=max(2, min(50, spec.num_samples // 2)), seed=spec.seed)
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=spec.seed, multivariate=True)
    if spec.sampler == "gp":
        return optuna.samplers.GPSampler(seed=spec.seed)
    return optuna.samplers.RandomSampler(seed=spec.seed)


def run_info_for(spec: SearchSpec, cache_dir: str) -> dict:
    return {"scenario": {k: v for k, v in spec.scenario.to_dict().items()}, "method": spec.method,
            "fixed": dict(spec.fixed), "batch_size": spec.batch_size, "seed": spec.scenario.seed,
            "cache_dir": cache_dir, "mia_every": spec.mia_every, "cpus": spec.resources_per_trial["cpu"]}


def init_ray(address: str | None, num_cpus: int | None = None) -> str | None:
    """Connect to a cluster, or start local Ray in a temp dir of our own (the default /tmp/ray
    is shared by every Ray user of the machine). Returns the temp dir to remove afterwards."""
    import ray

    if ray.is_initialized():
        return None
    if address:
        ray.init(address=address, log_to_driver=False)
        return None
    temp_dir = tempfile.mkdtemp(prefix="ctune-ray-")  # short: Ray's socket paths must fit 107 bytes
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)
    return temp_dir


@dataclass
class _Plan:
    """Everything decided before Ray starts (so a bad input fails with nothing started)."""

    exp_dir: Path
    tracking_uri: str
    data: object
    cache_dir: str


def _plan(spec: SearchSpec, address: str | None, tracking_uri: str | None, resume: bool) -> _Plan:
    storage = Path(spec.storage_path).resolve()
    # Each run of a spec is a new search (a new Tune experiment dir and MLflow parent run, in the
    # one experiment named by the spec); --resume continues the latest of them.
    if resume:
        states = sorted(storage.glob(f"{glob.escape(spec.name)}_*/{SEARCH_STATE}"))
        if not states:
            raise UsageError(f"--resume: no search named {spec.name!r} under {storage} to resume")
        exp_dir = states[-1].parent
    else:
        exp_dir = storage / f"{spec.name}_{time.strftime('%Y%m%d-%H%M%S')}"
        if exp_dir.exists():
            raise UsageError(f"a search {exp_dir.name!r} was started this second under {storage}; try again")
    tracking_uri = tracking_uri or spec.tracking_uri
    check_tracking_uri(tracking_uri, must_exist=resume)
    if address is None and spec.resources_per_trial["gpu"] > 0:
        import torch  # local Ray sees the GPUs torch sees; without one, trials would wait forever

        if spec.resources_per_trial["gpu"] > torch.cuda.device_count():
            raise UsageError(f"resources_per_trial asks for {spec.resources_per_trial['gpu']:g} GPU but local Ray sees "
                             f"{torch.cuda.device_count()}: set gpu: 0 here, or pass --address of a GPU cluster")
    data = load_dataset(spec.scenario.dataset, spec.scenario.data_root)  # bad data dirs fail here too
    cache_dir = str(Path(spec.cache_dir).resolve() if spec.cache_dir else default_cache_dir())
    return _Plan(exp_dir, tracking_uri, data, cache_dir)


def run_search(spec: SearchSpec, address: str | None = None, tracking_uri: str | None = None,
               resume: bool = False, out=sys.stdout) -> dict:
    """Run (or resume) a search. Returns {parent_run_id, experiment_id, review, export_path},
    or with `interrupted` / `failed` set when it did not finish."""
    import ray

    plan = _plan(spec, address, tracking_uri, resume)
    # The SVC MIA (and so mia_*, avg_gap) may be computed only at the last epoch; Optuna reads
    # only the last report, so Tune must not insist every report holds every objective.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # num_to_keep=1 forces a (cheap, small) experiment snapshot per checkpoint; Tune warns about
    # every one of them on short trials, which buries the progress view.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    started = ray.is_initialized()
    temp_dir = None if started else init_ray(address)
    try:
        return _execute(spec, plan, resume, out)
    finally:
        if not started:
            ray.shutdown()
            if temp_dir:
                shutil.rmtree(temp_dir, ignore_errors=True)


def _execute(spec: SearchSpec, plan: _Plan, resume: bool, out) -> dict:
    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from coun_tune.search.trainable import ensure_base_models_task, unlearn_trial
    from coun_tune.tracking.mlflow_store import ROLE, client_for, ensure_experiment, log_params
    from coun_tune.tracking.review import export_config, review_pareto
    from coun_tune.tracking.trial_logger import MLflowTrialLogger

    exp_dir, tracking_uri, cache_dir = plan.exp_dir, plan.tracking_uri, plan.cache_dir
    state_file = exp_dir / SEARCH_STATE
    t0 = time.time()
    res = spec.resources_per_trial
    data_ref = ray.put(plan.data)
    try:
        base = ray.get(ray.remote(num_cpus=res["cpu"], num_gpus=res["gpu"])(ensure_base_models_task).remote(
            spec.scenario.to_dict(), cache_dir, data_ref, int(max(1, res["cpu"]))))
    except ray.exceptions.RayTaskError as e:  # a bad input found on the worker: its one line, not a traceback
        if isinstance(e.cause, UsageError):
            raise e.cause from None
        raise
    for role in ("original", "oracle"):
        how = "from the cache" if base["from_cache"][role] else "trained now (Ray task)"
        print(f"{role}: {how}; retain_acc {base[role]['retain_acc']:.2f}, forget_acc {base[role]['forget_acc']:.2f}, "
              f"test_acc {base[role]['test_acc']:.2f}", file=out)

    client = client_for(tracking_uri)
    experiment_id = ensure_experiment(client, tracking_uri, spec.name)
    if resume:
        state = json.loads(state_file.read_text())
        parent_id = state["parent_run_id"]
        client.update_run(parent_id, status="RUNNING")
    else:
        parent = client.create_run(experiment_id, run_name=exp_dir.name,
                                   tags={ROLE: "search", "coun_tune.method": spec.method,
                                         "coun_tune.objectives": json.dumps(spec.objectives)})
        parent_id = parent.info.run_id
        log_params(client, parent_id, {"sampler": spec.sampler, "num_samples": spec.num_samples,
                                       "max_concurrent_trials": spec.max_concurrent_trials,
                                       "method": spec.method, **{f"scenario.{k}": v for k, v in spec.scenario.to_dict().items()},
                                       "split_hash": base["split_hash"]})
        client.log_dict(parent_id, spec.to_dict(), "spec.yaml")
        client.log_dict(parent_id, {"original": base["original"], "oracle": base["oracle"]}, "base_models.json")
        exp_dir.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps({"parent_run_id": parent_id, "experiment_id": experiment_id,
                                          "tracking_uri": tracking_uri}))

    run_info = run_info_for(spec, cache_dir)
    trainable = tune.with_resources(tune.with_parameters(unlearn_trial, data=data_ref, run_info=run_info),
                                    {"cpu": res["cpu"], "gpu": res["gpu"]})
    if resume:
        tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_unfinished=True, resume_errored=True)
    else:
        searcher = OptunaSearch(space=optuna_space(spec.space), metric=list(spec.objectives),
                                mode=list(spec.objectives.values()), sampler=make_sampler(spec), seed=spec.seed)
        logger = MLflowTrialLogger(tracking_uri, experiment_id, parent_id,
                                   {"method": spec.method, **spec.fixed})
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=spec.num_samples,
                                        max_concurrent_trials=spec.max_concurrent_trials),
            run_config=tune.RunConfig(name=exp_dir.name, storage_path=str(exp_dir.parent), callbacks=[logger],
                                      failure_config=tune.FailureConfig(max_failures=1), verbose=1,
                                      # resume and the MLflow model artifact need only the latest
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
        )
    grid = tuner.fit()
    if grid.num_terminated + grid.num_errors < spec.num_samples:
        # Tune caught SIGINT/SIGTERM and saved its state: leave the parent run open for --resume
        client.set_tag(parent_id, "status", "interrupted")
        print(f"\nsearch interrupted after {grid.num_terminated} of {spec.num_samples} trials; continue it with:\n"
              f"  coun-tune search <spec> --resume", file=out)
        return {"parent_run_id": parent_id, "experiment_id": experiment_id, "interrupted": True}
    if grid.num_terminated == 0:
        client.set_tag(parent_id, "status", "failed")
        client.set_terminated(parent_id, status="FAILED")
        print(f"\nno trial completed ({grid.num_errors} failed; their reasons are the `error` tags of the "
              f"child runs in MLflow experiment {spec.name!r})", file=out)
        return {"parent_run_id": parent_id, "experiment_id": experiment_id, "failed": True}
    client.set_tag(parent_id, "status", "completed")
    client.log_metric(parent_id, "search_wall_seconds", time.time() - t0)
    review = review_pareto(client, parent_id, spec.objectives, out=out)
    export_path = Path(os.path.relpath(exp_dir / "exported_knee.yaml"))
    export_config(client, parent_id, "knee", export_path)
    client.set_terminated(parent_id, status="FINISHED")
    print(f"\nexported the knee config to {export_path}", file=out)
    print(f"  apply it: coun-tune unlearn --config {export_path} --output out/", file=out)
    ui = f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000" \
        if tracking_uri.startswith("sqlite") else f"open {tracking_uri}"
    print(f"review in MLflow: {ui}  (experiment {spec.name!r}, parent run {parent_id})", file=out)
    return {"parent_run_id": parent_id, "experiment_id": experiment_id, "review": review, "export_path": str(export_path)}
