#!/usr/bin/env bash
# Soak test: many transfers against one tftpcast server, with its memory and file descriptors
# sampled all along, to show that nothing grows with the number of transfers served.
#
#   sudo bench/soak.sh                     # 100000 transfers
#   sudo bench/soak.sh --transfers 20000 --out DIR
#   bench/soak.sh --help
#
# What it does:
# - builds tftpcast in release mode (and runs a copy of the binary);
# - creates a network namespace with `lo` up and starts one server in it on 127.0.0.1:69;
# - runs `tftpcast bench` in batches until the total is reached, cycling through kinds of
#   transfer so the server sees a mix: a 1000-byte file without options (RFC 1350), a 64 KiB
#   file at blksize 1428 with tsize, the same with windowsize 8, and a 300 KiB file at blksize
#   512 (block numbers past 512); every download is checked against the file's SHA-256;
#   the clients come from many source addresses (127.1.x.y);
# - every --interval seconds samples the server's RSS (VmRSS), open file descriptors and
#   sockets among them (from /proc/PID) into soak.csv (seconds, transfers of the bench runs
#   finished so far, rss_kib, fds, sockets);
# - prints the curve: first, middle, last sample and the maxima; exits non-zero when a
#   transfer failed, the server died, or the fds at the end exceed those at the start.
#
# Everything it starts runs in the namespace it creates; an EXIT trap kills what it started
# (by PID) and deletes the namespace. Root is required.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: soak.sh [options]
  --transfers N     total transfers (default 100000)
  --batch N         transfers per bench run (default 10000)
  --clients N       concurrent clients per bench run (default 50)
  --interval S      seconds between samples (default 3)
  --out DIR         keep soak.csv, the bench results and the server log in DIR
  --no-build        use the already built target/release/tftpcast
  -h, --help        this text
EOF
}

TOTAL=100000
BATCH=10000
CLIENTS=50
INTERVAL=3
OUT=""
BUILD=1
while [[ $# -gt 0 ]]; do
    case $1 in
        --transfers) TOTAL=$2; shift ;;
        --batch) BATCH=$2; shift ;;
        --clients) CLIENTS=$2; shift ;;
        --interval) INTERVAL=$2; shift ;;
        --out) OUT=$2; shift ;;
        --no-build) BUILD=0 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "soak.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
(( BATCH % CLIENTS == 0 )) || { echo "soak.sh: --batch must be a multiple of --clients" >&2; exit 2; }

