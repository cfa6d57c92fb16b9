"""Where artifacts live: the artifact root on a local (or mounted) filesystem, the default, or
an S3-compatible bucket (``BULWARK_ARTIFACT_URL=s3://bucket/prefix``), so that workers on other
hosts than the API's deliver reports and weights.

Both speak in keys, the relative paths ``bulwark.store.artifacts`` builds from ids the service
made (``tenants/<tenant>/jobs/<job>/<name>``); a user-supplied name is never one. A trainer always
works in a local folder (``bulwark.store.artifacts.job_dir``); with a bucket, ``Artifacts.pull``
fills it from the bucket before a run (a resume on another host reads its checkpoint back) and
``push`` copies the run's files there as they are written. The bucket is reached with boto3
(a dependency of Bulwark's); its endpoint and region come from settings, the credentials from
boto3's own chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, a profile, a role).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bulwark.store.settings import Settings, parse_s3_url

CHUNK = 1 << 20


class Artifacts:
    """The local artifact root: the files are where the trainer wrote them."""

    remote = False

    def __init__(self, root: Path):
        self.root = root

    def local(self, key: str) -> Path:
        return self.root / key

    def push(self, key: str, path: Path) -> None:
        """Make the file at ``path`` the object ``key`` (here: it already is)."""

    def pull(self, key: str, path: Path) -> bool:
        """Copy object ``key`` to ``path`` unless ``path`` exists; False when there is none."""
        return path.exists()

    def read(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.root / prefix, ignore_errors=True)


class S3Artifacts(Artifacts):
    """Objects under ``s3://bucket/prefix/``; ``root`` is this host's scratch folder."""

    remote = True

    def __init__(self, root: Path, url: str, *, endpoint_url: str = "", region: str = ""):
        import boto3
        from botocore.config import Config

        super().__init__(root)
        self.bucket, self.prefix = parse_s3_url(url)
        self.client = boto3.client(
            "s3", endpoint_url=endpoint_url or None, region_name=region or None,
            config=Config(retries={"max_attempts": 5, "mode": "standard"},
                          s3={"addressing_style": "path"} if endpoint_url else {}))

    def _name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _missing(self, e: Exception) -> bool:
        code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
        return code in ("404", "NoSuchKey", "NotFound")

    def push(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._name(key))

    def pull(self, key: str, path: Path) -> bool:
        if path.exists():
            return True
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        try:
            self.client.download_file(self.bucket, self._name(key), str(tmp))
        except Exception as e:
            tmp.unlink(missing_ok=True)
            if self._missing(e):
                return False
            raise
        tmp.replace(path)
        return True

    def read(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._name(key))["Body"].read()
        except Exception as e:
            if self._missing(e):
                return None
            raise

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._name(key))

    def delete_prefix(self, prefix: str) -> None:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._name(prefix).rstrip("/") + "/")
        for page in pages:
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})

    def open(self, key: str) -> tuple[int, Iterator[bytes]]:
        """The object's size and its bytes in chunks (the API streams a download with it)."""
        obj: dict[str, Any] = self.client.get_object(Bucket=self.bucket, Key=self._name(key))
        return int(obj["ContentLength"]), obj["Body"].iter_chunks(CHUNK)


def artifacts(settings: Settings) -> Artifacts:
    """The store ``settings`` name: the bucket of ``artifact_url``, else the artifact root."""
    root = settings.resolved_artifact_root()
    if not settings.artifact_url:
        return Artifacts(root)
    return S3Artifacts(root, settings.artifact_url, endpoint_url=settings.s3_endpoint_url,
                       region=settings.s3_region)
