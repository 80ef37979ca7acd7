"""The network: SAM-Med3D + M-SAM's LoRA and Mask-Enhanced Adapter.

One module per part: image_encoder, prompt_encoder, transformer + mask_decoder, lora, mea;
msam.py assembles them; configs.py names the sizes.
"""

from msam_core.model.configs import CONFIGS, ModelConfig, get_config
from msam_core.model.msam import MSAM, build_model, is_added_parameter

__all__ = ["CONFIGS", "MSAM", "ModelConfig", "build_model", "get_config", "is_added_parameter"]
