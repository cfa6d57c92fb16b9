"""The artifact store: a local (or shared, mounted) root, addressed through the DB only.

Paths are built from tenant and job/model ids, which the service generates; a user-supplied
name is only ever compared with a job's artifact list, never joined into a path.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from service.settings import Settings

# The files a job (or `bulwark run`) writes into its folder.
REPORT, REPORT_HTML, WEIGHTS = "report.json", "report.html", "model.safetensors"
BEST = "best.safetensors"      # weights of the best monitor-PGD epoch, kept apart from the last
WA = "wa.safetensors"          # the weight-averaged model, when the recipe keeps one
CERTIFY_TSV = "certify.tsv"    # per-point certification results (Cohen's columns)
CHECKPOINT = "checkpoint.pt"   # the resumable training state (internal, not downloadable)
DOWNLOADABLE = (REPORT, REPORT_HTML, WEIGHTS, BEST, WA, CERTIFY_TSV)
# everything a run may leave, including the certification sidecar (<state_path>.json)
RUN_OUTPUTS = (*DOWNLOADABLE, CHECKPOINT, CERTIFY_TSV + ".json")


def job_dir(settings: Settings, tenant_id: str, job_id: str) -> Path:
    return settings.resolved_artifact_root() / "tenants" / tenant_id / "jobs" / job_id


def model_path(settings: Settings, tenant_id: str, model_id: str) -> Path:
    return settings.resolved_artifact_root() / "tenants" / tenant_id / "models" / \
        f"{model_id}.safetensors"


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
