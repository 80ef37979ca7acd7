"""Compressed DICOM pixel data decoded by the permissively licensed decoders msam ships:
GDCM (python-gdcm, BSD/Apache-2.0) for the JPEG family, GDCM / CharLS (pyjpegls) for JPEG-LS,
GDCM / OpenJPEG (pylibjpeg-openjpeg) for JPEG 2000, pydicom / pylibjpeg-rle for RLE. The GPLv3
pylibjpeg-libjpeg is gone.

Every series is encoded here by a library other than the decoder under test (libjpeg-turbo through
imagecodecs for the JPEG processes, CharLS for JPEG-LS, OpenJPEG for JPEG 2000, pydicom for RLE;
tests/unit/io/test_dicom_read.py adds the hand-written JPEG Lossless SV1 encoder of dicom_synth.py),
then read back through ``read_series`` voxel for voxel: lossless syntaxes bit for bit, lossy ones
against libjpeg-turbo's own decode of the same codestream (JPEG) or within the encoder's error
bound (JPEG-LS near-lossless, JPEG 2000 lossy).
"""

from __future__ import annotations

from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    UID,
)

from msam_core.errors import InvalidVolume
from msam_core.io.dicom import read_series
from tests.unit.io.dicom_synth import make_ct_series

SHAPE = (40, 32, 5)  # columns, rows, slices


def _anatomy(shape: tuple[int, int, int], levels: int = 4096, seed: int = 3) -> np.ndarray:
    """Stored values (columns x rows x slices): a bright ellipse in a dark field, plus noise; smooth
    enough for the lossy codecs to be judged by a small error bound, noisy enough to be no toy."""
    i, j, k = np.indices(shape, dtype=np.float64)
    body = ((i - shape[0] / 2) / (shape[0] * 0.4)) ** 2 + ((j - shape[1] / 2) / (shape[1] * 0.35)) ** 2 <= 1
    values = np.where(body, 0.55, 0.05) * levels + k * levels / 200
    values += np.random.default_rng(seed).normal(0, levels / 400, shape)
    return np.clip(np.rint(values), 0, levels - 1).astype(np.uint16)


def _encapsulate(ds: pydicom.Dataset, frame: bytes, transfer_syntax: str) -> None:
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = transfer_syntax


def _write_jpeg_series(folder: Path, transfer_syntax: str, bits: int, **encode) -> tuple[np.ndarray, float]:
    """A series whose slices are encoded by libjpeg-turbo (imagecodecs); returns the volume a correct
    decoder gives (libjpeg-turbo's own decode of each codestream, rescaled) and the largest
    difference between that and the source values."""
    # 16-bit precision with values below 2^15: rescaled they stay within the int16 the reader returns
    stored = _anatomy(SHAPE, levels=1 << min(bits, 15))
    series = make_ct_series(folder, shape=SHAPE, pixels=stored, write=False)
    expected = np.empty(SHAPE, np.float64)
    worst = 0.0
    for k, (ds, path) in enumerate(zip(series.datasets, series.paths)):  # forward order: file k is slice k
        plane = stored[:, :, k].T.copy()  # rows x columns
        if bits == 8:
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
            plane = plane.astype(np.uint8)
        elif bits == 16:
            ds.BitsStored, ds.HighBit = 16, 15
        frame = bytes(imagecodecs.jpeg8_encode(plane, bitspersample=bits, **encode))
        _encapsulate(ds, frame, transfer_syntax)
        ds.save_as(path, enforce_file_format=True)
        decoded = imagecodecs.jpeg8_decode(frame)
        worst = max(worst, float(np.abs(decoded.astype(np.int64) - plane).max()))
        expected[:, :, k] = decoded.T.astype(np.float64) * 1.0 - 1024.0  # make_ct_series' slope, intercept
    return expected, worst


@pytest.mark.parametrize(
    ("transfer_syntax", "bits", "encode"),
    [
        (JPEGBaseline8Bit, 8, {"level": 92}),
        (JPEGLosslessSV1, 12, {"lossless": True, "predictor": 1}),
        (JPEGLossless, 12, {"lossless": True, "predictor": 6}),
        (JPEGLossless, 16, {"lossless": True, "predictor": 7}),
    ],
    ids=["jpeg-baseline-8bit", "jpeg-lossless-sv1-12bit", "jpeg-lossless-p14-predictor6", "jpeg-lossless-p14-16bit"],
)
def test_jpeg_processes_decode_to_libjpeg_turbos_values(tmp_path: Path, transfer_syntax: str, bits: int, encode: dict) -> None:
    expected, worst = _write_jpeg_series(tmp_path / "ct", transfer_syntax, bits, **encode)
    if encode.get("lossless"):
        assert worst == 0  # the reference itself is exact: the encoder was lossless
    else:
        assert 0 < worst <= 16  # lossy but close: the comparison below is not against the source
    volume = read_series(tmp_path / "ct")
    assert volume.meta["transfer_syntax_uids"] == [transfer_syntax]
    # GDCM's IJG-derived decoder and libjpeg-turbo agree sample for sample here; one grey level of
    # IDCT rounding is what two conforming baseline decoders may differ by
    tolerance = 0 if encode.get("lossless") else 1
    assert np.abs(np.asarray(volume.array, np.float64) - expected).max() <= tolerance


