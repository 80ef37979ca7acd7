"""Compressed inputs expand only as far as their headers declare (issue: decompression bombs),
NIfTI geometry is never invented from a bad pixdim, a series of two modalities is refused, and
messages name neither server paths nor free-text source attributes."""

from __future__ import annotations

import bz2
import gzip
import io
import resource
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from msam_core.errors import InvalidVolume
from msam_core.io.bounded import decompress_to
from msam_core.io.dicom import inflate_deflated, read_series
from msam_core.io.load import load_volume
from msam_core.io.nrrd import decompress_nrrd, read_nrrd
from msam_service.upload_guard import UploadLimits, check_upload
from msam_service.volumes import without_paths
from tests.unit.io.dicom_synth import deflated_copy, make_ct_series, zeros_compressed

GiB = 1 << 30


@pytest.mark.parametrize("codec", ["gzip", "bzip2", "deflate"])
def test_decompress_to_stops_at_the_ceiling(codec: str) -> None:
    data = np.random.default_rng(0).integers(0, 255, 300_000, dtype=np.uint8).tobytes()
    packed = {"gzip": gzip.compress, "bzip2": bz2.compress,
              "deflate": lambda d: zlib.compress(d, wbits=-15)}[codec](data)  # type: ignore[operator]
    whole = io.BytesIO()
    assert decompress_to(io.BytesIO(packed), whole, codec, 10**9, "x") == (len(data), True)  # type: ignore[arg-type]
    assert whole.getvalue() == data
    part = io.BytesIO()
    assert decompress_to(io.BytesIO(packed), part, codec, 1000, "x") == (1000, False)  # type: ignore[arg-type]
    assert part.getvalue() == data[:1000]


@pytest.mark.parametrize("codec", ["gzip", "bzip2"])
def test_multi_member_streams_and_broken_ones(codec: str) -> None:
    pack = gzip.compress if codec == "gzip" else bz2.compress
    out = io.BytesIO()
    assert decompress_to(io.BytesIO(pack(b"abc") + pack(b"def")), out, codec, 100, "x") == (6, True)  # type: ignore[arg-type]
    assert out.getvalue() == b"abcdef"
    with pytest.raises(InvalidVolume, match="ends in the middle"):
        decompress_to(io.BytesIO(pack(b"abc" * 1000)[:-12]), io.BytesIO(), codec, 10**6, "the data")  # type: ignore[arg-type]
    with pytest.raises(InvalidVolume, match="corrupt"):
        decompress_to(io.BytesIO(pack(b"abc")[:10] + b"\xff" * 64), io.BytesIO(), codec, 10**6, "the data")  # type: ignore[arg-type]


# -- NRRD ----------------------------------------------------------------------------------------

_NRRD_HEAD = (b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 3 2\nspace: left-posterior-superior\n"
              b"space directions: (0.5,0,0) (0,0.7,0) (0,0,2.5)\nspace origin: (1,2,3)\nendian: little\n")


def _nrrd(tmp: Path, encoding: bytes, data: bytes, extra: bytes = b"") -> Path:
    path = tmp / f"v-{encoding.decode()}.nrrd"
    path.write_bytes(_NRRD_HEAD + b"encoding: " + encoding + b"\n" + extra + b"\n" + data)
    return path


@pytest.mark.parametrize("encoding, pack", [(b"gzip", gzip.compress), (b"bzip2", bz2.compress)])
def test_a_compressed_nrrd_is_rewritten_raw_with_the_same_voxels(tmp_path: Path, encoding: bytes, pack) -> None:
    values = np.arange(24, dtype="<i2").reshape(2, 3, 4)  # C order of a 4x3x2 Fortran-order image
    src = _nrrd(tmp_path, encoding, pack(values.tobytes()))
    dst = tmp_path / "raw.nrrd"
    assert decompress_nrrd(src, dst, 10**6)
    assert b"encoding: raw\n" in dst.read_bytes() and dst.read_bytes().endswith(values.tobytes())
    a, b = read_nrrd(src), read_nrrd(dst)
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_array_equal(a.affine, b.affine)
    assert not decompress_nrrd(_nrrd(tmp_path, b"raw", values.tobytes()), tmp_path / "x.nrrd", 10**6)


