#!/usr/bin/env bash
# cluster-lab.sh: a tftpcast cluster behind one service address, in network namespaces.
#
# Builds on one machine what DESIGN.md section 5 describes for production: several nodes
# that all hold the service address (VIP) on their loopback, a router that spreads clients
# over them with an ECMP route hashed on addresses only, and a shared L2 segment (a bridge)
# on which multicast groups reach every client. Needs root, `ip` (iproute2), `sysctl` and,
# for `tbf`, `tc`. Nothing is created in the root namespace: every veth is created inside
# the bridge namespace with its peer moved straight into the host's namespace.
#
# Usage:
#   cluster-lab.sh up PREFIX SUBNET [NODES] [CLIENTS]   build the lab (NODES default 3,
#                                                       CLIENTS default 2)
#   cluster-lab.sh down PREFIX                          delete it (idempotent)
#   cluster-lab.sh route-del PREFIX NODE_INDEX          withdraw node i's nexthop from the
#                                                       ECMP route, as a health check would
#   cluster-lab.sh route-add PREFIX NODE_INDEX          put node i's nexthop back
#   cluster-lab.sh tbf PREFIX NODE_INDEX RATE           limit node i's link (e.g. 50mbit)
#   cluster-lab.sh hash PREFIX CLIENT_INDEX             which node (index) the router sends
#                                                       client i to now (`ip route get`)
#   cluster-lab.sh status PREFIX                        show namespaces, route, addresses
#
# PREFIX: letters and digits, at most 10 (it names the namespaces: PREFIX-br, PREFIX-rt,
# PREFIX-n1.., PREFIX-c1..). SUBNET: two octets, e.g. 10.61, meaning:
#   SUBNET.0.0/24      the shared bridge
#   SUBNET.0.254       router (namespace PREFIX-rt)
#   SUBNET.0.1 ..      nodes (PREFIX-n1 ..), at most 9
#   SUBNET.0.11 ..     clients (PREFIX-c1 ..), at most 200
#   SUBNET.100.1       the service address (VIP): on every node's lo; clients reach it
#                      through the router, whose route to it has one nexthop per node
#
# Why each knob:
# - router: ip_forward=1; fib_multipath_hash_policy=0 hashes (source, destination) address
#   only, so every packet of one client, to any port of the VIP, reaches the same node;
#   send_redirects=0 because clients, router and nodes share one segment (the router would
#   otherwise tell clients to talk to a node directly, bypassing the ECMP choice).
# - nodes: the VIP on lo (not on v0) with arp_ignore=1/arp_announce=2, so no node answers
#   or advertises the VIP on the segment (the "direct routing" setup of load balancers);
#   rp_filter=0 since replies leave from the VIP straight to the client while requests came
#   through the router; 224.0.0.0/4 via v0 so group DATA goes out on the bridge.
# - clients: VIP/32 via the router; 224.0.0.0/4 via v0 so group membership (IGMP) and
#   group DATA use the lab's segment. The bridge has multicast snooping off: every port
#   sees every group.
#
# Run three nodes in it (the binary path is yours; the key comes from the environment,
# never from a flag; --tid-port-range must be disjoint per node):
#
#   deploy/cluster-lab.sh up lab 10.61 3 4
#   export TFTPCAST_CLUSTER__KEY=change-me
#   ip netns exec lab-n1 tftpcast serve --root /srv/tftp --listen 10.61.100.1:69 \
#       --node-id n1 --cluster-listen 10.61.0.1:7946 --advertise 10.61.0.1:7946 \
#       --peer 10.61.0.2:7946 --peer 10.61.0.3:7946 --tid-port-range 40000-40999 \
#       --multicast-interface 10.61.0.1 &
#   ip netns exec lab-n2 tftpcast serve --root /srv/tftp --listen 10.61.100.1:69 \
#       --node-id n2 --cluster-listen 10.61.0.2:7946 --advertise 10.61.0.2:7946 \
#       --peer 10.61.0.1:7946 --peer 10.61.0.3:7946 --tid-port-range 41000-41999 \
#       --multicast-interface 10.61.0.2 &
#   ip netns exec lab-n3 tftpcast serve --root /srv/tftp --listen 10.61.100.1:69 \
#       --node-id n3 --cluster-listen 10.61.0.3:7946 --advertise 10.61.0.3:7946 \
#       --peer 10.61.0.1:7946 --peer 10.61.0.2:7946 --tid-port-range 42000-42999 \
#       --multicast-interface 10.61.0.3 &
#   ip netns exec lab-c1 atftp --option multicast --option "blksize 1428" \
#       --option "timeout 1" -g -r FILE -l /tmp/out 10.61.100.1 69
#   deploy/cluster-lab.sh route-del lab 2      # node 2 "fails its health check"
#   deploy/cluster-lab.sh down lab
#
# A `down` deletes the namespaces; stop the servers first (a process keeps its namespace
# alive after `ip netns del`, though no longer reachable by name).

