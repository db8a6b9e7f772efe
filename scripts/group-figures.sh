#!/usr/bin/env bash
# The group cutover's frozen time against the slowest single volume's
# (issue 16): N volumes (image files of random data) synced by one plan,
# 1% of each rewritten in 1 MiB extents before every cutover; first each
# volume cut over alone (`cutover SOURCE DEST --assume-frozen`), then,
# after unsealing and another pass, all of them by one `cutover --plan`.
#
#   scripts/group-figures.sh                 # four 1 GiB volumes, jobs = 2
#   SIZE=256M N=4 JOBS=4 scripts/group-figures.sh
#
# Environment:
#   SIZE      each volume's size (default 1G)
#   N         volumes (default 4)
#   JOBS      the plan's jobs (default 2)
#   WORKDIR   parent of the temporary work directory (default /tmp)
#   NO_BUILD  1 = use the existing target/release/nightpass
#
# Prints each single cutover's frozen time, the group's, and the ratio of
# the group's to the slowest single one. Needs no root.
set -euo pipefail

SIZE=${SIZE:-1G}
N=${N:-4}
JOBS=${JOBS:-2}
NAME=group-figures.sh
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORK=$(mktemp -d "${WORKDIR:-/tmp}/nightpass-group.XXXXXX")
RPID=""
cleanup() {
    [[ -n $RPID ]] && kill "$RPID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
cd "$WORK"

BYTES=$(python3 -c "import sys; s=sys.argv[1]; m={'K':1<<10,'M':1<<20,'G':1<<30}; print(int(s[:-1])*m[s[-1]] if s[-1] in m else int(s))" "$SIZE")
echo "== $N volumes of $SIZE, a receiver, a plan (jobs = $JOBS)" >&2
"$BIN" keygen --identity sid >/dev/null
"$BIN" keygen --identity rid >/dev/null
SFP=$("$BIN" fingerprint --identity sid)
exports=()
for i in $(seq "$N"); do
    head -c "$BYTES" /dev/urandom >"src$i.img"
    exports+=(--volume "v$i=$WORK/target$i.img")
done
"$BIN" serve --listen 127.0.0.1:0 "${exports[@]}" --allow "$SFP" \
    --identity rid --state-dir rstate --max-size 1T 2>serve.log &
RPID=$!
wait_listening "$RPID" serve.log
{
    echo "receiver = \"127.0.0.1:$PORT\""
    echo "server_fingerprint = \"$RFP\""
    echo "jobs = $JOBS"
    echo "assume_frozen = true"
    for i in $(seq "$N"); do
        printf '\n[[volume]]\nname = "v%s"\nsource = "%s"\n' "$i" "$WORK/src$i.img"
    done
} >filer.toml

common=(--identity sid --state-dir sstate --json)
plan_sync() { "$BIN" sync --plan filer.toml "${common[@]}" >/dev/null 2>>err.log || die "plan sync failed: $(tail -5 err.log)"; }
# 1% of every volume rewritten in 1 MiB extents.
churn() {
    python3 - "$N" "$BYTES" "$1" <<'EOF'
import os, random, sys
n, size, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
for i in range(1, n + 1):
    fd = os.open(f"src{i}.img", os.O_WRONLY)
    for _ in range(max(1, size // 100 // 1048576)):
        os.pwrite(fd, os.urandom(1048576), rng.randrange(size // 1048576) * 1048576)
    os.fsync(fd)
    os.close(fd)
EOF
}
frozen() { python3 -c 'import json,sys; print([json.loads(l) for l in sys.stdin if "\"event\":\"'"$1"'\"" in l][-1]["frozen_s"])'; }
unseal_all() { for i in $(seq "$N"); do "$BIN" unseal "v$i" --state-dir rstate >/dev/null 2>&1; done; }

plan_sync
churn 1
plan_sync
churn 2
echo "== each volume cut over alone" >&2
singles=()
for i in $(seq "$N"); do
    f=$("$BIN" cutover "src$i.img" "127.0.0.1:$PORT/v$i" --server-fingerprint "$RFP" \
        --assume-frozen "${common[@]}" 2>>err.log | frozen cutover_end) || die "cutover of v$i failed: $(tail -5 err.log)"
    singles+=("$f")
done
unseal_all
plan_sync
churn 3
plan_sync
churn 4
echo "== the group cut over by one plan" >&2
G=$("$BIN" cutover --plan filer.toml "${common[@]}" 2>>err.log | frozen group_cutover_end) || die "group cutover failed: $(tail -5 err.log)"

python3 - "$G" "$SIZE" "$N" "$JOBS" "${singles[@]}" <<'EOF'
import sys
g, size, n, jobs = float(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
singles = [float(x) for x in sys.argv[5:]]
print(f"\nnightpass group cutover, {n} volumes of {size}, jobs = {jobs}, 1% of each rewritten in 1 MiB extents\n")
print("| cutover | frozen |")
print("|---|---|")
for i, s in enumerate(singles, 1):
    print(f"| v{i} alone | {s:.3f} s |")
print(f"| all {n} as one group | {g:.3f} s |")
print(f"\ngroup / slowest single: {g / max(singles):.2f}; group / sum of singles: {g / sum(singles):.2f}")
EOF
