"""`coun-tune apply`: run an exported config on the user's own model and a real deletion request.

  coun-tune apply --config picked.yaml --model model.pt|models:/NAME@ALIAS|runs:/ID/model
                  --forget ids:request.parquet --data DIR|FILE.npz|FILE.parquet
                  --crop-padding N --flip|--no-flip [--layout nhwc|nchw] [--mean M,.. --std S,..]
                  [--arch NAME|package.module:factory] [--output DIR] [--tracking-uri URI] [--register NAME]

No oracle exists for a real request, so no gap can be measured. What is reported: retain, test
and forget accuracy and the MIA on the request against the test set, before and after, and
beside them what the search measured for this config (its calibration trial, and the transfer
check on held-out forget sets when it was run). Everything is read and checked first (config,
model, data, request, tracking store); any problem is one line and exit 2 with nothing written.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coun_tune.errors import UsageError

# Keys of an exported config that are provenance or data declarations, not unlearning settings.
DATA_KEYS = {"crop_padding", "flip", "mean", "std", "layout", "num_classes"}
# What `coun-tune export` writes in its comment header (comments keep the YAML a valid config).
HEADER = {
    "search_run_id": r"^# exported by coun-tune from search run (\w+)",
    "trial_run_id": r"\(MLflow run (\w+)\)",
    "trial_id": r"\(Tune id ([^)\s]+)\)|, trial (\S+) \(MLflow run",
    "model_uri": r"^# model_uri: (\S+)",
    "trial_metrics": r"^# trial metrics: (\{.*\})$",
}
REPORTED = (
    "retain_acc",
    "forget_acc",
    "unlearn_acc",
    "test_acc",
    "mia_efficacy",
    "mia_efficacy_resample_min",
    "mia_efficacy_resample_max",
    "mia_loss_attack_acc",
)


def add_command(sub) -> None:
    a = sub.add_parser("apply", help="apply an exported config to your own model and deletion request (no oracle)")
    a.add_argument("--config", required=True, help="YAML written by `coun-tune export`")
    a.add_argument(
        "--model", required=True, help="state dict file, or models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model"
    )
    a.add_argument("--forget", required=True, help="ids:FILE.parquet: integer column `index` into the training data")
    a.add_argument(
        "--data", required=True, help="image folder (train/<class>/, test/<class>/), FILE.npz or FILE.parquet"
    )
    a.add_argument("--arch", help="coun-tune architecture or package.module:factory (default: the config's)")
    a.add_argument("--layout", choices=("nhwc", "nchw"), help="layout of 4-D image arrays (NPZ, Parquet tensors)")
    a.add_argument(
        "--crop-padding", type=int, help="zero padding of the random crop the model was trained with (0: none)"
    )
    a.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether the model was trained with random horizontal flips",
    )
    a.add_argument("--mean", help="per-channel normalisation mean, comma-separated (default: the config dataset's)")
    a.add_argument("--std", help="per-channel normalisation std, comma-separated")
    a.add_argument("--num-classes", type=int, help="the model's outputs (default: from the labels)")
    a.add_argument("--batch-size", type=int, help="unlearning batch size (default: the config's)")
    a.add_argument("--output", default="out", help="output directory (default: out)")
    a.add_argument("--overwrite", action="store_true", help="write into --output even if it holds files")
    a.add_argument("--tracking-uri", help="MLflow store: log the run, the MLflow model and a registry version there")
    a.add_argument("--experiment", help="MLflow experiment (default: the search's, else coun-tune-apply)")
    a.add_argument("--register", help="registered model name (default: the one the exported config names)")
    a.add_argument("--alias", default="unlearned", help="alias set on the new model version (default: unlearned)")
    a.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    a.add_argument("--threads", type=int, help="CPU threads for torch")


@dataclass
class Plan:
    """Everything `apply` will do, checked before anything is written."""

    cfg: Any  # UnlearnConfig
    provenance: dict[str, Any]
    data: Any  # UserData
    data_path: str
    forget_idx: Any  # (n,) int64, sorted
    request_sha256: str
    request_path: str
    model: Any  # nn.Module with features()/classifier(), weights loaded
    arch: str
    model_source: str
    batch_size: int
    seed: int
    out: Path
    device: Any
    tracking_uri: str | None
    experiment: str | None
    register: str | None
    alias: str
    transfer: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, float] = field(default_factory=dict)


def request_hash(ids) -> str:
    """sha256 of the sorted ids as little-endian int64: the request's identity (its order and
    file name do not matter)."""
    import numpy as np

    return hashlib.sha256(np.sort(np.asarray(ids, dtype=np.int64)).astype("<i8").tobytes()).hexdigest()


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated numbers, got {text!r}") from None


# Provenance an exported config may carry in its body (besides its comment header): read by
# _registered_name and the transfer table. Any other key is a mistake, never silently ignored.
PROVENANCE_KEYS = {"registered_model", "registered_name", "model_name", "transfer", *HEADER}
# What apply needs of a config: without these it would run the method's defaults, not a pick.
REQUIRED_KEYS = ("method", "hparams")


def check_config_document(doc: dict, path: str) -> None:
    """Accept only what `coun-tune export` writes, or a hand-written config with `method` and
    `hparams`: a search spec, a misspelt key or a missing `hparams` would otherwise run the
    method's default hyperparameters on the user's model."""
    from coun_tune.config.search_spec import KEYS as SEARCH_SPEC_KEYS
    from coun_tune.config.unlearn_config import TOP_KEYS

    allowed = TOP_KEYS | {"data"} | PROVENANCE_KEYS
    search_only = sorted(set(doc) & (SEARCH_SPEC_KEYS - allowed))
    if search_only:
        raise UsageError(
            f"config {path!r} is a search spec (it has {search_only[0]!r}); apply takes a config written by "
            "`coun-tune export` (or one with method and hparams)"
        )
    unknown = sorted(set(doc) - allowed)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(allowed), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UsageError(
            f"unknown key {unknown[0]!r} in config {path!r}; {hint}"
            f"allowed: {', '.join(sorted(TOP_KEYS | {'data'}))} (and export's provenance keys)"
        )
    missing = [k for k in REQUIRED_KEYS if k not in doc]
    if missing:
        raise UsageError(
            f"config {path!r} has no {missing[0]!r}; apply takes a config written by `coun-tune export` "
            "(or one with method and hparams)"
        )
    if not isinstance(doc["hparams"], dict) or not doc["hparams"]:
        raise UsageError(f"config {path!r}: hparams must be a mapping of hyperparameters, got {doc['hparams']!r}")


def check_alias(alias: str) -> None:
    """MLflow's rules for a model alias (mlflow.utils.validation, 3.17): letters, digits, '_'
    and '-', at most 255 characters, and not a name it reserves: 'latest' in any case, or
    v<number> (a version). Checked before anything is read or written."""
    if not re.fullmatch(r"[\w\-]{1,255}", alias):
        raise UsageError(f"--alias {alias!r}: use letters, digits, '_', '-' (at most 255 characters)")
    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise UsageError(
            f"--alias {alias!r}: MLflow reserves 'latest' (in any case) and v<number>; choose another name"
        )


def _split_config(path: str) -> tuple[dict, dict, dict]:
    """(unlearn config document, data declaration, provenance) of an exported YAML."""
    from coun_tune.config.unlearn_config import TOP_KEYS, read_yaml

    doc = read_yaml(path)
    check_config_document(doc, path)
    text = Path(path).read_text()
    data = doc.pop("data", None) or {}
    if not isinstance(data, dict):
        raise UsageError(f"config {path!r}: data must be a mapping with keys {', '.join(sorted(DATA_KEYS))}")
    unknown = sorted(set(data) - DATA_KEYS)
    if unknown:
        raise UsageError(f"unknown key {unknown[0]!r} in config data; allowed: {', '.join(sorted(DATA_KEYS))}")
    prov = {k: doc.pop(k) for k in list(doc) if k not in TOP_KEYS}  # what export records beside the config
    for key, pattern in HEADER.items():
        m = re.search(pattern, text, re.MULTILINE)
        value = next((g for g in m.groups() if g), None) if m else None
        if value and key == "trial_metrics":
            try:
                value = {k: float(v) for k, v in json.loads(value).items()}
            except (ValueError, TypeError, AttributeError):
                value = None
        if value:
            prov.setdefault(key, value)
    scen = dict(doc.get("scenario") or {})
    scen.pop("data_root", None)  # the calibration data's location on the search machine: not used here
    doc["scenario"] = scen
    return doc, data, prov


def _registered_name(prov: dict) -> str | None:
    """The registered model name an exported config names: a `registered_model`/`model_name`
    key, else the NAME of a models:/NAME/... or models:/NAME@... URI it records."""
    for key in ("registered_model", "registered_name", "model_name"):
        if isinstance(prov.get(key), str) and prov[key]:
            return prov[key]
    for v in prov.values():
        if isinstance(v, str) and v.startswith("models:/") and not v.startswith("models:/m-"):
            return re.split(r"[/@]", v[len("models:/") :], maxsplit=1)[0] or None
    return None


def _model_uri_arg(model: str) -> bool:
    return model.startswith(("models:/", "runs:/"))


def check_request_flags(args: argparse.Namespace) -> tuple[Any, dict, dict, Path, str | None, str | None]:
    """The checks that need no data or model: (config, data declaration of the config,
    provenance, output dir, tracking URI, registered model name)."""
    from coun_tune.cli_checks import check_device, check_output_dir
    from coun_tune.config.unlearn_config import build_unlearn_config
    from coun_tune.core.engine import resolve_hparams

    check_alias(args.alias)
    doc, data_cfg, prov = _split_config(args.config)
    cfg = build_unlearn_config(doc, {})
    resolve_hparams(cfg.method, cfg.hparams)
    out = Path(args.output)
    check_output_dir(out, args.overwrite)
    check_device(args.device)
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if not args.forget.startswith("ids:") or len(args.forget) == 4:
        raise UsageError(f"--forget {args.forget!r}: a real request is ids:FILE.parquet (integer column `index`)")

    tracking_uri = args.tracking_uri
    if tracking_uri is None and _model_uri_arg(args.model):
        raise UsageError(f"--model {args.model}: an MLflow model URI needs --tracking-uri")
    if tracking_uri is not None:
        from coun_tune.tracking.mlflow_store import check_tracking_uri

        check_tracking_uri(tracking_uri, must_exist=_model_uri_arg(args.model))
    register = args.register or _registered_name(prov)
    if args.register and tracking_uri is None:
        raise UsageError("--register needs --tracking-uri (the registry lives in an MLflow store)")
    if args.register is not None and not re.fullmatch(r"[A-Za-z0-9][\w.\-]*", args.register):
        raise UsageError(f"--register {args.register!r}: use letters, digits, '_', '-', '.' (no '/', '@', ':')")
    return cfg, data_cfg, prov, out, tracking_uri, register


def data_declaration(args: argparse.Namespace, data_cfg: dict):
    """How the user's data is read (core.user_data.DataDeclaration): each flag over the
    exported config's `data:` entry, checked."""
    from coun_tune.core.user_data import DataDeclaration

    decl = DataDeclaration(
        crop_padding=args.crop_padding if args.crop_padding is not None else data_cfg.get("crop_padding"),
        flip=args.flip if args.flip is not None else data_cfg.get("flip"),
        mean=_floats(args.mean, "--mean") or _floats_cfg(data_cfg.get("mean"), "data.mean"),
        std=_floats(args.std, "--std") or _floats_cfg(data_cfg.get("std"), "data.std"),
        layout=args.layout or data_cfg.get("layout"),
        num_classes=args.num_classes if args.num_classes is not None else data_cfg.get("num_classes"),
    )
    padding = decl.crop_padding
    if padding is not None and (isinstance(padding, bool) or not isinstance(padding, int)):
        raise UsageError(f"crop padding must be an integer, got {decl.crop_padding!r}")
    if decl.flip is not None and not isinstance(decl.flip, bool):
        raise UsageError(f"data.flip must be true or false, got {decl.flip!r}")
    k = decl.num_classes
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 2):
        raise UsageError(f"the number of classes must be an integer >= 2, got {k!r}")
    return decl


