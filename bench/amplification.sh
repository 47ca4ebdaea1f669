#!/usr/bin/env bash
# Amplification: how many bytes a TFTP server sends to a source that never answers, per byte
# that source sent it. This is what an attacker gets by spoofing the victim's address in
# requests: the victim receives the server's replies and retransmissions and never ACKs.
#
#   sudo bench/amplification.sh
#   bench/amplification.sh --help
#
# What it does:
# - builds tftpcast in release mode (and runs a copy of the binary);
# - fetches tftpd-hpa (in.tftpd) and atftpd without installing them (`apt-get download` and
#   `dpkg-deb -x`, as bench/compare.sh does; the two packages conflict);
# - creates a network namespace with `lo` up (and 127.0.0.2, which in.tftpd wants) and runs
#   each server in it in turn on 127.0.0.1:69, with its default settings;
# - for each server sends, from a "victim" that receives everything and answers nothing, a
#   number of requests of each kind, each kind from its own source address 127.0.0.1x (one
#   socket per request, so every request is a new transfer for the server):
#     rrq          a valid RRQ for an existing 1 MiB file, no options
#     rrq-opts     a valid RRQ for it with blksize 1428 and tsize 0
#     missing      an RRQ for a file that does not exist
#     trunc        the two bytes 00 01 (a truncated RRQ)
#     badop        opcode 9 with a few bytes
# - counts with nftables (output hook of the namespace) the packets and bytes each source sent
#   to the server and the server sent back, until the server has been silent for --quiet
#   seconds (its retransmissions are over) or --max seconds passed;
# - prints a table: UDP payload bytes out per payload byte in, packets out per request.
#
# Everything it starts runs in the namespace it creates; an EXIT trap kills what it started
# (by PID) and deletes the namespace. Root is required.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: amplification.sh [options]
  --requests N     requests of each kind (default 10)
  --servers LIST   comma-separated subset of: tftpcast,hpa,atftpd (default: all)
  --quiet S        the server is done after S seconds without a packet to the victim (default 12)
  --max S          at most this many seconds per server (default 90)
  --no-build       use the already built target/release/tftpcast
  -h, --help       this text
EOF
}

REQUESTS=10
SERVERS="tftpcast,hpa,atftpd"
QUIET=12
MAX=90
BUILD=1
while [[ $# -gt 0 ]]; do
    case $1 in
        --requests) REQUESTS=$2; shift ;;
        --servers) SERVERS=$2; shift ;;
        --quiet) QUIET=$2; shift ;;
        --max) MAX=$2; shift ;;
        --no-build) BUILD=0 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "amplification.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

SCRIPT=amplification.sh
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $(id -u) == 0 ]] || die "run as root: the measurement runs in a network namespace"
for t in ip nft apt-get dpkg-deb python3 awk; do
    command -v "$t" >/dev/null || die "missing tool: $t"
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tftpcast-amp.XXXXXX")
chmod 755 "$WORK"
LOGS=$WORK/logs
mkdir -p "$LOGS"
NS="tcamp$$"
SPID=""
VPID=""
bench_traps

build_tftpcast
if [[ $SERVERS == *hpa* || $SERVERS == *atftpd* ]]; then
    fetch_peers tftpd-hpa atftpd libwrap0
fi

