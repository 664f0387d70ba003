"""CURVE key pairs and the server's allow-list of edge keys, as small files (no pickle, 0600).

A key pair is a JSON file `NAME.key` {"public": z85, "secret": z85} beside `NAME.pub` holding the public
key alone (one line of z85, the thing to copy to the other side). The allow-list is a JSON file
{"clients": {client_id: public z85}} that the server reads again for every new connection, so
`fedafd-cloud nodes add|revoke` take effect without a restart. All files are written atomically
(temp file + rename) with permissions 0600.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import zmq

from fedafd.runtime.files import atomic_write
from fedafd.runtime.errors import FedafdError

SERVER_KEY = "server.key"
ALLOW_LIST = "allowed_clients.json"
_Z85_KEY_LEN = 40


class KeyFileError(FedafdError):
    """A key file or allow-list is missing or malformed; the message names the file."""


@dataclass(frozen=True)
class KeyPair:
    public: bytes
    """z85, 40 bytes."""
    secret: bytes
    """z85, 40 bytes."""


def _write_private(path: Path, text: str) -> None:
    """Atomic write with mode 0600 from the start (the temporary file never exists with wider permissions)."""
    atomic_write(path, lambda tmp: tmp.write_text(text), durable=True, mode=0o600)


def check_z85_key(key: str, what: str) -> str:
    key = key.strip()
    if len(key) != _Z85_KEY_LEN:
        raise KeyFileError(f"{what} is not a CURVE public key (40 z85 characters), got {len(key)} characters")
    try:
        zmq.utils.z85.decode(key.encode("ascii"))
    except Exception:
        raise KeyFileError(f"{what} is not valid z85") from None
    return key


def generate_keypair(path: Path, overwrite: bool = False) -> KeyPair:
    """Writes `path` (.key, the pair) and `path.with_suffix('.pub')`; refuses to overwrite a key."""
    if path.exists() and not overwrite:
        raise KeyFileError(f"{path} exists; refusing to overwrite a key (delete it or pick another name)")
    public, secret = zmq.curve_keypair()
    _write_private(path, json.dumps({"public": public.decode(), "secret": secret.decode()}) + "\n")
    _write_private(path.with_suffix(".pub"), public.decode() + "\n")
    return KeyPair(public, secret)


def load_keypair(path: Path) -> KeyPair:
    try:
        data = json.loads(path.read_text())
        public, secret = data["public"], data["secret"]
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} not found (create one with the `keys` command)") from None
    except (ValueError, KeyError, TypeError):
        raise KeyFileError(f"{path} is not a key pair file written by the `keys` command") from None
    if path.stat().st_mode & 0o077:
        raise KeyFileError(f"{path} holds a secret key but is readable by others; chmod 600 {path}")
    return KeyPair(check_z85_key(public, f"{path} public").encode(), check_z85_key(secret, f"{path} secret").encode())


def load_public_key(value: str | Path) -> bytes:
    """A public key given as a .pub file, a .key file, or the z85 text itself."""
    path = Path(value)
    if path.exists():
        text = path.read_text().strip()
        # A .key file is a JSON object; a .pub file is the bare z85 text, which may itself start with "{"
        # (a z85 character), so the suffix decides, not the first character.
        if path.suffix == ".key":
            try:
                text = json.loads(text)["public"]
            except (ValueError, KeyError, TypeError):
                raise KeyFileError(f"{path} is not a key pair file written by the `keys` command") from None
        return check_z85_key(text, str(path)).encode()
    return check_z85_key(str(value), "the key").encode()


class AllowList:
    """The edge keys a server admits: client id -> public key, in one JSON file read on every lookup."""

    def __init__(self, path: Path):
        self.path = path

    def entries(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            raise KeyFileError(f"allow-list {self.path} is not valid JSON") from None
        clients = data.get("clients") if isinstance(data, dict) else None
        if not isinstance(clients, dict):
            raise KeyFileError(f"allow-list {self.path} must be {{\"clients\": {{id: key}}}}")
        return {str(k): str(v) for k, v in clients.items()}

    def client_of_key(self, public_z85: str) -> str | None:
        """The client id this key belongs to, or None (unknown or revoked); reads the file now."""
        for client_id, key in self.entries().items():
            if key == public_z85:
                return client_id
        return None

    def add(self, client_id: str, public_z85: str) -> None:
        key = check_z85_key(public_z85, "the key")
        entries = self.entries()
        owner = next((cid for cid, k in entries.items() if k == key and cid != client_id), None)
        if owner is not None:
            raise KeyFileError(f"that key is already allow-listed as {owner!r}; one key per client id")
        entries[client_id] = key
        self._write(entries)

    def revoke(self, client_id: str) -> None:
        entries = self.entries()
        if client_id not in entries:
            raise KeyFileError(f"{client_id!r} is not in the allow-list {self.path}")
        del entries[client_id]
        self._write(entries)

    def _write(self, entries: dict[str, str]) -> None:
        _write_private(self.path, json.dumps({"clients": dict(sorted(entries.items()))}, indent=2) + "\n")
