#!/usr/bin/env bash
# The stack each function of the built XDP object uses: the deepest
# `r10 - N` (the frame pointer) it addresses. The verifier allows 512 bytes
# for a program and all the functions it calls on one chain; LLVM refuses
# to link a function past 512 alone. Run after `cargo xtask build`; needs
# llvm-objdump (Debian package llvm).
#
#   scripts/bpf-stack.sh [OBJECT]
set -euo pipefail
obj=${1:-$(find target -path '*pop-forwarder-ebpf/bpfel-unknown-none/release/pop-forwarder' \
    -type f -printf '%T@ %p\n' | sort -rn | head -1 | cut -d' ' -f2)}
[ -n "$obj" ] || { echo "no built XDP object under target/: run cargo xtask build" >&2; exit 1; }
echo "$obj"
llvm-objdump -d --no-show-raw-insn "$obj" | awk '
    /^[0-9a-f]+ </ { fn = $2; if (!(fn in deepest)) deepest[fn] = 0; next }
    /r10 - [0-9]+/ {
        n = $0; sub(/.*r10 - /, "", n); sub(/[^0-9].*/, "", n)
        if (n + 0 > deepest[fn]) deepest[fn] = n + 0
    }
    END { for (fn in deepest) if (deepest[fn] > 0) printf "%5d bytes  %s\n", deepest[fn], fn }
' | sort -rn
