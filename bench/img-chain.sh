#!/usr/bin/env bash
# Side-by-side benchmark of `commit` and `rebase`: lamina-img vs qemu-img,
# same command line, same images.
#   commit   base.qcow2 (fully written, random data A) <- top.qcow2 (fully
#            written, random data B); `commit top.qcow2` copies all of top
#            into base and empties top.
#   rebase   base.qcow2 (data A) <- top.qcow2 (1/8 of the size written);
#            nb.qcow2 = data A with 1/4 of the size rewritten (two ranges);
#            `rebase -b nb.qcow2 -F qcow2 top.qcow2` compares both bases
#            wherever top allocates nothing and copies the differing parts.
# Each run starts from fresh copies of the images (page cache dropped when
# allowed, images read back); afterwards every image passes qemu-img check,
# the result equals a flattened reference (qemu-img compare) and the backing
# file is verified. Prints medians and the ratio lamina/qemu (<= 1.0 means
# Lamina is at least as fast).
# Usage: bench/img-chain.sh [runs]   (BENCH_SIZE (default 2G), BENCH_DIR,
#   BENCH_CASES="commit rebase"; LAMINA_IMG=/path/to/binary skips the swift build)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-${BENCH_RUNS:-5}}
SIZE=${BENCH_SIZE:-2G}
WORK=${BENCH_DIR:-/var/tmp/lamina-bench}/img-chain
mkdir -p "$WORK"
if [ -n "${LAMINA_IMG:-}" ]; then
    LAMINA=$LAMINA_IMG
else
    swift build -c release --product lamina-img >/dev/null
    LAMINA="$(swift build -c release --show-bin-path)/lamina-img"
fi

for s in a b; do
    if [ ! -f "$WORK/src-$s-$SIZE.raw" ]; then
        echo "creating $WORK/src-$s-$SIZE.raw ($SIZE of random data)..." >&2
        head -c "$SIZE" /dev/urandom > "$WORK/src-$s-$SIZE.raw.tmp"
        mv "$WORK/src-$s-$SIZE.raw.tmp" "$WORK/src-$s-$SIZE.raw"
    fi
done
SRCA="$WORK/src-a-$SIZE.raw" SRCB="$WORK/src-b-$SIZE.raw"
bytes=$(stat -c %s "$SRCA")
if [ $((bytes % (1 << 20))) -ne 0 ] || [ "$bytes" -lt $((64 << 20)) ]; then
    echo "BENCH_SIZE must be a multiple of 1 MiB and at least 64M" >&2; exit 1
fi

# Pristine images (relative backing names), made once per invocation, and
# the flattened references.
P="$WORK/pristine" RUN="$WORK/run"
echo "creating the $SIZE images and their flattened references..." >&2
rm -rf "$P" "$RUN"; mkdir -p "$P/commit" "$P/rebase"
qemu-img convert -f raw -O qcow2 "$SRCA" "$P/commit/base.qcow2"
( cd "$P/commit"
  qemu-img convert -f raw -O qcow2 -B base.qcow2 -F qcow2 "$SRCB" top.qcow2 )
cp "$SRCB" "$P/commit-ref.raw"
cp "$P/commit/base.qcow2" "$P/rebase/base.qcow2"
( cd "$P/rebase"
  e=$((bytes / 8)) s=$((bytes / 16))
  qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
  qemu-io -f qcow2 -c "write -q -P 0x33 $((3 * e)) $e" top.qcow2          # [3/8, 4/8)
  cp base.qcow2 nb.qcow2
  qemu-io -f qcow2 -c "write -q -P 0x44 $s $e" \
                   -c "write -q -P 0x55 $((9 * s)) $e" nb.qcow2           # [1/16, 3/16), [9/16, 11/16)
)
qemu-img convert -O raw "$P/rebase/top.qcow2" "$P/rebase-ref.raw"

