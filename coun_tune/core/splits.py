"""The split registry: which training samples are forgotten, decided once and stored.

A forget spec is a short string:
  random:F        a seeded random fraction F in (0, 1) of the training set
  class:K         every training sample of class K (its test samples leave the test set too)
  class:K:F       a seeded random fraction F of class K (the test set stays whole)
  ids:PATH        an explicit list: a Parquet file with an integer column `index`

For (dataset, spec, seed) the indices are computed once and written as Parquet with a content
hash (`split_hash`) under <cache_dir>/splits/ (a local path or s3://..., see storage.py); the
original model, the oracle and every unlearning run read the same file, so theta_o trains on
exactly D_r + D_u and theta_r on exactly D_r (METHOD.md section 5).
pyarrow is imported lazily: the rest of `core` runs with torch alone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coun_tune.core import storage
from coun_tune.core.datasets import DatasetArrays
from coun_tune.errors import UsageError


@dataclass(frozen=True)
class ForgetSpec:
    kind: str  # "random" | "class" | "ids"
    fraction: float | None = None
    class_id: int | None = None
    path: str | None = None

    @property
    def removes_whole_class(self) -> bool:
        return self.kind == "class" and self.fraction is None

    def __str__(self) -> str:
        if self.kind == "random":
            return f"random:{self.fraction:g}"
        if self.kind == "class":
            return f"class:{self.class_id}" + ("" if self.fraction is None else f":{self.fraction:g}")
        return f"ids:{self.path}"


def _fraction(text: str, spec: str) -> float:
    try:
        f = float(text)
    except ValueError:
        raise UsageError(f"forget spec {spec!r}: {text!r} is not a number") from None
    if not 0.0 < f < 1.0:
        raise UsageError(f"forget spec {spec!r}: fraction must be in (0, 1), got {f:g}")
    return f


def parse_forget_spec(spec: str) -> ForgetSpec:
    """Parse `random:F`, `class:K`, `class:K:F` or `ids:PATH`; raises UsageError."""
    kind, _, rest = str(spec).partition(":")
    if kind == "random" and rest:
        return ForgetSpec("random", fraction=_fraction(rest, spec))
    if kind == "class" and rest:
        cls, _, frac = rest.partition(":")
        if not cls.isdigit():
            raise UsageError(f"forget spec {spec!r}: class must be a non-negative integer")
        return ForgetSpec("class", class_id=int(cls), fraction=_fraction(frac, spec) if frac else None)
    if kind == "ids" and rest:
        return ForgetSpec("ids", path=rest)
    raise UsageError(f"bad forget spec {spec!r}; use random:F, class:K, class:K:F or ids:PATH.parquet")


def read_index_list(path: str | Path) -> np.ndarray:
    """Read a forget request: a Parquet file with an integer column `index`. UsageError on a
    missing/corrupted file, a missing column, nulls or non-integers."""
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"forget list {str(p)!r} does not exist")
    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise UsageError(f"forget list {str(p)!r} is not a readable Parquet file ({type(e).__name__})") from None
    if "index" not in table.column_names:
        raise UsageError(f"forget list {str(p)!r} has no column 'index' (columns: {table.column_names})")
    col = table.column("index")
    if col.null_count or not str(col.type).startswith(("int", "uint")):
        raise UsageError(f"forget list {str(p)!r}: column 'index' must be integers without nulls, got {col.type}")
    return np.asarray(col.to_numpy(), dtype=np.int64)


@dataclass(frozen=True)
class Split:
    """forget_idx, retain_idx: sorted int64 indices into the training split (disjoint, their
    union is all of it); test_idx: the test samples that belong to the scenario."""

    dataset: str
    spec: str
    seed: int
    forget_idx: np.ndarray
    retain_idx: np.ndarray
    test_idx: np.ndarray
    split_hash: str


def _content_hash(fingerprint: str, forget_idx: np.ndarray, test_idx: np.ndarray) -> str:
    h = hashlib.sha256(fingerprint.encode())
    h.update(forget_idx.astype("<i8").tobytes())
    h.update(b"|test|")
    h.update(test_idx.astype("<i8").tobytes())
    return h.hexdigest()


def compute_forget_indices(
    data: DatasetArrays, spec: ForgetSpec, seed: int, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pure: (forget_idx, test_idx) for a spec and seed, both sorted int64. `exclude` holds
    samples already removed by earlier requests (sequential forgetting): they are never drawn
    again, and a random fraction is a fraction of the *whole* training set."""
    n = len(data.train_y)
    rng = np.random.default_rng(seed)
    test_idx = np.arange(len(data.test_y), dtype=np.int64)
    available = np.setdiff1d(np.arange(n, dtype=np.int64), exclude if exclude is not None else [])
    if spec.kind == "random":
        k = int(round(spec.fraction * n))
        if k > len(available):
            raise UsageError(f"forget spec {spec} needs {k} samples but only {len(available)} remain")
        forget = rng.choice(available, size=k, replace=False)
    elif spec.kind == "class":
        if spec.class_id >= data.num_classes:
            raise UsageError(f"forget spec class:{spec.class_id}: {data.name} has classes 0..{data.num_classes - 1}")
        members = available[data.train_y[available] == spec.class_id]
        if spec.fraction is None:
            forget = members
            test_idx = np.flatnonzero(data.test_y != spec.class_id).astype(np.int64)
        else:
            forget = rng.choice(members, size=int(round(spec.fraction * len(members))), replace=False)
    else:
        forget = read_index_list(spec.path)
        bad = forget[(forget < 0) | (forget >= n)]
        if len(bad):
            raise UsageError(f"forget list {spec.path!r}: index {int(bad[0])} is out of range [0, {n})")
        if len(np.unique(forget)) != len(forget):
            raise UsageError(f"forget list {spec.path!r} has duplicate indices")
        if exclude is not None and np.isin(forget, exclude).any():
            raise UsageError(f"forget list {spec.path!r} repeats samples an earlier request already removed")
    forget = np.sort(np.asarray(forget, dtype=np.int64))
    removed = 0 if exclude is None else len(exclude)
    if len(forget) == 0 or len(forget) + removed >= n:
        raise UsageError(f"forget spec {spec} selects {len(forget)} of {n} samples; need at least 1 and fewer than all")
    return forget, test_idx


