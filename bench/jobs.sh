#!/usr/bin/env bash
# Side-by-side block job benchmark: lamina-storage-daemon vs
# qemu-storage-daemon on the same qcow2 backing chain A <- B <- C <- D,
# started with the same command line (a QMP monitor on a UNIX socket and an
# NBD export of the top node).
#   A: fully written with random data; B, C, D: 1/8 of the size each, at
#   different (partly overlapping) offsets, plus a zeroed range in C.
# Cases (seconds from sending the QMP command to the event; lower is better):
#   stream                  block-stream of node-D (whole chain), to BLOCK_JOB_COMPLETED
#   commit                  block-commit of B and C into A (intermediate), to BLOCK_JOB_COMPLETED
#   active-commit           block-commit of D (and B, C) into A, to BLOCK_JOB_READY
#   active-commit+complete  the same, then block-job-complete, to BLOCK_JOB_COMPLETED
# Each run starts from a fresh copy of the chain; afterwards every image is
# checked with qemu-img check, the guest-visible content is compared with a
# flattened reference, and the backing file of the result is verified.
# Prints medians and the ratio lamina/qemu (<= 1.0 means Lamina is at least
# as fast).
# Usage: bench/jobs.sh [runs]   (BENCH_SIZE, BENCH_DIR, BENCH_CASES,
#   BENCH_JOB_TIMEOUT; LAMINA_DAEMON=/path/to/binary skips the swift build)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-${BENCH_RUNS:-5}}
SIZE=${BENCH_SIZE:-2G}
TIMEOUT=${BENCH_JOB_TIMEOUT:-300}
WORK=${BENCH_DIR:-/var/tmp/lamina-bench}/jobs
mkdir -p "$WORK"
if [ -n "${LAMINA_DAEMON:-}" ]; then
    LAMINA=$LAMINA_DAEMON
else
    swift build -c release --product lamina-storage-daemon >/dev/null
    LAMINA="$(swift build -c release --show-bin-path)/lamina-storage-daemon"
fi

RAWSRC="$WORK/src-$SIZE.raw"
if [ ! -f "$RAWSRC" ]; then
    echo "creating $RAWSRC ($SIZE of random data)..." >&2
    head -c "$SIZE" /dev/urandom > "$RAWSRC.tmp"
    mv "$RAWSRC.tmp" "$RAWSRC"
fi
bytes=$(stat -c %s "$RAWSRC")
if [ $((bytes % (1 << 20))) -ne 0 ] || [ "$bytes" -lt $((64 << 20)) ]; then
    echo "BENCH_SIZE must be a multiple of 1 MiB and at least 64M" >&2; exit 1
fi

# The pristine chain, made once per invocation, with relative backing file
# names (so copies elsewhere still resolve), and its flattened reference.
PRISTINE="$WORK/pristine" RUN="$WORK/run" REF="$WORK/ref.raw"
IMAGES="A B C D"
echo "creating the $SIZE chain A <- B <- C <- D and its flattened reference..." >&2
rm -rf "$PRISTINE" "$RUN"; mkdir -p "$PRISTINE"
qemu-img convert -O qcow2 "$RAWSRC" "$PRISTINE/A.qcow2"
( cd "$PRISTINE"
  qemu-img create -q -f qcow2 -b A.qcow2 -F qcow2 B.qcow2
  qemu-img create -q -f qcow2 -b B.qcow2 -F qcow2 C.qcow2
  qemu-img create -q -f qcow2 -b C.qcow2 -F qcow2 D.qcow2
  e=$((bytes / 8)) s=$((bytes / 16))
  qemu-io -f qcow2 -c "write -q -P 0x11 $e $e" B.qcow2                 # [1/8, 2/8)
  qemu-io -f qcow2 -c "write -q -P 0x22 $((3 * s)) $e" \
                   -c "write -q -z $((7 * e)) $((bytes / 64))" C.qcow2  # [3/16, 5/16), zeroes at 7/8
  qemu-io -f qcow2 -c "write -q -P 0x33 $((5 * e)) $e" D.qcow2         # [5/8, 6/8)
)
qemu-img convert -O raw "$PRISTINE/D.qcow2" "$REF"

