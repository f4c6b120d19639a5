#!/usr/bin/env bash
# The main job: builds Lamina (release) and starts lamina-storage-daemon with
# zero configuration: a scratch 1 GiB qcow2 in a new /tmp/lamina-XXXXXX
# directory, exported writable over NBD, plus a QMP monitor socket. It prints
# how to connect to both, and serves until Ctrl-C or the QMP command 'quit'
# (either closes the image cleanly; the directory is left for you).
set -euo pipefail
cd "$(dirname "$0")/.."
# Build dependencies (zlib/zstd/liburing headers) and the peers used in the
# printed examples (qemu-io, nbdinfo, qemu.qmp), if missing and possible.
scripts/install-test-deps.sh >/dev/null 2>&1 || true
swift build -c release --product lamina-storage-daemon >/dev/null
exec "$(swift build -c release --show-bin-path)/lamina-storage-daemon" --quickstart "$@"
