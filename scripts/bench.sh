#!/usr/bin/env bash
# End-to-end figures of nightpass against local references, in one run:
# real sender and receiver processes on loopback QUIC, an incompressible image
# held in the page cache.
#
#   scripts/bench.sh                 # 2 GiB image
#   SIZE=512M scripts/bench.sh       # quicker
#
# Environment:
#   SIZE      image size for `head -c` (default 2G)
#   WORKDIR   parent of the temporary work directory (default /tmp)
#   NO_BUILD  1 = use the existing target/release/nightpass, skip `cargo build`
#   KEEP      1 = keep the work directory (the receiver is still stopped)
#   SEED      seed of the scattered writes (default 1)
#
# Figures and their references (all timed here, wall clock, same run):
#   cat           best of 3 `cat IMAGE > /dev/null` (page cache warm)
#   cp+sync       `cp IMAGE copy && sync`
#   full pass     first `nightpass sync` to an empty target; throughput in GB/s (10^9)
#   no-change     second pass, nothing changed               target <= 1.15 x cat
#   delta         after 1% of the image rewritten in scattered
#                 4 KiB writes at random 4 KiB-aligned offsets target <= 1.3 x cat
#   full pass                                                 target >= 1 GB/s and <= 2 x cp+sync
#   verify local  `nightpass verify IMAGE TARGET`             target <= 1.2 x best of 3 `cat IMAGE TARGET`
#   verify remote `nightpass verify IMAGE HOST:PORT/v`        same target and reference
#   rsync         `rsync --inplace --no-whole-file` of the same writes to a
#                 copy of the image                           target: delta >= 15 x faster
#   throttles     a full pass with --bwlimit R and a no-change pass with
#                 --read-limit R, R = image / THROTTLE_S (default 20 s)
#                                                             target: rate within 5% of R
#   page cache    source pages cached after a --direct pass (fincore)   target: < 1% of the image
#   RSS           sender: max over its runs (/usr/bin/time -v); receiver: VmHWM at the end
#                                                             target < 200 MiB each
#   sparse 1 TiB  first pass of a sparse 1 TiB image file: sender and
#                 receiver peak RSS                           target < 200 MiB each
# Exits 0 when every target is met, 1 when one is missed, 2 on a failure.
set -euo pipefail

SIZE=${SIZE:-2G}
SEED=${SEED:-1}
NAME=bench.sh
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [[ ! -x /usr/bin/time ]]; then
    echo "== installing GNU time (apt package 'time') for peak RSS" >&2
    { apt-get install -y time >/dev/null 2>&1 || { apt-get update >/dev/null 2>&1 && apt-get install -y time >/dev/null 2>&1; }; } ||
        die "/usr/bin/time is missing and could not be installed"
fi

if ! command -v rsync >/dev/null; then
    echo "== installing rsync (reference for the delta pass)" >&2
    { apt-get install -y rsync >/dev/null 2>&1 || { apt-get update >/dev/null 2>&1 && apt-get install -y rsync >/dev/null 2>&1; }; } ||
        die "rsync is missing and could not be installed"
fi
THROTTLE_S=${THROTTLE_S:-20}

WORK=$(mktemp -d "${WORKDIR:-/tmp}/nightpass-bench.XXXXXX")
RPID=""
cleanup() {
    if [[ -n $RPID ]] && kill -0 "$RPID" 2>/dev/null; then
        kill "$RPID" 2>/dev/null || true
        wait "$RPID" 2>/dev/null || true
    fi
    if [[ ${KEEP:-0} == 1 ]]; then
        echo "work directory kept: $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

IMAGE=$WORK/source.img
TARGET=$WORK/target.img
cd "$WORK"

now() { echo "$EPOCHREALTIME"; }
# sub T1 T0 -> seconds
sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a - b }'; }
# ratio A B -> A/B
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "inf" }'; }
# best of 3 wall times of a command
best3() {
    local best="" t0 t
    for _ in 1 2 3; do
        t0=$(now)
        "$@"
        t=$(sub "$(now)" "$t0")
        if [[ -z $best ]] || awk -v t="$t" -v b="$best" 'BEGIN { exit !(t < b) }'; then best=$t; fi
    done
    echo "$best"
}
cat_to_null() { cat "$@" >/dev/null; }
bytes_of() { stat -c %s "$1"; }
human() { awk -v b="$1" 'BEGIN { split("B KiB MiB GiB TiB", u); i = 1; while (b >= 1024 && i < 5) { b /= 1024; i++ } printf "%.1f %s", b, u[i] }'; }