def load_request_model(args: argparse.Namespace, cfg, arrays, tracking_uri: str | None, prov: dict):
    """(model with its weights, on CPU; arch; the registered model it came from or None). The
    architecture: the flag, else what the model records, else the config. Records the input
    model's registry identity in `prov`."""
    import torch

    from coun_tune.core.batching import Augmenter
    from coun_tune.core.user_model import build_user_model, check_model, load_state_dict_file, load_weights

    model_cfg: dict = {}
    source_name = None
    if _model_uri_arg(args.model):
        from coun_tune.tracking.mlflow_store import client_for
        from coun_tune.tracking.models import load_model_uri, model_uri_details

        state_dict, model_cfg = load_model_uri(args.model, tracking_uri)
        model_cfg = model_cfg or {}
        if args.model.startswith("models:/") and not args.model.startswith("models:/m-"):
            src = model_uri_details(client_for(tracking_uri), args.model)
            prov.update(
                {
                    "input_model_name": src["name"],
                    "input_model_version": src["version"],
                    "input_model_run_id": src["run_id"],
                }
            )
            source_name = src["name"]
    else:
        state_dict = load_state_dict_file(args.model)
    arch = args.arch or model_cfg.get("arch") or (model_cfg.get("scenario") or {}).get("arch") or cfg.scenario.arch_name
    model = build_user_model(arch, arrays.image_shape[0], arrays.num_classes)
    load_weights(model, state_dict, arch)
    one = Augmenter(arrays.augment, "cpu").normalize(torch.from_numpy(arrays.train_x[:1]))
    check_model(model, one, arrays.num_classes, arch)
    return model, arch, source_name