def _spec_key(fs: ForgetSpec) -> list:
    ids_hash = ""
    if fs.kind == "ids":  # key on the request's content, not its path
        ids_hash = hashlib.sha256(read_index_list(fs.path).astype("<i8").tobytes()).hexdigest()
    return [fs.kind, fs.fraction, fs.class_id, ids_hash]


def _register(
    data: DatasetArrays, fingerprint: str, key_parts: list, spec_text: str, seed: int, cache_dir: str | Path, compute
) -> Split:
    """Read the split for `key_parts` from the registry, or compute it (compute() ->
    (forget_idx, test_idx)) and write it once. Verified against its content hash on read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    key = hashlib.sha256(json.dumps([fingerprint, key_parts, seed]).encode()).hexdigest()[:20]
    path = storage.join(str(cache_dir), "splits", data.name, f"{key}.parquet")  # local path or s3://
    if storage.exists(path):
        try:
            table = pq.read_table(pa.BufferReader(storage.read_bytes(path)))
            meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
            role = np.asarray(table.column("role").to_pylist())
            index = table.column("index").to_numpy().astype(np.int64)
        except Exception as e:  # a truncated or foreign file: say so, never a traceback
            raise UsageError(
                f"split file {str(path)!r} is unreadable ({type(e).__name__}): delete it to recompute"
            ) from None
        forget, test_idx = np.sort(index[role == "forget"]), np.sort(index[role == "test"])
        if _content_hash(fingerprint, forget, test_idx) != meta.get("split_hash"):
            raise UsageError(f"split file {str(path)!r} does not match its content hash: delete it to recompute")
        split_hash = meta["split_hash"]
    else:
        forget, test_idx = compute()
        split_hash = _content_hash(fingerprint, forget, test_idx)
        table = pa.table(
            {
                "role": pa.array(["forget"] * len(forget) + ["test"] * len(test_idx)),
                "index": pa.array(np.concatenate([forget, test_idx]), type=pa.int64()),
            }
        ).replace_schema_metadata(
            {
                "split_hash": split_hash,
                "dataset": data.name,
                "dataset_fingerprint": fingerprint,
                "spec": spec_text,
                "seed": str(seed),
            }
        )
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        storage.write_bytes(path, buf.getvalue().to_pybytes())  # atomic: no trial reads a half-written split
    retain = np.setdiff1d(np.arange(len(data.train_y), dtype=np.int64), forget)
    return Split(data.name, spec_text, seed, forget, retain, test_idx, split_hash)


def materialize_split(data: DatasetArrays, spec: str | ForgetSpec, seed: int, cache_dir: str | Path) -> Split:
    """Return the split for (data, spec, seed), reading it from the registry if it is there and
    writing it (once) if not. The file is verified against its content hash on every read."""
    fs = parse_forget_spec(spec) if isinstance(spec, str) else spec
    fingerprint = data.fingerprint()
    return _register(
        data, fingerprint, _spec_key(fs), str(fs), seed, cache_dir, lambda: compute_forget_indices(data, fs, seed)
    )


def sequential_splits(data: DatasetArrays, specs: list[str], seed: int, cache_dir: str | Path) -> list[Split]:
    """Sequential forgetting: requests applied in turn. Request k is drawn from the samples
    that remain after requests 1..k-1 (seed + k - 1), so requests are disjoint. Split k is
    cumulative: its forget set is everything removed so far, its retain set the data that
    remains, its test set drops every whole class removed so far. Each is in the registry."""
    fingerprint = data.fingerprint()
    removed = np.zeros(0, dtype=np.int64)
    test_idx = np.arange(len(data.test_y), dtype=np.int64)
    key_parts: list = []
    splits = []
    for k, spec in enumerate(specs):
        fs = parse_forget_spec(spec)
        request, req_test = compute_forget_indices(data, fs, seed + k, exclude=removed)
        removed = np.union1d(removed, request)
        test_idx = np.intersect1d(test_idx, req_test)
        key_parts = key_parts + [_spec_key(fs)]
        frozen_removed, frozen_test = removed.copy(), test_idx.copy()
        text = " then ".join(str(parse_forget_spec(s)) for s in specs[: k + 1])
        splits.append(
            _register(
                data,
                fingerprint,
                ["sequential", key_parts],
                text,
                seed,
                cache_dir,
                lambda r=frozen_removed, t=frozen_test: (r, t),
            )
        )
    return splits
