//! `cargo xtask bench`: Linux forwarding, a bare XDP redirect and
//! pop-forwarder side by side, with the same generator and sink, in one run.
//!
//! Topology (the lab): gen ns `a` (a0) -> router ns (r0 -> r1) -> sink ns `c`
//! (c0, counting XDP sink). The generator is BPF_PROG_TEST_RUN in live-frames
//! mode on a0; traffic spreads over 4,096 destinations drawn from the route
//! table under test. Throughput is measured with BPF statistics off; the
//! per-packet cost of each router program in a second pass with them on.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Write as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::EbpfLoader;
use aya::{
    Ebpf,
    programs::{Xdp, XdpMode},
};
use pop_forwarder::{
    EBPF_OBJECT,
    bench::{
        BareRedirect, BpfStats, FlowSpec, Generator, Sink, destinations, map_memlock, routes_v4,
        routes_v6,
    },
    config::{Ipv4Lookup, Ipv6Lookup, RouteLookup, RouteMissPolicy},
    maps::Tables,
    net::{Mac, Prefix},
};
use pop_forwarder_common::{
    AF_INET, AF_INET6, NH_F_IN_USE, NH_F_MAC_STATIC, NH_F_MAC_VALID, NextHop, PROGRAM_NAME,
    dir24::{TBL8_ENTRIES, TBL24_ENTRIES},
    dxr6, map_names,
};
use serde::Serialize;
use tests::{Lab, Netns};

const DESTINATIONS: usize = 4096;
/// Routes the diagnostic "hot" path draws its destinations from.
const HOT_ROUTES: usize = 4;
/// Routes of the full table the diagnostic "small-table traffic" path draws
/// its destinations from: as many as the small table has, and (same seed)
/// the very same routes, so it sends the small table's traffic.
const SMALL_TABLE: usize = 1_000;
/// The VIP of the steering path (odd: the generator's destinations set the
/// lowest bit).
const VIP_ADDRESS: &str = "198.18.0.11";
const SEED: u64 = 0x005e_ed0f_b00c;
/// Entries of the deny-list path's list.
const DENY_ENTRIES: usize = 100_000;
/// The IP-in-IP VIP rows by the connection table's state.
/// The floor router's row (`BareRedirect::attach_floor`).
const FLOOR_ROUTER: &str = "floor router (DIR-24-8, RFC 1812 minimum)";
const IPIP_1_FLOW: &str = "pop-forwarder vip (IP-in-IP, XDP_TX), 1 flow";
const IPIP_100K_FLOWS: &str = "pop-forwarder vip (IP-in-IP, XDP_TX), 102400 flows";
const IPIP_NEW_FLOWS: &str = "pop-forwarder vip (IP-in-IP, XDP_TX), every frame a new flow";
/// The lookups of every path but the rows that compare them.
const DEFAULT_LOOKUPS: (Ipv4Lookup, Ipv6Lookup) = (Ipv4Lookup::Dir24, Ipv6Lookup::Dxr);
/// What `--candidate` paths' names end with.
const CANDIDATE: &str = " [candidate]";

#[derive(Clone, Copy)]
struct Settings {
    runs: usize,
    run_time: Duration,
    frame_len: usize,
    full_v4: usize,
    full_v6: usize,
}

#[derive(Serialize, Clone)]
struct Throughput {
    name: String,
    family: &'static str,
    prefixes: usize,
    /// Median over runs, packets per second delivered to the sink.
    delivered_pps: f64,
    sent_pps: f64,
    loss: f64,
    runs: Vec<f64>,
}

#[derive(Serialize, Clone)]
struct Cost {
    name: String,
    prefixes: usize,
    ns_per_packet: f64,
    packets: u64,
    /// ns/packet of each round.
    runs: Vec<f64>,
}

/// A ratio between two paths, taken round by round (the paths run
/// interleaved, so each round's pair saw the same machine): the median and
/// the spread of the per-round ratios.
#[derive(Serialize, Clone, Copy)]
struct Ratio {
    median: f64,
    min: f64,
    max: f64,
}

impl Ratio {
    fn paired(a: &[f64], b: &[f64]) -> Option<Ratio> {
        if a.is_empty() || a.len() != b.len() {
            return None;
        }
        let mut r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
        let median = median(&mut r);
        Some(Ratio {
            median,
            min: r[0],
            max: r[r.len() - 1],
        })
    }
}

#[derive(Serialize, Default)]
struct Report {
    machine: BTreeMap<&'static str, String>,
    throughput: Vec<Throughput>,
    cost: Vec<Cost>,
    control_plane: BTreeMap<String, f64>,
    ratios: BTreeMap<String, Ratio>,
    targets: Vec<(String, bool)>,
}

/// Runs `f` on a thread that has entered `ns`, borrowing freely.
fn in_ns<T: Send>(ns: &Netns, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let file = std::fs::File::open(ns.path())?;
    std::thread::scope(|s| {
        s.spawn(|| {
            use std::os::fd::AsRawFd;
            // SAFETY: setns on our own thread with an fd we own.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error()).context("setns");
            }
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread panicked"))?
    })
}

fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a NUL-terminated name.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => bail!("no interface {name}"),
        i => Ok(i),
    }
}

fn mac(ns: &Netns, ifname: &str) -> Result<Mac> {
    Ok(Mac(ns.mac(ifname)?))
}

/// A lab prepared for benchmarks: the sink on c0, GRO on r0 (it receives
/// XDP-transmitted frames from a0 even when no XDP program runs on it), and
/// permanent neighbours for the gateway in c.
/// Where a path's sink counts: behind the router (c0), on the router's
/// ingress itself (r0: the generator straight into the sink, no router,
/// the harness's own ceiling), or back at the generator's device (a0: for
/// paths that answer out of the ingress with XDP_TX).
#[derive(Clone, Copy, PartialEq, Eq)]
enum SinkAt {
    C0,
    R0,
    A0,
}

struct Bench {
    lab: Lab,
    sink: Sink,
    a0: u32,
    frame_len: usize,
}

impl Bench {
    fn new(frame_len: usize) -> Result<Bench> {
        Bench::with_sink(frame_len, SinkAt::C0)
    }

    fn with_sink(frame_len: usize, at: SinkAt) -> Result<Bench> {
        let lab = Lab::new()?;
        lab.router.run("ethtool", &["-K", "r0", "gro", "on"])?;
        lab.neighbours_c(&["10.0.2.2", "fd00:2::2"])?;
        let sink = match at {
            SinkAt::C0 => in_ns(&lab.c, || Sink::attach("c0"))?,
            SinkAt::R0 => in_ns(&lab.router, || Sink::attach("r0"))?,
            SinkAt::A0 => in_ns(&lab.a, || Sink::attach("a0"))?,
        };
        let a0 = in_ns(&lab.a, || ifindex("a0"))?;
        Ok(Bench {
            lab,
            sink,
            a0,
            frame_len,
        })
    }

    fn flows(&self, routes: &[Prefix]) -> Result<FlowSpec> {
        let v4 = routes[0].addr.is_ipv4();
        Ok(FlowSpec {
            src_mac: mac(&self.lab.a, "a0")?,
            dst_mac: mac(&self.lab.router, "r0")?,
            src: if v4 {
                "10.0.1.2".parse()?
            } else {
                "fd00:1::2".parse()?
            },
            dsts: destinations(routes, DESTINATIONS, SEED ^ 0xd57),
            src_count: 16,
            src_port_count: 64,
            frame_len: self.frame_len,
        })
    }

    /// One run: sends for `run_time`; returns (sent, delivered, seconds).
    fn run_once(&self, generator: &Generator, run_time: Duration) -> Result<(u64, u64, f64)> {
        in_ns(&self.lab.a, || {
            std::thread::sleep(Duration::from_millis(50));
            let before = self.sink.count()?.packets;
            let (sent, took) = generator.send_for(self.a0, run_time, 65536)?;
            // Let the rings drain before reading the sink.
            std::thread::sleep(Duration::from_millis(50));
            let delivered = self.sink.count()?.packets - before;
            Ok((sent, delivered, took.as_secs_f64()))
        })
    }
}

/// The control-plane rows of a full table's load: `count` routes of
/// `family` ("v4", "v6") loaded under `lookup` in `seconds`, the maps
/// holding `mib`.
fn report_load(
    report: &mut Report,
    lookup: &str,
    count: usize,
    family: &str,
    seconds: f64,
    mib: f64,
) {
    report.control_plane.insert(
        format!("pop_{lookup}_load_{count}_{family}_routes_s"),
        seconds,
    );
    report
        .control_plane
        .insert(format!("pop_{lookup}_{count}_{family}_routes_mib"), mib);
    let ip = if family == "v4" { "IPv4" } else { "IPv6" };
    println!(
        "  pop-forwarder ({lookup}): {count} {ip} routes loaded in {seconds:.2} s; maps hold {mib:.1} MiB"
    );
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// Installs `routes` in the router namespace's kernel table via 10.0.2.2 /
/// fd00:2::2 on r1; returns seconds taken.
fn kernel_routes(lab: &Lab, routes: &[Prefix]) -> Result<f64> {
    kernel_batch(lab, routes, "add", ("10.0.2.2", "fd00:2::2"))
}

/// `ip route VERB` for each of `routes`, through c's address `via` (IPv4,
/// IPv6) on r1, in one `ip -batch`; returns how long the kernel took.
fn kernel_batch(lab: &Lab, routes: &[Prefix], verb: &str, via: (&str, &str)) -> Result<f64> {
    let path = std::env::temp_dir().join(format!("pft-bench-routes-{}", std::process::id()));
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
    for p in routes {
        let via = if p.addr.is_ipv4() { via.0 } else { via.1 };
        writeln!(file, "route {verb} {p} via {via} dev r1")?;
    }
    file.flush()?;
    drop(file);
    let start = Instant::now();
    let out = lab.router.ip(&["-batch", path.to_str().context("path")?]);
    let _ = std::fs::remove_file(&path);
    out?;
    Ok(start.elapsed().as_secs_f64())
}

/// pop-forwarder loaded in the router namespace, attached to r0 only (as
/// the bare redirect is), its tables filled with `routes`.
struct Forwarder {
    ebpf: Ebpf,
    tables: Tables,
    load_seconds: f64,
}

/// How the bench's VIP reaches its 16 nodes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum VipPath {
    /// Direct server return: all nodes are c's c0.
    Dsr,
    /// IP-in-IP to 198.19.0.1 to .16, routed back out of r0 to a0: the
    /// packet leaves with XDP_TX, as Katran's does.
    IpipTx,
}

