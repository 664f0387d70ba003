"""Wire format: round trips of every message, and every malformed case rejected with its code."""

from __future__ import annotations

import dataclasses
import tracemalloc

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedafd.cloud_server.strategies import build_strategy
from fedafd.runtime.config import ServerConfig
from fedafd.runtime import wire
from fedafd.runtime.methods import SETTINGS_VERSION
from fedafd.runtime.wire import ErrorCode, WireError

P, D = 5, 4


def _feats(rows: int = P, dim: int = D, dtype=np.float32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, dim)).astype(dtype)


def _round_start(**kw) -> wire.RoundStart:
    base = dict(
        round=2, local_epochs=5, tower_version=7,
        public_indices=np.arange(10, 10 + P, dtype=np.int64),
        global_features={"image": _feats(seed=1), "text": _feats(seed=2)},
        tower={"image.conv1.weight": np.ones((3, 2, 1, 1), np.float32),
               "image.bn.num_batches_tracked": np.array(12, np.int64),
               "image.ids": np.arange(4, dtype=np.int32),
               "image.mask": np.array([1, 0, 1], np.uint8),
               "image.half": np.full((2,), 0.5, np.float16)},
        tower_arch={"image": "resnet_tiny"},
        settings=build_strategy(ServerConfig()).settings(),
    )
    base.update(kw)
    return wire.RoundStart(**base)


def _upload(**kw) -> wire.FeatureUpload:
    base = dict(round=3, client_id="img-0", features={"image": _feats()}, metrics={"acc": 0.25},
                losses={"task": 1.5, "adversarial": 0.7}, train_seconds=12.5)
    base.update(kw)
    return wire.FeatureUpload(**base)


ALL_MESSAGES = [
    wire.Join(client_id="mm-1", kind="multimodal", image_arch="resnet_tiny", text_arch="transformer_tiny",
              num_private=800),
    wire.Welcome(client_id="mm-1", run_id="run-abc", feature_dim=256, rounds=40),
    _round_start(),
    _round_start(tower={}, global_features={"text": _feats(seed=3)}),
    _upload(),
    _upload(features={"image": _feats(dtype=np.float16), "text": _feats(seed=4)}),
    wire.Ack(round=3),
    wire.Error(code=ErrorCode.UNEXPECTED, reason="round 2 is finished", round=2),
    wire.Heartbeat(client_id="img-0", round=-1, stage="joining"),
    wire.Bye(reason="done"),
]


def _assert_same(a, b) -> None:
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), f.name
        elif f.name in type(a).TENSORS:  # a tensor group
            assert list(x) == list(y), f.name
            for k in x:
                assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), f"{f.name}/{k}"
        else:
            assert x == y, f.name


