"""The web page's local users: names, roles and scrypt password hashes in ``<storage>/users.json`` (0600).

Two roles: ``viewer`` (sees studies and results) and ``admin`` (also resends and
re-analyses). Passwords are hashed with scrypt (stdlib ``hashlib.scrypt``,
N=2^14, r=8, p=1, a 16-byte salt each) and compared in constant time; the
file never holds a password.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from node.errors import AdminError
from node.store import write_atomic

ROLES = ("viewer", "admin")
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_N, _R, _P = 2**14, 8, 1
MIN_PASSWORD = 10


@dataclass(frozen=True)
class User:
    name: str
    role: str


def _hash(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32, maxmem=64 * 2**20)


class Users:
    """``<storage>/users.json``."""

    def __init__(self, storage_root: Path) -> None:
        self.path = Path(storage_root) / "users.json"

    def _read(self) -> dict[str, dict[str, str]]:
        try:
            return dict(json.loads(self.path.read_text()))
        except FileNotFoundError:
            return {}

    def _write(self, users: dict[str, dict[str, str]]) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(users, indent=1, sort_keys=True).encode(), mode=0o600)

    def add(self, name: str, password: str, role: str) -> None:
        if not _NAME.match(name):
            raise AdminError(f"user name {name!r} must be 1-64 letters, digits, '_', '.', '@' or '-'")
        if role not in ROLES:
            raise AdminError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if len(password) < MIN_PASSWORD:
            raise AdminError(f"the password must have at least {MIN_PASSWORD} characters")
        salt = os.urandom(16)
        users = self._read()
        users[name] = {"role": role, "scrypt": f"{_N}:{_R}:{_P}:{base64.b64encode(salt).decode()}:"
                                                f"{base64.b64encode(_hash(password, salt)).decode()}"}
        self._write(users)

    def remove(self, name: str) -> None:
        users = self._read()
        if name not in users:
            raise AdminError(f"no user {name!r}")
        del users[name]
        self._write(users)

    def list(self) -> list[User]:
        return [User(name, entry["role"]) for name, entry in sorted(self._read().items())]

    def verify(self, name: str, password: str) -> User | None:
        """The user if ``password`` is theirs, else None (the same work either way)."""
        entry = self._read().get(name)
        if entry is None:
            _hash(password, b"\0" * 16)  # as slow for an unknown name as for a wrong password
            return None
        n, r, p, salt, digest = entry["scrypt"].split(":")
        actual = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                                dklen=32, maxmem=64 * 2**20)
        return User(name, entry["role"]) if hmac.compare_digest(actual, base64.b64decode(digest)) else None
