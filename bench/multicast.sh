#!/usr/bin/env bash
# Multicast efficiency (RFC 2090): tftpcast against atftpd, in the same run, on a lab where
# every client is its own machine.
#
#   sudo bench/multicast.sh                      # every case, 3 runs each (about 15 minutes)
#   sudo bench/multicast.sh --cases c32,loss5 --repeat 1
#   bench/multicast.sh --help
#
# The lab: one network namespace per atftp client and one for the server, each with one veth on
# a bridge (in its own namespace) with multicast snooping off, as machines on a switch. Loss is
# emulated on a client's input with nftables (`numgen random mod 100 < P drop`): DATA and OACKs
# to it are lost, its ACKs are not. The clients are atftp 0.8 (the RFC 2090 reference client)
# with `--option multicast --option "blksize 1428"`, and `--option "timeout 1"` where the case
# says so; most clients (atftp's default, PXE ROMs) negotiate no timeout.
#
# Measured per run: the wall time from the first client's start to the last client's end, each
# client's own time, its exit status and the SHA-256 of what it wrote, and the server's UDP
# payload (nftables counter on the server's output: bytes minus 28 bytes of IPv4 and UDP
# header per packet) divided by the file size: the "payload ratio", 1.00 when the file crossed
# the wire once. For tftpcast the `group ended` log line of the run is kept beside (blocks on
# the first pass, repairs by reason, rate changes).
#
# Cases (servers: tftpcast, atftpd unless noted):
#   c32       32 clients, 40 MiB, no timeout option
#   c32t1     32 clients, 40 MiB, timeout 1
#   loss5     4 clients, 1 MiB, 5% loss on each client's input
#   c8        8 clients, 40 MiB, no loss (the reference for c8lossy)
#   c8lossy   8 clients, 40 MiB, the first to ask (so the first master) with 20% loss
#             (tftpcast only: with atftpd all 8 clients failed at the 300 s limit)
#   loss20    4 clients with timeout 1, 1 MiB, 20% loss on each (tftpcast only: atftpd's 1 s
#             lock-step retries take minutes here)
# and prints min/median/max of wall time and payload ratio per case and server, then which
# targets of the multicast efficiency issue hold (medians, same run).
#
# Servers run on core --server-cpu, clients on core --client-cpu (32 receivers on one core is
# the "receivers cannot keep up" condition the group's rate control must handle). Everything
# runs in namespaces the script creates; an EXIT trap kills what it started and deletes them.
# Root is required.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: multicast.sh [options]
  --cases LIST         comma-separated subset of: c32,c32t1,loss5,c8,c8lossy,loss20 (default: all)
  --servers LIST       comma-separated subset of: tftpcast,atftpd (default: both)
  --repeat N           runs per case and server (default 3)
  --quick              one run per case, 16 clients instead of 32, 16 MiB instead of 40
  --server-cpu N       core for the servers (default 0)
  --client-cpu N       core for the clients (default 1; "all" leaves them unpinned)
  --out DIR            keep the results (runs.tsv, server logs, table.md) in DIR
  --no-build           use the already built target/release/tftpcast
  --tftpcast-arg ARG   one more argument for `tftpcast serve` (repeatable)
  -h, --help           this text
EOF
}

SCRIPT=multicast.sh
CASES="c32,c32t1,loss5,c8,c8lossy,loss20"
SERVERS="tftpcast,atftpd"
REPEAT=3
QUICK=0
SERVER_CPU=0
CLIENT_CPU=1
OUT=""
BUILD=1
EXTRA_TFTPCAST=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --cases) CASES=$2; shift ;;
        --servers) SERVERS=$2; shift ;;
        --repeat) REPEAT=$2; shift ;;
        --quick) QUICK=1 ;;
        --server-cpu) SERVER_CPU=$2; shift ;;
        --client-cpu) CLIENT_CPU=$2; shift ;;
        --out) OUT=$2; shift ;;
        --no-build) BUILD=0 ;;
        --tftpcast-arg) EXTRA_TFTPCAST+=("$2"); shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "multicast.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BIG_N=32
BIG_MIB=40
if [[ $QUICK == 1 ]]; then
    REPEAT=1; BIG_N=16; BIG_MIB=16
fi
BLK=1428
PORT=69
SRV_ADDR=10.250.77.1

