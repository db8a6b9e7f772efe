#!/usr/bin/env bash
# Compares two checkouts' end-to-end figures in one session: runs each
# checkout's own scripts/bench.sh (with its own target/release/nightpass,
# NO_BUILD=1) alternately, before after before after ..., so that drift in the
# machine's load hits both alike, then prints per figure the median and
# min..max of each side and the after/before ratio of the medians.
#
#   scripts/bench-compare.sh BEFORE_DIR AFTER_DIR        # 3 runs each
#   RUNS=5 SIZE=512M scripts/bench-compare.sh OLD NEW
#   scripts/bench-compare.sh --summary OUT_DIR           # tables of saved runs
#
# Build the release binary in each checkout first (`cargo build --release`);
# a checkout of an older commit can be made with
# `git worktree add --detach DIR COMMIT`.
#
# Environment:
#   RUNS      runs per side (default 3)
#   SIZE      image size passed to bench.sh (default 1G)
#   OUT       directory of the saved outputs (default /tmp/bench-compare,
#             refused if it holds runs already): before-N.txt and after-N.txt,
#             each headed by the start time and `uptime` of its run
# Other variables (WORKDIR, SEED, THROTTLE_S) pass through to bench.sh.
#
# A difference counts as beyond the noise ("worse"/"better" in the last
# column) when the two sides' min..max ranges do not overlap; "~" otherwise.
# Rows "ref: ..." are the references (cat, cp+sync) timed in the same runs: a
# difference there is the machine's drift, and moves the "/ cat" ratios with it.
# Lower is better for times, ratios to references and RSS; higher is better
# for throughput, "delta vs rsync" and the throttles' closeness to 1.00.
set -euo pipefail

summary() {
    python3 - "$1" <<'PY'
import glob, os, re, statistics, sys

out = sys.argv[1]

def figures(path):
    """Figure name -> number, from one bench.sh output."""
    f = {}
    text = open(path).read()
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 6 or cells[0] in ("figure", "") or set(cells[0]) == {"-"}:
            continue
        name, value, ref, ratio = cells[:4]
        name = re.sub(r"^(--\S+) .*", r"\1", name)
        num = lambda s: float(re.search(r"[-\d.]+", s).group()) if re.search(r"\d", s) else None
        if name.startswith("--"):
            f[name + " / limit"] = num(ratio)
            continue
        if name == "delta vs rsync":
            f["rsync (s)"] = num(value)
            f["delta vs rsync (x faster)"] = num(ratio)
            continue
        if name == "cached after --direct pass":
            f["cached after --direct (ratio)"] = num(ratio)
            continue
        unit = "GB/s" if "GB/s" in value else ("MiB" if "MiB" in value else "s")
        f[f"{name} ({unit})"] = num(value)
        if ratio not in ("-", ""):
            f[f"{name} / {ref.split(' ')[0] if not ref.startswith('cat both') else 'cat both'}"] = num(ratio)
        m = re.match(r"(cat|cp\+sync|cat both) ([\d.]+) s", ref)
        if m:
            f[f"ref: {m.group(1)} (s)"] = float(m.group(2))
        m = re.match(r"pass ([\d.]+) s", ref)
        if m:
            f["sparse 1 TiB: pass (s)"] = float(m.group(1))
    for m in re.finditer(r"^\s+(full|no-change|delta)\s+wall.*cpu: sender ([\d.]+)u\+([\d.]+)s, receiver ([\d.]+) s", text, re.M):
        f[f"cpu {m.group(1)}: sender u+s (s)"] = float(m.group(2)) + float(m.group(3))
        f[f"cpu {m.group(1)}: receiver (s)"] = float(m.group(4))
    return f

runs = {}
for side in ("before", "after"):
    paths = sorted(glob.glob(os.path.join(out, side + "-*.txt")))
    runs[side] = [figures(p) for p in paths]
    loads = []
    for p in paths:
        m = re.search(r"load average: ([\d.]+)", open(p).read())
        loads.append(m.group(1) if m else "?")
    print(f"{side}: {len(paths)} runs, 1-min load at start: {', '.join(loads)}")
if not runs["before"] or not runs["after"]:
    sys.exit("no runs to compare")

def higher_better(name):
    return "GB/s" in name or "x faster" in name

names = []
for f in runs["before"] + runs["after"]:
    names += [n for n in f if n not in names]
print()
print(f"| {'figure':<40} | {'before median':>13} | {'before min..max':>17} | {'after median':>12} | {'after min..max':>17} | {'after/before':>12} | {'beyond noise':<16} |")
print(f"|{'-'*42}|{'-'*15}|{'-'*19}|{'-'*14}|{'-'*19}|{'-'*14}|{'-'*18}|")
for n in names:
    b = [f[n] for f in runs["before"] if f.get(n) is not None]
    a = [f[n] for f in runs["after"] if f.get(n) is not None]
    if not a or not b:
        print(f"| {n:<40} | {'-' if not b else statistics.median(b):>13} | {'':>17} | {'-' if not a else statistics.median(a):>12} | {'':>17} | {'-':>12} | {'missing':<16} |")
        continue
    mb, ma = statistics.median(b), statistics.median(a)
    r = f"{ma / mb:.2f}" if mb else "-"
    if "/ limit" in n:
        # closeness to the limit: distance from 1.00
        da, db = [abs(x - 1) for x in a], [abs(x - 1) for x in b]
        verdict = "worse" if min(da) > max(db) else "better" if max(da) < min(db) else "~"
    elif min(a) > max(b):
        verdict = "better" if higher_better(n) else "worse"
    elif max(a) < min(b):
        verdict = "worse" if higher_better(n) else "better"
    else:
        verdict = "~"
    if n.startswith("ref: ") and verdict != "~":
        verdict += " (machine)"  # a reference: the machine drifted, not nightpass
    fmt = lambda x: f"{x:g}"
    print(f"| {n:<40} | {fmt(mb):>13} | {fmt(min(b)) + '..' + fmt(max(b)):>17} | {fmt(ma):>12} | {fmt(min(a)) + '..' + fmt(max(a)):>17} | {r:>12} | {verdict:<16} |")
PY
}

