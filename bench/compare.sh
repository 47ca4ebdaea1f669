#!/usr/bin/env bash
# Compares tftpcast with tftpd-hpa (in.tftpd), atftpd and dnsmasq on the same machine, in
# the same run, on the same files, and prints a table with tftpcast's ratio to the best peer.
#
#   sudo bench/compare.sh            # full run (about 15-25 minutes)
#   sudo bench/compare.sh --quick    # short run (a few minutes), same scenarios, smaller
#   bench/compare.sh --help
#
# What it does:
# - builds tftpcast in release mode (and runs a copy of the binary, so a rebuild during the
#   run changes nothing);
# - fetches the peers without installing them (tftpd-hpa and atftpd conflict as packages):
#   `apt-get download` and `dpkg-deb -x` into a temporary directory, with the libraries they
#   need beside them (LD_LIBRARY_PATH); the atftp client (the RFC 2090 reference client) too;
# - creates a network namespace with `lo` up (plus 127.0.0.2, which in.tftpd wants) and runs
#   every server in it in turn, on 127.0.0.1:69, pinned to one core (--server-cpu), with the
#   load generator `tftpcast bench` pinned to another (--client-cpu);
# - scenarios (blksize 1428 where none is named, a 1 MiB file):
#     ls512   one client, lock-step, blksize 512
#     ls1428  one client, lock-step, blksize 1428
#     win     one client, blksize 8192, windowsize 16
#     c100    100 concurrent clients (distinct source addresses 127.1.x.y, as lab machines)
#     c1000   1000 concurrent clients; the server's peak RSS is sampled from /proc
#     mc      the multicast efficiency cases of bench/multicast.sh (RFC 2090, atftp clients
#             in one namespace each behind a bridge, tftpcast against atftpd, with and
#             without loss), run by that script with its own table appended below
#   and, for the one-client scenarios, a raw UDP ping-pong on the same path and core
#   placement (`tftpcast bench --raw-echo` / `--raw-pingpong`): the ceiling of lock-step;
# - prints the table and which targets of the benchmark issue are met.
#
# Everything it starts runs in namespaces it creates; an EXIT trap kills what it started (by
# PID) and deletes the namespaces. Every client run has a time limit. Root is required.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: compare.sh [options]
  --quick              short run: fewer repeats, shorter runs, smaller multicast scenario
  --scenarios LIST     comma-separated subset of: ls512,ls1428,win,c100,c1000,mc (default: all)
  --servers LIST       comma-separated subset of: tftpcast,hpa,atftpd,dnsmasq (default: all)
  --repeat N           runs per scenario and server; the median goodput is reported
  --duration S         seconds of each one-client run
  --server-cpu N       core for the servers (default 0)
  --client-cpu N       core for the clients (default 1)
  --out DIR            keep every result (JSON per run, logs, table) in DIR
  --no-build           use the already built target/release/tftpcast
  -h, --help           this text
Environment: ATFTPD_MAXTHREAD (default 100, atftpd's own default), DNSMASQ_TFTP_MAX
(default 10000; dnsmasq's default of 50 drops the rest silently).
EOF
}

QUICK=0
SCENARIOS="ls512,ls1428,win,c100,c1000,mc"
SERVERS="tftpcast,hpa,atftpd,dnsmasq"
REPEAT=""
DURATION=""
SERVER_CPU=0
CLIENT_CPU=1
OUT=""
BUILD=1
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) QUICK=1 ;;
        --scenarios) SCENARIOS=$2; shift ;;
        --servers) SERVERS=$2; shift ;;
        --repeat) REPEAT=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --server-cpu) SERVER_CPU=$2; shift ;;
        --client-cpu) CLIENT_CPU=$2; shift ;;
        --out) OUT=$2; shift ;;
        --no-build) BUILD=0 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "compare.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

ATFTPD_MAXTHREAD=${ATFTPD_MAXTHREAD:-100}
DNSMASQ_TFTP_MAX=${DNSMASQ_TFTP_MAX:-10000}
if [[ $QUICK == 1 ]]; then
    REPEAT=${REPEAT:-1}; DURATION=${DURATION:-2}
    R100=1; R1000=1
else
    REPEAT=${REPEAT:-3}; DURATION=${DURATION:-4}
    R100=3; R1000=1
fi
PORT=69
BLK=1428

SCRIPT=compare.sh
# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $(id -u) == 0 ]] || die "run as root: the benchmark builds network namespaces"
for t in ip taskset timeout apt-get dpkg-deb python3 sha256sum ps awk; do
    command -v "$t" >/dev/null || die "missing tool: $t"
