"""The S3 side of :mod:`steel.core.storage`: which endpoint, the clients, and S3's answers turned into clear errors.

Which S3 endpoint: the ``endpoint=`` argument, else :func:`set_endpoint` (process-wide, from the
config's ``storage_endpoint``), else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else real AWS.
Credentials come only from the standard AWS chain (environment, profile, instance role); this module
never reads, logs or stores them.

No call here is bucket-level (HeadBucket), and none needs to list the whole bucket to tell a missing
key (403 from S3 then) from a refused one: the IAM policies (``infra/iam/``) allow listing only
under prefixes. Paths are ``bucket/key`` (pyarrow's form).
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from typing import Iterator
from urllib.parse import urlparse

import pyarrow.fs as pafs

_lock = threading.Lock()
_endpoint: str | None = None
_filesystems: dict[tuple, pafs.S3FileSystem] = {}
_clients: dict[tuple, object] = {}
_bucket_regions: dict[str, str] = {}


# ----------------------------------------------------------------------------------------------
# Endpoint, filesystems and clients


def set_endpoint(url: str | None) -> None:
    """Set the process-wide S3 endpoint (e.g. ``http://127.0.0.1:9000``); ``None`` clears it."""
    global _endpoint
    if url is not None:
        parse_endpoint(url)
    _endpoint = url or None


def current_endpoint(endpoint: str | None = None) -> str | None:
    """The S3 endpoint a call would use (``None`` = real AWS)."""
    return (endpoint or _endpoint or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or None)


def parse_endpoint(url: str) -> tuple[str, str]:
    p = urlparse(url)
    if p.scheme not in ("http", "https") or not p.netloc:
        raise ValueError(f"S3 endpoint {url!r} must look like http(s)://host[:port]")
    return p.scheme, p.netloc + p.path.rstrip("/")


def bucket_region(url: str | None, bucket: str | None) -> str | None:
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        return region
    if url:  # an S3-compatible endpoint: never ask real AWS where the bucket lives
        return "us-east-1"
    if bucket:
        with _lock:
            cached = _bucket_regions.get(bucket)
        if cached is None:
            cached = pafs.resolve_s3_region(bucket)
            with _lock:
                _bucket_regions[bucket] = cached
        return cached
    return None


def filesystem(bucket: str | None, endpoint: str | None = None) -> pafs.S3FileSystem:
    """The pyarrow S3 filesystem for ``bucket`` on the current endpoint (one per endpoint and region)."""
    url = current_endpoint(endpoint)
    region = bucket_region(url, bucket)
    key = (url, region)
    with _lock:
        fs = _filesystems.get(key)
        if fs is None:
            kwargs = {"region": region} if region else {}
            if url:
                scheme, host = parse_endpoint(url)
                kwargs.update(endpoint_override=host, scheme=scheme)
            fs = _filesystems[key] = pafs.S3FileSystem(**kwargs)
    return fs


class PrefixOnlyHandler(pafs.FileSystemHandler):
    """pyarrow's S3 filesystem minus directory creation, for code that insists on ``create_dir``
    (Ray Train's checkpoint storage). S3 has no directories (writing a key makes its prefix), and
    pyarrow's ``create_dir`` first asks HeadBucket: ``s3:ListBucket`` on the whole bucket, which a role
    allowed to list only under prefixes (``infra/iam/``) is refused."""

    def __init__(self, fs: pafs.FileSystem):
        self.fs = fs

    def __reduce__(self):  # picklable for Ray: checkpoints carry their filesystem to the workers
        return PrefixOnlyHandler, (self.fs,)

    def get_type_name(self) -> str:
        return "s3-prefix-only"

    def equals(self, other) -> bool:
        return isinstance(other, PrefixOnlyHandler) and self.fs.equals(other.fs)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive) -> None:
        pass

    def delete_dir(self, path) -> None:
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False) -> None:
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise PermissionError("refusing to delete every object of a bucket")

    def delete_file(self, path) -> None:
        self.fs.delete_file(path)

    def move(self, src, dest) -> None:
        self.fs.move(src, dest)

    def copy_file(self, src, dest) -> None:
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)

    def normalize_path(self, path):
        return self.fs.normalize_path(path)


def prefix_only_filesystem(bucket: str | None, endpoint: str | None = None) -> pafs.PyFileSystem:
    """:func:`filesystem` wrapped in :class:`PrefixOnlyHandler` (no bucket-level request on create_dir)."""
    return pafs.PyFileSystem(PrefixOnlyHandler(filesystem(bucket, endpoint)))