/// The IP-in-IP nodes' prefix (benchmarking space, RFC 2544), routed back
/// out of r0.
const IPIP_NODES: &str = "198.19.0.0/24";

impl Forwarder {
    /// With `vip`, also steers VIP_ADDRESS (UDP port 9, the generator's
    /// destination port: one VIP lookup a packet, as for the common
    /// port-specific VIP; an any-port VIP costs a second, after the
    /// exact port misses) over 16 cache
    /// nodes, by direct server return or IP-in-IP (`VipPath`).
    fn load(
        lab: &Lab,
        object: &[u8],
        routes: &[Prefix],
        (lookup, lookup6): (Ipv4Lookup, Ipv6Lookup),
        vip: Option<VipPath>,
    ) -> Result<Forwarder> {
        let c0 = mac(&lab.c, "c0")?;
        let r1 = mac(&lab.router, "r1")?;
        let a0 = mac(&lab.a, "a0")?;
        let r0 = mac(&lab.router, "r0")?;
        in_ns(&lab.router, || {
            let r1_index = ifindex("r1")?;
            let r0_index = ifindex("r0")?;
            let mut loader = EbpfLoader::new();
            if lookup == Ipv4Lookup::Trie {
                loader
                    .map_max_entries(map_names::IPV4_TBL24, 1)
                    .map_max_entries(map_names::IPV4_TBL8, 1);
            }
            if lookup6 == Ipv6Lookup::Trie {
                loader
                    .map_max_entries(map_names::IPV6_CHUNKS, 1)
                    .map_max_entries(map_names::IPV6_RANGES, 1);
            }
            let mut ebpf = loader.load(object)?;
            let mut tables = Tables::from_ebpf(&mut ebpf)?;
            tables.set_route_miss(RouteMissPolicy::Drop)?;
            tables.set_ipv4_lookup(lookup)?;
            tables.set_ipv6_lookup(lookup6)?;
            // r1 in the egress devmap whatever the routes (the kernel-fib
            // path has none). Here, inside the router's namespace: the
            // kernel resolves a devmap's ifindex in the writer's namespace.
            tables.add_egress(r1_index)?;
            let next_hop = |v4: bool| {
                let mut gateway = [0u8; 16];
                let family = if v4 {
                    gateway[..4].copy_from_slice(&[10, 0, 2, 2]);
                    AF_INET
                } else {
                    gateway = "fd00:2::2".parse::<std::net::Ipv6Addr>().unwrap().octets();
                    AF_INET6
                };
                NextHop {
                    ifindex: r1_index,
                    mtu: 1500,
                    flags: NH_F_IN_USE | NH_F_MAC_VALID | NH_F_MAC_STATIC,
                    dst_mac: c0.0,
                    src_mac: r1.0,
                    gateway,
                    family,
                    vlan_tci: 0,
                    vlan_proto: 0,
                    tx_ifindex: r1_index,
                }
            };
            let batch: Vec<(Prefix, NextHop)> = routes
                .iter()
                .map(|p| (*p, next_hop(p.addr.is_ipv4())))
                .collect();
            let start = Instant::now();
            tables.add_routes(&batch)?;
            let load_seconds = start.elapsed().as_secs_f64();
            if let Some(path) = vip {
                use pop_forwarder_common::{
                    maglev::{DEFAULT_TABLE_SIZE, PoolNode, mix64, populate},
                    steering::{
                        CacheNode, ENCAP_SOURCE_V4, NODE_F_IN_USE, NODE_F_IPIP, NODE_F_MAC_VALID,
                        PROTO_UDP, VipKey,
                    },
                };
                let dsr = CacheNode {
                    ifindex: r1_index,
                    flags: NODE_F_IN_USE | NODE_F_MAC_VALID,
                    dst_mac: c0.0,
                    src_mac: r1.0,
                    addr: [0; 16],
                    family: 4,
                    mtu: 1500,
                };
                if path == VipPath::IpipTx {
                    // The nodes' prefix back out of r0, to a0; the outer
                    // source r0's own address.
                    let back = NextHop {
                        ifindex: r0_index,
                        tx_ifindex: r0_index,
                        dst_mac: a0.0,
                        src_mac: r0.0,
                        gateway: pop_forwarder::steering::widen("10.0.1.2".parse()?),
                        ..next_hop(true)
                    };
                    tables.add_routes(&[(IPIP_NODES.parse()?, back)])?;
                    let mut source = pop_forwarder::steering::widen("10.0.1.1".parse()?);
                    source[4] = 32;
                    tables.set_encap_source(ENCAP_SOURCE_V4, source)?;
                }
                let mut pool = Vec::new();
                for id in 0..16 {
                    let node = match path {
                        VipPath::Dsr => dsr,
                        VipPath::IpipTx => CacheNode {
                            ifindex: 0,
                            flags: NODE_F_IN_USE | NODE_F_IPIP,
                            dst_mac: [0; 6],
                            src_mac: [0; 6],
                            addr: pop_forwarder::steering::widen(std::net::IpAddr::from([
                                198,
                                19,
                                0,
                                1 + id as u8,
                            ])),
                            family: 4,
                            mtu: 0,
                        },
                    };
                    tables.write_node(id, &node)?;
                    pool.push(PoolNode {
                        id,
                        key: mix64(u64::from(id)),
                        weight: 1,
                    });
                }
                let mut table = vec![0u32; DEFAULT_TABLE_SIZE as usize];
                populate(&mut pool, &mut table, &mut [(0, 0, 0, 0); 16]);
                let key = VipKey {
                    addr: pop_forwarder::steering::widen(VIP_ADDRESS.parse()?),
                    port: 9,
                    protocol: PROTO_UDP,
                    family: 4,
                };
                tables.write_vip(0, &key, &table)?;
                tables.set_steering(0, true)?;
            }
            let prog: &mut Xdp = ebpf
                .program_mut(PROGRAM_NAME)
                .context("program")?
                .try_into()?;
            prog.load()?;
            prog.attach("r0", XdpMode::Driver)?;
            Ok(Forwarder {
                ebpf,
                tables,
                load_seconds,
            })
        })
    }

    fn program(&self) -> Result<&Xdp> {
        Ok(self
            .ebpf
            .program(PROGRAM_NAME)
            .context("program")?
            .try_into()?)
    }
}

fn machine() -> BTreeMap<&'static str, String> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    BTreeMap::from([
        ("cpu", cpu),
        ("kernel", kernel),
        ("cores", cores.to_string()),
    ])
}

/// What forwards in a scenario's router namespace.
enum Router {
    Linux,
    Redirect(BareRedirect),
    Pop(Box<Forwarder>),
    /// No router: the generator straight into the sink. The cost shown is
    /// the generator's own program.
    None,
}

/// One path under test, set up once and kept alive so that runs of all
/// paths can be interleaved: drift in this VM's speed then falls on every
/// path alike instead of on whichever ran last.
/// The generator's flows for a path, other than the default 16 sources x
/// 64 source ports: within each 4,096 frames the source stays and the
/// port steps, so with 64 ports a flow's next frame comes 64 frames later
/// and with 4,096 a whole cycle of sources later.
#[derive(Clone, Copy)]
struct Flows {
    sources: u32,
    ports: u32,
    warm_up: Duration,
}

const WARM_UP: Duration = Duration::from_millis(300);

struct Scenario {
    name: String,
    family: &'static str,
    prefixes: usize,
    bench: Bench,
    router: Router,
    generator: Generator,
    /// Measure delivered pps (besides ns/packet for XDP paths).
    throughput: bool,
    /// Traffic sent before the rounds (neighbour entries, page pools,
    /// caches; the connection table, for the rows that fill it).
    warm_up: Duration,
    runs: Vec<(u64, u64, f64)>,
    /// (ns, packets) the program ran, per round.
    cost: Vec<(u64, u64)>,
}

impl Scenario {
    fn program(&self) -> Result<Option<&Xdp>> {
        Ok(match &self.router {
            Router::Linux => None,
            Router::Redirect(r) => Some(r.ebpf.program(r.program).context("program")?.try_into()?),
            Router::Pop(f) => Some(f.program()?),
            Router::None => Some(self.generator.program()?),
        })
    }
}

