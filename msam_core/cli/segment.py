"""``msam segment INPUT -o OUT``: segment lesions from clicks, boxes or a prior mask."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from msam_core import BUNDLED_CHECKPOINT
from msam_core.errors import InvalidCheckpoint, InvalidPrompt, UnsupportedRequest
from msam_core.io.volume import Volume

#: Where the bundled default model is expected (shipped as package data).
DEFAULT_CHECKPOINT = BUNDLED_CHECKPOINT
OUTPUTS = (".nii.gz / .nii or .mha / .mhd (mask on the input grid), .png (preview), .dcm (DICOM-SEG) or "
           ".rtstruct.dcm (RTSTRUCT), both for DICOM input only")

EPILOG = """\
coordinates: --space voxel (default) takes array indices i,j,k of INPUT (for NIfTI: nibabel's
  dataobj[i, j, k]); --space RAS / LPS take world millimetres. Negative numbers are fine:
  --point -12.5,30,4 (or --point=-12.5,30,4).
lesions: every prompt belongs to lesion 1 unless it names another (the last field); lesion k
  gets label k in the output. A box centres the crop, adds a positive click at its centre and
  clips the result; --mask PRIOR (same grid as INPUT, or any grid in the same world) is refined
  (label k of PRIOR = lesion k).
examples:
  msam segment ct.nii.gz -o mask.nii.gz --point 210,180,95
  msam segment ct.nii.gz -o a.png --space RAS --point -40.5,22,-110 --point -35,20,-110,0
  msam segment series.zip -o seg.dcm --box 180,150,80,240,210,110 --box 300,200,60,340,240,90,2
  msam segment ct.nii.gz -o mask.nii.gz --point 210,180,95 --report measurements.json
measurements: a table on stdout per lesion (volume, RECIST long/short axis, 3D diameter, mean
  intensity); --report FILE.json writes all of them (docs/measurements.md).
exit codes: 0 done, 2 a mistake in the request (the message says what to fix), 1 other errors."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="segment lesions in a CT/MR volume from clicks, boxes or a prior mask",
        description="Segment lesions in INPUT (NIfTI, NRRD, MetaImage, or DICOM folder/zip) and write OUT "
        f"({OUTPUTS}).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # let "--point -12.5,30,4" through as a value (argparse would read it as an option)
    p._negative_number_matcher = re.compile(r"^-\.?\d[\d.,eE+-]*$")
    p.add_argument("input", type=Path, help="image: .nii/.nii.gz, .nrrd/.nhdr, .mha/.mhd, DICOM folder or .zip")
    p.add_argument("-o", "--output", type=Path, required=True, help=f"result: {OUTPUTS}")
    p.add_argument("--point", action="append", default=[], metavar="X,Y,Z[,LABEL[,LESION]]",
                   help="a click; LABEL 1 = lesion (default), 0 = not lesion; repeatable")
    p.add_argument("--box", action="append", default=[], metavar="X0,Y0,Z0,X1,Y1,Z1[,LESION]",
                   help="two opposite corners of a box around a lesion; repeatable")
    p.add_argument("--line", action="append", default=[], metavar="X0,Y0,Z0,X1,Y1,Z1[,LESION]",
                   help="a RECIST line: the two endpoints of a lesion's long axis (in voxel space both in one slice); "
                        "it becomes positive clicks on the line; repeatable")
    p.add_argument("--space", default="voxel", help="space of --point/--box: voxel (default), LPS or RAS")
    p.add_argument("--mask", type=Path, default=None, metavar="PRIOR", help="existing mask to refine")
    p.add_argument("--series-uid", default=None, metavar="UID",
                   help="DICOM input holding several image series: the SeriesInstanceUID of the one to segment")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help=f"model weights (default: the bundled model, {DEFAULT_CHECKPOINT.name})")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the network runs")
    p.add_argument("--iterations", type=int, default=1,
                   help="decoder passes, each fed the previous mask (default 1)")
    p.add_argument("--report", type=Path, default=None, metavar="FILE.json",
                   help="also write every lesion's measurements (volume, RECIST long/short axis with endpoints in "
                        "LPS mm, 3D diameter, centroid, intensity statistics, surface area, sphericity) as JSON")
    p.add_argument("--max-windows", type=int, default=8,
                   help="most 128^3 windows per lesion when a lesion outgrows one crop (default 8)")
    p.set_defaults(func=run)


