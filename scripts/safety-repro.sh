#!/usr/bin/env bash
# The sender-side repros of the safety issue, run against one binary:
#   scripts/safety-repro.sh [BIN]     (default: target/debug/nightpass)
# A cutover of a never-synced volume, one volume under two spellings of its
# address, another source into the same volume, --assume-frozen with a
# writer running, and a sync and a cutover to a port nobody listens on.
# Each step prints the command's last lines and its exit status; run it
# against an older binary to see what changed. Takes about 30 s (minutes on
# a binary that retries a silent receiver for --retry-for).
set -u
BIN=$(realpath "${1:-target/debug/nightpass}")
D=$(mktemp -d)
trap 'kill $SP 2>/dev/null; rm -rf "$D"' EXIT
cd "$D"
$BIN keygen --identity s >/dev/null; $BIN keygen --identity r >/dev/null
SFP=$($BIN fingerprint --identity s); RFP=$($BIN fingerprint --identity r)
head -c 32M /dev/urandom > src1.img; head -c 32M /dev/urandom > src3.img
$BIN serve --listen 127.0.0.1:0 --identity r --state-dir rs --volume x=t.img --allow "$SFP" 2> serve.log &
SP=$!
for _ in $(seq 50); do grep -q listening serve.log && break; sleep 0.1; done
PORT=$(grep -o '127.0.0.1:[0-9]*' serve.log | head -1 | cut -d: -f2)
FORCE=$($BIN cutover --help | grep -q force-no-forecast && echo --force-no-forecast)
S="--identity s --state-dir ss --server-fingerprint $RFP --quiet"
elapsed() { echo "$(date +%s.%N) - $1" | bc; }

echo "== cutover of a never-synced volume (--pre/--post hooks)"
timeout 60 $BIN cutover src1.img 127.0.0.1:$PORT/x $S --pre 'echo FROZE >&2' --post true 2>&1 | tail -2
echo "exit ${PIPESTATUS[0]}"
echo "== one volume, its address spelled two ways: pass numbers"
$BIN sync src1.img 127.0.0.1:$PORT/x $S --json | grep -o '"pass":[0-9]*' | tail -1
$BIN sync src1.img 127.1:$PORT/x $S --json | grep -o '"pass":[0-9]*' | tail -1
echo "== another source into the same volume"
$BIN sync src3.img 127.0.0.1:$PORT/x $S 2>&1 | tail -1; echo "exit ${PIPESTATUS[0]}"
echo "== --assume-frozen with a writer running"
$BIN sync src3.img 127.0.0.1:$PORT/x $S --new-source >/dev/null 2>&1 || $BIN sync src3.img 127.0.0.1:$PORT/x $S >/dev/null 2>&1
( while true; do dd if=/dev/urandom of=src3.img bs=4k count=1 seek=$((RANDOM % 8192)) conv=notrunc 2>/dev/null; sleep 0.002; done ) &
W=$!
$BIN cutover src3.img 127.0.0.1:$PORT/x $S --assume-frozen 2>&1 | tail -2; echo "exit ${PIPESTATUS[0]}"
kill $W
echo "== sync to a port nobody listens on"
T=$(date +%s.%N)
timeout 300 $BIN sync src3.img 127.0.0.1:9/x $S --retry-for 60s 2>&1 | tail -1
echo "exit ${PIPESTATUS[0]} after $(elapsed "$T") s"
echo "== cutover to a port nobody listens on"
T=$(date +%s.%N)
timeout 300 $BIN cutover src3.img 127.0.0.1:9/x $S --pre "echo FROZE >&2" --post "echo THAWED >&2" $FORCE 2>&1 | tail -3
echo "exit ${PIPESTATUS[0]} after $(elapsed "$T") s"