[[ $(id -u) == 0 ]] || die "run as root: the benchmark builds network namespaces"
for t in ip nft taskset timeout apt-get dpkg-deb python3 sha256sum ps awk; do
    command -v "$t" >/dev/null || die "missing tool: $t"
done
NCPU=$(nproc --all)
(( SERVER_CPU < NCPU )) || die "core $SERVER_CPU: this machine has $NCPU"
[[ $CLIENT_CPU == all ]] || (( CLIENT_CPU < NCPU )) || die "core $CLIENT_CPU: this machine has $NCPU"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tftpcast-mcbench.XXXXXX")
chmod 755 "$WORK"
# What the clients write goes to memory: a lab's clients have their own disks.
SINK=$(mktemp -d /dev/shm/tftpcast-mcbench.XXXXXX)
LOGS=$WORK/logs
mkdir -p "$LOGS"
if [[ -n $OUT ]]; then
    mkdir -p "$OUT"
    OUT=$(cd "$OUT" && pwd)
    KEEP_LOGS_IN=$OUT
else
    OUT=$WORK/results
    mkdir -p "$OUT"
fi
trap 'rc=$?; set +e; trap - EXIT INT TERM; rm -rf "$SINK"; bench_cleanup; exit $rc' EXIT
trap 'log interrupted; exit 130' INT TERM
TAG="tmc$$"

build_tftpcast
fetch_peers

# ---------------------------------------------------------------------------------------------
# Files and the lab.
# ---------------------------------------------------------------------------------------------

