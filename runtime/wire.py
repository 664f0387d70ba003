"""Every message that crosses the network, with its encoding beside it.

A message is a list of frames:

    frame 0   MAGIC + one version byte                      b"FAFD" + bytes([PROTOCOL_VERSION])
    frame 1   msgpack header: {"type", "msg_id", "fields", "tensors"}
              "fields"  plain msgpack values (the dataclass's non-tensor fields)
              "tensors" [{"name", "dtype", "shape", "codec"}, ...]
    frame 2+  one raw frame per tensor, in the order of "tensors"

Tensors travel as their own frames, never pickled: `encode` hands out zero-copy views of contiguous
numpy buffers and `decode` returns read-only `np.frombuffer` views of the received frames.

Each message type is a frozen dataclass tagged by `MsgType`; it declares its tensor fields once in
`TENSORS`, so `encode`/`decode` are generic. Whatever `decode` rejects, `encode` rejects too (the same
checks run on both sides), and every rejection is a `WireError` with an `ErrorCode` and a reason that
names the field or tensor at fault.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import secrets
import time
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import msgpack
import numpy as np

from . import codecs as _codecs
from .vocabulary import CLIENT_KINDS, MODALITIES
from .methods import MethodSettings, SettingsError

MAGIC = b"FAFD"
PROTOCOL_VERSION = 4
"""2: Join and RoundStart name the frozen backbones and the sha256 of their weights. 3: RoundStart's
settings are typed and versioned (runtime.methods.MethodSettings) and it may carry FedMD's consensus;
Welcome's run_id names the federation (kept across `serve --resume`; devices keep their state under it)
and must match RUN_ID_PATTERN. 4: Join carries the digest of the device's public set (the server refuses
another public set before any round)."""
MAX_HEADER_BYTES = 64 * 1024
"""Largest msgpack header accepted (a tower of a few hundred tensors needs ~20 KiB)."""
MAX_MESSAGE_BYTES = 1 << 30
"""Largest whole message (all frames) accepted; the ZMQ sockets also cap each frame at this."""
MAX_TENSOR_ELEMENTS = 1 << 28
"""Largest element count of one tensor (1 GiB of float32)."""
MAX_NDIM = 8
"""Most dimensions a tensor may declare."""
ALLOWED_DTYPES = ("float32", "float16", "int64", "int32", "uint8")
CODECS = _codecs.CODECS
"""How a tensor frame may store its data (runtime.codecs: raw, fp16, int8_row, int8_col)."""
RUN_ID_PATTERN = r"[0-9A-Za-z][0-9A-Za-z._-]{0,63}"
"""A run id is a folder name on the devices: no '/', never '.' or '..'."""

_MAX_PLAIN_DEPTH = 16
_MSG_ID_LEN = 16
_HEX = frozenset("0123456789abcdef")


class MsgType(enum.StrEnum):
    JOIN = "join"
    WELCOME = "welcome"
    ROUND_START = "round_start"
    FEATURE_UPLOAD = "feature_upload"
    ACK = "ack"
    ERROR = "error"
    HEARTBEAT = "heartbeat"
    BYE = "bye"


class ErrorCode(enum.StrEnum):
    BAD_MAGIC = "bad_magic"
    BAD_VERSION = "bad_version"
    BAD_HEADER = "bad_header"
    UNKNOWN_TYPE = "unknown_type"
    FRAME_COUNT = "frame_count"
    BAD_DTYPE = "bad_dtype"
    BAD_SHAPE = "bad_shape"
    NON_FINITE = "non_finite"
    TOO_LARGE = "too_large"
    BAD_FIELD = "bad_field"
    UNEXPECTED = "unexpected"
    """A valid message at the wrong time, e.g. an upload for a finished round."""
    UNKNOWN_CLIENT = "unknown_client"
    BACKBONE_MISMATCH = "backbone_mismatch"
    """The device's frozen backbone weights are not the server's (another package version)."""
    PUBLIC_DATA_MISMATCH = "public_data_mismatch"
    """The device holds another public set than the server's (its rows' digest differs)."""


class WireError(Exception):
    """A message that cannot be encoded or was received malformed; `reason` names what was wrong."""

    def __init__(self, code: ErrorCode, reason: str):
        super().__init__(f"{code.value}: {reason}")
        self.code = code
        self.reason = reason


# ---------------------------------------------------------------------------------------------------
# Message types


@dataclass(frozen=True)
class TensorSpec:
    """How one tensor field of a message looks on the wire."""

    dtypes: tuple[str, ...]
    """Dtypes the field accepts."""
    ndim: int | None
    """Required number of dimensions (None: any up to MAX_NDIM)."""
    group: bool = False
    """True: the field is a dict[str, ndarray], each entry sent as "<field>/<key>"."""
    keys: tuple[str, ...] | None = None
    """Keys a group may hold (None: any non-empty name)."""
    rows: bool = False
    """Indexed by public sample: every such tensor in one message has the same first dim."""


_FEATURES = TensorSpec(("float32",), ndim=2, group=True, keys=MODALITIES, rows=True)


def _at_least(n: int) -> Any:
    return field(metadata={"min": n})


def _one_of(*choices: str) -> Any:
    return field(metadata={"one_of": choices})


def _matching(pattern: str) -> Any:
    return field(metadata={"pattern": pattern})


@dataclass(frozen=True)
class Join:
    """Client -> server: who I am. `image_arch`/`text_arch` are "" for a modality the client lacks;
    `backbones` maps each frozen backbone the device holds to the sha256 of its weights; `public_digest` is
    the sha256 of the public set's rows it holds (runtime.data.sources.registry.data_digest)."""

    TYPE: ClassVar[MsgType] = MsgType.JOIN
    TENSORS: ClassVar[dict[str, TensorSpec]] = {}

    client_id: str
    kind: str = _one_of(*CLIENT_KINDS)
    image_arch: str
    text_arch: str
    num_private: int = _at_least(0)
    backbones: dict[str, str] = field(default_factory=dict)
    public_digest: str = ""


