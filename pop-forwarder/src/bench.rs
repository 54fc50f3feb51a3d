//! Benchmark tooling: the live-frames traffic generator, the counting sink,
//! the bare-redirect ceiling, and deterministic route tables of a realistic
//! prefix-length mix.
//!
//! Used by `pop-forwarder generate` and by `cargo xtask bench`.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMap, PerCpuArray},
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
};
use pop_forwarder_common::{
    AF_INET, AF_INET6, TrafficCounter,
    bench::{self as names, GEN_HEADER_LEN, GEN_MAX_DSTS, GenConfig},
};

use crate::net::{Mac, Prefix};

pub static GEN_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-gen"));
pub static SINK_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-sink"));
pub static REDIRECT_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-redirect"));

/// What the generator sends.
#[derive(Debug, Clone)]
pub struct FlowSpec {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub src: IpAddr,
    /// Destinations, cycled through packet by packet.
    pub dsts: Vec<IpAddr>,
    pub src_count: u32,
    pub src_port_count: u32,
    /// Ethernet frame length without FCS.
    pub frame_len: usize,
}

/// A loaded live-frames generator.
pub struct Generator {
    ebpf: Ebpf,
    frame: Vec<u8>,
    /// The minimal generator's device (`bench_gen_min`); None for
    /// `bench_gen`.
    port: Option<u32>,
}

/// struct xdp_md, the XDP test-run context (linux/bpf.h).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

impl Generator {
    pub fn new(spec: &FlowSpec) -> Result<Generator> {
        Generator::load(spec, None)
    }

