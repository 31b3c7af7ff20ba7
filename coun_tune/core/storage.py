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

An S3 request that fails for a reason the user must fix (the endpoint does not answer, the
bucket is gone, access is denied) raises `StorageError`: one line naming the endpoint, the S3
operation and the URI, which the CLI prints with exit code 2 instead of pyarrow's traceback.
`check_bucket` asks the bucket once (HeadBucket) so a search fails that way before Ray starts.
"""

from __future__ import annotations

import os
import re
import uuid
from contextlib import contextmanager
from functools import lru_cache
from urllib.parse import urlparse

from coun_tune.errors import UsageError

S3 = "s3://"
# "0": never create a bucket (a search sets it for its driver and Ray workers once it checked
# its buckets: a bucket lost mid-search must stay lost, not come back empty under the next write)
CREATE_BUCKETS_ENV = "COUN_TUNE_S3_CREATE_BUCKETS"
_BUCKETS_SEEN: set[tuple] = set()  # (endpoint, bucket) this process has made sure exist


class StorageError(UsageError):
    """An S3 request failed: the endpoint unreachable, the bucket gone, access denied."""


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


def endpoint_label() -> str:
    """The S3 endpoint requests go to, for messages: AWS_ENDPOINT_URL, else AWS's own."""
    url = os.environ.get("AWS_ENDPOINT_URL", "").strip()
    if url:
        return url
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    return f"AWS S3 ({region})" if region else "AWS S3"


_AWS_ERROR = re.compile(r"AWS Error (\w+).*? during (\w+) operation: ?(.*)", re.S)
_NOT_FOUND = re.compile(r"Bucket '([^']+)' not found")


def is_s3_failure(error: BaseException) -> bool:
    """pyarrow's OSError for a failed S3 request (what s3_error reads)."""
    return isinstance(error, OSError) and bool(_AWS_ERROR.search(str(error)) or _NOT_FOUND.search(str(error)))


def s3_error(uri: str, error: OSError, operation: str) -> StorageError:
    """pyarrow's error for a failed request on `uri` as one line: endpoint, operation, reason."""
    text = " ".join(str(error).split())
    m = _AWS_ERROR.search(text)
    code, op, reason = (m.group(1), m.group(2), m.group(3)) if m else ("", operation, text)
    reason = re.sub(r"\s*\(Request ID: [^)]*\)", "", reason)
    reason = re.sub(r"^Unable to parse ExceptionName: (\w+) Message: ", r"\1: ", reason)
    reason = re.sub(r"curlCode: \d+, ", "", reason).split("; Details:")[0].strip()
    if code == "NETWORK_CONNECTION":
        return StorageError(f"S3 endpoint {endpoint_label()} unreachable: {op} for {uri} failed ({reason[:200]})")
    if code == "NO_SUCH_BUCKET":
        named = re.search(r"bucket '([^']+)'", text)  # the request's own bucket, when pyarrow names it
        return _bucket_gone(uri, op, named.group(1) if named else None)
    lost = _NOT_FOUND.search(text)  # pyarrow's own check before it creates a directory
    if lost:
        return _bucket_gone(uri, operation, lost.group(1))
    return StorageError(f"S3 {op} for {uri} at {endpoint_label()} failed ({reason[:200]})")


