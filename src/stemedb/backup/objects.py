"""Where backups and archives go: a local directory or an S3 (or S3-compatible) prefix.

Owns: `open_objects(location)` and the two stores behind it, which offer
the same five operations on named, immutable-once-written objects (`put`,
`get`, `exists`, `names`, `describe`). A location is a path, `file:///dir`,
or `s3://bucket/prefix`. S3 goes through boto3 (the `archive` extra); the
endpoint, region and credentials come from boto3's own configuration
(`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` for an S3-compatible service,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, or
`~/.aws/`). Must never: leave a half-written object under its final name —
a local object is written to a temporary name, fsynced and renamed (and the
directory fsynced); an S3 PUT is atomic.

Error handling: a missing object raises StemeError naming it; an
unreachable or refusing S3 endpoint raises StemeError with boto3's reason.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import Any, Protocol

from stemedb.engine.files import FileLayer
from stemedb.errors import StemeError

_FILES = FileLayer()


class Objects(Protocol):
    def put(self, name: str, data: bytes | bytearray | memoryview) -> None: ...
    def get(self, name: str) -> bytes: ...
    def exists(self, name: str) -> bool: ...
    def names(self, prefix: str) -> list[str]: ...
    def describe(self, name: str) -> str: ...


def open_objects(location: str) -> Objects:
    """The object store at `location` (a path, file:///dir or s3://bucket/prefix)."""
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StemeError(f"{location}: an S3 location needs a bucket: s3://bucket/prefix")
        return S3Objects(parsed.netloc, parsed.path.strip("/"))
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StemeError(f"{location}: a file URL names a local directory: file:///path")
        return LocalObjects(urllib.parse.unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:   # (a Windows drive letter is not a scheme)
        raise StemeError(f"{location}: unknown location scheme {parsed.scheme!r}; give a "
                         "directory, file:///dir or s3://bucket/prefix")
    return LocalObjects(location)


class LocalObjects:
    """Objects as files under a directory (names may contain `/`)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def _path(self, name: str) -> str:
        return os.path.join(self.root, *name.split("/"))

    def put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        path = self._path(name)
        directory = os.path.dirname(path)
        created = not os.path.isdir(directory)
        os.makedirs(directory, exist_ok=True)
        temp = f"{path}.tmp-{os.getpid()}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
        _FILES.fsync_dir(directory)
        if created:
            _FILES.fsync_dir(os.path.dirname(directory))

    def get(self, name: str) -> bytes:
        try:
            with open(self._path(name), "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            raise StemeError(f"{self.describe(name)}: missing") from None

    def exists(self, name: str) -> bool:
        return os.path.exists(self._path(name))

    def names(self, prefix: str) -> list[str]:
        directory = self._path(prefix.rstrip("/")) if prefix else self.root
        if not os.path.isdir(directory):
            return []
        found = []
        for entry in sorted(os.listdir(directory)):
            if ".tmp-" in entry:
                continue
            found.append(f"{prefix.rstrip('/')}/{entry}" if prefix else entry)
        return found

    def describe(self, name: str) -> str:
        return self._path(name)


class S3Objects:
    """Objects under s3://bucket/prefix/ (boto3, configured the usual AWS ways)."""

    def __init__(self, bucket: str, prefix: str) -> None:
        try:
            import boto3
        except ImportError:
            raise StemeError("s3:// locations need boto3: pip install 'stemedb[archive]'") from None
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        # boto3 raises botocore's errors (refusals, unreachable endpoints, missing credentials);
        # each is reported with its own text, naming the object.
        self._errors: tuple[type[BaseException], ...] = (Exception,)
        self._client: Any = boto3.client("s3")

    def _key(self, name: str) -> str:
        return self.prefix + name

    def _fail(self, what: str, exc: BaseException) -> StemeError:
        return StemeError(f"{what}: S3 refused or could not be reached: {exc}")

    def put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(name), Body=bytes(data))
        except self._errors as exc:
            raise self._fail(self.describe(name), exc) from None

    def get(self, name: str) -> bytes:
        try:
            answer = self._client.get_object(Bucket=self.bucket, Key=self._key(name))
            return bytes(answer["Body"].read())
        except self._errors as exc:
            if _not_found(exc):
                raise StemeError(f"{self.describe(name)}: missing") from None
            raise self._fail(self.describe(name), exc) from None

    def exists(self, name: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(name))
            return True
        except self._errors as exc:
            if _not_found(exc):
                return False
            raise self._fail(self.describe(name), exc) from None

    def names(self, prefix: str) -> list[str]:
        """Names directly under `prefix/` (one level, as a directory listing)."""
        base = self._key(prefix.rstrip("/") + "/") if prefix else self.prefix
        found: list[str] = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base, Delimiter="/")
            for page in pages:
                for item in page.get("Contents", []):
                    found.append(item["Key"][len(self.prefix):])
                for sub in page.get("CommonPrefixes", []):
                    found.append(sub["Prefix"][len(self.prefix):].rstrip("/"))
        except self._errors as exc:
            raise self._fail(f"s3://{self.bucket}/{base}", exc) from None
        return sorted(found)

    def describe(self, name: str) -> str:
        return f"s3://{self.bucket}/{self._key(name)}"


def _not_found(exc: BaseException) -> bool:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound")

