"""Feature codecs: exact frame sizes, round trips within each codec's stated error, and the header naming
the codec so the receiver decodes without guessing."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from fedafd.cloud_server.strategies import build_strategy
from fedafd.runtime.config import ServerConfig
from fedafd.runtime import codecs, wire
from fedafd.runtime.wire import ErrorCode, WireError

P, D = 40, 24


def _features(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((P, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # like real features: L2-normalised rows
    x[3] = 0.0  # an all-zero row: scale 0 must not divide by zero
    x[5] *= 50.0  # one loud row: per-row scales keep the other rows precise
    return x


@pytest.mark.parametrize("codec, expected_nbytes", [
    ("raw", P * D * 4), ("fp16", P * D * 2), ("int8_row", P * 4 + P * D), ("int8_col", D * 4 + P * D)])
def test_frame_size_is_exact(codec, expected_nbytes):
    x = _features()
    frame = codecs.encode(x, codec)
    assert len(frame) == expected_nbytes == codecs.frame_nbytes(codec, "float32", x.shape)


@pytest.mark.parametrize("codec", ["raw", "fp16", "int8_row", "int8_col"])
def test_round_trip_within_stated_error(codec):
    x = _features()
    y = codecs.decode(codec, "float32", x.shape, codecs.encode(x, codec))
    assert y.dtype == np.float32 and y.shape == x.shape and not y.flags.writeable
    bound = codecs.error_bound(codec, x)
    assert np.all(np.abs(y - x) <= bound)
    assert np.array_equal(y[3], np.zeros(D, np.float32))  # the zero row stays exactly zero


def test_stated_errors_are_tight_enough_to_catch_a_wrong_scale():
    # Hand-computed: row [127, -63.5, 0.4]: scale 1, q = [127, -64 (round half to even of -63.5), 0].
    x = np.array([[127.0, -63.5, 0.4], [0.254, 0.0, -0.127]], np.float32)
    y = codecs.decode("int8_row", "float32", x.shape, codecs.encode(x, "int8_row"))
    np.testing.assert_allclose(y[0], [127.0, -64.0, 0.0], atol=1e-6)
    # row 2: scale 0.002, q = [127, 0, -64] (-63.5 rounds to even)
    np.testing.assert_allclose(y[1], [0.254, 0.0, -0.128], atol=1e-6)
    # Per-column scales on the same matrix: column 0 scale 1, so 0.254 -> 0.
    z = codecs.decode("int8_col", "float32", x.shape, codecs.encode(x, "int8_col"))
    np.testing.assert_allclose(z[:, 0], [127.0, 0.0], atol=1e-6)
    # Mean error of int8 on unit-norm features of width 24: well under a percent of the row norm.
    f = _features(1)
    f[5] /= 50.0
    err = np.abs(codecs.decode("int8_row", "float32", f.shape, codecs.encode(f, "int8_row")) - f)
    assert err.max() <= np.abs(f).max() / 254 + 1e-6


def test_fp16_out_of_range_is_refused_not_turned_into_inf():
    with pytest.raises(WireError) as e:
        wire.encode(wire.FeatureUpload(round=0, client_id="a", features={"image": np.full((2, 2), 1e5, np.float32)},
                                       metrics={}, losses={}, train_seconds=0.0), codecs={"features": "fp16"})
    assert e.value.code == ErrorCode.BAD_FIELD and "float16" in e.value.reason


def test_choose_keeps_non_float_raw_and_sends_small_tensors_fp16_under_int8():
    assert codecs.choose("int8_row", np.zeros((4, 3), np.float32)) == "int8_row"
    assert codecs.choose("int8_row", np.zeros((4,), np.float32)) == "fp16"
    assert codecs.choose("fp16", np.zeros((4,), np.int64)) == "raw"
    assert codecs.choose("raw", np.zeros((4, 3), np.float32)) == "raw"


def _round_start() -> wire.RoundStart:
    rng = np.random.default_rng(0)
    return wire.RoundStart(
        round=1, local_epochs=1, tower_version=2, public_indices=np.arange(P, dtype=np.int64),
        global_features={"image": _features(1), "text": _features(2)},
        tower={"image.conv.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
               "image.bn.running_var": rng.uniform(0.5, 2.0, 8).astype(np.float32),
               "image.bn.num_batches_tracked": np.array(7, np.int64)},
        tower_arch={"image": "cnn_small"}, settings=build_strategy(ServerConfig(feature_codec="int8_row")).settings())


@pytest.mark.parametrize("feature_codec", ["raw", "fp16", "int8_row", "int8_col"])
def test_header_names_each_tensors_codec_and_decode_follows_it(feature_codec):
    msg = _round_start()
    frames = wire.encode(msg, codecs={"global_features": feature_codec, "tower": "int8_row"})
    descs = {d["name"]: d for d in msgpack.unpackb(frames[1])["tensors"]}
    assert descs["global_features/image"]["codec"] == feature_codec
    assert descs["global_features/image"]["dtype"] == "float32"  # the decoded dtype, always
    assert descs["tower/image.conv.weight"]["codec"] == "int8_row"
    assert descs["tower/image.bn.running_var"]["codec"] == "fp16"
    assert descs["tower/image.bn.num_batches_tracked"]["codec"] == "raw"
    assert descs["public_indices"]["codec"] == "raw"
    out = wire.decode(frames).msg
    for m in ("image", "text"):
        x = msg.global_features[m]
        assert np.all(np.abs(out.global_features[m] - x) <= codecs.error_bound(feature_codec, x))
    w = msg.tower["image.conv.weight"]
    assert np.all(np.abs(out.tower["image.conv.weight"] - w) <= codecs.error_bound("int8_row", w))
    assert int(out.tower["image.bn.num_batches_tracked"]) == 7
    # Frame sizes on the wire: int8 global features are P x (d + 4) bytes, a quarter of fp32 plus scales.
    sizes = {d["name"]: len(f) for d, f in zip(msgpack.unpackb(frames[1])["tensors"], frames[2:])}
    expected = {"raw": P * D * 4, "fp16": P * D * 2, "int8_row": P * (D + 4), "int8_col": P * D + 4 * D}
    assert sizes["global_features/image"] == expected[feature_codec]


def test_frame_not_matching_its_codec_is_rejected_before_decoding():
    frames = wire.encode(_round_start(), codecs={"global_features": "int8_row"})
    header = msgpack.unpackb(frames[1])
    for d in header["tensors"]:
        if d["name"] == "global_features/image":
            d["codec"] = "fp16"  # the frame holds int8_row bytes: P*(D+4) != P*D*2
    with pytest.raises(WireError) as e:
        wire.decode([frames[0], msgpack.packb(header), *frames[2:]])
    assert e.value.code == ErrorCode.BAD_SHAPE and "global_features/image" in e.value.reason


def test_codec_on_an_integer_tensor_is_a_bad_header():
    frames = wire.encode(_round_start())
    header = msgpack.unpackb(frames[1])
    for d in header["tensors"]:
        if d["name"] == "public_indices":
            d["codec"] = "int8_row"
    with pytest.raises(WireError) as e:
        wire.decode([frames[0], msgpack.packb(header), *frames[2:]])
    assert e.value.code == ErrorCode.BAD_HEADER and "float32" in e.value.reason


def test_nan_scale_is_caught_as_non_finite():
    frames = wire.encode(_round_start(), codecs={"global_features": "int8_row"})
    names = [d["name"] for d in msgpack.unpackb(frames[1])["tensors"]]
    i = 2 + names.index("global_features/text")
    bad = bytearray(frames[i])
    bad[0:4] = np.array([np.nan], "<f4").tobytes()
    frames = list(frames)
    frames[i] = bytes(bad)
    with pytest.raises(WireError) as e:
        wire.decode(frames)
    assert e.value.code == ErrorCode.NON_FINITE