@pytest.mark.parametrize("msg", ALL_MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip_every_message(msg):
    frames = wire.encode(msg, msg_id="0123456789abcdef")

    got = wire.decode(frames)

    _assert_same(msg, got.msg)
    assert got.msg_id == "0123456789abcdef"
    assert got.nbytes == sum(len(f) for f in frames)
    assert frames[0] == b"FAFD\x04"
    assert len(frames) == 2 + len(msgpack.unpackb(frames[1])["tensors"])


def test_msg_id_generated_and_unique():
    ids = {wire.decode(wire.encode(wire.Ack(round=0))).msg_id for _ in range(20)}
    assert len(ids) == 20 and all(len(i) == 16 and int(i, 16) >= 0 for i in ids)


def test_tensor_names_and_decoded_views_are_read_only_and_zero_copy():
    frames = wire.encode(_round_start())
    names = [t["name"] for t in msgpack.unpackb(frames[1])["tensors"]]
    assert names[:3] == ["public_indices", "global_features/image", "global_features/text"]
    assert "tower/image.conv1.weight" in names

    buf = bytearray(frames[3])  # global_features/image, as a writable received buffer
    got = wire.decode([*frames[:3], buf, *frames[4:]]).msg.global_features["image"]
    assert not got.flags.writeable
    assert np.shares_memory(got, np.frombuffer(buf, np.uint8))  # a view, not a copy


def test_encode_sends_array_buffers_without_copy():
    f = _feats()
    frames = wire.encode(_upload(features={"image": f}))
    assert np.shares_memory(np.frombuffer(frames[2], np.float32), f)


# --- malformed messages: build good frames, break one thing, check code and reason ----------------


def _header(frames) -> dict:
    return msgpack.unpackb(frames[1])


def _with_header(frames, header: dict) -> list:
    return [frames[0], msgpack.packb(header), *frames[2:]]


def _reject(frames) -> WireError:
    with pytest.raises(WireError) as info:
        wire.decode(frames)
    return info.value


def _upload_frames(**kw) -> list:
    return list(wire.encode(_upload(**kw)))


def _set_desc(frames, i: int, **changes) -> list:
    h = _header(frames)
    h["tensors"][i].update(changes)
    return _with_header(frames, h)


def test_bad_magic():
    e = _reject([b"NOPE\x01", *_upload_frames()[1:]])
    assert e.code == ErrorCode.BAD_MAGIC and "NOPE" in e.reason


def test_another_protocol_version_is_refused():
    e = _reject([b"FAFD\x01", *_upload_frames()[1:]])
    assert e.code == ErrorCode.BAD_VERSION and "version 1" in e.reason


def test_a_version_2_peer_is_refused():
    # Version 2 had no rule for the run id a device makes a folder of.
    e = _reject([b"FAFD\x02", *_upload_frames()[1:]])
    assert e.code == ErrorCode.BAD_VERSION and "version 2" in e.reason and "speaks 4" in e.reason


def test_a_version_3_peer_is_refused():
    # Version 3's Join named no public set, so a device holding another one would have been let in.
    e = _reject([b"FAFD\x03", *_upload_frames()[1:]])
    assert e.code == ErrorCode.BAD_VERSION and "version 3" in e.reason and "speaks 4" in e.reason


@pytest.mark.parametrize("run_id", ["", "..", "../elsewhere", "a/b", ".hidden", "x" * 65, "r\x00"])
def test_a_run_id_that_is_no_folder_name_is_refused_both_ways(run_id: str):
    welcome = wire.Welcome(client_id="img-0", run_id=run_id, feature_dim=8, rounds=1)
    with pytest.raises(WireError, match="field 'run_id'") as sent:
        wire.encode(welcome)
    frames = wire.encode(dataclasses.replace(welcome, run_id="ok"))
    h = _header(frames)
    h["fields"]["run_id"] = run_id
    received = _reject(_with_header(frames, h))
    assert sent.value.code == received.code == ErrorCode.BAD_FIELD and "field 'run_id'" in received.reason


def test_new_run_ids_are_valid_and_differ():
    ids = {wire.new_run_id() for _ in range(20)}
    assert len(ids) == 20
    for run_id in ids:
        assert wire.decode(wire.encode(wire.Welcome("img-0", run_id, 8, 1))).msg.run_id == run_id


def test_truncated_header():
    frames = _upload_frames()
    e = _reject([frames[0], frames[1][:-7], *frames[2:]])
    assert e.code == ErrorCode.BAD_HEADER and "msgpack" in e.reason


def test_random_bytes_header():
    frames = _upload_frames()
    e = _reject([frames[0], bytes(range(0xC1, 0xC9)), *frames[2:]])
    assert e.code == ErrorCode.BAD_HEADER


def test_header_not_a_map():
    e = _reject([wire.MAGIC + bytes([wire.PROTOCOL_VERSION]), msgpack.packb([1, 2, 3])])
    assert e.code == ErrorCode.BAD_HEADER and "map" in e.reason


def test_header_too_large():
    frames = _upload_frames()
    e = _reject([frames[0], b"\x00" * (wire.MAX_HEADER_BYTES + 1), *frames[2:]])
    assert e.code == ErrorCode.TOO_LARGE and "header" in e.reason


def test_unknown_type():
    frames = _upload_frames()
    e = _reject(_with_header(frames, {**_header(frames), "type": "model_upload"}))
    assert e.code == ErrorCode.UNKNOWN_TYPE and "model_upload" in e.reason


def test_missing_field():
    frames = _upload_frames()
    h = _header(frames)
    del h["fields"]["train_seconds"]
    e = _reject(_with_header(frames, h))
    assert e.code == ErrorCode.BAD_FIELD and "train_seconds" in e.reason


def test_extra_field():
    frames = _upload_frames()
    h = _header(frames)
    h["fields"]["weights"] = 1
    e = _reject(_with_header(frames, h))
    assert e.code == ErrorCode.BAD_FIELD and "weights" in e.reason


@pytest.mark.parametrize("name,value", [("round", "3"), ("round", True), ("client_id", 7),
                                        ("metrics", {"acc": "high"}), ("train_seconds", None),
                                        ("round", -1)])
def test_wrongly_typed_field(name, value):
    frames = _upload_frames()
    h = _header(frames)
    h["fields"][name] = value
    e = _reject(_with_header(frames, h))
    assert e.code == ErrorCode.BAD_FIELD and name in e.reason


def test_join_kind_must_be_known():
    frames = list(wire.encode(ALL_MESSAGES[0]))
    h = _header(frames)
    h["fields"]["kind"] = "audio"
    e = _reject(_with_header(frames, h))
    assert e.code == ErrorCode.BAD_FIELD and "kind" in e.reason and "audio" in e.reason


def test_extra_tensor_frame():
    e = _reject([*_upload_frames(), b"\x00" * 8])
    assert e.code == ErrorCode.FRAME_COUNT and "1 tensor(s)" in e.reason and "2 tensor frame(s)" in e.reason


def test_missing_tensor_frame():
    e = _reject(_upload_frames()[:-1])
    assert e.code == ErrorCode.FRAME_COUNT and "0 tensor frame(s)" in e.reason


def test_no_frames():
    assert _reject([]).code == ErrorCode.FRAME_COUNT


def test_frame_length_not_matching_shape():
    frames = _upload_frames()
    e = _reject([*frames[:2], bytes(frames[2])[:-4]])
    assert e.code == ErrorCode.BAD_SHAPE and "features/image" in e.reason and str(P * D * 4) in e.reason


def test_huge_declared_shape_is_rejected_before_allocating():
    frames = _set_desc(_upload_frames(), 0, shape=[2**40, 2**40])
    tracemalloc.start()
    try:
        e = _reject(frames)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert e.code == ErrorCode.BAD_SHAPE and "features/image" in e.reason
    assert peak < 1 << 20


def test_too_many_elements():
    n = wire.MAX_TENSOR_ELEMENTS
    e = _reject(_set_desc(_upload_frames(), 0, shape=[n, 2]))
    assert e.code == ErrorCode.BAD_SHAPE and str(2 * n) in e.reason


def test_negative_dim():
    e = _reject(_set_desc(_upload_frames(), 0, shape=[-5, -4]))
    assert e.code == ErrorCode.BAD_SHAPE and "-5" in e.reason


def test_int64_feature_is_bad_dtype():
    e = _reject(_set_desc(_upload_frames(), 0, dtype="int64"))
    assert e.code == ErrorCode.BAD_DTYPE and "features/image" in e.reason and "int64" in e.reason


def test_unknown_dtype():
    e = _reject(_set_desc(_upload_frames(), 0, dtype="object"))
    assert e.code == ErrorCode.BAD_DTYPE and "object" in e.reason


def test_int64_feature_rejected_on_encode_too():
    with pytest.raises(WireError) as info:
        wire.encode(_upload(features={"image": np.zeros((P, D), np.int64)}))
    assert info.value.code == ErrorCode.BAD_DTYPE


def test_3d_feature():
    frames = _upload_frames()
    e = _reject(_set_desc(frames, 0, shape=[P, 2, 2]))
    assert e.code == ErrorCode.BAD_SHAPE and "'features/image' has 3 dims, expected 2" in e.reason


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_feature(bad):
    f = _feats()
    frames = _upload_frames(features={"image": f})
    raw = np.frombuffer(frames[2], np.float32).copy()
    raw[7] = bad
    e = _reject([*frames[:2], raw.tobytes()])
    assert e.code == ErrorCode.NON_FINITE and "features/image" in e.reason and "1 NaN/Inf" in e.reason


def test_non_finite_rejected_on_encode_too():
    f = _feats()
    f[0, 0] = np.nan
    with pytest.raises(WireError) as info:
        wire.encode(_upload(features={"image": f}))
    assert info.value.code == ErrorCode.NON_FINITE


def test_features_with_different_row_counts():
    with pytest.raises(WireError) as info:
        wire.encode(_upload(features={"image": _feats(rows=P), "text": _feats(rows=P + 1)}))
    assert info.value.code == ErrorCode.BAD_SHAPE and "features/text" in info.value.reason

    good = list(wire.encode(_upload(features={"image": _feats(rows=P), "text": _feats(rows=P)})))
    shorter = _feats(rows=P - 1).tobytes()
    e = _reject(_set_desc([*good[:3], shorter], 1, shape=[P - 1, D]))
    assert e.code == ErrorCode.BAD_SHAPE and f"{P - 1} rows" in e.reason


def test_global_features_rows_match_public_indices():
    with pytest.raises(WireError) as info:
        wire.encode(_round_start(public_indices=np.arange(P + 1)))
    assert info.value.code == ErrorCode.BAD_SHAPE


def test_unexpected_and_duplicate_tensor_names():
    frames = _upload_frames()
    e = _reject(_set_desc(frames, 0, name="features/audio"))
    assert e.code == ErrorCode.BAD_FIELD and "features/audio" in e.reason
    e = _reject(_set_desc(frames, 0, name="weights"))
    assert e.code == ErrorCode.BAD_FIELD and "weights" in e.reason
    two = list(wire.encode(_upload(features={"image": _feats(), "text": _feats()})))
    e = _reject(_set_desc(two, 1, name="features/image"))
    assert e.code == ErrorCode.BAD_FIELD and "twice" in e.reason


def test_upload_without_features_is_a_metrics_only_report():
    # The LOCAL baseline uploads metrics only; the server, not the wire, checks modalities per kind.
    h = _header(_upload_frames())
    h["tensors"] = []
    decoded = wire.decode([wire.MAGIC + bytes([wire.PROTOCOL_VERSION]), msgpack.packb(h)])
    assert decoded.msg.features == {}
    assert decoded.msg.metrics == h["fields"]["metrics"]


def test_unknown_codec():
    e = _reject(_set_desc(_upload_frames(), 0, codec="zstd"))
    assert e.code == ErrorCode.BAD_HEADER and "zstd" in e.reason


# --- fuzzing: nothing but WireError escapes decode ------------------------------------------------

_plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _decode_only_wire_errors(frames) -> None:
    try:
        wire.decode(frames)
    except WireError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), max_size=5))
