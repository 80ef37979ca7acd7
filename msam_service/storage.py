"""Uploads and results: a directory shared by gateway and workers, with expiry.

Everything is addressed by a *key* (``volumes/<id>/...``, ``jobs/<id>/...``), never by a name a
client chose. :class:`Storage` is what api/ and worker/ use; :class:`LocalStorage` keeps the keys
as files under one root (a volume in compose, a ReadWriteMany claim in Kubernetes). An object
store implementation only has to provide the same methods (``local_copy`` downloads, ``put_file``
uploads).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

_KEY_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
#: Top-level prefixes that hold one folder per volume / job (the unit of expiry).
PREFIXES = ("volumes", "jobs")


def check_key(key: str) -> str:
    if not _KEY_RE.match(key) or any(part in (".", "..") for part in key.split("/")):
        raise ValueError(f"invalid storage key {key!r}")
    return key


class Storage(Protocol):
    def put_file(self, key: str, src: Path) -> None: ...

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def get_bytes(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def local_copy(self, key: str) -> contextlib.AbstractContextManager[Path]: ...

    def delete_prefix(self, prefix: str) -> None: ...

    def staging_dir(self) -> Path: ...

    def touch(self, prefix: str) -> None: ...

    def sweep(self, max_age_s: float) -> int: ...

    def entries(self, prefix: str) -> list[tuple[str, float]]: ...


class LocalStorage:
    """Keys as files below ``root`` (shared by every process that mounts it)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        for sub in (*PREFIXES, "staging"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_file(self, key: str, src: Path) -> None:
        dst = self.path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)  # same filesystem: staging is under root

    def put_bytes(self, key: str, data: bytes) -> None:
        dst = self.path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dst)  # readers never see half a file

    def get_bytes(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    @contextlib.contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        """A local path to read ``key`` (a file or a folder); local storage needs no copy."""
        path = self.path(key)
        if not path.exists():
            raise FileNotFoundError(key)
        yield path

    def delete_prefix(self, prefix: str) -> None:
        path = self.path(prefix)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink(missing_ok=True)

    def staging_dir(self) -> Path:
        """A fresh private folder for an upload in progress (same filesystem as the keys)."""
        import tempfile

        return Path(tempfile.mkdtemp(dir=self.root / "staging"))

    def touch(self, prefix: str) -> None:
        """Mark ``prefix`` as used now (expiry counts from the last use)."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path(prefix))

    def sweep(self, max_age_s: float) -> int:
        """Delete volume/job folders and stale staging folders older than ``max_age_s``."""
        cutoff = time.time() - max_age_s
        removed = 0
        for sub in (*PREFIXES, "staging"):
            for entry in (self.root / sub).iterdir():
                try:
                    if entry.stat().st_mtime < cutoff:
                        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed


    def entries(self, prefix: str) -> list[tuple[str, float]]:
        """``(name, seconds since last use)`` of each folder/file directly under ``prefix``."""
        now = time.time()
        out = []
        for entry in self.path(prefix).iterdir():
            try:
                out.append((entry.name, now - entry.stat().st_mtime))
            except FileNotFoundError:
                continue
        return out


def make_storage(root: Path) -> Storage:
    return LocalStorage(root)
