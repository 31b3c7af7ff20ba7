"""coun_tune.core.storage on a local directory and on a real S3-protocol server (moto on
127.0.0.1): the same operations give the same answers, and what storage writes is seen by an
independent reader (plain open() locally, a separately built pyarrow S3 client for S3)."""

from __future__ import annotations

import os
import uuid

import pytest

from coun_tune.core import storage
from coun_tune.errors import UsageError

pytest_plugins = ["_s3_helpers"]  # the moto server fixtures: s3_server, s3_env


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    request.getfixturevalue("s3_env")
    return f"s3://bkt-{uuid.uuid4().hex[:12]}/pre/fix"  # a fresh bucket per test


def test_roundtrip_list_exists_remove(root):
    f = storage.join(root, "models", "k1", "model.pt")
    assert not storage.exists(f)
    assert storage.list_dir(storage.join(root, "models")) == []
    storage.write_bytes(f, b"\x00weights\xff")
    storage.write_bytes(storage.join(root, "models", "k2", "meta.json"), b"{}")
    assert storage.exists(f)
    assert storage.read_bytes(f) == b"\x00weights\xff"
    assert storage.list_dir(storage.join(root, "models")) == ["k1", "k2"]
    assert storage.list_dir(storage.join(root, "models", "k1")) == ["model.pt"]  # no temp files left beside it
    storage.write_bytes(f, b"second")  # overwrite replaces the whole content
    assert storage.read_bytes(f) == b"second"
    storage.remove_tree(storage.join(root, "models", "k1"))
    assert not storage.exists(f)
    assert storage.list_dir(storage.join(root, "models")) == ["k2"]
    storage.remove_tree(storage.join(root, "models", "nothing-here"))  # missing: no error
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f)


def test_make_dirs_and_filesystem_path(root):
    d = storage.join(root, "a", "b")
    storage.make_dirs(d)
    assert storage.exists(d)
    assert "b" in storage.list_dir(storage.join(root, "a"))
    fs, path = storage.filesystem(root)
    if storage.is_remote(root):
        assert path == root[len("s3://") :]  # bucket/prefix, what Tune takes as storage_path
    else:
        assert path == root and os.path.isabs(path)
    with fs.open_output_stream(f"{path}/via_fs.txt") as out:  # the returned fs writes where storage reads
        out.write(b"x")
    assert storage.read_bytes(storage.join(root, "via_fs.txt")) == b"x"


def test_local_is_plain_files_and_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.join("rel", "x.bin") == str(tmp_path / "rel" / "x.bin")
    storage.write_bytes("rel/x.bin", b"abc")
    assert (tmp_path / "rel" / "x.bin").read_bytes() == b"abc"
    assert sorted(os.listdir(tmp_path / "rel")) == ["x.bin"]
    assert storage.filesystem("rel")[1] == str(tmp_path / "rel")
    assert not storage.is_remote("rel") and storage.is_remote("s3://b/p")


def test_s3_objects_land_in_the_bucket(s3_env):
    uri = "s3://landing/runs/exp1"
    storage.write_bytes(storage.join(uri, "state.json"), b"{}")
    storage.write_bytes(storage.join(uri, "sub", "model.pt"), b"w")
    assert s3_env["objects"]("landing") == ["runs/exp1/state.json", "runs/exp1/sub/model.pt"]
    assert storage.join("s3://landing/runs/", "/a/", "b") == "s3://landing/runs/a/b"


def test_bad_uris_are_usage_errors(monkeypatch):
    for bad in ("gs://bucket/x", "http://host/x", "s3:///nobucket"):
        with pytest.raises(UsageError):
            storage.filesystem(bad)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "ftp://127.0.0.1:9")
    with pytest.raises(UsageError, match="AWS_ENDPOINT_URL"):
        storage.filesystem("s3://b/p")
