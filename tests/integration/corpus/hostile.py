"""Hostile and broken inputs, generated (nothing big is committed): each case is one HTTP
request that must get a clear 4xx (code and message), never a 5xx or a hang.

:func:`cases` returns ``(name, method, path, httpx keyword arguments, expected code, message
fragment)``; ``expected code`` is the error code (``None``: any 4xx).
"""

from __future__ import annotations

import gzip
import io
import json
import zipfile
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom

from tests.unit.io.dicom_synth import deflated_copy, make_ct_series, zeros_compressed

Case = tuple[str, str, str, dict[str, Any], str | None, str]
ZIP_SLIP_TARGETS = ("msam-zip-slip-evil.dcm", "tmp/msam-zip-slip-abs.dcm")
ONE = json.dumps({"lesions": [{"positive": [[5, 5, 5]]}]})


def nifti_bytes(array: np.ndarray, affine: np.ndarray | None = None, gz: bool = True) -> bytes:
    img = nib.Nifti1Image(array, np.diag([1.0, 1.0, 2.0, 1.0]) if affine is None else affine)
    raw = img.to_bytes()
    return gzip.compress(raw) if gz else raw


def singular_nifti(array: np.ndarray) -> bytes:
    """sform and qform both claim a zero voxel size (no geometry)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(array.shape)
    hdr.set_data_dtype(array.dtype)
    for row in ("srow_x", "srow_y", "srow_z"):
        hdr[row] = [0, 0, 0, 0]
    hdr["sform_code"] = 1
    hdr["qform_code"] = 1
    hdr["pixdim"] = [1, 0, 0, 0, 1, 1, 1, 1]
    return gzip.compress(nib.Nifti1Image(array, None, header=hdr).to_bytes())


def absurd_nifti_header() -> bytes:
    """A valid NIfTI-2 header claiming 100000^3 int16 voxels, followed by 64 bytes of data."""
    hdr = nib.Nifti2Header()
    hdr.set_data_dtype(np.int16)
    hdr.set_data_shape((100000, 100000, 100000))
    hdr["vox_offset"] = 544
    return hdr.binaryblock + b"\0" * 4 + b"\0" * 64


def absurd_nrrd() -> bytes:
    return b"NRRD0004\ntype: short\ndimension: 3\nsizes: 100000 100000 100000\nencoding: raw\n\n" + b"\0" * 64


def detached_nrrd() -> bytes:
    """A NRRD header that points its data at a server file: must never be read."""
    return (b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n"
            b"data file: /etc/passwd\n\n")


NRRD_4X4X4 = (b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 4\nspace: left-posterior-superior\n"
              b"space directions: (1,0,0) (0,1,0) (0,0,1)\nendian: little\n")


def nrrd_bomb(codec: str, n: int) -> bytes:
    """A valid NRRD header declaring 4x4x4 shorts (128 bytes), then ``n`` compressed zero bytes."""
    return NRRD_4X4X4 + f"encoding: {codec}\n\n".encode() + zeros_compressed(codec, n)


def nifti_gz_bomb(n: int) -> bytes:
    """A valid 4x4x4 NIfTI, gzip'd together with ``n`` zero bytes after its data."""
    return zeros_compressed("gzip", n, nib.Nifti1Image(np.ones((4, 4, 4), np.int16), np.eye(4)).to_bytes())


def metaimage_header(data_file: str, compressed: bool = False, dims: str = "4 4 4") -> bytes:
    """A valid MetaImage header declaring ``dims`` shorts (4x4x4: 128 bytes) whose data lies in
    ``data_file`` (``LOCAL``: after the header)."""
    return (b"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
            + (b"CompressedData = True\n" if compressed else b"")
            + f"TransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = 0 0 0\nElementSpacing = 1 1 1\nDimSize = {dims}\n"
              f"ElementType = MET_SHORT\nElementDataFile = {data_file}\n".encode())


def metaimage_bomb(n: int) -> bytes:
    """A .mha declaring 128 bytes of data, followed by ``n`` zero bytes, zlib-compressed."""
    return metaimage_header("LOCAL", compressed=True) + zlib.compress(b"\0" * n, 9)


