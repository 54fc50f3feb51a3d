#!/usr/bin/env bash
# Builds the work tree's XDP program (release) and copies the object to OUT,
# for `bench --candidate=OUT`: the change to weigh is built here, then the
# bench is built from the shipped code and runs both, path by path, in the
# same rounds.
#
#   scripts/xdp-object.sh OUT
#
# Needs bpf-linker on PATH (`cargo xtask test` or `demo` installs it under
# ~/.cache/pop-forwarder/bpf-linker/bin).
set -euo pipefail
out=${1:?usage: scripts/xdp-object.sh OUT}
cd "$(dirname "$0")/.."
export PATH=$HOME/.cache/pop-forwarder/bpf-linker/bin:$PATH
cargo build --release -p pop-forwarder
# The build script writes the object into its OUT_DIR; the newest one is
# this build's.
obj=$(ls -t target/release/build/pop-forwarder-*/out/pop-forwarder | head -1)
cp "$obj" "$out"
echo "XDP object: $out"
