#!/usr/bin/env bash
# Figures of a plan run (issue 16): N image volumes of SIZE random bytes
# (default four of 1 GiB), a receiver on 127.0.0.1, and the wall time of
#   - four single `nightpass sync SOURCE DEST` runs, one after the other;
#   - one `nightpass sync --plan` with jobs = 1, 2 and 4;
# each a first pass into fresh targets and fresh sender state. Prints a
# table, and with BWLIMIT set (e.g. BWLIMIT=100M) also checks that the sum
# of the bytes sent by one plan run keeps to the one shared limit.
#
#   scripts/plan-figures.sh                  # SIZE=1G N=4
#   SIZE=256M NO_BUILD=1 scripts/plan-figures.sh
#   BWLIMIT=64M SIZE=256M scripts/plan-figures.sh
#   DROP_CACHES=0 scripts/plan-figures.sh    # sources read from the page cache
#   TARGETS=/dev/shm scripts/plan-figures.sh # targets in memory: no disk writes
#
# By default (as root) the page cache is dropped before every run, so the
# sources are read from the disk: with all the image files on one disk,
# volumes read at once compete for it, as they would not on a filer whose
# volumes sit on separate disks. DROP_CACHES=0 takes the disk out.
set -euo pipefail
NAME=plan-figures.sh
SIZE=${SIZE:-1G}
N=${N:-4}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
W=$(mktemp -d "${TMPDIR:-/var/tmp}/np-plan.XXXXXX")
T=$W
if [[ -n ${TARGETS:-} ]]; then T=$(mktemp -d "$TARGETS/np-plan-targets.XXXXXX"); fi
RPID=
cleanup() {
    [[ -n $RPID ]] && kill "$RPID" 2>/dev/null || true
    rm -rf "$W" "$T"
}
trap cleanup EXIT

echo "== $N volumes of $SIZE in $W" >&2
for i in $(seq 0 $((N - 1))); do
    python3 - "$W/v$i.src" "$SIZE" <<'PY'
import os, sys
path, size = sys.argv[1], sys.argv[2]
mult = {'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30}
total = int(size[:-1]) * mult[size[-1]] if size[-1] in mult else int(size)
with open(path, "wb") as f:
    left = total
    while left:
        n = min(left, 16 << 20)
        f.write(os.urandom(n))
        left -= n
PY
done
SF=$("$BIN" keygen --identity "$W/sid")
"$BIN" keygen --identity "$W/rid" >/dev/null
vols=()
for i in $(seq 0 $((N - 1))); do vols+=(--volume "v$i=$T/v$i.tgt"); done
"$BIN" serve --listen 127.0.0.1:0 "${vols[@]}" --allow "$SF" --identity "$W/rid" \
    --state-dir "$W/rstate" 2>"$W/serve.log" &
RPID=$!
wait_listening "$RPID" "$W/serve.log"

# fresh: forget every copy, on both sides, so each run is a first pass.
fresh() {
    rm -rf "$T"/v*.tgt "$W/sstate"
    kill "$RPID"; wait "$RPID" 2>/dev/null || true
    rm -rf "$W/rstate"
    "$BIN" serve --listen "127.0.0.1:$PORT" "${vols[@]}" --allow "$SF" --identity "$W/rid" \
        --state-dir "$W/rstate" 2>"$W/serve.log" &
    RPID=$!
    wait_listening "$RPID" "$W/serve.log"
    sync
    if [[ ${DROP_CACHES:-1} == 1 ]]; then
        echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
    else
        cat "$W"/v*.src >/dev/null
    fi
}

plan() { # plan JOBS
    {
        echo "receiver = \"127.0.0.1:$PORT\""
        echo "server_fingerprint = \"$RFP\""
        echo "jobs = $1"
        [[ -n ${BWLIMIT:-} ]] && echo "bwlimit = \"$BWLIMIT\""
        for i in $(seq 0 $((N - 1))); do
            printf '[[volume]]\nname = "v%d"\nsource = "%s"\n' "$i" "$W/v$i.src"
        done
    } >"$W/plan.toml"
}

common=(--identity "$W/sid" --state-dir "$W/sstate" --json)
now() { python3 -c 'import time; print(time.monotonic())'; }

fresh
t0=$(now)
for i in $(seq 0 $((N - 1))); do
    lim=()
    [[ -n ${BWLIMIT:-} ]] && lim=(--bwlimit "$BWLIMIT")
    "$BIN" sync "$W/v$i.src" "127.0.0.1:$PORT/v$i" --server-fingerprint "$RFP" "${common[@]}" "${lim[@]}" \
        >"$W/single$i.jsonl" || die "single sync of v$i failed"
done
t1=$(now)
single=$(python3 -c "print(f'{$t1 - $t0:.1f}')")

declare -A took sent
for jobs in 1 2 4; do
    fresh
    plan "$jobs"
    t0=$(now)
    "$BIN" sync --plan "$W/plan.toml" "${common[@]}" >"$W/plan$jobs.jsonl" || die "plan sync with jobs = $jobs failed"
    t1=$(now)
    took[$jobs]=$(python3 -c "print(f'{$t1 - $t0:.1f}')")
    sent[$jobs]=$(python3 - "$W/plan$jobs.jsonl" <<'PY'
import json, sys
print(sum(e.get("sent_bytes", 0) for e in map(json.loads, open(sys.argv[1])) if e["event"] == "pass_end"))
PY
)
done

echo
cache="from the disk, targets in $T"
[[ ${DROP_CACHES:-1} == 1 ]] || cache="from the page cache, targets in $T"
echo "$N volumes of $SIZE, first passes, sources read $cache, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)${BWLIMIT:+, bwlimit $BWLIMIT}"
printf '| %-28s | %9s | %9s |\n' run "wall (s)" "vs single"
printf '|%s|%s|%s|\n' "------------------------------" "-----------" "-----------"
printf '| %-28s | %9s | %9s |\n' "$N single syncs, in a row" "$single" "1.00"
for jobs in 1 2 4; do
    ratio=$(python3 -c "print(f'{${took[$jobs]} / $single:.2f}')")
    printf '| %-28s | %9s | %9s |\n' "sync --plan, jobs = $jobs" "${took[$jobs]}" "$ratio"
done
if [[ -n ${BWLIMIT:-} ]]; then
    for jobs in 1 2 4; do
        python3 - "${sent[$jobs]}" "${took[$jobs]}" "$BWLIMIT" "$jobs" <<'PY'
import sys
sent, took, lim, jobs = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
mult = {'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30}
limit = int(lim[:-1]) * mult[lim[-1]] if lim[-1] in mult else int(lim)
rate = sent / took
ok = rate <= limit * 1.05
print(f"jobs = {jobs}: {rate / (1 << 20):.1f} MiB/s sent in all, limit {limit / (1 << 20):.1f} MiB/s: {'within' if ok else 'OVER'}")
sys.exit(0 if ok else 1)
PY
    done
fi
