"""sha256 of files, read in blocks (weights, cached features, exported graphs). Torch-free: the ONNX-only
`fedafd-edge infer` install uses it too."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(*paths: Path) -> str:
    """sha256 over the bytes of the files in order (for one file: its plain sha256)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