@dataclass(frozen=True)
class Welcome:
    """Server -> client: accepted into run `run_id`, the federation's id (the same after a resume)."""

    TYPE: ClassVar[MsgType] = MsgType.WELCOME
    TENSORS: ClassVar[dict[str, TensorSpec]] = {}

    client_id: str
    run_id: str = _matching(RUN_ID_PATTERN)
    feature_dim: int = _at_least(1)
    rounds: int = _at_least(0)


@dataclass(frozen=True, eq=False)
class RoundStart:
    """Server -> client: train round `round`.

    `global_features` ("image"/"text" -> (P, d) float32) are indexed like `public_indices` (P,), and so
    is `consensus` (last round's aggregated device features, for FedMD's digest; empty otherwise).
    `tower` holds flat state_dict tensors ("image.conv1.weight"); it is empty when the client already
    has `tower_version`. `settings` is the method's typed, versioned recipe (runtime.methods).
    """

    TYPE: ClassVar[MsgType] = MsgType.ROUND_START
    TENSORS: ClassVar[dict[str, TensorSpec]] = {
        "public_indices": TensorSpec(("int64",), ndim=1, rows=True),
        "global_features": _FEATURES,
        "consensus": _FEATURES,
        "tower": TensorSpec(ALLOWED_DTYPES, ndim=None, group=True),
    }

    round: int = _at_least(0)
    local_epochs: int = _at_least(0)
    tower_version: int = _at_least(0)
    public_indices: np.ndarray
    global_features: dict[str, np.ndarray]
    tower: dict[str, np.ndarray]
    tower_arch: dict[str, str]
    settings: MethodSettings
    backbones: dict[str, str] = field(default_factory=dict)
    """Backbone name -> sha256 of its weights, for every backbone a tower in `tower_arch` adapts."""
    consensus: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class FeatureUpload:
    """Client -> server: local-encoder features of the public set ("image" and/or "text" -> (P, d))."""

    TYPE: ClassVar[MsgType] = MsgType.FEATURE_UPLOAD
    TENSORS: ClassVar[dict[str, TensorSpec]] = {
        # May be empty: the LOCAL baseline reports metrics only. The server checks the modalities
        # against the client's kind.
        "features": TensorSpec(("float32", "float16"), ndim=2, group=True, keys=MODALITIES, rows=True),
    }

    round: int = _at_least(0)
    client_id: str
    features: dict[str, np.ndarray]
    metrics: dict[str, float]
    losses: dict[str, float]
    train_seconds: float


