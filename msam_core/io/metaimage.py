"""MetaImage (``.mha``, or ``.mhd`` + ``.raw`` / ``.zraw``) in and out, through SimpleITK.

SimpleITK (ITK's MetaIO) reads the header and the pixels and reports the geometry in LPS (ITK's
world); :func:`read_metaimage` converts it to the RAS affine of
:class:`~msam_core.io.volume.Volume` once, here. Masks are written back with the source's own
spacing, origin and direction (:func:`save_mask_metaimage`), so they overlay the input exactly.

An uploaded MetaImage is hostile until checked, and MetaIO offers two ways in that the service
must close: ``ElementDataFile`` may name any file on the server (an absolute path, ``..``, a
``LIST`` of files or a printf pattern), and ``CompressedData`` is inflated whole into memory.
The functions below therefore look at the few header lines that decide *where* the data lies
and *whether* it is compressed (``ElementDataFile``, ``CompressedData``, ``HeaderSize``) before
SimpleITK sees the file; everything else in the header (sizes, element type, geometry) is
SimpleITK's to read. :func:`join_metaimage` turns a header and its uploaded data file into one
``.mha`` (the data inside it); :func:`inflate_metaimage` rewrites compressed data as raw data,
expanding no more than the header declares (the same treatment NRRD gets in
:func:`msam_core.io.nrrd.decompress_nrrd`).
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msam_core.errors import InvalidVolume
from msam_core.io.bounded import decompress_to
from msam_core.io.nifti import spatial_shape
from msam_core.io.volume import LPS_TO_RAS, Volume

SUFFIXES = (".mha", ".mhd")
_MAX_HEADER_BYTES = 1 << 20
_COPY_CHUNK = 1 << 20
#: MetaIO's modality field -> the DICOM modality msam uses.
_MODALITIES = {"MET_MOD_CT": "CT", "MET_MOD_MR": "MR", "MET_MOD_NM": "NM", "MET_MOD_US": "US"}


@dataclass(frozen=True)
class MetaHeader:
    """The lines of a MetaImage header that decide where its data lies.

    Attributes:
        lines: every header line before ``ElementDataFile`` (which MetaIO requires to be last),
            line endings removed.
        data_file: the value of ``ElementDataFile`` (``LOCAL``: the data follows the header).
        compressed: ``CompressedData = True``.
        data_offset: where local data starts (the byte after the ``ElementDataFile`` line).
    """

    lines: tuple[bytes, ...]
    data_file: str
    compressed: bool
    data_offset: int

    @property
    def local(self) -> bool:
        return self.data_file.lower() == "local"


def _key(line: bytes) -> str:
    return line.partition(b"=")[0].strip().decode("latin-1").lower()


def _value(line: bytes) -> str:
    return line.partition(b"=")[2].strip().decode("latin-1")


def read_meta_header(path: str | Path, name: str = "the MetaImage header") -> MetaHeader:
    """The header of a ``.mha`` / ``.mhd`` file, up to and including its ``ElementDataFile``
    line (at most 1 MB); the pixel data is not read.

    Raises:
        InvalidVolume: no ``ElementDataFile`` line within 1 MB (not a MetaImage header), a line
            that is not ``Key = Value``, or a ``HeaderSize`` (bytes to skip in the data file,
            which msam does not follow).
    """
    lines: list[bytes] = []
    size = 0
    with open(path, "rb") as f:
        while True:
            line = f.readline(_MAX_HEADER_BYTES + 1)
            size += len(line)
            if not line or size > _MAX_HEADER_BYTES:
                raise InvalidVolume(f"{name} has no ElementDataFile line within {_MAX_HEADER_BYTES // 1024} KB; "
                                    "is this a MetaImage (.mha / .mhd) file?")
            text = line.rstrip(b"\r\n")
            if not text.strip():
                continue
            if b"=" not in text:
                raise InvalidVolume(f"{name} has a line that is not 'Key = Value'; is this a MetaImage file?")
            key = _key(text)
            if key == "elementdatafile":
                break
            if key == "headersize" and _value(text) not in ("", "0"):
                raise InvalidVolume(f"{name} sets HeaderSize = {_value(text)[:20]} (bytes to skip before the data); "
                                    "re-save the image without it, e.g. with SimpleITK: "
                                    "sitk.WriteImage(sitk.ReadImage('in.mhd'), 'out.mha')")
            lines.append(text)
    compressed = any(_key(x) == "compresseddata" and _value(x)[:1] in ("T", "t", "1") for x in lines)
    return MetaHeader(lines=tuple(lines), data_file=_value(text), compressed=compressed, data_offset=size)


def check_data_file_name(header: MetaHeader, name: str = "the MetaImage header") -> str:
    """The data-file name of ``header`` when it is a plain file name that can sit beside the
    header; ``"LOCAL"`` for data inside the header's file.

    Raises:
        InvalidVolume: an empty name, a path (separators, ``..``, a drive), a ``LIST`` of slice
            files or a numbered pattern: all of these reach files outside what was uploaded.
    """
    value = header.data_file
    if header.local:
        return "LOCAL"
    shown = value[:80]
    if not value:
        raise InvalidVolume(f"{name} has an empty ElementDataFile; it must be LOCAL or the name of the data file")
    if value.upper().startswith("LIST") or len(value.split()) > 1 or "%" in value:
        raise InvalidVolume(f"{name} spreads its data over several files (ElementDataFile = {shown!r}); "
                            "upload one image with one data file, e.g. re-saved as .mha with SimpleITK")
    if ("/" in value or "\\" in value or value in (".", "..") or "\x00" in value
            or re.match(r"^[A-Za-z]:", value)):
        raise InvalidVolume(f"{name} points its data at {shown!r}, a path outside the upload; the data file must "
                            "be named without folders and uploaded beside the header (two files, or a zip)")
    return value


def header_facts(header: MetaHeader) -> tuple[tuple[int, ...], int, int]:
    """``(sizes, components per voxel, bytes per component)`` as SimpleITK reads the header
    (``DimSize``, ``ElementNumberOfChannels``, ``ElementType``), without any pixel data.

    Raises:
        InvalidVolume: SimpleITK cannot read the header.
    """
    import SimpleITK as sitk

    with tempfile.TemporaryDirectory(prefix="msam-mha-") as tmp:
        only = Path(tmp) / "header.mha"
        only.write_bytes(b"\n".join(header.lines) + b"\nElementDataFile = LOCAL\n")
        try:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(only))
            reader.SetImageIO("MetaImageIO")
            reader.ReadImageInformation()
            sizes = tuple(int(n) for n in reader.GetSize())
            components = int(reader.GetNumberOfComponents())
            probe = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), components)
            itemsize = int(sitk.GetArrayViewFromImage(probe).dtype.itemsize)
        except Exception as exc:  # SimpleITK raises RuntimeError with the file's path in it
            raise InvalidVolume(f"the MetaImage header cannot be read ({type(exc).__name__}); check DimSize, "
                                "ElementType and NDims") from exc
    return sizes, components, itemsize


def declared_bytes(header: MetaHeader) -> tuple[int, int]:
    """``(voxels, bytes of pixel data)`` that ``header`` declares."""
    sizes, components, itemsize = header_facts(header)
    voxels = math.prod(sizes)
    return voxels, voxels * components * itemsize


def _local_header(header: MetaHeader, compressed: bool) -> bytes:
    """``header``'s lines with the data inside the file (``ElementDataFile = LOCAL``); without
    compression the ``CompressedData*`` lines go."""
    lines = [x for x in header.lines if compressed or _key(x) not in ("compresseddata", "compresseddatasize")]
    if not compressed:
        lines.append(b"CompressedData = False")
    return b"\n".join(lines) + b"\nElementDataFile = LOCAL\n"


def join_metaimage(files: list[tuple[str, Path]], dst: str | Path) -> Path:
    """One ``.mha`` at ``dst`` from an upload's files ``(client name, path)``: a ``.mhd`` header
    and the data file it names (compressed data stays compressed), or a single ``.mha`` / ``.mhd``
    with its data inside. Client names are compared with the header's ``ElementDataFile``, never
    used as paths.

    Raises:
        InvalidVolume: not exactly one header; a header whose data file is unsafe
            (:func:`check_data_file_name`) or not among the files; files besides the header and
            its data file.
    """
    dst = Path(dst)
    headers = [(n, p) for n, p in files if n.lower().endswith(SUFFIXES)]
    if len(headers) != 1:
        raise InvalidVolume(f"{len(headers)} MetaImage headers (.mhd / .mha) among {len(files)} files; send one "
                            "image: its .mhd with its data file, or one .mha")
    _, header_path = headers[0]
    header = read_meta_header(header_path)
    name = check_data_file_name(header)
    others = [(n, p) for n, p in files if p != header_path]
    if header.local:
        if others:
            raise InvalidVolume(f"the MetaImage holds its data (ElementDataFile = LOCAL), but {len(others)} more "
                                "file(s) came with it; send the image alone")
        shutil.copyfile(header_path, dst)
        return dst
    matches = [p for n, p in others if Path(n.replace("\\", "/")).name == name]
    if not matches:
        raise InvalidVolume(f"the MetaImage header names its data file {name!r}, which is not in the upload; send "
                            "the .mhd and that file together (two files in the field 'image', or one zip)")
    if len(others) != 1:
        raise InvalidVolume(f"{len(files)} files uploaded with a MetaImage header; send only the .mhd and its data "
                            f"file {name!r}")
    with open(dst, "wb") as out, open(matches[0], "rb") as data:
        out.write(_local_header(header, header.compressed))
        shutil.copyfileobj(data, out, _COPY_CHUNK)
    return dst


def inflate_metaimage(src: str | Path, dst: str | Path, max_bytes: int) -> bool:
    """Rewrite a ``.mha`` whose data is compressed (``CompressedData = True``, zlib) as the same
    image with raw data, expanding no more than the header declares (``DimSize`` x channels x
    the element's size) and one byte more, to tell a stream that goes on; the rest is never
    decompressed. SimpleITK inflates the whole stream into memory, so a small file could
    otherwise claim a few voxels and hold gigabytes.

    Returns False (``dst`` not written) when the data is not compressed.

    Raises:
        InvalidVolume: the data lies in another file; declared data larger than ``max_bytes``;
            a stream that is corrupt, ends before the declared data or goes on after it.
    """
    header = read_meta_header(src)
    if not header.local:
        raise InvalidVolume("the MetaImage names a separate data file; send its .mhd with that file")
    if not header.compressed:
        return False
    _, need = declared_bytes(header)
    if need > max_bytes:
        raise InvalidVolume(f"the MetaImage data would decode to {need // 2**20} MB, more than the limit of "
                            f"{max_bytes // 2**20} MB (MSAM_MAX_DECOMPRESSED_MB)")
    with open(src, "rb") as f, open(dst, "wb") as out:
        f.seek(header.data_offset)
        out.write(_local_header(header, compressed=False))
        written, _ = decompress_to(f, out, "zlib", need + 1, "the MetaImage data")
    if written < need:
        raise InvalidVolume(f"the MetaImage data ends after {written} of the {need} bytes its header declares; "
                            "is the file complete?")
    if written > need:
        raise InvalidVolume(f"the MetaImage's compressed data holds more than the {need} bytes its header declares "
                            "(DimSize x ElementType); the header and the data do not match")
    return True


def _lps_to_ras_affine(spacing: np.ndarray, direction: np.ndarray, origin: np.ndarray) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing  # column n: one step along array axis n, in LPS mm
    affine[:3, 3] = origin
    return LPS_TO_RAS @ affine


def read_metaimage(path: str | Path) -> Volume:
    """Read a ``.mha`` / ``.mhd`` (with its data file beside it) into a :class:`Volume`.

    SimpleITK's index ``(i, j, k)`` (``i`` fastest) is the array index ``[i, j, k]``; its
    direction, spacing and origin are LPS and become the RAS affine here. Dimensions beyond the
    third of size 1 are dropped; a real series and a multi-component image are refused. The
    modality comes from the header's ``Modality`` (``MET_MOD_CT`` -> CT, ...) when it is set.
    """
    import SimpleITK as sitk

    path = Path(path)
    try:
        image = sitk.ReadImage(str(path), imageIO="MetaImageIO")
        modality = image.GetMetaData("Modality") if image.HasMetaDataKey("Modality") else ""
        components = image.GetNumberOfComponentsPerPixel()
        sizes = tuple(int(n) for n in image.GetSize())
        ndim = image.GetDimension()
        spacing = np.asarray(image.GetSpacing(), dtype=np.float64)[:3]
        direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(ndim, ndim)[:3, :3]
        origin = np.asarray(image.GetOrigin(), dtype=np.float64)[:3]
        if components != 1:
            raise InvalidVolume(f"{path.name} has {components} components per voxel; msam segments a scalar image "
                                "(one value per voxel): save one channel")
        shape = spatial_shape(path.name, sizes)
        array = sitk.GetArrayFromImage(image)  # index order reversed: [..., k, j, i]
    except InvalidVolume:
        raise
    except Exception as exc:  # SimpleITK raises RuntimeError with server paths in the message
        raise InvalidVolume(f"cannot read {path.name} as MetaImage ({type(exc).__name__}); is the file complete, "
                            "and its data file beside it?") from exc
    array = np.ascontiguousarray(array.reshape(shape[::-1]).transpose(2, 1, 0))
    if array.dtype in (np.float64, np.float16):
        array = array.astype(np.float32)
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8)
    meta = {"format": "metaimage", "metaimage_geometry": {
        "spacing": spacing.tolist(), "direction": direction.ravel().tolist(), "origin": origin.tolist()}}
    return Volume(array=array, affine=_lps_to_ras_affine(spacing, direction, origin),
                  modality=_MODALITIES.get(modality.strip()), meta=meta)


def save_mask_metaimage(mask: np.ndarray, like: Volume, path: str | Path) -> Path:
    """Write a label mask (``uint8``, shape ``like.shape``) as MetaImage on ``like``'s grid:
    ``.mha`` (one file), or ``.mhd`` with a ``.zraw`` beside it; zlib-compressed.

    A ``like`` read from MetaImage gives its spacing, direction and origin back exactly as read;
    any other ``like`` has them computed from its RAS affine (LPS for ITK).
    """
    import SimpleITK as sitk

    mask = np.asarray(mask)
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the image shape {like.shape}")
    if mask.size and int(mask.max(initial=0)) > 255:
        raise ValueError("mask labels must fit in uint8 (at most 255 lesions)")
    path = Path(path)
    geometry = like.meta.get("metaimage_geometry")
    if geometry:
        spacing, direction, origin = geometry["spacing"], geometry["direction"], geometry["origin"]
    else:
        lps = LPS_TO_RAS @ np.asarray(like.affine, dtype=np.float64)
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        direction = (lps[:3, :3] / spacing).ravel().tolist()
        spacing, origin = spacing.tolist(), lps[:3, 3].tolist()
    image = sitk.GetImageFromArray(np.ascontiguousarray(mask.astype(np.uint8).transpose(2, 1, 0)))
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection([float(v) for v in direction])
    image.SetOrigin([float(v) for v in origin])
    sitk.WriteImage(image, str(path), useCompression=True)
    return path
