#!/usr/bin/env bash
# Where the XDP program's time goes on one bench path, instruction by
# instruction: runs the bench's path ROW alone for SECONDS, samples every
# CPU with perf (cpu-clock: a VM has no PMU) while it sends, reads the
# program's JIT image back from the kernel (BPF_OBJ_GET_INFO_BY_FD; Debian's
# bpftool has no libbfd to dump it) and places the samples on its x86
# instructions. Writes OUT/top.txt (the hottest kernel symbols: helpers
# show there by name), OUT/annot.txt (the main function's disassembly, each
# instruction with its samples), OUT/by-line.txt (the samples summed by
# source line, from the program's BTF line info) and prints the hottest
# 128-byte stretches and source lines.
#
#   scripts/profile-xdp.sh ROW [SECONDS] [OUT]
#   scripts/profile-xdp.sh "1 flow" 12 target/profile
#
# ROW is matched against the bench's path names (`bench --row`), in the
# `vip` section; SECTION=pop (etc.) picks another. Needs root, perf,
# bpftool, objdump (binutils), python3, and a built bench
# (`cargo build --release -p tests --bins`). A sample lands on the
# instruction after the one that stalled, and after a helper's return.
# A row the bench measures for its cost alone (`every frame a new flow`)
# has no throughput run: it is profiled while bpf_stats is on, and the
# two clock reads the kernel then takes around every program run show in
# top.txt as sched_clock and pvclock_clocksource_read_nowd (about 10 % of
# the samples on this VM), not as the program's.
set -euo pipefail
row=$1
secs=${2:-12}
out=${3:-target/profile}
section=${SECTION:-vip}
[ "$secs" -ge 6 ] || { echo "SECONDS: 6 or more" >&2; exit 1; }
mkdir -p "$out"
cat >"$out/profile.py" <<'EOF'
import bisect, collections, ctypes, os, re, struct, subprocess, sys

libc = ctypes.CDLL(None, use_errno=True)
SYS_BPF, PROG_GET_FD_BY_ID, OBJ_GET_INFO_BY_FD, BTF_GET_FD_BY_ID = 321, 13, 15, 19


def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    r = libc.syscall(SYS_BPF, cmd, buf, 128)
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return r


def dump(prog_id, out):
    """Writes the main function's JIT image to OUT/main.bin."""
    fd = bpf(PROG_GET_FD_BY_ID, struct.pack("I", prog_id))
    INFO = 512  # bytes past the kernel's struct must be zero, and are

    def info(fill=()):
        b = ctypes.create_string_buffer(INFO)
        for off, fmt, val in fill:
            struct.pack_into(fmt, b, off, val)
        bpf(OBJ_GET_INFO_BY_FD, struct.pack("IIQ", fd, INFO, ctypes.addressof(b)))
        return b

    # struct bpf_prog_info: jited_prog_len at 16, jited_prog_insns at 24,
    # nr_jited_ksyms and nr_jited_func_lens at 104, their arrays at 112, 120.
    b = info()
    jlen, = struct.unpack_from("I", b, 16)
    nks, nfl = struct.unpack_from("II", b, 104)
    img = ctypes.create_string_buffer(jlen)
    ks, fl = (ctypes.c_uint64 * nks)(), (ctypes.c_uint32 * nfl)()
    info([(16, "I", jlen), (24, "Q", ctypes.addressof(img)), (104, "I", nks),
          (108, "I", nfl), (112, "Q", ctypes.addressof(ks)), (120, "Q", ctypes.addressof(fl))])
    # The main function is the longest.
    starts = [sum(fl[:i]) for i in range(nfl)]
    main = max(range(nfl), key=lambda i: fl[i])
    with open(f"{out}/main.bin", "wb") as f:
        f.write(img.raw[starts[main]:starts[main] + fl[main]])
    lines(fd, info, ks[main], fl[main], out)
    os.close(fd)


def lines(fd, info, start, size, out):
    """Writes OUT/lines.txt: for each source line the JIT placed in the main
    function, its first x86 offset, file:line and text (the program's BTF
    line info: jited_line_info holds each line_info record's address)."""
    b = info()
    btf_id, = struct.unpack_from("I", b, 128)
    nli, = struct.unpack_from("I", b, 148)
    njli, = struct.unpack_from("I", b, 168)
    if not btf_id or not nli or nli != njli:
        return
    li = ctypes.create_string_buffer(16 * nli)
    jli = (ctypes.c_uint64 * njli)()
    info([(148, "I", nli), (152, "Q", ctypes.addressof(li)), (160, "Q", ctypes.addressof(jli)),
          (168, "I", njli), (172, "I", 16), (176, "I", 8)])
    bfd = bpf(BTF_GET_FD_BY_ID, struct.pack("I", btf_id))
    binfo = ctypes.create_string_buffer(32)
    bpf(OBJ_GET_INFO_BY_FD, struct.pack("IIQ", bfd, 32, ctypes.addressof(binfo)))
    bsize, = struct.unpack_from("I", binfo, 8)
    raw = ctypes.create_string_buffer(bsize)
    struct.pack_into("QI", binfo, 0, ctypes.addressof(raw), bsize)
    bpf(OBJ_GET_INFO_BY_FD, struct.pack("IIQ", bfd, 32, ctypes.addressof(binfo)))
    os.close(bfd)
    hdr_len, = struct.unpack_from("I", raw, 4)
    str_off, = struct.unpack_from("I", raw, 16)
    strings = raw.raw[hdr_len + str_off:]

    def name(off):
        return strings[off:strings.index(b"\0", off)].decode(errors="replace")

    rows = []
    for i in range(nli):
        _, file_off, line_off, line_col = struct.unpack_from("IIII", li, 16 * i)
        at = jli[i] - start
        if 0 <= at < size:
            where = f"{os.path.basename(name(file_off))}:{line_col >> 10}"
            rows.append((at, where, name(line_off).strip()))
    rows.sort()
    with open(f"{out}/lines.txt", "w") as f:
        for at, where, text in rows:
            f.write(f"{at:x}\t{where}\t{text}\n")