@dataclass(frozen=True)
class Ack:
    """Server -> client: your upload for `round` was kept."""

    TYPE: ClassVar[MsgType] = MsgType.ACK
    TENSORS: ClassVar[dict[str, TensorSpec]] = {}

    round: int = _at_least(0)


@dataclass(frozen=True)
class Error:
    """Either way: a message was rejected. `code` is an ErrorCode value; `round` is -1 if none;
    `reply_to` is the rejected message's id ("" when it had none that could be read), so a peer can tell
    which of its messages was refused (a Join, or a stale upload from before a restart)."""

    TYPE: ClassVar[MsgType] = MsgType.ERROR
    TENSORS: ClassVar[dict[str, TensorSpec]] = {}

    code: str = _one_of(*ErrorCode)
    reason: str
    round: int = _at_least(-1)
    reply_to: str = ""


@dataclass(frozen=True)
class Heartbeat:
    """Client -> server: still alive, working on `stage` of `round` (-1 before the first round)."""

    TYPE: ClassVar[MsgType] = MsgType.HEARTBEAT
    TENSORS: ClassVar[dict[str, TensorSpec]] = {}

    client_id: str
    round: int = _at_least(-1)
    stage: str


@dataclass(frozen=True)
class Bye:
    """Either way: this side is leaving (or telling the other to)."""

    TYPE: ClassVar[MsgType] = MsgType.BYE
    TENSORS: ClassVar[dict[str, TensorSpec]] = {}

    reason: str


Message = Join | Welcome | RoundStart | FeatureUpload | Ack | Error | Heartbeat | Bye

MESSAGE_TYPES: dict[MsgType, type] = {
    cls.TYPE: cls for cls in (Join, Welcome, RoundStart, FeatureUpload, Ack, Error, Heartbeat, Bye)
}


class Decoded(NamedTuple):
    msg: Message
    msg_id: str
    nbytes: int
    """Sum of all frame lengths (magic + header + tensor frames)."""


