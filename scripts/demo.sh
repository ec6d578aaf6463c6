#!/usr/bin/env bash
# The embedded demo: installs what it needs into .venv, then runs `surgeflow demo` (synthetic
# traffic, a Redis server started by the program, ClickHouse in process). Ctrl-C stops it;
# SURGEFLOW_DEMO_SECONDS=N stops it after N seconds. Extra arguments go to `surgeflow demo`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/venv.sh "."
exec .venv/bin/surgeflow demo "$@"
