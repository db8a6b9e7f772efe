#!/usr/bin/env bash
# "Long fat pipe" benchmark (issue 5): one first `nightpass sync` pass of an
# incompressible image over a path with 50 ms each way and a 500 Mbit/s
# `tc tbf` bottleneck, built from two network namespaces; the pass must reach
# >= 90% of what the shaped path carries.
#
#   scripts/lfp.sh                          # 1 GiB image, cubic (64M window) and bbr (8M)
#   SIZE=512M QUIC_WINDOWS="16M 64M" scripts/lfp.sh
#
# Needs root (namespaces, tc), ip(8), tc(8) and python3. The kernel needs
# veth and sch_tbf, not netem: the delay comes from examples/delay_relay.rs.
#
# The path:
#
#   np-lfp-s                                               np-lfp-r
#   nightpass sync --> 127.0.0.1:7401 delay_relay          nightpass serve
#                      (+DELAY_MS each way) --> veth-lfp-s ==tbf==> veth-lfp-r 10.77.0.2:7400
#                                               10.77.0.1 <==tbf==
#
# Both veth ends are shaped (egress `tbf rate RATE_MBIT`), so data and
# acknowledgements each cross one bottleneck, and the relay adds DELAY_MS to
# each direction: base RTT = 2 × DELAY_MS (100 ms), BDP = 500 Mbit/s × 100 ms
# = 6.25 MB.
#
# tbf parameters (defaults, each overridable):
#   burst    1 ms of the rate (62500 B at 500 Mbit/s), at least 16 KiB: enough
#            for several full-size frames and above rate/HZ, small enough that
#            the shaper's average stays the rate.
#   latency  2 × DELAY_MS (100 ms), i.e. a queue limit of rate × latency +
#            burst ≈ 6.3 MB ≈ 4,100 full frames: one BDP of buffer, the
#            classic rule of thumb for one long-lived flow. A loss-based
#            controller (CUBIC cuts cwnd to 0.7×) keeps the link busy through
#            its cut only if the bottleneck buffers >= ~0.43 BDP; with a short
#            tbf queue (the tc examples' 50 ms at 500 Mbit/s is fine, but a
#            few ms is not) CUBIC drains the link after every loss and the
#            test measures the queue, not nightpass. BBR needs little queue.
#            The queue also bounds the worst RTT at base + latency (200 ms).
#
# The reference ("what the shaped path actually carries"), REFERENCE=
#   udp      (default) iperf3 UDP, 1472-byte datagrams (the size QUIC settles
#            on with a 1500-byte MTU) at the nominal rate for 10 s across the
#            shaped veth pair, bits/s seen by the receiver; ≈ 486 Mbit/s at
#            500 Mbit/s, the nominal rate less Ethernet/IP/UDP headers.
#   tcp      iperf3 TCP for 10 s across the shaped veth pair (≈ 478 Mbit/s).
#   nominal  RATE_MBIT itself (also used when iperf3 cannot be installed).
# Both iperf3 figures are measured unless REFERENCE=nominal; the ratio uses
# the one named. Neither crosses the relay (iperf3 needs a TCP control
# connection); the relay's own counters show it forwarded every datagram.
# `rate` is nightpass's chunk payload: pass_end sent_bytes × 8 / duration_s
# (sent_bytes capped at the image size: chunks sent again after a lost
# connection count once), so QUIC's own headers, acknowledgements and the
# pass's start-up round trips all count against it.
#
# Reading the figures: the chunk payload is ≈ 95% of the bytes tbf counts
# (1472-byte UDP payloads in 1514-byte frames, less QUIC's header, tag and
# frame headers), so a pass that keeps the link full from its first to its
# last byte reaches ≈ 475 Mbit/s, 0.95 of nominal and 0.98 of the UDP
# reference; slow start (≈ 9 round trips to a BDP) and the final
# acknowledgement cost ≈ 1.3 s more, ≈ 7% of a 1 GiB pass and less of a
# larger SIZE. Per run the script also prints the tbf drops on the data
# side, UDP receive-buffer drops per namespace (RcvbufErrors: the receiver's
# socket overflowing, not the path), connections the receiver saw end in an
# error (each one a reconnect and resume), CPU seconds of each process and
# the machine's busy share: when tbf drops nothing, the UDP counters stay at
# 0 and the relay reports 0 queued at the end, the path was the bound.
#
# Environment:
#   SIZE           image size for `head -c` (default 1G)
#   RATE_MBIT      tbf rate in Mbit/s (default 500)
#   DELAY_MS       one-way delay added by the relay (default 50)
#   TBF_BURST      tbf burst in bytes (default: 1 ms of the rate, >= 16384)
#   TBF_LATENCY_MS tbf latency in ms (default 2 × DELAY_MS)
#   CCS            congestion controllers to run (default "cubic bbr")
#   QUIC_WINDOWS   --quic-window values to run (default: nightpass's default 64M for
#                  cubic; for bbr 1.3 x the bandwidth-delay product, 8M at the
#                  defaults, the window README tells BBR users to set: quinn's
#                  BBR overruns the tbf queue with a window far above the BDP)
#   STREAMS        --streams for sync (default: nightpass's default)
#   RETRY_FOR      --retry-for for sync (default: nightpass's default, so a lost
#                  connection is resumed and counted; 0 makes it a failure)
#   REPEAT         runs of each configuration (default 1)
#   RMEM_DEFAULT   bytes: while the script runs, raise the machine-wide
#                  net.core.rmem_default and wmem_default (restored on exit;
#                  they cannot be set per namespace), to see whether socket
#                  buffers bound a build whose UDP sockets do not size their
#                  buffers themselves (before commit 71e5b3b they got the
#                  208 KiB default); default: unset, no change
#   REFERENCE      udp | tcp | nominal (default udp)
#   TARGET_RATIO   default 0.90
#   RUN_TIMEOUT    seconds one sync may take before it counts as a failure (default 900)
#   WORKDIR        parent of the temporary work directory (default /tmp)
#   NO_BUILD       1 = use the existing target/release/{nightpass,examples/delay_relay}
#   KEEP           1 = keep the work directory (logs, images)
#
# Prints a few lines per run (rate, ratio, CPU use, drops, relay counters),
# then a summary. A pass that fails (exit status, timeout, target differs
# from the image) is reported as FAIL and the other runs go ahead. Exits 0
# when every run meets the target, 1 when one misses it, 2 when one failed
# or the benchmark itself could not run. The namespaces and every process
# started here are removed on any exit (and a raised RMEM_DEFAULT restored);
# stale ones from an interrupted run are removed first. A lock
# (/run/lock/nightpass-lfp.lock) keeps a second copy from tearing down the
# namespaces of a running one.
set -Eeuo pipefail

