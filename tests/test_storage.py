"""steel.core.storage on local paths, file:// URIs and a real S3 HTTP endpoint (moto server)."""

from __future__ import annotations

import os
import threading

import boto3
import pyarrow.fs as pafs
import pytest

from steel.core import s3, storage


@pytest.fixture(params=["local", "file", "s3"])
def root(request, tmp_path):
    """A writable, empty folder URI in each of the three forms."""
    if request.param == "local":
        return str(tmp_path / "root")
    if request.param == "file":
        return f"file://{tmp_path}/root"
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/root"


def _all_keys(bucket: str, endpoint: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))


def test_write_read_exists(root):
    uri = storage.join(root, "a", "hello.txt")
    assert not storage.exists(uri)
    storage.write_text(uri, "héllo")
    assert storage.exists(uri)
    assert storage.exists(storage.join(root, "a"))  # a folder (S3: a prefix with objects)
    assert storage.read_text(uri) == "héllo"
    storage.write_bytes(uri, b"\x00\x01binary")
    assert storage.read_bytes(uri) == b"\x00\x01binary"
    with storage.open_input(uri) as fh:
        fh.seek(2)
        assert fh.read() == b"binary"


def test_list_files_sorted_same_scheme_and_filtered(root):
    for name in ["b.JPG", "a.jpg", "c.png", "notes.txt", "sub/d.jpg", "sub/deeper/e.Jpg"]:
        storage.write_bytes(storage.join(root, name), name.encode())
    assert storage.list_files(root) == [storage.join(root, n) for n in ["a.jpg", "b.JPG", "c.png", "notes.txt"]]
    assert storage.list_files(root + "/", suffixes=(".jpg", ".PNG")) == [
        storage.join(root, n) for n in ["a.jpg", "b.JPG", "c.png"]]
    assert storage.list_files(root, suffixes=".jpg", recursive=True) == [
        storage.join(root, n) for n in ["a.jpg", "b.JPG", "sub/d.jpg", "sub/deeper/e.Jpg"]]
    for uri in storage.list_files(root, recursive=True):
        assert uri.startswith(root)
        assert storage.read_bytes(uri) == uri[len(root) + 1:].encode()


def test_missing_object_names_the_uri(root):
    missing = storage.join(root, "nope", "missing.csv")
    for call in (storage.read_bytes, storage.read_text, storage.delete):
        with pytest.raises(FileNotFoundError) as info:
            call(missing)
        assert missing in str(info.value)
    assert storage.list_files(storage.join(root, "nope")) == []  # a missing folder lists as empty
    assert storage.list_files(storage.join(root, "nope"), recursive=True) == []
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        storage.download_to(missing, "/tmp/should-not-exist-steel-test")
    assert not os.path.exists("/tmp/should-not-exist-steel-test")


def test_overwrite_replaces_fully_and_leaves_no_temp_files(root, tmp_path):
    uri = storage.join(root, "data.bin")
    storage.write_bytes(uri, b"x" * 100_000)
    storage.write_bytes(uri, b"short")
    assert storage.read_bytes(uri) == b"short"
    with storage.open_output(uri) as fh:
        fh.write(b"via ")
        fh.write(b"stream")
    assert storage.read_bytes(uri) == b"via stream"
    assert storage.list_files(root) == [uri]
    if storage.is_s3(root):
        bucket = root[len("s3://"):].split("/")[0]
        assert _all_keys(bucket, s3.current_endpoint()) == ["root/data.bin"]
    else:
        local = root[len("file://"):] if root.startswith("file://") else root
        assert os.listdir(local) == ["data.bin"]  # no temp files left behind
        assert oct(os.stat(os.path.join(local, "data.bin")).st_mode & 0o777) != oct(0o600)


