#!/usr/bin/env bash
# Figures of convergence and the frozen cutover (issue 4), as root:
# a 1 GiB ext4 loop volume under a steady writer, `nightpass converge`, then
# `nightpass cutover --fsfreeze`. Prints the passes, the forecast made before
# the cutover against its actual frozen time, and the frozen time divided by
# the time of one fresh `cat` of the volume.
#
#   sudo scripts/cutover-figures.sh            # SIZE=1G WRITE_KBPS=2048 WINDOW=60s
#   JOURNAL_OUT=/tmp/j.jsonl keeps the sender's pass journal
set -euo pipefail
SIZE=${SIZE:-1G}
WRITE_KBPS=${WRITE_KBPS:-2048}
WINDOW=${WINDOW:-60s}
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "needs root (losetup, mount, fsfreeze)" >&2; exit 2; }
[ "${NO_BUILD:-0}" = 1 ] || cargo build --release -q
B=$PWD/target/release/nightpass
W=$(mktemp -d /tmp/np-cutover.XXXXXX)
LOOP= ; RPID= ; WPID=
cleanup() {
    [ -n "$WPID" ] && kill "$WPID" 2>/dev/null || true
    fsfreeze -u "$W/mnt" 2>/dev/null || true
    umount "$W/mnt" 2>/dev/null || true
    [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null || true
    [ -n "$RPID" ] && kill "$RPID" 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT
truncate -s "$SIZE" "$W/src.img"
LOOP=$(losetup --find --show "$W/src.img")
mkfs.ext4 -q "$LOOP"
mkdir "$W/mnt"; mount "$LOOP" "$W/mnt"
# 40% full of files, as a filer would be.
python3 - "$W/mnt" "$SIZE" <<'PY'
import os, sys
root, size = sys.argv[1], sys.argv[2]
mult = {'K':1<<10,'M':1<<20,'G':1<<30}
total = int(size[:-1]) * mult[size[-1]] if size[-1] in mult else int(size)
want, n = int(total * 0.4), 0
while n < want:
    d = os.path.join(root, "d%03d" % (n // (8 << 20)))
    os.makedirs(d, exist_ok=True)
    b = os.urandom(256 << 10)
    with open(os.path.join(d, "f%08d" % n), "wb") as f: f.write(b)
    n += len(b)
PY
sync
SF=$($B keygen --identity "$W/sid"); RF=$($B keygen --identity "$W/rid")
$B serve --listen 127.0.0.1:0 --volume "v=$W/tgt.img" --allow "$SF" --identity "$W/rid" --state-dir "$W/rstate" 2> "$W/serve.log" &
RPID=$!
for _ in $(seq 50); do grep -q "listening on" "$W/serve.log" && break; sleep 0.1; done
PORT=$(sed -n 's/^.*listening on 127.0.0.1:\([0-9]*\) .*/\1/p' "$W/serve.log")
common=(--server-fingerprint "$RF" --identity "$W/sid" --state-dir "$W/sstate" --json)
# The steady writer: new files, appends, deletions, about WRITE_KBPS KiB/s.
python3 - "$W/mnt" "$WRITE_KBPS" <<'PY' &
import os, sys, time, random
root, kbps = sys.argv[1], int(sys.argv[2])
os.makedirs(os.path.join(root, "live"), exist_ok=True)
i = 0
while True:
    t = time.time()
    p = os.path.join(root, "live", "w%06d" % i)
    with open(p, "wb") as f: f.write(os.urandom(64 << 10))
    if i % 7 == 0 and i > 10:
        try: os.remove(os.path.join(root, "live", "w%06d" % random.randrange(i - 10)))
        except FileNotFoundError: pass
    i += 1
    time.sleep(max(0, 64 / kbps - (time.time() - t)))
PY
WPID=$!
sleep 2
echo "== converge (window $WINDOW, writer ~$WRITE_KBPS KiB/s)"
set +e
$B converge "$LOOP" "127.0.0.1:$PORT/v" --window "$WINDOW" --max-passes 10 "${common[@]}" > "$W/converge.json"
crc=$?
set -e
echo "== cutover --fsfreeze"
$B cutover "$LOOP" "127.0.0.1:$PORT/v" --fsfreeze "$W/mnt" "${common[@]}" > "$W/cutover.json"
kill "$WPID"; WPID=
[ -z "${JOURNAL_OUT:-}" ] || find "$W/sstate" -name journal.jsonl -exec cp {} "$JOURNAL_OUT" \;
sync
blockdev --flushbufs "$LOOP"
echo 1 > /proc/sys/vm/drop_caches
t0=$(date +%s.%N); cat "$LOOP" > /dev/null; t1=$(date +%s.%N)
python3 - "$W/converge.json" "$W/cutover.json" "$t0" "$t1" "$crc" <<'PY'
import json, sys
conv = [json.loads(l) for l in open(sys.argv[1])]
cut = [json.loads(l) for l in open(sys.argv[2])]
cat = float(sys.argv[4]) - float(sys.argv[3])
passes = [e for e in conv if e["event"] == "pass_end"]
end = [e for e in conv if e["event"] == "converge_end"]
print("| pass | duration s | changed | sent | forecast of a frozen pass s |")
print("|---|---|---|---|---|")
for p in passes:
    f = p["forecast_final_pass_s"]
    print(f"| {p['pass']} | {p['duration_s']:.2f} | {p['changed_bytes']/2**20:.1f} MiB | {p['sent_bytes']/2**20:.1f} MiB | {'-' if f is None else f'{f:.2f}'} |")
ce = [e for e in cut if e["event"] == "cutover_end"][0]
fp = [e for e in cut if e["event"] == "pass_end"][0]
print(f"converge: exit {sys.argv[5]}, {len(passes)} passes, ready={end[0]['ready'] if end else '?'}")
print(f"cutover: final pass {fp['duration_s']:.2f} s, {fp['changed_bytes']/2**20:.1f} MiB changed")
fc = ce.get("forecast_s")
print(f"forecast before the cutover {fc:.2f} s; actual frozen time {ce['frozen_s']:.2f} s; error {100*(ce['frozen_s']-fc)/fc:+.0f}%")
print(f"frozen time / fresh cat of the volume ({cat:.2f} s): {ce['frozen_s']/cat:.2f}")
print(f"consistency point {ce['consistency_point']}")
PY