/// What `bench --help` prints; any other argument than these is refused.
const USAGE: &str = "\
usage: bench [--quick] [--only=SECTIONS] [--row=TEXT] [--run-ms=N] [--candidate=OBJECT] [--out=DIR]

  --quick             one short round, smaller tables: checks the harness, not the numbers
  --only=SECTIONS     set up only these paths, comma-separated, from
                      daemon,mirror,linux,redirect,pop,vip,deny,fib (the harness rows always run)
  --row=TEXT          keep only the paths whose name holds TEXT
  --run-ms=N          how long each run sends, in milliseconds
  --candidate=OBJECT  run every pop and vip path, and the deny section's floods, also with
                      OBJECT (a build of the XDP program), interleaved, and print its
                      cost and rate against the shipped one
  --out=DIR           where bench.md and bench.json go (default target/bench)

Needs root; sets up network namespaces of its own.";

/// The sections `--only` picks from.
const SECTIONS: [&str; 8] = [
    "daemon", "mirror", "linux", "redirect", "pop", "vip", "deny", "fib",
];

/// Refuses an argument the bench does not take (a typo would otherwise
/// run the whole bench, ten minutes, with the option ignored).
fn check_args(args: &[String]) -> Result<()> {
    const VALUED: [&str; 5] = ["--only=", "--row=", "--run-ms=", "--candidate=", "--out="];
    for a in args {
        if a == "--quick" {
            continue;
        }
        match VALUED.iter().find(|p| a.starts_with(*p)) {
            Some(&"--only=") => {
                for section in a["--only=".len()..].split(',') {
                    if !SECTIONS.contains(&section) {
                        bail!(
                            "--only: no section {section:?} (sections: {})",
                            SECTIONS.join(",")
                        );
                    }
                }
            }
            Some(p) if a.len() > p.len() => {}
            Some(p) => bail!("{p} takes a value"),
            None => bail!("unknown argument {a:?}\n\n{USAGE}"),
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return Ok(());
    }
    check_args(&args)?;
    let quick = args.iter().any(|a| a == "--quick");
    // --only=daemon,mirror,linux,redirect,pop,vip,deny,fib: set up only some paths
    // (for working on one).
    let only: Option<Vec<String>> = args
        .iter()
        .find_map(|a| a.strip_prefix("--only="))
        .map(|v| v.split(',').map(str::to_owned).collect());
    let wanted = |section: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == section));
    // --row=TEXT keeps only the paths whose name holds TEXT, and
    // --run-ms=N sets how long each run sends: with both, one path runs
    // long enough to profile (perf record) while the rest of the bench is
    // skipped. The ratios and targets of missing paths are not printed.
    let row: Option<String> = args
        .iter()
        .find_map(|a| a.strip_prefix("--row="))
        .map(str::to_owned);
    let run_ms: Option<u64> = match args.iter().find_map(|a| a.strip_prefix("--run-ms=")) {
        Some(ms) => Some(
            ms.parse()
                .context("--run-ms takes a number of milliseconds")?,
        ),
        None => None,
    };
    // --candidate=OBJECT: every pop-forwarder path of the pop and vip
    // sections runs twice, with the shipped program and with OBJECT (a
    // build of the XDP program with a change to weigh), interleaved in
    // every round; the ratios table gives each candidate path's cost and
    // delivered rate against the shipped one's, round by round.
    let candidate: Option<Vec<u8>> = match args.iter().find_map(|a| a.strip_prefix("--candidate="))
    {
        Some(path) => {
            Some(std::fs::read(path).with_context(|| format!("--candidate: reading {path}"))?)
        }
        None => None,
    };
    let mut objects: Vec<(&str, &[u8])> = vec![("", EBPF_OBJECT)];
    if let Some(c) = &candidate {
        objects.push((CANDIDATE, c));
    }
    let out_dir = PathBuf::from(
        args.iter()
            .find_map(|a| a.strip_prefix("--out="))
            .unwrap_or("target/bench"),
    );
    let settings = if quick {
        Settings {
            runs: 1,
            run_time: Duration::from_millis(500),
            frame_len: 64,
            full_v4: 100_000,
            full_v6: 20_000,
        }
    } else {
        Settings {
            runs: 5,
            run_time: Duration::from_secs(1),
            frame_len: 64,
            full_v4: 1_000_000,
            full_v6: 200_000,
        }
    };
    let settings = match run_ms {
        Some(ms) => Settings {
            run_time: Duration::from_millis(ms),
            ..settings
        },
        None => settings,
    };
    let (full_v4, full_v6) = (settings.full_v4, settings.full_v6);
    let mut report = Report {
        machine: machine(),
        ..Default::default()
    };
    println!("== machine: {:?}", report.machine);

    let v4_small = routes_v4(1_000, SEED);
    let v4_mid = routes_v4(100_000, SEED);
    let v4_full = routes_v4(full_v4, SEED);
    // The `traffic of SMALL_TABLE routes` row rests on this.
    anyhow::ensure!(
        v4_full[..SMALL_TABLE] == v4_small[..] && v4_mid[..SMALL_TABLE] == v4_small[..],
        "the small IPv4 table is not the first {SMALL_TABLE} routes of the larger ones"
    );
    let v6_small = routes_v6(1_000, SEED);
    let v6_full = routes_v6(full_v6, SEED);
    anyhow::ensure!(
        v6_full[..SMALL_TABLE] == v6_small[..],
        "the small IPv6 table is not the first {SMALL_TABLE} routes of the full one"
    );
    // How many of the IPv6 path's lookups the range table answers from
    // the /20's entry alone: the full table built in user space with
    // the common crate's code, probed at the bench's destinations.
    {
        use pop_forwarder_common::dxr6::{CHUNK_WORDS, Dxr6, Tables6, chunk_index, find_inline};
        let mut chunks = vec![0u64; (dxr6::CHUNKS * CHUNK_WORDS) as usize];
        let mut ranges = vec![0u64; dxr6::RANGE_SLOTS as usize];
        let mut t = Tables6 {
            chunks: &mut chunks,
            ranges: &mut ranges,
        };
        let mut table = Dxr6::adopt(&t, []).map_err(|e| anyhow::anyhow!("{e}"))?;
        let batch: Vec<(u128, u8, u32)> = v6_full
            .iter()
            .map(|p| match p.addr {
                std::net::IpAddr::V6(a) => (u128::from(a), p.len, 1),
                std::net::IpAddr::V4(_) => unreachable!("routes_v6 gives IPv6 prefixes"),
            })
            .collect();
        table
            .insert_many(&mut t, &batch, &mut Vec::new())
            .map_err(|(e, _)| anyhow::anyhow!("{e}"))?;
        let dsts = destinations(&v6_full, DESTINATIONS, SEED ^ 0xd57);
        let in_line = dsts
            .iter()
            .filter(|d| {
                let std::net::IpAddr::V6(a) = d else {
                    return false;
                };
                let hi = (u128::from(*a) >> 64) as u64;
                let at = (chunk_index(hi) * CHUNK_WORDS) as usize;
                let words = chunks[at..at + CHUNK_WORDS as usize].try_into().unwrap();
                find_inline(words, hi).is_some()
            })
            .count();
        let pct = 100.0 * in_line as f64 / dsts.len() as f64;
        report
            .control_plane
            .insert(format!("ipv6_dxr_{full_v6}_lookups_in_line_pct"), pct);
        println!(
            "== IPv6 range table, {full_v6} prefixes: {pct:.1} % of the bench's destinations are answered from their /20's entry"
        );
    }
    let family = |routes: &[Prefix]| {
        if routes[0].addr.is_ipv4() {
            "ipv4"
        } else {
            "ipv6"
        }
    };

    // Control plane: rebuilding a Maglev table (65,537 entries) for 1,000
    // cache nodes, median of 5, as the daemon would on a pool change.
    {
        use pop_forwarder_common::maglev::{DEFAULT_TABLE_SIZE, PoolNode, populate};
        let nodes: Vec<PoolNode> = (0..1000)
            .map(|i| PoolNode {
                id: i,
                key: pop_forwarder_common::maglev::mix64(10_000 + u64::from(i)),
                weight: 1 + i % 4,
            })
            .collect();
        let mut times = Vec::new();
        for _ in 0..5 {
            let mut pool = nodes.clone();
            let mut table = vec![0u32; DEFAULT_TABLE_SIZE as usize];
            let mut scratch = vec![(0, 0, 0, 0); pool.len()];
            let start = Instant::now();
            populate(&mut pool, &mut table, &mut scratch);
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        let ms = median(&mut times);
        report
            .control_plane
            .insert("maglev_rebuild_1000_nodes_ms".into(), ms);
        println!(
            "== Maglev table of {DEFAULT_TABLE_SIZE} entries for 1,000 nodes rebuilt in {ms:.2} ms"
        );
    }

    // What the verifier makes of the program: the instructions it walked
    // (the kernel refuses a program past 1,000,000) and how long a load
    // takes (every start and restart pays it). A change that adds paths
    // can multiply the walk without adding many instructions. A candidate
    // (--candidate) gets the same rows, named `candidate_program_...`.
    for &(suffix, object) in &objects {
        let mut ebpf = Ebpf::load(object).context("loading the object")?;
        let xdp: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .context("the program")?
            .try_into()?;
        let start = Instant::now();
        xdp.load().context("the verifier refused the program")?;
        let seconds = start.elapsed().as_secs_f64();
        let walked = xdp.info()?.verified_instruction_count().unwrap_or(0);
        let (prefix, whose) = if suffix.is_empty() {
            ("", "the program")
        } else {
            ("candidate_", "the candidate")
        };
        report
            .control_plane
            .insert(format!("{prefix}program_verified_insns"), f64::from(walked));
        report
            .control_plane
            .insert(format!("{prefix}program_verify_s"), seconds);
        println!(
            "== the verifier walked {walked} instructions of {whose} (limit 1,000,000) in {seconds:.2} s"
        );
    }

    // Maglev's balance and disruption with 100 nodes of weights 1 to 4:
    // the largest deviation of a node's share from its weight share
    // (relative), and the entries that change owner when one node goes,
    // against the 1/N that must.
    {
        use pop_forwarder_common::maglev::{DEFAULT_TABLE_SIZE, PoolNode, mix64, populate};
        let build = |pool: &[PoolNode]| {
            let mut pool = pool.to_vec();
            let mut table = vec![0u32; DEFAULT_TABLE_SIZE as usize];
            let mut scratch = vec![(0, 0, 0, 0); pool.len()];
            populate(&mut pool, &mut table, &mut scratch);
            table
        };
        let pool: Vec<PoolNode> = (0..100u32)
            .map(|i| PoolNode {
                id: i,
                key: mix64(u64::from(i) + 7),
                weight: 1 + i % 4,
            })
            .collect();
        let table = build(&pool);
        let total: u32 = pool.iter().map(|n| n.weight).sum();
        let mut counts = vec![0u32; 100];
        for &id in &table {
            counts[id as usize] += 1;
        }
        let worst = pool
            .iter()
            .map(|n| {
                let want = f64::from(n.weight) / f64::from(total);
                (f64::from(counts[n.id as usize]) / f64::from(DEFAULT_TABLE_SIZE) - want).abs()
                    / want
            })
            .fold(0.0f64, f64::max);
        let equal: Vec<PoolNode> = pool.iter().map(|n| PoolNode { weight: 1, ..*n }).collect();
        let before = build(&equal);
        let after = build(&equal[1..]);
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count() as f64
            / f64::from(DEFAULT_TABLE_SIZE);
        report.control_plane.insert(
            "maglev_balance_worst_relative_error_pct".into(),
            worst * 100.0,
        );
        report
            .control_plane
            .insert("maglev_moved_when_1_of_100_goes_pct".into(), moved * 100.0);
        println!(
            "== Maglev, 100 weighted nodes: worst share {:.2} % off its weight; one of 100 equal nodes gone moves {:.2} % of entries (1/N = 1 %)",
            worst * 100.0,
            moved * 100.0
        );
    }

    println!("== setting up every path (each in a lab of its own)");
    let mut scenarios = Vec::new();
    // The harness's own ceiling, in every run: generators straight into
    // the sink, no router. `pop-forwarder generate`'s program (the one
    // every other path is fed by), and the least a live-frames generator
    // can do (the template copied over each frame, a devmap redirect).
    // And the minimal generator through the bare redirect, beside the
    // bare redirect fed by `generate` (below): what the harness costs a
    // path with a router.
    for (name, minimal, redirect) in [
        ("generator ceiling (generate -> sink)", false, false),
        ("minimal generator -> sink", true, false),
        ("minimal generator -> bare redirect", true, true),
    ] {
        let bench = Bench::with_sink(
            settings.frame_len,
            if redirect { SinkAt::C0 } else { SinkAt::R0 },
        )?;
        let router = if redirect {
            Router::Redirect(in_ns(&bench.lab.router, || {
                BareRedirect::attach("r0", ifindex("r1")?)
            })?)
        } else {
            Router::None
        };
        let spec = bench.flows(&v4_small)?;
        let generator = if minimal {
            // A devmap entry names its device in the writer's namespace:
            // written from a's, where a0 is.
            in_ns(&bench.lab.a, || Generator::minimal(&spec, "a0"))?
        } else {
            Generator::new(&spec)?
        };
        scenarios.push(Scenario {
            name: name.into(),
            family: "IPv4",
            prefixes: 0,
            bench,
            router,
            generator,
            throughput: true,
            warm_up: WARM_UP,
            runs: Vec::new(),
            cost: Vec::new(),
        });
    }
    // `from`: the destinations come from the first `from` routes only. With
    // HOT_ROUTES the table's few lines and pages they touch stay cached: the
    // program's cost without its memory misses. With SMALL_TABLE, the full
    // table gets the small table's traffic: what the table's size costs.
    let mut add = |name: String,
                   routes: &[Prefix],
                   bench: Bench,
                   router: Router,
                   throughput: bool,
                   from: Option<usize>,
                   flows: Option<Flows>|
     -> Result<()> {
        let from = &routes[..from.unwrap_or(routes.len()).min(routes.len())];
        let mut spec = bench.flows(from)?;
        if let Some(f) = flows {
            spec.src_count = f.sources;
            spec.src_port_count = f.ports;
        }
        let generator = Generator::new(&spec)?;
        let family = if routes[0].addr.is_ipv4() {
            "IPv4"
        } else {
            "IPv6"
        };
        let prefixes = match &router {
            Router::Redirect(r) if r.program != "bench_route" => 0,
            Router::None => 0,
            _ => routes.len(),
        };
        scenarios.push(Scenario {
            name,
            family,
            prefixes,
            bench,
            router,
            generator,
            throughput,
            warm_up: flows.map_or(WARM_UP, |f| f.warm_up),
            runs: Vec::new(),
            cost: Vec::new(),
        });
        Ok(())
    };
    // The daemon with large static tables (a routes file): validating,
    // starting, reloading a file that changes one route, and restarting
    // (adopting the pinned tables), each timed once, before the forwarding
    // rounds so that their tables are gone by then.
    if wanted("daemon") {
        for count in [100_000, full_v4] {
            daemon_rows(&mut report, &v4_full[..count])?;
        }
    }
    if wanted("mirror") {
        mirror_rows(&mut report, &v4_full)?;
        mirror_arrival_rows(&mut report, &v4_full)?;
    }
    if wanted("linux") {
        for routes in [&v4_small, &v4_full, &v6_small] {
            let bench = Bench::new(settings.frame_len)?;
            bench.lab.router.sysctl("net.ipv4.ip_forward", "1")?;
            bench
                .lab
                .router
                .sysctl("net.ipv6.conf.all.forwarding", "1")?;
            let secs = kernel_routes(&bench.lab, routes)?;
            if routes.len() == full_v4 {
                report
                    .control_plane
                    .insert(format!("linux_load_{full_v4}_v4_routes_s"), secs);
                println!(
                    "  Linux: {full_v4} IPv4 routes into the kernel's table with ip -batch in {secs:.1} s"
                );
            }
            add(
                format!("linux {}", family(routes)),
                routes,
                bench,
                Router::Linux,
                true,
                None,
                None,
            )?;
        }
    }
    if wanted("redirect") {
        let bench = Bench::new(settings.frame_len)?;
        let redirect = in_ns(&bench.lab.router, || {
            BareRedirect::attach("r0", ifindex("r1")?)
        })?;
        add(
            "bare redirect".into(),
            &v4_small,
            bench,
            Router::Redirect(redirect),
            true,
            None,
            None,
        )?;
        // The floor router (`bench_route`): the least an IPv4 router with
        // a DIR-24-8 table does, on the small table and its traffic. The
        // rate no router with this table reaches past on this lab. And
        // its cost with the destinations drawn from four routes, whose few
        // table lines and pages stay cached: its own work without the
        // table's misses, beside pop-forwarder's `hot routes` row.
        for (name, throughput, from) in [
            (FLOOR_ROUTER.to_owned(), true, None),
            (
                format!("{FLOOR_ROUTER}, {HOT_ROUTES} hot routes"),
                false,
                Some(HOT_ROUTES),
            ),
        ] {
            let bench = Bench::new(settings.frame_len)?;
            let (c0, r1) = (mac(&bench.lab.c, "c0")?, mac(&bench.lab.router, "r1")?);
            let floor = in_ns(&bench.lab.router, || {
                BareRedirect::attach_floor("r0", ifindex("r1")?, &v4_small, c0, r1)
            })?;
            add(
                name,
                &v4_small,
                bench,
                Router::Redirect(floor),
                throughput,
                from,
                None,
            )?;
        }
    }
    if wanted("pop") {
        let dir24_mib = f64::from(TBL24_ENTRIES + TBL8_ENTRIES) * 4.0 / f64::from(1 << 20);
        let dxr6_mib = f64::from(dxr6::CHUNKS * dxr6::CHUNK_WORDS + dxr6::RANGE_SLOTS) * 8.0
            / f64::from(1 << 20);
        // (routes, lookup, throughput measured, destinations from the
        // first so many routes)
        let dxr = Ipv6Lookup::Dxr;
        type Case<'a> = (
            &'a Vec<Prefix>,
            (Ipv4Lookup, Ipv6Lookup),
            bool,
            Option<usize>,
        );
        let cases: [Case; 13] = [
            (&v4_small, (Ipv4Lookup::Dir24, dxr), true, None),
            (&v4_mid, (Ipv4Lookup::Dir24, dxr), false, None),
            (&v4_full, (Ipv4Lookup::Dir24, dxr), true, None),
            (&v4_full, (Ipv4Lookup::Dir24, dxr), false, Some(SMALL_TABLE)),
            (&v4_full, (Ipv4Lookup::Dir24, dxr), false, Some(HOT_ROUTES)),
            (&v4_small, (Ipv4Lookup::Trie, dxr), true, None),
            (&v4_mid, (Ipv4Lookup::Trie, dxr), false, None),
            (&v4_full, (Ipv4Lookup::Trie, dxr), true, None),
            (&v6_small, (Ipv4Lookup::Dir24, dxr), true, None),
            (&v6_full, (Ipv4Lookup::Dir24, dxr), false, None),
            (&v6_full, (Ipv4Lookup::Dir24, dxr), false, Some(SMALL_TABLE)),
            (&v6_small, (Ipv4Lookup::Dir24, Ipv6Lookup::Trie), true, None),
            (&v6_full, (Ipv4Lookup::Dir24, Ipv6Lookup::Trie), false, None),
        ];
        for (routes, (lookup, lookup6), throughput, from) in cases {
            if quick
                && routes.len() == v4_mid.len()
                && routes.len() == full_v4
                && !throughput
                && from.is_none()
            {
                continue; // --quick: the mid table is the full one
            }
            for &(suffix, object) in &objects {
                let bench = Bench::new(settings.frame_len)?;
                let before = (map_memlock(1, 8)?, map_memlock(11, 8)?);
                let before6 = map_memlock(11, 20)?;
                let fwd = Forwarder::load(&bench.lab, object, routes, (lookup, lookup6), None)?;
                let v4 = routes[0].addr.is_ipv4();
                let shipped = suffix.is_empty();
                let full = if v4 { full_v4 } else { full_v6 };
                if shipped && routes.len() == full && from.is_none() {
                    let (label, family, mib) = if v4 {
                        // The IPv4 route record (BPF_MAP_TYPE_HASH, 1, 8-byte
                        // keys) and trie (BPF_MAP_TYPE_LPM_TRIE, 11; empty
                        // under DIR-24-8) this forwarder added, and its
                        // DIR-24-8 arrays.
                        let after = (map_memlock(1, 8)?, map_memlock(11, 8)?);
                        let maps = ((after.0 - before.0) + (after.1 - before.1)) as f64
                            / f64::from(1 << 20);
                        let arrays = if lookup == Ipv4Lookup::Dir24 {
                            dir24_mib
                        } else {
                            0.0
                        };
                        (lookup.to_string(), "v4", maps + arrays)
                    } else {
                        // The IPv6 record and trie (BPF_MAP_TYPE_LPM_TRIE,
                        // 20-byte keys) this forwarder added, and the range
                        // table's arrays.
                        let trie = (map_memlock(11, 20)? - before6) as f64 / f64::from(1 << 20);
                        let arrays = if lookup6 == Ipv6Lookup::Dxr {
                            dxr6_mib
                        } else {
                            0.0
                        };
                        (lookup6.to_string(), "v6", trie + arrays)
                    };
                    report_load(&mut report, &label, full, family, fwd.load_seconds, mib);
                }
                let name = match (v4, from) {
                    (true, None) => format!("pop-forwarder ipv4 {lookup}"),
                    (true, Some(HOT_ROUTES)) => {
                        format!("pop-forwarder ipv4 {lookup}, {HOT_ROUTES} hot routes")
                    }
                    (true, Some(n)) => {
                        format!("pop-forwarder ipv4 {lookup}, traffic of {n} routes")
                    }
                    (false, None) => format!("pop-forwarder ipv6 {lookup6}"),
                    (false, Some(n)) => {
                        format!("pop-forwarder ipv6 {lookup6}, traffic of {n} routes")
                    }
                };
                add(
                    format!("{name}{suffix}"),
                    routes,
                    bench,
                    Router::Pop(Box::new(fwd)),
                    throughput,
                    from,
                    None,
                )?;
            }
        }
    }
    if wanted("vip") {
        // The VIP path: 1,000 routes, and one VIP over 16 nodes; the
        // generator's 16 sources x 64 ports make 1,024 flows to it. By
        // direct server return (counted behind the router), and by
        // IP-in-IP answered out of the ingress (XDP_TX), the path Katran
        // takes, beside a bare XDP_TX program (both counted back at a0).
        let vip = [Prefix {
            addr: VIP_ADDRESS.parse()?,
            len: 32,
        }];
        for (name, path, sink) in [
            ("pop-forwarder vip (DSR)", VipPath::Dsr, SinkAt::C0),
            (
                "pop-forwarder vip (IP-in-IP, XDP_TX)",
                VipPath::IpipTx,
                SinkAt::A0,
            ),
        ] {
            for &(suffix, object) in &objects {
                let bench = Bench::with_sink(settings.frame_len, sink)?;
                let fwd =
                    Forwarder::load(&bench.lab, object, &v4_small, DEFAULT_LOOKUPS, Some(path))?;
                add(
                    format!("{name}{suffix}"),
                    &vip,
                    bench,
                    Router::Pop(Box::new(fwd)),
                    true,
                    None,
                    None,
                )?;
            }
        }
        // The IP-in-IP path by how many flows the connection table holds
        // (the conditions): one; 102,400 (1,600 sources x 64
        // ports), each remembered from its second frame, 64 frames after
        // its first, all of them in the table once the generator has gone
        // through its sources (7 M frames: the warm-up); and none, every
        // frame a new flow (1,024 sources x 4,096 ports: a flow comes back
        // 4 M frames later, after 4 M other new flows have gone through
        // the seen-once table's 262,144 slots).
        for (name, flows) in [
            (
                IPIP_1_FLOW,
                Flows {
                    sources: 1,
                    ports: 1,
                    warm_up: WARM_UP,
                },
            ),
            (
                IPIP_100K_FLOWS,
                Flows {
                    sources: 1600,
                    ports: 64,
                    warm_up: Duration::from_secs(if quick { 1 } else { 10 }),
                },
            ),
            (
                IPIP_NEW_FLOWS,
                Flows {
                    sources: 1024,
                    ports: 4096,
                    warm_up: WARM_UP,
                },
            ),
        ] {
            for &(suffix, object) in &objects {
                let bench = Bench::with_sink(settings.frame_len, SinkAt::A0)?;
                let fwd = Forwarder::load(
                    &bench.lab,
                    object,
                    &v4_small,
                    DEFAULT_LOOKUPS,
                    Some(VipPath::IpipTx),
                )?;
                add(
                    format!("{name}{suffix}"),
                    &vip,
                    bench,
                    Router::Pop(Box::new(fwd)),
                    false,
                    None,
                    Some(flows),
                )?;
            }
        }
        let bench = Bench::with_sink(settings.frame_len, SinkAt::A0)?;
        let tx = in_ns(&bench.lab.router, || BareRedirect::attach_tx("r0"))?;
        add(
            "bare XDP_TX".into(),
            &vip,
            bench,
            Router::Redirect(tx),
            true,
            None,
            None,
        )?;
    }
    // The deny list at 100,000 entries (half by source, half by
    // destination), none matching the traffic: what two LPM-trie lookups
    // that miss cost every packet, beside the same table without them.
    if wanted("deny") {
        let bench = Bench::new(settings.frame_len)?;
        let mut fwd = Forwarder::load(&bench.lab, EBPF_OBJECT, &v4_small, DEFAULT_LOOKUPS, None)?;
        let deny = deny_list(routes_v4(120_000, SEED + 7), &v4_small)?;
        let start = Instant::now();
        fwd.tables.apply_deny(&deny)?;
        let secs = start.elapsed().as_secs_f64();
        report
            .control_plane
            .insert(format!("deny_load_{DENY_ENTRIES}_entries_s"), secs);
        println!("  deny list: {DENY_ENTRIES} entries loaded in {secs:.2} s");
        add(
            format!("pop-forwarder ipv4 dir-24-8, deny list {DENY_ENTRIES}"),
            &v4_small,
            bench,
            Router::Pop(Box::new(fwd)),
            true,
            None,
            None,
        )?;
        // A flood the list denies: the same traffic, the list's last
        // 1,000 destination entries swapped for the routes' own prefixes,
        // so that every packet matches one (after its source missed).
        // Nothing reaches the sink: its cost alone is measured. And the
        // same for IPv6: 100,000 IPv6 entries (/48 to /32), the last 1,000
        // destination ones the 1k IPv6 table's prefixes, its traffic sent.
        let flood = flood_of(deny, &v4_small);
        let flood6 = flood_of(
            deny_list(routes_v6(120_000, SEED + 8), &v6_small)?,
            &v6_small,
        );
        // With --candidate, both floods run with each program.
        for &(suffix, object) in &objects {
            for (family, routes, list) in [
                ("ipv4 dir-24-8", &v4_small, &flood),
                ("ipv6 dxr", &v6_small, &flood6),
            ] {
                let bench = Bench::new(settings.frame_len)?;
                let mut fwd = Forwarder::load(&bench.lab, object, routes, DEFAULT_LOOKUPS, None)?;
                fwd.tables.apply_deny(list)?;
                add(
                    format!(
                        "pop-forwarder {family}, deny list {DENY_ENTRIES}, every packet denied{suffix}"
                    ),
                    routes,
                    bench,
                    Router::Pop(Box::new(fwd)),
                    false,
                    None,
                    None,
                )?;
            }
        }
    }
    // route_lookup = "kernel-fib": the program asks the kernel's FIB per
    // packet (bpf_fib_lookup), the kernel's table holding the routes, as
    // Linux's own forwarding path does; the program's tables stay empty.
    if wanted("fib") {
        for routes in [&v4_small, &v4_full] {
            let bench = Bench::new(settings.frame_len)?;
            bench.lab.router.sysctl("net.ipv4.ip_forward", "1")?;
            kernel_routes(&bench.lab, routes)?;
            let mut fwd = Forwarder::load(&bench.lab, EBPF_OBJECT, &[], DEFAULT_LOOKUPS, None)?;
            fwd.tables.set_route_lookup(RouteLookup::KernelFib)?;
            add(
                "pop-forwarder ipv4 kernel-fib".into(),
                routes,
                bench,
                Router::Pop(Box::new(fwd)),
                true,
                None,
                None,
            )?;
        }
    }

    if let Some(row) = &row {
        scenarios.retain(|s| s.name.contains(row.as_str()));
        anyhow::ensure!(
            !scenarios.is_empty(),
            "--row={row}: no path's name holds it"
        );
    }
    println!(
        "== throughput: {} rounds of {:?} per path, paths interleaved (BPF statistics off)",
        settings.runs, settings.run_time
    );
    for s in &scenarios {
        s.bench.run_once(&s.generator, s.warm_up)?;
    }
    for round in 0..settings.runs {
        for s in scenarios.iter_mut().filter(|s| s.throughput) {
            let run = s.bench.run_once(&s.generator, settings.run_time)?;
            s.runs.push(run);
        }
        println!("  round {} of {} done", round + 1, settings.runs);
    }
    // What each pop-forwarder path did with the packets: a path whose
    // packets went to the kernel, or were dropped, shows it here.
    for s in &scenarios {
        if let Router::Pop(f) = &s.router {
            let counters = f.tables.stats(&[])?.counters;
            let outcomes: Vec<String> = counters
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(name, n)| format!("{name} {n}"))
                .collect();
            println!(
                "  {} ({} prefixes): {}",
                s.name,
                s.prefixes,
                outcomes.join(", ")
            );
        }
    }

    println!("== per-packet cost: kernel bpf_stats while traffic flows, paths interleaved");
    let stats = BpfStats::enable()?;
    for _ in 0..settings.runs {
        for s in scenarios.iter_mut() {
            let Some(prog) = s.program()? else {
                continue;
            };
            let before = prog.info()?;
            s.bench.run_once(&s.generator, settings.run_time)?;
            let after = s.program()?.context("program")?.info()?;
            s.cost.push((
                (after.run_time() - before.run_time()).as_nanos() as u64,
                after.run_count() - before.run_count(),
            ));
        }
    }
    drop(stats);

    for s in &scenarios {
        if s.throughput {
            let mut delivered: Vec<f64> = s.runs.iter().map(|r| r.1 as f64 / r.2).collect();
            let mut sent: Vec<f64> = s.runs.iter().map(|r| r.0 as f64 / r.2).collect();
            let (tot_sent, tot_del) = s
                .runs
                .iter()
                .fold((0u64, 0u64), |a, r| (a.0 + r.0, a.1 + r.1));
            let t = Throughput {
                name: s.name.clone(),
                family: s.family,
                prefixes: s.prefixes,
                runs: delivered.clone(),
                delivered_pps: median(&mut delivered),
                sent_pps: median(&mut sent),
                // The sink also counts the odd neighbour-discovery frame, so
                // a lossless run can come out a hair above what was sent.
                loss: (1.0 - tot_del as f64 / tot_sent.max(1) as f64).max(0.0),
            };
            println!(
                "  {:<34} {:>7} prefixes  {:>6.2} Mpps delivered  (sent {:.2} Mpps, loss {:.1} %)",
                t.name,
                t.prefixes,
                t.delivered_pps / 1e6,
                t.sent_pps / 1e6,
                t.loss * 100.0
            );
            report.throughput.push(t);
        }
        let (ns, packets) = s.cost.iter().fold((0, 0), |a, r| (a.0 + r.0, a.1 + r.1));
        if packets > 0 {
            let c = Cost {
                name: s.name.clone(),
                prefixes: s.prefixes,
                ns_per_packet: ns as f64 / packets as f64,
                packets,
                runs: s
                    .cost
                    .iter()
                    .map(|r| r.0 as f64 / r.1.max(1) as f64)
                    .collect(),
            };
            println!(
                "  {:<34} {:>7} prefixes  {:>6.1} ns/packet over {} packets",
                c.name, c.prefixes, c.ns_per_packet, c.packets
            );
            report.cost.push(c);
        }
    }
    summarise(&mut report, full_v4, full_v6);
    write_report(&report, &out_dir)
}

