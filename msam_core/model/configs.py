"""Named model configurations, each named for the network it builds.

- ``sam_med3d``: SAM-Med3D ``vit_b_ori`` exactly (loads ``sam_med3d.pth`` / ``sam_med3d_turbo.pth``).
- ``msam``: ``sam_med3d`` + LoRA (rank 4, q and v of every encoder block) + Mask-Enhanced Adapter.
- ``msam_small``: the same code with reduced widths and depths, for CPU training and tests;
  trained from scratch, so it also takes stride-4 image features into its decoder
  (``high_res_features``, see :mod:`msam_core.model.high_res`).
- ``msam_small_regions``: the bundled model's network: ``msam_small`` on a ``signed_log``
  input, with intensity regions grown from the clicks in its decoder
  (:mod:`msam_core.model.click_regions`) and added to its logits
  (:mod:`msam_core.model.region_logits`). The bundled file predates this name and states these
  fields under the name ``msam_small``; a checkpoint always loads with the config it states.

A config describes the network only (it decides the weights' shapes). What the pipeline does
around the network - decision threshold, stable-region prior, boundary refinement, coarse view - is
:class:`msam_core.pipeline.options.PipelineOptions`, stored beside it in a checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


INPUT_TRANSFORMS = ("none", "signed_log")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    img_size: int = 128
    patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_mlp_ratio: float = 4.0
    encoder_window_size: int = 14
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    prompt_embed_dim: int = 384
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 2048
    iou_head_hidden_dim: int = 256
    lora_rank: int = 0
    mea: bool = False
    mea_num_heads: int = 6
    mea_num_blocks: int = 1
    #: Applied to the normalised crop before the patch embedding: ``"none"`` (SAM-Med3D) or
    #: ``"signed_log"`` (``sign(x) * log1p(|x|)``: CT crops z-scored over voxels > 0 HU reach
    #: large magnitudes where air is; this keeps every contrast but compresses that range).
    input_transform: str = "none"
    #: A convolutional stem whose stride-4 features enter the decoder's last upscaling stage
    #: (:mod:`msam_core.model.high_res`); not part of SAM-Med3D or M-SAM.
    high_res_features: bool = False
    #: With ``high_res_features``: intensity regions grown from the clicks enter the same stage
    #: (:mod:`msam_core.model.click_regions`); not part of SAM-Med3D or M-SAM.
    click_regions: bool = False
    #: With ``click_regions``: the regions also add to the logits directly, weighted per prompt
    #: (:mod:`msam_core.model.region_logits`); not part of SAM-Med3D or M-SAM.
    region_logits: bool = False

    def __post_init__(self) -> None:
        if self.click_regions and not self.high_res_features:
            raise ValueError("click_regions needs high_res_features (the regions enter through the high-res stem)")
        if self.region_logits and not self.click_regions:
            raise ValueError("region_logits needs click_regions (it weights the regions grown from the clicks)")
        if self.input_transform not in INPUT_TRANSFORMS:
            raise ValueError(f"input_transform must be one of {INPUT_TRANSFORMS}, got {self.input_transform!r}")

    @property
    def grid(self) -> int:
        """Side of the image-embedding token grid (8)."""
        return self.img_size // self.patch_size

    @property
    def low_res(self) -> int:
        """Side of the decoder's logits (32)."""
        return self.grid * 4

    def to_dict(self) -> dict:
        d = asdict(self)
        d["encoder_global_attn_indexes"] = list(self.encoder_global_attn_indexes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["encoder_global_attn_indexes"] = tuple(d.get("encoder_global_attn_indexes", ()))
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**d)


SAM_MED3D = ModelConfig(name="sam_med3d")
MSAM = replace(SAM_MED3D, name="msam", lora_rank=4, mea=True)
MSAM_SMALL = ModelConfig(
    name="msam_small",
    encoder_embed_dim=192,
    encoder_depth=4,
    encoder_num_heads=6,
    encoder_global_attn_indexes=(1, 3),
    prompt_embed_dim=96,
    decoder_mlp_dim=512,
    iou_head_hidden_dim=64,
    lora_rank=4,
    mea=True,
    high_res_features=True,
)

MSAM_SMALL_REGIONS = replace(MSAM_SMALL, name="msam_small_regions", input_transform="signed_log",
                             click_regions=True, region_logits=True)

CONFIGS: dict[str, ModelConfig] = {c.name: c for c in (SAM_MED3D, MSAM, MSAM_SMALL, MSAM_SMALL_REGIONS)}


def get_config(name: str) -> ModelConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; choose one of {sorted(CONFIGS)}") from None