    /// The least a live-frames generator can do (`bench_gen_min`): the
    /// template copied over each frame, the frame redirected (devmap) out
    /// of `dev`, the device it must then be sent from. Every frame the
    /// same: for measuring the harness's own ceiling, not for routing.
    /// Call it in `dev`'s network namespace: the kernel resolves a devmap
    /// entry's ifindex in the namespace of the thread that writes it.
    pub fn minimal(spec: &FlowSpec, dev: &str) -> Result<Generator> {
        let name = std::ffi::CString::new(dev).context("device name")?;
        // SAFETY: a NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            bail!("no device {dev} in this network namespace");
        }
        Generator::load(spec, Some(ifindex))
    }

    /// The generator's program (its cost shows in bpf_stats).
    pub fn program(&self) -> Result<&Xdp> {
        let name = Generator::program_name(self.port);
        Ok(self.ebpf.program(name).context(name)?.try_into()?)
    }

    /// `bench_gen_min` for the minimal generator (it has a device), else
    /// `bench_gen`.
    fn program_name(port: Option<u32>) -> &'static str {
        if port.is_some() {
            "bench_gen_min"
        } else {
            "bench_gen"
        }
    }

    fn load(spec: &FlowSpec, minimal: Option<u32>) -> Result<Generator> {
        let v4 = spec.src.is_ipv4();
        let min = if v4 {
            GEN_HEADER_LEN
        } else {
            GEN_HEADER_LEN.max(62)
        };
        if !(min..=1514).contains(&spec.frame_len) {
            bail!(
                "--size: {} bytes is not between {min} and 1514",
                spec.frame_len
            );
        }
        if spec.dsts.is_empty() || spec.dsts.len() > GEN_MAX_DSTS as usize {
            bail!(
                "between 1 and {GEN_MAX_DSTS} destinations are needed, not {}",
                spec.dsts.len()
            );
        }
        if spec.dsts.iter().any(|d| d.is_ipv4() != v4) {
            bail!(
                "destinations must be of the source's address family ({})",
                spec.src
            );
        }
        if spec.src_count == 0
            || spec.src_count > 65536
            || spec.src_port_count == 0
            || spec.src_port_count > 64512
        {
            bail!("source address count must be 1..=65536 and source port count 1..=64512");
        }
        let frame = template(spec);
        let mut ebpf = Ebpf::load(GEN_OBJECT).context("loading the generator")?;
        let mut config: Array<_, GenConfig> =
            Array::try_from(ebpf.take_map(names::GEN_CONFIG).context("GEN_CONFIG")?)?;
        config.set(
            0,
            GenConfig {
                family: if v4 { AF_INET } else { AF_INET6 },
                dst_count: spec.dsts.len() as u32,
                src_count: spec.src_count,
                src_port_count: spec.src_port_count,
            },
            0,
        )?;
        let mut tmpl: Array<_, [u64; GEN_HEADER_LEN / 8]> =
            Array::try_from(ebpf.take_map(names::GEN_TEMPLATE).context("GEN_TEMPLATE")?)?;
        let header: [u64; GEN_HEADER_LEN / 8] =
            bytemuck::pod_read_unaligned(&frame[..GEN_HEADER_LEN]);
        tmpl.set(0, header, 0)?;
        let mut dsts: Array<_, [u8; 16]> =
            Array::try_from(ebpf.take_map(names::GEN_DSTS).context("GEN_DSTS")?)?;
        for (i, d) in spec.dsts.iter().enumerate() {
            let mut b = [0u8; 16];
            match d {
                IpAddr::V4(a) => b[..4].copy_from_slice(&a.octets()),
                IpAddr::V6(a) => b = a.octets(),
            }
            dsts.set(i as u32, b, 0)?;
        }
        if let Some(ifindex) = minimal {
            let mut port = DevMap::try_from(ebpf.map_mut("GEN_PORT").context("GEN_PORT")?)?;
            port.set(0, ifindex, None, 0)?;
        }
        let program = Generator::program_name(minimal);
        let prog: &mut Xdp = ebpf.program_mut(program).context(program)?.try_into()?;
        prog.load().context("loading the generator program")?;
        Ok(Generator {
            ebpf,
            frame,
            port: minimal,
        })
    }

    /// Sends `count` frames out of `ifindex` (in the calling thread's
    /// network namespace), in batches of 64 as the kernel's live-frames mode
    /// does; returns how long it took.
    pub fn send(&self, ifindex: u32, count: u32) -> Result<Duration> {
        if let Some(port) = self.port
            && port != ifindex
        {
            bail!("the minimal generator sends out of ifindex {port}, not {ifindex}");
        }
        let prog = self.program()?;
        let ctx = XdpMd {
            data: 0,
            data_end: self.frame.len() as u32,
            data_meta: 0,
            ingress_ifindex: ifindex,
            rx_queue_index: 0,
            egress_ifindex: 0,
        };
        let start = Instant::now();
        prog.test_run(TestRunOptions {
            data_in: Some(&self.frame),
            ctx_in: Some(bytemuck::bytes_of(&ctx)),
            repeat: count,
            attrs: TestRunAttrs::new().xdp_live_frames(64),
            ..TestRunOptions::new()
        })
        .context("BPF_PROG_TEST_RUN (live frames)")?;
        Ok(start.elapsed())
    }

    /// Sends for `duration` in chunks of `chunk` frames; returns frames sent
    /// and the time taken.
    pub fn send_for(
        &self,
        ifindex: u32,
        duration: Duration,
        chunk: u32,
    ) -> Result<(u64, Duration)> {
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < duration {
            self.send(ifindex, chunk)?;
            sent += u64::from(chunk);
        }
        Ok((sent, start.elapsed()))
    }
}

