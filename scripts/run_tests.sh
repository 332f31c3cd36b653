#!/usr/bin/env bash
# Install fleetlm with its test dependencies and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e ".[test]"
python -m pytest -q "$@"