prepare() {  # case
    rm -rf "$RUN"; mkdir -p "$RUN"
    cp --reflink=auto "$P/$1"/*.qcow2 "$RUN/"
    sync
    if [ -w /proc/sys/vm/drop_caches ]; then echo 3 > /proc/sys/vm/drop_caches; fi
    cat "$RUN"/*.qcow2 > /dev/null
}

measure() {  # tool case -> seconds
    local bin=qemu-img; [ "$1" = lamina ] && bin=$LAMINA
    local args
    case $2 in
    commit) args=(commit -q top.qcow2) ;;
    rebase) args=(rebase -q -b nb.qcow2 -F qcow2 top.qcow2) ;;
    esac
    local t0 t1
    t0=$(date +%s.%N)
    ( cd "$RUN" && "$bin" "${args[@]}" ) || { echo "$1 $2: failed" >&2; exit 1; }
    t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc -l
}

backing_of() {
    qemu-img info --output=json "$1" |
        python3 -c 'import json,sys; print(json.load(sys.stdin).get("backing-filename", ""))'
}
verify() {  # tool case
    local img out
    for img in "$RUN"/*.qcow2; do
        out=$(qemu-img check "$img" 2>&1) || {
            echo "$1 $2: qemu-img check ${img##*/} failed:" >&2; echo "$out" >&2; exit 1; }
    done
    case $2 in
    commit)
        qemu-img compare -q -f raw -F qcow2 "$P/commit-ref.raw" "$RUN/base.qcow2" || {
            echo "$1 commit: base.qcow2 differs from top's old content" >&2; exit 1; }
        qemu-img compare -q -f raw -F qcow2 "$P/commit-ref.raw" "$RUN/top.qcow2" || {
            echo "$1 commit: top.qcow2 differs" >&2; exit 1; }
        # top was emptied.
        if qemu-img map --output=json "$RUN/top.qcow2" | grep -q '"depth": 0'; then
            echo "$1 commit: top.qcow2 still allocates data" >&2; exit 1
        fi ;;
    rebase)
        [ "$(backing_of "$RUN/top.qcow2")" = nb.qcow2 ] || {
            echo "$1 rebase: wrong backing file" >&2; exit 1; }
        qemu-img compare -q -f raw -F qcow2 "$P/rebase-ref.raw" "$RUN/top.qcow2" || {
            echo "$1 rebase: top.qcow2 differs from the old chain" >&2; exit 1; } ;;
    esac
}

median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
spread() { sort -n | awk '{a[NR]=$1} END {printf "%.2f-%.2f", a[1], a[NR]}'; }
line() {  # name, qemu values (newline-separated), lamina values
    local qm lm
    qm=$(echo "$2" | median); lm=$(echo "$3" | median)
    printf '%-10s %8.2f %-13s %8.2f %-13s %6.2f\n' "$1" "$qm" "($(echo "$2" | spread))" \
        "$lm" "($(echo "$3" | spread))" "$(echo "$lm / $qm" | bc -l)"
}

run_case() {  # case
    local name=$1 q=() l=()
    if [ -n "${BENCH_CASES:-}" ] && [[ " $BENCH_CASES " != *" $name "* ]]; then return 0; fi
    for i in $(seq "$RUNS"); do
        for tool in qemu lamina; do
            # Alternate the order so neither tool always runs first.
            if [ $((i % 2)) -eq 0 ]; then [ $tool = qemu ] && tool=lamina || tool=qemu; fi
            prepare "$name"
            local v; v=$(measure "$tool" "$name")
            verify "$tool" "$name"
            if [ $tool = qemu ]; then q+=("$v"); else l+=("$v"); fi
        done
    done
    line "$name" "$(printf '%s\n' "${q[@]}")" "$(printf '%s\n' "${l[@]}")"
}

echo "$SIZE images, $RUNS runs per tool; median seconds (min-max); ratio = lamina/qemu (<= 1.0: Lamina at least as fast)"
printf '%-10s %-22s %-22s %6s\n' "case" "qemu-img" "lamina-img" "ratio"
run_case commit
run_case rebase
rm -rf "$RUN" "$P"
