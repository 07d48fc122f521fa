#!/bin/sh
# Build llama.cpp's llama-server and ggml-rpc-server, the baseline of benchmarks/bench_lab.py.
#
# The source is the llama.cpp vendored in the llama-cpp-python sdist (PyPI is the one
# registry this machine reaches), pinned so every run measures the same llama.cpp.
# AVX2, not -march=native: the native build picked AMX here and crashed.
# Idempotent: prints the bin directory; builds only when a binary is missing.
#
#   sh scripts/build-llama-cpp.sh [DIR]      (default: ~/.cache/llc/llama.cpp)
set -eu

VERSION=0.3.36
DIR=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/llc/llama.cpp}
BIN=$DIR/build/bin
if [ -x "$BIN/llama-server" ] && [ -x "$BIN/ggml-rpc-server" ]; then
    echo "$BIN"
    exit 0
fi
command -v cmake >/dev/null || { echo "build-llama-cpp: cmake is missing (apt-get install cmake g++)" >&2; exit 1; }
PY=${PYTHON:-python3}
mkdir -p "$DIR"
if [ ! -f "$DIR/src/CMakeLists.txt" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT INT TERM
    "$PY" -m pip download -q --no-binary :all: --no-deps -d "$tmp" "llama-cpp-python==$VERSION" >&2
    tar xzf "$tmp"/llama_cpp_python-$VERSION.tar.gz -C "$tmp"
    rm -rf "$DIR/src"
    mv "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp" "$DIR/src"
fi
cmake -S "$DIR/src" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON \
    -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_RPC=ON -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$DIR/build" -j "$(nproc)" --target llama-server ggml-rpc-server >&2
echo "$BIN"
