"""Size limits checked on an upload's *headers*, before any pixel data is decoded, and
compressed data expanded only as far as those headers declare.

A 2 KB file may claim 100000^3 voxels (a NIfTI or NRRD header, a DICOM's Rows x Columns x
frames), and a small gzip or zip may expand a thousandfold. :func:`check_upload` reads only the
headers and refuses what exceeds ``MSAM_MAX_VOXELS`` / ``MSAM_MAX_DECOMPRESSED_MB`` with an
:class:`~msam_core.errors.InvalidVolume` (a 4xx). Every compressed form the service accepts is
bounded while it streams:

* zip: extracted here, into the upload's staging folder under generated names, with the same
  limits and a compression-ratio limit (:func:`~msam_core.io.dicom_zip.extract_zip`);
* NRRD with gzip / bzip2 data: rewritten as raw NRRD, expanding only the bytes its header
  declares (:func:`~msam_core.io.nrrd.decompress_nrrd`); pynrrd would expand the whole stream;
* DICOM in Deflated Explicit VR Little Endian: rewritten as Explicit VR Little Endian within the
  limit (:func:`~msam_core.io.dicom.inflate_deflated`); pydicom would inflate it all first;
* MetaImage with ``CompressedData``: rewritten as raw ``.mha``, expanding only the bytes its
  header declares (:func:`~msam_core.io.metaimage.inflate_metaimage`); SimpleITK would inflate
  the whole stream. Its ``ElementDataFile`` must be ``LOCAL`` by then (a ``.mhd`` and its data
  file were joined into one ``.mha`` by ``arrange_upload``, a zip's are joined here), so no
  header can make the decoder open a file outside the upload;
* gzip'd NIfTI: nibabel reads exactly the bytes the (checked) header declares and never
  decompresses the rest, so it needs no rewrite.

The decoders only ever see data whose size is known to fit, and the rewritten file is the one
stored, so the workers decode the same bounded file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from msam_core.errors import InvalidVolume
from msam_core.io.dicom import inflate_deflated
from msam_core.io.dicom_zip import ZipLimits, extract_zip
from msam_core.io.metaimage import (SUFFIXES as METAIMAGE_SUFFIXES, check_data_file_name, declared_bytes,
                                    inflate_metaimage, join_metaimage, read_meta_header)
from msam_core.io.nrrd import decompress_nrrd

if TYPE_CHECKING:
    from msam_service.settings import Settings


@dataclass(frozen=True)
class UploadLimits:
    max_voxels: int
    max_bytes: int  # decompressed
    max_files: int

    @classmethod
    def from_settings(cls, settings: Settings) -> UploadLimits:
        return cls(max_voxels=settings.max_voxels, max_bytes=settings.max_decompressed_mb * 2**20,
                   max_files=settings.max_files)


def _check(voxels: int, nbytes: int, what: str, limits: UploadLimits) -> None:
    if voxels > limits.max_voxels:
        raise InvalidVolume(f"{what}: {voxels} voxels declared, more than the limit of {limits.max_voxels} "
                            "(MSAM_MAX_VOXELS); crop or resample the image")
    if nbytes > limits.max_bytes:
        raise InvalidVolume(f"{what}: would decode to {nbytes // 2**20} MB, more than the limit of "
                            f"{limits.max_bytes // 2**20} MB (MSAM_MAX_DECOMPRESSED_MB)")


def _nifti(path: Path, limits: UploadLimits) -> None:
    import nibabel as nib

    try:
        header = nib.load(str(path)).header  # lazy: the header only
        shape = tuple(int(n) for n in header.get_data_shape())
        itemsize = int(header.get_data_dtype().itemsize)
    except Exception as exc:  # nibabel raises many types on broken headers
        raise InvalidVolume(f"the NIfTI header cannot be read ({type(exc).__name__}); is the file complete?") from exc
    voxels = math.prod(shape) if shape else 0
    _check(voxels, voxels * itemsize, f"the NIfTI header ({'x'.join(map(str, shape))})", limits)


def _nrrd(path: Path, limits: UploadLimits) -> None:
    import nrrd

    try:
        header = nrrd.read_header(str(path))
        if any(k.replace(" ", "").lower() == "datafile" for k in header):
            raise InvalidVolume("the NRRD header names a separate data file; upload a single .nrrd with the "
                                "data attached (detached headers could point at server files)")
        sizes = [int(n) for n in header["sizes"]]
        _check(math.prod(sizes), 0, f"the NRRD header ({'x'.join(map(str, sizes))})", limits)
        itemsize = int(nrrd.reader._determine_datatype(header).itemsize)  # noqa: SLF001 - pynrrd's own mapping
    except InvalidVolume:
        raise
    except Exception as exc:
        raise InvalidVolume(f"the NRRD header cannot be read ({type(exc).__name__}); is the file complete?") from exc
    voxels = math.prod(sizes)
    _check(voxels, voxels * itemsize, f"the NRRD header ({'x'.join(map(str, sizes))})", limits)
    raw = path.with_name("raw-" + path.name)
    if decompress_nrrd(path, raw, limits.max_bytes):
        os.replace(raw, path)


def _metaimage(path: Path, limits: UploadLimits) -> None:
    header = read_meta_header(path)
    if not header.local:
        name = check_data_file_name(header)  # a path is refused with its own message
        raise InvalidVolume(f"the MetaImage header names a separate data file {name!r}; upload the .mhd together "
                            "with that file (two files in the field 'image', or one zip), or one .mha")
    voxels, nbytes = declared_bytes(header)
    _check(voxels, nbytes, "the MetaImage header", limits)
    raw = path.with_name("raw-" + path.name)
    if inflate_metaimage(path, raw, limits.max_bytes):
        os.replace(raw, path)


def _zip_member_names(path: Path) -> list[str]:
    """The zip's file names, in the order :func:`extract_zip` writes them (names only compared,
    never used as paths)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        return [m.filename for m in archive.infolist() if not m.is_dir()]


