"""`coun-tune` commands. Bad input anywhere: one line on stderr, exit code 2, nothing written.

coun-tune unlearn  [--config FILE] [--dataset D --forget SPEC --seed S] [--method M] [hparams]
                   --output DIR [--overwrite]
coun-tune search   SPEC.yaml [--address A] [--tracking-uri URI] [--resume]
coun-tune pareto   EXPERIMENT_OR_RUN_ID [--tracking-uri URI]
coun-tune export   EXPERIMENT_OR_RUN_ID --pick knee|best:METRIC|METRIC>=X --output FILE
coun-tune transfer EXPERIMENT_OR_RUN_ID [--split-seeds 1,2,3]
coun-tune apply    --config picked.yaml --model PATH|models:/NAME@ALIAS --forget ids:FILE.parquet --data DIR|FILE
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from coun_tune.cli_checks import check_device, check_output_dir
from coun_tune.errors import UsageError

__all__ = ["main", "build_parser", "check_device", "check_output_dir"]


def _all_hparams() -> dict:
    from coun_tune.core.methods import METHODS, method_hparams

    out = {}
    for m in METHODS:
        out.update(method_hparams(m))
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors follow the same one-line, exit-2 rule
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="coun-tune", description="Distributed hyperparameter search for contrastive machine unlearning (CoUn)."
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    u = sub.add_parser("unlearn", help="run one unlearning job and print its metrics against the oracle")
    u.add_argument("--config", help="YAML config (as written by `coun-tune export`); flags override it")
    u.add_argument("--dataset")
    u.add_argument(
        "--forget",
        action="append",
        help="random:F | class:K | class:K:F | ids:FILE.parquet; give it several times for sequential requests",
    )
    u.add_argument("--seed", type=int, help="scenario seed: draws the forget set and initialises the base models")
    u.add_argument(
        "--split-seed", type=int, help="draws the forget set (default: --seed); vary it for held-out forget sets"
    )
    u.add_argument("--arch")
    u.add_argument("--recipe", help="recipe of the original/oracle (default: the dataset's)")
    u.add_argument("--data-root", help="where the dataset's files are")
    u.add_argument("--method")
    u.add_argument("--batch-size", type=int)
    u.add_argument("--unlearn-seed", type=int, help="augmentation/batch-order seed (default: --seed)")
    for name, h in _all_hparams().items():
        u.add_argument(
            "--" + name.replace("_", "-"),
            dest="hp_" + name,
            type=int if h.kind == "int" else float,
            help=f"{h.help} (default {h.default})",
        )
    from coun_tune.config.unlearn_config import RENAMED_HPARAMS

    for old in RENAMED_HPARAMS:  # old flags still run what they did (converted with one warning line)
        u.add_argument("--" + old.replace("_", "-"), dest="hp_" + old, type=int, help=argparse.SUPPRESS)
    u.add_argument("--output", default="out", help="output directory (default: out)")
    u.add_argument("--overwrite", action="store_true", help="write into --output even if it holds files")
    u.add_argument("--cache-dir", help="base-model cache (default: $COUN_TUNE_CACHE or ~/.cache/coun-tune)")
    u.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    u.add_argument("--download", action="store_true", help="download the dataset if missing (needs internet)")
    u.add_argument("--threads", type=int, help="CPU threads for torch (a search trial uses its CPU share)")
    u.add_argument(
        "--oracle-seeds",
        type=int,
        default=1,
        help="train this many oracles (other seeds, same D_r) and report their gaps to the "
        "scenario's oracle: the noise floor of every gap (default 1: none)",
    )

    from coun_tune import cli_search

    cli_search.add_commands(sub)
    from coun_tune import cli_apply

    cli_apply.add_command(sub)
    return p


def cmd_unlearn(args: argparse.Namespace) -> int:
    from coun_tune.config.unlearn_config import build_unlearn_config, read_yaml

    doc = read_yaml(args.config) if args.config else {}
    overrides = {
        k: getattr(args, k)
        for k in (
            "dataset",
            "forget",
            "seed",
            "split_seed",
            "arch",
            "recipe",
            "data_root",
            "method",
            "batch_size",
            "unlearn_seed",
        )
    }
    overrides["hparams"] = {k[3:]: v for k, v in vars(args).items() if k.startswith("hp_") and v is not None}
    if args.forget is not None and len(args.forget) == 1:
        overrides["forget"] = args.forget[0]
    cfg = build_unlearn_config(doc, overrides)
    out = Path(args.output)
    check_output_dir(out, args.overwrite)
    check_device(args.device)
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.oracle_seeds < 1:
        raise UsageError(f"--oracle-seeds must be >= 1, got {args.oracle_seeds}")
    run_unlearn(cfg, out, args.cache_dir, args.device, args.download, args.threads, args.oracle_seeds)
    return 0


def write_outputs(out: Path, result: dict, model, cfg) -> None:
    """metrics.json, model.pt (a plain state dict: load it with weights_only=True), config.yaml."""
    import torch
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / "model.pt")
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def run_unlearn(
    cfg,
    out: Path,
    cache_dir: str | None,
    device: str | None,
    download: bool = False,
    threads: int | None = None,
    oracle_seeds: int = 1,
) -> dict:
    import torch

    from coun_tune.core.base_models import default_cache_dir, oracle_seed_spread
    from coun_tune.core.datasets import load_dataset
    from coun_tune.core.pipeline import prepare, unlearn
    from coun_tune.report import metrics_table

    if threads:
        torch.set_num_threads(threads)

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    data = load_dataset(cfg.scenario.dataset, cfg.scenario.data_root, download=download)
    if cfg.scenario.sequential:
        return run_unlearn_sequential(cfg, out, cache_dir, device, data, log)
    prep = prepare(cfg.scenario, cache_dir, device, log=log, data=data)
    log(f"unlearning with {cfg.method} {json.dumps(cfg.hparams)}")
    model, metrics = unlearn(prep, cfg.method, cfg.hparams, batch_size=cfg.batch_size, seed=cfg.seed)
    noise = oracle_seed_spread(
        prep.data,
        prep.split,
        cfg.scenario,
        prep.scen_data,
        cache_dir or default_cache_dir(),
        prep.base.oracle_metrics,
        oracle_seeds,
        log,
    )
    result = {
        "config": cfg.to_dict(),
        "split_hash": prep.split.split_hash,
        "num_forget": int(len(prep.split.forget_idx)),
        "num_retain": int(len(prep.split.retain_idx)),
        "num_test": int(len(prep.split.test_idx)),
        "unlearned": metrics,
        "original": prep.base.original_metrics,
        "oracle": prep.base.oracle_metrics,
        "base_models_from_cache": prep.base.from_cache,
        "oracle_noise": noise,
    }
    write_outputs(out, result, model, cfg)
    columns = {"original": prep.base.original_metrics, "oracle": prep.base.oracle_metrics, cfg.method: metrics}
    if noise:  # gaps of oracles retrained with other seeds: what a gap below this means
        columns[f"oracle seeds (n={oracle_seeds - 1})"] = {k[len("oracle_noise_") :]: v for k, v in noise.items()}
    print(metrics_table(columns))
    print(f"\nwrote {out / 'metrics.json'} and {out / 'model.pt'}")
    return result


def run_unlearn_sequential(cfg, out: Path, cache_dir, device, data, log) -> dict:
    from coun_tune.core.pipeline import unlearn_sequential
    from coun_tune.report import MAIN_ROWS, table

    model, records = unlearn_sequential(
        cfg.scenario, cfg.method, cfg.hparams, cfg.batch_size, cfg.seed, cache_dir, device, log, data
    )
    result = {
        "config": cfg.to_dict(),
        "requests": records,
        "unlearned": records[-1]["unlearned"],
        "original": records[-1]["original"],
        "oracle": records[-1]["oracle"],
    }
    write_outputs(out, result, model, cfg)
    rows = [r for r in MAIN_ROWS if r not in ("wall_seconds", "flops")]
    print(
        table(
            ["request", "removed", *rows],
            [
                [
                    f"{r['request']}: {r['spec'].split(' then ')[-1]}",
                    r["num_forget"],
                    *[r["unlearned"].get(m) for m in rows],
                ]
                for r in records
            ],
        )
    )
    print("\n(each row: the model after that request, against the oracle of the data remaining then)")
    print(f"\nwrote {out / 'metrics.json'} and {out / 'model.pt'}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        args = build_parser().parse_args(argv)
        if args.command == "unlearn":
            return cmd_unlearn(args)
        if args.command == "apply":
            from coun_tune import cli_apply

            return cli_apply.cmd_apply(args)
        from coun_tune import cli_search

        return cli_search.dispatch(args)
    except UsageError as e:
        print(f"coun-tune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside Tune's loop (which handles its own)
        print("coun-tune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