if [[ ${1:-} == --summary ]]; then
    [[ $# == 2 ]] || { echo "usage: $0 --summary OUT_DIR" >&2; exit 2; }
    summary "$2"
    exit 0
fi
[[ $# == 2 ]] || { echo "usage: $0 BEFORE_DIR AFTER_DIR | --summary OUT_DIR" >&2; exit 2; }
BEFORE=$(cd "$1" && pwd)
AFTER=$(cd "$2" && pwd)
RUNS=${RUNS:-3}
OUT=${OUT:-/tmp/bench-compare}
export SIZE=${SIZE:-1G}
mkdir -p "$OUT"
if compgen -G "$OUT/before-*.txt" >/dev/null || compgen -G "$OUT/after-*.txt" >/dev/null; then
    echo "$OUT holds runs already: give another OUT" >&2
    exit 2
fi
for dir in "$BEFORE" "$AFTER"; do
    [[ -x $dir/scripts/bench.sh && -x $dir/target/release/nightpass ]] ||
        { echo "$dir: needs scripts/bench.sh and target/release/nightpass (cargo build --release)" >&2; exit 2; }
done

for i in $(seq "$RUNS"); do
    for side in before after; do
        dir=$BEFORE
        [[ $side == after ]] && dir=$AFTER
        file=$OUT/$side-$i.txt
        echo "== $side run $i of $RUNS ($dir) -> $file" >&2
        {
            echo "start: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); checkout $dir at $(git -C "$dir" rev-parse --short HEAD)"
            echo "uptime at start: $(uptime)"
            echo
        } >"$file"
        rc=0
        NO_BUILD=1 "$dir/scripts/bench.sh" >>"$file" 2>&1 || rc=$?
        echo "bench.sh exit status: $rc" >>"$file"
        [[ $rc -le 1 ]] || echo "   $side run $i failed (status $rc), see $file" >&2
    done
done
summary "$OUT"
