"""An HTTP proxy on 127.0.0.1 in front of an S3 endpoint (moto) that answers as AWS would for one IAM role.

Every request that reaches it is recorded (what the wire sees: boto3's and pyarrow's requests alike),
mapped to the IAM authorizations S3 makes for it (:func:`authorizations`: action, resource ARN and
condition keys such as ``s3:prefix``) and evaluated against the role's policies with the evaluator of
``tests/test_iam.py``:

- a request the role may not make is answered ``403 AccessDenied`` and never forwarded;
- an allowed ``GetObject``/``HeadObject`` of a key that does not exist is answered ``403``, not ``404``,
  when the role may not ``s3:ListBucket`` the bucket, as S3 does. That check is evaluated without an
  ``s3:prefix`` (the request carries none), so a ``ListBucket`` granted only under prefixes does not
  count: the conservative reading, since AWS does not document how it evaluates a prefix condition
  there. Code must handle a ``403`` for a missing key either way.

``role = None`` forwards everything unchecked (set-up). ``log`` holds one entry per request.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from urllib.parse import parse_qs, unquote, urlparse

from tests.http_proxy import LoopbackProxy

DENIED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
          b"<Message>Access Denied</Message></Error>")


class UnknownRequest(ValueError):
    """A request this mapping does not know: the test must learn it, not guess."""


def authorizations(method: str, path: str, headers: dict, body: bytes | None) -> tuple[str, list[tuple]]:
    """``(operation, [(action, resource, context), ...])`` S3 authorizes for a path-style request."""
    parsed = urlparse(path)
    q = parse_qs(parsed.query, keep_blank_values=True)
    bucket, _, key = unquote(parsed.path).lstrip("/").partition("/")
    headers = {k.lower(): v for k, v in headers.items()}
    bucket_arn, object_arn = f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/{key}"

    def copy_source():
        src = unquote(headers["x-amz-copy-source"].split("?")[0]).lstrip("/")
        return ("s3:GetObject", f"arn:aws:s3:::{src}", {})

    if not bucket:
        if method == "GET":
            return "ListBuckets", [("s3:ListAllMyBuckets", "*", {})]
        raise UnknownRequest(f"{method} {path}")
    if not key:
        prefix = {"s3:prefix": q["prefix"][0]} if "prefix" in q else {}
        if method == "HEAD":
            return "HeadBucket", [("s3:ListBucket", bucket_arn, {})]
        if method == "GET" and "uploads" in q:
            return "ListMultipartUploads", [("s3:ListBucketMultipartUploads", bucket_arn, prefix)]
        if method == "GET" and "location" in q:
            return "GetBucketLocation", [("s3:GetBucketLocation", bucket_arn, {})]
        if method == "GET" and "versions" in q:
            return "ListObjectVersions", [("s3:ListBucketVersions", bucket_arn, prefix)]
        if method == "GET" and set(q) <= {"list-type", "prefix", "delimiter", "max-keys", "continuation-token",
                                          "start-after", "marker", "encoding-type", "fetch-owner"}:
            return ("ListObjectsV2" if "list-type" in q else "ListObjects"), [("s3:ListBucket", bucket_arn, prefix)]
        if method == "PUT" and not q:
            return "CreateBucket", [("s3:CreateBucket", bucket_arn, {})]
        if method == "DELETE" and not q:
            return "DeleteBucket", [("s3:DeleteBucket", bucket_arn, {})]
        if method == "POST" and "delete" in q:
            keys = [e.text or "" for e in ET.fromstring(body or b"<Delete/>").iter() if e.tag.split("}")[-1] == "Key"]
            return "DeleteObjects", [("s3:DeleteObject", f"{bucket_arn}/{k}", {}) for k in keys]
        raise UnknownRequest(f"{method} {path}")
    if method in ("GET", "HEAD") and not q:
        return ("GetObject" if method == "GET" else "HeadObject"), [("s3:GetObject", object_arn, {})]
    if method == "GET" and set(q) == {"uploadId"}:
        return "ListParts", [("s3:ListMultipartUploadParts", object_arn, {})]
    if method == "PUT" and set(q) == {"partNumber", "uploadId"}:
        extra = [copy_source()] if "x-amz-copy-source" in headers else []
        return "UploadPart", [("s3:PutObject", object_arn, {})] + extra
    if method == "PUT" and not q:
        if "x-amz-copy-source" in headers:
            return "CopyObject", [copy_source(), ("s3:PutObject", object_arn, {})]
        return "PutObject", [("s3:PutObject", object_arn, {})]
    if method == "POST" and "uploads" in q:
        return "CreateMultipartUpload", [("s3:PutObject", object_arn, {})]
    if method == "POST" and set(q) == {"uploadId"}:
        return "CompleteMultipartUpload", [("s3:PutObject", object_arn, {})]
    if method == "DELETE" and set(q) == {"uploadId"}:
        return "AbortMultipartUpload", [("s3:AbortMultipartUpload", object_arn, {})]
    if method == "DELETE" and not q:
        return "DeleteObject", [("s3:DeleteObject", object_arn, {})]
    raise UnknownRequest(f"{method} {path}")


class IamProxy(LoopbackProxy):
    name = "s3-iam-proxy"

    def __init__(self, target: str, allowed):
        """``allowed(role, action, resource, context) -> bool``: the policy evaluator."""
        super().__init__(target)
        self.allowed = allowed
        self.role: str | None = None
        self.log: list[dict] = []

    def handle(self, h, body) -> None:
        entry = {"method": h.command, "path": h.path, "role": self.role}
        try:
            entry["op"], entry["auth"] = authorizations(h.command, h.path, dict(h.headers), body)
        except UnknownRequest:
            entry["op"], entry["auth"] = "UNKNOWN", []
        role = self.role
        entry["denied"] = [a for a in entry["auth"] if role and not self.allowed(role, *a)]
        if role and (entry["op"] == "UNKNOWN" or entry["denied"]):
            entry["status"] = 403
            self._record(entry)
            return self.reply(h, 403, [("Content-Type", "application/xml")], DENIED)
        status, resp_headers, data = self.forward(h, body)
        entry["upstream_status"] = status
        bucket = urlparse(h.path).path.lstrip("/").split("/")[0]
        if (role and status == 404 and entry["op"] in ("GetObject", "HeadObject")
                and not self.allowed(role, "s3:ListBucket", f"arn:aws:s3:::{bucket}", {})):
            entry["status"] = 403  # S3 does not tell who may not list whether a key exists
            entry["missing_key"] = True
            self._record(entry)
            return self.reply(h, 403, [("Content-Type", "application/xml")], DENIED)
        entry["status"] = status
        self._record(entry)
        self.reply(h, status, resp_headers, data)

    def _record(self, entry: dict) -> None:
        with self.lock:
            self.log.append(entry)

    def take(self) -> list[dict]:
        """The requests recorded since the last call."""
        with self.lock:
            out, self.log = self.log, []
        return out
