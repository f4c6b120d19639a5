#!/usr/bin/env bash
# Runs every test (unit, interop against the real qemu-img/qemu-io, corpus).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
swift build --build-tests
exec swift test --skip-build "$@"