SIZE=${SIZE:-1G}
RATE_MBIT=${RATE_MBIT:-500}
DELAY_MS=${DELAY_MS:-50}
TBF_BURST=${TBF_BURST:-$((RATE_MBIT * 1000000 / 8 / 1000 > 16384 ? RATE_MBIT * 1000000 / 8 / 1000 : 16384))}
TBF_LATENCY_MS=${TBF_LATENCY_MS:-$((2 * DELAY_MS))}
CCS=${CCS:-cubic bbr}
QUIC_WINDOWS=${QUIC_WINDOWS:-}
# BBR's window when QUIC_WINDOWS is not given: 1.3 x the path's
# bandwidth-delay product (RATE_MBIT x 2 x DELAY_MS), rounded up to MiB.
BBR_WINDOW=$(( (RATE_MBIT * 1000000 / 8 * 2 * DELAY_MS / 1000 * 13 / 10 + 1048575) / 1048576 ))M
STREAMS=${STREAMS:-}
REPEAT=${REPEAT:-1}
REFERENCE=${REFERENCE:-udp}
TARGET_RATIO=${TARGET_RATIO:-0.90}
RUN_TIMEOUT=${RUN_TIMEOUT:-900}

NS_S=np-lfp-s
NS_R=np-lfp-r
DEV_S=veth-lfp-s
DEV_R=veth-lfp-r
IP_S=10.77.0.1
IP_R=10.77.0.2
SERVE_PORT=7400
RELAY_ADDR=127.0.0.1:7401

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN="$ROOT/target/release/nightpass"
RELAY="$ROOT/target/release/examples/delay_relay"