DPID=""
start_daemon() {  # tool case
    local bin=qemu-storage-daemon; [ "$1" = lamina ] && bin=$LAMINA
    local nodes=()
    if [ "$2" = stream ]; then
        # The backing chain is opened from the image headers.
        nodes=(--blockdev "driver=qcow2,node-name=node-D,file.driver=file,file.filename=$RUN/D.qcow2")
    else
        # Explicit nodes, so block-commit can name top-node and base-node.
        local prev="" img
        for img in $IMAGES; do
            nodes+=(--blockdev "driver=file,node-name=file-$img,filename=$RUN/$img.qcow2")
            nodes+=(--blockdev "driver=qcow2,node-name=node-$img,file=file-$img${prev:+,backing=$prev}")
            prev=node-$img
        done
    fi
    rm -f "$WORK/nbd.sock" "$WORK/qmp.sock"
    "$bin" "${nodes[@]}" \
           --chardev "socket,id=m,path=$WORK/qmp.sock,server=on,wait=off" --monitor chardev=m \
           --nbd-server "addr.type=unix,addr.path=$WORK/nbd.sock" \
           --export "type=nbd,id=e0,node-name=node-D,name=disk,writable=on" &
    DPID=$!
    for _ in $(seq 200); do
        [ -S "$WORK/nbd.sock" ] && [ -S "$WORK/qmp.sock" ] && return 0
        kill -0 "$DPID" 2>/dev/null || break
        sleep 0.05
    done
    echo "daemon ($1) did not start" >&2; exit 1
}
stop_daemon() {
    [ -n "$DPID" ] || return 0
    kill "$DPID" 2>/dev/null || true; wait "$DPID" 2>/dev/null || true; DPID=""
}
trap stop_daemon EXIT

# QMP client: connect, capabilities, send one command, wait for the job's
# event; with "ready" also send block-job-complete after BLOCK_JOB_READY.
# Prints the elapsed seconds (ready: "to-ready to-completed").
QMP_PY=$(cat <<'EOF'
import json, socket, sys, time
path, command, args, mode, timeout = sys.argv[1:6]
job = json.loads(args)["job-id"]
deadline = time.monotonic() + float(timeout)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
sock.connect(path)
rfile = sock.makefile("rb")
def fail(msg):
    print("jobs.sh: " + msg, file=sys.stderr); sys.exit(1)
def send(cmd, arguments=None):
    m = {"execute": cmd, "id": cmd}
    if arguments is not None: m["arguments"] = arguments
    sock.sendall(json.dumps(m).encode() + b"\r\n")
def recv():
    left = deadline - time.monotonic()
    if left <= 0: fail("timed out after %ss waiting for QMP" % timeout)
    sock.settimeout(left)
    try: line = rfile.readline()
    except (socket.timeout, TimeoutError): fail("timed out after %ss waiting for QMP" % timeout)
    if not line: fail("QMP connection closed")
    return json.loads(line)
def wait(cmd, event=None):  # until cmd's return and (if given) the job's event
    returned, when = False, None
    while not returned or (event and when is None):
        m = recv()
        if "error" in m: fail("%s: %s" % (cmd, json.dumps(m["error"])))
        if "return" in m and m.get("id") == cmd: returned = True
        ev, data = m.get("event"), m.get("data", {})
        if ev is None or data.get("device") != job: continue
        if ev in ("BLOCK_JOB_ERROR", "BLOCK_JOB_CANCELLED") or (ev == "BLOCK_JOB_COMPLETED" and "error" in data):
            fail("%s: %s" % (ev, json.dumps(m)))
        if ev == event:
            when = time.monotonic()
            if ev == "BLOCK_JOB_COMPLETED" and data.get("offset") != data.get("len"):
                fail("job completed at offset %s of %s" % (data.get("offset"), data.get("len")))
    return when
m = recv()
if "QMP" not in m: fail("no QMP greeting: %s" % json.dumps(m))
send("qmp_capabilities"); wait("qmp_capabilities")
t0 = time.monotonic()
send(command, json.loads(args))
if mode == "ready":
    t1 = wait(command, "BLOCK_JOB_READY")
    send("block-job-complete", {"device": job})
    t2 = wait("block-job-complete", "BLOCK_JOB_COMPLETED")
    print("%.6f %.6f" % (t1 - t0, t2 - t0))
else:
    print("%.6f" % (wait(command, "BLOCK_JOB_COMPLETED") - t0))
EOF
)
qmp_job() { python3 -c "$QMP_PY" "$WORK/qmp.sock" "$@" "$TIMEOUT"; }