def _numbers(text: str, what: str, counts: tuple[int, ...]) -> list[float]:
    parts = [t.strip() for t in text.split(",")]
    try:
        values = [float(t) for t in parts]
    except ValueError:
        raise InvalidPrompt(f"{what} {text!r}: expected comma-separated numbers") from None
    if len(values) not in counts:
        raise InvalidPrompt(f"{what} {text!r}: expected {' or '.join(map(str, counts))} numbers, got {len(values)}")
    if not np.all(np.isfinite(values)):
        raise InvalidPrompt(f"{what} {text!r}: coordinates must be finite numbers")
    return values


def _integer(value: float, what: str) -> int:
    if value != int(value):
        raise InvalidPrompt(f"{what} must be a whole number, got {value}")
    return int(value)


def parse_point(text: str, space: str):
    """``"X,Y,Z[,LABEL[,LESION]]"`` -> :class:`~msam_core.pipeline.prompts.Point`."""
    from msam_core.pipeline.prompts import Point

    v = _numbers(text, "--point", (3, 4, 5))
    label = _integer(v[3], "--point LABEL") if len(v) > 3 else 1
    lesion = _integer(v[4], "--point LESION") if len(v) > 4 else 1
    return Point(xyz=(v[0], v[1], v[2]), label=label, space=space, lesion=lesion)  # type: ignore[arg-type]


def parse_box(text: str, space: str):
    """``"X0,Y0,Z0,X1,Y1,Z1[,LESION]"`` -> :class:`~msam_core.pipeline.prompts.Box`."""
    from msam_core.pipeline.prompts import Box

    v = _numbers(text, "--box", (6, 7))
    lesion = _integer(v[6], "--box LESION") if len(v) > 6 else 1
    return Box(corner0=(v[0], v[1], v[2]), corner1=(v[3], v[4], v[5]), space=space, lesion=lesion)  # type: ignore[arg-type]


def parse_line(text: str, space: str):
    """``"X0,Y0,Z0,X1,Y1,Z1[,LESION]"`` -> :class:`~msam_core.pipeline.lines.Line`."""
    from msam_core.pipeline.lines import Line

    v = _numbers(text, "--line", (6, 7))
    lesion = _integer(v[6], "--line LESION") if len(v) > 6 else 1
    return Line(start=(v[0], v[1], v[2]), end=(v[3], v[4], v[5]), space=space, lesion=lesion)  # type: ignore[arg-type]


def output_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".nii.gz", ".nii")):
        return "nifti"
    if name.endswith((".mha", ".mhd")):
        return "metaimage"
    if name.endswith(".png"):
        return "png"
    if name.endswith(".rtstruct.dcm"):
        return "rtstruct"
    if name.endswith(".dcm"):
        return "seg"
    raise UnsupportedRequest(f"cannot write {path.name}: the output must end in {OUTPUTS}")


def resolve_checkpoint(path: Path | None) -> Path:
    if path is None:
        if not DEFAULT_CHECKPOINT.is_file():
            raise InvalidCheckpoint(
                f"the bundled default model is not installed (expected {DEFAULT_CHECKPOINT}); "
                "pass weights with --checkpoint PATH (a SAM-Med3D / M-SAM .pth or msam .safetensors file)"
            )
        return DEFAULT_CHECKPOINT
    if not path.is_file():
        raise InvalidCheckpoint(f"checkpoint {path} does not exist")
    return path


def load_prior(path: Path, volume: Volume) -> np.ndarray:
    """A prior mask on ``volume``'s grid (resampled, nearest, when it has another grid)."""
    from msam_core.io.load import load_volume
    from msam_core.pipeline.resample import IndexImage

    prior = load_volume(path)
    labels = np.rint(np.asarray(prior.array, dtype=np.float32)).astype(np.int32)
    if labels.min() < 0 or labels.max() > 255:
        raise InvalidPrompt(f"prior mask {path.name}: labels must be 0..255")
    if prior.shape == volume.shape and np.allclose(prior.affine, volume.affine, atol=1e-3):
        return labels.astype(np.uint8)
    dst_to_src = np.linalg.inv(prior.affine) @ volume.affine
    return IndexImage(labels.astype(np.uint8)).resample(dst_to_src, volume.shape, "nearest",
                                                        0.0, dtype=np.uint8)


