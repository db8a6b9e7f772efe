# Shared by the figure scripts (bench.sh, chunk-size.sh): sourced, not run.
#
#   NAME=bench.sh; source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
#
# Sets ROOT and BIN, defines die, builds the release binary unless
# NO_BUILD=1, and checks for python3.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN="$ROOT/target/release/nightpass"

die() {
    echo "${NAME:-nightpass script}: $*" >&2
    exit 2
}

if [[ ${NO_BUILD:-0} != 1 ]]; then
    echo "== cargo build --release" >&2
    (cd "$ROOT" && cargo build --release) || die "cargo build --release failed"
fi
[[ -x $BIN ]] || die "$BIN is missing"
command -v python3 >/dev/null || die "python3 is needed"

# wait_listening PID ERRFILE : waits for a receiver started in the
# background with its stderr in ERRFILE to say where it listens; sets PORT
# and RFP (its fingerprint), or dies with what it printed.
wait_listening() {
    local pid=$1 err=$2 line=""
    for _ in $(seq 100); do
        line=$(head -n 1 "$err" 2>/dev/null || true)
        # A whole line (newline written), not one still being printed.
        [[ $line =~ listening\ on\ .*\ fingerprint\ [^[:space:]]+$ ]] && [[ $(wc -l <"$err") -ge 1 ]] && break
        kill -0 "$pid" 2>/dev/null || { cat "$err" >&2; die "receiver exited at start"; }
        sleep 0.1
    done
    [[ $line =~ listening\ on\ 127\.0\.0\.1:([0-9]+)\ fingerprint\ ([^[:space:]]+) ]] ||
        { cat "$err" >&2; die "no 'listening on ADDR fingerprint FP' line from the receiver: '$line'"; }
    PORT=${BASH_REMATCH[1]}
    RFP=${BASH_REMATCH[2]}
}