die() {
    echo "lfp.sh: $*" >&2
    exit 2
}
trap 'rc=$?; echo "lfp.sh: command failed (status $rc) at line $LINENO: $BASH_COMMAND" >&2; exit 2' ERR

[[ $(id -u) == 0 ]] || die "must run as root (network namespaces, tc)"
command -v flock >/dev/null || die "flock (util-linux) is needed"
mkdir -p /run/lock
exec 9>/run/lock/nightpass-lfp.lock
flock -n 9 || die "another scripts/lfp.sh is running (lock /run/lock/nightpass-lfp.lock)"
for tool in ip tc python3 head cmp; do
    command -v "$tool" >/dev/null || die "$tool is needed"
done
case $REFERENCE in udp | tcp | nominal) ;; *) die "REFERENCE must be udp, tcp or nominal" ;; esac

if [[ ${NO_BUILD:-0} != 1 ]]; then
    echo "== cargo build --release --bin nightpass --example delay_relay" >&2
    (cd "$ROOT" && cargo build --release --bin nightpass --example delay_relay) || die "cargo build failed"
fi
[[ -x $BIN ]] || die "$BIN is missing"
[[ -x $RELAY ]] || die "$RELAY is missing (cargo build --release --example delay_relay)"

apt_install() {
    { DEBIAN_FRONTEND=noninteractive apt-get install -y "$@" >/dev/null 2>&1 ||
        { apt-get update >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y "$@" >/dev/null 2>&1; }; }
}
if [[ ! -x /usr/bin/time ]]; then
    echo "== installing GNU time (apt package 'time') for the sender's CPU time" >&2
    apt_install time || die "/usr/bin/time is missing and could not be installed"
fi
if [[ $REFERENCE != nominal ]] && ! command -v iperf3 >/dev/null; then
    echo "== installing iperf3 for the reference" >&2
    apt_install iperf3 || { echo "lfp.sh: iperf3 could not be installed; reference = nominal rate" >&2; REFERENCE=nominal; }
fi

# ---------------------------------------------------------------- cleanup
PIDS=()
WORK=""
SYSCTL_RESTORE=()
# Ends the processes a namespace still holds (ours: nobody else uses these
# names), then the namespace; the veth pair goes with it.
drop_ns() {
    local ns=$1 pid
    ip netns list 2>/dev/null | grep -qw "^$ns" || return 0
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
    sleep 0.2
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
}
# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
    local rc=$? pid kv
    trap - ERR
    set +e
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    done
    drop_ns "$NS_S"
    drop_ns "$NS_R"
    for kv in "${SYSCTL_RESTORE[@]}"; do sysctl -q -w "$kv" >/dev/null; done
    if [[ -n $WORK ]]; then
        if [[ ${KEEP:-0} == 1 ]]; then echo "work directory kept: $WORK" >&2; else rm -rf "$WORK"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# forget PID: no longer ours to stop on exit
