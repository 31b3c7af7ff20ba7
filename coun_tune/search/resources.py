"""Before any work starts: can the cluster ever run a trial, and how many at once?

A trial (and each base-model task) asks Ray for `resources_per_trial`. If no node can hold
that request, Ray queues it for ever and the search hangs after "Connected" with nothing said;
if the nodes hold fewer trials at once than `max_concurrent_trials`, the search runs slower
than the spec says. `check_cluster` looks at what can exist:

- the live nodes (`ray.nodes()`: each node's total resources), and
- the autoscaler's node types, when the driver can see them, first found of: the cluster config
  the autoscaler reports to the GCS (`ray._private.state.state.get_cluster_config()`); the file
  $COUN_TUNE_CLUSTER_CONFIG names; the `--autoscaling-config` file of this cluster's autoscaler
  when it runs on this machine (the driver is on the head: `ray job submit`, `ray start
  --autoscaling-config=...`); `~/ray_bootstrap_config.yaml` (what `ray up` leaves on the head,
  resources filled in). Ray 2.60 never writes the GCS cluster config: neither the classic (v1)
  nor the v2 autoscaler calls `report_cluster_config` (checked against Ray's fake multi-node
  autoscaler, tests/test_i17_autoscaler.py; ray-project/ray#63012), so that source is for later
  Rays. A driver off the head, or on KubeRay (whose autoscaler reads the RayCluster resource, not
  a file), sees the live nodes only: the failure then says to name the node types with
  $COUN_TUNE_CLUSTER_CONFIG. A type without `resources` in the config (left to be detected from
  the instance type at launch) is skipped.

No node and no node type can hold one trial: UsageError (one line, exit 2, before anything is
written). Fewer trials fit at once than max_concurrent_trials: one warning line.

Counting is per node: a node of resources R holds floor(min over the asked resources of
R[r] / ask[r]) trials (identical bundles on one node: the bin packing is exact). The reachable
count takes each worker type up to its max_workers, and all worker types together up to the
cluster's max_workers (Ray's cluster-wide cap), the types holding the most trials first.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from coun_tune.errors import UsageError
from coun_tune.report import STDOUT

CLUSTER_CONFIG_ENV = "COUN_TUNE_CLUSTER_CONFIG"
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
EPS = 1e-9  # Ray keeps resources in units of 1e-4: 0.25 GPU x 4 must fill a GPU exactly


@dataclass
class NodeType:
    """An autoscaler node type: its resources and how many of it may exist (-1: no limit).
    cluster_max: the cluster-wide max_workers that all worker types share (None: none known);
    the head type has none (it is one node, outside that cap)."""

    name: str
    resources: dict[str, float]
    max_count: int
    cluster_max: int | None = None


def trial_request(resources_per_trial: dict) -> dict[str, float]:
    """The spec's {cpu, gpu} as Ray resource names, zero amounts left out."""
    ask = {"CPU": float(resources_per_trial.get("cpu", 1)), "GPU": float(resources_per_trial.get("gpu", 0))}
    return {k: v for k, v in ask.items() if v > 0}


