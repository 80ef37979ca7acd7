"""``msam convert IN OUT``: any supported checkpoint -> msam's safetensors format (or back)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a SAM-Med3D / M-SAM / msam checkpoint",
        description="Convert a checkpoint. OUT ending in .safetensors gets msam's format; "
        "OUT ending in .pth gets an upstream layout (--layout).",
    )
    p.add_argument("input", type=Path, help="checkpoint to read (.pth/.pt or .safetensors)")
    p.add_argument("output", type=Path, help="file to write (.safetensors, or .pth with --layout)")
    p.add_argument("--config", default=None, help="model config name when the file cannot tell (sam_med3d, msam, msam_small)")
    p.add_argument("--layout", choices=["sam_med3d", "m_sam"], default=None, help="upstream key layout for a .pth output")
    p.add_argument("--allow-unsafe-pickle", action="store_true", help="allow full unpickling of a trusted file (runs code!)")
    p.set_defaults(func=run)


def _changed(options) -> str:  # noqa: ANN001 - PipelineOptions
    """``options``' fields that differ from the defaults, as ``name=value`` (empty: none)."""
    from msam_core.pipeline.options import PipelineOptions

    default = PipelineOptions().to_dict()
    return ", ".join(f"{k}={v}" for k, v in options.to_dict().items() if default.get(k) != v)


def run(args: argparse.Namespace) -> int:
    import torch

    from msam_core.checkpoints import export_state_dict, load_model, save_checkpoint
    from msam_core.errors import UnsupportedRequest

    if not args.output.parent.is_dir():
        raise UnsupportedRequest(f"output folder {args.output.parent} does not exist")
    loaded = load_model(args.input, config=args.config, allow_unsafe_pickle=args.allow_unsafe_pickle)
    model = loaded.network
    suffix = args.output.suffix.lower()
    if suffix == ".safetensors":
        if args.layout:
            raise UnsupportedRequest("--layout applies to .pth outputs only; .safetensors is always msam's layout")
        provenance = {"converted_from": args.input.name, **loaded.meta}
        for key in ("format", "config", "pipeline"):  # stated by the new file itself
            provenance.pop(key, None)
        save_checkpoint(model, args.output, provenance=provenance, options=loaded.options)
    elif suffix in (".pth", ".pt"):
        layout = args.layout or ("m_sam" if model.mea is not None else "sam_med3d")
        torch.save({"model_state_dict": export_state_dict(model, layout)}, args.output)
        changed = _changed(loaded.options)
        if changed:  # upstream's training checkpoints hold the network's weights only
            print(f"msam convert: note: {args.output.name} holds the network only; the pipeline options "
                  f"{args.input.name} was calibrated with ({changed}) have no place in a .pth. "
                  "Run the model from its .safetensors: one converted back from this file runs with the "
                  "default options and gives other masks", file=sys.stderr)
    else:
        raise UnsupportedRequest(f"unknown output type {args.output.name!r}: use .safetensors or .pth")
    trainable, total = model.parameter_counts()
    print(f"wrote {args.output} ({model.config.name}, {total / 1e6:.1f}M parameters)")
    return 0