/// The first frame the generator starts from: Ethernet, IPv4 or IPv6, UDP
/// from port 1024 to 9 (discard), zero payload.
fn template(spec: &FlowSpec) -> Vec<u8> {
    let mut f = vec![0u8; spec.frame_len];
    f[0..6].copy_from_slice(&spec.dst_mac.0);
    f[6..12].copy_from_slice(&spec.src_mac.0);
    let udp_at = match spec.src {
        IpAddr::V4(src) => {
            f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
            let ip = &mut f[14..34];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((spec.frame_len - 14) as u16).to_be_bytes());
            ip[6] = 0x40; // DF
            ip[8] = 64;
            ip[9] = 17;
            ip[12..16].copy_from_slice(&src.octets());
            34
        }
        IpAddr::V6(src) => {
            f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
            let ip = &mut f[14..54];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&((spec.frame_len - 54) as u16).to_be_bytes());
            ip[6] = 17;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&src.octets());
            54
        }
    };
    let udp_len = (spec.frame_len - udp_at) as u16;
    f[udp_at..udp_at + 2].copy_from_slice(&1024u16.to_be_bytes());
    f[udp_at + 2..udp_at + 4].copy_from_slice(&9u16.to_be_bytes());
    f[udp_at + 4..udp_at + 6].copy_from_slice(&udp_len.to_be_bytes());
    f
}

/// A counting XDP sink attached to one interface.
pub struct Sink {
    ebpf: Ebpf,
}

impl Sink {
    /// Attaches to `ifname` in the calling thread's network namespace.
    pub fn attach(ifname: &str) -> Result<Sink> {
        let mut ebpf = Ebpf::load(SINK_OBJECT).context("loading the sink")?;
        let prog: &mut Xdp = ebpf
            .program_mut("bench_sink")
            .context("bench_sink")?
            .try_into()?;
        prog.load()?;
        prog.attach(ifname, XdpMode::Driver)
            .with_context(|| format!("attaching the sink to {ifname}"))?;
        Ok(Sink { ebpf })
    }

    /// Packets and bytes counted so far.
    pub fn count(&self) -> Result<TrafficCounter> {
        let map: PerCpuArray<_, TrafficCounter> =
            PerCpuArray::try_from(self.ebpf.map(names::SINK_COUNT).context("SINK_COUNT")?)?;
        let v = map.get(&0, 0)?;
        Ok(TrafficCounter {
            packets: v.iter().map(|c| c.packets).sum(),
            bytes: v.iter().map(|c| c.bytes).sum(),
        })
    }
}

/// The bare-redirect program attached to one interface, sending every frame
/// to another; or the bare XDP_TX program, sending it back.
pub struct BareRedirect {
    pub ebpf: Ebpf,
    /// `bench_redirect`, `bench_tx` or `bench_route` (the floor router).
    pub program: &'static str,
}

impl BareRedirect {
    /// The object loaded for a bare program: the floor router's tables
    /// one element each (72 MiB it does not use).
    fn load_bare() -> Result<Ebpf> {
        Ok(EbpfLoader::new()
            .map_max_entries(names::FLOOR_TBL24, 1)
            .map_max_entries(names::FLOOR_TBL8, 1)
            .load(REDIRECT_OBJECT)?)
    }

    /// Bare XDP_TX on `ingress`: every frame back out of it.
    pub fn attach_tx(ingress: &str) -> Result<BareRedirect> {
        let ebpf = BareRedirect::load_bare().context("loading the bare XDP_TX")?;
        BareRedirect::attach_program(ebpf, "bench_tx", ingress)
    }

    /// Bare redirect on `ingress`: every frame to `egress_ifindex`.
    pub fn attach(ingress: &str, egress_ifindex: u32) -> Result<BareRedirect> {
        let mut ebpf = BareRedirect::load_bare().context("loading the bare redirect")?;
        set_port(&mut ebpf, egress_ifindex)?;
        BareRedirect::attach_program(ebpf, "bench_redirect", ingress)
    }

    /// The floor router (`bench_route`) on `ingress`: the IPv4 `routes`
    /// in its DIR-24-8 table, all to one next hop out of `egress_ifindex`
    /// (`dst_mac`, from `src_mac`).
    pub fn attach_floor(
        ingress: &str,
        egress_ifindex: u32,
        routes: &[Prefix],
        dst_mac: Mac,
        src_mac: Mac,
    ) -> Result<BareRedirect> {
        let ebpf = BareRedirect::floor(egress_ifindex, routes, dst_mac, src_mac)?;
        BareRedirect::attach_program(ebpf, "bench_route", ingress)
    }

