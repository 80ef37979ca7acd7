"""API keys per tenant, stored hashed.

Configuration (``MSAM_API_KEYS`` and/or the file ``MSAM_API_KEYS_FILE``) holds entries
``tenant:sha256hex`` - the SHA-256 of the key, never the key itself; ``msam hash-key`` prints an
entry for a new random key (or for a key you give it). Callers send ``Authorization: Bearer <key>``;
the gateway hashes what it receives and looks the digest up (constant-time compare).

Without any key the service has no authentication, so it must only be reachable from this
machine: :func:`check_bind` refuses any non-loopback listen address.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import re
import secrets
import sys
from collections.abc import Iterable

_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.strip().encode()).hexdigest()


def load_keys(entries: Iterable[str]) -> dict[str, str]:
    """``{sha256 digest: tenant}``; ``ValueError`` names a malformed entry (by position, never
    its text: a pasted plain key must not end up in a log)."""
    keys: dict[str, str] = {}
    for n, entry in enumerate(entries, start=1):
        tenant, sep, digest = entry.strip().partition(":")
        digest = digest.strip().lower()
        if not sep or not _TENANT_RE.match(tenant.strip()) or not _DIGEST_RE.match(digest):
            raise ValueError(f"API key entry #{n} is not 'tenant:sha256hex' (tenant: letters, digits, '._-'; "
                             "the SHA-256 of the key, 64 hex digits); make one with `msam hash-key`")
        if digest in keys and keys[digest] != tenant.strip():
            raise ValueError(f"API key entry #{n}: the same key is configured for two tenants")
        keys[digest] = tenant.strip()
    return keys


def tenant_for(token: str, keys: dict[str, str]) -> str | None:
    """The tenant of a presented key, or ``None``."""
    digest = hash_key(token)
    found = None
    for known, tenant in keys.items():  # compare every entry: no early exit
        if hmac.compare_digest(known, digest):
            found = tenant
    return found


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, have_keys: bool) -> None:
    if not have_keys and not is_loopback(host):
        raise ValueError(f"refusing to listen on {host} without API keys: set MSAM_API_KEYS or "
                         "MSAM_API_KEYS_FILE ('tenant:sha256', see `msam hash-key`), or bind 127.0.0.1")


def _hash_key_command(args: argparse.Namespace) -> int:
    key = sys.stdin.readline().strip() if args.stdin else secrets.token_urlsafe(32)
    if not key:
        print("msam hash-key: empty key", file=sys.stderr)
        return 2
    if not _TENANT_RE.match(args.tenant):
        print("msam hash-key: tenant: letters, digits, '._-' (at most 64)", file=sys.stderr)
        return 2
    if not args.stdin:
        print(f"key (give it to the tenant; it is not stored): {key}", file=sys.stderr)
    print(f"{args.tenant}:{hash_key(key)}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hash-key", help="make a 'tenant:sha256' entry for MSAM_API_KEYS",
                       description="Print 'tenant:sha256(key)' for MSAM_API_KEYS / MSAM_API_KEYS_FILE. "
                                   "Without --stdin a random key is made and shown once on stderr.")
    p.add_argument("tenant")
    p.add_argument("--stdin", action="store_true", help="read the key from the first line of stdin")
    p.set_defaults(func=_hash_key_command)