forget() {
    local p keep=()
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}
# stop PID: SIGTERM, wait; forget it
stop() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    forget "$1"
}
# wait_line FILE REGEX PID: until FILE's first line matches (PID must live)
wait_line() {
    local file=$1 re=$2 pid=$3 line
    for _ in $(seq 200); do
        line=$(head -n 1 "$file" 2>/dev/null || true)
        [[ $line =~ $re ]] && return 0
        kill -0 "$pid" 2>/dev/null || { cat "$file" >&2; die "process $pid exited at start"; }
        sleep 0.05
    done
    cat "$file" >&2
    die "no line matching '$re' in $file"
}
calc() { awk "BEGIN { $1 }"; }
# cpu seconds (user+system) of a live PID
TICKS=$(getconf CLK_TCK)
cpu_of() { awk -v t="$TICKS" '{ sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / t }' "/proc/$1/stat" 2>/dev/null || echo 0; }
# whole-machine jiffies: "busy total softirq"
sys_cpu() { awk '/^cpu / { t = 0; for (i = 2; i <= 9; i++) t += $i; print t - $5 - $6, t, $8 }' /proc/stat; }
# tbf counters of DEV in NS: "sent_bytes dropped"
tbf_stats() {
    ip netns exec "$1" tc -s qdisc show dev "$2" |
        awk '/Sent/ { for (i = 1; i <= NF; i++) { if ($i == "Sent") b = $(i + 1); if ($i == "(dropped") d = $(i + 1) } } END { sub(/,/, "", d); print b + 0, d + 0 }'
}
# UDP datagrams the kernel of namespace NS dropped for a full receive
# buffer: "RcvbufErrors" of /proc/net/snmp (per namespace)
udp_drops() {
    # shellcheck disable=SC2016 # awk's own $ fields
    ip netns exec "$1" awk '/^Udp:/ { if (!h) { for (i = 1; i <= NF; i++) c[$i] = i; h = 1 } else print $c["RcvbufErrors"] }' /proc/net/snmp
}

# ---------------------------------------------------------------- the path
echo "== namespaces $NS_S ($IP_S) <-> $NS_R ($IP_R): tbf rate ${RATE_MBIT}mbit burst $TBF_BURST latency ${TBF_LATENCY_MS}ms each way; relay +${DELAY_MS} ms each way" >&2
drop_ns "$NS_S"
drop_ns "$NS_R"
ip netns add "$NS_S"
ip netns add "$NS_R"
ip link add "$DEV_S" netns "$NS_S" type veth peer name "$DEV_R" netns "$NS_R"
ip -n "$NS_S" addr add "$IP_S/24" dev "$DEV_S"
ip -n "$NS_R" addr add "$IP_R/24" dev "$DEV_R"
for pair in "$NS_S $DEV_S" "$NS_R $DEV_R"; do
    read -r ns dev <<<"$pair"
    ip -n "$ns" link set lo up
    ip -n "$ns" link set "$dev" up
    ip netns exec "$ns" tc qdisc add dev "$dev" root tbf rate "${RATE_MBIT}mbit" burst "$TBF_BURST" latency "${TBF_LATENCY_MS}ms"
done

if [[ -n ${RMEM_DEFAULT:-} ]]; then
    for key in net.core.rmem_default net.core.wmem_default; do
        SYSCTL_RESTORE+=("$key=$(sysctl -n "$key")")
        sysctl -q -w "$key=$RMEM_DEFAULT" || die "cannot set $key=$RMEM_DEFAULT"
    done
    echo "== $(sysctl net.core.rmem_default net.core.wmem_default | tr '\n' ' ')(until exit)" >&2
fi

WORK=$(mktemp -d "${WORKDIR:-/tmp}/nightpass-lfp.XXXXXX")
IMAGE=$WORK/source.img
TARGET=$WORK/target.img
echo "== work directory $WORK; image $SIZE of random data" >&2
head -c "$SIZE" /dev/urandom >"$IMAGE"
BYTES=$(stat -c %s "$IMAGE")
[[ $BYTES -gt 0 ]] || die "empty image (SIZE=$SIZE?)"
cat "$IMAGE" >/dev/null # in the page cache

