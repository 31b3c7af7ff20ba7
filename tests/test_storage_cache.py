"""The split registry and the base-model cache on s3:// (a real moto server on 127.0.0.1):
written once, read back by a second run without training, checksummed on every read (a
flipped byte in the bucket is a UsageError, never a silent retrain), and base-model training
reports one progress line per epoch, also through the Ray task's line stream."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch

from coun_tune.errors import UsageError

BUCKET = "cache-test"
LINE = re.compile(
    r"^(original|oracle): epoch (\d+)/(\d+)  loss (\d+\.\d+)  train_acc (\d+\.\d\d)%  "
    r"(\d+\.\d) s/epoch  ETA (\S+)$"
)

pytest_plugins = ["_s3_helpers"]  # the moto server fixtures: s3_server, s3_env


def _s3(endpoint: str):
    from pyarrow import fs

    return fs.S3FileSystem(
        endpoint_override=endpoint.split("://", 1)[1],
        scheme="http",
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
    )


def s3_objects(endpoint: str, bucket: str, prefix: str) -> list[str]:
    """Every object key under bucket/prefix, recursively."""
    from pyarrow import fs

    infos = _s3(endpoint).get_file_info(fs.FileSelector(f"{bucket}/{prefix}", recursive=True, allow_not_found=True))
    return sorted(i.path[len(bucket) + 1 :] for i in infos if i.type == fs.FileType.File)


def _copy_prefix(endpoint: str, src: str, dst: str) -> None:
    s3 = _s3(endpoint)
    for key in s3_objects(endpoint, BUCKET, src):
        s3.copy_file(f"{BUCKET}/{key}", f"{BUCKET}/{dst}{key[len(src) :]}")


@pytest.fixture(scope="module")
def trained_on_s3(s3_server, scenario, digits):
    """prepare() with cache_dir on s3:// (original + oracle trained, split registered), its log
    lines, and a second prepare() from the same bucket prefix."""
    from coun_tune.core.pipeline import prepare

    mp = pytest.MonkeyPatch()
    for k, v in s3_server["env"].items():
        mp.setenv(k, v)
    try:
        logs: list[str] = []
        first = prepare(scenario, f"s3://{BUCKET}/base", "cpu", log=logs.append, data=digits)
        again_logs: list[str] = []
        again = prepare(scenario, f"s3://{BUCKET}/base", "cpu", log=again_logs.append, data=digits)
        yield {"first": first, "logs": logs, "again": again, "again_logs": again_logs, **s3_server}
    finally:
        mp.undo()


def test_everything_lands_in_the_bucket_and_is_read_back(trained_on_s3):
    first, again, endpoint = trained_on_s3["first"], trained_on_s3["again"], trained_on_s3["endpoint"]
    keys = s3_objects(endpoint, BUCKET, "base")
    splits = [k for k in keys if k.startswith("base/splits/digits/")]
    models = [k for k in keys if k.startswith("base/models/")]
    assert len(splits) == 1 and splits[0].endswith(".parquet")
    assert sorted(k.rsplit("/", 1)[1] for k in models) == ["meta.json", "meta.json", "model.pt", "model.pt"]
    assert first.base.from_cache == {"original": False, "oracle": False}
    assert again.base.from_cache == {"original": True, "oracle": True}
    assert not any(LINE.match(line) for line in trained_on_s3["again_logs"])  # nothing trained the second time
    for role in ("original", "oracle"):
        entry = first.base.cache_entries[role]
        assert isinstance(entry, str) and entry.startswith(f"s3://{BUCKET}/base/models/")
        # meta.json's checksum is the sha256 of the bytes in the bucket (read independently)
        s3 = _s3(endpoint)
        with s3.open_input_stream(f"{entry[5:]}/model.pt") as f:
            blob = f.read()
        with s3.open_input_stream(f"{entry[5:]}/meta.json") as f:
            meta = json.loads(f.read())
        assert meta["sha256"] == hashlib.sha256(blob).hexdigest()
        model_a, model_b = getattr(first.base, role), getattr(again.base, role)
        assert all(torch.equal(a, b) for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()))
    assert again.base.oracle_metrics == first.base.oracle_metrics
    assert again.split.split_hash == first.split.split_hash


def test_one_progress_line_per_training_epoch(trained_on_s3, scenario):
    n = scenario.train_recipe.epochs
    parsed = {"original": [], "oracle": []}
    for line in trained_on_s3["logs"]:
        m = LINE.match(line)
        if m:
            parsed[m.group(1)].append(m.groups()[1:])
    for role, rows in parsed.items():
        assert [(int(k), int(total)) for k, total, *_ in rows] == [(k, n) for k in range(1, n + 1)], role
        losses = [float(r[2]) for r in rows]
        accs = [float(r[3]) for r in rows]
        assert losses[-1] < losses[0] and accs[-1] > accs[0]  # it learned: loss down, train accuracy up
        assert all(0.0 <= a <= 100.0 for a in accs)
        assert rows[-1][5] == "0s"  # nothing left after the last epoch


@pytest.mark.parametrize("target", ["model.pt", "meta.json", "split"])
def test_a_corrupted_object_in_the_bucket_is_a_usage_error(trained_on_s3, s3_env, scenario, digits, target):
    from coun_tune.core.pipeline import prepare

    endpoint = trained_on_s3["endpoint"]
    prefix = f"bad-{target.replace('.', '-')}"
    _copy_prefix(endpoint, "base", prefix)
    keys = s3_objects(endpoint, BUCKET, prefix)
    if target == "split":
        key = next(k for k in keys if k.endswith(".parquet"))
    else:
        entry = trained_on_s3["first"].base.cache_entries["original"]
        key = f"{prefix}/models/{entry.rsplit('/', 1)[1]}/{target}"
    s3 = _s3(endpoint)
    with s3.open_input_stream(f"{BUCKET}/{key}") as f:
        data = bytearray(f.read())
    if target == "split":
        data = data[:50]  # truncated (a flipped byte could land in unchecked statistics)
    else:
        data[len(data) // 2] ^= 0xFF  # model.pt: fails its checksum; meta.json: no longer UTF-8 JSON
    with s3.open_output_stream(f"{BUCKET}/{key}") as f:
        f.write(bytes(data))
    with pytest.raises(UsageError):
        prepare(scenario, f"s3://{BUCKET}/{prefix}", "cpu", log=lambda s: None, data=digits)
    with s3.open_input_stream(f"{BUCKET}/{key}") as f:
        assert f.read() == bytes(data)  # left as found: not "repaired" by a silent retrain


def test_the_ray_task_stream_yields_lines_then_the_result(trained_on_s3, s3_env, scenario, digits):
    """The generator the Ray task runs (called here directly, without Ray): progress lines as
    str, then the result dict; an error on the worker is raised by the generator itself."""
    from coun_tune.search.trainable import _base_models_stream

    items = list(_base_models_stream(scenario.to_dict(), f"s3://{BUCKET}/base", digits, 1))
    assert isinstance(items[-1], dict) and all(isinstance(i, str) for i in items[:-1])
    assert items[-1]["from_cache"] == {"original": True, "oracle": True}
    assert any("loaded from cache" in i for i in items[:-1])
    _copy_prefix(trained_on_s3["endpoint"], "base", "bad-stream")
    entry = trained_on_s3["first"].base.cache_entries["oracle"]
    s3 = _s3(trained_on_s3["endpoint"])
    with s3.open_output_stream(f"{BUCKET}/bad-stream/models/{entry.rsplit('/', 1)[1]}/meta.json") as f:
        f.write(b"{not json")
    with pytest.raises(UsageError, match="meta.json"):
        list(_base_models_stream(scenario.to_dict(), f"s3://{BUCKET}/bad-stream", digits, 1))