def _dicom(files: list[Path], limits: UploadLimits) -> None:
    import pydicom

    voxels = nbytes = inflated = 0
    for f in files:
        tmp = f.with_name(f.name + ".inflated")
        if inflate_deflated(f, tmp, limits.max_bytes - inflated):
            os.replace(tmp, f)
            inflated += f.stat().st_size
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True,
                                 specific_tags=["Rows", "Columns", "NumberOfFrames", "SamplesPerPixel",
                                                "BitsAllocated"])
            n = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) \
                * max(1, int(ds.get("NumberOfFrames", 1) or 1)) * max(1, int(ds.get("SamplesPerPixel", 1) or 1))
            bits = int(ds.get("BitsAllocated", 16) or 16)
        except Exception:
            continue  # not DICOM / unreadable: the reader reports it with its own message
        voxels += n
        nbytes += n * max(1, bits // 8)
        _check(voxels, nbytes, f"the DICOM headers ({len(files)} files)", limits)


def check_upload(arranged: Path, staging: Path, limits: UploadLimits) -> Path:
    """Refuse ``arranged`` (file or folder from ``arrange_upload``) when its headers exceed the
    limits; returns the path to decode (a zip comes back as the folder it was extracted to)."""
    name = arranged.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        _nifti(arranged, limits)
        return arranged
    if name.endswith((".nrrd", ".nhdr")):
        _nrrd(arranged, limits)
        return arranged
    if name.endswith(METAIMAGE_SUFFIXES):
        _metaimage(arranged, limits)
        return arranged
    if name.endswith(".zip"):
        folder = staging / "unzipped"
        folder.mkdir()
        zl = ZipLimits(max_members=limits.max_files, max_total_bytes=limits.max_bytes,
                       max_member_bytes=limits.max_bytes)
        extracted = extract_zip(arranged, folder, zl)
        names = _zip_member_names(arranged)
        arranged.unlink()
        named = [(n, f) for n, f in zip(names, extracted) if not n.startswith("__MACOSX/")]  # Finder's forks
        if any(n.lower().endswith(METAIMAGE_SUFFIXES) for n, _ in named):  # a MetaImage, not a DICOM series
            joined = join_metaimage(named, staging / "image.mha")
            for f in extracted:
                f.unlink()
            folder.rmdir()
            _metaimage(joined, limits)
            return joined
        _dicom(extracted, limits)
        return folder
    _dicom(sorted(arranged.iterdir()) if arranged.is_dir() else [arranged], limits)
    return arranged
