"""Decompression with a ceiling: compressed input is expanded while streaming, never past a
given number of output bytes, so a small file cannot make a reader allocate gigabytes.

Readers that expand compressed data themselves (pynrrd's gzip/bzip2 encodings, pydicom's
Deflated Explicit VR Little Endian, SimpleITK's MetaImage ``CompressedData``) decompress the whole stream into memory before any size is
checked; the input guards rewrite such files through :func:`decompress_to` first, bounded by
what the file's own header declares (see :func:`msam_core.io.nrrd.decompress_nrrd`,
:func:`msam_core.io.dicom.inflate_deflated` and :func:`msam_core.io.metaimage.inflate_metaimage`).
"""

from __future__ import annotations

import bz2
import zlib
from typing import BinaryIO, Literal

from msam_core.errors import InvalidVolume

Codec = Literal["gzip", "bzip2", "deflate", "zlib"]
_IN_CHUNK = 1 << 16
_OUT_CHUNK = 1 << 20


def _new(codec: Codec) -> zlib._Decompress | bz2.BZ2Decompressor:  # type: ignore[name-defined]
    if codec == "gzip":
        return zlib.decompressobj(zlib.MAX_WBITS | 16)
    if codec == "deflate":
        return zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, no header (DICOM PS3.5 A.5)
    if codec == "zlib":
        return zlib.decompressobj(zlib.MAX_WBITS | 32)  # zlib or gzip header, as MetaIO inflates it
    return bz2.BZ2Decompressor()


def decompress_to(src: BinaryIO, dst: BinaryIO, codec: Codec, max_out: int, what: str) -> tuple[int, bool]:
    """Decompress ``src`` (from its current position) into ``dst``, writing at most ``max_out``
    bytes.

    Returns ``(bytes written, ended)``: ``ended`` is True when the compressed stream ended at or
    before ``max_out`` bytes, False when decompression stopped at the ceiling (whatever remains
    is never expanded). gzip and bzip2 streams of several members are read as one, as their
    command-line tools do; after the end of a raw deflate or a zlib stream the rest of ``src`` is
    ignored.

    Raises:
        InvalidVolume: the data is corrupt or ends in the middle of a stream (``what`` names the
            data in the message).
    """
    dec = _new(codec)
    written = 0
    pending = b""
    try:
        while True:
            if dec.eof:
                pending = dec.unused_data + pending
                if codec in ("deflate", "zlib") or not (pending or (pending := src.read(_IN_CHUNK))):
                    return written, True
                dec = _new(codec)  # the next member of a multi-member gzip / bzip2 file
            room = max_out - written
            if room <= 0:
                return written, False
            if isinstance(dec, bz2.BZ2Decompressor):
                data = b""
                if dec.needs_input:
                    data, pending = (pending or src.read(_IN_CHUNK)), b""
                    if not data:
                        raise InvalidVolume(f"{what}: the bzip2 data ends in the middle of a stream; is the file complete?")
                out = dec.decompress(data, max_length=min(room, _OUT_CHUNK))
            else:
                if not pending and not dec.unconsumed_tail:
                    pending = src.read(_IN_CHUNK)
                    if not pending:
                        raise InvalidVolume(f"{what}: the {codec} data ends in the middle of a stream; is the "
                                            "file complete?")
                out = dec.decompress(dec.unconsumed_tail + pending, min(room, _OUT_CHUNK))
                pending = b""
            dst.write(out)
            written += len(out)
    except (zlib.error, OSError, EOFError, ValueError) as exc:
        raise InvalidVolume(f"{what}: the {codec} data is corrupt ({type(exc).__name__})") from exc
