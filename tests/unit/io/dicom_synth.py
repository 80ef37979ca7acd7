"""Synthetic DICOM series for the DICOM/SEG/RTSTRUCT tests (real files written with pydicom).

Geometry is described in **LPS** (DICOM patient coordinates). A synthetic series has
``n_cols x n_rows x n_slices`` voxels; the *truth* returned with it is the array and LPS affine the
reader must reconstruct: ``truth[i, j, k]`` is column ``i``, row ``j`` of the slice ``k``-th along
the slice normal, whatever order the files were written in.
"""

from __future__ import annotations

import bz2
import io
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLosslessSV1, generate_uid

# A fixed root keeps UIDs valid and recognisable; generate_uid adds randomness.
UID_ROOT = "1.2.826.0.1.3680043.8.498."


@dataclass
class SynthSeries:
    paths: list[Path]
    truth: np.ndarray  # (cols, rows, slices) rescaled values, slices sorted along the normal
    affine_lps: np.ndarray  # (i, j, k, 1) -> LPS mm
    series_uid: str
    study_uid: str
    for_uid: str
    datasets: list[Dataset]


def rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    a = np.asarray(axis, dtype=np.float64)
    a /= np.linalg.norm(a)
    t = np.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def make_ct_series(
    folder: Path,
    *,
    shape: tuple[int, int, int] = (20, 16, 10),
    spacing: tuple[float, float, float] = (0.8, 0.7, 2.5),
    row_dir: tuple[float, float, float] = (1.0, 0.0, 0.0),
    col_dir: tuple[float, float, float] = (0.0, 1.0, 0.0),
    origin: tuple[float, float, float] = (-10.0, -20.0, 30.0),
    write_order: str = "forward",
    transfer_syntax: str = ExplicitVRLittleEndian,
    slope: float = 1.0,
    intercept: float = -1024.0,
    gantry_shift_mm: float = 0.0,
    drop_slices: tuple[int, ...] = (),
    series_uid: str | None = None,
    study_uid: str | None = None,
    for_uid: str | None = None,
    series_description: str = "synthetic CT",
    seed: int = 0,
    write: bool = True,
    pixels: np.ndarray | None = None,
) -> SynthSeries:
    """Write a single-frame CT series and return it with the expected reconstruction.

    ``spacing`` is (between columns, between rows, between slices) in mm. ``write_order`` is
    "forward", "reverse" or "shuffle": the order of file names *and* InstanceNumbers, which the
    reader must ignore. ``gantry_shift_mm`` shears each slice along the column direction (what a
    gantry tilt does); ``drop_slices`` leaves slices out (a gap). ``pixels``: the stored values
    (``uint16`` of ``shape``, columns x rows x slices) instead of random ones.
    """
    folder.mkdir(parents=True, exist_ok=True)
    n_slices = shape[2]
    r = np.asarray(row_dir, dtype=np.float64)
    c = np.asarray(col_dir, dtype=np.float64)
    n = np.cross(r, c)
    affine = np.eye(4)
    affine[:3, 0] = r * spacing[0]
    affine[:3, 1] = c * spacing[1]
    affine[:3, 2] = n * spacing[2]
    affine[:3, 3] = origin
    rng = np.random.default_rng(seed)
    stored = rng.integers(0, 4000, size=shape, dtype=np.uint16) if pixels is None else np.asarray(pixels, np.uint16)
    if stored.shape != tuple(shape):
        raise ValueError(f"pixels {stored.shape} must have the series' shape {tuple(shape)}")
    series_uid = series_uid or generate_uid(UID_ROOT)
    study_uid = study_uid or generate_uid(UID_ROOT)
    for_uid = for_uid or generate_uid(UID_ROOT)
    keep = [k for k in range(n_slices) if k not in drop_slices]
    order = list(keep)
    if write_order == "reverse":
        order = order[::-1]
    elif write_order == "shuffle":
        order = list(rng.permutation(order))
    paths: list[Path] = []
    datasets: list[Dataset] = []
    for number, k in enumerate(order, start=1):
        position = affine[:3, 3] + k * affine[:3, 2] + k * gantry_shift_mm * c
        ds = _ct_dataset(
            stored[:, :, k].T.copy(),
            position,
            np.concatenate([r, c]),
            (spacing[1], spacing[0]),
            spacing[2],
            series_uid,
            study_uid,
            for_uid,
            number,
            slope,
            intercept,
            series_description,
        )
        if transfer_syntax == JPEGLosslessSV1:
            _compress_jpeg_lossless(ds)
        elif transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax)
        path = folder / f"img{number:04d}.dcm"
        if write:
            ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        datasets.append(ds)
    truth = stored[:, :, keep].astype(np.float64) * slope + intercept
    return SynthSeries(paths, truth, affine, series_uid, study_uid, for_uid, datasets)