def client(bucket: str | None, endpoint: str | None = None):
    """The boto3 S3 client for ``bucket`` on the current endpoint (one per endpoint and region)."""
    import boto3

    url = current_endpoint(endpoint)
    region = bucket_region(url, bucket)
    key = (url, region)
    with _lock:
        made = _clients.get(key)
        if made is None:
            # Standard mode, one attempt: every retry is steel's (steel.core.retry), counted once; botocore's
            # legacy mode would retry each call 5 times inside each of steel's attempts.
            config = boto3.session.Config(retries={"mode": "standard", "total_max_attempts": 1})  # botocore's
            made = _clients[key] = boto3.session.Session().client("s3", endpoint_url=url, region_name=region,
                                                                  config=config)
    return made


def response_time(response: dict, default: float) -> float:
    """The store's clock when it answered (the HTTP ``Date`` header of a boto3 response), else ``default``."""
    from email.utils import parsedate_to_datetime

    date = ((response or {}).get("ResponseMetadata") or {}).get("HTTPHeaders", {}).get("date")
    try:
        return parsedate_to_datetime(date).timestamp() if date else default
    except (TypeError, ValueError):
        return default


def bucket_key(path: str) -> tuple[str, str]:
    bucket, _, key = path.partition("/")
    return bucket, key


# ----------------------------------------------------------------------------------------------
# Errors


def translate(exc: BaseException, uri) -> OSError | None:
    """A clear FileNotFoundError / PermissionError naming ``uri`` for a storage error, or None."""
    text = str(exc)
    code = ""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
    uri = os.fspath(uri)
    if isinstance(exc, FileNotFoundError) or code in ("NoSuchKey", "404", "NotFound"):
        return FileNotFoundError(errno.ENOENT, "No such file or directory", uri)
    if code == "NoSuchBucket" or "NO_SUCH_BUCKET" in text:
        return FileNotFoundError(errno.ENOENT, "No such bucket", uri)
    if isinstance(exc, PermissionError) or code in ("AccessDenied", "403") or "ACCESS_DENIED" in text:
        return PermissionError(errno.EACCES, "Access denied", uri)
    return None


@contextlib.contextmanager
def errors(uri) -> Iterator[None]:
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised below, translated when we know what it means
        clear = translate(e, uri)
        if clear is None:
            raise
        raise clear from None


def kind(path: str, endpoint: str | None):
    """By listings scoped to the key only: no HeadBucket, and no HEAD of the key, which S3 answers 403
    (not 404) for a missing key to a role that may list the bucket only under prefixes (infra/iam/)."""
    bucket, key = bucket_key(path)
    s3 = client(bucket, endpoint)
    try:
        first = s3.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1).get("Contents") or []
    except Exception as e:  # noqa: BLE001 - re-raised unless it says NoSuchBucket
        if isinstance(translate(e, path), FileNotFoundError):
            return pafs.FileType.NotFound
        raise
    if first and first[0]["Key"] == key:  # the key itself sorts first among the keys it prefixes
        return pafs.FileType.File
    under = s3.list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1).get("Contents")
    return pafs.FileType.Directory if under else pafs.FileType.NotFound


def get_object(path: str, endpoint: str | None) -> dict:
    """boto3's GetObject response for the exact key; FileNotFoundError when there is no such key, also
    when S3 says 403 for it (as it does to a role that may list the bucket only under prefixes)."""
    bucket, key = bucket_key(path)
    try:
        return client(bucket, endpoint).get_object(Bucket=bucket, Key=key)
    except Exception as e:  # noqa: BLE001
        clear = translate(e, "s3://" + path)
        if isinstance(clear, FileNotFoundError) or (
                isinstance(clear, PermissionError) and kind(path, endpoint) == pafs.FileType.NotFound):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", "s3://" + path) from None
        raise


def get(path: str, endpoint: str | None):
    """The body (a stream) of the object at ``bucket/key``; see :func:`get_object`."""
    return get_object(path, endpoint)["Body"]


def precondition_failed(e: BaseException) -> bool:
    code = str((getattr(e, "response", None) or {}).get("Error", {}).get("Code", ""))
    return code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def put_if(uri, path: str, data: bytes, endpoint: str | None, **condition) -> str | None:
    bucket, key = bucket_key(path)
    try:
        return client(bucket, endpoint).put_object(Bucket=bucket, Key=key, Body=bytes(data), **condition)["ETag"]
    except Exception as e:  # noqa: BLE001
        if precondition_failed(e):
            return None
        raise translate(e, uri) or e from None