done
NCPU=$(nproc --all)
(( SERVER_CPU < NCPU && CLIENT_CPU < NCPU )) || die "cores $SERVER_CPU/$CLIENT_CPU: this machine has $NCPU"
[[ $SERVER_CPU != "$CLIENT_CPU" ]] || log "warning: server and clients share core $SERVER_CPU"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tftpcast-bench.XXXXXX")
chmod 755 "$WORK"
OUT=${OUT:-$WORK/results}
mkdir -p "$OUT" "$WORK/logs"
OUT=$(cd "$OUT" && pwd)
LOGS=$WORK/logs
TAG="tcb$$"
NS="$TAG-uni"
SPID=""         # the server running now
KEEP_LOGS_IN=""
[[ $OUT == "$WORK/results" ]] || KEEP_LOGS_IN=$OUT
trap 'rc=$?; set +e; trap - EXIT INT TERM; bench_cleanup; exit $rc' EXIT
trap 'log interrupted; exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
# Build and fetch.
# ---------------------------------------------------------------------------------------------

build_tftpcast
fetch_peers

# ---------------------------------------------------------------------------------------------
# Files and the namespace.
# ---------------------------------------------------------------------------------------------

ROOT=$WORK/root
mkdir -p "$ROOT"
head -c $((1 << 20)) /dev/urandom >"$ROOT/one_mib.bin"
printf 'probe\n' >"$ROOT/probe.txt"
chmod 755 "$ROOT"
chmod 644 "$ROOT"/*
SHA_1M=$(sha256sum "$ROOT/one_mib.bin" | awk '{print $1}')

add_ns "$NS"
ip -n "$NS" addr add 127.0.0.2/8 dev lo   # in.tftpd exits 66 where 127.0.0.1 is the only address

# Starts server $1 in the namespace on core SERVER_CPU; sets SPID. Returns non-zero when it
# does not serve within 10 s.
start_server() {
    local name=$1 addr=${2:-127.0.0.1} ns=${3:-$NS} cmd
    case $name in
        tftpcast) cmd=("$BIN" serve --root "$ROOT" --listen "$addr:$PORT" --log-format json "${EXTRA_TFTPCAST[@]}") ;;
        hpa) cmd=(env LD_LIBRARY_PATH="$PEER_LD" "$HPA" -L -s -u root -a "$addr:$PORT" "$ROOT") ;;
        atftpd) cmd=(env LD_LIBRARY_PATH="$PEER_LD" "$ATFTPD" --daemon --no-fork --port "$PORT"
                     --bind-address "$addr" --user root --group root --maxthread "$ATFTPD_MAXTHREAD"
                     --logfile "$LOGS/atftpd.log" "${EXTRA_ATFTPD[@]}" "$ROOT") ;;
        dnsmasq) cmd=(env LD_LIBRARY_PATH="$PEER_LD" "$DNSMASQ" -k --conf-file=/dev/null --port=0
                      --user=root --group=root --pid-file= --enable-tftp --tftp-root="$ROOT"
                      --tftp-max="$DNSMASQ_TFTP_MAX" --listen-address="$addr" --bind-interfaces
                      --log-facility="$LOGS/dnsmasq.log") ;;
        raw) cmd=("$BIN" bench --raw-echo "$addr:$PORT") ;;
        *) die "unknown server $name" ;;
    esac
    ip netns exec "$ns" taskset -c "$SERVER_CPU" "${cmd[@]}" >>"$LOGS/$name.out" 2>&1 &
    SPID=$!
    STARTED+=("$SPID")
    local i
    for i in $(seq 40); do
        kill -0 "$SPID" 2>/dev/null || { log "$name exited at start: $(tail -3 "$LOGS/$name.out")"; SPID=""; return 1; }
        if [[ $name == raw ]]; then
            sleep 0.3; return 0
        fi
        if ip netns exec "$ns" timeout 5 "$BIN" bench --server "$addr:$PORT" --file probe.txt \
            --timeout 1 --retries 0 --json -q >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.25
    done
    log "$name does not serve on $addr:$PORT"
    stop_server
    return 1
}

stop_server() {
    stop_pid "$SPID"
    SPID=""
}

# Peak memory (KiB) of a process tree: the sum of the processes' PSS (proportional set size,
# so pages shared by forked children count once), sampled every 200 ms until $2.stop exists.
rss_sampler() {
    local pid=$1 out=$2 peak=0 now files
    while [[ ! -e $out.stop ]] && kill -0 "$pid" 2>/dev/null; do
        files=$( (echo "$pid"; descendants "$pid") | sed 's|.*|/proc/&/smaps_rollup|' | tr '\n' ' ')
        # shellcheck disable=SC2086
        now=$(awk '/^Pss:/ {s += $2} END {print s + 0}' $files 2>/dev/null || echo 0)
        (( now > peak )) && peak=$now
        echo "$peak" >"$out"
        sleep 0.2
    done
}

CLK_TCK=$(getconf CLK_TCK)

# CPU time (clock ticks) a server has used: its own, its reaped children's, and its live
# descendants' (in.tftpd forks one process per transfer).
cpu_ticks() {
    local pid=$1 files
    files=$( (echo "$pid"; descendants "$pid") | sed 's|.*|/proc/&/stat|' | tr '\n' ' ')
    # shellcheck disable=SC2086
    awk -v root="$pid" '{
            sub(/^.*\) /, "")   # fields after "(comm) " start at field 3 (state)
            t += $12 + $13
            if (FILENAME == "/proc/" root "/stat") t += $14 + $15
        } END { print t + 0 }' $files 2>/dev/null || echo 0
}

# One run of `tftpcast bench` in the namespace on core CLIENT_CPU.
# usage: bench_run SCENARIO SERVER REP LIMIT_S ARGS...
bench_run() {
    local sc=$1 srv=$2 rep=$3 limit=$4 rc=0
    shift 4
    local out="$OUT/$sc.$srv.$rep.json" cpu0 cpu1
    cpu0=$(cpu_ticks "$SPID")
    timeout -k 5 "$limit" ip netns exec "$NS" taskset -c "$CLIENT_CPU" "$BIN" bench \
        --server "127.0.0.1:$PORT" --json -q "$@" >"$out" 2>"$out.err" || rc=$?
    cpu1=$(cpu_ticks "$SPID")
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$sc" "$srv" "$rep" "$rc" "$out" \
        "$(awk -v a="$cpu0" -v b="$cpu1" -v hz="$CLK_TCK" 'BEGIN {printf "%.3f", (b - a) / hz}')" >>"$OUT/runs.tsv"
    local summary
    summary=$(python3 -c 'import json,sys
try:
    v = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
    print("%.1f MiB/s, %d ok, %d failed %s" % (v["goodput_mib_s"], v["ok"], v["failed"], v["failures"] or ""))
except Exception:
    print("no result")' "$out")
    log "  $sc $srv #$rep: $summary (exit $rc)"
}

: >"$OUT/runs.tsv"
: >"$OUT/extra.tsv"
EXTRA_TFTPCAST=()
EXTRA_ATFTPD=()

ONE="--file one_mib.bin --expect-sha256 $SHA_1M"

# ---------------------------------------------------------------------------------------------
# Unicast scenarios, scenario by scenario, every server in turn (so slow drifts of the machine
# spread over all servers rather than hitting one).
# ---------------------------------------------------------------------------------------------

scenario_args() {
    case $1 in
        ls512) echo "--clients 1 --blksize 512 --duration $DURATION" ;;
        ls1428) echo "--clients 1 --blksize 1428 --duration $DURATION" ;;
        win) echo "--clients 1 --blksize 8192 --windowsize 16 --duration $DURATION" ;;
        c100) echo "--clients 100 --blksize $BLK --rounds $R100 --source-base 127.1.0.1 --transfer-limit 120" ;;
        c1000) echo "--clients 1000 --blksize $BLK --rounds $R1000 --source-base 127.1.0.1 --transfer-limit 240" ;;
    esac
}

scenario_limit() {
    case $1 in
        ls512|ls1428|win) echo $((DURATION + 90)) ;;
        c100) echo 400 ;;
        c1000) echo 600 ;;
    esac
}

for sc in ls512 ls1428 win c100 c1000; do
    has "$SCENARIOS" "$sc" || continue
    log "scenario $sc: $(scenario_args "$sc")"
    servers=$SERVERS
    case $sc in ls512|ls1428|win) servers="raw,$SERVERS" ;; esac
    for rep in $(seq "$REPEAT"); do
        [[ $sc == c1000 && $rep -gt 1 ]] && break   # one run: it is long, and RSS is per run
        IFS=, read -ra list <<<"$servers"
        for srv in "${list[@]}"; do
            start_server "$srv" || { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$sc" "$srv" "$rep" "start" "-" "0" >>"$OUT/runs.tsv"; continue; }
            sampler=""
            if [[ $sc == c1000 ]]; then
                rss_sampler "$SPID" "$OUT/$sc.$srv.rss" &
                sampler=$!
                taskset -p -c "$CLIENT_CPU" "$sampler" >/dev/null 2>&1 || true
            fi
            # shellcheck disable=SC2046
            if [[ $srv == raw ]]; then
                bench_run "$sc" "$srv" "$rep" "$(scenario_limit "$sc")" --raw-pingpong --raw-size $((1 << 20)) $(scenario_args "$sc")
            else
                bench_run "$sc" "$srv" "$rep" "$(scenario_limit "$sc")" $ONE $(scenario_args "$sc")
            fi
            if [[ -n $sampler ]]; then
                touch "$OUT/$sc.$srv.rss.stop"
                wait "$sampler" 2>/dev/null || true
                hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$SPID/status" 2>/dev/null || echo 0)
                printf 'rss\t%s\t%s\t%s\n' "$srv" "$(cat "$OUT/$sc.$srv.rss" 2>/dev/null || echo 0)" "${hwm:-0}" >>"$OUT/extra.tsv"
            fi
            if ! kill -0 "$SPID" 2>/dev/null; then
                log "  $srv died during $sc: $(tail -2 "$LOGS/$srv.out" | tr '\n' ' ')"
                printf 'died\t%s\t%s\n' "$srv" "$sc" >>"$OUT/extra.tsv"
            fi
            stop_server
        done
    done
done

# ---------------------------------------------------------------------------------------------
# Multicast: bench/multicast.sh on the same binary (its own lab, one namespace per client).
# ---------------------------------------------------------------------------------------------

if has "$SCENARIOS" mc; then
    log "scenario mc: bench/multicast.sh"
    mc_args=(--no-build --out "$OUT/multicast" --server-cpu "$SERVER_CPU" --client-cpu "$CLIENT_CPU")
    [[ $QUICK == 1 ]] && mc_args+=(--quick)
    # It builds nothing: the release binary compare.sh built is the one it runs.
    "$REPO/bench/multicast.sh" "${mc_args[@]}" >"$LOGS/multicast.out" 2>&1 ||
        log "bench/multicast.sh failed: $(tail -3 "$LOGS/multicast.out")"
fi

# ---------------------------------------------------------------------------------------------
# The table.
# ---------------------------------------------------------------------------------------------

python3 - "$OUT" "$QUICK" "$SERVER_CPU" "$CLIENT_CPU" "$(nproc --all)" <<'PY' | tee "$OUT/table.md"
import json, os, statistics, sys

out, quick, scpu, ccpu, ncpu = sys.argv[1:6]
NAMES = {"raw": "raw UDP", "tftpcast": "tftpcast", "hpa": "in.tftpd", "atftpd": "atftpd", "dnsmasq": "dnsmasq"}
PEERS = ["hpa", "atftpd", "dnsmasq"]
LABEL = {
    "ls512": "1 client lock-step, blksize 512",
    "ls1428": "1 client lock-step, blksize 1428",
    "win": "1 client, blksize 8192, windowsize 16",
    "c100": "100 clients, 1 MiB, blksize 1428",
    "c1000": "1000 clients, 1 MiB, blksize 1428",
}

runs = {}
for line in open(os.path.join(out, "runs.tsv")):
    sc, srv, rep, rc, path, cpu = line.rstrip("\n").split("\t")
    v = None
    if rc != "start" and os.path.exists(path):
        try:
            v = json.loads(open(path).read().strip().splitlines()[-1])
            v["server_cpu_s"] = float(cpu)
        except Exception:
            v = None
    runs.setdefault((sc, srv), []).append((rc, v))

extra = [l.rstrip("\n").split("\t") for l in open(os.path.join(out, "extra.tsv"))]
rss = {e[1]: (int(e[2] or 0), int(e[3] or 0)) for e in extra if e[0] == "rss"}
died = {(e[1], e[2]) for e in extra if e[0] == "died"}

def cell(sc, srv):
    """(median goodput or None, failed, transfers, text)"""
    rs = runs.get((sc, srv))
    if not rs:
        return None, 0, 0, "-"
    good = [v["goodput_mib_s"] for rc, v in rs if v]
    failed = sum(v["failed"] for rc, v in rs if v)
    total = sum(v["transfers"] for rc, v in rs if v)
    notes = []
    if any(rc == "start" for rc, v in rs):
        notes.append("did not start")
    if any(rc == "124" for rc, v in rs):
        notes.append("run timed out")
    if (srv, sc) in died:
        notes.append("server died")
    if not good:
        return None, failed, total, "; ".join(notes) or "no result"
    g = statistics.median(good)
    text = f"{g:.1f}"
    if srv != "raw":
        text += f" ({failed}/{total} failed)" if failed else " (0 failed)"
    if notes:
        text += " [" + "; ".join(notes) + "]"
    return g, failed, total, text

rows = []
targets = []
print()
print(f"tftpcast bench comparison ({'quick' if quick == '1' else 'full'} run): goodput in MiB/s, "
      f"median of the runs; servers on core {scpu}, clients on core {ccpu} of {ncpu}.")
print()
hdr = ["scenario", "raw UDP", "tftpcast", "in.tftpd", "atftpd", "dnsmasq", "tftpcast / best peer", "tftpcast / raw"]
if runs:
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
for sc in ["ls512", "ls1428", "win", "c100", "c1000"]:
    if not any(k[0] == sc for k in runs):
        continue
    cells = {s: cell(sc, s) for s in ["raw", "tftpcast"] + PEERS}
    t = cells["tftpcast"][0]
    peer_vals = [(cells[p][0], p) for p in PEERS if cells[p][0] is not None]
    best = max(peer_vals) if peer_vals else None
    ratio = f"{t / best[0]:.2f}x {NAMES[best[1]]}" if t and best and best[0] > 0 else "-"
    raw = cells["raw"][0]
    rr = f"{t / raw:.2f}" if t and raw else "-"
    print("| " + " | ".join([LABEL[sc]] + [cells[s][3] for s in ["raw", "tftpcast"] + PEERS] + [ratio, rr]) + " |")
    tf_failed = cells["tftpcast"][1]
    if sc in ("ls512", "ls1428"):
        ok = t is not None and raw and t >= 0.95 * raw and (best is None or t >= best[0])
        targets.append((f"{sc}: >= 0.95x raw ping-pong and >= best peer", ok,
                        f"{rr} of raw, {ratio}"))
    elif sc == "win":
        a = cells["atftpd"][0]
        ok = t is not None and a is not None and t >= 1.2 * a
        targets.append(("win: >= 1.2x atftpd", ok, f"{t / a:.2f}x atftpd" if t and a else "no result"))
    elif sc == "c100":
        ok = t is not None and tf_failed == 0 and best is not None and t >= 2 * best[0]
        targets.append(("c100: zero failures and >= 2x best peer", ok, f"{tf_failed} failed, {ratio}"))
    elif sc == "c1000":
        d = cells["dnsmasq"][0]
        r = rss.get("tftpcast", (0, 0))
        peak = max(r) / 1024
        ok = t is not None and tf_failed == 0 and d is not None and t >= 1.5 * d and 0 < peak < 200
        targets.append(("c1000: zero failures, >= 1.5x dnsmasq, RSS < 200 MiB", ok,
                        f"{tf_failed} failed, {t / d:.2f}x dnsmasq, peak RSS {peak:.1f} MiB" if t and d else "no result"))

if runs:
    print()
    print("Server CPU time per MiB delivered (ms; median of the runs; user + system time of the server "
          "process, from /proc; less sensitive to other load on the machine than goodput; n/a for in.tftpd, "
          "which forks an unaccounted process per transfer):")
    print()
    print("| scenario | " + " | ".join(NAMES[s] for s in ["raw", "tftpcast"] + PEERS) + " |")
    print("|---|" + "---|" * 5)
    for sc in ["ls512", "ls1428", "win", "c100", "c1000"]:
        if not any(k[0] == sc for k in runs):
            continue
        row = []
        for s in ["raw", "tftpcast"] + PEERS:
            if s == "hpa":
                row.append("n/a")
                continue
            vals = [v["server_cpu_s"] * 1000 / (v["bytes"] / 2**20)
                    for rc, v in runs.get((sc, s), []) if v and v["bytes"] > 0]
            row.append(f"{statistics.median(vals):.2f}" if vals else "-")
        print(f"| {LABEL[sc]} | " + " | ".join(row) + " |")

if rss:
    print()
    print("Server memory in the 1000-client run (peak PSS of the server's process tree, forked children "
          "included, sampled every 200 ms; peak RSS (VmHWM) of the main process):")
    print()
    print("| server | peak PSS, tree | VmHWM, main process |")
    print("|---|---|---|")
    for s in ["tftpcast"] + PEERS:
        if s in rss:
            tree, hwm = rss[s]
            print(f"| {NAMES[s]} | {tree / 1024:.1f} MiB | {hwm / 1024:.1f} MiB |")

if targets:
    print()
    print("Targets of the benchmark issue:")
    print()
    for name, ok, detail in targets:
        print(f"- {'MET    ' if ok else 'NOT MET'} {name}: {detail}")
print()
PY
if [[ -f $OUT/multicast/table.md ]]; then
    tee -a "$OUT/table.md" <"$OUT/multicast/table.md"
fi

log "results: $OUT"