def _ct_dataset(
    pixels: np.ndarray,
    position: np.ndarray,
    orientation: np.ndarray,
    pixel_spacing: tuple[float, float],
    thickness: float,
    series_uid: str,
    study_uid: str,
    for_uid: str,
    number: int,
    slope: float,
    intercept: float,
    series_description: str,
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    sop_uid = generate_uid(UID_ROOT)
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20240102"
    ds.SeriesDate = "20240102"
    ds.ContentDate = "20240102"
    ds.StudyTime = "101500"
    ds.SeriesTime = "101500"
    ds.ContentTime = "101500"
    ds.AccessionNumber = "A0001"
    ds.Modality = "CT"
    ds.Manufacturer = "Synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "synthetic study"
    ds.SeriesDescription = series_description
    ds.PatientName = "Synthetic^Patient"
    ds.PatientID = "SYN0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "ABDOMEN"
    ds.SliceThickness = f"{thickness:g}"
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 3
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def make_legacy_multiframe(series: SynthSeries, path: Path, shuffle_seed: int | None = 1) -> Path:
    """Convert a synthetic single-frame series into one Legacy Converted Enhanced CT file.

    Frames are put in a shuffled order so the reader must sort them by position.
    """
    import highdicom as hd

    datasets = [pydicom.dcmread(p) for p in series.paths]
    if shuffle_seed is not None:
        perm = np.random.default_rng(shuffle_seed).permutation(len(datasets))
        datasets = [datasets[i] for i in perm]
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(
        datasets,
        series_instance_uid=generate_uid(UID_ROOT),
        series_number=4,
        sop_instance_uid=generate_uid(UID_ROOT),
        instance_number=1,
    )
    mf.save_as(path)
    return path


def make_split_multiframe(series: SynthSeries, folder: Path) -> Path:
    """One series as two Legacy Converted Enhanced CT instances (first 5 files, the rest)."""
    import highdicom as hd

    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid(UID_ROOT)
    for n, part in enumerate((series.paths[:5], series.paths[5:]), start=1):
        hd.legacy.LegacyConvertedEnhancedCTImage(
            [pydicom.dcmread(p) for p in part],
            series_instance_uid=uid,
            series_number=4,
            sop_instance_uid=generate_uid(UID_ROOT),
            instance_number=n,
        ).save_as(folder / f"part{n}.dcm")
    return folder


def lps_of(affine_lps: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    ijk = np.asarray(ijk, dtype=np.float64).reshape(-1, 3)
    return ijk @ affine_lps[:3, :3].T + affine_lps[:3, 3]


def sphere_mask(shape: tuple[int, int, int], affine_lps: np.ndarray, centre_lps: np.ndarray, radius: float) -> np.ndarray:
    """Voxels whose centre is within ``radius`` mm of ``centre_lps`` (computed from the true geometry)."""
    idx = np.indices(shape).reshape(3, -1).T
    d = np.linalg.norm(lps_of(affine_lps, idx) - centre_lps, axis=1)
    return (d <= radius).reshape(shape)


def asymmetric_mask(shape: tuple[int, int, int]) -> np.ndarray:
    """Labels 1..3 placed so that any flip, transposition or slice reversal changes the mask."""
    m = np.zeros(shape, dtype=np.uint8)
    ni, nj, nk = shape
    m[1 : ni // 2, 1:4, 1:3] = 1  # an L-shape near the origin corner
    m[1:3, 1 : nj - 3, 1:3] = 1
    m[ni - 5 : ni - 2, nj - 4 : nj - 1, nk - 3 : nk - 1] = 2  # a block at the far corner
    m[ni // 2, nj // 2, nk // 2] = 3  # a single voxel
    m[ni // 2 + 1, nj // 2, nk // 2] = 3
    return m


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dciodvfy (dicom3tools) reports for a file; fails if it is not installed."""
    import shutil
    import subprocess

    import pytest

    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail("dciodvfy (Debian package dicom3tools) is not installed: run `make tools`")
    result = subprocess.run([exe, str(path)], check=False, capture_output=True, text=True, timeout=120)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def encode_jpeg_lossless_sv1(pixels: np.ndarray, precision: int) -> bytes:
    """A minimal JPEG Lossless (ITU T.81 process 14, first-order prediction) encoder.

    No library available here encodes this transfer syntax, so the tests bring their own to feed
    the real decoder (GDCM) a real codestream. One component, predictor 1, Pt = 0, a
    fixed Huffman table giving every difference category (0..16) a 5-bit code.
    """
    rows, cols = pixels.shape
    x = pixels.astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = x[0, :-1]  # first row: left neighbour
    pred[1:, 0] = x[:-1, 0]  # first column: the pixel above
    pred[1:, 1:] = x[1:, :-1]  # predictor 1 (left) elsewhere
    diffs = ((x - pred) % 65536).ravel()
    diffs = np.where(diffs > 32768, diffs - 65536, diffs)

    bits: list[str] = []
    for d in diffs.tolist():
        ssss = 0 if d == 0 else int(abs(d)).bit_length()
        bits.append(format(ssss, "05b"))  # canonical code of category ssss: its 5-bit index
        if 0 < ssss < 16:
            bits.append(format(d if d > 0 else d + (1 << ssss) - 1, f"0{ssss}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)  # pad with 1-bits
    raw = int(stream, 2).to_bytes(len(stream) // 8, "big") if stream else b""
    entropy = raw.replace(b"\xff", b"\xff\x00")  # byte stuffing

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload

    sof3 = bytes([precision]) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    counts = [0] * 16
    counts[4] = 17  # 17 codes of length 5
    dht = bytes([0x00]) + bytes(counts) + bytes(range(17))
    sos = bytes([1, 1, 0x00, 1, 0, 0])  # Ns=1, Cs=1, Td/Ta=0, Ss=predictor 1, Se=0, Ah/Al=0
    return (
        b"\xff\xd8"
        + segment(0xC3, sof3)
        + segment(0xC4, dht)
        + segment(0xDA, sos)
        + entropy
        + b"\xff\xd9"
    )


def _compress_jpeg_lossless(ds: Dataset) -> None:
    pixels = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(ds.Rows, ds.Columns)
    frame = encode_jpeg_lossless_sv1(pixels, precision=int(ds.BitsStored))
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1


# -- compressed inputs (decompression bombs) ------------------------------------------------------

def zeros_compressed(codec: str, n: int, prefix: bytes = b"") -> bytes:
    """``prefix`` + ``n`` zero bytes, compressed in a stream (never held in memory)."""
    comp = {"gzip": lambda: zlib.compressobj(9, zlib.DEFLATED, 31),
            "deflate": lambda: zlib.compressobj(9, zlib.DEFLATED, -15),
            "bzip2": lambda: bz2.BZ2Compressor(9)}[codec]()
    out = [comp.compress(prefix)]
    block = bytes(1 << 24)
    for _ in range(n // len(block)):
        out.append(comp.compress(block))
    out.append(comp.compress(bytes(n % len(block))))
    out.append(comp.flush())
    return b"".join(out)


def deflated_copy(src: Path, dst: Path, padding: int = 0) -> Path:
    """``src`` re-encoded in Deflated Explicit VR Little Endian; with ``padding``, the dataset
    ends in a private OB element of that many zero bytes (compressed while streaming, so the
    zeros never sit in memory)."""
    ds = pydicom.dcmread(src)
    if not padding:
        ds.file_meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian
        ds.save_as(dst, enforce_file_format=True)
        return dst
    plain = io.BytesIO()
    ds.save_as(plain, enforce_file_format=True)  # Explicit VR Little Endian
    body = plain.getvalue()[132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength):]
    ds.file_meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian
    head = io.BytesIO()
    pydicom.filewriter.write_file_meta_info(pydicom.filebase.DicomFileLike(head), ds.file_meta, enforce_standard=True)
    private = b"\xe1\x7f\x00\x10OB\x00\x00" + padding.to_bytes(4, "little")  # (7FE1,1000) OB, after the pixels
    dst.write_bytes(b"\0" * 128 + b"DICM" + head.getvalue() + zeros_compressed("deflate", padding, body + private))
    return dst
