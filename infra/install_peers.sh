#!/bin/sh
# The peers the benchmarks and the remote-teacher tests use, kept out of the project's own venv: llama-cpp-python
# with its OpenAI-compatible server, built from source into a venv of its own (`make peers`; reused once built).
#   sh infra/install_peers.sh PYTHON VENV
# The build names its CPU instruction sets (infra/llama_cpp_cmake_args.sh says which, and why). pip keeps the wheel it builds in
# its cache, so another venv on this machine (a fresh clone's) installs in seconds; PIP_NO_CACHE_DIR=1 rebuilds
# (after changing CMAKE_ARGS, say).
set -eu
PY="$1"
VENV="$2"
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CMAKE_ARGS="$(sh "$(dirname "$0")/llama_cpp_cmake_args.sh")"
echo "building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION with CMAKE_ARGS=$CMAKE_ARGS"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
CMAKE_ARGS="$CMAKE_ARGS" "$VENV/bin/python" -m pip install -q \
    "llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION"
"$VENV/bin/python" -c "import llama_cpp, llama_cpp.server; print('llama-cpp-python', llama_cpp.__version__)"
