#!/usr/bin/env bash
# Soak test: many transfers of every ending against one tftpcast server, with its memory,
# file descriptors and sessions sampled all along, to show that nothing grows with the
# number of transfers served.
#
#   sudo bench/soak.sh                     # 100000 transfers
#   sudo bench/soak.sh --transfers 20000 --out DIR
#   bench/soak.sh --help
#
# What it does:
# - builds tftpcast in release mode (and runs a copy of the binary);
# - creates a network namespace with `lo` up and starts one server in it on 127.0.0.1:69,
#   with its metrics endpoint on 127.0.0.1:9469 (for the session count);
# - runs batches until the total is reached, cycling through the ways a transfer ends:
#     complete     `tftpcast bench`: a 1000-byte file without options (RFC 1350), a 64 KiB
#                  file at blksize 1428 with tsize and windowsize 8, a 300 KiB file at
#                  blksize 512 (block numbers past 512); every download checked (SHA-256)
#     not-found    `tftpcast bench` for a file that does not exist: each gets ERROR 1
#     client-error a client that sends ERROR after DATA 1
#     vanished     a client that acknowledges DATA 1, then, after DATA 2, closes its socket
#                  (half of them: the server's retransmissions meet a closed port) or keeps
#                  it open and says nothing (the server times out)
#   the clients come from many source addresses (127.1.x.y, 127.3.x.y);
# - every --interval seconds samples the server's RSS (VmRSS), open file descriptors, sockets
#   among them (from /proc/PID) and running sessions (metrics) into soak.csv (seconds,
#   transfers finished so far, rss_kib, fds, sockets, sessions);
# - prints the curve: first, middle, last sample and the maxima; exits non-zero when a
#   transfer did not end as its kind should, the server died, or the fds or sessions at the
#   end exceed those at the start.
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
VANISH_RATE=300
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

