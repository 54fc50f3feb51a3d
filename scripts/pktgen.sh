#!/usr/bin/env bash
# Drive the kernel's pktgen (CONFIG_NET_PKTGEN) to send UDP at line rate out
# of a real NIC toward a pop-forwarder box: one kpktgend thread per CPU given,
# destinations spread over a range, source ports over flows.
#
#   scripts/pktgen.sh -i eth1 -d 198.51.100.1 -m 0c:42:a1:00:00:01 \
#       [-c 4096] [-s 64] [-n 10000000] [-t 2] [-p 1024] [--dry-run]
#
# --dry-run prints every write to /proc/net/pktgen instead of doing it; it
# needs no pktgen module (this project's CI machines have none).
# Docs: https://docs.kernel.org/networking/pktgen.html
set -euo pipefail

usage() {
    cat >&2 <<'EOF'
usage: pktgen.sh -i DEV -d DST_IP -m DST_MAC [options]
  -i DEV       egress interface
  -d DST_IP    first IPv4 destination
  -m DST_MAC   next hop's MAC (the forwarder's ingress NIC)
  -c COUNT     destinations, consecutive from DST_IP (default 4096)
  -s SIZE      frame size in bytes, 64..9000 (default 64)
  -n PACKETS   packets per thread, 0 = until stopped (default 10000000)
  -t THREADS   kpktgend threads, one per CPU from 0 (default 1)
  -p PORTS     UDP source ports, from 1024 (default 1024)
  --dry-run    print the /proc/net/pktgen writes instead of doing them
EOF
    exit 2
}

die() {
    echo "pktgen.sh: $*" >&2
    exit 1
}

dev="" dst="" mac="" count=4096 size=64 packets=10000000 threads=1 ports=1024 dry_run=0
while [ $# -gt 0 ]; do
    case "$1" in
    -i) dev="${2:-}"; shift 2 || usage ;;
    -d) dst="${2:-}"; shift 2 || usage ;;
    -m) mac="${2:-}"; shift 2 || usage ;;
    -c) count="${2:-}"; shift 2 || usage ;;
    -s) size="${2:-}"; shift 2 || usage ;;
    -n) packets="${2:-}"; shift 2 || usage ;;
    -t) threads="${2:-}"; shift 2 || usage ;;
    -p) ports="${2:-}"; shift 2 || usage ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage ;;
    *) echo "pktgen.sh: unknown argument: $1" >&2; usage ;;
    esac
done

[ -n "$dev" ] || die "-i DEV is required"
[ -n "$dst" ] || die "-d DST_IP is required"
[ -n "$mac" ] || die "-m DST_MAC is required"
[[ "$dev" =~ ^[^/[:space:]]{1,15}$ ]] || die "-i: '$dev' is not an interface name"
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
ip_to_int() {
    local IFS=. a b c d
    read -r a b c d <<<"$1"
    echo $(((a << 24) | (b << 16) | (c << 8) | d))
}
int_to_ip() { echo "$((($1 >> 24) & 255)).$((($1 >> 16) & 255)).$((($1 >> 8) & 255)).$(($1 & 255))"; }
if ! [[ "$dst" =~ ^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$ ]] ||
    [ "${BASH_REMATCH[1]}" -gt 255 ] || [ "${BASH_REMATCH[2]}" -gt 255 ] ||
    [ "${BASH_REMATCH[3]}" -gt 255 ] || [ "${BASH_REMATCH[4]}" -gt 255 ]; then
    die "-d: '$dst' is not an IPv4 address"
fi
[[ "$mac" =~ ^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$ ]] || die "-m: '$mac' is not a MAC address (aa:bb:cc:dd:ee:ff)"
{ is_uint "$count" && [ "$count" -ge 1 ] && [ "$count" -le 16777216 ]; } || die "-c: '$count' is not a count from 1 to 16777216"
{ is_uint "$size" && [ "$size" -ge 64 ] && [ "$size" -le 9000 ]; } || die "-s: '$size' is not a frame size from 64 to 9000"
is_uint "$packets" || die "-n: '$packets' is not a packet count"
{ is_uint "$threads" && [ "$threads" -ge 1 ] && [ "$threads" -le 256 ]; } || die "-t: '$threads' is not a thread count from 1 to 256"
{ is_uint "$ports" && [ "$ports" -ge 1 ] && [ "$ports" -le 64512 ]; } || die "-p: '$ports' is not a port count from 1 to 64512"
first=$(ip_to_int "$dst")
last=$((first + count - 1))
[ "$last" -le 4294967295 ] || die "-c: $count destinations from $dst run past 255.255.255.255"
dst_max=$(int_to_ip "$last")

PGDIR=/proc/net/pktgen
pgset() { # FILE COMMAND
    if [ "$dry_run" = 1 ]; then
        echo "$1: $2"
        return
    fi
    echo "$2" >"$PGDIR/$1"
    if ! grep -q "^Result: OK" "$PGDIR/$1" 2>/dev/null; then
        die "pktgen refused '$2' in $1: $(grep '^Result:' "$PGDIR/$1" 2>/dev/null || echo no result)"
    fi
}

if [ "$dry_run" = 0 ]; then
    if [ ! -d "$PGDIR" ]; then
        modprobe pktgen 2>/dev/null || true
    fi
    [ -d "$PGDIR" ] || die "this kernel has no pktgen (CONFIG_NET_PKTGEN); use 'pop-forwarder generate' instead"
    [ -e "/sys/class/net/$dev" ] || die "-i: no interface '$dev'"
fi

for ((t = 0; t < threads; t++)); do
    pgset "kpktgend_$t" "rem_device_all"
    pgset "kpktgend_$t" "add_device $dev@$t"
    d="$dev@$t"
    pgset "$d" "count $packets"
    pgset "$d" "clone_skb 0"
    pgset "$d" "pkt_size $((size - 4))" # pktgen's size excludes the FCS
    pgset "$d" "delay 0"
    pgset "$d" "queue_map_min $t"
    pgset "$d" "queue_map_max $t"
    pgset "$d" "dst_min $dst"
    pgset "$d" "dst_max $dst_max"
    pgset "$d" "dst_mac $mac"
    pgset "$d" "udp_src_min 1024"
    pgset "$d" "udp_src_max $((1024 + ports - 1))"
    pgset "$d" "udp_dst_min 9"
    pgset "$d" "udp_dst_max 9"
    pgset "$d" "flag IPDST_RND"
    pgset "$d" "flag UDPSRC_RND"
done

echo "pktgen: $threads thread(s) on $dev, $count destinations $dst..$dst_max, $size-byte frames" >&2
pgset pgctrl "start"
if [ "$dry_run" = 0 ]; then
    for ((t = 0; t < threads; t++)); do
        grep -A2 '^Result' "$PGDIR/$dev@$t" || true
    done
fi