@pytest.mark.parametrize("codec", ["gzip", "bzip2"])
def test_an_nrrd_bomb_is_refused_after_one_byte_past_its_declared_size(tmp_path: Path, codec: str) -> None:
    """1 GiB of zeros behind a header declaring 24 voxels: refused without expanding it
    (peak memory grows by far less than the stream would need)."""
    src = _nrrd(tmp_path, codec.encode(), zeros_compressed(codec, GiB))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    with pytest.raises(InvalidVolume, match="holds more than the 48 bytes its header declares"):
        decompress_nrrd(src, tmp_path / "raw.nrrd", 4 * GiB)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # < 64 MiB
    assert (tmp_path / "raw.nrrd").stat().st_size < 1024


def test_nrrd_limits_and_inconsistencies_are_refused(tmp_path: Path) -> None:
    short = _nrrd(tmp_path, b"gzip", gzip.compress(b"\0" * 20))
    with pytest.raises(InvalidVolume, match="ends after 20 of the 48 bytes"):
        decompress_nrrd(short, tmp_path / "a.nrrd", 10**6)
    with pytest.raises(InvalidVolume, match="MSAM_MAX_DECOMPRESSED_MB"):
        decompress_nrrd(_nrrd(tmp_path, b"gzip", gzip.compress(b"\0" * 48)), tmp_path / "b.nrrd", 40)
    skipped = _nrrd(tmp_path, b"gzip", b"junk\n" + gzip.compress(b"\0" * 48), extra=b"line skip: 1\n")
    with pytest.raises(InvalidVolume, match="line skip"):
        decompress_nrrd(skipped, tmp_path / "c.nrrd", 10**6)
    (tmp_path / "d.nrrd").write_bytes(b"NRRD0004\ntype: short\n" + b"x" * (2 << 20))
    with pytest.raises(InvalidVolume, match="no end"):
        decompress_nrrd(tmp_path / "d.nrrd", tmp_path / "e.nrrd", 10**6)


# -- DICOM deflate -------------------------------------------------------------------------------

def test_a_deflated_series_reads_the_same_after_inflating(tmp_path: Path) -> None:
    series = make_ct_series(tmp_path / "plain", shape=(12, 10, 4))
    (tmp_path / "deflated").mkdir()
    files = [deflated_copy(p, tmp_path / "deflated" / p.name) for p in series.paths]
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    for f in files:
        assert inflate_deflated(f, f.with_suffix(".tmp"), 10**8)
        f.with_suffix(".tmp").replace(f)
        assert pydicom.dcmread(f).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    a, b = read_series(tmp_path / "plain"), read_series(tmp_path / "deflated")
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_array_equal(a.affine, b.affine)
    assert not inflate_deflated(series.paths[0], tmp_path / "x.dcm", 10**8)  # not deflated: left alone
    assert not (tmp_path / "x.dcm").exists()


def test_a_deflated_dicom_bomb_stops_at_the_ratio_and_the_budget(tmp_path: Path) -> None:
    src = make_ct_series(tmp_path / "s", shape=(12, 10, 1)).paths[0]
    bomb = deflated_copy(src, tmp_path / "bomb.dcm", padding=GiB)
    assert bomb.stat().st_size < 2 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InvalidVolume, match="more than 200 times"):
        inflate_deflated(bomb, tmp_path / "out.dcm", 4 * GiB)
    assert (tmp_path / "out.dcm").stat().st_size <= 200 * bomb.stat().st_size + (2 << 20)
    with pytest.raises(InvalidVolume, match="MSAM_MAX_DECOMPRESSED_MB"):
        inflate_deflated(bomb, tmp_path / "out.dcm", 8 << 20)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024


def test_the_upload_guard_rewrites_what_it_bounds(tmp_path: Path) -> None:
    """check_upload hands the decoders (and storage) the rewritten files."""
    limits = UploadLimits(max_voxels=10**6, max_bytes=10**7, max_files=10)
    staging = tmp_path / "staging"
    staging.mkdir()
    nrrd_path = staging / "image.nrrd"
    nrrd_path.write_bytes(_NRRD_HEAD + b"encoding: gzip\n\n" + gzip.compress(bytes(48)))
    assert check_upload(nrrd_path, staging, limits) == nrrd_path
    assert b"encoding: raw" in nrrd_path.read_bytes()
    assert load_volume(nrrd_path).shape == (4, 3, 2)
    series = make_ct_series(tmp_path / "plain", shape=(12, 10, 3))
    folder = staging / "series"
    folder.mkdir()
    for n, p in enumerate(series.paths):
        deflated_copy(p, folder / f"{n:06d}.dcm")
    assert check_upload(folder, staging, limits) == folder
    assert {pydicom.dcmread(f).file_meta.TransferSyntaxUID for f in folder.iterdir()} == {ExplicitVRLittleEndian}
    np.testing.assert_array_equal(load_volume(folder).array, read_series(tmp_path / "plain").array)