# ---------------------------------------------------------------- setup
echo "== work directory $WORK; image $SIZE of random data" >&2
head -c "$SIZE" /dev/urandom >"$IMAGE"
BYTES=$(bytes_of "$IMAGE")
[[ $BYTES -gt 0 ]] || die "empty image (SIZE=$SIZE?)"
sync

SFP=$("$BIN" keygen --identity "$WORK/sid")
"$BIN" keygen --identity "$WORK/rid" >/dev/null

# --max-size: the sparse 1 TiB target file may be larger than the
# filesystem holding it (the receiver's default bound), as it stays sparse.
"$BIN" serve --listen 127.0.0.1:0 --volume "v=$TARGET" --allow "$SFP" \
    --volume "bw=$WORK/bw.img" --volume "rl=$WORK/rl.img" --volume "sparse=$WORK/sparse-target.img" \
    --max-size 2T --identity "$WORK/rid" --state-dir "$WORK/rstate" 2>"$WORK/serve.err" &
RPID=$!
wait_listening "$RPID" "$WORK/serve.err"
DEST=127.0.0.1:$PORT/v
echo "== receiver pid $RPID on $DEST, fingerprint $RFP" >&2

SENDER_RSS_KB=0
RSS_OF=()
# sender NAME ARGS... : runs a sender command under /usr/bin/time -v with JSON
# output into NAME.json, sets WALL (s) and RC; keeps the peak RSS.
sender() {
    local name=$1 t0 rss
    shift
    t0=$(now)
    set +e
    /usr/bin/time -v -o "$WORK/$name.time" "$BIN" --json "$@" >"$WORK/$name.json" 2>"$WORK/$name.err"
    RC=$?
    set -e
    WALL=$(sub "$(now)" "$t0")
    rss=$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$WORK/$name.time")
    RSS_OF+=("$name $((${rss:-0} / 1024)) MiB")
    [[ -n $rss && $rss -gt $SENDER_RSS_KB ]] && SENDER_RSS_KB=$rss
    return 0
}
# receiver CPU seconds so far (user+system), from /proc/PID/stat
TICKS=$(getconf CLK_TCK)
recv_cpu() { awk -v t="$TICKS" '{ sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / t }' "/proc/$RPID/stat" 2>/dev/null || echo 0; }
declare -A RCPU
# pass NAME [SOURCE [VOLUME [ARGS...]]]: one sync pass, must succeed; sets
# WALL, DUR, SENT, CHANGED, SCANNED
pass() {
    local c0 name=$1 src=${2:-$IMAGE} dest=127.0.0.1:$PORT/${3:-v}
    shift $(($# < 3 ? $# : 3))
    c0=$(recv_cpu)
    sender "$name" sync "$src" "$dest" --server-fingerprint "$RFP" --identity "$WORK/sid" --state-dir "$WORK/sstate" "$@"
    set -- "$name"
    if [[ $RC != 0 ]]; then
        cat "$WORK/$1.err" "$WORK/$1.json" >&2
        die "pass '$1' exited with status $RC"
    fi
    read -r DUR SENT CHANGED SCANNED < <(python3 - "$WORK/$1.json" <<'PY'
import json, sys
end = [e for e in map(json.loads, filter(str.strip, open(sys.argv[1]))) if e.get("event") == "pass_end"]
if not end:
    sys.exit("no pass_end event")
e = end[-1]
print(e["duration_s"], e["sent_bytes"], e["changed_chunks"], e["scanned_bytes"])
PY
    )
    [[ -n ${CHANGED:-} ]] || die "pass '$1': no pass_end figures in $WORK/$1.json"
    RCPU[$1]=$(sub "$(recv_cpu)" "$c0")
}
# cpu_of NAME: "sender U+S s, receiver R s" for a pass
cpu_of() {
    local u s
    read -r u s < <(sender_cpu "$1")
    echo "cpu: sender ${u}u+${s}s, receiver ${RCPU[$1]:-?} s"
}
# sender_cpu NAME: "USER SYSTEM" seconds of the sender of a pass
sender_cpu() {
    awk -F': ' '/User time/ { u = $2 } /System time/ { s = $2 } END { print u, s }' "$WORK/$1.time"
}
# cpu_floor NAME: the shortest wall time the pass's CPU seconds (sender and
# receiver together) allow on this machine's cores, when both share them.
cpu_floor() {
    local u s
    read -r u s < <(sender_cpu "$1")
    awk -v u="$u" -v s="$s" -v r="${RCPU[$1]:-0}" -v n="$(nproc)" 'BEGIN { printf "%.3f", (u + s + r) / n }'
}

# ---------------------------------------------------------------- references
echo "== references" >&2
cat_to_null "$IMAGE"
CAT=$(best3 cat_to_null "$IMAGE")
t0=$(now)
cp "$IMAGE" "$WORK/copy.img" && sync
CP=$(sub "$(now)" "$t0")
rm -f "$WORK/copy.img"
sync

# ---------------------------------------------------------------- passes
echo "== full pass" >&2
cat_to_null "$IMAGE"
pass full
FULL_WALL=$WALL FULL_DUR=$DUR FULL_SENT=$SENT FULL_CHANGED=$CHANGED
FULL_GBS=$(awk -v b="$BYTES" -v t="$FULL_WALL" 'BEGIN { printf "%.2f", b / 1e9 / t }')

echo "== no-change pass" >&2
pass nochange
NOCH_WALL=$WALL NOCH_DUR=$DUR NOCH_SENT=$SENT NOCH_CHANGED=$CHANGED

echo "== copy of the image for the rsync reference" >&2
cp "$IMAGE" "$WORK/rsync-dest.img"
echo "== scattered writes: 1% of the image in 4 KiB writes" >&2
read -r NWRITES TOUCHED < <(python3 - "$IMAGE" "$SEED" 65536 <<'PY'
import os, random, sys
path, seed, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
size = os.path.getsize(path)
blocks = size // 4096
n = max(1, size // 100 // 4096)
rng = random.Random(seed)
offs = [rng.randrange(blocks) * 4096 for _ in range(n)]
fd = os.open(path, os.O_WRONLY)
try:
    for o in offs:
        os.pwrite(fd, os.urandom(4096), o)
finally:
    os.close(fd)
print(n, len({o // chunk for o in offs}))
PY
)
echo "   $NWRITES writes touching $TOUCHED chunks of 64 KiB" >&2

echo "== delta pass" >&2
pass delta
DELTA_WALL=$WALL DELTA_DUR=$DUR DELTA_SENT=$SENT DELTA_CHANGED=$CHANGED

echo "== rsync --inplace --no-whole-file of the same writes" >&2
cat_to_null "$IMAGE" "$WORK/rsync-dest.img"
t0=$(now)
rsync --ignore-times --inplace --no-whole-file "$IMAGE" "$WORK/rsync-dest.img"
RSYNC=$(sub "$(now)" "$t0")
cmp -s "$IMAGE" "$WORK/rsync-dest.img" || die "rsync did not reproduce the image"
rm -f "$WORK/rsync-dest.img"

echo "== throttles: ${THROTTLE_S} s passes" >&2
RATE=$((BYTES / THROTTLE_S))
pass bwlimit "$IMAGE" bw --bwlimit "$RATE"
BW_RATE=$(awk -v b="$SENT" -v t="$DUR" 'BEGIN { printf "%.0f", b / t }')
pass readlimit_first "$IMAGE" rl
pass readlimit "$IMAGE" rl --read-limit "$RATE"
RL_RATE=$(awk -v b="$SCANNED" -v t="$DUR" 'BEGIN { printf "%.0f", b / t }')

echo "== page cache after a --direct pass" >&2
python3 - "$IMAGE" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
os.close(fd)
PY
pass direct "$IMAGE" v --direct
CACHED=$(fincore --bytes --noheadings --output RES "$IMAGE" 2>/dev/null || echo -1)
cat_to_null "$IMAGE"

echo "== sparse 1 TiB image file" >&2
truncate -s 1T "$WORK/sparse.img"
SENDER_RSS_BEFORE=$SENDER_RSS_KB
SENDER_RSS_KB=0
pass sparse "$WORK/sparse.img" sparse
SPARSE_WALL=$WALL SPARSE_SENDER_KB=$SENDER_RSS_KB
SPARSE_RECV_KB=$(awk '/^VmHWM:/ { print $2 }' "/proc/$RPID/status" 2>/dev/null || echo 0)
SENDER_RSS_KB=$SENDER_RSS_BEFORE

# ---------------------------------------------------------------- verify
echo "== verify" >&2
cat_to_null "$IMAGE" "$TARGET"
BOTH=$(best3 cat_to_null "$IMAGE" "$TARGET")
sender verify_local verify "$IMAGE" "$TARGET" --identity "$WORK/sid" --state-dir "$WORK/sstate"
VL_WALL=$WALL VL_RC=$RC
sender verify_remote verify "$IMAGE" "$DEST" --server-fingerprint "$RFP" --identity "$WORK/sid" --state-dir "$WORK/sstate"
VR_WALL=$WALL VR_RC=$RC

RECV_RSS_KB=$(awk '/^VmHWM:/ { print $2 }' "/proc/$RPID/status" 2>/dev/null || echo 0)
kill "$RPID" 2>/dev/null || true
wait "$RPID" 2>/dev/null || true
RPID=""

# ---------------------------------------------------------------- table
MISSED=0
FAILED=0
rows=()
# row FIGURE VALUE REFERENCE RATIO TARGET VERDICT
row() { rows+=("$(printf '| %-28s | %-20s | %-22s | %-6s | %-20s | %-4s |' "$@")"); }
# judge EXPR -> PASS or MISS (awk expression); runs in $(...), so misses are
# counted from the rows afterwards.
judge() {
    if awk "BEGIN { exit !($1) }"; then echo PASS; else echo MISS; fi
}

r=$(ratio "$NOCH_WALL" "$CAT")
row "no-change pass" "${NOCH_WALL} s" "cat ${CAT} s" "$r" "<= 1.15 x cat" "$(judge "$r <= 1.15")"
r=$(ratio "$DELTA_WALL" "$CAT")
row "delta pass (1% scattered)" "${DELTA_WALL} s" "cat ${CAT} s" "$r" "<= 1.3 x cat" "$(judge "$r <= 1.3")"
CP_GBS=$(awk -v b="$BYTES" -v t="$CP" 'BEGIN { printf "%.2f", b / 1e9 / t }')
row "full pass throughput" "${FULL_GBS} GB/s" "cp+sync ${CP_GBS} GB/s" "-" ">= 1 GB/s" "$(judge "$FULL_GBS >= 1")"
r=$(ratio "$FULL_WALL" "$CP")
row "full pass time" "${FULL_WALL} s" "cp+sync ${CP} s" "$r" "<= 2 x cp+sync" "$(judge "$r <= 2")"
r=$(ratio "$RSYNC" "$DELTA_WALL")
row "delta vs rsync" "rsync ${RSYNC} s" "delta ${DELTA_WALL} s" "$r" ">= 15 x faster" "$(judge "$r >= 15")"
r=$(ratio "$BW_RATE" "$RATE")
row "--bwlimit $(human "$RATE")/s" "$(human "$BW_RATE")/s" "limit" "$r" "within 5%" "$(judge "$r >= 0.95 && $r <= 1.05")"
r=$(ratio "$RL_RATE" "$RATE")
row "--read-limit $(human "$RATE")/s" "$(human "$RL_RATE")/s" "limit" "$r" "within 5%" "$(judge "$r >= 0.95 && $r <= 1.05")"
r=$(ratio "$CACHED" "$BYTES")
row "cached after --direct pass" "$(human "$CACHED")" "image $(human "$BYTES")" "$r" "< 1% of the image" "$(judge "$CACHED >= 0 && $r < 0.01")"
r=$(ratio "$VL_WALL" "$BOTH")
v=$(judge "$r <= 1.2")
[[ $VL_RC == 0 ]] || v=FAIL
row "verify local" "${VL_WALL} s" "cat both ${BOTH} s" "$r" "<= 1.2 x cat both" "$v"
r=$(ratio "$VR_WALL" "$BOTH")
v=$(judge "$r <= 1.2")
[[ $VR_RC == 0 ]] || v=FAIL
row "verify remote" "${VR_WALL} s" "cat both ${BOTH} s" "$r" "<= 1.2 x cat both" "$v"
row "sender peak RSS" "$((SENDER_RSS_KB / 1024)) MiB" "-" "-" "< 200 MiB" "$(judge "$SENDER_RSS_KB < 204800")"
row "receiver peak RSS (VmHWM)" "$((RECV_RSS_KB / 1024)) MiB" "-" "-" "< 200 MiB" "$(judge "$RECV_RSS_KB > 0 && $RECV_RSS_KB < 204800")"
row "sparse 1 TiB: sender RSS" "$((SPARSE_SENDER_KB / 1024)) MiB" "pass ${SPARSE_WALL} s" "-" "< 200 MiB" "$(judge "$SPARSE_SENDER_KB < 204800")"
row "sparse 1 TiB: receiver RSS" "$((SPARSE_RECV_KB / 1024)) MiB" "VmHWM after it" "-" "< 200 MiB" "$(judge "$SPARSE_RECV_KB > 0 && $SPARSE_RECV_KB < 204800")"

if printf '%s\n' "${rows[@]}" | grep -q '| MISS |'; then MISSED=1; fi

echo
echo "nightpass end-to-end, $(human "$BYTES") incompressible image in page cache, loopback QUIC, $(nproc) cores, $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo '+dirty')"
echo
printf '| %-28s | %-20s | %-22s | %-6s | %-20s | %-4s |\n' figure value reference ratio target ok
printf '|%s|%s|%s|%s|%s|%s|\n' "------------------------------" "----------------------" "------------------------" "--------" "----------------------" "------"
printf '%s\n' "${rows[@]}"
echo
echo "pass details (wall = whole process; duration_s = nightpass's own pass_end figure):"
printf '  %-10s wall %7s s  duration_s %7s  changed_chunks %6s  sent %-10s  %s\n' \
    full "$FULL_WALL" "$FULL_DUR" "$FULL_CHANGED" "$(human "$FULL_SENT")" "$(cpu_of full)" \
    no-change "$NOCH_WALL" "$NOCH_DUR" "$NOCH_CHANGED" "$(human "$NOCH_SENT")" "$(cpu_of nochange)" \
    delta "$DELTA_WALL" "$DELTA_DUR" "$DELTA_CHANGED" "$(human "$DELTA_SENT")" "$(cpu_of delta)"
echo "  scattered writes: $NWRITES x 4 KiB touching $TOUCHED chunks of 64 KiB"
echo "  CPU floor (sender + receiver CPU seconds / $(nproc) cores, both on this machine): full $(cpu_floor full) s, no-change $(cpu_floor nochange) s, delta $(cpu_floor delta) s"
echo "  sender peak RSS per run: $(IFS=,; echo "${RSS_OF[*]}" | sed 's/,/, /g')"

# Sanity of what nightpass reported.
check() { if ! eval "$1"; then echo "  CHECK FAILED: $2"; FAILED=1; fi; }
check "[[ $FULL_SENT -ge $BYTES ]]" "full pass sent $FULL_SENT bytes, fewer than the image's $BYTES"
check "[[ $NOCH_SENT -eq 0 && $NOCH_CHANGED -eq 0 ]]" "no-change pass sent $NOCH_SENT bytes in $NOCH_CHANGED chunks"
check "[[ $DELTA_CHANGED -eq $TOUCHED ]]" "delta pass sent $DELTA_CHANGED chunks, the writes touched $TOUCHED"
check "[[ $VL_RC -eq 0 ]]" "local verify exited $VL_RC: $(head -c 300 "$WORK/verify_local.json" "$WORK/verify_local.err" 2>/dev/null | tr '\n' ' ')"
check "[[ $VR_RC -eq 0 ]]" "remote verify exited $VR_RC: $(head -c 300 "$WORK/verify_remote.json" "$WORK/verify_remote.err" 2>/dev/null | tr '\n' ' ')"

if [[ $FAILED == 1 ]]; then
    echo "result: FAILURE (see above)"
    exit 2
elif [[ $MISSED == 1 ]]; then
    echo "result: a target was MISSED"
    exit 1
fi
echo "result: every target met"