SFP=$("$BIN" keygen --identity "$WORK/sid")
"$BIN" keygen --identity "$WORK/rid" >/dev/null
RFP=$("$BIN" fingerprint --identity "$WORK/rid")

# ---------------------------------------------------------------- reference
REF_UDP="" REF_TCP=""
iperf() { # iperf() MODE: bits/s the receiver saw
    local mode=$1 spid out
    ip netns exec "$NS_R" iperf3 -s -1 -B "$IP_R" >"$WORK/iperf3-$mode.server" 2>&1 &
    spid=$!
    PIDS+=("$spid")
    for _ in $(seq 100); do
        ip netns exec "$NS_R" ss -ltn 2>/dev/null | grep -q ":5201 " && break
        sleep 0.05
    done
    if [[ $mode == udp ]]; then
        out=$(ip netns exec "$NS_S" iperf3 -c "$IP_R" -u -b "${RATE_MBIT}M" -l 1472 -t 10 -J 2>/dev/null) || true
    else
        out=$(ip netns exec "$NS_S" iperf3 -c "$IP_R" -t 10 -J 2>/dev/null) || true
    fi
    stop "$spid"
    python3 -c 'import json,sys; print("%.0f" % json.loads(sys.stdin.read())["end"]["sum_received"]["bits_per_second"])' <<<"$out" 2>/dev/null || echo ""
}
if [[ $REFERENCE != nominal ]]; then
    echo "== reference: iperf3 UDP and TCP across the shaped veth pair, 10 s each" >&2
    REF_UDP=$(iperf udp)
    REF_TCP=$(iperf tcp)
    [[ -n $REF_UDP || $REFERENCE != udp ]] || die "iperf3 UDP reference failed (see $WORK/iperf3-udp.server)"
    [[ -n $REF_TCP || $REFERENCE != tcp ]] || die "iperf3 TCP reference failed (see $WORK/iperf3-tcp.server)"
fi
NOMINAL=$((RATE_MBIT * 1000000))
case $REFERENCE in
    udp) REF_BPS=$REF_UDP ;;
    tcp) REF_BPS=$REF_TCP ;;
    nominal) REF_BPS=$NOMINAL ;;
esac
mbit() { calc "printf \"%.1f\", $1 / 1e6"; }
show_ref() { if [[ -n $1 ]]; then echo "$(mbit "$1") Mbit/s"; else echo "n/a"; fi; }
echo "reference: nominal $(mbit "$NOMINAL") Mbit/s; iperf3 UDP 1472 B $(show_ref "$REF_UDP"); iperf3 TCP $(show_ref "$REF_TCP"); ratio against: $REFERENCE ($(mbit "$REF_BPS") Mbit/s)"