/// Control-plane rows for one table size: `check`, `run` until it
/// forwards, a `reload` of a file that changes one route (time and table
/// writes), a restart that adopts the pinned tables, and the daemon's peak
/// memory.
fn daemon_rows(report: &mut Report, routes: &[Prefix]) -> Result<()> {
    let n = routes.len();
    let lab = Lab::new()?;
    tests::neighbour_c_v4(&lab);
    let cleanup = tests::TempPath::new("bench");
    let dir = cleanup.0.clone();
    std::fs::create_dir_all(&dir)?;
    let routes_file = dir.join("routes.txt");
    // The routes file: `routes` through gateway `via` on r1.
    let write_routes = |via: &str, routes: &mut dyn Iterator<Item = &Prefix>| -> Result<()> {
        let mut text = String::with_capacity(n * 40);
        for p in routes {
            writeln!(text, "{p} via {via} dev r1")?;
        }
        std::fs::write(&routes_file, text)?;
        Ok(())
    };
    write_routes("10.0.2.2", &mut routes.iter())?;
    let config = format!(
        "routes_file = \"{}\"\n{}",
        routes_file.display(),
        lab.config("pass", "")
    );
    let config_path = dir.join("pop.toml");
    std::fs::write(&config_path, &config)?;
    let mut row = |name: String, value: f64| {
        println!("== {name}: {value:.2}");
        report.control_plane.insert(name, value);
    };

    let start = Instant::now();
    let out = std::process::Command::new(tests::binary())
        .args(["check", "--config"])
        .arg(&config_path)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "check: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    row(
        format!("daemon_check_{n}_v4_routes_s"),
        start.elapsed().as_secs_f64(),
    );

    let start = Instant::now();
    let mut fwd = tests::Forwarder::start(&lab.router, &config)?;
    row(
        format!("daemon_start_{n}_v4_routes_s"),
        start.elapsed().as_secs_f64(),
    );

    // One route gone, another in its place.
    let other: Prefix = "198.18.77.0/24".parse()?;
    write_routes("10.0.2.2", &mut routes[1..].iter().chain([&other]))?;
    let start = Instant::now();
    let out = fwd.cli_ok(&["reload"])?;
    row(
        format!("daemon_reload_{n}_one_route_changed_s"),
        start.elapsed().as_secs_f64(),
    );
    anyhow::ensure!(
        out.contains("1 routes added, 0 changed, 1 deleted"),
        "reload: {out}"
    );
    let writes: f64 = out
        .rsplit_once('(')
        .and_then(|(_, w)| w.split_whitespace().next())
        .and_then(|w| w.parse().ok())
        .with_context(|| format!("no table writes in {out:?}"))?;
    row(
        format!("daemon_reload_{n}_one_route_changed_table_writes"),
        writes,
    );

    row(
        format!("daemon_peak_rss_{n}_v4_routes_mib"),
        status_mib(fwd.pid(), "VmHWM")?,
    );

    // Every route moved to another gateway (a routes file written anew):
    // one change of the whole table, each route's old target journaled
    // until it commits.
    write_routes("10.0.2.3", &mut routes[1..].iter().chain([&other]))?;
    let start = Instant::now();
    let out = fwd.cli_ok(&["reload"])?;
    row(
        format!("daemon_reload_{n}_every_route_moved_s"),
        start.elapsed().as_secs_f64(),
    );
    anyhow::ensure!(
        out.contains(&format!("0 routes added, {n} changed, 0 deleted")),
        "reload: {out}"
    );
    row(
        format!("daemon_peak_rss_{n}_v4_routes_every_route_moved_mib"),
        status_mib(fwd.pid(), "VmHWM")?,
    );

    fwd.stop()?;
    let start = Instant::now();
    fwd.run_again(&lab.router, &[])?;
    row(
        format!("daemon_restart_adopting_{n}_v4_routes_s"),
        start.elapsed().as_secs_f64(),
    );
    fwd.cli_ok(&["detach"])?;
    drop(cleanup);
    Ok(())
}

