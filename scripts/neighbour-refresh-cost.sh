#!/usr/bin/env bash
# What neighbour notifications cost the daemon: a lab namespace with COUNT
# permanent neighbours on an attached veth, the daemon started on it, then
# 100 notifications 50 ms apart, and the daemon's CPU time over them (utime
# + stime from /proc/PID/stat). MODE "mac" changes one neighbour's MAC each
# time (a refresh must run); "state" flips its state between REACHABLE and
# STALE with the MAC kept (nothing the tables follow moves).
#
#   scripts/neighbour-refresh-cost.sh BINARY [mac|state] [COUNT]
#   scripts/neighbour-refresh-cost.sh target/release/pop-forwarder state 4000
#
# Needs root. Names its namespaces and instance after its pid and removes
# them (and the instance's pins) on exit.
set -euo pipefail
bin=$(realpath "$1")
mode=${2:-mac}
count=${3:-4000}
tag=nbc$$
ns=${tag}f
peer=${tag}p
dir=$(mktemp -d)
cleanup() {
    if [ -S "$dir/run/$tag.sock" ] || [ -d "/sys/fs/bpf/pop-forwarder/$tag" ]; then
        nsenter --net="/run/netns/$ns" "$bin" --instance "$tag" --run-dir "$dir/run" detach >/dev/null 2>&1 || true
    fi
    ip netns del "$ns" 2>/dev/null || true
    ip netns del "$peer" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT
ip netns add "$ns"
ip netns add "$peer"
ip -n "$ns" link set lo up
ip -n "$ns" link add x0 type veth peer name x1 netns "$peer"
ip -n "$ns" link add y0 type veth peer name y1 netns "$peer"
ip -n "$ns" addr add 10.0.0.1/16 dev x0
ip -n "$ns" addr add 10.1.0.1/24 dev y0
for l in x0 y0; do ip -n "$ns" link set "$l" up; done
for l in x1 y1; do ip -n "$peer" link set "$l" up; done
for ((i = 0; i < count; i++)); do
    a=$(((i + 2) / 256)) b=$(((i + 2) % 256))
    printf 'neigh add 10.0.%d.%d lladdr 02:00:00:00:%02x:%02x dev x0 nud permanent\n' $a $b $a $b
done >"$dir/neigh.batch"
ip -n "$ns" -batch "$dir/neigh.batch"
printf '[[interfaces]]\nname = "x0"\n[[interfaces]]\nname = "y0"\n' >"$dir/cfg.toml"
mkdir -m 700 "$dir/run"
nsenter --net="/run/netns/$ns" "$bin" --instance "$tag" --run-dir "$dir/run" run \
    --config "$dir/cfg.toml" >"$dir/log" 2>&1 &
pid=$!
for _ in $(seq 1 200); do grep -q "forwarding on" "$dir/log" && break; sleep 0.1; done
grep -q "forwarding on" "$dir/log" || { cat "$dir/log"; exit 1; }
sleep 2
cpu() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
t0=$(cpu)
for ((i = 0; i < 100; i++)); do
    if [ "$mode" = state ]; then
        state=$([ $((i % 2)) = 0 ] && echo reachable || echo stale)
        ip -n "$ns" neigh replace 10.0.0.2 lladdr 02:00:00:00:00:02 dev x0 nud "$state"
    else
        ip -n "$ns" neigh replace 10.0.0.2 lladdr "02:00:00:01:00:0$((i % 2))" dev x0 nud permanent
    fi
    sleep 0.05
done
sleep 1
t1=$(cpu)
awk -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v n="$count" -v m="$mode" \
    'BEGIN { ms = d * 1000 / hz; printf "%d neighbours, 100 %s changes: daemon CPU %.0f ms, %.1f ms a change\n", n, m, ms, ms / 100 }'