ROOT=$WORK/root
mkdir -p "$ROOT"
head -c $((1 << 20)) /dev/urandom >"$ROOT/one_mib.bin"
chmod 755 "$ROOT"
chmod 644 "$ROOT"/*

add_ns "$NS"
ip -n "$NS" addr add 127.0.0.2/8 dev lo   # in.tftpd exits 66 where 127.0.0.1 is the only address

KINDS=(rrq rrq-opts missing trunc badop)

# Counters: for kind i (source 127.0.0.1i) what it sent the server and what came back.
setup_counters() {
    ip netns exec "$NS" nft delete table inet amp 2>/dev/null || true
    {
        echo "table inet amp {"
        for i in "${!KINDS[@]}"; do
            echo "  counter in$i {}"
            echo "  counter out$i {}"
        done
        echo "  chain out { type filter hook output priority 0;"
        for i in "${!KINDS[@]}"; do
            echo "    ip saddr 127.0.0.1$i ip daddr 127.0.0.1 meta l4proto udp counter name in$i"
            echo "    ip daddr 127.0.0.1$i ip saddr 127.0.0.1 meta l4proto udp counter name out$i"
        done
        echo "  }"
        echo "}"
    } >"$WORK/amp.nft"
    ip netns exec "$NS" nft -f "$WORK/amp.nft"
}

# "packets bytes" of a named counter.
counter() {
    ip netns exec "$NS" nft list counter inet amp "$1" |
        awk '/packets/ { for (i = 1; i < NF; i++) { if ($i == "packets") p = $(i + 1); if ($i == "bytes") b = $(i + 1) } } END { print p + 0, b + 0 }'
}

total_out() {
    local i s=0 p b
    for i in "${!KINDS[@]}"; do
        read -r p b < <(counter "out$i")
        s=$(( s + p ))
    done
    echo "$s"
}

start_server() {
    local name=$1 cmd
    case $name in
        tftpcast) cmd=("$BIN" serve --root "$ROOT" --listen "127.0.0.1:69" --log-format json) ;;
        hpa) cmd=(env LD_LIBRARY_PATH="$PEER_LD" "$HPA" -L -s -u root -a "127.0.0.1:69" "$ROOT") ;;
        atftpd) cmd=(env LD_LIBRARY_PATH="$PEER_LD" "$ATFTPD" --daemon --no-fork --port 69
                     --bind-address 127.0.0.1 --user root --group root --logfile "$LOGS/atftpd.log" "$ROOT") ;;
        *) die "unknown server $name" ;;
    esac
    ip netns exec "$NS" "${cmd[@]}" >>"$LOGS/$name.out" 2>&1 &
    SPID=$!
    STARTED+=("$SPID")
    sleep 1
    kill -0 "$SPID" 2>/dev/null || die "$name exited at start: $(tail -3 "$LOGS/$name.out")"
}

# The victim: sends the requests, then reads (and never answers) until killed.
VICTIM=$(cat <<'PY'
import os, select, signal, socket, sys, time
n = int(sys.argv[1])
got = {}   # kind -> [datagrams, payload bytes, {length: datagrams}]
def report(*_):
    for k in sorted(got):
        d, b, lens = got[k]
        print("recv", k, d, b, ",".join("%dx%d" % (n, l) for l, n in sorted(lens.items())), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, report)
def rrq(name, opts=()):
    p = b"\x00\x01" + name + b"\x00octet\x00"
    for k, v in opts:
        p += k + b"\x00" + v + b"\x00"
    return p
kinds = [
    rrq(b"one_mib.bin"),
    rrq(b"one_mib.bin", [(b"blksize", b"1428"), (b"tsize", b"0")]),
    rrq(b"no_such_file.bin"),
    b"\x00\x01",
    b"\x00\x09abcdef",
]
socks = []
for i, pkt in enumerate(kinds):
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind(("127.0.0.1%d" % i, 0))
        s.setblocking(False)
        s.sendto(pkt, ("127.0.0.1", 69))
        socks.append((s, i))
        time.sleep(0.002)
print("sent", flush=True)
while True:
    r, _, _ = select.select([s for s, _ in socks], [], [], 1.0)
    for s, i in socks:
        if s not in r:
            continue
        try:
            while True:
                d = s.recv(70000)
                g = got.setdefault(i, [0, 0, {}])
                g[0] += 1
                g[1] += len(d)
                g[2][len(d)] = g[2].get(len(d), 0) + 1
        except (BlockingIOError, ConnectionRefusedError):
            pass
PY
)

RESULTS=$WORK/results.tsv
: >"$RESULTS"
IFS=, read -ra list <<<"$SERVERS"
for srv in "${list[@]}"; do
    log "server $srv: $REQUESTS requests of each kind from a silent victim"
    setup_counters
    start_server "$srv"
    ip netns exec "$NS" python3 -c "$VICTIM" "$REQUESTS" >"$LOGS/victim.$srv" 2>&1 &
    VPID=$!
    STARTED+=("$VPID")
    start=$(date +%s)
    last=-1
    quiet_since=$start
    while true; do
        sleep 1
        now=$(date +%s)
        cur=$(total_out)
        if [[ $cur != "$last" ]]; then
            last=$cur
            quiet_since=$now
        fi
        (( now - quiet_since >= QUIET )) && break
        (( now - start >= MAX )) && { log "  $srv still sending after ${MAX}s; counting what it sent so far"; break; }
    done
    log "  done after $(( $(date +%s) - start ))s"
    stop_pid "$VPID"; VPID=""
    for i in "${!KINDS[@]}"; do
        read -r pin bin < <(counter "in$i")
        read -r pout bout < <(counter "out$i")
        # What the victim's sockets received, as a cross-check of the counters.
        read -r vd vb vz < <(awk -v k="$i" '$1 == "recv" && $2 == k {print $3, $4, $5; f = 1} END {if (!f) print 0, 0, "-"}' "$LOGS/victim.$srv")
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$srv" "${KINDS[$i]}" "$REQUESTS" "$pin" "$bin" "$pout" "$bout" "$vd" "$vb" "$vz" >>"$RESULTS"
    done
    stop_pid "$SPID"; SPID=""
    for p in $(ip netns pids "$NS" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
done

python3 - "$RESULTS" <<'PY'
import sys
NAMES = {"tftpcast": "tftpcast", "hpa": "tftpd-hpa", "atftpd": "atftpd"}
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
print()
print("Amplification towards a source that never answers (UDP payload bytes; nft counters, IPv4 + UDP "
      "headers of 28 bytes a packet taken off):")
print()
print("| server | request | requests | bytes in | packets out | bytes out | out/in bytes | packets out per request | victim got: datagrams, bytes (count x length) |")
print("|---|---|---|---|---|---|---|---|---|")
for srv, kind, n, pin, bin_, pout, bout, vd, vb, vz in rows:
    n, pin, bin_, pout, bout = int(n), int(pin), int(bin_), int(pout), int(bout)
    pin_b = bin_ - 28 * pin
    pout_b = bout - 28 * pout
    ratio = f"{pout_b / pin_b:.2f}" if pin_b > 0 else "-"
    print(f"| {NAMES.get(srv, srv)} | {kind} | {n} | {pin_b} | {pout} | {pout_b} | {ratio} | {pout / n:.1f} | {vd}, {vb} ({vz}) |")
print()
print("The last column is what the victim's sockets received, a cross-check of the counters.")
print()
PY
