#!/bin/sh
# Prints the CMAKE_ARGS llama-cpp-python is built with here (infra/install.sh and infra/install_peers.sh use it).
# The native build (-march=native) has crashed with a general protection fault in libggml-cpu on a CPU with AMX,
# so the build names its instruction sets instead: AVX2/FMA/F16C always (x86-64 machines from 2013 on), AVX-512 only
# where this CPU reports it. CMAKE_ARGS from the environment replaces that choice.
set -eu
if [ -n "${CMAKE_ARGS:-}" ]; then
    echo "$CMAKE_ARGS"
    exit 0
fi
ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
    ARGS="$ARGS -DGGML_AVX512=ON"
fi
echo "$ARGS"
