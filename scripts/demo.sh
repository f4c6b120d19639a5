#!/usr/bin/env bash
# Builds Lamina (release) and walks through lamina-img on a backing chain:
# create, write, info, map, check, compare, convert, then the chain tools:
# snapshot, bitmap, resize, measure, amend, rebase and commit. Everything
# happens in a temporary directory that is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh >/dev/null 2>&1 || true
swift build -c release --product lamina-img >/dev/null
swift build -c release --product lamina-io >/dev/null
BIN="$(swift build -c release --show-bin-path)"
IMG="$BIN/lamina-img"; IO="$BIN/lamina-io"
WORK=$(mktemp -d /tmp/lamina-demo.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step "$IMG" create -f qcow2 base.qcow2 1G
step "$IO" -c "write -P 0xaa 0 4M" -c "write -P 0xbb 512M 1M" base.qcow2
step "$IMG" create -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
step "$IO" -c "write -P 0xcc 1M 2M" -c "write -z 600M 64k" top.qcow2
step "$IMG" info --backing-chain top.qcow2
step "$IMG" map top.qcow2
step "$IMG" check top.qcow2
step "$IMG" convert -p -O qcow2 top.qcow2 flat.qcow2
step "$IMG" compare top.qcow2 flat.qcow2
step "$IMG" info --output=json flat.qcow2
step "$IMG" snapshot -c before-merge top.qcow2
step "$IMG" bitmap --add top.qcow2 backup0
step "$IO" -c "write -P 0xdd 8M 1M" top.qcow2
step "$IMG" snapshot -l top.qcow2
step "$IMG" info top.qcow2
step "$IMG" resize flat.qcow2 +1G
step "$IMG" measure -O qcow2 flat.qcow2
step "$IMG" amend -o compat=0.10 flat.qcow2
step "$IMG" create -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
step "$IMG" rebase -p -b mid.qcow2 -F qcow2 flat.qcow2
step "$IMG" create -f qcow2 scratch.qcow2 1G
step "$IMG" create -f qcow2 -b scratch.qcow2 -F qcow2 layer.qcow2
step "$IO" -c "write -P 0xee 100M 2M" layer.qcow2
step "$IMG" commit -p layer.qcow2
step "$IMG" map scratch.qcow2
if command -v qemu-img >/dev/null; then
    step qemu-img check flat.qcow2
    step qemu-img check top.qcow2
    step qemu-img check scratch.qcow2
    step qemu-img snapshot -l top.qcow2
fi
printf '\nDone: Lamina created, wrote, inspected, flattened, snapshotted, resized, rebased, committed and verified a backing chain.\n'