def test_random_frames_only_raise_wire_error(frames):
    _decode_only_wire_errors(frames)
    _decode_only_wire_errors([wire.MAGIC + bytes([wire.PROTOCOL_VERSION]), *frames])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_plain, st.lists(st.binary(max_size=64), max_size=3))
def test_random_msgpack_headers_only_raise_wire_error(header, tensor_frames):
    _decode_only_wire_errors([wire.MAGIC + bytes([wire.PROTOCOL_VERSION]), msgpack.packb(header), *tensor_frames])


_types = st.sampled_from([t.value for t in wire.MsgType] + ["nope"])
_descs = st.lists(st.fixed_dictionaries({
    "name": st.sampled_from(["features/image", "features/text", "public_indices", "global_features/image",
                             "tower/a.b", "tower/", "x"]) | st.text(max_size=6),
    "dtype": st.sampled_from(list(wire.ALLOWED_DTYPES) + ["float64", "bool"]) | _plain,
    "shape": st.lists(st.integers(-3, 2**64 - 1), max_size=4) | _plain,
    "codec": st.sampled_from(["raw", "fp16"]) | _plain,
}), max_size=3)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_types, st.dictionaries(st.sampled_from(["round", "client_id", "metrics", "losses", "train_seconds",
                                               "reason", "code", "stage", "settings", "x"]), _plain),
       _descs, st.lists(st.binary(max_size=48), max_size=3))