def run(args: argparse.Namespace) -> int:
    from msam_core.io.load import load_volume
    from msam_core.pipeline.prompts import resolve_prompts
    from msam_core.pipeline.segmenter import MAX_ITERATIONS

    kind = output_kind(args.output)
    if not args.output.parent.resolve().is_dir():
        raise UnsupportedRequest(f"output folder {args.output.parent} does not exist")
    space = next((s for s in ("voxel", "LPS", "RAS") if s.lower() == args.space.lower()), None)
    if space is None:
        raise InvalidPrompt(f"--space {args.space!r}: use voxel, LPS or RAS")
    points = [parse_point(t, space) for t in args.point]
    boxes = [parse_box(t, space) for t in args.box]
    lines = [parse_line(t, space) for t in args.line]
    if not 1 <= args.iterations <= MAX_ITERATIONS:
        raise InvalidPrompt(f"--iterations must be between 1 and {MAX_ITERATIONS}, got {args.iterations}")
    if not 1 <= args.max_windows <= 64:
        raise InvalidPrompt(f"--max-windows must be between 1 and 64, got {args.max_windows}")
    if args.report is not None and not args.report.parent.resolve().is_dir():
        raise UnsupportedRequest(f"report folder {args.report.parent} does not exist")
    if not points and not boxes and not lines and args.mask is None:
        raise InvalidPrompt("nothing to segment: give --point, --box, --line or --mask")
    checkpoint = resolve_checkpoint(args.checkpoint)

    volume = load_volume(args.input, series_uid=args.series_uid)
    if kind in ("seg", "rtstruct") and volume.meta.get("format") != "dicom":
        what = "DICOM-SEG" if kind == "seg" else "RTSTRUCT"
        raise UnsupportedRequest(
            f"{what} output needs a DICOM input, but {args.input.name} is "
            f"{volume.meta.get('format', 'not DICOM')}; write .nii.gz or .png instead"
        )
    prior = load_prior(args.mask, volume) if args.mask is not None else None
    from msam_core.pipeline.lines import line_as_points

    line_points = [p for line in lines for p in line_as_points(line, volume)]
    lesions = resolve_prompts(volume, line_points + points, boxes, prior)  # a line's midpoint centres its crop

    from msam_core.checkpoints import load_model
    from msam_core.pipeline.segmenter import Segmenter

    model = load_model(checkpoint, device=args.device)
    segmenter = Segmenter(model.network, model.options, device=args.device, max_windows=args.max_windows)
    result = segmenter.segment_lesions(volume, lesions, iterations=args.iterations)

    if kind == "nifti":
        from msam_core.io.nifti import save_mask_nifti

        save_mask_nifti(result.labels, volume, args.output)
    elif kind == "metaimage":
        from msam_core.io.metaimage import save_mask_metaimage

        save_mask_metaimage(result.labels, volume, args.output)
    elif kind == "png":
        from msam_core.io.preview import save_preview

        save_preview(volume, result.labels, args.output)
    elif kind == "rtstruct":
        from msam_core.io.rtstruct import write_rtstruct

        write_rtstruct(result.labels, volume, args.output, algorithm_name=model.name, algorithm_version=model.version)
    else:
        from msam_core.io.seg import write_seg

        write_seg(result.labels, volume, args.output, algorithm_name=model.name, algorithm_version=model.version)
    if result.intensity is not None:
        print(f"intensities: {result.intensity.describe()}", file=sys.stderr)
    voxel_ml = float(abs(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
    for lesion in result.lesions:
        note = " (window limit reached: raise --max-windows)" if lesion.stopped_at_limit else ""
        print(f"lesion {lesion.lesion}: {lesion.voxels} voxels, {lesion.voxels * voxel_ml:.2f} ml, "
              f"{lesion.windows} window(s){note}", file=sys.stderr)
    from msam_core.measure import measure_lesion, table

    hounsfield = result.intensity.hu if result.intensity is not None else None
    measured = {lesion.lesion: measure_lesion(result.labels == lesion.lesion, volume, hounsfield=hounsfield)
                for lesion in result.lesions}
    print(table(measured))
    if args.report is not None:
        from msam_core.pipeline.lines import resolve_line

        line_mm = {line.lesion: float(np.linalg.norm(np.subtract(*resolve_line(line, volume)))) for line in lines}
        doc = {"input": args.input.name, "output": args.output.name, "coordinates": "LPS mm; voxel = (i, j, k) of INPUT",
               "lesions": [{"lesion": label, "measurements": m.to_json() if m is not None else None,
                            **({"line_length_mm": round(line_mm[label], 2)} if label in line_mm else {})}
                           for label, m in sorted(measured.items())]}
        args.report.write_text(json.dumps(doc, indent=1))
        print(f"wrote {args.report}", file=sys.stderr)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0