/// The kernel-table mirror (`route_source = "kernel"`): `routes` loaded
/// into the router namespace's main table with `ip -batch`, then the daemon
/// started on it (its start reads the table whole and waits for nothing
/// else: the time until XDP forwards on every route), its peak memory;
/// how long it takes to follow one route added in the kernel, a burst of
/// changed routes, an address with a new subnet, a reload and a route
/// after it; and its heap once it runs.
fn mirror_rows(report: &mut Report, routes: &[Prefix]) -> Result<()> {
    let n = routes.len();
    let lab = Lab::new()?;
    tests::neighbour_c_v4(&lab);
    let mut row = |name: String, value: f64| {
        println!("== {name}: {value:.2}");
        report.control_plane.insert(name, value);
    };
    row(
        format!("linux_load_{n}_v4_routes_for_mirror_s"),
        kernel_routes(&lab, routes)?,
    );
    let config = format!("route_source = \"kernel\"\n{}", lab.config("pass", ""));
    let start = Instant::now();
    let fwd = tests::Forwarder::start(&lab.router, &config)?;
    row(
        format!("mirror_start_{n}_kernel_v4_routes_s"),
        start.elapsed().as_secs_f64(),
    );
    row(
        format!("mirror_peak_rss_{n}_kernel_v4_routes_mib"),
        status_mib(fwd.pid(), "VmHWM")?,
    );
    let route_to_c = |prefix: &str| {
        lab.router
            .ip(&["route", "add", prefix, "via", "10.0.2.2", "dev", "r1"])
    };
    // One route more in the kernel: until the daemon logs it applied.
    let start = Instant::now();
    route_to_c("198.18.77.0/24")?;
    until_logged(&fwd, 60, "the mirror did not follow", |log| {
        log.contains("1 routes added, 0 changed, 0 deleted")
    })?;
    row(
        format!("mirror_follow_one_route_in_{n}_s"),
        start.elapsed().as_secs_f64(),
    );
    // A burst: a tenth of the table (at most 100,000 routes) moved to
    // another gateway at once, as when a BGP peer's routes move to
    // another, until the daemon has applied every change.
    let burst = &routes[..(n / 10).min(100_000)];
    let changed = |log: &str| -> usize {
        log.lines()
            .filter(|l| l.contains("kernel table") && l.contains(" changed, "))
            .filter_map(|l| {
                let head = l.split(" changed, ").next()?;
                head.rsplit(' ').next()?.parse::<usize>().ok()
            })
            .sum()
    };
    let before = changed(&fwd.log());
    let start = Instant::now();
    let kernel_took = kernel_batch(&lab, burst, "replace", ("10.0.2.3", "fd00:2::3"))?;
    until_logged(&fwd, 300, "the mirror did not follow the burst", |log| {
        changed(log) >= before + burst.len()
    })?;
    let k = burst.len();
    row(format!("linux_replace_{k}_of_{n}_v4_routes_s"), kernel_took);
    row(
        format!("mirror_follow_{k}_changed_routes_in_{n}_s"),
        start.elapsed().as_secs_f64(),
    );
    // An address whose subnet is new: its route planned from the daemon's
    // copy of the table (no kernel read), until the daemon logs it applied.
    let applied = |log: &str| log.matches(" routes added, ").count();
    let before = applied(&fwd.log());
    let start = Instant::now();
    lab.router
        .ip(&["addr", "add", "198.18.78.1/24", "dev", "r1"])?;
    until_logged(&fwd, 120, "the new subnet was not routed", |log| {
        log.contains("connected subnets changed (198.18.78.0/24)") && applied(log) > before
    })?;
    row(
        format!("mirror_subnet_added_{n}_s"),
        start.elapsed().as_secs_f64(),
    );
    // A reload (the config unchanged): until the daemon answers, having
    // applied it.
    let start = Instant::now();
    fwd.cli_ok(&["reload"])?;
    row(
        format!("mirror_reload_{n}_s"),
        start.elapsed().as_secs_f64(),
    );
    // One route more after the reload, until the daemon logs it applied.
    let before = applied(&fwd.log());
    let start = Instant::now();
    route_to_c("198.18.79.0/24")?;
    until_logged(
        &fwd,
        120,
        "the mirror did not follow after a reload",
        |log| applied(log) > before,
    )?;
    row(
        format!("mirror_follow_one_route_after_reload_in_{n}_s"),
        start.elapsed().as_secs_f64(),
    );
    row(
        format!("mirror_peak_rss_with_reload_{n}_kernel_v4_routes_mib"),
        status_mib(fwd.pid(), "VmHWM")?,
    );
    // What the daemon holds of its own once it runs (its heap, without
    // the BPF arrays it maps, which count as shared), once it has handed
    // back what the reload freed (malloc_trim, after its answer).
    std::thread::sleep(Duration::from_secs(2));
    row(
        format!("mirror_heap_{n}_kernel_v4_routes_mib"),
        status_mib(fwd.pid(), "RssAnon")?,
    );
    fwd.cli_ok(&["detach"])?;
    Ok(())
}