    /// The floor router's object with its tables filled (as for
    /// `attach_floor`), its program `bench_route` loaded but not attached:
    /// for a test run.
    pub fn floor(
        egress_ifindex: u32,
        routes: &[Prefix],
        dst_mac: Mac,
        src_mac: Mac,
    ) -> Result<Ebpf> {
        use pop_forwarder_common::dir24::{Dir24, TBL8_ENTRIES, TBL24_ENTRIES};
        let mut ebpf = Ebpf::load(REDIRECT_OBJECT).context("loading the floor router")?;
        set_port(&mut ebpf, egress_ifindex)?;
        // Built in user space, then the elements that hold a route written.
        let mut tbl24 = vec![0u32; TBL24_ENTRIES as usize];
        let mut tbl8 = vec![0u32; TBL8_ENTRIES as usize];
        let mut dir24 = Dir24 {
            tbl24: &mut tbl24,
            tbl8: &mut tbl8,
        };
        // Shortest first, as the daemon's batches go.
        let mut sorted: Vec<&Prefix> = routes.iter().collect();
        sorted.sort_by_key(|p| p.len);
        for p in sorted {
            let IpAddr::V4(a) = p.addr else {
                bail!("the floor router takes IPv4 routes only");
            };
            dir24
                .add(u32::from(a), u32::from(p.len), 0)
                .map_err(|e| anyhow::anyhow!("floor router table: {e:?}"))?;
        }
        for (name, table) in [(names::FLOOR_TBL24, &tbl24), (names::FLOOR_TBL8, &tbl8)] {
            let mut map: Array<_, u64> = Array::try_from(ebpf.map_mut(name).context(name)?)?;
            for (i, pair) in table.chunks_exact(2).enumerate() {
                let element = u64::from(pair[0]) | (u64::from(pair[1]) << 32);
                if element != 0 {
                    map.set(i as u32, element, 0)?;
                }
            }
        }
        let mut hop = [0u16; 8];
        for (k, w) in dst_mac
            .0
            .chunks_exact(2)
            .chain(src_mac.0.chunks_exact(2))
            .enumerate()
        {
            hop[k] = u16::from_ne_bytes([w[0], w[1]]);
        }
        let mut hops: Array<_, [u16; 8]> =
            Array::try_from(ebpf.map_mut(names::FLOOR_HOPS).context("FLOOR_HOPS")?)?;
        hops.set(0, hop, 0)?;
        let prog: &mut Xdp = ebpf
            .program_mut("bench_route")
            .context("bench_route")?
            .try_into()?;
        prog.load()?;
        Ok(ebpf)
    }

    fn attach_program(
        mut ebpf: Ebpf,
        program: &'static str,
        ingress: &str,
    ) -> Result<BareRedirect> {
        let prog: &mut Xdp = ebpf.program_mut(program).context(program)?.try_into()?;
        if prog.fd().is_err() {
            prog.load()?;
        }
        prog.attach(ingress, XdpMode::Driver)
            .with_context(|| format!("attaching {program} to {ingress}"))?;
        Ok(BareRedirect { ebpf, program })
    }
}

/// `REDIRECT_PORT`'s one slot: `egress_ifindex`.
fn set_port(ebpf: &mut Ebpf, egress_ifindex: u32) -> Result<()> {
    let mut port = DevMap::try_from(
        ebpf.map_mut(names::REDIRECT_PORT)
            .context("REDIRECT_PORT")?,
    )?;
    port.set(0, egress_ifindex, None, 0)?;
    Ok(())
}

