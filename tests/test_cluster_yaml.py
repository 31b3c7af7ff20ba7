"""cluster.yaml (the Ray cluster launcher config at the repo root) passes Ray's own offline
validation, and that validation is strict enough to catch a typo'd key. Beyond the schema: the
container image's Ray and Python versions (from its tag) are the ones pyproject.toml pins; the
iam:PassRole / ssm:GetParameters grant the file documents covers the worker profile and AMI
parameter it names; spot and on-demand worker types; no port but SSH open to the world; and the
shipped GPU specs pack onto the worker types so that their max_concurrent_trials is reachable
(counted with the autoscaler's own bin packing).

Uses a private Ray API (ray.autoscaler._private.util.prepare_config / validate_config): Ray is
pinned to 2.60.x in pyproject.toml for this reason. The validation reads Ray's bundled JSON
schema and the provider's defaults.yaml: no network, no AWS credentials, no boto3. The tests
block sockets and drop AWS credentials from the environment to keep it that way.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import socket
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture
def offline(monkeypatch):
    """No network and no AWS credentials while validating."""

    def refuse(*args, **kwargs):
        raise AssertionError("cluster.yaml validation tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")


def load() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def validate(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_validation(offline):
    cfg = load()
    prepared = validate(cfg)
    assert prepared["provider"]["type"] == "aws"
    types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    workers = {k: v for k, v in types.items() if k != head}
    assert workers, "cluster.yaml needs a worker node type"
    assert any(v["resources"].get("GPU", 0) >= 1 for v in workers.values()), "workers should carry GPUs"
    for v in workers.values():
        assert v["min_workers"] == 0
        assert v["max_workers"] <= prepared["max_workers"]
    # the project is installed on every node, and Ray is started on both node kinds
    assert any("pip install" in c and "coun-tune" in c for c in prepared["setup_commands"])
    assert any("ray start --head" in c for c in prepared["head_start_ray_commands"])
    assert any("ray start --address" in c for c in prepared["worker_start_ray_commands"])


def _rename(d: dict, old: str, new: str) -> None:
    d[new] = d.pop(old)


@pytest.mark.parametrize(
    "mutate, message",
    [
        pytest.param(
            lambda c: _rename(c, "max_workers", "max_worker"), "'max_worker' was unexpected", id="top-level key typo"
        ),
        pytest.param(
            lambda c: _rename(c["available_node_types"]["worker_gpu_spot"], "resources", "resource"),
            "'resources' is a required property",
            id="node type key typo",
        ),
        pytest.param(
            lambda c: c["available_node_types"]["worker_gpu_spot"].__setitem__("resources", {"CPU": 4, "GPU": 0.5}),
            "0.5 is not of type 'integer'",
            id="fractional node resource",
        ),
        pytest.param(
            lambda c: c["available_node_types"]["worker_gpu_spot"].pop("node_config"),
            "'node_config' is a required property",
            id="missing node_config",
        ),
    ],
)
def test_broken_cluster_yaml_is_rejected(offline, mutate, message):
    import jsonschema

    cfg = load()
    assert "worker_gpu_spot" in cfg["available_node_types"]
    mutate(cfg)
    with pytest.raises(jsonschema.ValidationError) as err:
        validate(cfg)
    assert message in str(err.value)


def test_cluster_yaml_gives_workers_s3_and_keeps_the_dashboard_on_loopback(offline):
    from ray.autoscaler._private.aws.config import DEFAULT_RAY_INSTANCE_PROFILE

    prepared = validate(load())
    head = prepared["head_node_type"]
    # S3 is the shared storage: `ray up` gives the head Ray's default instance profile (it
    # carries S3 access); every worker type must get an instance profile too, or trials on it
    # cannot read the base models or write checkpoints to s3://
    assert "IamInstanceProfile" not in prepared["available_node_types"][head]["node_config"]  # Ray's default
    for name, v in prepared["available_node_types"].items():
        if name != head:
            assert v["node_config"]["IamInstanceProfile"] == {"Name": DEFAULT_RAY_INSTANCE_PROFILE}, name
    commands = [
        c
        for k in (
            "head_start_ray_commands",
            "worker_start_ray_commands",
            "setup_commands",
            "head_setup_commands",
            "worker_setup_commands",
        )
        for c in prepared[k]
    ]
    assert not any("0.0.0.0" in c for c in commands)
    (head_start,) = [c for c in prepared["head_start_ray_commands"] if "ray start --head" in c]
    assert "--dashboard-host=127.0.0.1" in head_start
    # token auth on both node kinds
    for c in commands:
        if "ray start" in c:
            assert "RAY_AUTH_MODE=token" in c, c
    assert any("boto3" in c for c in prepared["head_setup_commands"])  # mlflow server -> S3 artifacts


# --- the container image: Ray and Python as pyproject.toml pins them -----------------------------

ROOT = CLUSTER_YAML.parent
IMAGE_TAG = re.compile(r"^(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3)(?P<minor>\d+)-(?P<platform>gpu|cu\d+)$")


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def ray_pin() -> SpecifierSet:
    (req,) = [Requirement(d) for d in pyproject()["project"]["dependencies"] if Requirement(d).name == "ray"]
    return req.specifier


def image_versions(image: str) -> tuple[Version, Version]:
    """(Ray version, Python version) of a rayproject/ray:{ray}-py{XY}-{gpu|cuNNN} image, the tag
    form Ray's installation docs give."""
    repo, _, tag = image.partition(":")
    assert repo == "rayproject/ray", f"{image}: not Ray's own image"
    m = IMAGE_TAG.match(tag)
    assert m, f"{image}: tag is not {{ray version}}-py{{XY}}-{{gpu|cuXXX}} (a pinned release, a GPU build)"
    return Version(m["ray"]), Version(f"{m['py']}.{m['minor']}")