/// A full table arriving after the daemon started, as when its BGP session
/// comes up: the daemon started on an empty kernel table, then `routes`
/// loaded into it with `ip -batch`. How long from the load's start until
/// the daemon has logged every route added (in batches of notifications,
/// or by a whole re-read if the notifications overflowed), how many whole
/// re-reads that took, and the daemon's peak memory.
fn mirror_arrival_rows(report: &mut Report, routes: &[Prefix]) -> Result<()> {
    let n = routes.len();
    let lab = Lab::new()?;
    tests::neighbour_c_v4(&lab);
    let config = format!("route_source = \"kernel\"\n{}", lab.config("pass", ""));
    let fwd = tests::Forwarder::start(&lab.router, &config)?;
    let mirror_lines = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains("kernel table") && l.contains(" routes added, "))
            .map(str::to_owned)
            .collect()
    };
    let added = |lines: &[String]| -> usize {
        lines
            .iter()
            .filter_map(|l| {
                let head = l.split(" routes added, ").next()?;
                head.rsplit(' ').next()?.parse::<usize>().ok()
            })
            .sum()
    };
    let start = Instant::now();
    let kernel_took = kernel_routes(&lab, routes)?;
    until_logged(&fwd, 300, "the mirror did not take the table", |log| {
        added(&mirror_lines(log)) >= n
    })?;
    let took = start.elapsed().as_secs_f64();
    let lines = mirror_lines(&fwd.log());
    // A whole re-read logs the table's size, a batch its notifications.
    let whole = lines
        .iter()
        .filter(|l| !l.contains(" notifications, "))
        .count();
    let mut row = |name: String, value: f64| {
        println!("== {name}: {value:.2}");
        report.control_plane.insert(name, value);
    };
    row(
        format!("linux_load_{n}_v4_routes_after_start_s"),
        kernel_took,
    );
    row(format!("mirror_table_arrival_{n}_s"), took);
    row(
        format!("mirror_table_arrival_{n}_batches"),
        (lines.len() - whole) as f64,
    );
    row(
        format!("mirror_table_arrival_{n}_whole_reads"),
        whole as f64,
    );
    row(
        format!("mirror_peak_rss_table_arrival_{n}_mib"),
        status_mib(fwd.pid(), "VmHWM")?,
    );
    fwd.cli_ok(&["detach"])?;
    Ok(())
}

