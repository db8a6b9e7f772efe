#!/usr/bin/env bash
# Chooses the chunk size by measurement: for 16K, 64K, 256K and 1M chunks,
#   - bytes sent by a delta pass after 1% of a random image was rewritten in
#     scattered 4 KiB writes (4 KiB-aligned random offsets, fixed seed);
#   - bytes sent by a delta pass after a file workload on ext4 (create, append,
#     delete files; needs root for mount -o loop, skipped loudly otherwise);
#   - throughput of a no-change pass (the image in page cache);
#   - manifest size (chunks x 32 bytes, plus the 4 KiB header on disk).
# Every chunk size gets its own receiver, state directories and target, and
# sees exactly the same before/after images: the changes are made once, on
# copies, and each chunk size passes "before" and then "after".
#
#   scripts/chunk-size.sh
#
# Environment:
#   SIZE      random image size (default 1G)
#   FS_SIZE   ext4 image size (default 1G)
#   SIZES     chunk sizes (default "16K 64K 256K 1M")
#   WORKDIR   parent of the temporary work directory (default /tmp)
#   NO_BUILD  1 = skip `cargo build --release`
#   KEEP      1 = keep the work directory
#   SEED      seed of the writes and the file workload (default 1)
set -euo pipefail

SIZE=${SIZE:-1G}
FS_SIZE=${FS_SIZE:-1G}
SIZES=${SIZES:-16K 64K 256K 1M}
SEED=${SEED:-1}
NAME=chunk-size.sh
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORK=$(mktemp -d "${WORKDIR:-/tmp}/nightpass-chunks.XXXXXX")
RPID=""
MNT=""
stop_receiver() {
    if [[ -n $RPID ]] && kill -0 "$RPID" 2>/dev/null; then
        kill "$RPID" 2>/dev/null || true
        wait "$RPID" 2>/dev/null || true
    fi
    RPID=""
}
cleanup() {
    stop_receiver
    if [[ -n $MNT ]] && mountpoint -q "$MNT" 2>/dev/null; then umount "$MNT" || umount -l "$MNT" || true; fi
    if [[ ${KEEP:-0} == 1 ]]; then
        echo "work directory kept: $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
cd "$WORK"

now() { echo "$EPOCHREALTIME"; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a - b }'; }
human() { awk -v b="$1" 'BEGIN { split("B KiB MiB GiB TiB", u); i = 1; while (b >= 1024 && i < 5) { b /= 1024; i++ } printf "%.1f %s", b, u[i] }'; }
to_bytes() { python3 -c 'import sys; s=sys.argv[1].upper().rstrip("IB"); m={"K":1<<10,"M":1<<20,"G":1<<30,"T":1<<40}; print(int(float(s[:-1])*m[s[-1]]) if s[-1] in m else int(s))' "$1"; }

SFP=$("$BIN" keygen --identity "$WORK/sid")
"$BIN" keygen --identity "$WORK/rid" >/dev/null

# start_receiver DIR : a fresh receiver exporting v=DIR/target.img with its
# own state; sets RPID, DEST, RFP
start_receiver() {
    local dir=$1
    mkdir -p "$dir"
    "$BIN" serve --listen 127.0.0.1:0 --volume "v=$dir/target.img" --allow "$SFP" \
        --identity "$WORK/rid" --state-dir "$dir/rstate" 2>"$dir/serve.err" &
    RPID=$!
    wait_listening "$RPID" "$dir/serve.err"
    DEST=127.0.0.1:$PORT/v
}

# pass DIR NAME SOURCE [ARGS...] : one sync pass into DIR, must succeed;
# sets WALL, DUR, SENT, CHANGED
pass() {
    local dir=$1 name=$2 src=$3 t0 rc
    shift 3
    t0=$(now)
    set +e
    "$BIN" --json sync "$src" "$DEST" --server-fingerprint "$RFP" --identity "$WORK/sid" \
        --state-dir "$dir/sstate" "$@" >"$dir/$name.json" 2>"$dir/$name.err"
    rc=$?
    set -e
    WALL=$(sub "$(now)" "$t0")
    if [[ $rc != 0 ]]; then
        cat "$dir/$name.err" "$dir/$name.json" >&2
        die "pass $name into $dir exited with status $rc"
    fi
    read -r DUR SENT CHANGED < <(python3 - "$dir/$name.json" <<'PY'
import json, sys
end = [e for e in map(json.loads, filter(str.strip, open(sys.argv[1]))) if e.get("event") == "pass_end"]
if not end:
    sys.exit("no pass_end event")
e = end[-1]
print(e["duration_s"], e["sent_bytes"], e["changed_chunks"])
PY
    )
    [[ -n ${CHANGED:-} ]] || die "pass $name into $dir: no pass_end figures"
}

# ---------------------------------------------------------------- images
echo "== random image: $SIZE, and a copy with 1% rewritten in scattered 4 KiB writes" >&2
head -c "$SIZE" /dev/urandom >rand0.img
cp rand0.img rand1.img
WRITES=$(python3 - rand1.img "$SEED" <<'PY'
import os, random, sys
path, seed = sys.argv[1], int(sys.argv[2])
size = os.path.getsize(path)
n = max(1, size // 100 // 4096)
rng = random.Random(seed)
fd = os.open(path, os.O_WRONLY)
try:
    for _ in range(n):
        os.pwrite(fd, os.urandom(4096), rng.randrange(size // 4096) * 4096)
finally:
    os.close(fd)
print(n)
PY
)
RAND_BYTES=$(stat -c %s rand0.img)

EXT4=1
EXT4_WHY=""
if [[ $(id -u) != 0 ]]; then
    EXT4=0 EXT4_WHY="not root (mount -o loop needs root)"
elif ! command -v mkfs.ext4 >/dev/null; then
    EXT4=0 EXT4_WHY="mkfs.ext4 not found"
fi
FS_WRITTEN=0
if [[ $EXT4 == 1 ]]; then
    echo "== ext4 image: $FS_SIZE, populated, then a file workload on a copy" >&2
    truncate -s "$FS_SIZE" fs0.img
    mkfs.ext4 -q -F fs0.img
    MNT=$WORK/mnt
    mkdir -p "$MNT"
    if ! mount -o loop fs0.img "$MNT" 2>"$WORK/mount.err"; then
        EXT4=0 EXT4_WHY="mount -o loop failed: $(cat "$WORK/mount.err")"
    fi
fi
if [[ $EXT4 == 1 ]]; then
    # Populate: about 40% of the filesystem in files of 4 KiB .. 2 MiB.
    python3 - "$MNT" "$SEED" <<'PY'
import os, random, sys
root, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
st = os.statvfs(root)
budget = st.f_blocks * st.f_frsize * 2 // 5
os.makedirs(f"{root}/data", exist_ok=True)
i = 0
while budget > 0:
    d = f"{root}/data/d{i % 32:02d}"
    os.makedirs(d, exist_ok=True)
    n = min(budget, rng.choice([4096, 16384, 65536, 262144, 1 << 20, 2 << 20]) + rng.randrange(4096))
    with open(f"{d}/f{i:06d}", "wb") as f:
        f.write(os.urandom(n))
    budget -= n
    i += 1
PY
    umount "$MNT"
    cp fs0.img fs1.img
    mount -o loop fs1.img "$MNT"
    # The workload: create new files, append to existing ones, delete some,
    # roughly 1% of the filesystem's size written.
    FS_WRITTEN=$(python3 - "$MNT" "$SEED" <<'PY'
import os, random, sys
root, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed + 1)
st = os.statvfs(root)
size = st.f_blocks * st.f_frsize
files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(f"{root}/data") for f in fs)
written = 0
budget = size // 100
os.makedirs(f"{root}/new", exist_ok=True)
k = 0
while written < budget:
    op = rng.random()
    if op < 0.4:                       # create a small file
        n = rng.choice([1024, 4096, 12288, 65536]) + rng.randrange(4096)
        with open(f"{root}/new/n{k:06d}", "wb") as f:
            f.write(os.urandom(n))
        written += n
        k += 1
    elif op < 0.8 and files:           # append to a file (a log growing)
        p = rng.choice(files)
        n = rng.choice([512, 4096, 16384]) + rng.randrange(1024)
        with open(p, "ab") as f:
            f.write(os.urandom(n))
        written += n
    elif files:                        # delete a file
        os.unlink(files.pop(rng.randrange(len(files))))
print(written)
PY
)
    umount "$MNT"
    sync
fi
FS_BYTES=$( [[ -f fs0.img ]] && stat -c %s fs0.img || echo 0)

# ---------------------------------------------------------------- per chunk size
declare -A R_SENT R_CHANGED F_SENT F_CHANGED NC_GBS NC_WALL MAN_B MAN_FILE
for cs in $SIZES; do
    csb=$(to_bytes "$cs")
    echo "== chunk size $cs" >&2

    d=$WORK/rand-$cs
    start_receiver "$d"
    cat rand0.img >/dev/null
    pass "$d" first rand0.img --chunk-size "$cs"
    pass "$d" nochange rand0.img
    NC_WALL[$cs]=$WALL
    NC_GBS[$cs]=$(awk -v b="$RAND_BYTES" -v t="$WALL" 'BEGIN { printf "%.2f", b / 1e9 / t }')
    cat rand1.img >/dev/null
    pass "$d" delta rand1.img
    R_SENT[$cs]=$SENT R_CHANGED[$cs]=$CHANGED
    stop_receiver
    MAN_B[$cs]=$(( (RAND_BYTES + csb - 1) / csb * 32 ))
    m=$(find "$d/sstate" -name manifest -type f | head -n 1)
    MAN_FILE[$cs]=$([[ -n $m ]] && stat -c %s "$m" || echo "?")
    rm -f "$d/target.img"

    if [[ $EXT4 == 1 ]]; then
        d=$WORK/fs-$cs
        start_receiver "$d"
        pass "$d" first fs0.img --chunk-size "$cs"
        pass "$d" delta fs1.img
        F_SENT[$cs]=$SENT F_CHANGED[$cs]=$CHANGED
        stop_receiver
        rm -f "$d/target.img"
    fi
done

# ---------------------------------------------------------------- table
echo
echo "nightpass chunk sizes: random image $(human "$RAND_BYTES") with $WRITES scattered 4 KiB writes ($(human $((WRITES * 4096))));"
if [[ $EXT4 == 1 ]]; then
    echo "ext4 image $(human "$FS_BYTES"), 40% full, then a workload of creates/appends/deletes writing $(human "$FS_WRITTEN") of file data;"
else
    echo "ext4 workload SKIPPED: $EXT4_WHY"
fi
echo "$(nproc) cores, loopback QUIC, images in page cache, $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo '+dirty')"
echo
echo "| chunk size | delta after 1% scattered writes: sent (chunks) | ext4 file workload: sent (chunks) | no-change pass | manifest (chunks x 32 B) | manifest file |"
echo "|---|---|---|---|---|---|"
for cs in $SIZES; do
    if [[ $EXT4 == 1 ]]; then
        fs="$(human "${F_SENT[$cs]}") (${F_CHANGED[$cs]})"
    else
        fs="skipped"
    fi
    echo "| $cs | $(human "${R_SENT[$cs]}") (${R_CHANGED[$cs]}) | $fs | ${NC_GBS[$cs]} GB/s (${NC_WALL[$cs]} s) | $(human "${MAN_B[$cs]}") per $(human "$RAND_BYTES") | ${MAN_FILE[$cs]} B |"
done
if [[ $EXT4 == 0 ]]; then
    echo
    echo "WARNING: the ext4 part was SKIPPED: $EXT4_WHY" >&2
fi
