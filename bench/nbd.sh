#!/usr/bin/env bash
# Side-by-side NBD benchmark: lamina-storage-daemon vs qemu-storage-daemon
# exporting the same image (qcow2 and raw), started with the same command
# line. Cases: nbdcopy sequential read and write of the whole image, and
# fio's nbd engine 4 KiB random read and write at iodepth 1 and 32.
# Prints medians of throughput (MiB/s) or IOPS and the ratio lamina/qemu
# (>= 1.0 means Lamina is at least as fast).
# Usage: bench/nbd.sh [runs]   (BENCH_SIZE, BENCH_DIR, BENCH_FIO_SECONDS, BENCH_CASES)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-${BENCH_RUNS:-5}}
SIZE=${BENCH_SIZE:-1G}
FIO_SECONDS=${BENCH_FIO_SECONDS:-8}
WORK=${BENCH_DIR:-/var/tmp/lamina-bench}/nbd
mkdir -p "$WORK"
swift build -c release --product lamina-storage-daemon >/dev/null
LAMINA="$(swift build -c release --show-bin-path)/lamina-storage-daemon"

RAWSRC="$WORK/src-$SIZE.raw"
if [ ! -f "$RAWSRC" ]; then
    echo "creating $RAWSRC ($SIZE of random data)..." >&2
    head -c "$SIZE" /dev/urandom > "$RAWSRC"
fi

DPID=""
start_daemon() {  # tool fmt image
    local bin=qemu-storage-daemon; [ "$1" = lamina ] && bin=$LAMINA
    rm -f "$WORK/nbd.sock" "$WORK/qmp.sock"
    "$bin" --blockdev "driver=file,node-name=f0,filename=$3" \
           --blockdev "driver=$2,node-name=n0,file=f0" \
           --nbd-server "addr.type=unix,addr.path=$WORK/nbd.sock" \
           --export "type=nbd,id=e0,node-name=n0,name=disk,writable=on" &
    DPID=$!
    for _ in $(seq 200); do [ -S "$WORK/nbd.sock" ] && return 0; sleep 0.05; done
    echo "daemon did not start" >&2; exit 1
}
stop_daemon() { kill "$DPID" 2>/dev/null || true; wait "$DPID" 2>/dev/null || true; DPID=""; }
trap stop_daemon EXIT
URI() { echo "nbd+unix:///disk?socket=$WORK/nbd.sock"; }

# Fresh image for each run: a fully written copy of the random source.
prepare() {  # fmt
    if [ "$1" = qcow2 ]; then
        qemu-img convert -O qcow2 "$RAWSRC" "$WORK/img.qcow2"
    else
        cp "$RAWSRC" "$WORK/img.raw"
    fi
    sync
    if [ -w /proc/sys/vm/drop_caches ]; then echo 3 > /proc/sys/vm/drop_caches; fi
    cat "$WORK/img.$1" > /dev/null
}

now() { date +%s.%N; }
bytes=$(stat -c %s "$RAWSRC")
measure() {  # kind fmt -> prints one number (MiB/s or IOPS)
    local kind=$1 fmt=$2
    case $kind in
    seqread)
        local t0; t0=$(now)
        nbdcopy "$(URI)" null:
        echo "$bytes / 1048576 / ($(now) - $t0)" | bc -l ;;
    seqwrite)
        local t0; t0=$(now)
        nbdcopy --flush "$RAWSRC" "$(URI)"
        echo "$bytes / 1048576 / ($(now) - $t0)" | bc -l ;;
    randread-1|randread-32|randwrite-1|randwrite-32)
        local rw=${kind%-*} qd=${kind#*-}
        # (fio's nbd engine prints "fio: connected to NBD server" on stdout first)
        fio --name=b --ioengine=nbd --uri="$(URI)" --rw="$rw" --bs=4k --iodepth="$qd" \
            --runtime="$FIO_SECONDS" --time_based --ramp_time=1 --output-format=json 2>/dev/null |
            python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(j["read"]["iops"]+j["write"]["iops"])' ;;
    esac
}
median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
spread() { sort -n | awk '{a[NR]=$1} END {printf "%.0f-%.0f", a[1], a[NR]}'; }

run_case() {  # kind fmt unit
    local kind=$1 fmt=$2 unit=$3 q=() l=()
    # BENCH_CASES="qcow2:seqread raw:randread-1" runs only those cases.
    if [ -n "${BENCH_CASES:-}" ] && [[ " $BENCH_CASES " != *" $fmt:$kind "* ]]; then return 0; fi
    for i in $(seq "$RUNS"); do
        for tool in qemu lamina; do
            if [ $((i % 2)) -eq 0 ]; then [ $tool = qemu ] && tool=lamina || tool=qemu; fi
            prepare "$fmt"
            start_daemon "$tool" "$fmt" "$WORK/img.$fmt"
            local v; v=$(measure "$kind" "$fmt")
            stop_daemon
            qemu-img check -q "$WORK/img.$fmt" 2>/dev/null || { [ "$fmt" = raw ] || { echo "check failed ($tool)"; exit 1; }; }
            if [ $tool = qemu ]; then q+=("$v"); else l+=("$v"); fi
        done
    done
    local qm lm
    qm=$(printf '%s\n' "${q[@]}" | median)
    lm=$(printf '%s\n' "${l[@]}" | median)
    printf '%-22s %-6s %10.0f %-15s %10.0f %-15s %6.2f\n' "$kind" "$unit" "$qm" "($(printf '%s\n' "${q[@]}" | spread))" \
        "$lm" "($(printf '%s\n' "${l[@]}" | spread))" "$(echo "$lm / $qm" | bc -l)"
}

echo "$SIZE image, $RUNS runs per tool, fio ${FIO_SECONDS}s per run; medians (min-max); ratio = lamina/qemu"
for fmt in qcow2 raw; do
    echo "== $fmt"
    printf '%-22s %-6s %-26s %-26s %6s\n' "case" "unit" "qemu-storage-daemon" "lamina-storage-daemon" "ratio"
    run_case seqread "$fmt" MiB/s
    run_case seqwrite "$fmt" MiB/s
    run_case randread-1 "$fmt" IOPS
    run_case randread-32 "$fmt" IOPS
    run_case randwrite-1 "$fmt" IOPS
    run_case randwrite-32 "$fmt" IOPS
done
rm -f "$WORK/img.qcow2" "$WORK/img.raw"
