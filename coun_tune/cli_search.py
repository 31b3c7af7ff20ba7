"""Search-side commands: search, pareto, export. Ray, Optuna and MLflow are imported only
when one of them runs, so `coun-tune unlearn` starts fast and works without them."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_commands(sub) -> None:
    s = sub.add_parser("search", help="run a multi-objective search on Ray, logged to MLflow")
    s.add_argument("spec", help="search spec YAML (see search_spaces/)")
    s.add_argument("--address", help="an existing Ray cluster (e.g. 127.0.0.1:6379 or auto); default: local Ray")
    s.add_argument("--tracking-uri", help="MLflow tracking URI (overrides the spec's)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted search with the same name")
    s.add_argument(
        "--warm-start",
        metavar="EXPERIMENT",
        help="run the Pareto configs of this MLflow experiment's latest search (same tracking store) first",
    )

    p = sub.add_parser("pareto", help="recompute the Pareto front of a search from MLflow, tag and log it")
    p.add_argument("search", help="experiment name (its latest search) or parent run id")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db")

    e = sub.add_parser("export", help="write the config of one Pareto trial as a `coun-tune unlearn --config` YAML")
    e.add_argument("search", help="experiment name (its latest search) or parent run id")
    e.add_argument("--pick", default="knee", help="knee | best:METRIC | a constraint such as retain_acc>=99")
    e.add_argument("--output", required=True, help="YAML file to write")
    e.add_argument("--tracking-uri", default="sqlite:///mlflow.db")

    t = sub.add_parser(
        "transfer", help="re-run the Pareto configs on held-out forget sets, each against its own oracle"
    )
    t.add_argument("search", help="experiment name (its latest search) or parent run id")
    t.add_argument("--split-seeds", default="1,2,3", help="comma-separated seeds of the held-out forget sets")
    t.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    t.add_argument("--cache-dir", help="base-model cache (default: $COUN_TUNE_CACHE or ~/.cache/coun-tune)")
    t.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")


def check_storage(spec) -> None:
    """The buckets of an s3:// storage_path and cache_dir answer and exist (one HeadBucket
    each), before anything is written or Ray starts: an unreachable endpoint or a lost bucket
    is one line naming the endpoint and the operation (exit 2), not a traceback after Ray's
    start. A missing bucket is never created by a search (a mistyped name would become one)."""
    from coun_tune.core import storage
    from coun_tune.core.base_models import default_cache_dir
    from coun_tune.search.plan import export_endpoint

    export_endpoint(spec)  # the spec's storage_endpoint is where the requests go
    storage.check_bucket(spec.storage_path, "storage_path")
    storage.check_bucket(str(spec.cache_dir or default_cache_dir()), "cache_dir")


def check_cached_models(spec) -> None:
    """The scenario's base models already in the cache (the original, each split's oracle)
    pass their checksum, checked here before Ray starts: the Ray task that reads them would
    find a corrupted one only after Ray's start, its log lines and the results directory.
    Entries not cached yet are left to the task that trains them."""
    from types import SimpleNamespace

    from coun_tune.core import storage
    from coun_tune.core.base_models import cache_key, default_cache_dir, load_cached
    from coun_tune.core.datasets import load_dataset
    from coun_tune.core.splits import _content_hash, compute_forget_indices, parse_forget_spec

    scenario = spec.scenario
    if scenario.sequential:
        return
    cache = str(spec.cache_dir or default_cache_dir())
    data = load_dataset(scenario.dataset, scenario.data_root)  # bad data dirs fail here, as in make_plan
    entries, fingerprint = [], data.fingerprint()
    for seed in dict.fromkeys([*spec.calibration_seeds, *spec.holdout_seeds]):
        split_scenario = scenario.with_split(seed)
        # the split's hash as the registry would hold it, computed without writing the registry
        forget, test_idx = compute_forget_indices(
            data, parse_forget_spec(split_scenario.forget), split_scenario.forget_seed
        )
        split = SimpleNamespace(split_hash=_content_hash(fingerprint, forget, test_idx))
        for role in ("original", "oracle"):
            entries.append(storage.join(cache, "models", cache_key(data, split, split_scenario, role)[0]))
    for entry in dict.fromkeys(entries):
        load_cached(entry)  # UsageError on a checksum mismatch; None when not cached yet


def storage_lost(spec, error: BaseException):
    """The StorageError to report instead of `error` when the search's S3 storage failed under
    it (Tune reports that as its own error, e.g. "no experiment snapshot found"): the S3 error
    behind it, else whatever a fresh look at the buckets finds; None when storage is not why."""
    from coun_tune.core import storage
    from coun_tune.errors import UsageError

    if isinstance(error, (UsageError, KeyboardInterrupt)):
        return None
    if not any(storage.is_remote(str(u)) for u in (spec.storage_path, spec.cache_dir)):
        return None
    s3 = s3_failure(error)
    if s3 is not None:
        return storage.s3_error(spec.storage_path, s3, "sync")
    try:
        check_storage(spec)
    except storage.StorageError as lost:
        return lost
    return None


def s3_failure(error: BaseException) -> OSError | None:
    """The S3 request error (pyarrow's OSError naming an AWS error) behind `error`, if any:
    Tune wraps what its storage sync raised."""
    from coun_tune.core import storage

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if storage.is_s3_failure(error):
            return error
        error = error.__cause__ or error.__context__
    return None


def dispatch(args: argparse.Namespace) -> int:
    from coun_tune.config.search_spec import check_tracking_uri_form

    if args.command == "search":
        from coun_tune.config.search_spec import load_search_spec
        from coun_tune.core import storage
        from coun_tune.core.base_models import default_cache_dir
        from coun_tune.search.runner import run_search

        spec = load_search_spec(args.spec)
        if args.tracking_uri is not None:
            check_tracking_uri_form(args.tracking_uri, "--tracking-uri")
        check_storage(spec)
        check_cached_models(spec)
        warm_start = None
        if args.warm_start is not None:
            from coun_tune.errors import UsageError
            from coun_tune.search.warm_start import front_configs

            if args.resume:
                raise UsageError("--warm-start starts a new search; --resume continues one with its own trials")
            warm_start, line = front_configs(spec, args.tracking_uri or spec.tracking_uri, args.warm_start)
            print(line, flush=True)
        # a results root this search created stays only if the search got as far as using it
        root = None if storage.is_remote(spec.storage_path) else Path(spec.storage_path).resolve()
        root_existed = root is None or root.exists()
        # while the search runs nothing creates a bucket, here or in Ray's workers (ray_session
        # passes the setting on): its buckets were checked above
        creating = os.environ.get(storage.CREATE_BUCKETS_ENV)
        if any(storage.is_remote(str(u)) for u in (spec.storage_path, spec.cache_dir, default_cache_dir())):
            os.environ[storage.CREATE_BUCKETS_ENV] = "0"
        try:
            outcome = run_search(
                spec,
                address=args.address,
                tracking_uri=args.tracking_uri,
                resume=args.resume,
                spec_path=args.spec,
                warm_start=warm_start,
            )
        except BaseException as e:
            if not root_existed and root.is_dir() and not any(root.iterdir()):
                root.rmdir()
            lost = storage_lost(spec, e)
            if lost is not None:  # the bucket or endpoint went away during the search: one line saying so
                raise lost from None
            raise
        finally:
            if creating is None:
                os.environ.pop(storage.CREATE_BUCKETS_ENV, None)
            else:
                os.environ[storage.CREATE_BUCKETS_ENV] = creating
        return outcome.exit_code
    from coun_tune.errors import UsageError
    from coun_tune.pareto import parse_pick
    from coun_tune.tracking.export import export_config
    from coun_tune.tracking.mlflow_store import check_tracking_uri, client_for, find_parent_run
    from coun_tune.tracking.review import review_pareto

    check_tracking_uri_form(args.tracking_uri, "--tracking-uri")
    check_tracking_uri(args.tracking_uri, must_exist=True)
    if args.command == "transfer":
        try:
            seeds = [int(x) for x in args.split_seeds.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--split-seeds must be comma-separated integers, got {args.split_seeds!r}") from None
        if not seeds or min(seeds) < 0:
            raise UsageError("--split-seeds needs at least one non-negative integer")
        from coun_tune.cli_checks import check_device

        check_device(args.device)
    if args.command == "export":
        parse_pick(args.pick)
        if Path(args.output).is_dir():
            raise UsageError(f"--output {args.output!r} is a directory; give a file name such as picked.yaml")
    client = client_for(args.tracking_uri)
    parent = find_parent_run(client, args.search)
    if args.command == "pareto":
        review_pareto(client, parent.info.run_id)
    elif args.command == "transfer":
        import sys

        from coun_tune.search.holdout import transfer_check

        transfer_check(
            client,
            parent.info.run_id,
            seeds,
            args.cache_dir,
            args.device,
            log=lambda s: print(s, file=sys.stderr, flush=True),
        )
    else:
        path = export_config(client, parent.info.run_id, args.pick, args.output)
        from coun_tune.tracking.mlflow_store import coun_tune_command

        apply = coun_tune_command("unlearn", "--config", str(Path(path).resolve()), "--output", "out/")
        print(f"wrote {path}\napply it: {apply}")
    return 0
