#!/usr/bin/env bash
# Change tracking figures, in one run (issue 15): passes that read what
# `nightpass track` recorded against passes that read the whole volume,
# on an ext4 filesystem on a loop device, the page cache dropped before
# every pass (a real filer is not in RAM).
#
#   sudo scripts/tracking-figures.sh          # 4 GiB volume
#   SIZE=1G scripts/tracking-figures.sh       # quicker
#
# Environment:
#   SIZE      volume size (default 4G)
#   WORKDIR   parent of the temporary work directory (default /tmp)
#   NO_BUILD  1 = use the existing target/release/nightpass
#   WRITES    4 KiB writes for the tracker's cost (default 20000)
#   OUT       a directory to keep every pass's JSON lines and the sender's
#             journals in (to study the forecast's terms)
#
# Figures (each against its reference, measured in the same run):
#   no-change pass     tracked vs --scan full                target: <= 5%
#   1% delta pass      tracked vs --scan full (1% of the volume rewritten in
#                      scattered 4 KiB writes before each)
#   frozen cutover     `cutover --fsfreeze`, tracked vs --scan full, at 1%
#                      change                               target: <= 10%
#                      twice: 1% in scattered 4 KiB writes (the worst case
#                      for 64 KiB chunks: ~15% of them touched), and 1% in
#                      1 MiB extents (files rewritten whole, as a filer's
#                      writes mostly are)
#   forecast           the tracked cutover's forecast against its frozen time
#                      target: within 10% or 0.5 s
#   tracker's cost     4 KiB random direct writes with and without
#                      `nightpass track` (median of 5 alternating rounds)
#                                                            target: <= 5%
# Needs root (loop devices, mount, fsfreeze, tracefs). Exits 0 when every
# target is met, 1 when one is missed, 2 on a failure.
set -euo pipefail

SIZE=${SIZE:-4G}
WRITES=${WRITES:-20000}
NAME=tracking-figures.sh
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[[ $(id -u) == 0 ]] || die "needs root (loop devices, mount, fsfreeze, tracefs)"

