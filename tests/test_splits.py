"""The split registry on the real digits dataset (1437 train, 360 test)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from coun_tune.core.splits import compute_forget_indices, materialize_split, parse_forget_spec, read_index_list
from coun_tune.errors import UsageError

N_TRAIN, N_TEST = 1437, 360


def _write_ids(path, values, name="index", type_=pa.int64()):
    pq.write_table(pa.table({name: pa.array(values, type=type_)}), path)
    return path


def _split_files(cache):
    return sorted((cache / "splits" / "digits").glob("*.parquet"))


def test_digits_sizes(digits):
    assert len(digits.train_y) == N_TRAIN and len(digits.test_y) == N_TEST


def test_random_fraction(digits, tmp_path):
    s = materialize_split(digits, "random:0.1", 0, tmp_path)
    assert len(s.forget_idx) == round(0.1 * N_TRAIN) == 144
    assert len(s.retain_idx) == N_TRAIN - 144
    assert len(np.intersect1d(s.forget_idx, s.retain_idx)) == 0
    assert np.array_equal(np.union1d(s.forget_idx, s.retain_idx), np.arange(N_TRAIN))
    assert np.array_equal(s.forget_idx, np.sort(s.forget_idx)) and s.forget_idx.dtype == np.int64
    assert np.array_equal(s.test_idx, np.arange(N_TEST))
    assert s.spec == "random:0.1" and s.seed == 0 and s.dataset == "digits"


def test_same_seed_same_split_across_calls_and_cache_dirs(digits, tmp_path):
    a = materialize_split(digits, "random:0.1", 7, tmp_path / "c1")
    b = materialize_split(digits, "random:0.1", 7, tmp_path / "c1")  # read back from the file
    c = materialize_split(digits, "random:0.1", 7, tmp_path / "c2")  # a fresh registry
    for other in (b, c):
        assert np.array_equal(a.forget_idx, other.forget_idx)
        assert np.array_equal(a.retain_idx, other.retain_idx)
        assert np.array_equal(a.test_idx, other.test_idx)
        assert a.split_hash == other.split_hash
    d = materialize_split(digits, "random:0.1", 8, tmp_path / "c1")
    assert not np.array_equal(a.forget_idx, d.forget_idx)
    assert a.split_hash != d.split_hash
    assert len(_split_files(tmp_path / "c1")) == 2


def test_whole_class(digits, tmp_path):
    s = materialize_split(digits, "class:3", 0, tmp_path)
    assert np.array_equal(s.forget_idx, np.flatnonzero(digits.train_y == 3))
    assert (digits.train_y[s.retain_idx] != 3).all()
    assert np.array_equal(s.test_idx, np.flatnonzero(digits.test_y != 3))
    assert (digits.test_y[s.test_idx] != 3).all() and len(s.test_idx) < N_TEST
    assert len(s.forget_idx) + len(s.retain_idx) == N_TRAIN


def test_class_fraction_keeps_test_set(digits, tmp_path):
    s = materialize_split(digits, "class:3:0.5", 0, tmp_path)
    n3 = int((digits.train_y == 3).sum())
    assert len(s.forget_idx) == round(0.5 * n3)
    assert (digits.train_y[s.forget_idx] == 3).all()
    assert np.array_equal(s.test_idx, np.arange(N_TEST))
    # half of class 3 stays in the retain set
    assert int((digits.train_y[s.retain_idx] == 3).sum()) == n3 - len(s.forget_idx)


def test_ids_round_trip(digits, tmp_path):
    ids = [1000, 3, 77, 0, 1436, 500]
    path = _write_ids(tmp_path / "req.parquet", ids)
    assert read_index_list(path).tolist() == ids
    s = materialize_split(digits, f"ids:{path}", 0, tmp_path / "cache")
    assert s.forget_idx.tolist() == sorted(ids)
    assert np.array_equal(s.test_idx, np.arange(N_TEST))
    assert len(s.retain_idx) == N_TRAIN - len(ids) and not np.isin(ids, s.retain_idx).any()
    # the registry keys on content, not on the path: the same list elsewhere is the same split
    path2 = _write_ids(tmp_path / "other.parquet", list(reversed(ids)))
    s2 = materialize_split(digits, f"ids:{path2}", 0, tmp_path / "cache")
    assert s2.split_hash == s.split_hash
    # unsigned integers are accepted too
    path3 = _write_ids(tmp_path / "u.parquet", ids, type_=pa.uint32())
    assert read_index_list(path3).tolist() == ids


@pytest.mark.parametrize(
    "values,type_,name",
    [
        ([0, 1, N_TRAIN], pa.int64(), "index"),  # out of range (high)
        ([0, -1, 5], pa.int64(), "index"),  # out of range (negative)
        ([4, 5, 4], pa.int64(), "index"),  # duplicate
        ([1, 2, 3], pa.int64(), "idx"),  # missing column `index`
        ([1.0, 2.0], pa.float64(), "index"),  # not integers
        ([1, None, 3], pa.int64(), "index"),  # nulls
        ([], pa.int64(), "index"),  # empty request
        (list(range(N_TRAIN)), pa.int64(), "index"),  # everything: nothing left to retain
    ],
)
def test_bad_ids_file(digits, tmp_path, values, type_, name):
    path = _write_ids(tmp_path / "bad.parquet", values, name=name, type_=type_)
    with pytest.raises(UsageError):
        materialize_split(digits, f"ids:{path}", 0, tmp_path / "cache")
    assert not _split_files(tmp_path / "cache")  # nothing was registered


def test_missing_ids_file(digits, tmp_path):
    with pytest.raises(UsageError):
        materialize_split(digits, f"ids:{tmp_path / 'nope.parquet'}", 0, tmp_path)


def test_corrupted_ids_file(digits, tmp_path):
    path = tmp_path / "garbage.parquet"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    with pytest.raises(UsageError):
        materialize_split(digits, f"ids:{path}", 0, tmp_path / "cache")
    # a truncated real Parquet file as well
    good = _write_ids(tmp_path / "good.parquet", [1, 2, 3])
    path.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(UsageError):
        read_index_list(path)


@pytest.mark.parametrize(
    "spec", ["random:0", "random:1", "random:1.5", "random:-0.1", "random:nan", "class:3:0", "class:3:1", "class:3:2"]
)
def test_fraction_outside_open_interval(spec):
    with pytest.raises(UsageError):
        parse_forget_spec(spec)


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "random",
        "random:",
        "random:abc",
        "foo:0.1",
        "class",
        "class:",
        "class:x",
        "class:-1",
        "class:3:abc",
        "ids:",
        "ids",
        "0.1",
        "Random:0.1",
    ],
)
def test_bad_spec_strings(spec):
    with pytest.raises(UsageError):
        parse_forget_spec(spec)


def test_class_out_of_range(digits, tmp_path):
    with pytest.raises(UsageError):
        materialize_split(digits, "class:10", 0, tmp_path)


def test_parse_round_trip():
    for spec in ("random:0.1", "class:3", "class:3:0.5", "ids:/a/b.parquet"):
        assert str(parse_forget_spec(spec)) == spec
    fs = parse_forget_spec("class:3")
    assert fs.removes_whole_class and not parse_forget_spec("class:3:0.5").removes_whole_class


def test_compute_is_pure(digits):
    fs = parse_forget_spec("random:0.25")
    a = compute_forget_indices(digits, fs, 5)
    b = compute_forget_indices(digits, fs, 5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert len(a[0]) == round(0.25 * N_TRAIN)


def test_file_written_once(digits, tmp_path):
    s1 = materialize_split(digits, "random:0.2", 1, tmp_path)
    (f,) = _split_files(tmp_path)
    before = f.stat().st_mtime_ns
    os.utime(f, ns=(before - 10**9, before - 10**9))  # make any rewrite visible
    stamp = f.stat().st_mtime_ns
    s2 = materialize_split(digits, "random:0.2", 1, tmp_path)
    assert f.stat().st_mtime_ns == stamp
    assert s1.split_hash == s2.split_hash and np.array_equal(s1.forget_idx, s2.forget_idx)
    # the file records what it is
    meta = {k.decode(): v.decode() for k, v in pq.read_schema(f).metadata.items()}
    assert meta["split_hash"] == s1.split_hash and meta["spec"] == "random:0.2" and meta["seed"] == "1"
    table = pq.read_table(f)
    roles = np.asarray(table.column("role").to_pylist())
    assert (roles == "forget").sum() == len(s1.forget_idx) and (roles == "test").sum() == N_TEST


def test_tampered_file_raises(digits, tmp_path):
    materialize_split(digits, "random:0.1", 0, tmp_path)
    (f,) = _split_files(tmp_path)
    table = pq.read_table(f)
    index = table.column("index").to_numpy().copy()
    roles = np.asarray(table.column("role").to_pylist())
    forget = index[roles == "forget"]
    # swap one forget index for a retain one, keep the old metadata (and its split_hash)
    replacement = np.setdiff1d(np.arange(N_TRAIN), forget)[0]
    index[np.flatnonzero(roles == "forget")[0]] = replacement
    tampered = pa.table({"role": table.column("role"), "index": pa.array(index, type=pa.int64())})
    pq.write_table(tampered.replace_schema_metadata(table.schema.metadata), f)
    with pytest.raises(UsageError):
        materialize_split(digits, "random:0.1", 0, tmp_path)


def test_corrupted_registry_file_is_a_usage_error(tmp_path):
    from coun_tune.core.datasets import load_dataset
    from coun_tune.core.splits import materialize_split
    from coun_tune.errors import UsageError

    data = load_dataset("digits")
    materialize_split(data, "random:0.1", 0, tmp_path)
    (path,) = (tmp_path / "splits" / "digits").glob("*.parquet")
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(UsageError, match="unreadable"):
        materialize_split(data, "random:0.1", 0, tmp_path)


def test_ids_request_rewritten_in_place_is_a_new_split(digits, tmp_path):
    """The same path, rewritten with other ids, is another request: a new split hash and its
    own forget set (a path-keyed registry would hand back the first request's split)."""
    path = tmp_path / "req.parquet"
    _write_ids(path, [3, 77, 500])
    first = materialize_split(digits, f"ids:{path}", 0, tmp_path / "cache")
    _write_ids(path, [4, 78, 501, 1000])
    second = materialize_split(digits, f"ids:{path}", 0, tmp_path / "cache")
    assert first.forget_idx.tolist() == [3, 77, 500]
    assert second.forget_idx.tolist() == [4, 78, 501, 1000]
    assert second.split_hash != first.split_hash
    assert len(_split_files(tmp_path / "cache")) == 2