@contextmanager
def _s3_errors(uri: str, operation: str):
    """pyarrow's OSErrors on an s3:// URI as StorageError (a missing key stays FileNotFoundError)."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as e:
        if not is_remote(uri):
            raise
        raise s3_error(uri, e, operation) from None


def _bucket_gone(uri: str, operation: str = "HeadBucket", bucket: str | None = None) -> StorageError:
    bucket = bucket or str(uri)[len(S3) :].split("/", 1)[0]
    return StorageError(
        f"S3 bucket {bucket!r} does not exist at {endpoint_label()} ({operation} for {uri}); "
        f"was it deleted? create it (aws s3 mb s3://{bucket}) or point the spec at another bucket"
    )


def check_bucket(uri: str, what: str) -> None:
    """For an s3:// URI: its bucket exists and answers (one HeadBucket), else StorageError
    naming `what` (e.g. "storage_path"); local paths pass. A search calls this before Ray
    starts; it never creates a bucket (a mistyped name would silently become a new one)."""
    if not is_remote(uri):
        return
    from pyarrow.fs import FileType

    fs, path = filesystem(uri)
    bucket = path.split("/", 1)[0]
    try:
        with _s3_errors(uri, "HeadBucket"):
            info = fs.get_file_info(bucket)
    except StorageError as e:
        raise StorageError(f"{what}: {e}") from None
    if info.type == FileType.NotFound:
        raise StorageError(f"{what}: {_bucket_gone(uri)}")


@lru_cache(maxsize=8)
def _s3(
    endpoint: str | None,
    scheme: str,
    key: str | None,
    secret: str | None,
    token: str | None,
    region: str | None,
    create: bool = False,
):
    from pyarrow import fs

    kwargs = dict(scheme=scheme, allow_bucket_creation=create)
    if region:
        kwargs["region"] = region
    if endpoint:
        kwargs["endpoint_override"] = endpoint
    if key and secret:  # else pyarrow's default credential chain (profile, instance role)
        kwargs.update(access_key=key, secret_key=secret, session_token=token or None)
    return fs.S3FileSystem(**kwargs)


def filesystem(uri: str, create_buckets: bool = False):
    """(pyarrow.fs.FileSystem, path inside it): what Ray Tune takes as storage_filesystem and
    storage_path. For s3://bucket/prefix the path is `bucket/prefix`. The S3 filesystem never
    creates a bucket unless `create_buckets` (make_dirs, write_bytes): a bucket lost in the
    middle of a search must stay an error, not come back empty under Tune's next sync (seen:
    the trials then found no base models and blamed a non-shared cache_dir)."""
    _check(uri)
    if is_remote(uri):
        endpoint, scheme = _endpoint()
        env = os.environ.get
        region = env("AWS_DEFAULT_REGION") or env("AWS_REGION") or ("us-east-1" if endpoint else None)
        fs = _s3(
            endpoint,
            scheme,
            env("AWS_ACCESS_KEY_ID"),
            env("AWS_SECRET_ACCESS_KEY"),
            env("AWS_SESSION_TOKEN"),
            region,
            create_buckets,
        )
        return fs, str(uri)[len(S3) :].strip("/")
    from pyarrow import fs

    return fs.LocalFileSystem(), _local(uri)


def _may_create() -> bool:
    return os.environ.get(CREATE_BUCKETS_ENV, "1") != "0"


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
    with _s3_errors(uri, "HeadObject"):
        return fs.get_file_info(path).type != FileType.NotFound


def read_bytes(uri: str) -> bytes:
    """The whole file; FileNotFoundError if it is not there (StorageError if its bucket is gone)."""
    from pyarrow.fs import FileType

    fs, path = filesystem(uri)
    with _s3_errors(uri, "GetObject"):
        if fs.get_file_info(path).type != FileType.File:
            # a missing key reads the same whether or not its bucket exists: on S3 ask the bucket,
            # so a lost bucket is said as such (not as a model missing from the cache)
            if is_remote(uri) and fs.get_file_info(path.split("/", 1)[0]).type == FileType.NotFound:
                raise _bucket_gone(uri)
            raise FileNotFoundError(uri)
        with fs.open_input_stream(path) as f:
            return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file, atomically: a reader sees the old file or the new one, never half.
    Local: a uniquely named temp file beside it, then rename (concurrent writers may share a
    cache). S3: a PUT (or a completed multipart upload) replaces an object atomically."""
    fs, path = filesystem(uri, create_buckets=_may_create())
    if is_remote(uri):
        bucket = (_endpoint()[0], path.split("/", 1)[0])
        with _s3_errors(uri, "PutObject"):
            if bucket not in _BUCKETS_SEEN and _may_create():  # a PUT into a missing bucket fails: create it once
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
    with _s3_errors(uri, "ListObjectsV2"):
        infos = fs.get_file_info(FileSelector(path, allow_not_found=True, recursive=False))
    return sorted(info.base_name for info in infos)


def make_dirs(uri: str) -> None:
    """Create the folder and its parents (on S3, the bucket if missing and a folder marker)."""
    fs, path = filesystem(uri, create_buckets=_may_create())
    with _s3_errors(uri, "PutObject"):
        fs.create_dir(path, recursive=True)


def remove_tree(uri: str) -> None:
    """Remove a folder with everything in it, or a single file; nothing if it is not there."""
    from pyarrow.fs import FileType

    fs, path = filesystem(uri)
    with _s3_errors(uri, "DeleteObjects"):
        kind = fs.get_file_info(path).type
        if kind == FileType.Directory:
            fs.delete_dir(path)
        elif kind == FileType.File:
            fs.delete_file(path)
