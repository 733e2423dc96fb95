#!/bin/sh
# The peers the benchmarks and the remote-teacher tests use, kept out of the project's own venv: llama-cpp-python
# with its OpenAI-compatible server, built from source into a venv of its own (`make peers`; reused once built).
#   sh infra/install_peers.sh PYTHON VENV
# The native build (-march=native) has crashed with a general protection fault in libggml-cpu on a CPU with AMX,
# so the build names its instruction sets instead: AVX2/FMA/F16C always (x86-64 machines from 2013 on), AVX-512 only
# where this CPU reports it. CMAKE_ARGS from the environment replaces that choice. pip keeps the wheel it builds in
# its cache, so another venv on this machine (a fresh clone's) installs in seconds; PIP_NO_CACHE_DIR=1 rebuilds
# (after changing CMAKE_ARGS, say).
set -eu
PY="$1"
VENV="$2"
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
if [ -z "${CMAKE_ARGS:-}" ]; then
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
    if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
        CMAKE_ARGS="$CMAKE_ARGS -DGGML_AVX512=ON"
    fi
fi
echo "building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION with CMAKE_ARGS=$CMAKE_ARGS"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
CMAKE_ARGS="$CMAKE_ARGS" "$VENV/bin/python" -m pip install -q \
    "llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION"
"$VENV/bin/python" -c "import llama_cpp, llama_cpp.server; print('llama-cpp-python', llama_cpp.__version__)"
