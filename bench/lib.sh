# Shared helpers of the benchmark scripts (sourced, not run). The caller sets SCRIPT (its name
# for log lines), WORK (a private temporary directory), LOGS, and calls `bench_traps` once.
#
# What is here: logging, process trees (kill what we started, children included), namespaces
# we create (deleted on exit), the release build of tftpcast copied aside, and the peers
# (tftpd-hpa, atftpd, dnsmasq, the atftp client) fetched with `apt-get download` and unpacked,
# never installed: tftpd-hpa and atftpd conflict as packages.

log() { printf '%s %s: %s\n' "$(date +%H:%M:%S)" "${SCRIPT:-bench}" "$*" >&2; }
die() { log "error: $*"; exit 1; }
has() { [[ ",$1," == *",$2,"* ]]; }

NAMESPACES=()
STARTED=()      # PIDs of every long-running process the script started

# All descendants of a PID (children first found, breadth first).
descendants() {
    ps -e -o pid=,ppid= | awk -v root="$1" '
        { parent[$1] = $2; pids[NR] = $1 }
        END {
            want[root] = 1; changed = 1
            while (changed) {
                changed = 0
                for (i in pids) { p = pids[i]; if (!(p in want) && (parent[p] in want)) { want[p] = 1; changed = 1 } }
            }
            for (p in want) if (p != root) print p
        }'
}

# Signals a process we started and everything it forked.
kill_tree() {
    local pid=$1 sig=${2:-TERM} d
    d=$(descendants "$pid" | tr '\n' ' ')
    # shellcheck disable=SC2086
    kill "-$sig" "$pid" $d 2>/dev/null || true
}

stop_pid() {
    local pid=$1 i
    [[ -n $pid ]] || return 0
    kill_tree "$pid" TERM
    for i in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill_tree "$pid" KILL
    wait "$pid" 2>/dev/null || true
    # Stopped: the exit trap must not signal whatever reuses the PID later.
    local kept=() p
    for p in "${STARTED[@]}"; do [[ $p == "$pid" ]] || kept+=("$p"); done
    STARTED=("${kept[@]}")
}

# Kills what we started, deletes our namespaces. KEEP_LOGS_IN: copy the logs there first.
bench_cleanup() {
    local pid ns p
    for pid in "${STARTED[@]}"; do
        kill -0 "$pid" 2>/dev/null && stop_pid "$pid"
    done
    for ns in "${NAMESPACES[@]}"; do
        # Whatever still runs in a namespace we made is ours.
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
        ip netns delete "$ns" 2>/dev/null
    done
    if [[ -n ${KEEP_LOGS_IN:-} && -d ${LOGS:-} ]]; then
        cp -r "$LOGS" "$KEEP_LOGS_IN/logs" 2>/dev/null
    fi
    [[ -n ${WORK:-} ]] && rm -rf "$WORK"
}

bench_traps() {
    trap 'rc=$?; set +e; trap - EXIT INT TERM; bench_cleanup; exit $rc' EXIT
    trap 'log interrupted; exit 130' INT TERM
}

add_ns() {
    ip netns add "$1"
    NAMESPACES+=("$1")
    ip -n "$1" link set lo up
}

# Builds tftpcast (unless BUILD=0) and copies the binary to $WORK/bin; sets BIN.
build_tftpcast() {
    local repo target
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    if [[ ${BUILD:-1} == 1 ]]; then
        log "building tftpcast (release)"
        (cd "$repo" && cargo build --release --locked --bin tftpcast >&2)
    fi
    target=$(cd "$repo" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
    mkdir -p "$WORK/bin"
    cp "$target/release/tftpcast" "$WORK/bin/tftpcast"
    BIN=$WORK/bin/tftpcast
}

# Fetches and unpacks the peers; sets HPA, ATFTPD, DNSMASQ, ATFTP and PEER_LD (their
# libraries, for LD_LIBRARY_PATH). Arguments: only these packages (then only the binaries
# they hold are checked); none: all the peers.
fetch_peers() {
    local pkgs=("$@") deb b missing
    (( ${#pkgs[@]} )) || pkgs=(tftpd-hpa atftpd dnsmasq-base atftp libwrap0 libnetfilter-conntrack3 libnfnetlink0)
    log "fetching peers: ${pkgs[*]} (apt-get download, unpacked, not installed)"
    mkdir -p "$WORK/debs" "$WORK/peers"
    chmod 777 "$WORK/debs"
    if ! (cd "$WORK/debs" && timeout 300 apt-get download "${pkgs[@]}" >"$LOGS/apt.log" 2>&1); then
        log "apt-get download failed; running apt-get update once"
        timeout 600 apt-get update -qq >>"$LOGS/apt.log" 2>&1 || true
        (cd "$WORK/debs" && timeout 300 apt-get download "${pkgs[@]}" >>"$LOGS/apt.log" 2>&1) ||
            die "apt-get download failed: $(tail -3 "$LOGS/apt.log")"
    fi
    for deb in "$WORK"/debs/*.deb; do dpkg-deb -x "$deb" "$WORK/peers"; done
    PEER_LD=$(find "$WORK/peers" -name '*.so*' -printf '%h\n' | sort -u | paste -sd:)
    HPA=$WORK/peers/usr/sbin/in.tftpd
    ATFTPD=$WORK/peers/usr/sbin/atftpd
    DNSMASQ=$WORK/peers/usr/sbin/dnsmasq
    ATFTP=$WORK/peers/usr/bin/atftp
    for b in "$HPA" "$ATFTPD" "$DNSMASQ" "$ATFTP"; do
        [[ $# -gt 0 && ! -e $b ]] && continue
        missing=$(LD_LIBRARY_PATH=$PEER_LD ldd "$b" | awk '/not found/ {print $1}' | paste -sd' ')
        [[ -z $missing ]] || die "$(basename "$b") needs libraries that are not here: $missing"
    done
}
