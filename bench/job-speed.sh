#!/usr/bin/env bash
# How well a block job's `speed` holds: block-stream and block-commit of a
# chain whose every byte must be copied, at a given speed, on
# qemu-storage-daemon and lamina-storage-daemon. Prints the effective
# throughput (bytes copied / seconds from the command to
# BLOCK_JOB_COMPLETED) as a fraction of the requested speed; the issue asks
# for 0.90-1.10.
# Usage: bench/job-speed.sh   (BENCH_SIZE default 256M, BENCH_SPEED default 32M, BENCH_DIR, LAMINA_DAEMON)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${BENCH_SIZE:-256M}
SPEED=${BENCH_SPEED:-32M}
WORK=${BENCH_DIR:-/var/tmp/lamina-bench}/job-speed
mkdir -p "$WORK"
if [ -n "${LAMINA_DAEMON:-}" ]; then
    LAMINA=$LAMINA_DAEMON
else
    swift build -c release --product lamina-storage-daemon >/dev/null
    LAMINA="$(swift build -c release --show-bin-path)/lamina-storage-daemon"
fi
bytes=$(numfmt --from=iec "$SIZE")
speed=$(numfmt --from=iec "$SPEED")

run() {  # daemon kind -> prints seconds
    local bin=$1 kind=$2 d="$WORK/run"
    rm -rf "$d"; mkdir -p "$d"
    qemu-img create -q -f qcow2 "$d/a.qcow2" "$SIZE"
    qemu-io -c "write -P 1 0 $SIZE" "$d/a.qcow2" >/dev/null
    qemu-img create -q -f qcow2 -b a.qcow2 -F qcow2 "$d/b.qcow2"
    qemu-io -c "write -P 2 0 $SIZE" "$d/b.qcow2" >/dev/null
    qemu-img create -q -f qcow2 -b b.qcow2 -F qcow2 "$d/c.qcow2"
    "$bin" --chardev "socket,id=m,path=$d/qmp.sock,server=on,wait=off" --monitor chardev=m \
        --blockdev "driver=qcow2,node-name=node-C,file.driver=file,file.filename=$d/c.qcow2" \
        --nbd-server "addr.type=unix,addr.path=$d/nbd.sock" \
        --export type=nbd,id=e0,node-name=node-C,name=disk,writable=on >/dev/null 2>&1 &
    local pid=$!
    for _ in $(seq 200); do [ -S "$d/qmp.sock" ] && break; sleep 0.05; done
    local cmd
    if [ "$kind" = stream ]; then
        # C copies everything from B (and A below it): SIZE bytes.
        cmd='{"execute": "block-stream", "arguments": {"device": "node-C", "job-id": "j", "speed": '$speed'}}'
    else
        # B (fully written) goes into A: SIZE bytes.
        cmd='{"execute": "block-commit", "arguments": {"device": "node-C", "job-id": "j", "top": "'$d/b.qcow2'", "base": "'$d/a.qcow2'", "speed": '$speed'}}'
    fi
    python3 - "$d/qmp.sock" "$cmd" <<'PY'
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
f.readline(); f.write('{"execute": "qmp_capabilities"}\n'); f.flush(); f.readline()
t0 = time.monotonic(); f.write(sys.argv[2] + "\n"); f.flush()
while True:
    m = json.loads(f.readline())
    if "error" in m: sys.exit("error: %s" % m)
    if m.get("event") == "BLOCK_JOB_COMPLETED":
        if "error" in m["data"]: sys.exit("job failed: %s" % m)
        print("%.3f" % (time.monotonic() - t0)); break
PY
    kill "$pid"; wait "$pid" 2>/dev/null || true
}

echo "$SIZE copied at speed $SPEED ($speed B/s); effective = bytes / seconds to BLOCK_JOB_COMPLETED"
printf '%-8s %-22s %8s %10s\n' job daemon seconds effective/speed
for kind in stream commit; do
    for tool in qemu lamina; do
        bin=qemu-storage-daemon; [ $tool = lamina ] && bin=$LAMINA
        t=$(run "$bin" "$kind")
        printf '%-8s %-22s %8s %10.3f\n' "$kind" "$tool" "$t" "$(echo "$bytes / $t / $speed" | bc -l)"
    done
done
rm -rf "$WORK/run"