/// A deterministic xorshift generator, so that every run (and every
/// machine) benchmarks the same tables.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// `count` distinct IPv4 prefixes with a BGP-like length mix (about 60 %
/// /24, the rest /23 down to /16), in public unicast space outside 10/8.
pub fn routes_v4(count: usize, seed: u64) -> Vec<Prefix> {
    let mut rng = Rng::new(seed);
    let mut seen = HashSet::with_capacity(count);
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let len = match rng.below(100) {
            0..=59 => 24,
            60..=69 => 23,
            70..=79 => 22,
            80..=85 => 21,
            86..=91 => 20,
            92..=94 => 19,
            95..=97 => 18,
            98 => 17,
            _ => 16,
        };
        let first = 1 + rng.below(222) as u32; // 1..=222
        if first == 10 || first == 127 {
            continue;
        }
        let addr = (first << 24) | (rng.next_u64() as u32 & 0x00ff_ffff);
        let net = addr & (u32::MAX << (32 - len));
        if seen.insert((net, len)) {
            out.push(Prefix {
                addr: IpAddr::V4(Ipv4Addr::from(net)),
                len: len as u8,
            });
        }
    }
    out
}

/// `count` distinct IPv6 prefixes, /48 to /32 (mostly /48), in 2000::/3.
pub fn routes_v6(count: usize, seed: u64) -> Vec<Prefix> {
    let mut rng = Rng::new(seed);
    let mut seen = HashSet::with_capacity(count);
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let len: u32 = match rng.below(100) {
            0..=54 => 48,
            55..=69 => 44,
            70..=84 => 40,
            85..=94 => 36,
            _ => 32,
        };
        let hi = (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64());
        let addr = (hi & !(0b111u128 << 125)) | (0b001u128 << 125); // 2000::/3
        let net = addr & (u128::MAX << (128 - len));
        if seen.insert((net, len)) {
            out.push(Prefix {
                addr: IpAddr::V6(Ipv6Addr::from(net)),
                len: len as u8,
            });
        }
    }
    out
}

/// `count` destination addresses, each inside a prefix of `routes` picked at
/// random, so that lookups spread over the whole table.
pub fn destinations(routes: &[Prefix], count: usize, seed: u64) -> Vec<IpAddr> {
    let mut rng = Rng::new(seed);
    (0..count)
        .map(|_| {
            let p = routes[rng.below(routes.len() as u64) as usize];
            match p.addr {
                IpAddr::V4(a) => {
                    let host = (rng.next_u64() as u32)
                        & !(u32::MAX.checked_shl(32 - u32::from(p.len)).unwrap_or(0));
                    IpAddr::V4(Ipv4Addr::from(u32::from(a) | host | 1))
                }
                IpAddr::V6(a) => {
                    let r = (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64());
                    let host = r & !(u128::MAX.checked_shl(128 - u32::from(p.len)).unwrap_or(0));
                    IpAddr::V6(Ipv6Addr::from(u128::from(a) | host | 1))
                }
            }
        })
        .collect()
}

/// Locked memory (bytes) of this process's BPF maps of `map_type` whose key
/// is `key_size` bytes, from /proc/self/fdinfo (what `bpftool map` shows).
pub fn map_memlock(map_type: u32, key_size: u32) -> Result<u64> {
    let mut total = 0;
    // A map open through two descriptors counts once.
    let mut seen = HashSet::new();
    for entry in std::fs::read_dir("/proc/self/fdinfo")? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
        };
        if field("map_type:") == Some(u64::from(map_type))
            && field("key_size:") == Some(u64::from(key_size))
            && seen.insert(field("map_id:"))
        {
            total += field("memlock:").unwrap_or(0);
        }
    }
    Ok(total)
}

/// Keeps kernel.bpf_stats_enabled on while held (BPF_ENABLE_STATS: the
/// kernel turns it off again when the fd closes, even if we crash).
pub struct BpfStats {
    _fd: std::os::fd::OwnedFd,
}

impl BpfStats {
    pub fn enable() -> Result<BpfStats> {
        let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
        Ok(BpfStats { _fd: fd })
    }
}