def attach_search_records(plan: Plan) -> None:
    """What the search measured for this config (calibration) and on unseen forget sets
    (transfer / hold-out), from the tracking store or else from the exported header."""
    prov = plan.provenance
    if plan.tracking_uri is not None:
        from coun_tune.tracking.apply_run import search_records

        plan.calibration, plan.transfer = search_records(plan.tracking_uri, prov)
    if not plan.calibration and isinstance(prov.get("trial_metrics"), dict):  # the trial's run is in another store
        plan.calibration = dict(prov["trial_metrics"])
    for k, v in (prov.get("transfer") or {}).items() if isinstance(prov.get("transfer"), dict) else ():
        plan.transfer.setdefault(k, v)


def build_plan(args: argparse.Namespace) -> Plan:
    """Check everything `apply` needs, in the order a user fixes it (flags, data, request,
    model, batch), before anything is written."""
    import numpy as np

    from coun_tune.core.pipeline import pick_device
    from coun_tune.core.splits import ForgetSpec, compute_forget_indices
    from coun_tune.core.user_data import load_user_data

    cfg, data_cfg, prov, out, tracking_uri, register = check_request_flags(args)
    data = load_user_data(args.data, data_declaration(args, data_cfg), cfg.scenario.dataset)
    arrays = data.arrays
    forget_idx, _ = compute_forget_indices(arrays, ForgetSpec("ids", path=args.forget[4:]), seed=0)
    model, arch, source_name = load_request_model(args, cfg, arrays, tracking_uri, prov)
    register = register or source_name  # a new version of the model it came from
    device = pick_device(args.device)

    batch_size = args.batch_size or cfg.batch_size or cfg.scenario.defaults.batch_size
    if batch_size < 2:
        raise UsageError(f"--batch-size must be >= 2, got {batch_size}")
    if len(arrays.train_y) - len(forget_idx) < 2:
        raise UsageError("the request leaves fewer than 2 training samples to retain")
    seed = cfg.seed if cfg.seed is not None else cfg.scenario.seed
    plan = Plan(
        cfg=cfg,
        provenance=prov,
        data=data,
        data_path=str(args.data),
        forget_idx=np.asarray(forget_idx),
        request_sha256=request_hash(forget_idx),
        request_path=args.forget[4:],
        model=model.to(device),
        arch=arch,
        model_source=args.model,
        batch_size=int(batch_size),
        seed=int(seed),
        out=out,
        device=device,
        tracking_uri=tracking_uri,
        experiment=args.experiment,
        register=register,
        alias=args.alias,
    )
    attach_search_records(plan)
    return plan