/// Waits, checking every 10 ms for at most `seconds`, until the daemon's
/// log satisfies `done`; else fails with `what` and the log.
fn until_logged(
    fwd: &tests::Forwarder,
    seconds: u64,
    what: &str,
    done: impl Fn(&str) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        let log = fwd.log();
        if done(&log) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{what}:\n{log}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A memory figure of process `pid` from /proc/PID/status, in MiB:
/// `VmHWM` (its peak resident memory so far), `RssAnon` (its own memory
/// resident now, shared mappings left out).
fn status_mib(pid: u32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(kib / 1024.0)
}

/// Removes a directory on drop.
fn find<'a>(r: &'a Report, name: &str, prefixes: usize) -> Option<&'a Throughput> {
    r.throughput
        .iter()
        .find(|t| t.name == name && t.prefixes == prefixes)
}

/// `DENY_ENTRIES` deny-list entries from `candidates`, none over or inside
/// one of `routes`, alternately by source and by destination.
fn deny_list(
    candidates: Vec<Prefix>,
    routes: &[Prefix],
) -> Result<Vec<pop_forwarder::config::Deny>> {
    use pop_forwarder::config::{Deny, DenyDirection};
    let overlaps = |p: &Prefix| {
        routes
            .iter()
            .any(|q| p.contains(q.addr) || q.contains(p.addr))
    };
    let list: Vec<Deny> = candidates
        .into_iter()
        .filter(|p| !overlaps(p))
        .take(DENY_ENTRIES)
        .enumerate()
        .map(|(i, prefix)| Deny {
            direction: if i % 2 == 0 {
                DenyDirection::Source
            } else {
                DenyDirection::Destination
            },
            prefix,
        })
        .collect();
    anyhow::ensure!(list.len() == DENY_ENTRIES, "too few deny prefixes");
    Ok(list)
}

/// `list` with its last destination entries swapped for `routes`, one
/// each: a list that denies every packet of the routes' traffic.
fn flood_of(
    mut list: Vec<pop_forwarder::config::Deny>,
    routes: &[Prefix],
) -> Vec<pop_forwarder::config::Deny> {
    let destinations = list
        .iter_mut()
        .rev()
        .filter(|e| e.direction == pop_forwarder::config::DenyDirection::Destination);
    for (entry, route) in destinations.zip(routes) {
        entry.prefix = *route;
    }
    list
}

