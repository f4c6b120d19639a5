#!/usr/bin/env bash
# Side-by-side benchmark: lamina-img convert vs qemu-img convert on the same
# qcow2 image fully written with random data (default 2 GiB).
#   qcow2->qcow2 and qcow2->raw, page cache (default target cache) and -t none.
# Prints a table of median wall times and the ratio lamina/qemu (<= 1.0 means
# Lamina is at least as fast). Usage: bench/convert.sh [runs]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-${BENCH_RUNS:-5}}
SIZE=${BENCH_SIZE:-2G}
WORK=${BENCH_DIR:-/var/tmp/lamina-bench}
mkdir -p "$WORK"
swift build -c release --product lamina-img >/dev/null
LAMINA="$(swift build -c release --show-bin-path)/lamina-img"
SRC="$WORK/src-$SIZE.qcow2"
if [ ! -f "$SRC" ]; then
    echo "creating $SRC ($SIZE of random data)..." >&2
    head -c "$SIZE" /dev/urandom > "$WORK/src.raw"
    qemu-img convert -O qcow2 "$WORK/src.raw" "$SRC"
    rm -f "$WORK/src.raw"
fi
cat "$SRC" > /dev/null   # warm the page cache for the source

now() { date +%s.%N; }
# Same starting state for every run: no output file, nothing dirty, caches
# dropped (when allowed) and the source read back into the page cache.
settle() {
    rm -f "$1"; sync
    if [ -w /proc/sys/vm/drop_caches ]; then echo 3 > /proc/sys/vm/drop_caches; fi
    cat "$SRC" > /dev/null
}
median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
spread() { sort -n | awk '{a[NR]=$1} END {printf "%.2f-%.2f", a[1], a[NR]}'; }

run_case() {  # name, extra args...
    local name=$1; shift
    local fmt=$1; shift
    local q=() l=()
    for i in $(seq "$RUNS"); do
        for tool in qemu lamina; do
            # Alternate the order so neither tool always runs first.
            if [ $((i % 2)) -eq 0 ]; then [ $tool = qemu ] && tool=lamina || tool=qemu; fi
            local out="$WORK/out.$fmt"
            settle "$out"
            local bin=qemu-img; [ $tool = lamina ] && bin=$LAMINA
            local t0; t0=$(now)
            "$bin" convert "$@" -O "$fmt" "$SRC" "$out"
            local t1; t1=$(now)
            local dt; dt=$(echo "$t1 - $t0" | bc -l)
            if [ $tool = qemu ]; then q+=("$dt"); else l+=("$dt"); fi
        done
        qemu-img compare -q "$SRC" "$WORK/out.$fmt"
    done
    local qm lm
    qm=$(printf '%s\n' "${q[@]}" | median)
    lm=$(printf '%s\n' "${l[@]}" | median)
    printf '%-28s %8.3f %-11s %8.3f %-11s %6.2f\n' "$name" "$qm" "($(printf '%s\n' "${q[@]}" | spread))" \
        "$lm" "($(printf '%s\n' "${l[@]}" | spread))" "$(echo "$lm / $qm" | bc -l)"
}

echo "$SIZE source, $RUNS runs per tool, median seconds (min-max)"
printf '%-28s %-20s %-20s %6s\n' "case" "qemu-img" "lamina-img" "ratio"
run_case "qcow2->qcow2 (page cache)" qcow2
run_case "qcow2->raw   (page cache)" raw
run_case "qcow2->qcow2 (-t none)" qcow2 -t none
run_case "qcow2->raw   (-t none)" raw -t none
rm -f "$WORK/out.qcow2" "$WORK/out.raw"