@pytest.mark.parametrize(
    ("transfer_syntax", "kwargs", "lossy"),
    [
        (JPEGLSLossless, {}, False),
        (JPEGLSNearLossless, {"jls_error": 3}, True),
        (JPEG2000Lossless, {}, False),
        (JPEG2000, {"j2k_cr": [4]}, True),
        (RLELossless, {}, False),
    ],
    ids=["jpeg-ls", "jpeg-ls-near-lossless", "jpeg2000-lossless", "jpeg2000-lossy", "rle"],
)
def test_jpeg_ls_jpeg2000_rle(tmp_path: Path, transfer_syntax: str, kwargs: dict, lossy: bool) -> None:
    """Lossless: bit for bit. Lossy: equal to imagecodecs' own CharLS / OpenJPEG decode of the same
    frames (another build of the reference decoders), and JPEG-LS within its NEAR bound."""
    stored = _anatomy(SHAPE)
    series = make_ct_series(tmp_path / "ct", shape=SHAPE, pixels=stored, write=False)
    expected = series.truth.copy()
    for k, (ds, path) in enumerate(zip(series.datasets, series.paths)):  # forward order: file k is slice k
        ds.compress(transfer_syntax, **kwargs)  # CharLS, OpenJPEG or pydicom's RLE encoder
        ds.save_as(path, enforce_file_format=True)
        if lossy:
            frame = next(generate_frames(ds.PixelData, number_of_frames=1))
            decode = imagecodecs.jpegls_decode if transfer_syntax == JPEGLSNearLossless else imagecodecs.jpeg2k_decode
            expected[:, :, k] = decode(frame).T.astype(np.float64) - 1024.0
    volume = read_series(tmp_path / "ct")
    assert volume.meta["transfer_syntax_uids"] == [transfer_syntax]
    np.testing.assert_array_equal(volume.array, expected)
    error = np.abs(expected - series.truth).max()
    if lossy:
        assert error > 0  # it really was lossy, so the reference above is not just the source
    if transfer_syntax == JPEGLSNearLossless:
        assert error <= kwargs["jls_error"]


def test_jpeg_is_decoded_by_gdcm_and_nothing_gpl_is_installed() -> None:
    """The JPEG processes have exactly one decoder, GDCM: the GPLv3 pylibjpeg-libjpeg is not installed
    (pylibjpeg's plugin for them needs it) and neither is any other JPEG decoder pydicom could pick."""
    import importlib.util

    assert importlib.util.find_spec("libjpeg") is None, "pylibjpeg-libjpeg (GPLv3) is installed"
    for ts in (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1):
        plugins = set(get_decoder(UID(ts)).available_plugins)
        assert "gdcm" in plugins and "pylibjpeg" not in plugins, (UID(ts).name, plugins)
    for ts in (JPEGLSLossless, JPEGLSNearLossless):
        assert {"gdcm", "pyjpegls"} <= set(get_decoder(UID(ts)).available_plugins)
    for ts in (JPEG2000Lossless, JPEG2000):
        assert {"gdcm", "pylibjpeg"} <= set(get_decoder(UID(ts)).available_plugins)


def test_jpeg_extended_12bit_is_refused_with_its_name(tmp_path: Path) -> None:
    """JPEG Extended with 12-bit samples (lossy, process 4) is not among the syntaxes README lists:
    pydicom does not let GDCM decode it and Pillow cannot, so the upload is refused as undecodable,
    naming the transfer syntax, rather than read wrongly. (8-bit JPEG Extended is decoded by GDCM.)"""
    stored = _anatomy(SHAPE)
    series = make_ct_series(tmp_path / "ct", shape=SHAPE, pixels=stored, write=False)
    for k, (ds, path) in enumerate(zip(series.datasets, series.paths)):
        frame = bytes(imagecodecs.jpeg8_encode(stored[:, :, k].T.copy(), level=95, bitspersample=12))
        _encapsulate(ds, frame, JPEGExtended12Bit)
        ds.save_as(path, enforce_file_format=True)
    with pytest.raises(InvalidVolume, match="cannot be decoded .*JPEG Extended"):
        read_series(tmp_path / "ct")
