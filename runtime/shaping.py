"""Device profiles and link emulation in the client's transport layer (no root, works on loopback).

A device profile (TOML) describes a device and its link: uplink/downlink bandwidth, round-trip time,
how much slower it computes than the reference machine, how often it is available, and where the
numbers come from. Shipped profiles live in `runtime/profiles/NAME.toml`; `load_profile` takes a
shipped name or a path.

`ShapedClientTransport` wraps any `ClientTransport` and gives it the profile's link:
- each direction is a token bucket of `burst_bytes` filled at the direction's bandwidth; a message of
  n bytes leaves when the bucket has paid for it (messages larger than the bucket run it into debt, so
  back-to-back messages queue behind each other like on a real link);
- each message then takes half the round-trip time to arrive.
Uplink messages are handed to the real transport by a delivery thread at their arrival time (the sender
does not block, as with a real socket buffer); downlink messages are held after the real transport
received them until their arrival time. A transfer of n bytes on an idle link therefore takes
max(0, n - burst_bytes) / bandwidth + rtt / 2. Bytes counted are the real frames' bytes.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

from .tomlfile import read_toml
from .errors import FedafdError
from .transport import ClientTransport, Frames, TransportError

PROFILES_DIR = Path(__file__).parent / "profiles"


class ProfileError(FedafdError):
    """A device profile is missing or malformed; the message names the file and key."""


@dataclass(frozen=True)
class DeviceProfile:
    """One device and its link. Bandwidths in megabits per second (10**6 bit/s)."""

    name: str
    """Short name (the file's stem for shipped profiles)."""
    description: str
    """What device and link this is."""
    uplink_mbps: float
    """Device -> server bandwidth."""
    downlink_mbps: float
    """Server -> device bandwidth."""
    rtt_ms: float
    """Round-trip time to the server; each message is delayed by half of it."""
    compute_factor: float = 1.0
    """This device's compute time relative to the reference machine (>1: slower)."""
    availability: float = 1.0
    """Fraction of rounds the device is expected to be online and idle (informational)."""
    burst_bytes: int = 16384
    """Token-bucket size of each direction: bytes that may leave at once on an idle link."""
    source: str = ""
    """Where the numbers come from."""
    train_ms_per_sample: float = 0.0
    """Measured by `fedafd-edge bench` (0: not measured)."""
    extract_ms_per_sample: float = 0.0
    """Measured by `fedafd-edge bench` (0: not measured)."""
    infer_ms_per_sample: float = 0.0
    """Measured by `fedafd-edge bench` on the exported ONNX model (0: not measured)."""

    def __post_init__(self) -> None:
        for key in ("uplink_mbps", "downlink_mbps", "compute_factor"):
            if not getattr(self, key) > 0:
                raise ProfileError(f"profile {self.name!r}: {key} must be > 0, got {getattr(self, key)}")
        if self.rtt_ms < 0 or self.burst_bytes < 0 or not 0 <= self.availability <= 1:
            raise ProfileError(f"profile {self.name!r}: rtt_ms and burst_bytes must be >= 0, availability in [0, 1]")

    @property
    def uplink_bytes_per_s(self) -> float:
        return self.uplink_mbps * 1e6 / 8

    @property
    def downlink_bytes_per_s(self) -> float:
        return self.downlink_mbps * 1e6 / 8

    def transfer_seconds(self, nbytes: int, direction: str) -> float:
        """Time one message of `nbytes` takes on an idle link (what the shaper enforces)."""
        rate = self.uplink_bytes_per_s if direction == "up" else self.downlink_bytes_per_s
        return max(0, nbytes - self.burst_bytes) / rate + self.rtt_ms / 2000


def shipped_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A shipped profile by name (e.g. phone_lte) or a TOML file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES_DIR / f"{name_or_path}.toml"
        if not path.exists():
            raise ProfileError(f"no shipped profile {str(name_or_path)!r}; shipped: {', '.join(shipped_profiles())} "
                               f"(or pass a path to a .toml file)")
    values = read_toml(path, "profile file", ProfileError)
    values.setdefault("name", path.stem)
    known = {f.name for f in fields(DeviceProfile)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ProfileError(f"profile {path}: unknown key(s) {unknown}; known: {sorted(known)}")
    try:
        return DeviceProfile(**values)
    except TypeError as e:
        raise ProfileError(f"profile {path}: {e}") from None


def profile_to_toml(profile: DeviceProfile) -> str:
    """The profile as a TOML file (tomllib reads it back into the same profile)."""
    lines = []
    for key, value in asdict(profile).items():
        if isinstance(value, str):
            escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")
            lines.append(f'{key} = "{escaped}"')
        else:
            lines.append(f"{key} = {value!r}")
    return "\n".join(lines) + "\n"


class TokenBucket:
    """`rate` bytes/s, at most `burst` bytes saved up; `reserve(n)` says how long until n bytes have left."""

    def __init__(self, rate: float, burst: float, now: float):
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def reserve(self, nbytes: int, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= nbytes  # may go negative: later messages wait for this one's debt too
        return max(0.0, -self.tokens / self.rate)


def _nbytes(frames: Frames) -> int:
    return sum(memoryview(getattr(f, "buffer", f)).nbytes for f in frames)


class ShapedClientTransport:
    """A ClientTransport with the link of `profile` (see the module docstring)."""

    def __init__(self, inner: ClientTransport, profile: DeviceProfile,
                 clock: Callable[[], float] = time.monotonic):
        self.inner = inner
        self.profile = profile
        self._clock = clock
        now = clock()
        self._up = TokenBucket(profile.uplink_bytes_per_s, profile.burst_bytes, now)
        self._down = TokenBucket(profile.downlink_bytes_per_s, profile.burst_bytes, now)
        self._one_way = profile.rtt_ms / 2000
        self._outbox: list[tuple[float, int, list[bytes]]] = []
        self._order = itertools.count()
        self._cv = threading.Condition()
        self._send_lock = threading.Lock()  # the delivery thread's send vs reconnect
        self._inbox: list[tuple[float, Frames]] = []
        self._closed = False
        self._error: TransportError | None = None
        self.shaped_seconds = {"up": 0.0, "down": 0.0}
        """Total emulated transfer time per direction (bandwidth wait + half the RTT per message)."""
        self._sender = threading.Thread(target=self._deliver, name="shaped-uplink", daemon=True)
        self._sender.start()

    # -- uplink: scheduled, delivered by a thread --------------------------------------------------
    def send(self, frames: Frames) -> None:
        data = [memoryview(getattr(f, "buffer", f)).tobytes() for f in frames]  # the caller may reuse its buffers
        with self._cv:
            if self._closed:
                raise TransportError("transport is closed")
            if self._error is not None:
                raise self._error
            now = self._clock()
            delay = self._up.reserve(sum(len(d) for d in data), now) + self._one_way
            self.shaped_seconds["up"] += delay
            heapq.heappush(self._outbox, (now + delay, next(self._order), data))
            self._cv.notify()

    def _deliver(self) -> None:
        while True:
            with self._cv:
                while not self._outbox and not self._closed:
                    self._cv.wait()
                if not self._outbox:
                    return
                due, _, data = self._outbox[0]
                wait = due - self._clock()
                if wait > 0:
                    self._cv.wait(timeout=wait)
                    continue
                heapq.heappop(self._outbox)
            try:
                with self._send_lock:
                    self.inner.send(data)
            except TransportError as e:
                with self._cv:
                    self._error = e

    def reconnect(self) -> None:
        """A fresh connection of the real transport (when it has one); the emulated link keeps its state."""
        reconnect = getattr(self.inner, "reconnect", None)
        with self._send_lock:
            if reconnect is not None:
                reconnect()
            self._error = None

    def connection(self) -> tuple[int, bool] | None:
        """The real transport's `connection()` (None when it has none); what is still held back by the
        emulated link goes out on the connection up when it is due."""
        connection = getattr(self.inner, "connection", None)
        return None if connection is None else connection()

    # -- downlink: held until its arrival time ----------------------------------------------------
    def recv(self, timeout_s: float) -> Frames | None:
        deadline = self._clock() + max(timeout_s, 0.0)
        while True:
            now = self._clock()
            if self._inbox and self._inbox[0][0] <= now:
                return self._inbox.pop(0)[1]
            if now >= deadline:
                return None
            until = min(deadline, self._inbox[0][0]) if self._inbox else deadline
            self._take(until - now)  # returns early when a message reaches the socket

    def _take(self, timeout_s: float) -> None:
        frames = self.inner.recv(timeout_s)
        if frames is None:
            return
        now = self._clock()
        delay = self._down.reserve(_nbytes(frames), now) + self._one_way
        self.shaped_seconds["down"] += delay
        self._inbox.append((now + delay, frames))

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Waits until every scheduled uplink message was handed to the real transport."""
        deadline = self._clock() + timeout_s
        with self._cv:
            while self._outbox and self._clock() < deadline:
                self._cv.wait(timeout=0.05)
            return not self._outbox

    def close(self) -> None:
        # What is still in flight (a last Bye, a final upload) gets its emulated time to arrive, bounded.
        pending = max((due for due, _, _ in self._outbox), default=0.0) - self._clock()
        self.flush(timeout_s=min(max(pending, 0.0) + 1.0, 30.0))
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._sender.join(timeout=5)
        self.inner.close()
