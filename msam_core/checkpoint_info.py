"""What a checkpoint file says about itself, read without torch (the worker's main process and
the API image have no use for it).

A checkpoint's identity is its file: :func:`file_sha256` covers the weights and the metadata, so
it changes when either does. :func:`describe` is the record the service shows for the model that
answered (job status, ``/info``) and the DICOM outputs name (:func:`version`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from msam_core.errors import InvalidCheckpoint
from msam_core.pipeline.options import FIELDS as OPTION_FIELDS
from msam_core.pipeline.options import PipelineOptions

FORMAT_NAME = "msam"
#: Largest safetensors header read (bytes); msam's metadata is a few kB.
MAX_HEADER = 100_000_000


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of the file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safetensors_metadata(path: str | Path) -> dict | None:
    """The msam metadata of a safetensors file (its header's ``__metadata__["msam"]``, parsed),
    normalised by :func:`split_options`; ``None`` for a file that is not safetensors or has none."""
    with Path(path).open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        size = int.from_bytes(head, "little")
        if size >= MAX_HEADER:
            return None
        try:
            header = json.loads(f.read(size))
            raw = (header.get("__metadata__") or {}).get(FORMAT_NAME)
            return split_options(json.loads(raw)) if raw else None
        except (ValueError, AttributeError):
            return None


def split_options(meta: dict) -> dict:
    """``meta`` with the pipeline options under ``pipeline`` and the network's config alone under
    ``config`` (format 1 kept both in ``config``)."""
    meta = dict(meta)
    config = dict(meta.get("config") or {})
    if meta.get("format_version") == 1:
        meta["pipeline"] = {k: config.pop(k) for k in OPTION_FIELDS if k in config}
    meta["config"] = config
    meta.setdefault("pipeline", {})
    return meta


def options_from_meta(meta: dict, name: str = "checkpoint") -> PipelineOptions:
    """The pipeline options a checkpoint's metadata states (defaults, all off, for upstream files)."""
    try:
        return PipelineOptions.from_dict(meta.get("pipeline") or {})
    except (ValueError, TypeError) as exc:
        raise InvalidCheckpoint(f"{name}: its pipeline options are not valid ({exc})") from None


def model_name(path: str | Path) -> str:
    """A checkpoint's name: its file name without suffixes (``msam_default``)."""
    return Path(path).name.split(".")[0]


def version(sha256: str) -> str:
    """``"<msam version>+sha256.<first 16 hex>"``: the algorithm version of a checkpoint's results."""
    import msam_core

    return f"{msam_core.__version__}+sha256.{sha256[:16]}"


def describe(path: str | Path, sha256: str | None = None, meta: dict | None = None,
             network_id: str | None = None) -> dict:
    """The service's record of a checkpoint: ``{"name", "sha256", "version", "network_id",
    "architecture", "options"}``. Without ``meta`` it is read from the file (msam files; upstream
    files state no options, so theirs are the defaults); ``network_id`` is known once loaded."""
    sha256 = sha256 or file_sha256(path)
    if meta is None:
        meta = safetensors_metadata(path) or {}
    return {"name": model_name(path), "sha256": sha256, "version": version(sha256), "network_id": network_id,
            "architecture": (meta.get("config") or {}).get("name"),
            "options": options_from_meta(meta, Path(path).name).to_dict()}
