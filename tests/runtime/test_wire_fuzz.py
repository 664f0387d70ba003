"""Mutation fuzzing of wire.decode: valid messages of every type, broken the ways a hostile peer would.
Nothing but WireError may come out, and a rejection names what was wrong."""

from __future__ import annotations

import random

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedafd.benchmarks.fuzz import fuzz_decode, mutate, templates
from fedafd.runtime.wire import ErrorCode, WireError, decode

BASES = templates()


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.integers(0, len(BASES) - 1), st.integers(1, 4))
def test_mutated_messages_only_raise_wire_error(seed: int, base: int, rounds: int) -> None:
    rng = random.Random(seed)
    frames = BASES[base]
    for _ in range(rounds):  # stacked mutations reach deeper states
        frames = mutate(rng, frames)
    try:
        decode(frames)
    except WireError as e:
        assert isinstance(e.code, ErrorCode) and e.reason


def test_templates_are_valid_and_a_fixed_seed_run_has_no_crash() -> None:
    for frames in BASES:
        decode(frames)
    result = fuzz_decode(3000, seed=1)
    assert result["crashed"] == 0, result["crash_examples"]
    assert result["rejected"] > 2000  # the mutations do break most messages


def test_huge_declared_shape_in_a_mutated_upload_is_refused_before_allocating() -> None:
    upload = BASES[3]
    header = msgpack.unpackb(upload[1], raw=False)
    header["tensors"][0]["shape"] = [1 << 27, 1 << 27]
    try:
        decode([upload[0], msgpack.packb(header), upload[2]])
    except WireError as e:
        assert e.code == ErrorCode.BAD_SHAPE and "elements" in e.reason
    else:
        raise AssertionError("a (2^27, 2^27) tensor was accepted")


def test_nan_in_upload_is_named() -> None:
    upload = list(BASES[3])
    frame = bytearray(upload[2])
    frame[:4] = np.array([np.nan], dtype="<f4").tobytes()
    upload[2] = bytes(frame)
    try:
        decode(upload)
    except WireError as e:
        assert e.code == ErrorCode.NON_FINITE and "features/image" in e.reason
    else:
        raise AssertionError("NaN features were accepted")
