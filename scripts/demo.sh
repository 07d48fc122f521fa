#!/bin/sh
# The main job on a fresh machine: set up, export SmolLM2-135M-Instruct to ONNX, compile it
# with 4-bit weights (int4: 6x smaller, about 3x faster than fp32) split over three local
# devices (processes), check the split numerically, and generate text across them.
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup.sh
. .venv/bin/activate
python examples/smollm2/export.py --out models/smollm2
llc compile models/smollm2/model.onnx --devices examples/devices/local.yaml --weights int4 -o build/smollm2-local
llc verify build/smollm2-local
llc run build/smollm2-local --prompt "${PROMPT:-The capital of France is}" --max-new-tokens "${TOKENS:-40}"
