"""What the server's socket accepts, from the config alone: no torch, so `serve` binds and starts its
--local devices before the slow imports of the server process."""

from __future__ import annotations

from fedafd.runtime.config import ServerConfig
from fedafd.runtime.wire import MAX_HEADER_BYTES

_MAX_PUBLIC_ROWS = 1 << 16
"""Upper bound on |P| used to size the server's per-message limit when public_size is 0 (all)."""


def max_upload_bytes(config: ServerConfig) -> int:
    """The largest message a device ever sends this server: two float32 (|P|, d) feature tensors plus
    headers. The server's socket drops any bigger frame before buffering it (ZMQ MAXMSGSIZE)."""
    rows = config.public_size or _MAX_PUBLIC_ROWS
    return 2 * rows * config.feature_dim * 4 + 2 * MAX_HEADER_BYTES
