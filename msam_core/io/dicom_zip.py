"""Safe extraction of zip uploads that hold DICOM files.

A zip from a user is hostile until proven otherwise. :func:`extract_zip` therefore

- never writes outside the destination folder: member names are *not* used as paths at all
  (members are written as ``<dest>/<index>.dcm``), and names that try to escape (absolute paths,
  drive letters, ``..`` components) or that are links are refused outright, so a zip-slip attempt
  is reported rather than silently ignored;
- refuses decompression bombs before and while extracting: the member count, each member's
  declared size and compression ratio, and the total declared size are checked up front, then the
  bytes actually produced are counted while streaming, so a header that lies about the sizes
  cannot get past the limits either;
- does not recurse into nested archives and ignores folder entries.
"""

from __future__ import annotations

import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from msam_core.errors import InvalidVolume

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ZipLimits:
    """Bounds on what a zip upload may expand to.

    Attributes:
        max_members: most files (folder entries not counted).
        max_total_bytes: most bytes all members may expand to, together.
        max_member_bytes: most bytes one member may expand to.
        max_ratio: largest allowed ``uncompressed / compressed`` size of one member (only checked
            for members larger than ``ratio_min_bytes``; tiny files have meaningless ratios).
        ratio_min_bytes: see ``max_ratio``.
    """

    max_members: int = 20_000
    max_total_bytes: int = 8 << 30
    max_member_bytes: int = 2 << 30
    max_ratio: float = 200.0
    ratio_min_bytes: int = 1 << 20


DEFAULT_ZIP_LIMITS = ZipLimits()


def _check_member_name(name: str) -> None:
    """Refuse member names that would write outside the extraction folder if used as paths."""
    posix = PurePosixPath(name.replace("\\", "/"))
    windows = PureWindowsPath(name)
    if (
        name.startswith(("/", "\\"))
        or posix.is_absolute()
        or windows.drive
        or windows.is_absolute()
        or ".." in posix.parts
        or "\x00" in name
    ):
        raise InvalidVolume(
            f"the zip file contains an unsafe entry name {name!r} (absolute path or '..'); "
            "re-create the zip with relative paths inside one folder"
        )


def _is_link(info: zipfile.ZipInfo) -> bool:
    mode = info.external_attr >> 16
    return stat.S_ISLNK(mode)


def extract_zip(zip_path: str | Path, dest: str | Path, limits: ZipLimits = DEFAULT_ZIP_LIMITS) -> list[Path]:
    """Extract the regular files of ``zip_path`` into ``dest`` (which must exist) and return them.

    Raises:
        InvalidVolume: the file is not a readable zip, holds an unsafe entry or link, or would
            expand beyond ``limits``.
    """
    dest = Path(dest)
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidVolume(f"the upload is not a readable zip file ({exc})") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        for m in archive.infolist():
            _check_member_name(m.filename)
        if len(members) > limits.max_members:
            raise InvalidVolume(
                f"the zip file holds {len(members)} files, more than the limit of {limits.max_members}"
            )
        declared_total = 0
        for m in members:
            if _is_link(m):
                raise InvalidVolume(f"the zip file contains a symbolic link {m.filename!r}; links are not accepted")
            if m.flag_bits & 0x1:
                raise InvalidVolume("the zip file is encrypted; upload an unencrypted zip")
            _check_size(m.filename, m.file_size, m.compress_size, limits)
            declared_total += m.file_size
        if declared_total > limits.max_total_bytes:
            raise InvalidVolume(
                f"the zip file would expand to {declared_total} bytes, more than the limit of "
                f"{limits.max_total_bytes} bytes"
            )

        written: list[Path] = []
        total = 0
        for index, m in enumerate(members):
            target = dest / f"{index:06d}.dcm"
            produced = 0
            try:
                with archive.open(m) as src, open(target, "wb") as out:
                    while chunk := src.read(_CHUNK):
                        produced += len(chunk)
                        total += len(chunk)
                        # Sizes are checked on the bytes really produced, not only on the header.
                        if produced > m.file_size or produced > limits.max_member_bytes:
                            raise InvalidVolume(
                                f"zip entry {m.filename!r} expands beyond its declared size; the zip "
                                "file is corrupt or malicious"
                            )
                        if total > limits.max_total_bytes:
                            raise InvalidVolume(
                                f"the zip file expands beyond the limit of {limits.max_total_bytes} bytes"
                            )
                        out.write(chunk)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, RuntimeError) as exc:
                raise InvalidVolume(f"zip entry {m.filename!r} cannot be read ({exc})") from None
            written.append(target)
        return written


def _check_size(name: str, size: int, compressed: int, limits: ZipLimits) -> None:
    if size > limits.max_member_bytes:
        raise InvalidVolume(
            f"zip entry {name!r} expands to {size} bytes, more than the per-file limit of "
            f"{limits.max_member_bytes} bytes"
        )
    if size >= limits.ratio_min_bytes and size > limits.max_ratio * max(compressed, 1):
        raise InvalidVolume(
            f"zip entry {name!r} has a compression ratio of {size / max(compressed, 1):.0f}:1, above the "
            f"limit of {limits.max_ratio:.0f}:1 (possible decompression bomb)"
        )