def _floats_cfg(v, where: str) -> tuple[float, ...] | None:
    if v is None:
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (float(v),)
    if isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return tuple(float(x) for x in v)
    raise UsageError(f"config {where} must be a number or a list of numbers, got {v!r}")


def request_split(plan: Plan):
    """The request as a core Split: forget = the request's ids, retain = every other training
    sample, test = the whole test set."""
    import numpy as np

    from coun_tune.core.splits import Split

    arrays = plan.data.arrays
    retain_idx = np.setdiff1d(np.arange(len(arrays.train_y), dtype=np.int64), plan.forget_idx)
    return Split(
        "user",
        f"ids:{plan.request_path}",
        0,
        plan.forget_idx,
        retain_idx,
        np.arange(len(arrays.test_y), dtype=np.int64),
        plan.request_sha256,
    )


def applied_config(plan: Plan) -> dict:
    """The config as applied (config.yaml beside the model): the unlearn config with the data
    declaration and the architecture actually used."""
    policy = plan.data.arrays.augment
    applied = {
        **plan.cfg.to_dict(),
        "data": {
            "crop_padding": policy.crop_padding,
            "flip": policy.flip,
            "mean": list(policy.mean),
            "std": list(policy.std),
            "num_classes": plan.data.arrays.num_classes,
        },
    }
    applied["scenario"] = {**applied["scenario"], "arch": plan.arch}
    return applied