def mask_on_another_grid(good_nifti: bytes) -> bytes:
    """A mask with the image's shape whose first axis is mirrored (the image's affine, i flipped)."""
    img = nib.Nifti1Image.from_bytes(gzip.decompress(good_nifti))
    flip = np.array([[-1.0, 0, 0, img.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    mask = np.zeros(img.shape, np.uint8)
    mask[20:25, 18:23, 10:14] = 1
    return nifti_bytes(mask, img.affine @ flip)


def deflated_dicom_bomb(folder: Path, n: int) -> bytes:
    """One CT slice in Deflated Explicit VR Little Endian whose dataset ends in ``n`` zero bytes."""
    src = make_ct_series(folder, shape=(16, 16, 1)).paths[0]
    return deflated_copy(src, folder / "bomb.dcm", padding=n).read_bytes()


def zero_pixdim_nifti(array: np.ndarray) -> bytes:
    """No sform, a qform with a voxel size of 0 (nibabel alone would read 1 mm)."""
    img = nib.Nifti1Image(array, None)
    img.header["pixdim"][1:4] = (1.0, 0.0, 2.0)
    img.header["qform_code"], img.header["sform_code"] = 1, 0
    return img.header.binaryblock + b"\0" * 4 + array.tobytes(order="F")


def mixed_modality_series(folder: Path) -> list[bytes]:
    """One series (one SeriesInstanceUID) whose second slice says MR."""
    files = make_ct_series(folder, shape=(16, 16, 4)).paths
    ds = pydicom.dcmread(files[1])
    ds.Modality = "MR"
    ds.save_as(files[1], enforce_file_format=True)
    return [p.read_bytes() for p in files]


def zip_of(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def dicom_series_bytes(folder: Path, **kw: Any) -> list[bytes]:
    return [p.read_bytes() for p in make_ct_series(folder, shape=(16, 16, 4), **kw).paths]


def dicom_without_pixels(folder: Path) -> bytes:
    path = make_ct_series(folder, shape=(16, 16, 2)).paths[0]
    ds = pydicom.dcmread(path)
    del ds.PixelData
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def dicom_absurd_rows(folder: Path) -> bytes:
    path = make_ct_series(folder, shape=(16, 16, 2)).paths[0]
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 65535, 65535, 1000
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _seg(files: Any, prompts: str = ONE, **data: str) -> dict[str, Any]:
    return {"files": files, "data": {"prompts": prompts, **data}}


def cases(tmp: Path, good_nifti: bytes) -> list[Case]:
    rng = np.random.default_rng(0)
    cube = rng.normal(size=(12, 12, 8)).astype(np.float32)
    img = {"image": ("ct.nii.gz", good_nifti)}
    bomb = zip_of({"a.dcm": b"\0" * (40 << 20)})  # 40 MB of zeros in ~40 KB: a ratio of ~1000:1
    mixed = dicom_series_bytes(tmp / "mixed1") + dicom_series_bytes(tmp / "mixed2", seed=1)
    two_modalities = mixed_modality_series(tmp / "modalities")
    return [
        ("empty file", "POST", "/segment", _seg({"image": ("ct.nii.gz", b"")}), "invalid_volume", "empty"),
        ("truncated NIfTI", "POST", "/segment", _seg({"image": ("ct.nii.gz", good_nifti[: len(good_nifti) // 2])}),
         "invalid_volume", ""),
        ("truncated NIfTI header", "POST", "/segment", _seg({"image": ("ct.nii", nifti_bytes(cube, gz=False)[:200])}),
         "invalid_volume", ""),
        ("PNG named .nii.gz", "POST", "/segment", _seg({"image": ("ct.nii.gz", b"\x89PNG\r\n\x1a\n" + b"\0" * 100)}),
         "invalid_volume", ""),
        ("text file", "POST", "/segment", _seg({"image": ("notes.txt", b"hello")}), "invalid_volume", "unknown format"),
        ("text named .dcm", "POST", "/segment", _seg({"image": ("x.dcm", b"hello " * 50)}), "invalid_volume", ""),
        ("2D image", "POST", "/segment", _seg({"image": ("flat.nii.gz", nifti_bytes(cube[:, :, 0]))}),
         "invalid_volume", "3D"),
        ("4D image", "POST", "/segment",
         _seg({"image": ("t.nii.gz", nifti_bytes(np.stack([cube, cube, cube], axis=-1)))}), "invalid_volume", "3D"),
        ("singular affine", "POST", "/segment", _seg({"image": ("s.nii.gz", singular_nifti(cube))}),
         None, ""),
        ("NaN voxels everywhere", "POST", "/segment",
         _seg({"image": ("nan.nii.gz", nifti_bytes(np.full((12, 12, 8), np.nan, np.float32)))}), "invalid_volume",
         "every voxel is NaN or infinite"),
        ("absurd NIfTI dimensions", "POST", "/volumes", {"files": {"image": ("big.nii", absurd_nifti_header())}},
         "invalid_volume", "MSAM_MAX_VOXELS"),
        ("absurd NRRD dimensions", "POST", "/volumes", {"files": {"image": ("big.nrrd", absurd_nrrd())}},
         "invalid_volume", "MSAM_MAX_VOXELS"),
        ("NRRD with detached data file", "POST", "/volumes", {"files": {"image": ("d.nrrd", detached_nrrd())}},
         "invalid_volume", "data file"),
        ("absurd DICOM rows x columns", "POST", "/volumes",
         {"files": {"image": ("a.dcm", dicom_absurd_rows(tmp / "absurd"))}}, "invalid_volume", "MSAM_MAX_VOXELS"),
        ("DICOM without pixel data", "POST", "/volumes",
         {"files": {"image": ("np.dcm", dicom_without_pixels(tmp / "nopix"))}}, "invalid_volume", ""),
        ("mixed series", "POST", "/volumes",
         {"files": [("image", (f"{n}.dcm", b)) for n, b in enumerate(mixed)]}, None, ""),
        ("mixed series, unknown series_uid", "POST", "/volumes",
         {"files": [("image", (f"{n}.dcm", b)) for n, b in enumerate(mixed)], "data": {"series_uid": "1.2.3.4"}},
         "invalid_volume", ""),
        ("zip slip", "POST", "/volumes", {"files": {"image": ("s.zip", zip_of(
            {"../../../../../../" + ZIP_SLIP_TARGETS[0]: b"x", "/" + ZIP_SLIP_TARGETS[1]: b"y"}))}},
         "invalid_volume", "unsafe"),
        ("zip bomb", "POST", "/volumes", {"files": {"image": ("b.zip", bomb)}}, "invalid_volume", ""),
        ("NRRD gzip bomb", "POST", "/volumes", {"files": {"image": ("b.nrrd", nrrd_bomb("gzip", 256 << 20))}},
         "invalid_volume", "holds more than the 128 bytes"),
        ("NRRD bzip2 bomb", "POST", "/volumes", {"files": {"image": ("b.nrrd", nrrd_bomb("bzip2", 256 << 20))}},
         "invalid_volume", "holds more than the 128 bytes"),
        ("deflated DICOM bomb", "POST", "/volumes",
         {"files": {"image": ("b.dcm", deflated_dicom_bomb(tmp / "deflate", 256 << 20))}},
         "invalid_volume", "more than 200 times"),
        ("zero voxel size", "POST", "/volumes",
         {"files": {"image": ("p.nii", zero_pixdim_nifti(cube))}}, "invalid_volume", "pixdim"),
        ("series of two modalities", "POST", "/volumes",
         {"files": [("image", (f"{n}.dcm", b)) for n, b in enumerate(two_modalities)]},
         "invalid_volume", "mixes modalities"),
        ("MetaImage pair with a hostile data-file name", "POST", "/volumes", {"files": [
            ("image", ("case.mhd", metaimage_header("../../../../etc/passwd"))), ("image", ("passwd", b"\0" * 128))]},
         "invalid_volume", "outside the upload"),
        ("MetaImage pointing at a server file", "POST", "/volumes",
         {"files": {"image": ("case.mha", metaimage_header("/etc/passwd"))}}, "invalid_volume", "outside the upload"),
        ("MetaImage header without its data file", "POST", "/volumes",
         {"files": {"image": ("case.mhd", metaimage_header("case.raw"))}}, "invalid_volume", "separate data file"),
        ("MetaImage pair whose data file is not the one named", "POST", "/volumes", {"files": [
            ("image", ("case.mhd", metaimage_header("case.zraw"))), ("image", ("other.zraw", b"\0" * 128))]},
         "invalid_volume", "not in the upload"),
        ("MetaImage zip with a hostile data-file name", "POST", "/volumes", {"files": {"image": ("m.zip", zip_of(
            {"case.mhd": metaimage_header("../passwd"), "passwd": b"\0" * 128}))}}, "invalid_volume", "outside the upload"),
        ("MetaImage zlib bomb", "POST", "/volumes", {"files": {"image": ("b.mha", metaimage_bomb(256 << 20))}},
         "invalid_volume", "holds more than the 128 bytes"),
        ("absurd MetaImage dimensions", "POST", "/volumes", {"files": {"image": ("big.mha", metaimage_header(
            "LOCAL", dims="100000 100000 100000") + b"\0" * 64)}}, "invalid_volume", "MSAM_MAX_VOXELS"),
        ("mask prompt on another grid", "POST", "/segment", {"files": [
            ("image", ("ct.nii.gz", good_nifti)), ("masks", ("m.nii.gz", mask_on_another_grid(good_nifti)))],
            "data": {"prompts": json.dumps({"lesions": [{"mask": {"upload": "m.nii.gz"}}]})}},
         "invalid_prompt", "axis i mirrored"),
        ("mask prompt naming no uploaded file", "POST", "/segment", _seg(img, json.dumps(
            {"lesions": [{"mask": {"upload": "m.nii.gz"}}]})), "invalid_prompt", "no file of that name"),
        ("mask prompt with two sources", "POST", "/segment", _seg(img, json.dumps(
            {"lesions": [{"mask": {"upload": "m.nii.gz", "volume_id": "a" * 32}}]})), "invalid_request", "exactly one"),
        ("zip of junk", "POST", "/volumes", {"files": {"image": ("j.zip", b"PK\x03\x04" + b"\xff" * 200)}},
         "invalid_volume", ""),
        ("NaN coordinate", "POST", "/segment", _seg(img, '{"lesions": [{"positive": [[NaN, 2, 3]]}]}'), None, ""),
        ("infinite coordinate", "POST", "/segment", _seg(img, '{"lesions": [{"positive": [[1e999, 2, 3]]}]}'),
         None, ""),
        ("out-of-range coordinate", "POST", "/segment", _seg(img, json.dumps(
            {"lesions": [{"positive": [[5000, 2, 3]]}]})), "invalid_prompt", "outside"),
        ("huge RAS coordinate", "POST", "/segment", _seg(img, json.dumps(
            {"space": "RAS", "lesions": [{"positive": [[1e300, -1e300, 0]]}]})), "invalid_prompt", ""),
        ("unknown coordinate space", "POST", "/segment", _seg(img, json.dumps(
            {"space": "IJK", "lesions": [{"positive": [[1, 2, 3]]}]})), "invalid_request", "space"),
        ("no positive point", "POST", "/segment", _seg(img, json.dumps(
            {"lesions": [{"negative": [[1, 2, 3]]}]})), "invalid_request", "positive"),
        ("too many prompts", "POST", "/segment", _seg(img, json.dumps(
            {"lesions": [{"positive": [[5, 5, 5]] * 64}] * 32})), "too_many_prompts", "MSAM_MAX_PROMPTS"),
        ("control characters in a label", "POST", "/segment", _seg(img, json.dumps(
            {"lesions": [{"positive": [[5, 5, 5]], "label": "a\x00b"}]})), "invalid_request", "label"),
        ("malformed prompts JSON", "POST", "/segment", _seg(img, "{not json"), "invalid_request", "JSON"),
        ("malformed JSON body", "POST", "/segment", {"content": b'{"volume_id": ', "headers":
                                                     {"content-type": "application/json"}}, "invalid_request", ""),
        ("JSON body of the wrong type", "POST", "/segment", {"json": [1, 2, 3]}, "invalid_request", ""),
        ("volume id path traversal", "POST", "/segment", {"json": {"volume_id": "../../etc/passwd",
                                                                    "prompts": json.loads(ONE)}}, "invalid_request", ""),
        ("job id path traversal", "GET", "/jobs/..%2F..%2Fetc%2Fpasswd", {}, None, ""),
        ("broken multipart", "POST", "/volumes", {"content": b"--x\r\nnonsense", "headers":
                                                  {"content-type": "multipart/form-data; boundary=x"}}, None, ""),
        ("wrong content type", "POST", "/segment", {"content": b"a=b", "headers":
                                                    {"content-type": "text/plain"}}, "unsupported_media_type", ""),
    ]