ROOT=$WORK/root
mkdir -p "$ROOT"
head -c $((BIG_MIB << 20)) /dev/urandom >"$ROOT/big.bin"
head -c $((1 << 20)) /dev/urandom >"$ROOT/one.bin"
printf 'probe\n' >"$ROOT/probe.txt"
chmod 755 "$ROOT"
chmod 644 "$ROOT"/*
declare -A SHA SIZE
for f in big.bin one.bin; do
    SHA[$f]=$(sha256sum "$ROOT/$f" | awk '{print $1}')
    SIZE[$f]=$(stat -c %s "$ROOT/$f")
done

case_n() {
    case $1 in c32|c32t1) echo "$BIG_N" ;; loss5|loss20) echo 4 ;; c8|c8lossy) echo 8 ;; esac
}
case_file() {
    case $1 in c32|c32t1|c8|c8lossy) echo big.bin ;; loss5|loss20) echo one.bin ;; esac
}
# Loss (percent) on client $2's input in case $1.
case_loss() {
    case $1 in loss5) echo 5 ;; loss20) echo 20 ;; c8lossy) [[ $2 == 0 ]] && echo 20 || echo 0 ;; *) echo 0 ;; esac
}
case_opts() {
    case $1 in c32t1|loss20) echo timeout ;; *) echo "" ;; esac
}
# atftpd is left out where it cannot finish: one lossy master holds its lock-step group at
# 1 s per lost block (measured: c8lossy, all 8 clients failed at the 300 s limit).
case_servers() {
    case $1 in loss20|c8lossy) echo tftpcast ;; *) echo "$SERVERS" ;; esac
}
case_label() {
    case $1 in
        c32) echo "$BIG_N clients, $BIG_MIB MiB, no timeout option" ;;
        c32t1) echo "$BIG_N clients, $BIG_MIB MiB, timeout 1" ;;
        loss5) echo "4 clients, 1 MiB, 5% loss on each" ;;
        c8) echo "8 clients, $BIG_MIB MiB, no loss" ;;
        c8lossy) echo "8 clients, $BIG_MIB MiB, the first master with 20% loss" ;;
        loss20) echo "4 clients (timeout 1), 1 MiB, 20% loss on each" ;;
    esac
}

MAXN=0
IFS=, read -ra CASE_LIST <<<"$CASES"
for c in "${CASE_LIST[@]}"; do
    n=$(case_n "$c")
    [[ -n $n ]] || die "unknown case $c"
    (( n > MAXN )) && MAXN=$n
done

log "building the lab: a bridge, the server and $MAXN client namespaces"
BR="$TAG-br"
SRV="$TAG-srv"
add_ns "$BR"
ip -n "$BR" link add br0 type bridge
ip -n "$BR" link set br0 type bridge mcast_snooping 0
ip -n "$BR" link set br0 up
lab_host() {   # namespace, bridge port, address
    add_ns "$1"
    ip -n "$BR" link add "$2" type veth peer name v0 netns "$1"
    ip -n "$BR" link set "$2" master br0
    ip -n "$BR" link set "$2" up
    ip -n "$1" addr add "$3/24" dev v0
    ip -n "$1" link set v0 up
    ip -n "$1" route add 224.0.0.0/4 dev v0
}
lab_host "$SRV" p-srv "$SRV_ADDR"
for ((i = 0; i < MAXN; i++)); do
    lab_host "$TAG-c$i" "p-c$i" "10.250.77.$((11 + i))"
done
# The server's UDP output, counted.
ip netns exec "$SRV" nft -f - <<'EOF'
table inet mcb {
    counter tx { }
    chain out {
        type filter hook output priority 0;
        meta l4proto udp counter name "tx"
    }
}
EOF

set_loss() {   # namespace, percent (0: none)
    ip netns exec "$1" nft delete table inet loss 2>/dev/null || true
    [[ $2 == 0 ]] && return 0
    ip netns exec "$1" nft -f - <<EOF
table inet loss {
    chain in {
        type filter hook input priority 0;
        udp sport != 53 numgen random mod 100 < $2 drop
    }
}
EOF
}

SPID=""
start_server() {
    local name=$1 cmd i
    case $name in
        tftpcast) cmd=("$BIN" serve --root "$ROOT" --listen "$SRV_ADDR:$PORT" --log-format json
                       --multicast-range 239.255.77.0/24 "${EXTRA_TFTPCAST[@]}") ;;
        atftpd) cmd=(env LD_LIBRARY_PATH="$PEER_LD" "$ATFTPD" --daemon --no-fork --port "$PORT"
                     --bind-address "$SRV_ADDR" --user root --group root --logfile "$LOGS/atftpd.log"
                     --mcast-addr 239.255.77.0-255 --mcast-port 1758 --mcast-ttl 1 --retry-timeout 1 "$ROOT") ;;
        *) die "unknown server $name" ;;
    esac
    ip netns exec "$SRV" taskset -c "$SERVER_CPU" "${cmd[@]}" >>"$LOGS/$name.out" 2>&1 &
    SPID=$!
    STARTED+=("$SPID")
    for i in $(seq 40); do
        kill -0 "$SPID" 2>/dev/null || { log "$name exited at start: $(tail -3 "$LOGS/$name.out")"; SPID=""; return 1; }
        if ip netns exec "$TAG-c0" timeout 5 "$BIN" bench --server "$SRV_ADDR:$PORT" --file probe.txt \
            --timeout 1 --retries 0 --json -q >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.25
    done
    log "$name does not serve on $SRV_ADDR:$PORT"
    stop_pid "$SPID"
    SPID=""
    return 1
}

tx_counter() {   # prints "packets bytes"
    ip netns exec "$SRV" nft -j list counter inet mcb tx |
        python3 -c 'import json,sys
for o in json.load(sys.stdin)["nftables"]:
    if "counter" in o: print(o["counter"]["packets"], o["counter"]["bytes"])'
}

# CPU time (seconds) the server has used, its threads included. `ip netns exec`, taskset and
# env all exec, so the PID started is the server's.
server_cpu() {
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.3f\n", ($12 + $13) / hz }' "/proc/$SPID/stat" 2>/dev/null || echo 0
}

# One run. Appends to runs.tsv: case server rep n size wall_s payload_bytes packets ok failed
# failed_with_file durations(comma, client order) server_cpu_s and saves tftpcast's group log
# lines.
run_case() {
    local c=$1 srv=$2 rep=$3 n file size limit i pids=() opts=() t0 t1 before after
    n=$(case_n "$c")
    file=$(case_file "$c")
    size=${SIZE[$file]}
    limit=$([[ $file == big.bin ]] && echo 300 || echo 180)
    opts=(--option multicast --option "blksize $BLK")
    [[ $(case_opts "$c") == timeout ]] && opts+=(--option "timeout 1")
    rm -rf "${SINK:?}"/*
    local loglines=0
    [[ -f $LOGS/$srv.out ]] && loglines=$(wc -l <"$LOGS/$srv.out")
    ip netns exec "$SRV" nft reset counter inet mcb tx >/dev/null
    before=$(tx_counter)
    local cpu0 cpu1
    cpu0=$(server_cpu)
    t0=$(date +%s.%N)
    for ((i = 0; i < n; i++)); do
        local pin=(taskset -c "$CLIENT_CPU")
        [[ $CLIENT_CPU == all ]] && pin=()
        (
            s=$(date +%s.%N)
            rc=0
            timeout -k 5 "$limit" ip netns exec "$TAG-c$i" "${pin[@]}" "$ATFTP" "${opts[@]}" \
                -g -r "$file" -l "$SINK/$i" "$SRV_ADDR" "$PORT" >"$LOGS/atftp-$c-$srv-$rep-$i.log" 2>&1 || rc=$?
            e=$(date +%s.%N)
            echo "$rc $s $e" >"$SINK/$i.t"
        ) &
        pids+=($!)
        # The lossy client of c8lossy asks first, so it is the first master.
        [[ $c == c8lossy && $i == 0 ]] && sleep 0.2
    done
    for i in "${!pids[@]}"; do wait "${pids[$i]}" || true; done
    t1=$(date +%s.%N)
    cpu1=$(server_cpu)
    after=$(tx_counter)
    local ok=0 failed=0 with_file=0 durs=() rc s e sum
    for ((i = 0; i < n; i++)); do
        read -r rc s e <"$SINK/$i.t"
        sum=$(sha256sum "$SINK/$i" 2>/dev/null | awk '{print $1}')
        durs+=("$(python3 -c "print(round($e - $s, 3))")")
        if [[ $rc == 0 && $sum == "${SHA[$file]}" ]]; then
            ok=$((ok + 1))
        else
            failed=$((failed + 1))
            [[ $sum == "${SHA[$file]}" ]] && with_file=$((with_file + 1))
            log "  client $i failed: exit $rc, $(tail -1 "$LOGS/atftp-$c-$srv-$rep-$i.log")"
        fi
    done
    local pk by wall payload
    read -r pk by <<<"$(python3 -c "a='$before'.split(); b='$after'.split(); print(int(b[0])-int(a[0]), int(b[1])-int(a[1]))")"
    payload=$((by - 28 * pk))
    wall=$(python3 -c "print(round($t1 - $t0, 3))")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$c" "$srv" "$rep" "$n" "$size" "$wall" \
        "$payload" "$pk" "$ok" "$failed" "$with_file" "$(IFS=,; echo "${durs[*]}")" \
        "$(python3 -c "print(round($cpu1 - $cpu0, 3))")" >>"$OUT/runs.tsv"
    if [[ $srv == tftpcast ]]; then
        # Let the group end (its members are gone) and keep its summary.
        sleep 1
        tail -n +"$((loglines + 1))" "$LOGS/tftpcast.out" | grep -E '"group ended"|"group rate' |
            sed "s/^/$c\t$rep\t/" >>"$OUT/groups.tsv" || true
    fi
    log "  $c $srv #$rep: $wall s, payload $(python3 -c "print(round($payload / $size, 3))")x, $ok ok, $failed failed"
}

: >"$OUT/runs.tsv"
: >"$OUT/groups.tsv"
for c in "${CASE_LIST[@]}"; do
    n=$(case_n "$c")
    log "case $c: $(case_label "$c")"
    for ((i = 0; i < n; i++)); do set_loss "$TAG-c$i" "$(case_loss "$c" "$i")"; done
    IFS=, read -ra srvs <<<"$(case_servers "$c")"
    for rep in $(seq "$REPEAT"); do
        for srv in "${srvs[@]}"; do
            has "$SERVERS" "$srv" || continue
            # A fresh server for every run: nothing cached, no group left over.
            start_server "$srv" || { printf '%s\t%s\t%s\tstart\n' "$c" "$srv" "$rep" >>"$OUT/runs.tsv"; continue; }
            run_case "$c" "$srv" "$rep"
            stop_pid "$SPID"
            SPID=""
        done
    done
    for ((i = 0; i < n; i++)); do set_loss "$TAG-c$i" 0; done
done

# ---------------------------------------------------------------------------------------------
# The table.
# ---------------------------------------------------------------------------------------------

python3 - "$OUT" "$BIG_N" "$BIG_MIB" "$SERVER_CPU" "$CLIENT_CPU" <<'PY' | tee "$OUT/table.md"
import statistics, sys
out, big_n, big_mib, scpu, ccpu = sys.argv[1:]
LABEL = {
    "c32": f"{big_n} clients, {big_mib} MiB, no timeout option",
    "c32t1": f"{big_n} clients, {big_mib} MiB, timeout 1",
    "loss5": "4 clients, 1 MiB, 5% loss on each",
    "c8": f"8 clients, {big_mib} MiB, no loss",
    "c8lossy": f"8 clients, {big_mib} MiB, first master 20% loss",
    "loss20": "4 clients (timeout 1), 1 MiB, 20% loss on each",
}
runs = {}
for line in open(f"{out}/runs.tsv"):
    f = line.rstrip("\n").split("\t")
    if len(f) < 12:
        continue
    c, srv = f[0], f[1]
    runs.setdefault((c, srv), []).append({
        "wall": float(f[5]), "ratio": int(f[6]) / int(f[4]), "ok": int(f[8]), "failed": int(f[9]),
        "with_file": int(f[10]), "durs": [float(x) for x in f[11].split(",")],
        "cpu": float(f[12]) if len(f) > 12 else 0.0,
    })

def mmm(xs, fmt="{:.2f}"):
    if not xs:
        return "-"
    return "/".join(fmt.format(x) for x in (min(xs), statistics.median(xs), max(xs)))

def med(c, srv, key):
    rs = runs.get((c, srv), [])
    return statistics.median(r[key] for r in rs) if rs else None

print()
print(f"Multicast (RFC 2090), atftp 0.8 clients in one namespace each behind a bridge, blksize 1428; "
      f"server on core {scpu}, clients on core {ccpu}. min/median/max over the runs.")
print()
print("| case | server | runs | wall s | payload / file | server CPU s | clients ok / failed |")
print("|---|---|---|---|---|---|---|")
for c in LABEL:
    for srv in ("tftpcast", "atftpd"):
        rs = runs.get((c, srv))
        if not rs:
            continue
        ok = sum(r["ok"] for r in rs)
        failed = sum(r["failed"] for r in rs)
        print(f"| {LABEL[c]} | {srv} | {len(rs)} | {mmm([r['wall'] for r in rs], '{:.1f}')} | "
              f"{mmm([r['ratio'] for r in rs])} | {mmm([r['cpu'] for r in rs])} | {ok} / {failed} |")

targets = []
def vs_atftpd(c, ratio_max, wall_max):
    t, a = med(c, "tftpcast", "wall"), med(c, "atftpd", "wall")
    r = med(c, "tftpcast", "ratio")
    if t is None or r is None:
        return
    failed = sum(x["failed"] for x in runs[(c, "tftpcast")])
    rel = t / a if a else None
    ok = r <= ratio_max and (rel is not None and rel <= wall_max) and failed == 0
    targets.append((f"{c}: payload <= {ratio_max}x, wall <= {wall_max}x atftpd's, no failure", ok,
                    f"payload {r:.2f}x, wall {t:.1f} s = {rel:.2f}x atftpd's ({a:.1f} s), {failed} failed"
                    if rel is not None else f"payload {r:.2f}x, no atftpd run"))
vs_atftpd("c32", 1.10, 0.8)
vs_atftpd("c32t1", 1.10, 0.8)
vs_atftpd("loss5", 1.25, 0.3)
if runs.get(("c8lossy", "tftpcast")) and runs.get(("c8", "tftpcast")):
    clean = statistics.median(max(r["durs"]) for r in runs[("c8", "tftpcast")])
    others = statistics.median(max(r["durs"][1:]) for r in runs[("c8lossy", "tftpcast")])
    r = med("c8lossy", "tftpcast", "ratio")
    failed = sum(x["failed"] for x in runs[("c8lossy", "tftpcast")])
    ok = others <= 1.3 * clean and r <= 1.3 and failed == 0
    targets.append(("c8lossy: the 7 others within 1.3x their loss-free time, payload <= 1.3x", ok,
                    f"others {others:.1f} s = {others / clean:.2f}x the loss-free {clean:.1f} s, payload {r:.2f}x, {failed} failed"))
if runs.get(("loss20", "tftpcast")):
    r = med("loss20", "tftpcast", "ratio")
    wf = sum(x["with_file"] for x in runs[("loss20", "tftpcast")])
    failed = sum(x["failed"] for x in runs[("loss20", "tftpcast")])
    targets.append(("loss20: payload <= 2.1x, no client fails after receiving the file", r <= 2.1 and wf == 0,
                    f"payload {r:.2f}x, {wf} failed with the whole file, {failed} failed in all"))
if targets:
    print()
    print("Targets (medians):")
    print()
    for name, ok, detail in targets:
        print(f"- {'MET    ' if ok else 'NOT MET'} {name}: {detail}")
print()
PY
log "results: $OUT"
