"""The promptable network: encode once per crop, decode per click, refine iteratively.

Public interface (everything else in msam uses only these):

- ``encode(image [B, 1, 128, 128, 128]) -> embedding [B, 384, 8, 8, 8]`` (with
  ``high_res_features``, ``[B, E + 64 E/8, 8, 8, 8]``: the stride-4 image features folded in,
  see :mod:`msam_core.model.high_res`; with ``click_regions`` also the crop pooled per 2^3
  voxels, ``[B, E + 64 (E/8 + 8), 8, 8, 8]``, see :mod:`msam_core.model.click_regions`)
- ``decode(embedding, points [B, N, 3], labels [B, N], mask_logits [B, 1, 32, 32, 32] | None)
  -> logits [B, 1, 32, 32, 32]``. Points are voxel indices in the 128^3 crop, in the axis order
  of the image tensor; labels are 1 (positive) / 0 (negative). The MEA fuses the mask prompt
  with the image embedding when the model has one; otherwise they are summed, as in SAM. With
  ``region_logits`` the click regions are also added to the logits, see
  :mod:`msam_core.model.region_logits`.
- ``refine(embedding, points, labels, mask_logits=None, iterations=N) -> logits``.

These are plain differentiable calls (training uses them); inference wraps them in
``torch.inference_mode()`` and :meth:`MSAM.autocast`.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch
from torch import nn

from msam_core.model.configs import ModelConfig, get_config
from msam_core.model.decode_cache import DecodeCache
from msam_core.model.high_res import FACTOR, HighResStem, fold, unfold
from msam_core.model.image_encoder import ImageEncoderViT3D
from msam_core.model.mask_decoder import MaskDecoder3D
from msam_core.model.mea import MaskEnhancedAdapter
from msam_core.model.prompt_encoder import PromptEncoder3D
from msam_core.model.region_logits import RegionLogits


class MSAM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        grid = config.grid
        self.image_encoder = ImageEncoderViT3D(
            img_size=config.img_size,
            patch_size=config.patch_size,
            embed_dim=config.encoder_embed_dim,
            depth=config.encoder_depth,
            num_heads=config.encoder_num_heads,
            mlp_ratio=config.encoder_mlp_ratio,
            out_chans=config.prompt_embed_dim,
            window_size=config.encoder_window_size,
            global_attn_indexes=config.encoder_global_attn_indexes,
            lora_rank=config.lora_rank,
        )
        self.prompt_encoder = PromptEncoder3D(
            embed_dim=config.prompt_embed_dim,
            image_embedding_size=(grid, grid, grid),
            input_image_size=(config.img_size,) * 3,
            mask_in_chans=config.mask_in_chans,
        )
        self.mask_decoder = MaskDecoder3D(
            transformer_dim=config.prompt_embed_dim,
            transformer_depth=config.decoder_depth,
            transformer_heads=config.decoder_num_heads,
            transformer_mlp_dim=config.decoder_mlp_dim,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
        )
        self.mea = (
            MaskEnhancedAdapter(config.prompt_embed_dim, config.mea_num_heads, grid, config.mea_num_blocks)
            if config.mea
            else None
        )
        self.high_res = (
            HighResStem(config.prompt_embed_dim // 8, click_regions=config.click_regions)
            if config.high_res_features
            else None
        )
        self.region_logits = RegionLogits(config.prompt_embed_dim) if config.region_logits else None
        #: Mixed-precision dtype used by :meth:`autocast` on CUDA (None: full precision).
        self.amp_dtype: torch.dtype | None = torch.bfloat16

    # -- identity ---------------------------------------------------------------------------
    @property
    def img_size(self) -> int:
        return self.config.img_size

    @property
    def embedding_channels(self) -> int:
        """Channels of :meth:`encode`'s output (the high-resolution features folded in, if any)."""
        e = self.config.prompt_embed_dim
        return e + self.high_res.channels * FACTOR**3 if self.high_res is not None else e

    @property
    def device(self) -> torch.device:
        return self.image_encoder.pos_embed.device

    @property
    def model_id(self) -> str:
        """Config name + a digest of the weights: equal ids give equal embeddings (cache keys)."""
        if getattr(self, "_model_id", None) is None:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._model_id = f"{self.config.name}-{digest.hexdigest()[:16]}"
        return self._model_id

    def invalidate_model_id(self) -> None:
        """Call after changing weights in place (training) so :attr:`model_id` is recomputed."""
        self._model_id = None

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16/fp16 autocast on CUDA when ``amp_dtype`` is set; a no-op on CPU."""
        if self.device.type == "cuda" and self.amp_dtype is not None:
            return torch.autocast("cuda", dtype=self.amp_dtype)
        return contextlib.nullcontext()

    # -- the three calls --------------------------------------------------------------------
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """``[B, 1, S, S, S]`` normalised crop -> ``[B, E, S/16, S/16, S/16]``."""
        s = self.config.img_size
        if image.ndim != 5 or tuple(image.shape[1:]) != (1, s, s, s):
            raise ValueError(f"encode expects [B, 1, {s}, {s}, {s}], got {tuple(image.shape)}")
        if self.config.input_transform == "signed_log":
            image = torch.sign(image) * torch.log1p(image.abs())
        tokens = self.image_encoder(image)
        if self.high_res is None:
            return tokens
        return torch.cat([tokens, fold(self.high_res(image).to(tokens.dtype))], dim=1)

    def decode(
        self,
        embedding: torch.Tensor,
        points: torch.Tensor,
        labels: torch.Tensor,
        mask_logits: torch.Tensor | None = None,
        cache: DecodeCache | None = None,
    ) -> torch.Tensor:
        """One decoder pass: ``-> logits [B, 1, 32, 32, 32]`` (single-mask output), in the
        network's own units (the pipeline's decision threshold is applied by the
        :class:`~msam_core.pipeline.segmenter.Segmenter`, not here).
        ``cache`` (one per embedding): keeps what later passes on the same embedding would compute
        again, each click's grown region, the adapter's output without a mask prompt and the
        high-resolution stem's prompt-independent part
        (:class:`~msam_core.model.decode_cache.DecodeCache`); the logits are the same."""
        if points.ndim != 3 or points.shape[-1] != 3 or labels.shape != points.shape[:2]:
            raise ValueError(f"points must be [B, N, 3] and labels [B, N]; got {tuple(points.shape)}, {tuple(labels.shape)}")
        if embedding.shape[0] != points.shape[0]:
            raise ValueError("embedding and points must have the same batch size")
        if embedding.ndim != 5 or embedding.shape[1] != self.embedding_channels:
            raise ValueError(f"this {self.config.name} model decodes [B, {self.embedding_channels}, G, G, G] embeddings "
                             f"(from its own encode), got {tuple(embedding.shape)}")
        full = embedding
        high_res = regions = None
        if self.high_res is not None:
            e = self.config.prompt_embed_dim
            embedding, folded = embedding[:, :e], embedding[:, e:]
            prepare = lambda: self.high_res.prepare(unfold(folded))  # noqa: E731
            stem = prepare() if cache is None else cache.kept("stem", full, prepare)
            high_res, regions = self.high_res.prompted(stem, points, labels, self.config.img_size,
                                                       None if cache is None else cache.regions)
        sparse, dense = self.prompt_encoder(points, labels, mask_logits)
        dense = dense.to(embedding.dtype)
        if self.mea is None:
            src = embedding + dense
        elif mask_logits is None and cache is not None:  # the adapter sees no click: the same every pass
            src = cache.kept("adapter", full, lambda: self.mea(embedding, dense))
        else:
            src = self.mea(embedding, dense)
        masks, _, tokens = self.mask_decoder.predict(src, self.prompt_encoder.dense_pe().to(src.dtype), sparse.to(src.dtype), high_res)
        logits = masks[:, :1]
        if self.region_logits is not None:
            logits = logits + self.region_logits(tokens[:, 0], regions).to(masks.dtype)
        return logits

    def refine(
        self,
        embedding: torch.Tensor,
        points: torch.Tensor,
        labels: torch.Tensor,
        mask_logits: torch.Tensor | None = None,
        iterations: int = 1,
    ) -> torch.Tensor:
        """Iterative refinement: each pass feeds the previous logits back as the mask prompt.

        Starts from all-zero logits when ``mask_logits`` is ``None``, as SAM-Med3D's inference
        and M-SAM's training loops do.
        """
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        if mask_logits is None:
            r = self.config.low_res
            mask_logits = embedding.new_zeros((embedding.shape[0], 1, r, r, r))
        cache = DecodeCache()  # the clicks stay: each region is grown once
        for _ in range(iterations):
            mask_logits = self.decode(embedding, points, labels, mask_logits, cache)
        return mask_logits

    # -- training helpers -------------------------------------------------------------------
    def set_trainable(self) -> None:
        """M-SAM's recipe: the image encoder frozen except LoRA; prompt encoder, decoder, MEA (and the
        high-res stem, where the config has one) trained.

        A model without LoRA (``sam_med3d``) trains prompt encoder and decoder only.
        """
        for name, param in self.named_parameters():
            param.requires_grad = not name.startswith("image_encoder.") or ".attn.lora." in name

    def parameter_counts(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, total


def is_added_parameter(name: str) -> bool:
    """Whether a state-dict key belongs to a part SAM-Med3D does not have (LoRA, MEA, the
    high-res stem, the region logits): such parts start fresh from a SAM-Med3D checkpoint and train at the adapter LR."""
    return name.startswith(("mea.", "high_res.", "region_logits.")) or ".attn.lora." in name


def build_model(config: ModelConfig | str) -> MSAM:
    """A randomly initialised model of a named (or given) configuration, in eval mode."""
    if isinstance(config, str):
        config = get_config(config)
    return MSAM(config).eval()
