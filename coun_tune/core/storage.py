"""Where a search keeps its files: a local (or NFS) path, or `s3://bucket/prefix`.

Every function takes a URI string. Local paths behave as plain paths always did (a relative
path is made absolute against the current directory, `~` is expanded). `s3://` goes through
`pyarrow.fs.S3FileSystem`, the same filesystem Ray Tune takes as `storage_filesystem`, so the
runner, the split registry and the base-model cache all see one store.

S3 settings come from the standard AWS environment:
  AWS_ENDPOINT_URL       an S3-compatible server, e.g. http://127.0.0.1:9000 (optional)
  AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN   (else pyarrow's default chain:
                         ~/.aws, instance profile, ...)
  AWS_DEFAULT_REGION     (else AWS_REGION; else us-east-1 with a custom endpoint, and on AWS the
                         SDK's own lookup: profile, then the EC2 instance's region)
pyarrow is imported lazily: the rest of `core` runs with torch alone.
"""

from __future__ import annotations

import os
import uuid
from functools import lru_cache
from urllib.parse import urlparse

from coun_tune.errors import UsageError

S3 = "s3://"
_BUCKETS_SEEN: set[tuple] = set()  # (endpoint, bucket) this process has made sure exist


def is_remote(uri: str) -> bool:
    """True for `s3://...`; False for a local/NFS path."""
    return str(uri).startswith(S3)


def _local(uri: str) -> str:
    return os.path.abspath(os.path.expanduser(str(uri)))


def _check(uri: str) -> None:
    text = str(uri)
    if "://" in text and not is_remote(text):
        raise UsageError(f"storage {text!r}: only local paths and s3://bucket/prefix are supported")
    if is_remote(text) and not text[len(S3) :].split("/", 1)[0]:
        raise UsageError(f"storage {text!r}: an s3:// URI needs a bucket name (s3://bucket/prefix)")


def _endpoint() -> tuple[str | None, str]:
    """(host:port or None, scheme) from AWS_ENDPOINT_URL."""
    url = os.environ.get("AWS_ENDPOINT_URL", "").strip()
    if not url:
        return None, "https"
    parsed = urlparse(url if "://" in url else f"https://{url}")
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise UsageError(f"AWS_ENDPOINT_URL {url!r} must look like http://host:port or https://host")
    return parsed.netloc, parsed.scheme


@lru_cache(maxsize=8)
def _s3(endpoint: str | None, scheme: str, key: str | None, secret: str | None, token: str | None, region: str | None):
    from pyarrow import fs

    kwargs = dict(scheme=scheme, allow_bucket_creation=True)
    if region:
        kwargs["region"] = region
    if endpoint:
        kwargs["endpoint_override"] = endpoint
    if key and secret:  # else pyarrow's default credential chain (profile, instance role)
        kwargs.update(access_key=key, secret_key=secret, session_token=token or None)
    return fs.S3FileSystem(**kwargs)


def filesystem(uri: str):
    """(pyarrow.fs.FileSystem, path inside it): what Ray Tune takes as storage_filesystem and
    storage_path. For s3://bucket/prefix the path is `bucket/prefix`."""
    _check(uri)
    if is_remote(uri):
        endpoint, scheme = _endpoint()
        env = os.environ.get
        region = env("AWS_DEFAULT_REGION") or env("AWS_REGION") or ("us-east-1" if endpoint else None)
        fs = _s3(
            endpoint, scheme, env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"), env("AWS_SESSION_TOKEN"), region
        )
        return fs, str(uri)[len(S3) :].strip("/")
    from pyarrow import fs

    return fs.LocalFileSystem(), _local(uri)


def join(uri: str, *parts: str) -> str:
    """`uri/part/...` (a local result is absolute)."""
    _check(uri)
    clean = [str(p).strip("/") for p in parts if str(p).strip("/")]
    if is_remote(uri):
        return "/".join([str(uri).rstrip("/"), *clean])
    return os.path.join(_local(uri), *clean)


def exists(uri: str) -> bool:
    from pyarrow.fs import FileType

    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != FileType.NotFound


def read_bytes(uri: str) -> bytes:
    """The whole file; FileNotFoundError if it is not there."""
    from pyarrow.fs import FileType

    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != FileType.File:
        raise FileNotFoundError(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file, atomically: a reader sees the old file or the new one, never half.
    Local: a uniquely named temp file beside it, then rename (concurrent writers may share a
    cache). S3: a PUT (or a completed multipart upload) replaces an object atomically."""
    fs, path = filesystem(uri)
    if is_remote(uri):
        bucket = (_endpoint()[0], path.split("/", 1)[0])
        if bucket not in _BUCKETS_SEEN:  # a PUT into a missing bucket fails: create it once
            fs.create_dir(bucket[1], recursive=True)  # a no-op (HEAD) when it exists
            _BUCKETS_SEEN.add(bucket)
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def list_dir(uri: str) -> list[str]:
    """Sorted names directly under `uri` ([] if it does not exist)."""
    from pyarrow.fs import FileSelector

    fs, path = filesystem(uri)
    infos = fs.get_file_info(FileSelector(path, allow_not_found=True, recursive=False))
    return sorted(info.base_name for info in infos)


def make_dirs(uri: str) -> None:
    """Create the folder and its parents (on S3, the bucket if missing and a folder marker)."""
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)


def remove_tree(uri: str) -> None:
    """Remove a folder with everything in it, or a single file; nothing if it is not there."""
    from pyarrow.fs import FileType

    fs, path = filesystem(uri)
    kind = fs.get_file_info(path).type
    if kind == FileType.Directory:
        fs.delete_dir(path)
    elif kind == FileType.File:
        fs.delete_file(path)
