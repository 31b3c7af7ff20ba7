"""What a search decides before Ray starts, and the search state it keeps beside Tune's.

A bad input (a path, the tracking store, GPUs, the data, a changed spec on --resume) fails
here with one line and nothing started or written. Every file the runner writes goes through
`coun_tune.core.storage`, so `storage_path` may be a local/NFS path or `s3://bucket/prefix`.

The search state (`coun_tune_search.json` in the search's Tune directory):
    parent_run_id, experiment_id   the MLflow parent run of this search
    tracking_uri                   where it logs (a resume logs there too)
    spec_hash                      sha256 of the spec document; --resume refuses another spec
    status                         "running" | "interrupted" | "failed" | "finished"
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from coun_tune.config.search_spec import SearchSpec, check_tracking_uri_form
from coun_tune.core import storage
from coun_tune.core.base_models import default_cache_dir
from coun_tune.core.datasets import load_dataset
from coun_tune.errors import UsageError
from coun_tune.tracking.mlflow_store import check_tracking_uri

SEARCH_STATE = "coun_tune_search.json"
STAMP = "%Y%m%d-%H%M%S"


def spec_hash(spec: SearchSpec) -> str:
    """sha256 of the spec document as parsed (key order and YAML layout do not matter)."""
    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class SearchState:
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    spec_hash: str
    status: str = "running"

    def save(self, exp_uri: str) -> None:
        storage.write_bytes(storage.join(exp_uri, SEARCH_STATE), json.dumps(asdict(self), indent=1).encode())

    @classmethod
    def load(cls, exp_uri: str) -> SearchState:
        uri = storage.join(exp_uri, SEARCH_STATE)
        try:
            doc = json.loads(storage.read_bytes(uri))
            return cls(
                **{k: doc[k] for k in ("parent_run_id", "experiment_id", "tracking_uri")},
                spec_hash=doc.get("spec_hash", ""),
                status=doc.get("status", "running"),
            )
        except (OSError, ValueError, KeyError, TypeError):
            raise UsageError(f"search state {uri} is unreadable or incomplete") from None


@dataclass
class SearchPlan:
    """Everything decided before Ray starts."""

    spec: SearchSpec
    exp_uri: str  # the search's Tune experiment directory (a URI: local path or s3://...)
    tracking_uri: str
    cache_dir: str  # base-model cache URI
    spec_hash: str
    resume: bool
    data: object = None  # DatasetArrays, loaded on the driver and put once in Ray's object store
    state: SearchState | None = None  # on --resume: the state of the search being continued
    spec_path: str = "<spec>"  # as the user gave it, for the commands the search prints

    @property
    def name(self) -> str:
        return self.exp_uri.rstrip("/").rsplit("/", 1)[-1]


def _search_dirs(storage_uri: str, name: str) -> list[str]:
    """Names of this spec's searches under storage, oldest first (<name>_<stamp>[-k])."""
    pattern = re.compile(rf"{re.escape(name)}_\d{{8}}-\d{{6}}(-\d+)?")

    def order(n: str) -> tuple[str, int]:  # (stamp, k): "-10" sorts after "-9"
        suffix = n[len(name) + 1 :]
        return suffix[:15], int(suffix[16:]) if len(suffix) > 15 else 1

    return sorted((n for n in storage.list_dir(storage_uri) if pattern.fullmatch(n)), key=order)


def latest_search(storage_uri: str, name: str) -> str:
    for n in reversed(_search_dirs(storage_uri, name)):
        exp_uri = storage.join(storage_uri, n)
        if storage.exists(storage.join(exp_uri, SEARCH_STATE)):
            return exp_uri
    raise UsageError(f"--resume: no search named {name!r} under {storage_uri} to resume")


def claim_search_dir(storage_uri: str, name: str) -> str:
    """Create this search's Tune directory, <name>_<time>, with a suffix -2, -3, ... if another
    search of the spec started in the same second. Locally the mkdir is atomic, so two searches
    started at once never share a directory; S3 has no directories to race on (a folder marker
    is created after an existence check)."""
    base = f"{name}_{time.strftime(STAMP)}"
    for k in range(1, 1000):
        uri = storage.join(storage_uri, base if k == 1 else f"{base}-{k}")
        if storage.is_remote(uri):
            if storage.exists(uri):
                continue
            storage.make_dirs(uri)
            return uri
        os.makedirs(os.path.dirname(uri), exist_ok=True)
        try:
            os.mkdir(uri)
            return uri
        except FileExistsError:
            continue
    raise UsageError(f"could not create a search directory {base}-* under {storage_uri}")


def export_endpoint(spec: SearchSpec) -> None:
    """The spec's storage_endpoint is the process's AWS_ENDPOINT_URL (what core.storage and
    pyarrow read); Ray's workers get it through the job's runtime_env."""
    if spec.storage_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = spec.storage_endpoint


def make_plan(spec: SearchSpec, address: str | None, tracking_uri: str | None, resume: bool) -> SearchPlan:
    export_endpoint(spec)
    storage_uri = spec.storage_path if storage.is_remote(spec.storage_path) else str(Path(spec.storage_path).resolve())
    if tracking_uri is not None:
        check_tracking_uri_form(tracking_uri, "--tracking-uri")
    digest, state, exp_uri = spec_hash(spec), None, ""
    # Each run of a spec is a new search (a new Tune directory and MLflow parent run, in the one
    # experiment named by the spec); --resume continues the latest of them.
    if resume:
        exp_uri = latest_search(storage_uri, spec.name)
        state = SearchState.load(exp_uri)
        if state.spec_hash and state.spec_hash != digest:
            raise UsageError(
                f"--resume: the spec changed since search {exp_uri.rsplit('/', 1)[-1]} started; "
                "run it without --resume to start a new search"
            )
        if tracking_uri is not None and tracking_uri != state.tracking_uri:
            raise UsageError(f"--resume: this search logs to {state.tracking_uri}, not {tracking_uri}")
        tracking_uri = state.tracking_uri
    tracking_uri = tracking_uri or spec.tracking_uri
    plan = SearchPlan(spec, exp_uri, tracking_uri, "", digest, resume, state=state)
    if state is not None and state.status == "finished":
        return plan  # nothing to do: the runner says so and changes nothing
    check_tracking_uri(tracking_uri, must_exist=resume)
    if address is None and spec.resources_per_trial["gpu"] > 0:
        import torch  # local Ray sees the GPUs torch sees; without one, trials would wait forever

        if spec.resources_per_trial["gpu"] > torch.cuda.device_count():
            raise UsageError(
                f"resources_per_trial asks for {spec.resources_per_trial['gpu']:g} GPU but local Ray sees "
                f"{torch.cuda.device_count()}: set gpu: 0 here, or pass --address of a GPU cluster"
            )
    if address is not None:
        from coun_tune.search.ray_session import check_address

        check_address(address)
    plan.data = load_dataset(spec.scenario.dataset, spec.scenario.data_root)  # bad data dirs fail here too
    cache = spec.cache_dir or str(default_cache_dir())
    plan.cache_dir = cache if storage.is_remote(cache) else str(Path(cache).resolve())
    if not resume:  # the last step: only a plan that passed every check creates anything
        plan.exp_uri = claim_search_dir(storage_uri, spec.name)
    return plan
