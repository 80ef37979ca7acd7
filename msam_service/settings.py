"""The one place for service configuration: environment variables ``MSAM_*`` (pydantic-settings).

``REDIS_URL`` is also read without the prefix (the common convention; ``MSAM_REDIS_URL`` wins).
Unset means "no Redis configured": ``msam serve`` then starts an embedded one.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

import msam_core

#: Where the bundled default model is expected (the same path the CLI falls back to).
DEFAULT_CHECKPOINT = msam_core.BUNDLED_CHECKPOINT


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MSAM_", extra="ignore")

    # -- where things are ------------------------------------------------------------------
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("MSAM_REDIS_URL", "REDIS_URL"),
        description="Redis for queue, job records and embedding cache (unset: `msam serve` embeds one)")
    storage_dir: Path = Field(default=Path("/tmp/msam-storage"),
                              description="directory shared by gateway and workers")
    checkpoint: Path | None = Field(default=None, description="model weights (default: bundled model)")
    device: str = Field(default="cpu", description="cpu or cuda (one worker per GPU)")
    torch_threads: int = Field(default=0, description="CPU threads per worker process for torch "
                               "(0: torch's default; on CPU workers use cores / workers)")

    # -- HTTP -------------------------------------------------------------------------------
    host: str = Field(default="127.0.0.1", description="address the API binds to")
    port: int = Field(default=8000, description="API port")
    api_keys: str = Field(default="", description="comma-separated 'tenant:sha256-of-key' entries "
                          "(`msam hash-key`); empty (and no keys file): no auth, loopback only")
    api_keys_file: Path | None = Field(default=None, description="file of 'tenant:sha256-of-key' lines "
                                       "(read at start; '#' comments)")
    request_timeout_s: float = Field(default=120.0, gt=0, description="a request (body included) must "
                                     "complete within this, else 408")
    header_timeout_s: float = Field(default=10.0, gt=0, description="a connection must deliver a complete "
                                    "request head (request line and headers) within this of opening, or of "
                                    "the first byte of its next request, else it is closed (slow-header "
                                    "clients); also how long a body the API already refused may keep arriving")
    redis_timeout_s: float = Field(default=2.0, gt=0, description="the API's connect and read timeout for "
                                   "Redis: a frozen or unreachable Redis is a 503 after about this, not a "
                                   "request held for minutes (the workers keep their own, longer timeouts)")
    public_url: str = Field(default="", description="base URL for links in responses (default: request's)")

    # -- limits -----------------------------------------------------------------------------
    max_upload_mb: int = Field(default=2048, gt=0, description="largest multipart body (all files together), "
                               "counted on the bytes received whatever the transfer encoding")
    max_json_kb: int = Field(default=256, gt=0, description="largest request body of any other type (JSON: ids "
                             "and prompts only) and largest text field of a multipart form (prompts, "
                             "destinations), in KiB")
    max_files: int = Field(default=5000, description="most files in one upload")
    max_decompressed_mb: int = Field(default=4096, description="most bytes an upload may expand to "
                                     "(zip members, gzip'd NIfTI data, DICOM pixel data)")
    max_voxels: int = Field(default=2**29, description="most voxels in one image (512 x 512 x 2048)")
    max_prompts: int = Field(default=256, gt=0, description="most points and boxes in one request, all lesions "
                             "together")
    max_jobs_in_flight: int = Field(default=16, description="most queued + running jobs per tenant (429 beyond)")
    max_lesions: int = Field(default=32, gt=0, description="most lesions in one request")
    max_points: int = Field(default=64, gt=0, description="most points per lesion, positive and negative together")
    max_windows: int = Field(default=8, description="most 128^3 windows per lesion")

    # -- jobs and queue ---------------------------------------------------------------------
    queue: str = Field(default="msam", description="Celery queue of segmentation jobs (the GPU workers'; "
                       "autoscaling watches it)")
    io_queue: str = Field(default="msam-io", description="Celery queue of network I/O with archives, the RIS "
                          "and webhooks (retrieval, STOW-RS / C-STORE, HL7, FHIR), served by the I/O worker")
    io_concurrency: int = Field(default=4, ge=1, le=64, description="threads of the I/O worker")
    job_soft_time_limit_s: int = Field(default=300, description="a job is asked to stop after this")
    job_time_limit_s: int = Field(default=360, description="a job's process is killed after this")
    visibility_timeout_s: int = Field(default=900, description="unacked job redelivered after this "
                                      "(must exceed job_time_limit_s)")
    max_deliveries: int = Field(default=3, description="a job that lost its worker this often fails")
    job_ttl_s: int = Field(default=86400, description="job records, uploads and results expire after this")
    sweep_interval_s: float = Field(default=600.0, gt=0, description="how often the gateway deletes expired files")
    volume_cache_items: int = Field(default=2, description="decoded volumes kept per worker process")

    # -- interactive sessions ---------------------------------------------------------------
    interaction_wait_s: float = Field(default=5.0, ge=0, le=60, description="how long an interaction's HTTP "
                                      "request waits for its answer before it returns 202 and a link to poll")
    max_interactions: int = Field(default=256, gt=0, description="most interactions kept per lesion of a session")
    worker_queue_sweep_s: float = Field(default=30.0, gt=0, description="how often (at most, across all workers) "
                                        "a live worker empties and removes the own queues of lost workers, "
                                        "resending their interactions to the shared queue once")

    # -- embedding cache --------------------------------------------------------------------
    cache_ttl_s: int = Field(default=3600, description="embedding cache entry lifetime")
    cache_max_mb: int = Field(default=512, description="embedding cache memory cap in Redis")
    shared_embedding_cache: bool = Field(
        default=False, description="one embedding cache for all tenants (a tenant's cache hits and timings then "
        "show that another tenant segmented the same scan at the same place); default: one per tenant")

    @field_validator("checkpoint", "api_keys_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        """An empty variable (compose's ``${MSAM_CHECKPOINT:-}``) means unset: the default, not the
        current folder."""
        return None if isinstance(value, str) and not value.strip() else value

    def checkpoint_path(self) -> Path:
        return self.checkpoint if self.checkpoint is not None else DEFAULT_CHECKPOINT

    def key_entries(self) -> list[str]:
        """Every configured ``tenant:sha256`` entry (``MSAM_API_KEYS`` and the keys file)."""
        entries = [k.strip() for k in self.api_keys.split(",") if k.strip()]
        if self.api_keys_file is not None:
            lines = self.api_keys_file.read_text().splitlines()
            entries += [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        return entries

    def check(self) -> None:
        """Refuse inconsistent settings at start (not at the first job)."""
        if self.visibility_timeout_s <= self.job_time_limit_s:
            raise ValueError(
                f"MSAM_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s}) must exceed "
                f"MSAM_JOB_TIME_LIMIT_S ({self.job_time_limit_s}), or running jobs get delivered twice")
        if self.io_queue == self.queue:
            raise ValueError("MSAM_IO_QUEUE must differ from MSAM_QUEUE: archive and RIS traffic must not "
                             "wait behind, or hold, the segmentation workers")
        if self.job_soft_time_limit_s >= self.job_time_limit_s:
            raise ValueError("MSAM_JOB_SOFT_TIME_LIMIT_S must be below MSAM_JOB_TIME_LIMIT_S")

    def check_listener(self, host: str | None = None) -> None:
        """The API's start-up check: keys well-formed; no keys -> loopback only (``ValueError``)."""
        from msam_service.auth import check_bind, load_keys

        check_bind(host or self.host, bool(load_keys(self.key_entries())))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    settings = Settings()
    settings.check()
    return settings
