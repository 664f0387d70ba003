"""Every byte counted: a thread-safe counter of the bytes of every message (magic + header + tensor
frames) by round, client, direction and message type, fed by the messengers (messaging.py). Direction is
from the network's point of view on both sides: "up" = client -> server, "down" = server -> client; a
malformed message counts under msg_type "malformed".

Beside the per-message-type counts, the same bytes are also counted by what they carry (`PARTS`):
the tensor frames of FeatureUpload.features ("public_features"), of RoundStart.global_features
("global_features"), of RoundStart.consensus ("consensus", FedMD) and of RoundStart.tower ("global_tower"); everything else (magic, headers, public
indices, all other messages) is "control". Both views sum to the same total.
"""

from __future__ import annotations

import threading
from collections import defaultdict

import msgpack

DIRECTIONS = ("up", "down")
MALFORMED = "malformed"
PARTS = ("public_features", "global_features", "consensus", "global_tower", "control")
_PART_OF_FIELD = {("feature_upload", "features"): "public_features",
                  ("round_start", "global_features"): "global_features",
                  ("round_start", "consensus"): "consensus",
                  ("round_start", "tower"): "global_tower"}


class ByteCounter:
    """Bytes per (round, client, direction, msg_type); reads return plain JSON-ready dicts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes: dict[tuple[int, str, str, str], int] = defaultdict(int)
        self._parts: dict[tuple[int, str, str, str], int] = defaultdict(int)

    def add_parts(self, round: int, client: str, direction: str, parts: dict[str, int]) -> None:
        """Counts the same bytes as `add`, split by what they carry (keys from PARTS)."""
        with self._lock:
            for part, n in parts.items():
                self._parts[(int(round), str(client), direction, part)] += int(n)

    def parts_for_round(self, round: int) -> dict[str, dict[str, dict[str, int]]]:
        """{client: {"up": {part: bytes}, "down": {...}}} for one round."""
        return self._nest(lambda r: r == round, self._parts)

    def add(self, round: int, client: str, direction: str, msg_type: str, nbytes: int) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
        with self._lock:
            self._bytes[(int(round), str(client), direction, str(msg_type))] += int(nbytes)

    def rounds(self) -> list[int]:
        with self._lock:
            return sorted({r for r, *_ in self._bytes})

    def for_round(self, round: int) -> dict[str, dict[str, dict[str, int]]]:
        """{client: {"up": {msg_type: bytes}, "down": {...}}} for one round."""
        return self._nest(lambda r: r == round)

    def totals(self) -> dict[str, dict[str, dict[str, int]]]:
        """Same shape as `for_round`, summed over all rounds."""
        return self._nest(lambda r: True)

    def _nest(self, keep, table=None) -> dict[str, dict[str, dict[str, int]]]:
        out: dict[str, dict[str, dict[str, int]]] = {}
        with self._lock:
            items = list((self._bytes if table is None else table).items())
        for (r, client, direction, msg_type), n in items:
            if keep(r):
                per_dir = out.setdefault(client, {d: {} for d in DIRECTIONS})[direction]
                per_dir[msg_type] = per_dir.get(msg_type, 0) + n
        return out


def _frame_nbytes(frame) -> int:
    return memoryview(getattr(frame, "buffer", frame)).nbytes  # a zmq.Frame or a buffer


def frames_nbytes(frames) -> int:
    """Bytes of one message: all its frames."""
    return sum(_frame_nbytes(f) for f in frames)


def frame_parts(frames) -> dict[str, int]:
    """Bytes of one message's frames by what they carry (PARTS); unreadable messages are all control."""
    sizes = [_frame_nbytes(f) for f in frames]
    parts = dict.fromkeys(PARTS, 0)
    try:
        header = msgpack.unpackb(getattr(frames[1], "buffer", frames[1]), raw=False)
        mtype, descs = header["type"], header["tensors"]
        names = [d["name"] for d in descs]
    except Exception:  # malformed: whatever it is, it is not a payload we asked for
        names, mtype = [], ""
    if not isinstance(names, list) or len(names) != len(sizes) - 2:
        names = []
    parts["control"] = sum(sizes[:2]) if names else sum(sizes)
    for name, n in zip(names, sizes[2:]):
        field = str(name).partition("/")[0]
        parts[_PART_OF_FIELD.get((mtype, field), "control")] += n
    return {k: v for k, v in parts.items() if v}
