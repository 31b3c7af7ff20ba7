"""cluster.yaml (the Ray cluster launcher config at the repo root) passes Ray's own offline
validation, and that validation is strict enough to catch a typo'd key.

Uses a private Ray API (ray.autoscaler._private.util.prepare_config / validate_config): Ray is
pinned to 2.60.x in pyproject.toml for this reason. The validation reads Ray's bundled JSON
schema and the provider's defaults.yaml: no network, no AWS credentials, no boto3. The tests
block sockets and drop AWS credentials from the environment to keep it that way.
"""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import pytest
import yaml

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
            lambda c: _rename(c["available_node_types"]["worker_gpu"], "resources", "resource"),
            "'resources' is a required property",
            id="node type key typo",
        ),
        pytest.param(
            lambda c: c["available_node_types"]["worker_gpu"].__setitem__("resources", {"CPU": 4, "GPU": 0.5}),
            "0.5 is not of type 'integer'",
            id="fractional node resource",
        ),
        pytest.param(
            lambda c: c["available_node_types"]["worker_gpu"].pop("node_config"),
            "'node_config' is a required property",
            id="missing node_config",
        ),
    ],
)
def test_broken_cluster_yaml_is_rejected(offline, mutate, message):
    import jsonschema

    cfg = load()
    assert "worker_gpu" in cfg["available_node_types"]
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
