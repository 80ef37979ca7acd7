"""Hostile zip uploads: path traversal, links, decompression bombs, lying headers."""

from __future__ import annotations

import stat
import struct
import zipfile
from pathlib import Path

import pytest

from msam_core.errors import InvalidVolume
from msam_core.io.dicom import read_series
from msam_core.io.dicom_zip import ZipLimits, extract_zip
from tests.unit.io.dicom_synth import make_ct_series


def _zip_of_series(tmp_path: Path, extra: dict[str, bytes] | None = None) -> Path:
    series = make_ct_series(tmp_path / "ct", shape=(12, 10, 4))
    path = tmp_path / "upload.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for p in series.paths:
            z.write(p, f"study/{p.name}")
        for name, data in (extra or {}).items():
            z.writestr(zipfile.ZipInfo(name), data)
    return path


@pytest.mark.parametrize(
    "name",
    ["../../escaped.dcm", "study/../../escaped.dcm", "/tmp/escaped.dcm", "C:\\escaped.dcm", "..\\escaped.dcm"],
)
def test_zip_slip_is_refused_and_nothing_escapes(tmp_path: Path, name: str) -> None:
    path = _zip_of_series(tmp_path, {name: b"DICM"})
    with pytest.raises(InvalidVolume, match="unsafe entry name"):
        read_series(path)
    assert not list(tmp_path.parent.glob("escaped.dcm"))
    assert not Path("/tmp/escaped.dcm").exists()


def test_symbolic_link_is_refused(tmp_path: Path) -> None:
    path = _zip_of_series(tmp_path)
    with zipfile.ZipFile(path, "a") as z:
        info = zipfile.ZipInfo("study/link.dcm")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, "/etc/passwd")
    with pytest.raises(InvalidVolume, match="symbolic link"):
        read_series(path)


def test_decompression_bomb_is_refused_before_extraction(tmp_path: Path) -> None:
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("study/zeros.dcm", bytes(20 << 20))  # 20 MiB of zeros, about 1000:1
    assert path.stat().st_size < 100_000
    with pytest.raises(InvalidVolume, match=r"compression ratio of \d+:1, above the limit of 200:1 \(possible decompression bomb\)"):
        read_series(path)


def test_total_size_and_member_count_limits(tmp_path: Path) -> None:
    path = _zip_of_series(tmp_path)
    with pytest.raises(InvalidVolume, match="would expand to .* more than the limit"):
        read_series(path, zip_limits=ZipLimits(max_total_bytes=1000))
    with pytest.raises(InvalidVolume, match="holds 4 files, more than the limit of 3"):
        read_series(path, zip_limits=ZipLimits(max_members=3))
    with pytest.raises(InvalidVolume, match="per-file limit"):
        read_series(path, zip_limits=ZipLimits(max_member_bytes=100))


def test_header_that_understates_the_size_is_caught_while_streaming(tmp_path: Path) -> None:
    path = tmp_path / "liar.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.dcm", bytes(3 << 20))
    data = bytearray(path.read_bytes())
    # declare 1000 bytes uncompressed in both the local header and the central directory
    local = data.find(b"PK\x03\x04")
    struct.pack_into("<I", data, local + 22, 1000)
    central = data.find(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 1000)
    path.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InvalidVolume, match="a.dcm"):
        extract_zip(path, out)
    assert all(f.stat().st_size <= 1000 for f in out.iterdir())


def test_extraction_never_uses_member_names(tmp_path: Path) -> None:
    path = _zip_of_series(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    files = extract_zip(path, out)
    assert [f.parent for f in files] == [out] * 4
    assert sorted(f.name for f in files) == [f"{i:06d}.dcm" for i in range(4)]


def test_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "broken.zip"
    path.write_bytes(b"PK\x03\x04 this is not really a zip")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InvalidVolume, match="not a readable zip"):
        extract_zip(path, out)