# ---------------------------------------------------------------- runs
# run CC WINDOW N: one first pass to an empty target; appends to RESULTS
RESULTS=()
MISSED=0
FAILED=0
run() {
    local cc=$1 win=$2 n=$3 tag rpid relpid spid rc json="" sent size dur rate ratio
    local lost u0s u1s u0r u1r c0 c1 t0 t1 sc0 sc1 rc0 rc1 s0 s1 d0 d1 r0 r1 serve_cpu relay_cpu snd_cpu busy soft relay_final
    tag="$cc-$win-$n"
    rm -f "$TARGET"
    ip netns exec "$NS_R" "$BIN" serve --listen "$IP_R:$SERVE_PORT" --volume "v=$TARGET" --allow "$SFP" \
        --identity "$WORK/rid" --state-dir "$WORK/rstate-$tag" --congestion "$cc" --quic-window "$win" \
        2>"$WORK/serve-$tag.err" &
    rpid=$!
    PIDS+=("$rpid")
    wait_line "$WORK/serve-$tag.err" 'listening on ' "$rpid"
    ip netns exec "$NS_S" "$RELAY" "$RELAY_ADDR" "$IP_R:$SERVE_PORT" "$DELAY_MS" 2>"$WORK/relay-$tag.err" &
    relpid=$!
    PIDS+=("$relpid")
    wait_line "$WORK/relay-$tag.err" '^delay_relay: listening on ' "$relpid"

    read -r s0 d0 < <(tbf_stats "$NS_S" "$DEV_S")
    read -r r0 _ < <(tbf_stats "$NS_R" "$DEV_R")
    u0s=$(udp_drops "$NS_S")
    u0r=$(udp_drops "$NS_R")
    read -r c0 t0 sc0 < <(sys_cpu)
    rc0=$(cpu_of "$rpid")
    # In the background and waited for, so that a signal to this script is
    # acted on at once (bash defers traps while a foreground child runs).
    rc=0
    ip netns exec "$NS_S" /usr/bin/time -f '%e %U %S' -o "$WORK/time-$tag" \
        timeout "$RUN_TIMEOUT" "$BIN" --json sync "$IMAGE" "$RELAY_ADDR/v" \
        --server-fingerprint "$RFP" --identity "$WORK/sid" --state-dir "$WORK/sstate-$tag" \
        --congestion "$cc" --quic-window "$win" ${STREAMS:+--streams "$STREAMS"} ${RETRY_FOR:+--retry-for "$RETRY_FOR"} \
        >"$WORK/sync-$tag.json" 2>"$WORK/sync-$tag.err" &
    spid=$!
    PIDS+=("$spid")
    wait "$spid" || rc=$?
    forget "$spid"
    read -r c1 t1 sc1 < <(sys_cpu)
    u1s=$(udp_drops "$NS_S")
    u1r=$(udp_drops "$NS_R")
    rc1=$(cpu_of "$rpid")
    relay_cpu=$(cpu_of "$relpid")
    read -r s1 d1 < <(tbf_stats "$NS_S" "$DEV_S")
    read -r r1 _ < <(tbf_stats "$NS_R" "$DEV_R")
    stop "$relpid"
    relay_final=$(grep -m1 'final' "$WORK/relay-$tag.err" | sed 's/^delay_relay: final ([A-Z]*): //' || true)
    stop "$rpid"
    # Connections the receiver saw end in an error: each one a reconnect
    # (JSON mode keeps the sender's "link lost; reconnecting" notes quiet).
    lost=$(grep -c 'result=error\|ended with an error' "$WORK/serve-$tag.err" || true)
    local drops
    drops="tbf data side: $(calc "printf \"%.1f\", ($s1 - $s0) / 1e6") MB sent, $((d1 - d0)) dropped; ack side: $(calc "printf \"%.1f\", ($r1 - $r0) / 1e6") MB sent"
    drops+="; UDP receive-buffer drops: sender side (sender, relay) $((u1s - u0s)), receiver side $((u1r - u0r))"
    local why=""
    if [[ $rc == 124 ]]; then
        why="ran past RUN_TIMEOUT ($RUN_TIMEOUT s)"
    elif [[ $rc != 0 ]]; then
        why="exited with status $rc: $(grep -m1 '"event":"error"' "$WORK/sync-$tag.json" || tail -n 1 "$WORK/sync-$tag.err")"
    elif ! cmp -s "$IMAGE" "$TARGET"; then
        why="the target differs from the image"
    else
        json=$(grep '"event":"pass_end"' "$WORK/sync-$tag.json" | tail -n 1 || true)
        [[ -n $json ]] || why="no pass_end line on stdout"
    fi
    if [[ -n $why ]]; then
        # A failed pass is recorded, and the other runs still go ahead.
        printf '%-6s window %-4s run %s: FAIL: sync %s\n' "$cc" "$win" "$n" "$why"
        printf '    connections lost: %s; %s\n' "$lost" "$drops"
        sed 's/^[0-9T:.Z-]* *[A-Z]* //' "$WORK/serve-$tag.err" | grep -v '^listening on\|^shutting down' | sort | uniq -c | sed 's/^ */      receiver: /' | head -n 5
        FAILED=1
        RESULTS+=("$cc $win $n - - FAIL $lost")
        return 0
    fi
    read -r sent size dur < <(python3 -c 'import json,sys; e=json.loads(sys.stdin.read()); print(e["sent_bytes"], e["size_bytes"], e["duration_s"])' <<<"$json")
    # The rate is the chunk payload sent per second; chunks sent again after
    # a lost connection count once: at most the image's size.
    rate=$(calc "s = $sent; if (s > $size) s = $size; printf \"%.0f\", s * 8 / $dur")
    ratio=$(calc "printf \"%.3f\", $rate / $REF_BPS")
    snd_cpu=$(awk '{ printf "%.1f", $2 + $3 }' "$WORK/time-$tag")
    serve_cpu=$(calc "printf \"%.1f\", $rc1 - $rc0")
    busy=$(calc "printf \"%.0f\", 100 * ($c1 - $c0) / ($t1 - $t0)")
    soft=$(calc "printf \"%.0f\", 100 * ($sc1 - $sc0) / ($t1 - $t0)")
    local verdict=PASS
    calc "exit !($ratio >= $TARGET_RATIO)" || {
        verdict=MISS
        MISSED=1
    }
    printf '%-6s window %-4s run %s: %s B in %s s = %s Mbit/s; reference %s Mbit/s; ratio %s (target >= %s) %s\n' \
        "$cc" "$win" "$n" "$size" "$dur" "$(mbit "$rate")" "$(mbit "$REF_BPS")" "$ratio" "$TARGET_RATIO" "$verdict"
    printf '    ratio to nominal %s; sent_bytes %s; cpu s: sender %s, receiver %s, relay %s; machine busy %s%% (softirq %s%%) of %s cores over %s s\n' \
        "$(calc "printf \"%.3f\", $rate / $NOMINAL")" "$sent" "$snd_cpu" "$serve_cpu" "$relay_cpu" "$busy" "$soft" "$(nproc)" \
        "$(awk '{ print $1 }' "$WORK/time-$tag")"
    printf '    connections lost and resumed: %s; %s\n' "$lost" "$drops"
    [[ $lost == 0 ]] || sed 's/^[0-9T:.Z-]* *[A-Z]* //' "$WORK/serve-$tag.err" | grep -v '^listening on\|^shutting down' | sort | uniq -c | sed 's/^ */      receiver: /' | head -n 5
    printf '    relay: %s\n' "${relay_final:-?}"
    RESULTS+=("$cc $win $n $(mbit "$rate") $ratio $verdict $lost")
}