def check_image(prepared: dict) -> tuple[Version, Version]:
    """The image's tag against pyproject.toml's pins, and the setup commands against the tag.
    Returns (Ray, Python) of the image."""
    image = prepared["docker"]["image"]
    ray_version, py_version = image_versions(image)
    assert ray_version in ray_pin(), f"{image}: Ray {ray_version}, pyproject.toml pins ray {ray_pin()}"
    requires_python = SpecifierSet(pyproject()["project"]["requires-python"])
    assert py_version in requires_python, f"{image}: Python {py_version}, pyproject.toml: {requires_python}"
    # no node type swaps in another image
    for name, node_type in prepared["available_node_types"].items():
        for key in ("image", "head_image", "worker_image"):
            assert node_type.get("docker", {}).get(key, image) == image, name
    for key in ("head_image", "worker_image"):
        assert prepared["docker"].get(key, image) == image
    # setup keeps the image's Ray (pip must not replace it) and fails on an image that is not the tag's
    (install,) = [c for c in prepared["setup_commands"] if "pip install" in c and "coun-tune" in c]
    assert f"'ray[default,tune]=={ray_version}'" in install, f"{image}: setup installs another Ray"
    (check,) = [c for c in prepared["setup_commands"] if "sys.version_info" in c]
    assert f"(({py_version.major}, {py_version.minor}), '{ray_version}')" in check, (
        f"{image}: setup checks other versions"
    )
    return ray_version, py_version


def test_image_ray_and_python_match_the_project_pins(offline):
    prepared = validate(load())
    ray_version, _ = check_image(prepared)
    # the laptop that runs `ray up` (this venv) must run the cluster's Ray
    import ray

    assert Version(ray.__version__) == ray_version
    # the host AMI is named (Ray's latest_dlami is Ubuntu 18.04 with CUDA 11.2)
    for name, node_type in prepared["available_node_types"].items():
        ami = node_type["node_config"].get("ImageId", "")
        assert ami and ami.lower() != "latest_dlami", name


@pytest.mark.parametrize(
    "image, problem",
    [
        ("rayproject/ray:2.60.0-py310-gpu", "Python 3.10, pyproject.toml"),
        ("rayproject/ray:2.59.0-py311-gpu", "Ray 2.59.0, pyproject.toml"),
        ("rayproject/ray:2.60.1-py311-gpu", "setup installs another Ray"),
        ("rayproject/ray:2.60.0-py312-gpu", "setup checks other versions"),
        ("rayproject/ray:latest-gpu", "tag is not"),
        ("rayproject/ray:2.60.0-py311-cpu", "tag is not"),
        ("rayproject/ray-ml:2.60.0-py311-gpu", "not Ray's own image"),
    ],
)
def test_image_check_refuses_a_mismatched_tag(offline, image, problem):
    cfg = load()
    cfg["docker"]["image"] = image
    with pytest.raises(AssertionError, match=re.escape(problem)):
        check_image(validate(cfg))