def test_a_gzipped_nifti_bomb_is_read_only_as_far_as_its_header(tmp_path: Path) -> None:
    """nibabel reads exactly the declared bytes of a .nii.gz; the rest of the stream stays packed."""
    raw = nib.Nifti1Image(np.ones((4, 4, 4), np.int16), np.eye(4)).to_bytes()
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(zeros_compressed("gzip", GiB, raw))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    check_upload(path, tmp_path, UploadLimits(max_voxels=10**6, max_bytes=10**7, max_files=1))
    assert load_volume(path).array.sum() == 64
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024


# -- NIfTI geometry and scaling ------------------------------------------------------------------

@pytest.mark.parametrize("pixdim", [(1.0, 0.0, 1.0), (1.0, -2.0, 1.0), (np.nan, 1.0, 1.0)])
def test_a_pixdim_that_would_define_a_false_geometry_is_refused(tmp_path: Path, pixdim) -> None:
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), None)
    img.header["pixdim"][1:4] = pixdim
    img.header["qform_code"], img.header["sform_code"] = 1, 0
    path = tmp_path / "p.nii"
    path.write_bytes(img.header.binaryblock + b"\0" * 4 + bytes(128))  # the header exactly as set
    with pytest.raises(InvalidVolume, match=r"voxel sizes \(pixdim\[1:4\]\)"):
        load_volume(path)
    with_sform = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.diag([0.5, 0.5, 2.0, 1.0]))
    with_sform.header["pixdim"][1:4] = pixdim  # irrelevant: the sform defines the grid
    header = with_sform.header
    header["sform_code"] = 1
    (tmp_path / "s.nii").write_bytes(header.binaryblock + b"\0" * 4 + bytes(128))
    np.testing.assert_allclose(load_volume(tmp_path / "s.nii").affine, np.diag([0.5, 0.5, 2.0, 1.0]))


def test_scaled_nifti_is_float32_and_equals_nibabel(tmp_path: Path) -> None:
    data = (np.arange(6 * 5 * 4).reshape(6, 5, 4) - 30).astype(np.int16)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(0.25, -1024.0)
    nib.save(img, str(tmp_path / "s.nii.gz"))
    volume = load_volume(tmp_path / "s.nii.gz")
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, nib.load(str(tmp_path / "s.nii.gz")).get_fdata().astype(np.float32))


# -- DICOM modality and messages -----------------------------------------------------------------

def test_a_series_mixing_modalities_is_refused_whatever_the_file_order(tmp_path: Path) -> None:
    series = make_ct_series(tmp_path / "s", shape=(12, 10, 4))
    ds = pydicom.dcmread(series.paths[2])
    ds.Modality = "MR"
    ds.save_as(series.paths[2], enforce_file_format=True)
    for order in (series.paths, series.paths[::-1]):
        with pytest.raises(InvalidVolume, match=r"mixes modalities \(3 CT, 1 MR images\)"):
            read_series(list(order))


def test_series_listings_name_no_description(tmp_path: Path) -> None:
    make_ct_series(tmp_path / "up" / "a", shape=(12, 10, 3), series_description="Patient^Secret 5mm")
    make_ct_series(tmp_path / "up" / "b", shape=(12, 10, 2), seed=1, series_description="CHEST 1mm")
    with pytest.raises(InvalidVolume) as info:
        read_series(tmp_path / "up")
    assert "Secret" not in str(info.value) and "CHEST" not in str(info.value)
    assert "(CT, 3 image(s))" in str(info.value)


def test_messages_lose_server_paths() -> None:
    assert without_paths("cannot read /srv/msam/storage/staging/tmpx1/image.nii as NIfTI") == \
        "cannot read <file> as NIfTI"
    assert without_paths("file '/etc/passwd' was named") == "file '<file>' was named"
    for kept in ("send one NIfTI/NRRD/zip file", "1.0 mm/s", "a ratio of 200/1"):
        assert without_paths(kept) == kept