log() { printf '%s soak.sh: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root: the soak runs in a network namespace"
for t in ip sha256sum awk python3; do
    command -v "$t" >/dev/null || die "missing tool: $t"
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tftpcast-soak.XXXXXX")
OUT=${OUT:-$WORK/results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
NS="tcsoak$$"
NS_MADE=0
SPID=""
SAMPLER=""

cleanup() {
    local rc=$? p
    set +e
    trap - EXIT INT TERM
    [[ -n $SAMPLER ]] && kill "$SAMPLER" 2>/dev/null
    if [[ -n $SPID ]] && kill -0 "$SPID" 2>/dev/null; then
        kill -TERM "$SPID"
        for _ in $(seq 50); do kill -0 "$SPID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SPID" 2>/dev/null
    fi
    if [[ $NS_MADE == 1 ]]; then
        for p in $(ip netns pids "$NS" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
        ip netns delete "$NS" 2>/dev/null
    fi
    if [[ $OUT == "$WORK/results" ]]; then
        rm -rf "$WORK"
    else
        rm -rf "$WORK/root" "$WORK/bin"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT TERM

if [[ $BUILD == 1 ]]; then
    log "building tftpcast (release)"
    (cd "$REPO" && cargo build --release --locked --bin tftpcast >&2)
fi
TARGET_DIR=$(cd "$REPO" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
mkdir -p "$WORK/bin"
cp "$TARGET_DIR/release/tftpcast" "$WORK/bin/tftpcast"
BIN=$WORK/bin/tftpcast

ROOT=$WORK/root
mkdir -p "$ROOT"
head -c 1000 /dev/urandom >"$ROOT/small.bin"
head -c $((64 << 10)) /dev/urandom >"$ROOT/k64.bin"
head -c $((300 << 10)) /dev/urandom >"$ROOT/k300.bin"
sha() { sha256sum "$ROOT/$1" | awk '{print $1}'; }

ip netns add "$NS"
NS_MADE=1
ip -n "$NS" link set lo up

ip netns exec "$NS" "$BIN" serve --root "$ROOT" --listen 127.0.0.1:69 --log-format json \
    2>"$OUT/server.log" >/dev/null &
SPID=$!
for _ in $(seq 50); do
    kill -0 "$SPID" 2>/dev/null || die "server exited at start: $(tail -3 "$OUT/server.log")"
    grep -q '"listening"' "$OUT/server.log" && break
    sleep 0.1
done
grep -q '"listening"' "$OUT/server.log" || die "server never logged listening"

# One sample: seconds, transfers finished so far, RSS KiB, open fds, sockets among them.
DONE=0
echo "$DONE" >"$WORK/done"
sample() {
    local t0=$1 rss fds socks
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$SPID/status" 2>/dev/null || echo 0)
    fds=$(find "/proc/$SPID/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    socks=$(find "/proc/$SPID/fd" -mindepth 1 -maxdepth 1 -lname 'socket:*' 2>/dev/null | wc -l)
    printf '%s,%s,%s,%s,%s\n' "$(( $(date +%s) - t0 ))" "$(cat "$WORK/done")" "$rss" "$fds" "$socks"
}
T0=$(date +%s)
echo "seconds,transfers,rss_kib,fds,sockets" >"$OUT/soak.csv"
sample "$T0" >>"$OUT/soak.csv"
(
    while kill -0 "$SPID" 2>/dev/null; do
        sleep "$INTERVAL"
        sample "$T0" >>"$OUT/soak.csv"
    done
) &
SAMPLER=$!

KINDS=(
    "--file small.bin --expect-sha256 $(sha small.bin)"
    "--file k64.bin --blksize 1428 --tsize --expect-sha256 $(sha k64.bin)"
    "--file k64.bin --blksize 1428 --windowsize 8 --expect-sha256 $(sha k64.bin)"
    "--file k300.bin --blksize 512 --expect-sha256 $(sha k300.bin)"
)
FAILED=0
batch=0
while (( DONE < TOTAL )); do
    n=$(( TOTAL - DONE < BATCH ? TOTAL - DONE : BATCH ))
    clients=$(( n < CLIENTS ? n : CLIENTS ))
    rounds=$(( n / clients ))
    kind=${KINDS[$(( batch % ${#KINDS[@]} ))]}
    # shellcheck disable=SC2086
    ip netns exec "$NS" "$BIN" bench --server 127.0.0.1:69 --clients "$clients" --rounds "$rounds" \
        --source-base 127.1.0.1 --transfer-limit 120 --json -q $kind >"$OUT/batch$batch.json" 2>"$OUT/batch$batch.err" || true
    read -r ok failed < <(python3 -c 'import json,sys
try:
    v = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); print(v["ok"], v["failed"])
except Exception:
    print(0, -1)' "$OUT/batch$batch.json")
    (( failed == -1 )) && die "bench run $batch gave no result: $(tail -3 "$OUT/batch$batch.err")"
    FAILED=$(( FAILED + failed ))
    DONE=$(( DONE + ok + failed ))
    echo "$DONE" >"$WORK/done"
    log "batch $batch (${kind%% --expect-sha256*}): $ok ok, $failed failed; $DONE/$TOTAL"
    kill -0 "$SPID" 2>/dev/null || die "the server died: $(tail -5 "$OUT/server.log")"
    batch=$(( batch + 1 ))
done
sleep 2   # let the last sessions end and their sockets close
sample "$T0" >>"$OUT/soak.csv"
kill "$SAMPLER" 2>/dev/null || true
wait "$SAMPLER" 2>/dev/null || true
SAMPLER=""

python3 - "$OUT/soak.csv" "$FAILED" "$TOTAL" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
failed, total = int(sys.argv[2]), int(sys.argv[3])
def line(name, r):
    return f"| {name} | {r['seconds']} | {r['transfers']} | {int(r['rss_kib']) / 1024:.1f} | {r['fds']} | {r['sockets']} |"
print()
print(f"soak: {total} transfers, {failed} failed, {len(rows)} samples")
print()
print("| sample | s | transfers | RSS MiB | fds | sockets |")
print("|---|---|---|---|---|---|")
print(line("first", rows[0]))
print(line("middle", rows[len(rows) // 2]))
print(line("last", rows[-1]))
mx = lambda k: max(int(r[k]) for r in rows)
print(f"| max | | | {mx('rss_kib') / 1024:.1f} | {mx('fds')} | {mx('sockets')} |")
print()
bad = []
if failed:
    bad.append(f"{failed} transfers failed")
if int(rows[-1]["fds"]) > int(rows[0]["fds"]):
    bad.append(f"fds grew from {rows[0]['fds']} to {rows[-1]['fds']}")
if bad:
    print("soak: FAILED: " + "; ".join(bad))
    sys.exit(1)
print("soak: ok (no failed transfer, fds back to the start)")
PY
log "results: $OUT"
