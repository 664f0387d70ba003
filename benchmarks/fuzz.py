"""Fuzzing the wire decoder and a live server with random and mutated messages.

    python -m fedafd.benchmarks.fuzz --decode 200000 --live 5000 --out fuzz.json

Mutations start from valid messages of every type and break them the ways a hostile or broken peer
would: truncated or extra frames, flipped bytes, random msgpack headers, huge declared shapes, wrong
dtypes, NaN/Inf, unknown codecs, a claimed id that is not the sender's, uploads for a round that is not
running. `--decode` counts decode() calls that raised anything but WireError ("crashed"); `--live`
starts `fedafd-cloud serve` on loopback and counts messages that got no Error reply or killed it.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import zmq

from fedafd.cloud_server.strategies import build_strategy
from fedafd.runtime.config import ServerConfig
from fedafd.runtime.data.modal import public_source
from fedafd.runtime.wire import (
    MAGIC, PROTOCOL_VERSION, Ack, Bye, Error, FeatureUpload, Heartbeat, Join, RoundStart, Welcome, WireError,
    decode, encode,
)

FUZZ_ID = "fuzz-peer"
"""Client id the mutated messages claim (never the fuzzer's own routing id, so no Join is admitted)."""


def templates(rows: int = 8, dim: int = 4) -> list[list[bytes]]:
    """Valid encoded messages of every type, as bytes frames."""
    f = np.ones((rows, dim), dtype=np.float32)
    messages = [
        Join(client_id=FUZZ_ID, kind="image", image_arch="cnn_small", text_arch="", num_private=5,
             public_digest=public_source().digest),
        Welcome(client_id=FUZZ_ID, run_id="r", feature_dim=dim, rounds=2),
        RoundStart(round=0, local_epochs=1, tower_version=1, public_indices=np.arange(rows, dtype=np.int64),
                   global_features={"image": f, "text": f}, tower={"image.w": np.zeros(3, np.float32)},
                   tower_arch={"image": "cnn_small"}, settings=build_strategy(ServerConfig()).settings()),
        FeatureUpload(round=7, client_id=FUZZ_ID, features={"image": f}, metrics={"top1": 1.0},
                      losses={"task": 0.5}, train_seconds=1.0),
        Ack(round=0), Error(code="bad_shape", reason="x", round=-1),
        Heartbeat(client_id=FUZZ_ID, round=-1, stage="idle"), Bye(reason="done"),
    ]
    return [[bytes(memoryview(x)) for x in encode(m)] for m in messages]


def _mutate_header(rng: random.Random, header: bytes) -> bytes:
    h = msgpack.unpackb(header, raw=False)
    choice = rng.randrange(9)
    if choice == 0 and h["tensors"]:
        rng.choice(h["tensors"])["shape"] = [rng.choice([1 << 20, 1 << 31, -1, 0, 3]) for _ in range(rng.randint(0, 9))]
    elif choice == 1 and h["tensors"]:
        rng.choice(h["tensors"])["dtype"] = rng.choice(["float64", "object", "int8", "<f4", "", "float16"])
    elif choice == 2 and h["tensors"]:
        rng.choice(h["tensors"])["codec"] = rng.choice(["zstd", "fp16", "int8", "", None])
    elif choice == 3 and h["fields"]:
        key = rng.choice(list(h["fields"]))
        h["fields"][key] = rng.choice([None, -5, 2**63 - 1, "x" * 300, [1, [2, [3]]], {"a": 1}, 1.5])
    elif choice == 4:
        h["type"] = rng.choice(["join", "teleport", "", 7, "error", "round_start"])
    elif choice == 5:
        h["msg_id"] = rng.choice(["", "0" * 16, "G" * 16, 5, "f" * 17])
    elif choice == 6:
        h.pop(rng.choice(list(h)))
    elif choice == 7:
        h["fields"]["extra"] = 1
    else:
        h["tensors"] = h["tensors"] * 2
    return msgpack.packb(h)


def mutate(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    """One broken variant of a valid message (sometimes still valid: then the server judges it)."""
    frames = list(frames)
    if not frames:
        return [rng.randbytes(rng.randrange(16))]
    choice = rng.randrange(10)
    if choice == 0:  # truncate a frame
        i = rng.randrange(len(frames))
        frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)]
    elif choice == 1:  # flip bytes
        i = rng.randrange(len(frames))
        b = bytearray(frames[i])
        for _ in range(rng.randint(1, 8)):
            if b:
                b[rng.randrange(len(b))] = rng.randrange(256)
        frames[i] = bytes(b)
    elif choice == 2:  # drop or duplicate a frame
        i = rng.randrange(len(frames))
        frames = frames[:i] + frames[i + 1:] if rng.random() < 0.5 else frames[:i] + [frames[i]] + frames[i:]
    elif choice == 3:  # random msgpack header
        value = rng.choice([None, 1, "x", [1, 2], {"type": "join"}, {"type": "join", "msg_id": "0" * 16,
                                                                     "fields": [], "tensors": {}}])
        frames = [frames[0] if frames else b"", msgpack.packb(value), *frames[2:]]
    elif choice in (4, 5, 6) and len(frames) > 1:  # structured header damage
        try:
            frames[1] = _mutate_header(rng, frames[1])
        except Exception:  # already broken by an earlier mutation: break it some more
            frames[1] = rng.randbytes(rng.randrange(32))
    elif choice == 7 and len(frames) > 2:  # NaN / Inf in a float tensor
        b = bytearray(frames[2])
        if len(b) >= 4:
            pos = 4 * rng.randrange(len(b) // 4)
            b[pos:pos + 4] = np.array([rng.choice([np.nan, np.inf, -np.inf])], dtype="<f4").tobytes()
        frames[2] = bytes(b)
    elif choice == 8 and frames:  # wrong magic or version
        frames[0] = rng.choice([b"", b"FAFD", MAGIC + bytes([PROTOCOL_VERSION + 1]), b"XXXX\x01", b"FAFD\x01\x00"])
    else:  # random bytes everywhere
        frames = [rng.randbytes(rng.randrange(64)) for _ in range(rng.randint(0, 5))]
    return frames


def fuzz_decode(count: int, seed: int = 0) -> dict:
    """decode() on `count` mutated messages: only WireError may come out."""
    rng = random.Random(seed)
    bases = templates()
    crashed, rejected = [], 0
    for _ in range(count):
        frames = mutate(rng, rng.choice(bases))
        try:
            decode(frames)
        except WireError:
            rejected += 1
        except Exception as e:  # a crash: anything else escaping the decoder
            crashed.append(f"{type(e).__name__}: {e}")
    return {"tried": count, "rejected": rejected, "crashed": len(crashed), "crash_examples": crashed[:5]}


def fuzz_live(endpoint: str, count: int, seed: int = 0, reply_timeout_s: float = 10.0,
              alive=lambda: True, curve: tuple[bytes, bytes, bytes] | None = None) -> dict:
    """Sends `count` mutated messages to a live server from one peer; each must be answered with an
    Error (code in the reply) and the server must stay up. Returns tried/answered/crashed and codes."""
    rng = random.Random(seed)
    bases = templates()
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, b"fuzzer")
    if curve is not None:  # (public, secret, server public): an allow-listed insider sending garbage
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = curve
    sock.connect(endpoint)
    codes: dict[str, int] = {}
    tried = unanswered = 0
    try:
        for _ in range(count):
            frames = mutate(rng, rng.choice(bases))
            if not frames:
                frames = [b""]  # ZMQ cannot send an empty multipart message; an empty frame is the nearest
            tried += 1
            sock.send_multipart(frames)
            if not sock.poll(int(reply_timeout_s * 1000)) or not alive():
                unanswered += 1
                break
            reply = decode(sock.recv_multipart()).msg
            code = reply.code if isinstance(reply, Error) else type(reply).__name__
            codes[code] = codes.get(code, 0) + 1
    finally:
        sock.close()
        context.term()
    return {"tried": tried, "answered": tried - unanswered, "crashed": unanswered + (0 if alive() else 1),
            "codes": dict(sorted(codes.items()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decode", type=int, default=100_000, help="mutated messages for decode()")
    parser.add_argument("--live", type=int, default=3_000, help="mutated messages for a live server (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args()

    started = time.perf_counter()
    result = {"decode": fuzz_decode(args.decode, args.seed)}
    d = result["decode"]
    print(f"decode: tried {d['tried']}, rejected {d['rejected']}, crashed {d['crashed']} "
          f"({time.perf_counter() - started:.0f}s)")
    if args.live:
        import socket
        import tempfile

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        endpoint = f"tcp://127.0.0.1:{port}"
        with tempfile.TemporaryDirectory() as tmp:
            server = subprocess.Popen(
                [sys.executable, "-m", "fedafd.cloud_server.cli", "serve", "--bind", endpoint, "--out", tmp, "--insecure",
                 "-c", "rounds=1", "-c", "min_clients=1", "-c", "join_timeout_s=3600", "-c", "join_settle_s=3600",
                 "-c", "public_size=8", "-c", "feature_dim=4", "-c", "image_arch=cnn_small", "-c", "text_arch=gru"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                started = time.perf_counter()
                live = fuzz_live(endpoint, args.live, args.seed, reply_timeout_s=60.0, alive=lambda: server.poll() is None)
                live["seconds"] = time.perf_counter() - started
            finally:
                server.kill()
                server.wait()
        result["live"] = live
        print(f"live server: tried {live['tried']}, answered {live['answered']}, crashed {live['crashed']} "
              f"({live['seconds']:.0f}s); reply codes {live['codes']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
