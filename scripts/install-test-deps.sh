#!/usr/bin/env bash
# Installs the real QEMU peers and C libraries the build and the tests need,
# when they are missing. Debian 12 (bookworm); needs root for apt-get.
set -euo pipefail
need=()
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
command -v qemu-storage-daemon >/dev/null 2>&1 || need+=(qemu-system-common)
command -v nbdinfo >/dev/null 2>&1 || need+=(libnbd-bin)
command -v nbdkit >/dev/null 2>&1 || need+=(nbdkit)
command -v fio >/dev/null 2>&1 || need+=(fio)
[ -f /usr/include/zlib.h ] || need+=(zlib1g-dev)
[ -f /usr/include/zstd.h ] || need+=(libzstd-dev)
[ -f /usr/include/liburing.h ] || need+=(liburing-dev)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# QEMU's own QMP client (Python), used by the monitor tests.
if ! python3 -c 'import qemu.qmp' >/dev/null 2>&1; then
    echo "installing: qemu.qmp (pip)" >&2
    python3 -m pip install -q qemu.qmp 2>/dev/null || python3 -m pip install -q --break-system-packages qemu.qmp
fi