def new_msg_id() -> str:
    return secrets.token_hex(_MSG_ID_LEN // 2)


def new_run_id() -> str:
    """A federation's id: when it started, and random bits so two servers started together differ."""
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(4)


# ---------------------------------------------------------------------------------------------------
# Scalar fields: one checker per annotation, shared by encode and decode. Each returns the value
# normalised to plain Python types (numpy scalars become int/float) or raises BAD_FIELD.


def _bad_field(name: str, why: str) -> WireError:
    return WireError(ErrorCode.BAD_FIELD, f"field '{name}' {why}")


def _check_str(name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise _bad_field(name, f"must be a str, got {type(v).__name__}")
    return str(v)  # a StrEnum member becomes its plain value


def _check_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise _bad_field(name, f"must be an int, got {type(v).__name__}")
    return int(v)


def _check_float(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise _bad_field(name, f"must be a float, got {type(v).__name__}")
    return float(v)


def _check_dict(name: str, v: Any, value_check) -> dict:
    if not isinstance(v, dict):
        raise _bad_field(name, f"must be a map, got {type(v).__name__}")
    out = {}
    for k, x in v.items():
        if not isinstance(k, str):
            raise _bad_field(name, f"has a non-str key {k!r}")
        out[k] = value_check(f"{name}.{k}", x)
    return out


def _is_plain(v: Any, depth: int = 0) -> bool:
    if depth > _MAX_PLAIN_DEPTH:
        return False
    if v is None or isinstance(v, (bool, int, float, str, bytes)):
        return not isinstance(v, int) or -(1 << 63) <= v < (1 << 64)
    if isinstance(v, (list, tuple)):
        return all(_is_plain(x, depth + 1) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _is_plain(x, depth + 1) for k, x in v.items())
    return False


def _check_plain(name: str, v: Any) -> Any:
    if not _is_plain(v):
        raise _bad_field(name, f"must be a plain msgpack value (nil/bool/int/float/str/bytes/"
                               f"list/map, nested at most {_MAX_PLAIN_DEPTH}), got {type(v).__name__}")
    return v


def _check_settings(name: str, v: Any) -> MethodSettings:
    if isinstance(v, MethodSettings):
        return v
    try:
        return MethodSettings.from_wire(v)
    except SettingsError as err:
        raise _bad_field(name, f"is not valid method settings: {err}") from None


_SCALAR_CHECKS = {
    str: _check_str,
    int: _check_int,
    float: _check_float,
    dict[str, float]: lambda n, v: _check_dict(n, v, _check_float),
    dict[str, str]: lambda n, v: _check_dict(n, v, _check_str),
    dict[str, Any]: lambda n, v: _check_dict(n, v, _check_plain),
    MethodSettings: _check_settings,
}


class _Layout(NamedTuple):
    scalars: dict[str, tuple[Any, dict]]  # name -> (checker, field metadata)
    tensors: dict[str, TensorSpec]


def _layout(cls: type) -> _Layout:
    hints = typing.get_type_hints(cls)
    scalars = {
        f.name: (_SCALAR_CHECKS[hints[f.name]], f.metadata)
        for f in dataclasses.fields(cls)
        if f.name not in cls.TENSORS
    }
    return _Layout(scalars, cls.TENSORS)


_LAYOUTS: dict[MsgType, _Layout] = {t: _layout(cls) for t, cls in MESSAGE_TYPES.items()}


def _check_scalars(layout: _Layout, values: dict[str, Any]) -> dict[str, Any]:
    missing = [n for n in layout.scalars if n not in values]
    if missing:
        raise _bad_field(missing[0], "is missing")
    extra = [n for n in values if n not in layout.scalars]
    if extra:
        raise WireError(ErrorCode.BAD_FIELD, f"unexpected field {extra[0]!r}")
    out = {}
    for name, (check, meta) in layout.scalars.items():
        v = check(name, values[name])
        if "min" in meta and v < meta["min"]:
            raise _bad_field(name, f"is {v}, must be >= {meta['min']}")
        if "one_of" in meta and v not in meta["one_of"]:
            raise _bad_field(name, f"is {v!r}, must be one of {', '.join(meta['one_of'])}")
        if "pattern" in meta and not re.fullmatch(meta["pattern"], v):
            raise _bad_field(name, f"is {v!r}, must match {meta['pattern']}")
        out[name] = v
    return out


# ---------------------------------------------------------------------------------------------------
# Tensors. Codec handling lives in runtime.codecs; these three wrappers turn its CodecError into a
# WireError. `dtype` in a descriptor is always the dtype of the decoded array; the codec says how the
# frame stores it.


def _encode_tensor(arr: np.ndarray, codec: str, name: str = "?") -> memoryview:
    try:
        return _codecs.encode(arr, codec)
    except _codecs.CodecError as e:
        raise WireError(ErrorCode.BAD_FIELD, f"tensor '{name}': {e}") from None


def _frame_nbytes(codec: str, dtype: str, shape: tuple[int, ...], name: str = "?") -> int:
    try:
        return _codecs.frame_nbytes(codec, dtype, shape)
    except _codecs.CodecError as e:
        raise WireError(ErrorCode.BAD_HEADER, f"tensor '{name}': {e}") from None


def _decode_tensor(codec: str, dtype: str, shape: tuple[int, ...], buf: memoryview) -> np.ndarray:
    return _codecs.decode(codec, dtype, shape, buf)


def _check_shape(name: str, spec: TensorSpec, shape: tuple[int, ...]) -> int:
    """Checks a declared shape against the limits and the field; returns its element count."""
    if len(shape) > MAX_NDIM:
        raise WireError(ErrorCode.BAD_SHAPE, f"tensor '{name}' has {len(shape)} dims, at most {MAX_NDIM}")
    for d in shape:
        if d < 0 or d > MAX_TENSOR_ELEMENTS:
            raise WireError(ErrorCode.BAD_SHAPE, f"tensor '{name}' has dim {d} in shape {list(shape)}")
    count = math.prod(shape)
    if count > MAX_TENSOR_ELEMENTS:
        raise WireError(ErrorCode.BAD_SHAPE,
                        f"tensor '{name}' declares {count} elements, at most {MAX_TENSOR_ELEMENTS}")
    if spec.ndim is not None and len(shape) != spec.ndim:
        raise WireError(ErrorCode.BAD_SHAPE,
                        f"tensor '{name}' has {len(shape)} dims, expected {spec.ndim}")
    return count


def _check_dtype(name: str, spec: TensorSpec, dtype: str) -> None:
    if dtype not in ALLOWED_DTYPES:
        raise WireError(ErrorCode.BAD_DTYPE,
                        f"tensor '{name}' has dtype {dtype}, allowed: {', '.join(ALLOWED_DTYPES)}")
    if dtype not in spec.dtypes:
        raise WireError(ErrorCode.BAD_DTYPE,
                        f"tensor '{name}' has dtype {dtype}, expected {' or '.join(spec.dtypes)}")


def _check_finite(name: str, arr: np.ndarray) -> None:
    if arr.dtype.kind != "f" or arr.size == 0:
        return
    # A float64 sum is finite iff every element is (2**28 float32 maxima cannot overflow float64),
    # and numpy reduces it in small buffered chunks: no array-sized temporary on the good path.
    if not math.isfinite(float(arr.sum(dtype=np.float64))):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise WireError(ErrorCode.NON_FINITE, f"tensor '{name}' has {bad} NaN/Inf values")


def _split_name(name: str) -> tuple[str, str | None]:
    fname, sep, key = name.partition("/")
    return fname, (key if sep else None)


class _TensorSet:
    """Collects a message's tensors by field, checking names, groups and row counts."""

    def __init__(self, layout: _Layout):
        self.layout = layout
        self.values: dict[str, Any] = {n: {} for n, s in layout.tensors.items() if s.group}
        self.rows: tuple[str, int] | None = None

    def spec_for(self, name: str) -> TensorSpec:
        fname, key = _split_name(name)
        spec = self.layout.tensors.get(fname)
        if spec is None or spec.group != (key is not None):
            raise WireError(ErrorCode.BAD_FIELD, f"unexpected tensor '{name}'")
        if spec.group:
            if not key or (spec.keys is not None and key not in spec.keys):
                allowed = f"one of {', '.join(spec.keys)}" if spec.keys else "a non-empty name"
                raise WireError(ErrorCode.BAD_FIELD, f"tensor '{name}': key must be {allowed}")
            if key in self.values[fname]:
                raise WireError(ErrorCode.BAD_FIELD, f"tensor '{name}' appears twice")
        elif fname in self.values:
            raise WireError(ErrorCode.BAD_FIELD, f"tensor '{name}' appears twice")
        return spec

    def add(self, name: str, spec: TensorSpec, arr: np.ndarray) -> None:
        if spec.rows:
            if self.rows is None:
                self.rows = (name, arr.shape[0])
            elif arr.shape[0] != self.rows[1]:
                raise WireError(ErrorCode.BAD_SHAPE, f"tensor '{name}' has {arr.shape[0]} rows, "
                                                     f"'{self.rows[0]}' has {self.rows[1]}")
        fname, key = _split_name(name)
        if key is None:
            self.values[fname] = arr
        else:
            self.values[fname][key] = arr

    def finish(self) -> dict[str, Any]:
        for fname, spec in self.layout.tensors.items():
            if fname not in self.values:
                raise WireError(ErrorCode.BAD_FIELD, f"tensor '{fname}' is missing")
        return self.values


# ---------------------------------------------------------------------------------------------------
# encode / decode


def encode(msg: Message, msg_id: str | None = None,
           codecs: dict[str, str] | None = None) -> list[bytes | memoryview]:
    """Frames of `msg`: magic, header, then one frame per tensor.

    `codecs` maps a tensor field ("features", "global_features", "tower") to the codec its float32
    tensors travel with (runtime.codecs; default raw); each descriptor names the codec actually used.
    Raw tensor frames are views of the message's arrays: do not modify them until the send is done.
    Raises WireError (same codes as decode) when the message would be rejected by the receiver.
    """
    layout = _LAYOUTS.get(getattr(type(msg), "TYPE", None))
    if layout is None or not isinstance(msg, MESSAGE_TYPES[type(msg).TYPE]):
        raise WireError(ErrorCode.UNKNOWN_TYPE, f"{type(msg).__name__} is not a message type")
    msg_id = new_msg_id() if msg_id is None else msg_id
    _check_msg_id(msg_id)
    scalars = _check_scalars(layout, {n: getattr(msg, n) for n in layout.scalars})

    tensors = _TensorSet(layout)
    descs, frames = [], []
    for fname, spec in layout.tensors.items():
        value = getattr(msg, fname)
        if spec.group and not isinstance(value, dict):
            raise _bad_field(fname, f"must be a dict of arrays, got {type(value).__name__}")
        items = [(f"{fname}/{k}", v) for k, v in value.items()] if spec.group else [(fname, value)]
        for name, arr in items:
            if not isinstance(arr, np.ndarray):
                raise WireError(ErrorCode.BAD_FIELD, f"tensor '{name}' must be a numpy array, "
                                                     f"got {type(arr).__name__}")
            spec = tensors.spec_for(name)
            _check_dtype(name, spec, arr.dtype.name)
            _check_shape(name, spec, arr.shape)
            _check_finite(name, arr)
            tensors.add(name, spec, arr)
            codec = _codecs.choose((codecs or {}).get(fname, "raw"), arr)
            if codec not in CODECS:
                raise WireError(ErrorCode.BAD_FIELD, f"tensor '{name}': unknown codec {codec!r}")
            descs.append({"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape), "codec": codec})
            frames.append(_encode_tensor(arr, codec, name))
    tensors.finish()

    header = msgpack.packb({"type": msg.TYPE.value, "msg_id": msg_id, "fields": scalars, "tensors": descs},
                           default=_plain_settings)
    if len(header) > MAX_HEADER_BYTES:
        raise WireError(ErrorCode.TOO_LARGE, f"header is {len(header)} bytes, at most {MAX_HEADER_BYTES}")
    out = [MAGIC + bytes([PROTOCOL_VERSION]), header, *frames]
    total = sum(len(f) for f in out)
    if total > MAX_MESSAGE_BYTES:
        raise WireError(ErrorCode.TOO_LARGE, f"message is {total} bytes, at most {MAX_MESSAGE_BYTES}")
    return out


def _plain_settings(value: Any) -> Any:
    if isinstance(value, MethodSettings):
        return value.to_wire()
    raise TypeError(f"cannot pack {type(value).__name__}")


def _as_bytes_view(frame: Any) -> memoryview:
    """A flat byte view of a received frame (bytes, bytearray, memoryview or zmq.Frame)."""
    buf = getattr(frame, "buffer", frame)  # zmq.Frame exposes its data as .buffer
    try:
        mv = memoryview(buf)
    except TypeError:
        raise WireError(ErrorCode.BAD_HEADER, f"frame of type {type(frame).__name__} is not a buffer") from None
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B") if mv.c_contiguous else memoryview(mv.tobytes())
    return mv


def _check_msg_id(msg_id: Any) -> None:
    if not isinstance(msg_id, str) or len(msg_id) != _MSG_ID_LEN or not _HEX.issuperset(msg_id):
        raise WireError(ErrorCode.BAD_HEADER, f"msg_id must be {_MSG_ID_LEN} lower-case hex chars, got {msg_id!r}")


def _unpack_header(buf: memoryview) -> dict:
    if len(buf) > MAX_HEADER_BYTES:
        raise WireError(ErrorCode.TOO_LARGE, f"header is {len(buf)} bytes, at most {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(buf, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises a zoo of types on garbage (ValueError, StackError, ...)
        raise WireError(ErrorCode.BAD_HEADER, f"header is not valid msgpack ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise WireError(ErrorCode.BAD_HEADER, f"header must be a map, got {type(header).__name__}")
    keys = {"type", "msg_id", "fields", "tensors"}
    if set(header) != keys:
        raise WireError(ErrorCode.BAD_HEADER, f"header keys are {sorted(map(str, header))}, expected {sorted(keys)}")
    _check_msg_id(header["msg_id"])
    if not isinstance(header["fields"], dict):
        raise WireError(ErrorCode.BAD_HEADER, "header 'fields' must be a map")
    if not isinstance(header["tensors"], list):
        raise WireError(ErrorCode.BAD_HEADER, "header 'tensors' must be a list")
    return header


def _parse_desc(i: int, desc: Any) -> tuple[str, str, tuple[int, ...], str]:
    keys = {"name", "dtype", "shape", "codec"}
    if not isinstance(desc, dict) or set(desc) != keys:
        raise WireError(ErrorCode.BAD_HEADER, f"tensor descriptor {i} must be a map with keys {sorted(keys)}")
    name, dtype, shape, codec = desc["name"], desc["dtype"], desc["shape"], desc["codec"]
    if not isinstance(name, str):
        raise WireError(ErrorCode.BAD_HEADER, f"tensor descriptor {i}: name must be a str")
    if not isinstance(dtype, str):
        raise WireError(ErrorCode.BAD_DTYPE, f"tensor '{name}': dtype must be a str")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise WireError(ErrorCode.BAD_SHAPE, f"tensor '{name}': shape must be a list of ints, got {shape!r}")
    if codec not in CODECS:
        raise WireError(ErrorCode.BAD_HEADER, f"tensor '{name}': unknown codec {codec!r}")
    return name, dtype, tuple(shape), codec


def decode(frames: list) -> Decoded:
    """Parses and checks one received message; every problem raises WireError naming it.

    Tensors are read-only views on the received buffers (no copy): keep them only as long as needed.
    """
    views = [_as_bytes_view(f) for f in frames]
    if len(views) < 2:
        raise WireError(ErrorCode.FRAME_COUNT, f"message has {len(views)} frame(s), expected at least 2")
    nbytes = sum(len(v) for v in views)
    if nbytes > MAX_MESSAGE_BYTES:
        raise WireError(ErrorCode.TOO_LARGE, f"message is {nbytes} bytes, at most {MAX_MESSAGE_BYTES}")

    magic = bytes(views[0][:8])
    if len(views[0]) != len(MAGIC) + 1 or magic[: len(MAGIC)] != MAGIC:
        raise WireError(ErrorCode.BAD_MAGIC, f"first frame is {magic!r}..., expected {MAGIC!r} + version")
    if magic[-1] != PROTOCOL_VERSION:
        raise WireError(ErrorCode.BAD_VERSION, f"protocol version {magic[-1]}, this side speaks {PROTOCOL_VERSION}")

    header = _unpack_header(views[1])
    mtype = header["type"]
    if not isinstance(mtype, str) or mtype not in MsgType._value2member_map_:
        raise WireError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {mtype!r}")
    layout = _LAYOUTS[MsgType(mtype)]
    descs = header["tensors"]
    if len(views) != 2 + len(descs):
        raise WireError(ErrorCode.FRAME_COUNT,
                        f"{mtype} declares {len(descs)} tensor(s) but has {len(views) - 2} tensor frame(s)")

    values = _check_scalars(layout, header["fields"])
    tensors = _TensorSet(layout)
    for i, (desc, buf) in enumerate(zip(descs, views[2:])):
        name, dtype, shape, codec = _parse_desc(i, desc)
        spec = tensors.spec_for(name)
        _check_dtype(name, spec, dtype)
        _check_shape(name, spec, shape)
        expected = _frame_nbytes(codec, dtype, shape, name)  # checked before any array exists
        if len(buf) != expected:
            raise WireError(ErrorCode.BAD_SHAPE, f"tensor '{name}' {dtype}{list(shape)} needs {expected} bytes, "
                                                 f"frame has {len(buf)}")
        arr = _decode_tensor(codec, dtype, shape, buf)
        _check_finite(name, arr)
        tensors.add(name, spec, arr)
    values.update(tensors.finish())
    return Decoded(MESSAGE_TYPES[MsgType(mtype)](**values), header["msg_id"], nbytes)