def test_failed_write_keeps_old_content(root):
    uri = storage.join(root, "keep.txt")
    storage.write_text(uri, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with storage.open_output(uri) as fh:
            fh.write(b"half of the new con")
            raise RuntimeError("boom")
    assert storage.read_text(uri) == "old"
    assert storage.list_files(root) == [uri]


def test_concurrent_reader_sees_old_or_new_never_partial(root):
    uri = storage.join(root, "hot.bin")
    versions = [b"A" * 300_000, b"B" * 5_000]
    storage.write_bytes(uri, versions[0])
    stop = threading.Event()
    errors = []

    def writer():
        i = 0
        try:
            while not stop.is_set():
                i += 1
                storage.write_bytes(uri, versions[i % 2])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(25):
            data = storage.read_bytes(uri)
            assert data in versions, f"partial read: {len(data)} bytes"
            with storage.open_input(uri) as fh:
                assert fh.read() in versions
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert storage.read_bytes(uri) in versions


def test_delete_file_and_folder(root):
    a, b = storage.join(root, "d", "a.txt"), storage.join(root, "d", "sub", "b.txt")
    storage.write_text(a, "a")
    storage.write_text(b, "b")
    storage.delete(a)
    assert not storage.exists(a)
    storage.delete(a, missing_ok=True)
    with pytest.raises(IsADirectoryError, match="recursive"):
        storage.delete(storage.join(root, "d"))
    storage.delete(storage.join(root, "d"), recursive=True)
    assert not storage.exists(b)
    assert not storage.exists(storage.join(root, "d"))
    if storage.is_s3(root):  # no folder-marker objects left behind
        assert _all_keys(root[len("s3://"):].split("/")[0], s3.current_endpoint()) == []


def test_copy_local_dir_and_download(root, tmp_path):
    src = tmp_path / "src"
    (src / "logs" / "m").mkdir(parents=True)
    (src / "manifest.json").write_text("{}")
    (src / "logs" / "m" / "events.out").write_bytes(b"\x01\x02")
    dest = storage.join(root, "bundle")
    written = storage.copy_local_dir_to(src, dest)
    assert written == [storage.join(dest, "logs/m/events.out"), storage.join(dest, "manifest.json")]
    assert storage.list_files(dest, recursive=True) == written
    out = storage.download_to(storage.join(dest, "logs/m/events.out"), tmp_path / "dl" / "e.out")
    with open(out, "rb") as fh:
        assert fh.read() == b"\x01\x02"
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        storage.copy_local_dir_to(tmp_path / "no-such-dir", dest)


def test_resolve_gives_a_pyarrow_filesystem_that_reads_writes(root):
    uri = storage.join(root, "imgs", "x.jpg")
    storage.write_bytes(uri, b"jpeg bytes")
    fs, path = storage.resolve(uri)
    assert isinstance(fs, pafs.FileSystem)
    with fs.open_input_stream(path) as fh:
        assert fh.read() == b"jpeg bytes"
    folder_path, folder_fs = storage.uri_to_ray_path(storage.join(root, "imgs"))
    infos = folder_fs.get_file_info(pafs.FileSelector(folder_path))
    assert [i.base_name for i in infos] == ["x.jpg"]
    if storage.is_s3(root):
        assert path == uri[len("s3://"):]  # bucket/key, as Ray Data's path column
    else:
        assert os.path.isabs(path)


def test_makedirs_and_basename(tmp_path):
    target = tmp_path / "x" / "y"
    storage.makedirs(str(target))
    assert target.is_dir()
    storage.makedirs("s3://bucket/anything")  # no-op, no network
    assert storage.basename("s3://b/p/img.jpg") == "img.jpg"
    assert storage.basename("file:///tmp/run/") == "run"
    assert storage.basename("runs/a/b.csv") == "b.csv"
    assert storage.join("s3://b/", "/x/", "y.csv") == "s3://b/x/y.csv"
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/s3://")


def test_bad_uris():
    with pytest.raises(ValueError, match="unsupported URI scheme 'gs'"):
        storage.read_bytes("gs://bucket/key")
    with pytest.raises(ValueError, match="without a bucket"):
        storage.exists("s3:///key")
    with pytest.raises(ValueError, match="empty URI"):
        storage.join("")
    with pytest.raises(ValueError, match="http"):
        s3.set_endpoint("127.0.0.1:9000")
    with pytest.raises(TypeError, match="needs bytes"):
        storage.write_bytes("/tmp/x", "text")


def test_missing_bucket(s3_endpoint):
    uri = "s3://no-such-bucket-steel/key.txt"
    with pytest.raises(FileNotFoundError, match="no-such-bucket-steel"):
        storage.read_bytes(uri)
    with pytest.raises(FileNotFoundError, match="no-such-bucket-steel"):
        storage.list_files("s3://no-such-bucket-steel/prefix")
    assert not storage.exists(uri)


def test_endpoint_precedence(s3_bucket, s3_endpoint, monkeypatch):
    bogus = "http://127.0.0.1:9"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", bogus)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)  # an endpoint must not need a region
    monkeypatch.delenv("AWS_REGION", raising=False)
    assert s3.current_endpoint() == bogus
    uri = f"s3://{s3_bucket}/ep.txt"
    storage.write_text(uri, "explicit", endpoint=s3_endpoint)  # explicit argument wins
    assert storage.read_text(uri, endpoint=s3_endpoint) == "explicit"
    try:
        s3.set_endpoint(s3_endpoint)  # process-wide setting beats the environment
        assert s3.current_endpoint() == s3_endpoint
        assert s3.current_endpoint("http://other:1") == "http://other:1"
        assert storage.list_files(f"s3://{s3_bucket}") == [uri]
        fs, _ = storage.resolve(uri)
        assert fs.region == "us-east-1"
    finally:
        s3.set_endpoint(None)
    assert s3.current_endpoint() == bogus
