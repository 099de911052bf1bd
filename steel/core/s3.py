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


def client(bucket: str | None, endpoint: str | None = None):
    """The boto3 S3 client for ``bucket`` on the current endpoint (one per endpoint and region)."""
    import boto3

    url = current_endpoint(endpoint)
    region = bucket_region(url, bucket)
    key = (url, region)
    with _lock:
        made = _clients.get(key)
        if made is None:
            made = _clients[key] = boto3.session.Session().client("s3", endpoint_url=url, region_name=region)
    return made


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


def get(path: str, endpoint: str | None):
    bucket, key = bucket_key(path)
    try:
        return client(bucket, endpoint).get_object(Bucket=bucket, Key=key)["Body"]
    except Exception as e:  # noqa: BLE001 - S3 says 403 for a missing key unless the role may list the bucket
        if isinstance(translate(e, path), PermissionError) and kind(path, endpoint) == pafs.FileType.NotFound:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", "s3://" + path) from None
        raise


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