for cc in $CCS; do
    windows=$QUIC_WINDOWS
    if [[ -z $windows ]]; then
        if [[ $cc == bbr ]]; then windows=$BBR_WINDOW; else windows=64M; fi
    fi
    for win in $windows; do
        for n in $(seq "$REPEAT"); do
            echo "== sync --congestion $cc --quic-window $win (run $n of $REPEAT), $SIZE through the relay; load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
            run "$cc" "$win" "$n"
        done
    done
done

echo
echo "summary: rate of a first pass of $SIZE (Mbit/s, chunk payload) through ${DELAY_MS} ms each way + tbf ${RATE_MBIT} Mbit/s"
printf '  %-6s %-6s %-3s %10s %7s %-7s %s\n' cc window run rate ratio verdict reconnects
for r in "${RESULTS[@]}"; do
    # shellcheck disable=SC2086
    printf '  %-6s %-6s %-3s %10s %7s %-7s %s\n' $r
done
echo "  reference $(mbit "$REF_BPS") Mbit/s ($REFERENCE); target ratio >= $TARGET_RATIO in every run"
if [[ $FAILED == 1 ]]; then
    echo "FAIL (a pass did not complete)"
    exit 2
fi
if [[ $MISSED == 0 ]]; then
    echo "PASS"
    exit 0
fi
echo "MISS"
exit 1