fn summarise(report: &mut Report, full_v4: usize, full_v6: usize) {
    // Per-round figures: delivered pps, and ns/packet.
    let pps = |name: &str, n: usize| find(report, name, n).map(|t| t.runs.as_slice());
    let ceiling = report
        .throughput
        .iter()
        .find(|t| t.name == "bare redirect")
        .map(|t| t.runs.as_slice());
    let cost = |name: &str, n: usize| {
        report
            .cost
            .iter()
            .find(|c| c.name == name && c.prefixes == n)
            .map(|c| c.runs.as_slice())
    };
    let mut ratios = BTreeMap::new();
    let mut insert = |key: String, a: Option<&[f64]>, b: Option<&[f64]>| {
        if let Some(r) = a.zip(b).and_then(|(a, b)| Ratio::paired(a, b)) {
            ratios.insert(key, r);
        }
    };
    insert(
        "bare_redirect_vs_linux".into(),
        ceiling,
        pps("linux ipv4", 1_000),
    );
    // The VIP by IP-in-IP with XDP_TX against a bare XDP_TX program: the
    // delivered ratio, and the path's own work (its cost less the bare
    // program's, per round).
    let (ipip, bare_tx) = ("pop-forwarder vip (IP-in-IP, XDP_TX)", "bare XDP_TX");
    insert(
        "vip_ipip_tx_vs_bare_tx".into(),
        pps(ipip, 1),
        pps(bare_tx, 0),
    );
    let own_work = |name: &str| {
        cost(name, 1).zip(cost(bare_tx, 0)).map(|(a, b)| {
            let mut d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
            median(&mut d)
        })
    };
    // (row, control-plane key, what): the IP-in-IP path's own work with
    // 1,024 flows, and by the connection table's state.
    let own_works: Vec<(&str, &str, Option<f64>)> = [
        (ipip, "vip_ipip_tx_own_work_ns", "1,024 flows"),
        (IPIP_1_FLOW, "vip_ipip_tx_1_flow_own_work_ns", "1 flow"),
        (
            IPIP_100K_FLOWS,
            "vip_ipip_tx_102400_flows_own_work_ns",
            "102,400 flows",
        ),
        (
            IPIP_NEW_FLOWS,
            "vip_ipip_tx_new_flows_own_work_ns",
            "every frame a new flow",
        ),
    ]
    .into_iter()
    .map(|(row, key, what)| (key, what, own_work(row)))
    .collect();
    insert(
        "bare_redirect_generate_vs_minimal_generator".into(),
        ceiling,
        pps("minimal generator -> bare redirect", 0),
    );
    insert(
        "generator_ceiling_vs_minimal_generator".into(),
        pps("generator ceiling (generate -> sink)", 0),
        pps("minimal generator -> sink", 0),
    );
    for lookup in [Ipv4Lookup::Dir24, Ipv4Lookup::Trie] {
        let name = format!("pop-forwarder ipv4 {lookup}");
        for (label, n) in [("1k", 1_000), ("full", full_v4)] {
            insert(
                format!("ipv4_{lookup}_{label}_vs_linux"),
                pps(&name, n),
                pps("linux ipv4", n),
            );
            insert(
                format!("ipv4_{lookup}_{label}_vs_ceiling"),
                pps(&name, n),
                ceiling,
            );
        }
        insert(
            format!("ipv4_{lookup}_cost_full_vs_1k"),
            cost(&name, full_v4),
            cost(&name, 1_000),
        );
    }
    // The floor router against the ceiling, and pop-forwarder's small-table
    // path against the floor: how much of the gap to the ceiling any
    // DIR-24-8 router has on this lab, and how much is pop-forwarder's.
    let floor = pps(FLOOR_ROUTER, SMALL_TABLE);
    insert("floor_router_1k_vs_ceiling".into(), floor, ceiling);
    insert(
        "ipv4_dir-24-8_1k_vs_floor_router".into(),
        pps("pop-forwarder ipv4 dir-24-8", SMALL_TABLE),
        floor,
    );
    insert(
        "ipv4_dir-24-8_cost_1k_vs_floor_router".into(),
        cost("pop-forwarder ipv4 dir-24-8", SMALL_TABLE),
        cost(FLOOR_ROUTER, SMALL_TABLE),
    );
    // Diagnostic, not a target: the full table against the small one with
    // the very same traffic, so only the table's size differs.
    insert(
        "ipv4_dir-24-8_cost_full_vs_1k_same_traffic".into(),
        cost(
            &format!("pop-forwarder ipv4 dir-24-8, traffic of {SMALL_TABLE} routes"),
            full_v4,
        ),
        cost("pop-forwarder ipv4 dir-24-8", SMALL_TABLE),
    );
    for lookup in [Ipv6Lookup::Dxr, Ipv6Lookup::Trie] {
        let name = format!("pop-forwarder ipv6 {lookup}");
        insert(
            format!("ipv6_{lookup}_1k_vs_linux"),
            pps(&name, 1_000),
            pps("linux ipv6", 1_000),
        );
        insert(
            format!("ipv6_{lookup}_cost_full_vs_1k"),
            cost(&name, full_v6),
            cost(&name, 1_000),
        );
    }
    insert(
        "ipv6_dxr_cost_full_vs_1k_same_traffic".into(),
        cost(
            &format!("pop-forwarder ipv6 dxr, traffic of {SMALL_TABLE} routes"),
            full_v6,
        ),
        cost("pop-forwarder ipv6 dxr", SMALL_TABLE),
    );
    // --candidate: each candidate path against the same path with the
    // shipped program, round by round (below 1: the candidate costs less,
    // or delivers less).
    for c in report.cost.iter().filter(|c| c.name.ends_with(CANDIDATE)) {
        let shipped = c.name.trim_end_matches(CANDIDATE);
        insert(
            format!("candidate_cost: {shipped} ({})", c.prefixes),
            Some(&c.runs),
            cost(shipped, c.prefixes),
        );
        insert(
            format!("candidate_delivered: {shipped} ({})", c.prefixes),
            pps(&c.name, c.prefixes),
            pps(shipped, c.prefixes),
        );
    }
    // The targets are checked on the default IPv4 lookup, DIR-24-8.
    let mut targets = Vec::new();
    // (ratio, at least, what) for the targets that are ratios to reach.
    for (key, want, what) in [
        (
            "ipv4_dir-24-8_1k_vs_linux",
            3.0,
            "routing >= 3x Linux forwarding, small table",
        ),
        (
            "ipv4_dir-24-8_full_vs_linux",
            3.0,
            "routing >= 3x Linux forwarding, full table",
        ),
        (
            "ipv4_dir-24-8_1k_vs_ceiling",
            0.9,
            "routing >= 0.9x the bare-redirect ceiling, small table",
        ),
        (
            "ipv4_dir-24-8_full_vs_ceiling",
            0.9,
            "routing >= 0.9x the bare-redirect ceiling, full table",
        ),
        (
            "vip_ipip_tx_vs_bare_tx",
            0.75,
            "the IP-in-IP VIP path delivers >= 0.75x bare XDP_TX",
        ),
        (
            "generator_ceiling_vs_minimal_generator",
            0.9,
            "the generator's ceiling within 10 % of the minimal generator's",
        ),
    ] {
        if let Some(r) = ratios.get(key) {
            let v = r.median;
            targets.push((format!("{what}: {v:.2}x"), v >= want));
        }
    }
    for (key, what, ns) in own_works {
        let Some(ns) = ns else { continue };
        report.control_plane.insert(key.into(), ns);
        targets.push((
            format!("the IP-in-IP VIP path's own work (its cost less bare XDP_TX's) <= 150 ns, {what}: {ns:.0} ns"),
            ns <= 150.0,
        ));
    }
    if let Some(v) = ratios
        .get("ipv4_dir-24-8_cost_full_vs_1k")
        .map(|r| r.median)
    {
        targets.push((
            format!("route-path cost at {full_v4} prefixes <= 1.5x its cost at 1k: {v:.2}x"),
            v <= 1.5,
        ));
    }
    if let Some(v) = ratios.get("ipv6_dxr_cost_full_vs_1k").map(|r| r.median) {
        targets.push((
            format!("IPv6 route cost at {full_v6} prefixes <= 1.5x its cost at 1k: {v:.2}x"),
            v <= 1.5,
        ));
    }
    if let Some(s) = report
        .control_plane
        .get(&format!("pop_dir-24-8_load_{full_v4}_v4_routes_s"))
    {
        targets.push((
            format!("{full_v4} IPv4 routes loaded in under 3 s: {s:.2} s"),
            *s < 3.0,
        ));
    }
    report.ratios = ratios;
    report.targets = targets;
}

fn write_report(report: &Report, out_dir: &PathBuf) -> Result<()> {
    let mut md = String::new();
    writeln!(
        md,
        "Machine: {} cores, {}, kernel {}. 64-byte UDP frames from an XDP live-frames generator over veth, {} destinations; medians of runs.\n",
        report.machine["cores"], report.machine["cpu"], report.machine["kernel"], DESTINATIONS
    )?;
    writeln!(
        md,
        "| path | family | prefixes | delivered Mpps | sent Mpps | loss |"
    )?;
    writeln!(md, "| --- | --- | ---: | ---: | ---: | ---: |")?;
    for t in &report.throughput {
        writeln!(
            md,
            "| {} | {} | {} | {:.2} | {:.2} | {:.1} % |",
            t.name,
            t.family,
            t.prefixes,
            t.delivered_pps / 1e6,
            t.sent_pps / 1e6,
            t.loss * 100.0
        )?;
    }
    writeln!(
        md,
        "\n| program (kernel bpf_stats, while traffic flows) | prefixes | ns/packet |"
    )?;
    writeln!(md, "| --- | ---: | ---: |")?;
    for c in &report.cost {
        writeln!(
            md,
            "| {} | {} | {:.1} |",
            c.name, c.prefixes, c.ns_per_packet
        )?;
    }
    writeln!(
        md,
        "\n| ratio (per round, paired) | median | min | max |\n| --- | ---: | ---: | ---: |"
    )?;
    for (k, r) in &report.ratios {
        writeln!(
            md,
            "| {k} | {:.2} | {:.2} | {:.2} |",
            r.median, r.min, r.max
        )?;
    }
    writeln!(md, "\n| control plane | value |\n| --- | ---: |")?;
    for (k, v) in &report.control_plane {
        writeln!(md, "| {k} | {v:.2} |")?;
    }
    writeln!(md, "\n| target | met |\n| --- | --- |")?;
    for (t, ok) in &report.targets {
        writeln!(md, "| {t} | {} |", if *ok { "yes" } else { "**no**" })?;
    }
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(out_dir.join("bench.md"), &md)?;
    std::fs::write(
        out_dir.join("bench.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    println!("\n{md}");
    println!("written to {}/bench.md and bench.json", out_dir.display());
    Ok(())
}