def annotate(out):
    """Places OUT/perf.data's samples on OUT/main.bin's instructions."""
    size = os.path.getsize(f"{out}/main.bin")
    dis = subprocess.run(["objdump", "-D", "-b", "binary", "-mi386:x86-64", f"{out}/main.bin"],
                         capture_output=True, text=True, check=True).stdout
    samples = subprocess.run(["perf", "script", "-i", f"{out}/perf.data", "-F", "ip,sym,symoff"],
                             capture_output=True, text=True).stdout
    # perf names each function by its own tag; the main function is the
    # one with the most samples.
    per_sym = collections.defaultdict(collections.Counter)
    for line in samples.splitlines():
        m = re.search(r"(bpf_prog_\w+_pop_forwarder)\+0x([0-9a-f]+)", line)
        if m:
            per_sym[m.group(1)][int(m.group(2), 16)] += 1
    if not per_sym:
        sys.exit("no samples in pop_forwarder")
    hist = max(per_sym.values(), key=lambda c: sum(c.values()))
    total = sum(hist.values())
    rows = []
    for line in dis.splitlines():
        m = re.match(r"\s+([0-9a-f]+):", line)
        if m:
            c = hist.get(int(m.group(1), 16), 0)
            rows.append(f"{c:6d} {line}" if c else f"       {line}")
    with open(f"{out}/annot.txt", "w") as f:
        f.write("\n".join(rows) + "\n")
    spans = collections.Counter()
    for off, c in hist.items():
        spans[off // 0x80 * 0x80] += c
    print(f"{total} samples in the main function ({size} bytes of x86); hottest stretches:")
    for off, c in spans.most_common(15):
        print(f"  +0x{off:05x}  {c:6d}  {100 * c / total:4.1f} %")
    if os.path.exists(f"{out}/lines.txt"):
        by_line(out, hist, total)
    print(f"annotated: {out}/annot.txt; kernel symbols: {out}/top.txt")


def by_line(out, hist, total):
    """Sums the samples by source line (OUT/lines.txt) into OUT/by-line.txt
    and prints the hottest. An x86 instruction belongs to the last line
    that starts at or before it; a sample lands on the instruction after
    the one that stalled, so a line's count can include its neighbour's."""
    rows = [l.rstrip("\n").split("\t", 2) for l in open(f"{out}/lines.txt")]
    starts = [int(r[0], 16) for r in rows]
    per = collections.Counter()
    for off, c in hist.items():
        i = bisect.bisect_right(starts, off) - 1
        if i >= 0:
            per[(rows[i][1], rows[i][2])] += c
    with open(f"{out}/by-line.txt", "w") as f:
        for (where, text), c in per.most_common():
            f.write(f"{c:6d} {100 * c / total:5.1f} %  {where:24} {text}\n")
    print("hottest source lines:")
    for (where, text), c in per.most_common(25):
        print(f"  {100 * c / total:4.1f} %  {where:24} {text[:70]}")


if sys.argv[1] == "dump":
    dump(int(sys.argv[2]), sys.argv[3])
else:
    annotate(sys.argv[2])
EOF
bench=./target/release/bench
[ -x "$bench" ] || { echo "no $bench: cargo build --release -p tests --bins" >&2; exit 1; }
"$bench" --quick --only="$section" --row="$row" --run-ms=$((secs * 1000)) \
    --out="$out/bench" >"$out/bench.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
until grep -q "== throughput" "$out/bench.log" 2>/dev/null; do
    kill -0 $pid 2>/dev/null || { cat "$out/bench.log" >&2; exit 1; }
    sleep 0.2
done
# Every pop_forwarder the bench loaded is the same object (the section's
# other paths are loaded too, and idle): any one's image will do.
id=$(bpftool prog show | awk '/name pop_forwarder/ { sub(":", "", $1); print $1 }' | tail -1)
[ -n "$id" ] || { echo "no pop_forwarder program loaded" >&2; exit 1; }
# Its image now, while it is loaded.
python3 "$out/profile.py" dump "$id" "$out"
# Past the warm-up, inside the throughput run (BPF statistics off; for a
# cost-only row, inside the cost run, statistics on: see above).
sleep 2
perf record -a -e cpu-clock -F 20000 -o "$out/perf.data" -- sleep $((secs - 4)) >/dev/null 2>&1
wait $pid || true
trap - EXIT
perf report -i "$out/perf.data" --no-children --sort sym --stdio 2>/dev/null |
    awk '!/^#/ && NF && ++n <= 40' >"$out/top.txt"
python3 "$out/profile.py" annotate "$out"
