"""Files at URIs: a local path, ``file://path`` or ``s3://bucket/key`` (AWS or any S3-compatible endpoint).

Which S3 endpoint, the clients, and S3's errors: :mod:`steel.core.s3` (``s3.set_endpoint``).

Writes are atomic: locally a temporary file in the same folder is renamed over the target; on S3 the
object is committed by one PUT (or one completed multipart upload), so readers see the old or the new
content, never a part. A missing object raises :class:`FileNotFoundError` naming the URI.

Listings and :func:`resolve` use ``pyarrow.fs`` (what Ray Data takes). S3 queries, reads, writes and
deletes use boto3: one GET reads one version of an object even while it is being overwritten (pyarrow's
HEAD + ranged GETs can mix two), uploads abort cleanly on failure, and deletes leave no folder markers.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import posixpath
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import IO, Iterable, Iterator

import pyarrow.fs as pafs

from steel.core import retry, s3

_TMP_PREFIX = ".tmp-steel-"  # local temp files of in-progress writes; list_files skips them
_SPOOL_BYTES = 64 * 2**20  # open_output on S3 buffers this much in memory, then spills to disk
_COPY_CHUNK = 8 * 2**20
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

_local = pafs.LocalFileSystem()

_umask = os.umask(0o022)
os.umask(_umask)


# ----------------------------------------------------------------------------------------------
# Retries: each S3 request is retried here, ``retry.policy``'s number of times (default S3_RETRIES);
# inside a caller's own retry loop (steel.core.retry.retry) it is tried once and that loop counts the
# attempts. botocore itself makes one attempt per call: attempts are counted once, never multiplied.

S3_RETRIES = 4
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, ValueError, TypeError)


def _retried(fn):
    @functools.wraps(fn)
    def call(uri, *args, **kwargs):
        if not is_s3(uri) or retry.active():
            return fn(uri, *args, **kwargs)
        retries, backoff_s = retry.current_policy((S3_RETRIES, 0.5))
        return retry.retry(lambda: fn(uri, *args, **kwargs), retries=retries, backoff_s=backoff_s,
                           what=f"{fn.__name__}({uri})", permanent=_PERMANENT)

    return call


# ----------------------------------------------------------------------------------------------
# URIs


def is_s3(uri) -> bool:
    return os.fspath(uri).startswith("s3://")


def _split(uri) -> tuple[str, str]:
    """``("s3", "bucket/key")`` or ``("local", path)``; rejects other schemes."""
    uri = os.fspath(uri)
    if not uri:
        raise ValueError("empty URI")
    m = _SCHEME.match(uri)
    if not m:
        return "local", uri
    scheme = m.group(1).lower()
    rest = uri[m.end():]
    if scheme == "file":
        if not rest:
            raise ValueError(f"{uri!r}: file:// URI without a path")
        return "local", rest
    if scheme == "s3":
        bucket = rest.split("/", 1)[0]
        if not bucket:
            raise ValueError(f"{uri!r}: S3 URI without a bucket (expected s3://bucket/key)")
        return "s3", rest  # the key exactly as given: S3 keys may hold //, ./, .. and a trailing /
    raise ValueError(f"{uri!r}: unsupported URI scheme {scheme!r}; use a local path, file:// or s3://")


def join(uri, *parts) -> str:
    """``join("s3://b/data", "train_images", "x.jpg") -> "s3://b/data/train_images/x.jpg"``.

    Parts are always relative: leading and trailing slashes of a part are dropped.
    """
    out = os.fspath(uri)
    if not out:
        raise ValueError("empty URI")
    for part in parts:
        part = os.fspath(part).strip("/")
        if part:
            out = out + ("" if out.endswith("/") else "/") + part
    return out


def basename(uri) -> str:
    """Last name in a URI (``s3://b/x/y.jpg`` -> ``y.jpg``), ignoring a trailing slash."""
    _, path = _split(uri)
    return posixpath.basename(path.rstrip("/")) or path


def resolve(uri, endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow filesystem, path)`` for a URI: ``bucket/key`` on S3, an absolute path locally.

    Use it for Ray Data: ``ray.data.read_images(path, filesystem=fs)``.
    """
    kind, path = _split(uri)
    if kind == "s3":
        return s3.filesystem(path.split("/", 1)[0], endpoint), path
    return _local, os.path.abspath(path)


def uri_to_ray_path(uri, endpoint: str | None = None) -> tuple[str, pafs.FileSystem]:
    """``(path, filesystem)`` for ``ray.data.read_*(path, filesystem=filesystem)``."""
    fs, path = resolve(uri, endpoint)
    return path, fs


# ----------------------------------------------------------------------------------------------
# Queries


@_retried
def exists(uri, endpoint: str | None = None) -> bool:
    """True if a file or folder (on S3: an object or any object under the prefix) is there."""
    fs, path = resolve(uri, endpoint)
    with s3.errors(uri):
        return _kind(fs, path, endpoint) != pafs.FileType.NotFound


def _kind(fs, path: str, endpoint: str | None):
    """File, Directory or NotFound (on S3 for a key below a bucket: :func:`_s3_kind`)."""
    if isinstance(fs, pafs.S3FileSystem) and "/" in path:
        return s3.kind(path, endpoint)
    return fs.get_file_info(path).type


def makedirs(uri, endpoint: str | None = None) -> None:
    """Create a local folder and its parents; S3 has no folders, so nothing to do there."""
    kind, path = _split(uri)
    if kind == "local":
        os.makedirs(path, exist_ok=True)


@dataclass(frozen=True)
class Entry:
    """A file found by :func:`list_entries`: ``name`` is its path below the listed folder exactly as the
    store holds it (an S3 key's rest, never normalised), ``uri`` reads it back, ``modified`` is when the
    store last wrote it (its own clock)."""

    name: str
    uri: str
    size: int
    modified: float


@_retried
def list_entries(uri, recursive: bool = True, endpoint: str | None = None) -> tuple[list[Entry], float]:
    """The files in a folder (below it, with ``recursive``), sorted by name, and the store's clock now.

    On S3 the names are the keys as listed (``a//b.jpg``, ``x/../b.jpg`` and ``b.jpg/`` are three
    objects, three names); a missing prefix is empty, a missing bucket raises FileNotFoundError.
    Locally a missing folder is empty. Files of in-progress writes (``.tmp-steel-*``) are left out.
    """
    kind, path = _split(uri)
    if kind == "local":
        return _local_entries(os.fspath(uri), path, recursive), time.time()
    bucket, key = s3.bucket_key(path)
    prefix = key.rstrip("/") + "/" if key else ""
    root = f"s3://{bucket}/{prefix}"
    entries, now = [], time.time()
    with s3.errors(uri):
        pages = s3.client(bucket, endpoint).get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, **({} if recursive else {"Delimiter": "/"}))
        for page in pages:
            now = s3.response_time(page, now)
            for obj in page.get("Contents", []):
                name = obj["Key"][len(prefix):]
                if name and not posixpath.basename(name.rstrip("/")).startswith(_TMP_PREFIX):
                    entries.append(Entry(name, root + name, int(obj["Size"]), obj["LastModified"].timestamp()))
    return sorted(entries, key=lambda e: e.name), now


def _local_entries(uri: str, path: str, recursive: bool) -> list[Entry]:
    root = path.rstrip(os.sep) or os.sep
    base = uri.rstrip("/")
    out = []
    if not os.path.isdir(root):
        return out
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        rel = os.path.relpath(folder, root)
        for f in files:
            if f.startswith(_TMP_PREFIX):
                continue
            name = f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}"
            st = os.stat(os.path.join(folder, f))
            out.append(Entry(name, f"{base}/{name}", st.st_size, st.st_mtime))
        if not recursive:
            break
    return sorted(out, key=lambda e: e.name)


def list_files(uri, suffixes: str | Iterable[str] | None = None, recursive: bool = False,
               endpoint: str | None = None) -> list[str]:
    """Sorted URIs of the files in a folder (:func:`list_entries`' ``uri`` of each).

    ``suffixes`` (e.g. ``(".jpg", ".png")``) keeps names ending with one of them, ignoring case.
    A folder that does not exist gives ``[]`` (on S3 a missing prefix and an empty one are the same
    thing); a missing S3 bucket raises FileNotFoundError.
    """
    if isinstance(suffixes, str):
        suffixes = (suffixes,)
    wanted = tuple(s.lower() for s in suffixes) if suffixes is not None else None
    entries, _ = list_entries(uri, recursive=recursive, endpoint=endpoint)
    return [e.uri for e in entries if wanted is None or e.name.lower().endswith(wanted)]


@_retried
def list_dirs(uri, endpoint: str | None = None) -> list[str]:
    """Sorted names (not URIs) of the folders directly under ``uri`` (on S3: the common prefixes);
    ``[]`` when ``uri`` does not exist."""
    kind, path = _split(uri)
    if kind == "local":
        return sorted(d.name for d in os.scandir(path) if d.is_dir()) if os.path.isdir(path) else []
    bucket, key = s3.bucket_key(path)
    prefix = key.rstrip("/") + "/" if key else ""
    out = []
    with s3.errors(uri):
        for page in s3.client(bucket, endpoint).get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix, Delimiter="/"):
            out += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
    return sorted(out)


# ----------------------------------------------------------------------------------------------
# Reading


@contextlib.contextmanager
def open_input(uri, endpoint: str | None = None) -> Iterator[IO[bytes]]:
    """A seekable binary file object to read ``uri``."""
    kind, path = _split(uri)
    if kind == "local":
        with s3.errors(uri):
            fh = open(path, "rb")
        with fh:
            yield fh
        return
    # One GET into a local spool: pyarrow's S3 files do a HEAD then ranged GETs, which can mix two
    # versions of an object that is overwritten meanwhile; a single GET is always one version.
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as spool:
        def fetch():
            spool.seek(0)
            spool.truncate()
            with s3.errors(uri):
                shutil.copyfileobj(s3.get(path, endpoint), spool, _COPY_CHUNK)

        _retried(lambda _uri: fetch())(uri)
        spool.seek(0)
        yield spool


@_retried
def read_bytes(uri, endpoint: str | None = None) -> bytes:
    kind, path = _split(uri)
    if kind == "s3":
        with s3.errors(uri):
            return s3.get(path, endpoint).read()
    with open_input(uri, endpoint) as fh:
        return fh.read()


def read_text(uri, encoding: str = "utf-8", endpoint: str | None = None) -> str:
    return read_bytes(uri, endpoint).decode(encoding)


def download_to(uri, local_path, endpoint: str | None = None) -> str:
    """Copy ``uri`` to a local file (atomically); returns the local path."""
    local_path = os.fspath(local_path)
    if _split(local_path)[0] != "local":
        raise ValueError(f"download_to needs a local destination, got {local_path!r}")
    with open_input(uri, endpoint) as src, open_output(local_path) as dst:
        shutil.copyfileobj(src, dst, _COPY_CHUNK)
    return local_path


# ----------------------------------------------------------------------------------------------
# Writing (atomic)


@contextlib.contextmanager
def _local_output(path: str) -> Iterator[IO[bytes]]:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=_TMP_PREFIX + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask)  # mkstemp makes it private; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def open_output(uri, endpoint: str | None = None) -> Iterator[IO[bytes]]:
    """A binary file object whose content replaces ``uri`` atomically when the block exits cleanly.

    If the block raises, nothing is written and the old content (if any) stays.
    """
    kind, path = _split(uri)
    if kind == "local":
        with _local_output(path) as fh:
            yield fh
        return
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as spool:
        yield spool
        bucket, key = s3.bucket_key(path)

        def upload(_uri):
            spool.seek(0)
            with s3.errors(uri):
                # One PUT, or a multipart upload that boto3 aborts if any part fails.
                s3.client(bucket, endpoint).upload_fileobj(spool, bucket, key)

        _retried(upload)(uri)


@_retried
def write_bytes(uri, data: bytes, endpoint: str | None = None) -> None:
    """Write ``data`` to ``uri`` atomically (local temp + rename; one PUT on S3)."""
    kind, path = _split(uri)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"write_bytes({uri!r}) needs bytes, got {type(data).__name__}")
    if kind == "local":
        with _local_output(path) as fh:
            fh.write(data)
        return
    bucket, key = s3.bucket_key(path)
    with s3.errors(uri):
        s3.client(bucket, endpoint).put_object(Bucket=bucket, Key=key, Body=bytes(data))


def write_text(uri, text: str, encoding: str = "utf-8", endpoint: str | None = None) -> None:
    write_bytes(uri, text.encode(encoding), endpoint)


def copy_local_dir_to(local_dir, uri, endpoint: str | None = None) -> list[str]:
    """Upload (or copy) every file under a local folder to ``uri``, keeping relative paths.

    Each file is written atomically. Returns the destination URIs, sorted.
    """
    local_dir = os.fspath(local_dir)
    if not os.path.isdir(local_dir):
        raise FileNotFoundError(errno.ENOENT, "No such local folder", local_dir)
    written = []
    for root, dirs, files in os.walk(local_dir):
        dirs.sort()
        for name in sorted(files):
            src = os.path.join(root, name)
            dest = join(uri, os.path.relpath(src, local_dir).replace(os.sep, "/"))
            kind, path = _split(dest)
            if kind == "s3":
                bucket, key = s3.bucket_key(path)

                def upload(dest, src=src, bucket=bucket, key=key):
                    with s3.errors(dest):
                        s3.client(bucket, endpoint).upload_file(src, bucket, key)

                _retried(upload)(dest)
            else:
                with open(src, "rb") as fin, _local_output(path) as fout:
                    shutil.copyfileobj(fin, fout, _COPY_CHUNK)
            written.append(dest)
    return sorted(written)


# ----------------------------------------------------------------------------------------------
# Conditional writes: compare-and-swap on one small object (the scoring lease)
#
# S3: PutObject with If-None-Match: * (create only) or If-Match: <ETag> (replace only that version);
# a failed condition answers 412 (or 409 for a concurrent conditional write), and the call returns
# None. Locally the same checks run under an flock on ``<path>.guard``; the tag is the content's sha256.


@dataclass(frozen=True)
class Versioned:
    """One version of an object: its bytes, its tag (S3 ETag; locally the content's sha256), when the
    store last wrote it (S3 ``LastModified``; locally the file's mtime) and the store's clock when it
    was read (S3's ``Date``; locally the time): ``now - modified`` is the object's age, whatever the
    reader's own clock says."""

    data: bytes
    tag: str
    modified: float
    now: float

    @property
    def age(self) -> float:
        return self.now - self.modified


@contextlib.contextmanager
def _guard(path: str) -> Iterator[None]:
    import fcntl

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".guard", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _local_versioned(path: str) -> Versioned | None:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
            modified = os.fstat(fh.fileno()).st_mtime
    except FileNotFoundError:
        return None
    return Versioned(data, hashlib.sha256(data).hexdigest(), modified, _fs_now(path + ".guard"))


def _fs_now(probe: str) -> float:
    """The file system's clock now (a shared folder's server may disagree with this host's): the mtime
    it gives ``probe`` when touched."""
    try:
        os.utime(probe)
        return os.stat(probe).st_mtime
    except OSError:
        return time.time()


@_retried
def read_versioned(uri, endpoint: str | None = None) -> Versioned | None:
    """The object's current version (:class:`Versioned`), or None when there is none."""
    kind, path = _split(uri)
    if kind == "local":
        with _guard(path):
            return _local_versioned(path)
    try:
        with s3.errors(uri):
            obj = s3.get_object(path, endpoint)
    except FileNotFoundError:
        return None
    modified = obj["LastModified"].timestamp()
    return Versioned(obj["Body"].read(), obj["ETag"], modified, s3.response_time(obj, time.time()))


def create_only(uri, data: bytes, endpoint: str | None = None) -> str | None:
    """Write ``data`` only if nothing is at ``uri``; the new tag, or None when something already is."""
    kind, path = _split(uri)
    if kind == "local":
        with _guard(path):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~_umask)
            except FileExistsError:
                return None
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        return hashlib.sha256(data).hexdigest()
    return s3.put_if(uri, path, data, endpoint, IfNoneMatch="*")


def replace_if(uri, data: bytes, tag: str, endpoint: str | None = None) -> str | None:
    """Replace the object with ``data`` only if its current tag is ``tag``; the new tag, or None when
    it changed (or is gone) since that version was read."""
    kind, path = _split(uri)
    if kind == "local":
        with _guard(path):
            current = _local_versioned(path)
            if current is None or current.tag != tag:
                return None
            with _local_output(path) as fh:
                fh.write(data)
        return hashlib.sha256(data).hexdigest()
    return s3.put_if(uri, path, data, endpoint, IfMatch=tag)


def delete_if(uri, tag: str, endpoint: str | None = None) -> bool:
    """Delete the object if its current tag is ``tag``; False (and nothing deleted) otherwise."""
    kind, path = _split(uri)
    if kind == "local":
        with _guard(path):
            current = _local_versioned(path)
            if current is None or current.tag != tag:
                return False
            os.remove(path)
            return True
    current = read_versioned(uri, endpoint)
    if current is None or current.tag != tag:
        return False
    bucket, key = s3.bucket_key(path)
    with s3.errors(uri):
        s3.client(bucket, endpoint).delete_object(Bucket=bucket, Key=key)
    return True


# ----------------------------------------------------------------------------------------------
# Deleting


@_retried
def delete(uri, recursive: bool = False, missing_ok: bool = False, endpoint: str | None = None) -> None:
    """Delete a file; a folder (on S3: every object under the prefix) only with ``recursive=True``."""
    kind, path = _split(uri)
    fs, fs_path = resolve(uri, endpoint)
    with s3.errors(uri):
        kind_found = _kind(fs, fs_path, endpoint)
    if kind_found == pafs.FileType.NotFound:
        if missing_ok:
            return
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", os.fspath(uri))
    if kind_found == pafs.FileType.Directory and not recursive:
        raise IsADirectoryError(errno.EISDIR, "Is a folder; pass recursive=True to delete it", os.fspath(uri))
    if kind == "local":
        if kind_found == pafs.FileType.Directory:
            shutil.rmtree(path)
        else:
            os.remove(path)
        return
    bucket, key = s3.bucket_key(path)
    client = s3.client(bucket, endpoint)
    with s3.errors(uri):
        if kind_found == pafs.FileType.File:
            client.delete_object(Bucket=bucket, Key=key)
            return
        prefix = key.rstrip("/") + "/" if key else ""
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if objects:
                client.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
