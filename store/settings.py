"""All service settings in one pydantic-settings object, read from ``BULWARK_*`` variables.

With no variables set, Bulwark runs embedded: SQLite and artifacts under ``./bulwark-data`` and
a private Redis that ``bulwark serve`` starts (``redis_url`` empty). Production points
``BULWARK_DATABASE_URL``, ``BULWARK_REDIS_URL`` and ``BULWARK_ARTIFACT_ROOT`` at shared services.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bulwark.contract.tracking import TrackingServers


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` → (bucket, prefix without slashes at its ends)."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"BULWARK_ARTIFACT_URL must look like s3://bucket/prefix, got {url!r} "
                         "(leave it empty for the local artifact root)")
    return parts.netloc, parts.path.strip("/")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BULWARK_", extra="ignore")

    home: Path = Field(Path("bulwark-data"), description="embedded-mode state folder")
    database_url: str = Field("", description="SQLAlchemy URL; empty = SQLite under home")
    redis_url: str = Field("", description="broker + event streams; empty = embedded Redis")
    artifact_root: Path | None = Field(None, description="reports, weights; default home/artifacts")
    artifact_url: str = Field(
        "", description="s3://bucket/prefix: artifacts in an S3-compatible bucket (the artifact "
                        "root is then each host's scratch); empty = the artifact root itself")
    s3_endpoint_url: str = Field("", description="the S3 endpoint (MinIO: http://minio:9000); "
                                                 "empty = AWS")
    s3_region: str = Field("", description="the bucket's region; empty = boto3's default")
    queue: str = Field("bulwark", description="Celery queue the API routes jobs to")
    device: str = Field("auto", description="worker device for training: auto, cpu, cuda:N")
    worker_devices: int = Field(
        1, ge=1, le=64, description="devices a worker gives one job (its GPUs, or CPU ranks): "
                                    "it claims jobs whose compute.devices fits; 'all' = these")
    reaper_enabled: bool = Field(True, description="run the stale-job reaper in the API")
    mlflow_uri: str = Field("", description="the MLflow tracking URI a job with no "
                            "tracking.mlflow.target is logged to; needs bulwark[mlflow]")
    mlflow_targets: dict[str, str] = Field(
        default_factory=dict, description='tracking servers a job may name, JSON: {"team": '
                                          '"http://mlflow.internal:5000"} (a tenant never gives '
                                          "a URI)")
    mlflow_artifact_roots: list[str] = Field(
        default_factory=list, description='JSON list: where a server may have the worker write '
                                          'artifacts (["s3://team-mlflow/artifacts"]) besides '
                                          "its own proxied mlflow-artifacts: store")

    metrics_token: str = Field("", description="a bearer token /metrics asks for (Prometheus' "
                               "authorization: credentials); empty: /metrics is open")

    max_attempts: int = Field(3, ge=1, le=20)
    max_queued_per_tenant: int = Field(20, ge=1)
    max_running_per_tenant: int = Field(
        4, ge=0, description="jobs one tenant may run at once across all workers (0: no cap); "
                             'per tenant: TENANT_LIMITS {"alice": {"max_running": 1}}')
    defer_seconds: float = Field(
        5.0, gt=0, description="a worker whose message finds only capped tenants' jobs waits "
                               "this long, then puts the message back")
    standby_trainer: bool = Field(
        True, description="each worker child keeps a trainer process that has already "
                          "imported torch and the engine waiting for its job (~3 s sooner a "
                          "job; ~300 MB while idle)")
    heartbeat_seconds: float = Field(30.0, gt=0)
    stale_after_seconds: float = Field(300.0, gt=0, description="heartbeat age before reaping")
    reaper_interval_seconds: float = Field(60.0, gt=0)
    unsent_after_seconds: float = Field(
        30.0, gt=0, description="a queued job with no accepted broker message is re-sent")
    cancel_poll_seconds: float = Field(2.0, gt=0)
    max_run_seconds: int = Field(6 * 3600, ge=60, description="Celery soft time limit")
    worker_soft_shutdown_seconds: float = Field(
        60.0, ge=0, description="a stopping worker lets its job run this long, then requeues it")
    max_upload_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    max_job_tflop: float = Field(
        2e7, gt=0, description="estimated compute per job (contract/cost.py); 2e7 TFLOP fits "
                               "WRN-34-10 TRADES-AWP for 200 CIFAR epochs plus AutoAttack")
    max_dataset_bytes: int = Field(16 * 2**30, ge=1, description="a job's dataset on the device")
    tenant_limits: dict[str, dict[str, float]] = Field(
        default_factory=dict, description='per-tenant overrides, JSON: {"alice": '
                                          '{"max_job_tflop": 1e5}}')
    max_streams_per_tenant: int = Field(8, ge=1, description="open /events streams per tenant")
    max_streams: int = Field(256, ge=1, description="open /events streams per API process")
    events_maxlen: int = Field(1000, ge=10)
    events_ttl_seconds: int = Field(7 * 86400, ge=60, description="after the terminal event")

    @field_validator("artifact_url")
    @classmethod
    def _s3_url(cls, url: str) -> str:
        if url:
            parse_s3_url(url)
        return url

    def limits(self, tenant_id: str) -> dict[str, float]:
        """``tenant_id``'s limits: the operator's defaults, overridden by TENANT_LIMITS."""
        return {"max_job_tflop": self.max_job_tflop, "max_dataset_bytes": self.max_dataset_bytes,
                "max_running": self.max_running_per_tenant,
                **self.tenant_limits.get(tenant_id, {})}

    def tracking_servers(self) -> TrackingServers:
        """The operator's tracking servers, as the API and the worker check a job against."""
        return TrackingServers.operator(self.mlflow_targets, self.mlflow_uri,
                                        self.mlflow_artifact_roots)

    def max_running(self, tenant_id: str) -> int:
        """The running-jobs cap of ``tenant_id`` (0: none)."""
        return int(self.limits(tenant_id)["max_running"])

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        return f"sqlite:///{(self.home / 'bulwark.db').resolve()}"  # Store makes it 0600

    def resolved_artifact_root(self) -> Path:
        root = self.artifact_root or (self.home / "artifacts")
        root.mkdir(parents=True, exist_ok=True)
        return root.resolve()


@lru_cache
def get_settings() -> Settings:
    return Settings()
