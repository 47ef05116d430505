#!/usr/bin/env bash
# Sets up (CPU torch, the package with its test extras) and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0" 2>/dev/null || python3 -m pip install -q torch
python3 -m pip install -q -e ".[test]"
python3 -m pytest -q "$@"
