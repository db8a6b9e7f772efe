#!/usr/bin/env bash
# The fleet's figures (issue 17): 12 volumes on two filers, one receiver,
# two agents for one host, a private PostgreSQL.
#
#   sudo scripts/fleet-figures.sh
#   SIZE=16M DURATION=30 sudo scripts/fleet-figures.sh
#
# Measures, from the fleet's own tables:
#   1. passes per minute the two agents sustain once every volume is
#      copied (--interval 0 --ready-interval 0: each volume passed again
#      as soon as recorded), against the same volumes passed by
#      back-to-back `sync --plan` runs (jobs = 4) in the same run;
#   2. how long a SIGKILLed agent's volumes wait before the other agent
#      takes them (from the kill to the other's claim), against --lease:
#      the agent is killed during the first copies, throttled by
#      --bwlimit so that it holds leases then;
#   3. how long after a filer's window opens its group cutover starts
#      (the `cutting_over` row in nightpass.history), against --poll.
#
# Environment:
#   SIZE      each volume's size (default 64M)
#   DURATION  seconds of sustained passes measured (default 60)
#   LEASE     the agents' --lease (default 10s)
#   BWLIMIT   each agent's --bwlimit (default 32M; later passes send nothing)
#   POLL      the agents' --poll (default 1s)
#   WORKDIR   parent of the temporary work directory (default /tmp)
#   NO_BUILD  1 = use the existing target/release/nightpass
# Needs root (the private PostgreSQL runs as `postgres` or `nobody`) and
# PostgreSQL's initdb/pg_ctl (Debian's postgresql package) and psql.
set -euo pipefail

SIZE=${SIZE:-64M}
DURATION=${DURATION:-60}
LEASE=${LEASE:-10s}
POLL=${POLL:-1s}
BWLIMIT=${BWLIMIT:-32M}
NAME=fleet-figures.sh
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[[ $(id -u) == 0 ]] || die "run as root (the private PostgreSQL runs as an unprivileged user)"
PGBIN=$(dirname "$(command -v initdb 2>/dev/null || ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")
[[ -x $PGBIN/initdb && -x $PGBIN/pg_ctl ]] || die "PostgreSQL's initdb and pg_ctl are needed (apt install postgresql)"
command -v psql >/dev/null || die "psql is needed"
PGUSER_OS=$(id postgres >/dev/null 2>&1 && echo postgres || echo nobody)

WORK=$(mktemp -d "${WORKDIR:-/tmp}/nightpass-fleet.XXXXXX")
chmod 755 "$WORK"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    runuser -u "$PGUSER_OS" -- "$PGBIN/pg_ctl" -D "$WORK/pg/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
cd "$WORK"

echo "== a private PostgreSQL" >&2
mkdir pg && chown "$PGUSER_OS" pg
PGPORT=$((20000 + RANDOM % 20000))
runuser -u "$PGUSER_OS" -- "$PGBIN/initdb" -D "$WORK/pg/data" -A trust -U postgres >/dev/null
runuser -u "$PGUSER_OS" -- "$PGBIN/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/log" \
    -o "-k $WORK/pg -p $PGPORT -c listen_addresses=''" -w start >/dev/null
export NIGHTPASS_DB="host=$WORK/pg port=$PGPORT user=postgres dbname=postgres"
sql() { psql "$NIGHTPASS_DB" -XAtq -c "$1"; }

BYTES=$(python3 -c "import sys; s=sys.argv[1]; m={'K':1<<10,'M':1<<20,'G':1<<30}; print(int(s[:-1])*m[s[-1]] if s[-1] in m else int(s))" "$SIZE")
echo "== 2 filers x 6 volumes of $SIZE, a receiver" >&2
"$BIN" keygen --identity sid >/dev/null
"$BIN" keygen --identity rid >/dev/null
SFP=$("$BIN" fingerprint --identity sid)
exports=()
for f in fa fb; do
    for i in $(seq 6); do
        head -c "$BYTES" /dev/urandom >"$f-v$i.img"
        exports+=(--volume "$f-v$i=$WORK/target-$f-v$i.img")
    done
done
"$BIN" serve --listen 127.0.0.1:0 "${exports[@]}" --allow "$SFP" \
    --identity rid --state-dir rstate --max-size 1T 2>serve.log &
PIDS+=($!)
wait_listening "$!" serve.log
for f in fa fb; do
    {
        echo "receiver = \"127.0.0.1:$PORT\""
        echo "server_fingerprint = \"$RFP\""
        echo "jobs = 3"
        echo "assume_frozen = true"
        for i in $(seq 6); do
            printf '\n[[volume]]\nname = "%s"\nsource = "%s"\n' "$f-v$i" "$WORK/$f-v$i.img"
        done
    } >"$f.toml"
