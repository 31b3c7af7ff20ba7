"""Search-side commands: search, pareto, export. Ray, Optuna and MLflow are imported only
when one of them runs, so `coun-tune unlearn` starts fast and works without them."""

from __future__ import annotations

import argparse
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


def dispatch(args: argparse.Namespace) -> int:
    from coun_tune.config.search_spec import check_tracking_uri_form

    if args.command == "search":
        from coun_tune.config.search_spec import load_search_spec
        from coun_tune.search.runner import run_search

        spec = load_search_spec(args.spec)
        if args.tracking_uri is not None:
            check_tracking_uri_form(args.tracking_uri, "--tracking-uri")
        warm_start = None
        if args.warm_start is not None:
            from coun_tune.errors import UsageError
            from coun_tune.search.warm_start import front_configs

            if args.resume:
                raise UsageError("--warm-start starts a new search; --resume continues one with its own trials")
            warm_start, line = front_configs(spec, args.tracking_uri or spec.tracking_uri, args.warm_start)
            print(line, flush=True)
        outcome = run_search(
            spec,
            address=args.address,
            tracking_uri=args.tracking_uri,
            resume=args.resume,
            spec_path=args.spec,
            warm_start=warm_start,
        )
        return outcome.exit_code
    from coun_tune.errors import UsageError
    from coun_tune.pareto import parse_pick
    from coun_tune.tracking.mlflow_store import check_tracking_uri, client_for, find_parent_run
    from coun_tune.tracking.export import export_config
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