def test_structured_random_headers_only_raise_wire_error(mtype, fields, descs, tensor_frames):
    header = {"type": mtype, "msg_id": "0123456789abcdef", "fields": fields, "tensors": descs}
    _decode_only_wire_errors([wire.MAGIC + bytes([wire.PROTOCOL_VERSION]), msgpack.packb(header), *tensor_frames])


_UPLOAD_HEADER = msgpack.unpackb(wire.encode(_upload())[1])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_descs, st.lists(st.binary(max_size=48) | st.sampled_from([b"\x00" * 4, b"\x00" * 8, b"\xff" * 16]),
                        max_size=3))
def test_random_tensor_descriptors_only_raise_wire_error(descs, tensor_frames):
    header = {**_UPLOAD_HEADER, "tensors": descs}
    _decode_only_wire_errors([wire.MAGIC + bytes([wire.PROTOCOL_VERSION]), msgpack.packb(header), *tensor_frames])


def _settings_fields(msg: wire.RoundStart) -> dict:
    return msgpack.unpackb(wire.encode(msg)[1])["fields"]["settings"]


def test_method_settings_travel_typed_and_versioned() -> None:
    # Prepare
    msg = _round_start()
    # Execute
    decoded = wire.decode(wire.encode(msg)).msg
    # Assert: the device gets the very recipe, as a MethodSettings, with the version on the wire.
    assert decoded.settings == msg.settings
    assert _settings_fields(msg)["version"] == SETTINGS_VERSION


@pytest.mark.parametrize("change, reason", [
    (lambda s: s.pop("baa"), "missing"),
    (lambda s: s.update(version=1), "version"),
    (lambda s: s.update(beta="0.5"), "beta must be float"),
    (lambda s: s.update(baa=1), "baa must be bool"),
    (lambda s: s.update(digest="sometimes"), "digest"),
    (lambda s: s.update(surprise=True), "unexpected"),
])
def test_method_settings_that_this_build_cannot_run_are_refused_naming_the_field(change, reason) -> None:
    # Prepare: a RoundStart whose settings map was changed after encoding (what another build might send).
    frames = wire.encode(_round_start())
    header = msgpack.unpackb(frames[1])
    change(header["fields"]["settings"])
    frames[1] = msgpack.packb(header)
    # Execute / Assert
    with pytest.raises(wire.WireError, match=reason) as err:
        wire.decode(frames)
    assert err.value.code == wire.ErrorCode.BAD_FIELD