done
"$BIN" fleet init >/dev/null
"$BIN" fleet add fa.toml --host h >/dev/null
"$BIN" fleet add fb.toml --host h >/dev/null

agent() { # NAME: an agent for host h in its own state directory
    "$BIN" --json fleet agent --host h --name "$1" --identity sid --state-dir "state-$1" \
        --lease "$LEASE" --poll "$POLL" --interval 0s --ready-interval 0s --jobs 2 \
        --bwlimit "$BWLIMIT" \
        >"$1.json" 2>"$1.err" &
    PIDS+=($!)
}
agent a1
A1=${PIDS[-1]}
agent a2
echo "== agent a1 killed (SIGKILL) during the first copies" >&2
until [[ $(sql "SELECT count(*) FROM nightpass.leases WHERE agent = 'a1' AND in_pass") -ge 2 ]]; do sleep 0.2; done
sleep 1
HELD=$(sql "SELECT count(*) FROM nightpass.leases WHERE agent = 'a1' AND in_pass")
KILLED_AT=$(sql "SELECT clock_timestamp()")
kill -9 "$A1"
wait "$A1" 2>/dev/null || true
agent a3
echo "== first copies by the agents" >&2
until [[ $(sql "SELECT count(*) FROM nightpass.volumes WHERE state IN ('converging','ready')") == 12 ]]; do sleep 1; done
TAKEOVER=$(sql "SELECT coalesce(round(max(w)::numeric, 2)::text, '-') FROM (
    SELECT extract(epoch FROM min(p.at) - '$KILLED_AT'::timestamptz) AS w
    FROM nightpass.passes p WHERE p.agent <> 'a1' AND p.at > '$KILLED_AT'
      AND p.volume IN (SELECT volume FROM nightpass.passes WHERE agent = 'a1' AND record ? 'abandoned')
    GROUP BY p.volume) t")

echo "== $DURATION s of sustained passes" >&2
T0=$(sql "SELECT now()")
sleep "$DURATION"
FLEET_PASSES=$(sql "SELECT count(*) FROM nightpass.passes WHERE ok AND at >= '$T0' AND ended_at <= now()")

echo "== filer fa's night opens in 5 s" >&2
AT=$(date -u -d '+5 sec' +%Y-%m-%dT%H:%M:%SZ)
"$BIN" fleet schedule fa --at "$AT" --window 10m >/dev/null
until [[ $(sql "SELECT count(*) FROM nightpass.volumes WHERE filer = 'fa' AND state IN ('cut_over','failed')") == 6 ]]; do sleep 1; done
NIGHT=$(sql "SELECT round(extract(epoch FROM min(h.at) - s.at)::numeric, 2) FROM nightpass.history h
    JOIN nightpass.volumes v ON v.id = h.volume JOIN nightpass.schedules s ON s.filer = v.filer
    WHERE v.filer = 'fa' AND h.to_state = 'cutting_over' GROUP BY s.at")
CUT=$(sql "SELECT count(*) FROM nightpass.volumes WHERE filer = 'fa' AND state = 'cut_over'")
for p in "${PIDS[@]:1}"; do kill -TERM "$p" 2>/dev/null || true; done
for p in "${PIDS[@]:1}"; do wait "$p" 2>/dev/null || true; done

echo "== reference: back-to-back sync --plan of filer fb (jobs = 4), $DURATION s" >&2
REF_PASSES=0
END=$((SECONDS + DURATION))
while ((SECONDS < END)); do
    "$BIN" sync --plan fb.toml --jobs 4 --identity sid --state-dir state-a2 --json >/dev/null 2>>ref.err ||
        die "sync --plan failed: $(tail -3 ref.err)"
    REF_PASSES=$((REF_PASSES + 6))
done
REF_S=$((SECONDS - END + DURATION))

python3 - "$FLEET_PASSES" "$DURATION" "$REF_PASSES" "$REF_S" "$TAKEOVER" "$LEASE" "$HELD" "$NIGHT" "$POLL" "$CUT" <<'EOF'
import sys
fleet, dur, ref, ref_s, takeover, lease, held, night, poll, cut = sys.argv[1:]
fpm = int(fleet) * 60 / float(dur)
rpm = int(ref) * 60 / float(ref_s)
print(f"passes per minute, 2 agents x 2 jobs over 12 volumes of the same size: {fpm:.1f}")
print(f"passes per minute, back-to-back sync --plan (6 volumes, jobs 4): {rpm:.1f}")
print(f"ratio agents / sync --plan: {fpm / rpm:.2f}")
print(f"killed agent held {held} leases; longest wait before the other agent took one: {takeover} s (--lease {lease})")
print(f"window opening to group cutover start: {night} s (--poll {poll}); volumes cut over: {cut} of 6")
EOF
