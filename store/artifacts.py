"""The artifact store: a local (or shared, mounted) root, addressed through the DB only.

Paths are built from tenant and job/model ids, which the service generates; a user-supplied
name is only ever compared with a job's artifact list, never joined into a path.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from bulwark.contract.artifacts import DOWNLOADABLE
from bulwark.store.settings import Settings


def job_key(tenant_id: str, job_id: str) -> str:
    """A job's folder in the artifact store (its files are ``job_key(...)/<name>``)."""
    return f"tenants/{tenant_id}/jobs/{job_id}"


def model_key(tenant_id: str, model_id: str) -> str:
    return f"tenants/{tenant_id}/models/{model_id}.safetensors"


def dataset_key(tenant_id: str, dataset_id: str) -> str:
    return f"tenants/{tenant_id}/datasets/{dataset_id}.npz"


def job_dir(settings: Settings, tenant_id: str, job_id: str) -> Path:
    return settings.resolved_artifact_root() / job_key(tenant_id, job_id)


def model_path(settings: Settings, tenant_id: str, model_id: str) -> Path:
    return settings.resolved_artifact_root() / model_key(tenant_id, model_id)


def dataset_path(settings: Settings, tenant_id: str, dataset_id: str) -> Path:
    return settings.resolved_artifact_root() / dataset_key(tenant_id, dataset_id)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe_artifacts(out: Path) -> list[dict[str, Any]]:
    """The downloadable files of a finished job, with size and checksum."""
    return [{"name": name, "size": (out / name).stat().st_size,
             "sha256": sha256_file(out / name)}
            for name in DOWNLOADABLE if (out / name).is_file()]