# --- worker IAM: the grant the file documents covers what it names --------------------------------


def documented_grant() -> tuple[str, dict]:
    """(role name, policy) of the `aws iam put-role-policy` command cluster.yaml documents."""
    m = re.search(r"aws iam put-role-policy --role-name (\S+) .*--policy-document '(\{.*\})'", CLUSTER_YAML.read_text())
    assert m, "cluster.yaml must document the put-role-policy grant the head's role needs"
    return m[1], json.loads(m[2])


def allowed(policy: dict, action: str, resource: str) -> bool:
    for st in policy["Statement"]:
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        resources = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
        if st["Effect"] == "Allow" and action in actions and any(fnmatch.fnmatchcase(resource, r) for r in resources):
            return True
    return False


def test_documented_grant_lets_the_default_head_role_launch_the_workers(offline):
    """The head keeps Ray's default role; it launches workers carrying an instance profile
    (iam:PassRole on that profile's role) from an AMI named by an SSM parameter
    (ssm:GetParameters on it). AmazonEC2FullAccess grants neither."""
    from ray.autoscaler._private.aws.config import DEFAULT_RAY_IAM_ROLE, DEFAULT_RAY_INSTANCE_PROFILE

    prepared = validate(load())
    role, policy = documented_grant()
    assert role == DEFAULT_RAY_IAM_ROLE  # the role `ray up` gives the head
    account, region = "123456789012", prepared["provider"]["region"]
    for name, node_type in prepared["available_node_types"].items():
        nc = node_type["node_config"]
        if name != prepared["head_node_type"]:
            # Ray's default profile holds the role of the same name
            assert nc["IamInstanceProfile"]["Name"] == DEFAULT_RAY_INSTANCE_PROFILE
            assert allowed(policy, "iam:PassRole", f"arn:aws:iam::{account}:role/{DEFAULT_RAY_IAM_ROLE}"), name
        if nc["ImageId"].startswith("resolve:ssm:"):
            param = nc["ImageId"][len("resolve:ssm:") :]
            assert allowed(policy, "ssm:GetParameters", f"arn:aws:ssm:{region}::parameter{param}"), name
    assert not allowed(policy, "iam:PassRole", f"arn:aws:iam::{account}:role/admin")  # only that role


# --- spot first, on-demand beside it ----------------------------------------------------------------


def test_gpu_workers_refuse_to_join_without_cuda(offline):
    """A worker whose torch sees no GPU would run its trials on the CPU without a word."""
    prepared = validate(load())
    head = prepared["head_node_type"]
    for name, v in prepared["available_node_types"].items():
        if name != head:
            assert v["resources"].get("GPU", 0) >= 1, name  # worker_setup_commands run on every worker type
    assert any("assert torch.cuda.is_available()" in c for c in prepared["worker_setup_commands"])
    assert not any("torch.cuda" in c for c in prepared["head_setup_commands"])  # the head has no GPU


