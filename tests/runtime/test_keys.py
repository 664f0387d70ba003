"""Reading public keys: a .pub file is bare z85 text (which may start with "{", a z85 character); a .key
file is the JSON pair."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq

from fedafd.runtime.keys import KeyFileError, generate_keypair, load_public_key


def test_a_pub_file_whose_key_starts_with_a_brace_is_read_as_z85(tmp_path: Path) -> None:
    # Prepare: a real CURVE public key that starts with "{" (about 1 key in 85 does).
    public = next(p for p, _ in iter(zmq.curve_keypair, None) if p.startswith(b"{"))
    pub = tmp_path / "server.pub"
    pub.write_text(public.decode() + "\n")
    # Execute / Assert
    assert load_public_key(pub) == public


def test_a_key_file_gives_its_public_half_and_garbage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "edge.key"
    generate_keypair(path)
    assert load_public_key(path) == (tmp_path / "edge.pub").read_text().strip().encode()
    bad = tmp_path / "bad.key"
    bad.write_text("{not json")
    with pytest.raises(KeyFileError, match="not a key pair file"):
        load_public_key(bad)
    with pytest.raises(KeyFileError, match="40 z85 characters"):
        load_public_key("tooshort")
