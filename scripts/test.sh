#!/bin/sh
# Set up everything the tests need on a fresh machine and run the whole suite:
# python packages, the SmolLM2 export, and the phone lab's adb/adbd and
# packet delayer (root).
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup.sh
sh scripts/install-lab-deps.sh
. .venv/bin/activate
python -m pip install -q -e '.[lab]'
python examples/smollm2/export.py --out models/smollm2
exec python -m pytest -q -ra "$@"