def result_document(plan: Plan, split, applied: dict, before: dict, after: dict) -> dict:
    """metrics.json: the request, the data, the model, the config and the metrics before and
    after, beside what the search measured for this config."""
    arrays = plan.data.arrays
    return {
        "request": {
            "path": plan.request_path,
            "sha256": plan.request_sha256,
            "num_forget": int(len(plan.forget_idx)),
            "num_retain": int(len(split.retain_idx)),
            "num_test": int(len(arrays.test_y)),
        },
        "data": {
            "path": plan.data_path,
            "format": plan.data.source,
            "image_shape": list(arrays.image_shape),
            "classes": list(plan.data.classes) if plan.data.classes else None,
        },
        "model": {"source": plan.model_source, "arch": plan.arch},
        "config": applied,
        "provenance": {k: v for k, v in plan.provenance.items() if not isinstance(v, dict)},
        "before": before,
        "after": after,
        "calibration": plan.calibration,
        "transfer": plan.transfer,
    }


def write_outputs(plan: Plan, model, applied: dict, result: dict) -> None:
    """model.pt (the user's own class and keys), config.yaml and metrics.json; then the MLflow
    run and registration, whose identity is added to metrics.json."""
    import torch
    import yaml

    from coun_tune.core.user_model import user_module

    plan.out.mkdir(parents=True, exist_ok=True)
    exported = user_module(model)  # the user's own class and keys (a split-off Linear put back)
    torch.save({k: v.detach().cpu() for k, v in exported.state_dict().items()}, plan.out / "model.pt")
    (plan.out / "config.yaml").write_text(yaml.safe_dump(applied, sort_keys=False))
    (plan.out / "metrics.json").write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
    if plan.tracking_uri is not None:
        from coun_tune.tracking.apply_run import log_apply_run

        result["mlflow"] = log_apply_run(plan, exported, result)
        (plan.out / "metrics.json").write_text(json.dumps(result, indent=2, sort_keys=True, default=str))


def print_apply_report(plan: Plan, result: dict) -> None:
    """The metrics before and after (and the search trial's), what the search measured against
    an oracle, and where the outputs went."""
    from coun_tune.report import table

    cols = {"before": result["before"], "after": result["after"]}
    if plan.calibration:
        cols["search trial"] = plan.calibration
    rows = [[m, *[c.get(m) for c in cols.values()]] for m in REPORTED]
    print(table(["metric", *cols], rows))
    gap_rows = [[k, v] for k, v in sorted(plan.transfer.items())]
    if plan.calibration.get("forget_gap") is not None or gap_rows:
        print("\nwhat the search measured for this config against an oracle (none exists for this request):")
        extra = [[k, plan.calibration[k]] for k in ("forget_gap", "avg_gap") if k in plan.calibration]
        print(table(["metric", "value"], [[f"calibration {k}", v] for k, v in extra] + gap_rows))
    print(
        f"\nrequest {plan.request_sha256[:12]}: {len(plan.forget_idx)} samples; a forgotten random request "
        "shows forget_acc near test_acc (not 0)"
    )
    print(f"wrote {plan.out / 'model.pt'} and {plan.out / 'metrics.json'}")
    if plan.tracking_uri is not None and not plan.register:
        print("not registered: give --register NAME (neither the config nor the model names a registered model)")
    if result.get("mlflow"):
        print(
            f"MLflow run {result['mlflow']['run_id']}"
            + (f", registered {result['mlflow']['registered_uri']}" if result["mlflow"].get("registered_uri") else "")
        )


def execute(plan: Plan, log=lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Unlearn, measure, write the outputs, log and register. Returns the result document."""
    from coun_tune.core.engine import ScenarioData, evaluate_scenario, run_unlearning

    split = request_split(plan)
    scen = ScenarioData.build(plan.data.arrays, split, plan.device)
    before = evaluate_scenario(plan.model, scen)
    original = copy.deepcopy(plan.model)
    model = plan.model.train().requires_grad_(True)
    log(
        f"unlearning {len(plan.forget_idx)} of {len(plan.data.arrays.train_y)} training samples with "
        f"{plan.cfg.method} {json.dumps(plan.cfg.hparams)}"
    )
    after = run_unlearning(
        model, original, scen, plan.cfg.method, plan.cfg.hparams, plan.batch_size, plan.seed, oracle_metrics=None
    )
    applied = applied_config(plan)
    result = result_document(plan, split, applied, before, after)
    write_outputs(plan, model, applied, result)
    print_apply_report(plan, result)
    return result


def cmd_apply(args: argparse.Namespace) -> int:
    from coun_tune.errors import DivergedError

    plan = build_plan(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        execute(plan)
    except DivergedError as e:  # raised while training, before anything is written
        print(
            f"coun-tune: error: the unlearning run diverged ({e}); nothing was written. Try a smaller lr.",
            file=sys.stderr,
        )
        return 1
    return 0
