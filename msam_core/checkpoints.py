"""Loading and saving weights: official SAM-Med3D, official M-SAM, and msam's own format.

Formats read by :func:`load_checkpoint`:

- **SAM-Med3D** (``sam_med3d.pth``, ``sam_med3d_turbo.pth``): ``torch.save`` of a dict whose
  ``model_state_dict`` holds ``image_encoder.* prompt_encoder.* mask_decoder.*``; older files also
  pickle the training ``args`` (an ``argparse.Namespace``). Our module names equal upstream's, so
  these keys load unchanged.
- **M-SAM** training checkpoints: ``model_state_dict`` with ``lora_sam.sam.*`` (LoRA wrapped
  around each ``attn.qkv``) and ``bidatt.*`` (the adapter); renamed here, see :data:`MEA_RENAMES`.
- **msam** (``.safetensors``): weights in our names plus JSON metadata under the ``msam`` key:
  format version, the network's config (``config``), the pipeline's options (``pipeline``,
  :class:`~msam_core.pipeline.options.PipelineOptions`), msam version, provenance. Format 1
  (before the options had an object of their own) kept the options inside ``config``; such files
  load unchanged, their options taken from there.

:func:`load_model` reads a file once and returns both halves with the file's identity
(:class:`LoadedModel`): what ``msam segment``, the worker, ``msam evaluate`` and ``msam
calibrate`` build their :class:`~msam_core.pipeline.segmenter.Segmenter` from.
:func:`load_checkpoint` returns the network alone (training, conversion).

Pickled files are opened with ``torch.load(weights_only=True)`` and a short allow-list
(``argparse.Namespace``, numpy scalars). A file that needs anything else is refused unless the
operator opts in (``allow_unsafe_pickle=True`` / ``--allow-unsafe-pickle``): unpickling runs code.
Missing, unexpected and mis-shaped keys raise :class:`InvalidCheckpoint` listing them; nothing is
ever silently left at random initialisation.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msam_core.errors import InvalidCheckpoint
from msam_core.model import MSAM, ModelConfig, get_config, is_added_parameter
from msam_core import BUNDLED_CHECKPOINT  # noqa: F401 - for load_model(BUNDLED_CHECKPOINT)
from msam_core.checkpoint_info import describe, file_sha256, model_name, options_from_meta, split_options, version
from msam_core.pipeline.options import PipelineOptions

log = logging.getLogger(__name__)

FORMAT_NAME = "msam"
FORMAT_VERSION = 2
#: Format versions read: 1 kept the pipeline options inside ``config``.
READ_VERSIONS = (1, 2)
MSAM_PREFIX = "lora_sam.sam."

#: Our MEA names -> M-SAM's ``bidatt`` names (prefixes; order matters only for readability).
MEA_RENAMES: tuple[tuple[str, str], ...] = (
    ("mea.image_in_norm.", "bidatt.add_norm3."),
    ("mea.mask_in_norm.", "bidatt.add_norm2."),
    ("mea.fuse_attn.", "bidatt.multi_head_self_attention."),
    ("mea.fuse_norm.", "bidatt.add_norm."),
    ("mea.fuse_mlp.", "bidatt.mlp."),
    ("mea.blocks.", "bidatt.bidirectional_attentions."),
)
#: Inside one Mutual Feature Enhancement Block: our part name -> M-SAM's.
MFEB_RENAMES: dict[str, str] = {
    "mask_conv1": "prompt_conv1",
    "mask_conv2": "prompt_conv2",
    "mask_norm": "prompt_norm",
    "mask_addnorm1": "prompt_addnorm1",
    "mask_addnorm2": "prompt_addnorm2",
    "mask_addnorm3": "prompt_addnorm3",
    "mask_attn": "prompt_multiheadattn",
    "image_attn": "image_multiheadattn",
    "image_mlp": "mlp1",
    "mask_mlp": "mlp2",
}
#: Parameters M-SAM creates but never uses in its forward pass; dropped on import.
MSAM_UNUSED = ("bidatt.add_norm4.weight", "bidatt.add_norm4.bias")

_LORA_OURS = re.compile(r"^(image_encoder\.blocks\.\d+\.attn\.)lora\.(a_q|b_q|a_v|b_v)\.weight$")
_LORA_THEIRS = re.compile(r"^(image_encoder\.blocks\.\d+\.attn\.)qkv\.linear_(a_q|b_q|a_v|b_v)\.weight$")
_QKV_OURS = re.compile(r"^(image_encoder\.blocks\.\d+\.attn\.)qkv\.(weight|bias)$")
_QKV_THEIRS = re.compile(r"^(image_encoder\.blocks\.\d+\.attn\.)qkv\.qkv\.(weight|bias)$")
_MFEB = re.compile(r"^(bidatt\.bidirectional_attentions\.\d+\.|mea\.blocks\.\d+\.)([a-z_0-9]+)(\..*)$")


# -- key mapping ---------------------------------------------------------------------------
def ours_to_msam_key(key: str, has_lora: bool) -> str:
    """One of our keys -> the M-SAM training-checkpoint key."""
    if key.startswith("mea."):
        for ours, theirs in MEA_RENAMES:
            if key.startswith(ours):
                key = theirs + key[len(ours) :]
                break
        m = _MFEB.match(key)
        if m:
            key = m.group(1) + MFEB_RENAMES.get(m.group(2), m.group(2)) + m.group(3)
        return key
    if has_lora:
        key = _LORA_OURS.sub(r"\1qkv.linear_\2.weight", key)
        key = _QKV_OURS.sub(r"\1qkv.qkv.\2", key)
    return MSAM_PREFIX + key


def msam_to_ours_key(key: str) -> str:
    """An M-SAM training-checkpoint key -> ours."""
    if key.startswith("bidatt."):
        m = _MFEB.match(key)
        if m:
            inverse = {v: k for k, v in MFEB_RENAMES.items()}
            key = m.group(1) + inverse.get(m.group(2), m.group(2)) + m.group(3)
        for ours, theirs in MEA_RENAMES:
            if key.startswith(theirs):
                return ours + key[len(theirs) :]
        return key
    if key.startswith(MSAM_PREFIX):
        key = key[len(MSAM_PREFIX) :]
    key = _LORA_THEIRS.sub(r"\1lora.\2.weight", key)
    return _QKV_THEIRS.sub(r"\1qkv.\2", key)


def export_state_dict(model: MSAM, layout: str) -> dict[str, torch.Tensor]:
    """Our weights in an upstream layout: ``"sam_med3d"`` or ``"m_sam"``."""
    state = model.state_dict()
    if layout == "sam_med3d":
        extra = [k for k in state if is_added_parameter(k)]
        if extra:
            raise InvalidCheckpoint(
                f"this {model.config.name} model has LoRA/MEA/high-res weights ({len(extra)} tensors) that the "
                "SAM-Med3D layout cannot hold; export it as 'm_sam' or 'msam'"
            )
        return dict(state)
    if layout == "m_sam":
        has_lora = model.config.lora_rank > 0
        out = {ours_to_msam_key(k, has_lora): v for k, v in state.items()}
        if model.mea is not None:
            dim = model.config.prompt_embed_dim
            out[MSAM_UNUSED[0]] = torch.ones(dim)
            out[MSAM_UNUSED[1]] = torch.zeros(dim)
        return out
    raise ValueError(f"unknown layout {layout!r}; use 'sam_med3d' or 'm_sam'")


# -- reading files -------------------------------------------------------------------------
def _is_safetensors(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and int.from_bytes(head[:8], "little") < 100_000_000 and head[8:9] == b"{"


# Training checkpoints pickle their argparse args and numpy scalars (e.g. a best Dice); files
# written with numpy 1.x name the scalar constructor under numpy.core, 2.x under numpy._core.
_SAFE_GLOBALS: list[Any] = [
    argparse.Namespace,
    np.dtype,
    np._core.multiarray.scalar,
    (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),
] + [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]


def _torch_load(path: Path, allow_unsafe_pickle: bool) -> Any:
    with path.open("rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save's zip, or a legacy pickle
        raise InvalidCheckpoint(f"{path.name} is not a readable PyTorch or safetensors checkpoint: its first bytes "
                                "are neither a zip archive (torch.save), a pickle, nor a safetensors header")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not allow_unsafe_pickle:
            reason = str(exc).strip().splitlines()[0][:300]
            raise InvalidCheckpoint(
                f"{path.name} needs arbitrary unpickling to load ({reason}); unpickling can run code, "
                "so it is refused. If you trust the file, pass --allow-unsafe-pickle "
                "(MSAM_ALLOW_UNSAFE_PICKLE=1), or convert it once with 'msam convert "
                "--allow-unsafe-pickle IN OUT.safetensors'"
            ) from None
        log.warning("loading %s with full unpickling (operator opted in)", path.name)
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for junk: RuntimeError, EOFError, IndexError, ...
        raise InvalidCheckpoint(
            f"{path.name} is not a readable PyTorch or safetensors checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else 'no detail'})"
        ) from None


def _state_from_pickle(obj: Any, name: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InvalidCheckpoint(
            f"{name} holds no model weights: expected a state dict, or a dict with 'model_state_dict' "
            "(SAM-Med3D / M-SAM training checkpoints)"
        )
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in obj.items()}


def _guess_config(state: dict[str, torch.Tensor], is_msam_layout: bool, name: str) -> ModelConfig:
    pos = state.get("image_encoder.pos_embed")
    if pos is None:
        raise InvalidCheckpoint(f"{name} has no image_encoder.pos_embed: not a SAM-Med3D-family checkpoint")
    if pos.shape[-1] != 768 or pos.shape[1] != 8:
        raise InvalidCheckpoint(
            f"{name}: image encoder of width {pos.shape[-1]} over a {pos.shape[1]}^3 grid matches no "
            "built-in config (SAM-Med3D vit_b_ori is 768 over 8^3); name its config: in Python "
            "load_model(path, config=NAME), or convert it once with `msam convert FILE.pth FILE.safetensors "
            "--config NAME` (msam_small, msam_small_regions, ...), whose output names its config itself"
        )
    return get_config("msam" if is_msam_layout else "sam_med3d")


def _check_and_load(model: MSAM, state: dict[str, torch.Tensor], name: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or mismatched:

        def show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {show(mismatched)}")
        raise InvalidCheckpoint(f"{name} does not fit the {model.config.name} model - " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def read_weights(path: str | Path, allow_unsafe_pickle: bool = False) -> tuple[dict[str, torch.Tensor], ModelConfig | None, dict]:
    """Weights of any supported file in **our** key names, its config if the file states one
    (msam files; ``None`` for upstream files), and metadata."""
    path = Path(path)
    if not path.is_file():
        raise InvalidCheckpoint(f"checkpoint not found: {path}")
    if _is_safetensors(path):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta_raw = (f.metadata() or {}).get(FORMAT_NAME)
                state = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise InvalidCheckpoint(f"{path.name} is a damaged safetensors file ({exc})") from None
        if meta_raw is None:
            raise InvalidCheckpoint(f"{path.name} is a safetensors file without msam metadata; convert it with 'msam convert'")
        meta = json.loads(meta_raw)
        if meta.get("format_version") not in READ_VERSIONS:
            raise InvalidCheckpoint(f"{path.name}: msam format version {meta.get('format_version')} is not supported "
                                    f"(this msam reads {', '.join(map(str, READ_VERSIONS))}); update msam")
        meta = split_options(meta)
        try:
            return state, ModelConfig.from_dict(meta["config"]), meta
        except (ValueError, TypeError) as exc:
            raise InvalidCheckpoint(f"{path.name}: its model config is not valid ({exc})") from None
    state = _state_from_pickle(_torch_load(path, allow_unsafe_pickle), path.name)
    is_msam_layout = any(k.startswith(("lora_sam.", "bidatt.")) for k in state)
    if is_msam_layout:
        state = {msam_to_ours_key(k): v for k, v in state.items() if k not in MSAM_UNUSED}
    return state, None, {"source_layout": "m_sam" if is_msam_layout else "sam_med3d"}


@dataclass
class LoadedModel:
    """A checkpoint as the pipeline uses it.

    Attributes:
        network: the network, in eval mode on its device.
        options: the pipeline options the file states (replace them to try others, as ``msam
            calibrate`` does; the file is not changed).
        name: the file's name without its suffixes (``msam_default``).
        sha256: SHA-256 of the file's bytes, weights and metadata: it changes whenever either does.
        meta: the file's metadata (:func:`read_weights`).
        path: the file.
    """

    network: MSAM
    options: PipelineOptions
    name: str
    sha256: str
    meta: dict
    path: Path

    @property
    def model_id(self) -> str:
        """The network's id (config name + weights digest): the embedding cache's key."""
        return self.network.model_id

    @property
    def version(self) -> str:
        """``"<msam version>+sha256.<first 16 hex>"``: the DICOM algorithm version of its results."""
        return version(self.sha256)

    def describe(self) -> dict:
        """What answered a request, for job records, ``/info`` and logs (no patient data); the
        options are the ones in force, which ``msam calibrate`` may have changed in memory."""
        record = describe(self.path, self.sha256, self.meta, self.model_id)
        record["options"] = self.options.to_dict()
        return record


def _build(state: dict[str, torch.Tensor], file_config: ModelConfig | None, meta: dict, name: str,
           config: ModelConfig | str | None, device: str | torch.device) -> MSAM:
    if isinstance(config, str):
        config = get_config(config)
    config = config or file_config or _guess_config(state, meta.get("source_layout") == "m_sam", name)
    model = MSAM(config)
    _check_and_load(model, state, name)
    return model.to(device).eval()


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    config: ModelConfig | str | None = None,
    allow_unsafe_pickle: bool = False,
) -> LoadedModel:
    """Read a checkpoint once: the network (weights loaded exactly, eval mode on ``device``), its
    pipeline options and the file's identity. ``config`` overrides the file's (upstream files
    state none; it is guessed from the weights)."""
    path = Path(path)
    state, file_config, meta = read_weights(path, allow_unsafe_pickle)
    options = options_from_meta(meta, path.name)
    network = _build(state, file_config, meta, path.name, config, device)
    return LoadedModel(network=network, options=options, name=model_name(path), sha256=file_sha256(path),
                       meta=meta, path=path)


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    config: ModelConfig | str | None = None,
    allow_unsafe_pickle: bool = False,
) -> MSAM:
    """Build the network a checkpoint describes and load its weights exactly; eval mode on
    ``device``. The pipeline options are left out: inference uses :func:`load_model`."""
    state, file_config, meta = read_weights(path, allow_unsafe_pickle)
    return _build(state, file_config, meta, Path(path).name, config, device)


def init_from_checkpoint(model: MSAM, path: str | Path, allow_unsafe_pickle: bool = False) -> list[str]:
    """Start training ``model`` from a checkpoint that lacks its LoRA/MEA/high-res parts (e.g. SAM-Med3D).

    Only those tensors (:func:`is_added_parameter`; LoRA's B starts at zero) may be absent, or
    differ in shape (e.g. the high-res stem's ``fuse`` of an ``msam_small`` made before
    ``click_regions``); every other key must match.
    Returns the keys that kept their fresh initialisation, for the training log.
    """
    state, _, _ = read_weights(path, allow_unsafe_pickle)
    current = model.state_dict()
    fresh = [k for k, v in current.items()
             if is_added_parameter(k) and (k not in state or tuple(state[k].shape) != tuple(v.shape))]
    _check_and_load(model, {**state, **{k: current[k] for k in fresh}}, Path(path).name)
    model.invalidate_model_id()
    return fresh


def save_checkpoint(model: MSAM, path: str | Path, provenance: dict | None = None,
                    options: PipelineOptions | None = None) -> Path:
    """Write ``model`` in msam's format: safetensors weights + JSON metadata, with the pipeline
    ``options`` (default: all off, as a freshly trained network has them)."""
    from safetensors.torch import save_file

    import msam_core

    path = Path(path)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "pipeline": (options or PipelineOptions()).to_dict(),
        "msam_version": msam_core.__version__,
        "provenance": provenance or {},
    }
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={FORMAT_NAME: json.dumps(meta)})
    return path