set -euo pipefail

PROG=${0##*/}

die() {
    echo "$PROG: $*" >&2
    exit 2
}

usage() {
    sed -n '3,/^set -euo/p' "$0" | sed -n 's/^# \{0,1\}//p' >&2
    exit 2
}

check_prefix() {
    [[ $1 =~ ^[A-Za-z0-9]{1,10}$ ]] || die "PREFIX must be 1-10 letters/digits: '$1'"
}

check_subnet() {
    [[ $1 =~ ^([0-9]{1,3})\.([0-9]{1,3})$ ]] || die "SUBNET must be two octets like 10.61: '$1'"
    ((BASH_REMATCH[1] <= 255 && BASH_REMATCH[2] <= 255)) || die "SUBNET octet out of range: '$1'"
}

check_index() {
    [[ $1 =~ ^[1-9]$ ]] || die "NODE_INDEX must be 1-9: '$1'"
}

ns_exists() {
    ip netns list | awk '{print $1}' | grep -qx -- "$1"
}

# The lab's namespaces, by name pattern (so `down` needs nothing but the prefix).
lab_namespaces() {
    ip netns list | awk '{print $1}' | grep -E -- "^$1-(br|rt|n[0-9]+|c[0-9]+)\$" || true
}

in_ns() {
    local ns=$1
    shift
    ip netns exec "$ns" "$@"
}

sysctl_in() {
    local ns=$1
    shift
    local kv
    for kv in "$@"; do
        in_ns "$ns" sysctl -qw "$kv" >/dev/null
    done
}

# Reads the lab's SUBNET back from the router (so helpers need only PREFIX).
lab_subnet() {
    local p=$1 a
    a=$(ip -n "$p-rt" -4 -o addr show dev v0 2>/dev/null | awk '{print $4}' | head -n1)
    [[ -n $a ]] || die "no lab '$p' (router namespace $p-rt missing)"
    a=${a%/*}
    echo "${a%.*.*}"
}

lab_vip() {
    echo "$(lab_subnet "$1").100.1"
}

# Current ECMP nexthops (gateway addresses) of the router's route to the VIP.
nexthops() {
    local p=$1 vip=$2
    ip -n "$p-rt" -4 route show "$vip/32" | tr -s ' \t' '\n\n' | awk 'prev == "via" {print} {prev = $0}'
}

set_route() {
    local p=$1 vip=$2
    shift 2
    local args=() gw
    if (($# == 0)); then
        ip -n "$p-rt" route del "$vip/32" 2>/dev/null || true
        echo "router: no nexthop left for $vip (route removed)"
        return
    fi
    if (($# == 1)); then
        ip -n "$p-rt" route replace "$vip/32" via "$1" dev v0
    else
        for gw in "$@"; do
            args+=(nexthop via "$gw" dev v0)
        done
        ip -n "$p-rt" route replace "$vip/32" "${args[@]}"
    fi
    echo "router: $vip via $*"
}

# veth pair: PORT in the bridge namespace (enslaved to br0), v0 in namespace NS.
attach() {
    local br=$1 port=$2 ns=$3 addr=$4
    ip -n "$br" link add "$port" type veth peer name v0 netns "$ns"
    ip -n "$br" link set "$port" master br0
    ip -n "$br" link set "$port" up
    ip -n "$ns" addr add "$addr/24" dev v0
    ip -n "$ns" link set v0 up
    ip -n "$ns" link set lo up
}

cmd_up() {
    (($# >= 2 && $# <= 4)) || usage
    local p=$1 subnet=$2 nodes=${3:-3} clients=${4:-2}
    check_prefix "$p"
    check_subnet "$subnet"
    [[ $nodes =~ ^[1-9]$ ]] || die "NODES must be 1-9: '$nodes'"
    [[ $clients =~ ^[0-9]+$ ]] && ((clients <= 200)) || die "CLIENTS must be 0-200: '$clients'"
    [[ -z $(lab_namespaces "$p") ]] || die "a lab named '$p' exists already; run: $PROG down $p"
    local net="$subnet.0" vip="$subnet.100.1" br="$p-br" rt="$p-rt" i ns gws=()

    # From here on, a failure (set -e exits) deletes whatever was made.
    UP_PREFIX=$p
    trap 'rc=$?; if ((rc != 0)); then echo "$PROG: up failed; deleting lab $UP_PREFIX" >&2; cmd_down "$UP_PREFIX" >/dev/null 2>&1 || true; fi' EXIT

    ip netns add "$br"
    ip -n "$br" link set lo up
    ip -n "$br" link add br0 type bridge
    ip -n "$br" link set br0 type bridge mcast_snooping 0
    ip -n "$br" link set br0 up

    # Router.
    ip netns add "$rt"
    attach "$br" rt "$rt" "$net.254"
    sysctl_in "$rt" net.ipv4.ip_forward=1 net.ipv4.fib_multipath_hash_policy=0 \
        net.ipv4.conf.all.send_redirects=0 net.ipv4.conf.default.send_redirects=0 \
        net.ipv4.conf.v0.send_redirects=0 net.ipv4.conf.all.rp_filter=0 \
        net.ipv4.conf.default.rp_filter=0 net.ipv4.conf.v0.rp_filter=0

    # Nodes.
    for ((i = 1; i <= nodes; i++)); do
        ns="$p-n$i"
        ip netns add "$ns"
        attach "$br" "n$i" "$ns" "$net.$i"
        ip -n "$ns" addr add "$vip/32" dev lo
        ip -n "$ns" route add 224.0.0.0/4 dev v0
        sysctl_in "$ns" net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
            net.ipv4.conf.v0.rp_filter=0 net.ipv4.conf.all.arp_ignore=1 \
            net.ipv4.conf.all.arp_announce=2 net.ipv4.conf.v0.arp_ignore=1 \
            net.ipv4.conf.v0.arp_announce=2
        gws+=("$net.$i")
    done

    # Clients.
    for ((i = 1; i <= clients; i++)); do
        ns="$p-c$i"
        ip netns add "$ns"
        attach "$br" "c$i" "$ns" "$net.$((10 + i))"
        ip -n "$ns" route add "$vip/32" via "$net.254" dev v0
        ip -n "$ns" route add 224.0.0.0/4 dev v0
        sysctl_in "$ns" net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
            net.ipv4.conf.v0.rp_filter=0 net.ipv4.conf.all.accept_redirects=0 \
            net.ipv4.conf.v0.accept_redirects=0
    done

    set_route "$p" "$vip" "${gws[@]}" >/dev/null
    trap - EXIT

    echo "lab $p: bridge $br (br0, $net.0/24, mcast_snooping 0)"
    echo "  router  $rt  $net.254  ECMP $vip/32 via ${gws[*]} (hash policy 0: addresses only)"
    for ((i = 1; i <= nodes; i++)); do
        echo "  node    $p-n$i  $net.$i  (VIP $vip on lo)"
    done
    for ((i = 1; i <= clients; i++)); do
        echo "  client  $p-c$i  $net.$((10 + i))  ($vip via $net.254)"
    done
}

cmd_down() {
    (($# == 1)) || usage
    local p=$1 ns n=0
    check_prefix "$p"
    # Bridge last: deleting a host namespace deletes its veth and the bridge port with it.
    for ns in $(lab_namespaces "$p" | grep -v -- "-br\$"; lab_namespaces "$p" | grep -- "-br\$"); do
        if ip netns del "$ns" 2>/dev/null; then
            n=$((n + 1))
        fi
    done
    echo "lab $p: deleted $n namespace(s)"
}

cmd_route() {
    (($# == 3)) || usage
    local op=$1 p=$2 idx=$3
    check_prefix "$p"
    check_index "$idx"
    local subnet vip gw keep=() g
    subnet=$(lab_subnet "$p")
    vip="$subnet.100.1"
    gw="$subnet.0.$idx"
    for g in $(nexthops "$p" "$vip"); do
        [[ $g == "$gw" ]] || keep+=("$g")
    done
    if [[ $op == add ]]; then
        ns_exists "$p-n$idx" || die "no node namespace $p-n$idx"
        keep+=("$gw")
        mapfile -t keep < <(printf '%s\n' "${keep[@]}" | sort -t. -k4,4n)
    fi
    set_route "$p" "$vip" "${keep[@]+"${keep[@]}"}"
}

cmd_tbf() {
    (($# == 3)) || usage
    local p=$1 idx=$2 rate=$3
    check_prefix "$p"
    check_index "$idx"
    [[ $rate =~ ^[0-9]+(\.[0-9]+)?([kmg]?bit|[kmg]?bps)?$ ]] || die "bad RATE '$rate' (e.g. 50mbit)"
    ns_exists "$p-n$idx" || die "no node namespace $p-n$idx"
    ip netns exec "$p-n$idx" tc qdisc replace dev v0 root tbf rate "$rate" burst 32kb latency 50ms
    echo "node $p-n$idx: v0 limited to $rate (tbf, burst 32kb, latency 50ms)"
}

cmd_hash() {
    (($# == 2)) || usage
    local p=$1 idx=$2 subnet gw
    check_prefix "$p"
    [[ $idx =~ ^[1-9][0-9]{0,2}$ ]] && ((idx <= 200)) || die "CLIENT_INDEX must be 1-200: '$idx'"
    subnet=$(lab_subnet "$p")
    # The router's own lookup for a packet from that client arriving on its segment: the same
    # multipath hash as for forwarded packets (policy 0 hashes the two addresses only).
    gw=$(ip -n "$p-rt" -4 route get "$subnet.100.1" from "$subnet.0.$((10 + idx))" iif v0 |
        tr -s ' \t' '\n\n' | awk 'prev == "via" {print; exit} {prev = $0}')
    [[ -n $gw ]] || die "the router has no route to $subnet.100.1"
    echo "${gw##*.}"
}

cmd_status() {
    (($# == 1)) || usage
    local p=$1 ns vip
    check_prefix "$p"
    vip=$(lab_vip "$p")
    echo "lab $p, VIP $vip"
    ip -n "$p-rt" route show "$vip/32" | sed 's/^/  router: /'
    for ns in $(lab_namespaces "$p"); do
        [[ $ns == "$p-br" ]] && continue
        echo "  $ns: $(ip -n "$ns" -4 -o addr show | awk '$2 != "lo" || $4 !~ /^127\./ {printf "%s %s  ", $2, $4}')"
    done
}

(($# >= 1)) || usage
cmd=$1
shift
case $cmd in
up) cmd_up "$@" ;;
down) cmd_down "$@" ;;
route-del) cmd_route del "$@" ;;
route-add) cmd_route add "$@" ;;
tbf) cmd_tbf "$@" ;;
hash) cmd_hash "$@" ;;
status) cmd_status "$@" ;;
-h | --help | help) usage ;;
*) die "unknown command '$cmd' (up, down, route-del, route-add, tbf, hash, status)" ;;
esac