WORK=$(mktemp -d "${WORKDIR:-/tmp}/nightpass-tracking.XXXXXX")
RPID="" TPID="" LOOP="" MNT="$WORK/mnt"
cleanup() {
    if [[ -n ${OUT:-} ]]; then
        mkdir -p "$OUT"
        cp "$WORK/all.jsonl" "$OUT/" 2>/dev/null || true
        find "$WORK/sstate" -name journal.jsonl -exec cp {} "$OUT/sender-journal.jsonl" \; 2>/dev/null || true
    fi
    [[ -n $TPID ]] && kill "$TPID" 2>/dev/null && wait "$TPID" 2>/dev/null || true
    [[ -n $RPID ]] && kill "$RPID" 2>/dev/null || true
    fsfreeze -u "$MNT" 2>/dev/null || true
    umount "$MNT" 2>/dev/null || true
    [[ -n $LOOP ]] && losetup -d "$LOOP" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

cd "$WORK"

echo "== a $SIZE ext4 volume on a loop device, filled with files" >&2
truncate -s "$SIZE" src.img
LOOP=$(losetup --find --show src.img)
mkfs.ext4 -q -F "$LOOP"
mkdir -p "$MNT" && mount "$LOOP" "$MNT"
BYTES=$(blockdev --getsize64 "$LOOP")
# 70% of the volume in one large file the writes below land in.
DATA=$((BYTES * 7 / 10 / 1048576))
head -c "${DATA}M" /dev/urandom >"$MNT/data"
sync

"$BIN" keygen --identity sid >/dev/null
"$BIN" keygen --identity rid >/dev/null
SFP=$("$BIN" fingerprint --identity sid)
"$BIN" serve --listen 127.0.0.1:0 --volume "v=$WORK/target.img" --allow "$SFP" \
    --identity rid --state-dir rstate --max-size 1T 2>serve.log &
RPID=$!
wait_listening "$RPID" serve.log
DEST="127.0.0.1:$PORT/v"

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# A pass (sync or cutover) with the page cache dropped; prints its pass_end
# or cutover_end JSON line (the last one).
run() {
    local cmd=$1 event=$2
    shift 2
    drop_caches
    "$BIN" "$cmd" "$LOOP" "$DEST" --server-fingerprint "$RFP" --identity sid \
        --state-dir sstate --json "$@" >out.jsonl 2>err.log || die "$cmd failed: $(cat err.log)"
    cat out.jsonl >>all.jsonl
    grep "\"event\":\"$event\"" out.jsonl | tail -1
}
field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

# 1% of the volume rewritten in writes of BLOCK bytes at random offsets
# (multiples of BLOCK) of the data file: rewrite BLOCK SEED.
rewrite() {
    python3 - "$MNT/data" "$1" "$((BYTES / 100 / $1))" "$2" <<'EOF'
import os, random, sys
path, block, count, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
fd = os.open(path, os.O_WRONLY)
blocks = os.fstat(fd).st_size // block
for _ in range(count):
    os.pwrite(fd, os.urandom(block), rng.randrange(blocks) * block)
os.fsync(fd)
os.close(fd)
EOF
}
scatter() { rewrite 4096 "$1"; }   # 4 KiB writes
cluster() { rewrite 1048576 "$1"; } # 1 MiB extents (files rewritten whole)

echo "== first pass, then no-change and 1% delta passes reading everything" >&2
run sync pass_end --scan full >/dev/null
NC_FULL=$(run sync pass_end --scan full)
scatter 1
D_FULL=$(run sync pass_end --scan full)

echo "== the tracker; the passes it makes tracked" >&2
"$BIN" track "$LOOP" --state-dir sstate 2>track.log &
TPID=$!
for _ in $(seq 100); do grep -q tracking track.log && break; sleep 0.1; done
run sync pass_end >/dev/null   # the first pass of a record reads everything
NC_TR=$(run sync pass_end --scan tracked)
scatter 2
D_TR=$(run sync pass_end --scan tracked)

echo "== cutovers at 1% change: tracked, then (unsealed) full" >&2
scatter 3
run sync pass_end --scan tracked >/dev/null
scatter 4
C_TR=$(run cutover cutover_end --fsfreeze "$MNT" --scan tracked)
FORECAST=$(field "$C_TR" forecast_s)
"$BIN" unseal v --state-dir rstate >/dev/null 2>&1
run sync pass_end --scan full >/dev/null
scatter 5
C_FULL=$(run cutover cutover_end --fsfreeze "$MNT" --scan full)


echo "== cutovers at 1% change in 1 MiB extents: tracked, then (unsealed) full" >&2
"$BIN" unseal v --state-dir rstate >/dev/null 2>&1
run sync pass_end >/dev/null
run sync pass_end --scan tracked >/dev/null
cluster 6
CL_TR=$(run cutover cutover_end --fsfreeze "$MNT" --scan tracked)
CL_FORECAST=$(field "$CL_TR" forecast_s)
"$BIN" unseal v --state-dir rstate >/dev/null 2>&1
run sync pass_end --scan full >/dev/null
cluster 7
CL_FULL=$(run cutover cutover_end --fsfreeze "$MNT" --scan full)

echo "== the tracker's cost on 4 KiB random direct writes" >&2
writes() {
    python3 - "$LOOP" "$WRITES" "$1" <<'EOF'
import mmap, os, random, sys, time
dev, count, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
size = os.lseek(fd, 0, os.SEEK_END)
buf = mmap.mmap(-1, 4096)
buf.write(os.urandom(4096))
rng = random.Random(seed)
t = time.monotonic()
for _ in range(count):
    os.pwritev(fd, [buf], rng.randrange(size // 4096) * 4096)
print(time.monotonic() - t)
os.close(fd)
EOF
}
umount "$MNT"
kill "$TPID" && wait "$TPID" 2>/dev/null || true
TPID=""
with=() without=()
for round in 1 2 3 4 5; do
    without+=("$(writes "$round")")
    "$BIN" track "$LOOP" --state-dir sstate2 2>track2.log &
    TPID=$!
    for _ in $(seq 100); do grep -q tracking track2.log && break; sleep 0.1; done
    with+=("$(writes "$round")")
    kill "$TPID" && wait "$TPID" 2>/dev/null || true
    TPID=""
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
W_WITH=$(median "${with[@]}")
W_WITHOUT=$(median "${without[@]}")

python3 - "$NC_FULL" "$NC_TR" "$D_FULL" "$D_TR" "$C_FULL" "$C_TR" "$FORECAST" "$W_WITH" "$W_WITHOUT" "$SIZE" "$CL_FULL" "$CL_TR" "$CL_FORECAST" <<'EOF'
import json, sys
nc_full, nc_tr, d_full, d_tr, c_full, c_tr = (json.loads(a) for a in sys.argv[1:7])
forecast, w_with, w_without, size = float(sys.argv[7]), float(sys.argv[8]), float(sys.argv[9]), sys.argv[10]
cl_full, cl_tr = json.loads(sys.argv[11]), json.loads(sys.argv[12])
cl_forecast = float(sys.argv[13])
rows, missed = [], False
def row(name, value, ref, ratio, target, ok):
    global missed
    missed |= not ok
    rows.append(f"| {name:<32} | {value:<22} | {ref:<22} | {ratio:<6} | {target:<18} | {'PASS' if ok else 'MISS'} |")
r = nc_tr["duration_s"] / nc_full["duration_s"]
row("no-change pass", f"{nc_tr['duration_s']:.3f} s tracked", f"{nc_full['duration_s']:.3f} s full", f"{r:.3f}", "<= 0.05", r <= 0.05)
r = d_tr["duration_s"] / d_full["duration_s"]
row("1% delta pass", f"{d_tr['duration_s']:.3f} s tracked", f"{d_full['duration_s']:.3f} s full", f"{r:.3f}", "-", True)
rows.append(f"| {'  read / sent (tracked)':<32} | {d_tr['read_bytes']} / {d_tr['sent_bytes']} B | {d_full['read_bytes']} / {d_full['sent_bytes']} B | {'':<6} | {'':<18} |      |")
for label, tr, full, fc in (("scattered 4K", c_tr, c_full, forecast), ("1 MiB extents", cl_tr, cl_full, cl_forecast)):
    r = tr["frozen_s"] / full["frozen_s"]
    row(f"cutover frozen, 1% {label}", f"{tr['frozen_s']:.3f} s ({tr['proof']})", f"{full['frozen_s']:.3f} s ({full['proof']})", f"{r:.3f}", "<= 0.10", r <= 0.10)
    err = abs(fc - tr["frozen_s"])
    row(f"  forecast, {label}", f"{fc:.2f} s forecast", f"{tr['frozen_s']:.2f} s frozen", f"{fc / tr['frozen_s']:.2f}", "10% or 0.5 s", err <= max(0.1 * tr["frozen_s"], 0.5))
r = w_with / w_without
row("tracker's cost, 4K writes", f"{w_with:.3f} s with", f"{w_without:.3f} s without", f"{r:.3f}", "<= 1.05", r <= 1.05)
print(f"\nnightpass change tracking, {size} ext4 on a loop device, page cache dropped before each pass\n")
print("| figure                           | value                  | reference              | ratio  | target             | ok   |")
print("|----------------------------------|------------------------|------------------------|--------|--------------------|------|")
print("\n".join(rows))
sys.exit(1 if missed else 0)
EOF