def test_spot_workers_have_an_on_demand_twin_of_lower_priority(offline):
    prepared = validate(load())
    head = prepared["head_node_type"]
    assert "InstanceMarketOptions" not in prepared["available_node_types"][head]["node_config"]  # head on-demand
    workers = {k: v for k, v in prepared["available_node_types"].items() if k != head}
    spot = [
        v for v in workers.values() if v["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    ]
    on_demand = [v for v in workers.values() if "InstanceMarketOptions" not in v["node_config"]]
    assert spot and on_demand
    for s in spot:
        twins = [
            d
            for d in on_demand
            if d["resources"] == s["resources"] and d["node_config"]["InstanceType"] == s["node_config"]["InstanceType"]
        ]
        assert twins, "a spot worker type needs an on-demand type that can run the same trials"
        # autoscaler v2: equal fit -> recent launch failures -> priority: spot first
        assert all(s.get("priority", 0) > d.get("priority", 0) for d in twins)


# --- network: nothing but SSH open to the world; Ray Client documented --------------------------------


def test_only_ssh_is_open_to_the_world_and_ray_client_is_documented(offline):
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    prepared = validate(load())
    extra = prepared["provider"].get("security_group", {}).get("IpPermissions", [])
    rules = _create_default_inbound_rules(["sg-cluster"], extra)  # what `ray up` authorizes
    open_to_cidrs = [(r["FromPort"], r["ToPort"]) for r in rules if r.get("IpRanges") or r.get("Ipv6Ranges")]
    assert open_to_cidrs == [(22, 22)]
    text = CLUSTER_YAML.read_text()
    assert "10001" in text and "Ray Client" in text  # always started by `ray start --head` in 2.60
    (head_start,) = [c for c in prepared["head_start_ray_commands"] if "ray start --head" in c]
    assert "--ray-client-server-port" not in head_start  # the default port the comment documents


def test_ray_job_stop_leaves_the_driver_time_for_its_clean_stop(offline):
    """`ray job stop` SIGTERMs the driver, then SIGKILLs it after RAY_JOB_STOP_WAIT_TIME_S (3 s by
    default in 2.60's job supervisor): too short to save Tune's state and end the MLflow runs."""
    from ray.dashboard.modules.job.job_supervisor import JobSupervisor

    assert JobSupervisor.DEFAULT_RAY_JOB_STOP_WAIT_TIME_S < 60  # why the file sets it
    prepared = validate(load())
    (head_start,) = [c for c in prepared["head_start_ray_commands"] if "ray start --head" in c]
    m = re.search(r"\bRAY_JOB_STOP_WAIT_TIME_S=(\d+)\b", head_start)
    assert m and int(m[1]) >= 60, head_start


# --- the shipped GPU specs pack onto the worker types ---------------------------------------------------

GPU_SPECS = ["cifar10_resnet18_coun.yaml", "cifar100_resnet18_coun.yaml"]


def trials_per_node(node_resources: dict, trial: dict) -> int:
    """How many trials of `trial` ({"CPU": c, "GPU": g}) the autoscaler's bin packing puts on one
    node of `node_resources`."""
    from ray.autoscaler._private.resource_demand_scheduler import get_bin_pack_residual

    many = 64
    residual, _ = get_bin_pack_residual([dict(node_resources)], [dict(trial)] * many)
    return many - len(residual)


def reachable_trials(prepared: dict, trial: dict) -> int:
    """The most trials the worker types can run at once: the best-packing types first, each up
    to its max_workers, all of them up to the cluster's max_workers."""
    head = prepared["head_node_type"]
    per_type = sorted(
        (
            (trials_per_node(v["resources"], trial), v["max_workers"])
            for k, v in prepared["available_node_types"].items()
            if k != head
        ),
        reverse=True,
    )
    nodes_left, total = prepared["max_workers"], 0
    for per_node, max_workers in per_type:
        n = min(max_workers, nodes_left)
        total, nodes_left = total + n * per_node, nodes_left - n
    return total


@pytest.mark.parametrize("spec_name", GPU_SPECS)
def test_gpu_spec_packs_on_the_workers_and_reaches_max_concurrent_trials(offline, spec_name):
    spec = yaml.safe_load((ROOT / "search_spaces" / spec_name).read_text())
    prepared = validate(load())
    res = spec["resources_per_trial"]
    trial = {"CPU": res["cpu"], "GPU": res["gpu"]}
    assert trial["GPU"] > 0, "a ResNet-18 search on CIFAR is a GPU search"
    head = prepared["head_node_type"]
    assert trials_per_node(prepared["available_node_types"][head]["resources"], trial) == 0  # none on the head
    for name, v in prepared["available_node_types"].items():
        if name == head:
            continue
        per_node = trials_per_node(v["resources"], trial)
        # the GPU is what limits a node: no fraction of it idles for want of CPUs
        assert per_node == int(v["resources"]["GPU"] / trial["GPU"] + 1e-9), (name, per_node, trial)
        assert per_node >= 2, f"{name}: fractional GPUs should pack several trials per GPU"
    assert reachable_trials(prepared, trial) >= spec["max_concurrent_trials"], (
        f"{spec_name}: max_concurrent_trials {spec['max_concurrent_trials']} cannot be reached on cluster.yaml's "
        f"workers ({reachable_trials(prepared, trial)} at most)"
    )


def test_packing_count_catches_a_spec_that_idles_half_the_gpu(offline):
    """The old shipped request, {cpu: 4, gpu: 0.5}: one trial per 4-vCPU worker and 4 at most."""
    prepared = validate(load())
    trial = {"CPU": 4, "GPU": 0.5}
    assert trials_per_node(prepared["available_node_types"]["worker_gpu_spot"]["resources"], trial) == 1
    assert reachable_trials(prepared, trial) == 4 < 8