SCRIPT=soak.sh
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $(id -u) == 0 ]] || die "run as root: the soak runs in a network namespace"
for t in ip sha256sum awk python3 curl; do
    command -v "$t" >/dev/null || die "missing tool: $t"
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tftpcast-soak.XXXXXX")
OUT=${OUT:-$WORK/results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
NS="tcsoak$$"
SPID=""
bench_traps

build_tftpcast

ROOT=$WORK/root
mkdir -p "$ROOT"
head -c 1000 /dev/urandom >"$ROOT/small.bin"
head -c $((64 << 10)) /dev/urandom >"$ROOT/k64.bin"
head -c $((300 << 10)) /dev/urandom >"$ROOT/k300.bin"
sha() { sha256sum "$ROOT/$1" | awk '{print $1}'; }

add_ns "$NS"

ip netns exec "$NS" "$BIN" serve --root "$ROOT" --listen 127.0.0.1:69 --log-format json \
    --metrics-listen 127.0.0.1:9469 2>"$OUT/server.log" >/dev/null &
SPID=$!
STARTED+=("$SPID")
for _ in $(seq 50); do
    kill -0 "$SPID" 2>/dev/null || die "server exited at start: $(tail -3 "$OUT/server.log")"
    grep -q '"listening"' "$OUT/server.log" && break
    sleep 0.1
done
grep -q '"listening"' "$OUT/server.log" || die "server never logged listening"

# Running sessions, from the server's metrics.
sessions() {
    ip netns exec "$NS" curl -s --max-time 5 http://127.0.0.1:9469/metrics |
        awk '/^tftpcast_sessions_active / {print $2; f = 1} END {if (!f) print -1}'
}

# One sample: seconds, transfers finished so far, RSS KiB, open fds, sockets among them,
# sessions.
DONE=0
echo "$DONE" >"$WORK/done"
sample() {
    local t0=$1 rss fds socks
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$SPID/status" 2>/dev/null || echo 0)
    fds=$(find "/proc/$SPID/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    socks=$(find "/proc/$SPID/fd" -mindepth 1 -maxdepth 1 -lname 'socket:*' 2>/dev/null | wc -l)
    printf '%s,%s,%s,%s,%s,%s\n' "$(( $(date +%s) - t0 ))" "$(cat "$WORK/done")" "$rss" "$fds" "$socks" "$(sessions)"
}
T0=$(date +%s)
echo "seconds,transfers,rss_kib,fds,sockets,sessions" >"$OUT/soak.csv"
sample "$T0" >>"$OUT/soak.csv"
(
    # A descriptor may close while it is listed (find then fails): a sample is best effort.
    set +e +o pipefail
    while kill -0 "$SPID" 2>/dev/null; do
        sleep "$INTERVAL"
        sample "$T0" >>"$OUT/soak.csv"
    done
) &
SAMPLER=$!
STARTED+=("$SAMPLER")

# Clients that do not complete: ERROR after DATA 1 (client-error), or gone after DATA 2
# (vanished), started at most RATE a second. Prints "as-expected unexpected".
ENDINGS=$(cat <<'PY'
import ipaddress, selectors, socket, sys, time
kind, count, conc, base, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(ipaddress.IPv4Address(sys.argv[4])), float(sys.argv[5])
t0 = time.monotonic()
server = ("127.0.0.1", 69)
rrq = b"\x00\x01k64.bin\x00octet\x00"
sel = selectors.DefaultSelector()
started = ended = unexpected = 0
held = []  # silent vanished clients: (close at, socket)
def start():
    global started
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((str(ipaddress.IPv4Address(base + started % 2000)), 0))
    s.setblocking(False)
    s.sendto(rrq, server)
    sel.register(s, selectors.EVENT_READ, [started, time.monotonic() + 10])
    started += 1
def end(s, ok, keep=False):
    global ended, unexpected
    sel.unregister(s)
    if keep:
        held.append((time.monotonic() + 30, s))
    else:
        s.close()
    ended += 1
    unexpected += 0 if ok else 1
while ended < count:
    while started < count and started - ended < conc and started < rate * (time.monotonic() - t0) + 1:
        start()
    for key, _ in sel.select(0.05):
        s, (i, _) = key.fileobj, key.data
        try:
            p, tid = s.recvfrom(2048)
        except OSError:
            continue
        if p[:2] != b"\x00\x03":
            end(s, False)
            continue
        block = int.from_bytes(p[2:4], "big")
        if kind == "client-error":
            s.sendto(b"\x00\x05\x00\x00client gives up\x00", tid)
            end(s, True)
        elif block == 1:
            s.sendto(b"\x00\x04\x00\x01", tid)
        else:
            end(s, True, keep=i % 2 == 1)
    now = time.monotonic()
    for key in list(sel.get_map().values()):
        if key.data[1] < now:
            end(key.fileobj, False)
    while held and held[0][0] < now:
        held.pop(0)[1].close()
print(ended - unexpected, unexpected)
PY
)

# A batch of `tftpcast bench`: prints "as-expected unexpected". A bench kind expecting
# failures names the one failure reason it expects after a `!`.
bench_batch() {
    local n=$1 batch=$2 kind=$3 clients rounds expect=""
    [[ $kind == *!* ]] && { expect=${kind##*!}; kind=${kind%!*}; }
    clients=$(( n < CLIENTS ? n : CLIENTS ))
    rounds=$(( n / clients ))
    # shellcheck disable=SC2086
    ip netns exec "$NS" "$BIN" bench --server 127.0.0.1:69 --clients "$clients" --rounds "$rounds" \
        --source-base 127.1.0.1 --transfer-limit 120 --json -q $kind >"$OUT/batch$batch.json" 2>"$OUT/batch$batch.err" || true
    python3 -c 'import json,sys
try:
    v = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
except Exception:
    print(0, -1); sys.exit()
if sys.argv[2]:
    good = v["failures"].get(sys.argv[2], 0); print(good, v["ok"] + v["failed"] - good)
else:
    print(v["ok"], v["failed"])' "$OUT/batch$batch.json" "$expect"
}

KINDS=(
    "complete --file small.bin --expect-sha256 $(sha small.bin)"
    "not-found --file no-such-file.bin!server-error-1"
    "client-error"
    "vanished"
    "complete --file k64.bin --blksize 1428 --tsize --windowsize 8 --expect-sha256 $(sha k64.bin)"
    "complete --file k300.bin --blksize 512 --expect-sha256 $(sha k300.bin)"
)
FAILED=0
batch=0
declare -A ENDED
while (( DONE < TOTAL )); do
    n=$(( TOTAL - DONE < BATCH ? TOTAL - DONE : BATCH ))
    kind=${KINDS[$(( batch % ${#KINDS[@]} ))]}
    name=${kind%% *}
    case $name in
        # A vanished client's session lives until the server gives up on it (at least
        # transfer.min_give_up_s): paced, so that they stay well under limits.max_sessions.
        client-error) read -r ok failed < <(ip netns exec "$NS" python3 -c "$ENDINGS" "$name" "$n" "$CLIENTS" 127.3.0.1 100000 2>"$OUT/batch$batch.err" || echo 0 -1) ;;
        vanished) read -r ok failed < <(ip netns exec "$NS" python3 -c "$ENDINGS" "$name" "$n" "$CLIENTS" 127.3.0.1 "$VANISH_RATE" 2>"$OUT/batch$batch.err" || echo 0 -1) ;;
        *) read -r ok failed < <(bench_batch "$n" "$batch" "${kind#* }") ;;
    esac
    (( failed == -1 )) && die "batch $batch ($name) gave no result: $(tail -3 "$OUT/batch$batch.err")"
    FAILED=$(( FAILED + failed ))
    DONE=$(( DONE + ok + failed ))
    ENDED[$name]=$(( ${ENDED[$name]:-0} + ok ))
    echo "$DONE" >"$WORK/done"
    log "batch $batch ($name): $ok as expected, $failed not; $DONE/$TOTAL"
    kill -0 "$SPID" 2>/dev/null || die "the server died: $(tail -5 "$OUT/server.log")"
    batch=$(( batch + 1 ))
done
for name in "${!ENDED[@]}"; do log "ended $name: ${ENDED[$name]}"; done
# Let the last sessions end (a vanished client's lasts its give-up time) and their sockets close.
for _ in $(seq 60); do
    [[ $(sessions) == 0 ]] && break
    sleep 1
done
sleep 1
sample "$T0" >>"$OUT/soak.csv"
stop_pid "$SAMPLER"

python3 - "$OUT/soak.csv" "$FAILED" "$TOTAL" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
failed, total = int(sys.argv[2]), int(sys.argv[3])
def line(name, r):
    return f"| {name} | {r['seconds']} | {r['transfers']} | {int(r['rss_kib']) / 1024:.1f} | {r['fds']} | {r['sockets']} | {r['sessions']} |"
print()
print(f"soak: {total} transfers, {failed} did not end as their kind should, {len(rows)} samples")
print()
print("| sample | s | transfers | RSS MiB | fds | sockets | sessions |")
print("|---|---|---|---|---|---|---|")
print(line("first", rows[0]))
print(line("middle", rows[len(rows) // 2]))
print(line("last", rows[-1]))
mx = lambda k: max(int(r[k]) for r in rows)
print(f"| max | | | {mx('rss_kib') / 1024:.1f} | {mx('fds')} | {mx('sockets')} | {mx('sessions')} |")
print()
bad = []
if failed:
    bad.append(f"{failed} transfers did not end as their kind should")
for k in ("fds", "sessions"):
    if int(rows[-1][k]) > int(rows[0][k]):
        bad.append(f"{k} grew from {rows[0][k]} to {rows[-1][k]}")
if bad:
    print("soak: FAILED: " + "; ".join(bad))
    sys.exit(1)
print("soak: ok (every transfer ended as its kind should, fds and sessions back to the start)")
PY
log "results: $OUT"