# Fresh chain for each run, nothing dirty, caches dropped (when allowed) and
# the images read back into the page cache.
prepare() {
    rm -rf "$RUN"; mkdir -p "$RUN"
    local img
    for img in $IMAGES; do cp --reflink=auto "$PRISTINE/$img.qcow2" "$RUN/"; done
    sync
    if [ -w /proc/sys/vm/drop_caches ]; then echo 3 > /proc/sys/vm/drop_caches; fi
    for img in $IMAGES; do cat "$RUN/$img.qcow2" > /dev/null; done
}

measure() {  # case -> prints seconds (active-commit: "to-ready to-completed")
    case $1 in
    stream)
        qmp_job block-stream '{"device":"node-D","job-id":"j"}' completed ;;
    commit)
        qmp_job block-commit '{"device":"node-D","job-id":"j","top-node":"node-C","base-node":"node-A"}' completed ;;
    active-commit)
        qmp_job block-commit '{"device":"node-D","job-id":"j","base-node":"node-A"}' ready ;;
    esac
}

backing_of() {
    qemu-img info --output=json "$1" |
        python3 -c 'import json,sys; print(json.load(sys.stdin).get("backing-filename", ""))'
}
verify() {  # tool case
    local img out
    for img in $IMAGES; do
        out=$(qemu-img check "$RUN/$img.qcow2" 2>&1) || {
            echo "$1 $2: qemu-img check $img.qcow2 failed:" >&2; echo "$out" >&2; exit 1; }
    done
    # The image now holding the guest-visible content, and its expected backing.
    local top=D want
    case $2 in
    stream)        want="" ;;
    commit)        want="A.qcow2" ;;
    active-commit) want=""; top=A ;;
    esac
    local got; got=$(backing_of "$RUN/$top.qcow2")
    if [ "${got##*/}" != "$want" ]; then
        echo "$1 $2: $top.qcow2 has backing file '$got', expected '${want:-none}'" >&2; exit 1
    fi
    qemu-img compare -q -f raw -F qcow2 "$REF" "$RUN/$top.qcow2" || {
        echo "$1 $2: $top.qcow2 differs from the flattened chain" >&2
        qemu-img compare -f raw -F qcow2 "$REF" "$RUN/$top.qcow2" >&2 || true
        exit 1; }
}

median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
spread() { sort -n | awk '{a[NR]=$1} END {printf "%.2f-%.2f", a[1], a[NR]}'; }
line() {  # name, qemu values (newline-separated), lamina values
    local qm lm
    qm=$(echo "$2" | median); lm=$(echo "$3" | median)
    printf '%-24s %8.2f %-13s %8.2f %-13s %6.2f\n' "$1" "$qm" "($(echo "$2" | spread))" \
        "$lm" "($(echo "$3" | spread))" "$(echo "$lm / $qm" | bc -l)"
}

run_case() {  # case
    local name=$1 q=() l=() q2=() l2=()
    # BENCH_CASES="stream active-commit" runs only those cases.
    if [ -n "${BENCH_CASES:-}" ] && [[ " $BENCH_CASES " != *" $name "* ]]; then return 0; fi
    for i in $(seq "$RUNS"); do
        for tool in qemu lamina; do
            # Alternate the order so neither tool always runs first.
            if [ $((i % 2)) -eq 0 ]; then [ $tool = qemu ] && tool=lamina || tool=qemu; fi
            prepare
            start_daemon "$tool" "$name"
            local v; v=$(measure "$name") || { echo "$tool $name: job failed" >&2; exit 1; }
            stop_daemon
            verify "$tool" "$name"
            if [ $tool = qemu ]; then q+=("${v%% *}"); q2+=("${v##* }"); else l+=("${v%% *}"); l2+=("${v##* }"); fi
        done
    done
    line "$name" "$(printf '%s\n' "${q[@]}")" "$(printf '%s\n' "${l[@]}")"
    if [ "$name" = active-commit ]; then
        line "$name+complete" "$(printf '%s\n' "${q2[@]}")" "$(printf '%s\n' "${l2[@]}")"
    fi
}

echo "$SIZE chain, $RUNS runs per tool; median seconds (min-max); ratio = lamina/qemu (<= 1.0: Lamina at least as fast)"
printf '%-24s %-22s %-22s %6s\n' "case" "qemu-storage-daemon" "lamina-storage-daemon" "ratio"
run_case stream
run_case commit
run_case active-commit
rm -rf "$RUN" "$PRISTINE" "$REF" "$WORK/nbd.sock" "$WORK/qmp.sock"