def trials_per_node(node: dict[str, float], ask: dict[str, float]) -> int:
    """How many trials asking `ask` one node of resources `node` holds at once."""
    if not ask:
        return sys.maxsize
    return int(min((node.get(r, 0.0) + EPS) // amount for r, amount in ask.items()))


def _short(res: dict[str, float]) -> str:
    return f"{{CPU: {res.get('CPU', 0):g}, GPU: {res.get('GPU', 0):g}}}"


def _describe_types(types: list[NodeType]) -> str:
    def most(n: int) -> str:
        return "no limit" if n < 0 else f"at most {n}"

    return ", ".join(f"{t.name} {_short(t.resources)} ({most(t.max_count)})" for t in types)


def _describe(shapes: list[dict[str, float]]) -> str:
    counts: dict[str, int] = {}
    for r in shapes:
        counts[_short(r)] = counts.get(_short(r), 0) + 1
    return ", ".join(f"{n} x {s}" for s, n in counts.items()) or "none"


@dataclass
class Capacity:
    per_node: list[int]  # trials each live node holds
    per_type: dict[str, int]  # trials one node of each autoscaler type holds
    reachable: int  # the most trials that can run at once (sys.maxsize: unbounded)

    @property
    def fits_somewhere(self) -> bool:
        return any(n > 0 for n in self.per_node) or any(n > 0 for n in self.per_type.values())


def capacity(ask: dict[str, float], live: list[dict[str, float]], types: list[NodeType] | None) -> Capacity:
    """What `ask` gets from the live nodes and, if known, the autoscaler's node types. With node
    types, the reachable count is each type at its max_count, the worker types together within
    the cluster's max_workers, filled with the types holding the most trials first (live nodes
    are instances of the types; a live node of no listed type, such as a manually joined one,
    adds its own)."""
    per_node = [trials_per_node(r, ask) for r in live]
    per_type = {t.name: trials_per_node(t.resources, ask) for t in types or []}
    if not types:
        return Capacity(per_node, per_type, sum(per_node))
    caps = [t.cluster_max for t in types if t.cluster_max is not None]
    left = min(caps) if caps else None  # worker nodes the cluster may still have
    reachable = 0
    for t in sorted(types, key=lambda t: per_type[t.name], reverse=True):
        n = per_type[t.name]
        if not n:
            continue
        count = t.max_count
        if t.cluster_max is not None and left is not None:
            count = left if count < 0 else min(count, left)
            left -= count
        if count < 0:
            return Capacity(per_node, per_type, sys.maxsize)
        reachable += n * count
    # live nodes beyond what the types account for (a head of no listed type, say)
    return Capacity(per_node, per_type, max(reachable, sum(per_node)))


# --- what the cluster has ----------------------------------------------------------------------


def live_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def _types_from_gcs() -> list[NodeType] | None:
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # private API: absent or changed in this Ray
        return None
    if config is None or not config.node_group_configs:
        return None
    out = []
    for i, g in enumerate(config.node_group_configs):
        name = getattr(g, "name", "") or f"type{i}"
        out.append(NodeType(name, {k: float(v) for k, v in g.resources.items()}, int(g.max_count)))
    return out


def _types_from_file(path: Path) -> list[NodeType] | None:
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    types = (config or {}).get("available_node_types") if isinstance(config, dict) else None
    if not isinstance(types, dict):
        return None
    head = config.get("head_node_type")
    cap = config.get("max_workers")
    out = []
    for name, t in types.items():
        if not isinstance(t, dict) or not isinstance(t.get("resources"), dict):
            continue  # resources left to launch-time detection: not knowable here
        res = {k: float(v) for k, v in t["resources"].items() if isinstance(v, (int, float))}
        count = 1 if name == head else int(t.get("max_workers", cap if isinstance(cap, int) else 0) or 0)
        if isinstance(cap, int) and name != head:
            count = min(count, cap)
        shared = cap if isinstance(cap, int) and name != head else None
        out.append(NodeType(str(name), res, count, shared))
    return out or None


def _monitor_config() -> Path | None:
    """The `--autoscaling-config` file of the autoscaler of the cluster this driver is connected
    to, when that autoscaler (Ray's monitor.py, v1 or v2) runs on this machine; matched by the
    GCS port (Ray may rewrite the address's IP). None when not connected or not found."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        port = str(ray.get_runtime_context().gcs_address).rsplit(":", 1)[-1]
        entries = os.listdir("/proc")
    except Exception:  # private detail, or no /proc: this source is only a convenience
        return None
    for pid in filter(str.isdigit, entries):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(a.endswith("/monitor.py") and "/autoscaler/" in a for a in args[:3]):
            continue
        opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
        config = opts.get("autoscaling-config")
        if not config or opts.get("gcs-address", "").rsplit(":", 1)[-1] != port:
            continue
        path = Path(os.path.expanduser(config))
        if not path.is_absolute():
            try:
                path = Path(os.readlink(f"/proc/{pid}/cwd")) / path
            except OSError:
                continue
        return path
    return None


def autoscaler_types() -> tuple[list[NodeType] | None, str]:
    """(node types, where they were read) or (None, why not)."""
    found = _types_from_gcs()
    if found:
        return found, "the autoscaler's cluster config (GCS)"
    named = os.environ.get(CLUSTER_CONFIG_ENV)
    candidates = [
        (Path(os.path.expanduser(named)) if named else None, "{path}"),
        (_monitor_config(), "{path}, the running autoscaler's --autoscaling-config"),
        (Path(os.path.expanduser(BOOTSTRAP_CONFIG)), "{path}"),
    ]
    for path, where in candidates:
        if path is not None and path.is_file():
            found = _types_from_file(path)
            if found:
                return found, where.format(path=path)
    return None, "no autoscaler config visible from this driver"


# --- the check ----------------------------------------------------------------------------------


def check_cluster(resources_per_trial: dict, max_concurrent_trials: int, out=STDOUT) -> Capacity:
    """Fail (UsageError) when no node or node type can hold one trial; print a warning when
    fewer than max_concurrent_trials fit at once. Call it connected to Ray, before any task."""
    ask = trial_request(resources_per_trial)
    live = live_nodes()
    types, source = autoscaler_types()
    cap = capacity(ask, live, types)
    asked = "{" + ", ".join(f"{k.lower()}: {v:g}" for k, v in ask.items()) + "}"
    if not cap.fits_somewhere:
        if types:
            kinds = f"; autoscaler node types from {source}: {_describe_types(types)}"
            fix = "lower resources_per_trial or add a node type that holds it"
        else:
            kinds = f"; {source}"
            fix = (
                "lower resources_per_trial, or if an autoscaler can add a node that holds it, "
                f"name its cluster config in ${CLUSTER_CONFIG_ENV}"
            )
        raise UsageError(
            f"resources_per_trial {asked} fits on no node of this Ray cluster (nodes: {_describe(live)}{kinds}), "
            f"so no trial could ever start: {fix}"
        )
    if cap.reachable < max_concurrent_trials:
        where = f"the nodes and node types ({source})" if types else "the live nodes"
        print(
            f"warning: at most {cap.reachable} trial(s) of {asked} fit at once on {where}, below "
            f"max_concurrent_trials {max_concurrent_trials}; the search runs {cap.reachable} at a time",
            file=out,
            flush=True,
        )
    return cap
