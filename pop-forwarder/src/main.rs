//! The pop-forwarder command line.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use pop_forwarder::{
    config::{Model, VipConfig},
    control::{self, Command as ControlCommand},
    daemon::{self, BpfLogLevel},
    instance::Instance,
    kernel,
    maps::Tables,
};

/// XDP forwarder for PoP edge servers: longest-prefix-match routing and
/// Maglev steering of service addresses (VIPs) to cache nodes, in the NIC
/// driver, run and changed from this one command.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Which forwarder instance to act on; its maps are pinned under
    /// /sys/fs/bpf/pop-forwarder/<INSTANCE>.
    #[arg(
        long,
        global = true,
        default_value = "default",
        env = "POP_FORWARDER_INSTANCE"
    )]
    instance: String,
    /// Where instances keep their lock, state file and control socket.
    #[arg(
        long,
        global = true,
        default_value = pop_forwarder::instance::RUN_DIR,
        env = "POP_FORWARDER_RUN_DIR"
    )]
    run_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the instance's daemon: attach to the config's interfaces and fill
    /// the tables, or adopt the instance's pinned data plane (restart,
    /// upgrade; pins of another map layout, `ipv4_lookup` or `ipv6_lookup`
    /// are migrated to new tables, the program swapped in place), then keep
    /// it current. Ctrl-C or SIGTERM stop the daemon and leave XDP
    /// forwarding; `detach` removes it.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Lowest level of the XDP program's own log records (malformed
        /// drops are `debug`); they are logged under the target `bpf`.
        #[arg(long, value_enum, default_value = "warn")]
        bpf_log_level: BpfLogLevel,
        /// Load the XDP program from this object file instead of the one
        /// built into this binary (a new build of the program, tried on a
        /// running instance: it is swapped in on the pinned links).
        #[arg(long)]
        xdp_object: Option<PathBuf>,
    },
    /// Validate a config file without touching the kernel.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Change or show the running instance's routes (changes are refused
    /// with route_source = "kernel": the kernel table is the truth there).
    #[command(subcommand)]
    Route(RouteCommand),
    /// Add, remove or show the running instance's VIPs (service addresses)
    /// and their pools.
    #[command(subcommand)]
    Vip(VipCommand),
    /// Add, remove, drain, weigh or show the running instance's cache nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Add, remove or show the deny list: prefixes whose packets (by
    /// source or destination address) are dropped before any other lookup.
    #[command(subcommand)]
    Deny(DenyCommand),
    /// Which cache node a flow to a VIP goes to: the node an existing flow
    /// is pinned to, and the node the Maglev table gives a new one.
    Lookup {
        #[arg(long)]
        src: std::net::IpAddr,
        #[arg(long)]
        dst: std::net::IpAddr,
        #[arg(long, value_enum)]
        protocol: LookupProtocol,
        #[arg(long, default_value_t = 0)]
        src_port: u16,
        #[arg(long, default_value_t = 0)]
        dst_port: u16,
        #[arg(long)]
        json: bool,
    },
    /// Packet counters by outcome, per interface (what came in, what became
    /// of it, what the kernel dropped on the way out) and per next hop.
    /// With --watch: rates each second (outcomes, interfaces, next hops,
    /// VIPs, nodes), what moved.
    Stats {
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Print packet rates each second until interrupted.
        #[arg(long)]
        watch: bool,
        /// With --watch: stop after this many seconds.
        #[arg(long, requires = "watch")]
        count: Option<u64>,
    },
    /// Whether the instance runs, where it is attached, how big its tables
    /// are, which VIPs it announces and whether it is drained.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Have the daemon re-read its config file and apply changed routes,
    /// route-miss policy, cache nodes and VIPs without detaching; prints what
    /// changed, or fails with why the file was refused (nothing changed).
    Reload,
    /// Maintenance: withdraw every VIP route (vip_route_table), so that BGP
    /// moves the VIPs' traffic to the other forwarders, keep steering the
    /// flows that still arrive, and wait until they have stopped: no VIP
    /// packet for --settle seconds. Survives a restart of the daemon; `resume`
    /// ends it.
    Drain {
        /// Return once the routes are withdrawn, without waiting.
        #[arg(long)]
        no_wait: bool,
        /// Seconds without a VIP packet that count as "traffic has gone".
        #[arg(long, default_value_t = 5)]
        settle: u64,
        /// Give up waiting (exit status 1) after this many seconds; the
        /// drain stays.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// End a drain: announce again every VIP with a healthy node.
    Resume,
    /// Remove the data plane: the daemon detaches XDP, unpins the tables and
    /// exits (with no daemon, the pins are removed here). The one command
    /// that stops forwarding.
    Detach,
    /// Send UDP test traffic out of DEV at the rate this machine allows, the
    /// way pktgen does: an XDP program run in BPF_PROG_TEST_RUN's live-frames
    /// mode transmits each frame (XDP_TX) after rewriting its headers, so
    /// successive frames cycle through destinations, source addresses and
    /// source ports. For labs and benchmarks; on real NICs see
    /// scripts/pktgen.sh.
    Generate(GenerateArgs),
    /// Print a shell completion script: `pop-forwarder completions bash >
    /// /usr/share/bash-completion/completions/pop-forwarder`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum DenyCommand {
    /// Drop packets whose source (or destination) is in PREFIX. Until the
    /// next reload (the file is the truth).
    Add {
        #[arg(value_enum)]
        direction: DenyDirectionArg,
        prefix: String,
    },
    /// Remove a deny-list entry.
    Del {
        #[arg(value_enum)]
        direction: DenyDirectionArg,
        prefix: String,
    },
    /// List the entries with the packets and bytes each dropped.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DenyDirectionArg {
    Source,
    Destination,
}

impl DenyDirectionArg {
    fn entry(self, prefix: &str) -> String {
        match self {
            DenyDirectionArg::Source => format!("source {prefix}"),
            DenyDirectionArg::Destination => format!("destination {prefix}"),
        }
    }
}

#[derive(Subcommand)]
enum RouteCommand {
    /// Add a route: PREFIX via GATEWAY on DEV, an interface the program is
    /// attached to (or a VLAN subinterface of one). Without --mac, the
    /// gateway's MAC comes from the kernel's neighbour table.
    Add {
        prefix: String,
        #[arg(long)]
        via: String,
        #[arg(long)]
        dev: String,
        #[arg(long)]
        mac: Option<String>,
    },
    /// Delete the route to exactly PREFIX.
    Del { prefix: String },
    /// List the routes.
    List {
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info,bpf=trace"))
        .init();
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    let instance = Instance::new(&cli.instance, &cli.run_dir)?;
    match cli.command {
        Command::Run {
            config,
            bpf_log_level,
            xdp_object,
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the tokio runtime")?
            .block_on(daemon::run(daemon::RunOptions {
                instance: &instance,
                config: &config,
                bpf_log: bpf_log_level,
                xdp_object: xdp_object.as_deref(),
            })),
        Command::Check { config } => {
            let model = Model::from_file(&config)?;
            println!(
                "{}: ok ({} interfaces, {} routes, {} deny-list entries)",
                config.display(),
                model.interfaces.len(),
                model.routes.len(),
                model.deny.len()
            );
            Ok(())
        }
        Command::Route(cmd) => route(&instance, cmd),
        Command::Vip(VipCommand::List { json }) => vip_list(&instance, json),
        Command::Vip(VipCommand::Add { vip, nodes }) => send(
            &instance,
            ControlCommand::VipAdd(VipConfig {
                address: vip.address.to_string(),
                protocol: vip.protocol.into(),
                port: vip.port,
                nodes,
            }),
        ),
        Command::Vip(VipCommand::Del { vip }) => send(
            &instance,
            ControlCommand::VipDel {
                address: vip.address,
                protocol: vip.protocol.into(),
                port: vip.port,
            },
        ),
        Command::Node(NodeCommand::List { json }) => node_list(&instance, json),
        Command::Deny(DenyCommand::Add { direction, prefix }) => send(
            &instance,
            ControlCommand::DenyAdd {
                entry: direction.entry(&prefix),
            },
        ),
        Command::Deny(DenyCommand::Del { direction, prefix }) => send(
            &instance,
            ControlCommand::DenyDel {
                entry: direction.entry(&prefix),
            },
        ),
        Command::Deny(DenyCommand::List { json }) => {
            let list = open(&instance)?.deny_list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<12} {:<44} {:>14} {:>16}",
                    "MATCHES", "PREFIX", "PACKETS", "BYTES"
                );
                for e in &list {
                    println!(
                        "{:<12} {:<44} {:>14} {:>16}",
                        e.direction, e.prefix, e.packets, e.bytes
                    );
                }
            }
            Ok(())
        }
        Command::Node(NodeCommand::Add(args)) => {
            send(&instance, ControlCommand::NodeAdd(args.into_config()?))
        }
        Command::Node(NodeCommand::Del { name }) => {
            send(&instance, ControlCommand::NodeDel { name })
        }
        Command::Node(NodeCommand::Drain { name }) => {
            send(&instance, ControlCommand::NodeWeight { name, weight: 0 })
        }
        Command::Node(NodeCommand::Weight { name, weight }) => {
            send(&instance, ControlCommand::NodeWeight { name, weight })
        }
        Command::Lookup {
            src,
            dst,
            protocol,
            src_port,
            dst_port,
            json,
        } => lookup(&instance, src, dst, protocol, src_port, dst_port, json),
        Command::Stats {
            json, watch: false, ..
        } => stats(&instance, json),
        Command::Stats { count, .. } => stats_watch(&instance, count),
        Command::Status { json } => status(&instance, json),
        Command::Detach => detach(&instance),
        Command::Reload => send(&instance, ControlCommand::Reload),
        Command::Drain {
            no_wait,
            settle,
            timeout,
        } => {
            send(&instance, ControlCommand::Drain)?;
            if no_wait {
                return Ok(());
            }
            wait_for_vip_traffic_to_stop(&instance, settle, timeout)
        }
        Command::Resume => send(&instance, ControlCommand::Resume),
        Command::Generate(args) => generate(args),
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "pop-forwarder",
                &mut std::io::stdout(),
            );
            Ok(())
        }
    }
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Interface to send from.
    #[arg(long)]
    dev: String,
    /// Destination MAC: the forwarder's ingress interface.
    #[arg(long)]
    dst_mac: String,
    /// Source MAC (default: DEV's own).
    #[arg(long)]
    src_mac: Option<String>,
    /// First source address; IPv4 or IPv6 (sets the family).
    #[arg(long)]
    src: std::net::IpAddr,
    /// First destination address.
    #[arg(long)]
    dst: std::net::IpAddr,
    /// Destinations: consecutive addresses from --dst.
    #[arg(long, default_value_t = 1)]
    dst_count: u32,
    /// Source addresses: consecutive from --src (at most 65536).
    #[arg(long, default_value_t = 1)]
    src_count: u32,
    /// UDP source ports, from 1024 (at most 64512).
    #[arg(long, default_value_t = 1)]
    src_ports: u32,
    /// Ethernet frame size without FCS, 64..=1514.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// How long to send.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

fn generate(args: GenerateArgs) -> Result<()> {
    use pop_forwarder::{bench, net::Mac};
    let links = kernel::links()?;
    let dev = kernel::link(&links, &args.dev).context("--dev")?;
    let src_mac = match &args.src_mac {
        Some(m) => m.parse::<Mac>().context("--src-mac")?,
        None => dev
            .mac
            .with_context(|| format!("--dev: {} has no Ethernet address", dev.name))?,
    };
    let dst_mac = args.dst_mac.parse::<Mac>().context("--dst-mac")?;
    if args.src.is_ipv4() != args.dst.is_ipv4() {
        bail!(
            "--dst: {} is not of the address family of --src {}",
            args.dst,
            args.src
        );
    }
    if args.dst_count == 0 || args.dst_count > pop_forwarder_common::bench::GEN_MAX_DSTS {
        bail!(
            "--dst-count: {} is not from 1 to {}",
            args.dst_count,
            pop_forwarder_common::bench::GEN_MAX_DSTS
        );
    }
    if args.seconds == 0 || args.seconds > 86_400 {
        bail!("--seconds: {} is not from 1 to 86400", args.seconds);
    }
    let dsts = (0..args.dst_count)
        .map(|i| match args.dst {
            std::net::IpAddr::V4(a) => std::net::IpAddr::V4(u32::from(a).wrapping_add(i).into()),
            std::net::IpAddr::V6(a) => {
                std::net::IpAddr::V6(u128::from(a).wrapping_add(u128::from(i)).into())
            }
        })
        .collect();
    let generator = bench::Generator::new(&bench::FlowSpec {
        src_mac,
        dst_mac,
        src: args.src,
        dsts,
        src_count: args.src_count,
        src_port_count: args.src_ports,
        frame_len: args.size,
    })?;
    eprintln!(
        "sending {}-byte frames from {} to {} destinations from {} for {} s",
        args.size, dev.name, args.dst_count, args.dst, args.seconds
    );
    let mut total = 0u64;
    let start = std::time::Instant::now();
    for second in 1..=args.seconds {
        let (sent, took) = generator.send_for(dev.ifindex, Duration::from_secs(1), 65536)?;
        total += sent;
        println!(
            "{second:>4} s  {:>12.0} packets/s",
            sent as f64 / took.as_secs_f64()
        );
    }
    let took = start.elapsed().as_secs_f64();
    println!(
        "sent {total} packets in {took:.1} s: {:.0} packets/s",
        total as f64 / took
    );
    Ok(())
}

#[derive(Subcommand)]
enum VipCommand {
    /// List the VIPs.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Add a VIP with its pool of cache nodes, or set the pool of an
    /// existing one; its Maglev table is built and written before the
    /// program sees the VIP. Until the next reload (the file is the truth).
    Add {
        #[command(flatten)]
        vip: VipArgs,
        /// The pool: names of cache nodes, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<String>,
    },
    /// Remove a VIP: its packets are routed like any others from then on.
    Del {
        #[command(flatten)]
        vip: VipArgs,
    },
}

#[derive(clap::Args)]
struct VipArgs {
    /// The service address (IPv4 or IPv6).
    address: std::net::IpAddr,
    #[arg(value_enum)]
    protocol: LookupProtocol,
    /// The port; 0 (the default) is every port of the protocol.
    #[arg(default_value_t = 0)]
    port: u16,
}

/// A cache node, as in the config file's [[nodes]].
#[derive(clap::Args)]
struct NodeArgs {
    /// The node's name, unique in the instance.
    name: String,
    /// The node's address.
    address: std::net::IpAddr,
    /// Direct server return (the default): the interface the node is on.
    #[arg(long, conflicts_with = "ipip")]
    dev: Option<String>,
    /// Direct server return: the node's MAC (default: from the kernel's
    /// neighbour table).
    #[arg(long, conflicts_with = "ipip")]
    mac: Option<String>,
    /// Reach the node by IP-in-IP (needs encap_source_v4/v6 in the config).
    #[arg(long)]
    ipip: bool,
    /// Share of new flows, 0 (drained) to 1000.
    #[arg(long, default_value_t = 1)]
    weight: u32,
    /// Health check: tcp (connect) or http (GET answered 2xx/3xx).
    #[arg(long, value_enum, requires = "health_port")]
    health: Option<HealthArg>,
    /// The port the health check connects to.
    #[arg(long)]
    health_port: Option<u16>,
    /// HTTP checks: the path to GET.
    #[arg(long, default_value = "/")]
    health_path: String,
    /// Time between checks (10..=60000).
    #[arg(long, default_value_t = 1000)]
    health_interval_ms: u64,
    /// How long a check may take (at most the interval).
    #[arg(long, default_value_t = 500)]
    health_timeout_ms: u64,
    /// Successes in a row that bring a failed node back.
    #[arg(long, default_value_t = 2)]
    health_rise: u32,
    /// Failures in a row that take a node out.
    #[arg(long, default_value_t = 3)]
    health_fall: u32,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum HealthArg {
    Tcp,
    Http,
}

impl NodeArgs {
    fn into_config(self) -> Result<pop_forwarder::config::NodeConfig> {
        use pop_forwarder::config::{Delivery, HealthConfig, HealthKind, NodeConfig};
        if !self.ipip && self.dev.is_none() {
            bail!("--dev: a direct-server-return node needs the interface it is on (or --ipip)");
        }
        let health = match (self.health, self.health_port) {
            (Some(kind), Some(port)) => Some(HealthConfig {
                kind: match kind {
                    HealthArg::Tcp => HealthKind::Tcp,
                    HealthArg::Http => HealthKind::Http,
                },
                port,
                path: self.health_path,
                interval_ms: self.health_interval_ms,
                timeout_ms: self.health_timeout_ms,
                rise: self.health_rise,
                fall: self.health_fall,
            }),
            (None, Some(_)) => bail!("--health-port: needs --health tcp|http"),
            _ => None,
        };
        Ok(NodeConfig {
            name: self.name,
            address: self.address.to_string(),
            delivery: if self.ipip {
                Delivery::Ipip
            } else {
                Delivery::Dsr
            },
            dev: self.dev.unwrap_or_default(),
            mac: self.mac,
            weight: self.weight,
            health,
        })
    }
}

#[derive(Subcommand)]
enum NodeCommand {
    /// List the cache nodes.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Add a cache node (in no pool until `vip add` puts it in one). Until
    /// the next reload (the file is the truth).
    Add(NodeArgs),
    /// Remove a node from every pool, then from the node table: its flows
    /// move to the other nodes of their VIPs.
    Del { name: String },
    /// Take NAME out of new flows (weight 0); its existing flows stay on it.
    Drain { name: String },
    /// Set NAME's share of new flows (0 drains, up to 1000).
    Weight { name: String, weight: u32 },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LookupProtocol {
    Tcp,
    Udp,
}

impl From<LookupProtocol> for pop_forwarder::config::Protocol {
    fn from(p: LookupProtocol) -> Self {
        match p {
            LookupProtocol::Tcp => pop_forwarder::config::Protocol::Tcp,
            LookupProtocol::Udp => pop_forwarder::config::Protocol::Udp,
        }
    }
}

/// The steering config the daemon started with, and its tables.
fn open_steering(instance: &Instance) -> Result<(Tables, pop_forwarder::steering::SteeringState)> {
    let tables = open(instance)?;
    let state = instance
        .read_state()
        .context("the instance has no state file (is its daemon running?)")?;
    Ok((tables, state.steering))
}

/// Sends one command to the daemon over its control socket and prints its
/// answer; a refusal is this command's error.
fn send(instance: &Instance, command: ControlCommand) -> Result<()> {
    println!("{}", control::request(instance, command)?);
    Ok(())
}

fn vip_list(instance: &Instance, json: bool) -> Result<()> {
    let (tables, steering) = open_steering(instance)?;
    let slots = steering.vips.iter().map(|v| v.slot + 1).max().unwrap_or(0);
    let (all_stats, _) = tables.steering_stats(slots, 0)?;
    let vip_stats: Vec<_> = steering
        .vips
        .iter()
        .map(|v| all_stats[v.slot as usize])
        .collect();
    let rows: Vec<_> = steering
        .vips
        .iter()
        .zip(&vip_stats)
        .map(|(v, s)| {
            serde_json::json!({
                "address": v.address, "protocol": v.protocol, "port": v.port, "nodes": v.nodes,
                "packets": s.packets, "bytes": s.bytes,
            })
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<40} {:<5} {:>5} {:>14} {:>16}  NODES",
        "VIP", "PROTO", "PORT", "PACKETS", "BYTES"
    );
    for (v, s) in steering.vips.iter().zip(&vip_stats) {
        let port = if v.port == 0 {
            "any".to_owned()
        } else {
            v.port.to_string()
        };
        println!(
            "{:<40} {:<5} {:>5} {:>14} {:>16}  {}",
            v.address,
            v.protocol,
            port,
            s.packets,
            s.bytes,
            v.nodes.join(",")
        );
    }
    Ok(())
}

fn node_list(instance: &Instance, json: bool) -> Result<()> {
    let (tables, steering) = open_steering(instance)?;
    let slots = steering.nodes.iter().map(|n| n.slot + 1).max().unwrap_or(0);
    let (_, node_stats) = tables.steering_stats(0, slots)?;
    let live = tables.live_flows()?;
    let mut rows = Vec::new();
    for n in &steering.nodes {
        let s = node_stats[n.slot as usize];
        let flows = live.get(&n.slot).copied().unwrap_or(0);
        let node = tables.node(n.slot)?;
        let mac = (node.flags & pop_forwarder_common::steering::NODE_F_MAC_VALID != 0)
            .then(|| pop_forwarder::net::Mac(node.dst_mac).to_string());
        rows.push(serde_json::json!({
            "name": n.name, "slot": n.slot, "address": n.address, "delivery": n.delivery,
            "dev": n.dev, "weight": n.weight, "mac": mac,
            "health_checked": n.health_checked, "healthy": n.healthy,
            "health_changes": n.health_changes,
            "packets": s.packets, "bytes": s.bytes,
            "flows": flows, "drained": n.weight == 0 && flows == 0,
        }));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<20} {:<40} {:<12} {:>14} {:<18} {:<7} {:>9} {:>14} {:>16}",
        "NODE", "ADDRESS", "DEV", "WEIGHT", "MAC", "HEALTH", "FLOWS", "PACKETS", "BYTES"
    );
    for r in &rows {
        println!(
            "{:<20} {:<40} {:<12} {:>14} {:<18} {:<7} {:>9} {:>14} {:>16}",
            r["name"].as_str().unwrap_or_default(),
            r["address"].as_str().unwrap_or_default(),
            if r["delivery"] == "ipip" {
                "(ip-in-ip)"
            } else {
                r["dev"].as_str().unwrap_or_default()
            },
            match (r["weight"].as_u64(), r["drained"] == true) {
                (Some(0), true) => "0 (drained)".to_owned(),
                (Some(0), false) => "0 (draining)".to_owned(),
                (w, _) => w.unwrap_or_default().to_string(),
            },
            match (r["delivery"].as_str(), r["mac"].as_str()) {
                (Some("ipip"), _) => "-",
                (_, Some(mac)) => mac,
                _ => "unresolved",
            },
            match (r["health_checked"] == true, r["healthy"] == true) {
                (false, _) => "-",
                (true, true) => "up",
                (true, false) => "down",
            },
            r["flows"],
            r["packets"],
            r["bytes"]
        );
    }
    Ok(())
}

fn lookup(
    instance: &Instance,
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    protocol: LookupProtocol,
    src_port: u16,
    dst_port: u16,
    json: bool,
) -> Result<()> {
    use pop_forwarder::steering::{family, widen};
    use pop_forwarder_common::steering::FlowKey;
    if src.is_ipv4() != dst.is_ipv4() {
        bail!("--src {src} and --dst {dst} are of different address families");
    }
    let (tables, steering) = open_steering(instance)?;
    let protocol = pop_forwarder::config::Protocol::from(protocol);
    let key = FlowKey {
        src: widen(src),
        dst: widen(dst),
        src_port,
        dst_port,
        protocol: protocol.number(),
        family: family(dst),
        pad: [0; 2],
    };
    // The program's own tables, read as it reads them.
    let Some(found) = tables.lookup_flow(&key)? else {
        bail!(
            "{dst} {protocol} port {dst_port} is no VIP of instance {:?}",
            instance.name
        );
    };
    let name = |id: u32| steering.node_name(id).map(str::to_owned);
    let (index, slot) = (found.vip, found.maglev_slot);
    let existing = found.existing.and_then(name);
    let new = name(found.new);
    if json {
        println!(
            "{}",
            serde_json::json!({ "vip": index, "existing_flow": existing, "new_flow": new, "maglev_slot": slot })
        );
    } else {
        println!("existing flow: {}", existing.as_deref().unwrap_or("none"));
        println!(
            "new flow:      {} (Maglev slot {slot})",
            new.as_deref().unwrap_or("no node")
        );
    }
    Ok(())
}

fn open(instance: &Instance) -> Result<Tables> {
    instance.require()?;
    Tables::from_pins(&instance.pin_dir())
}

fn route(instance: &Instance, cmd: RouteCommand) -> Result<()> {
    match cmd {
        RouteCommand::Add {
            prefix,
            via,
            dev,
            mac,
        } => send(
            instance,
            ControlCommand::RouteAdd {
                prefix,
                via,
                dev,
                mac,
            },
        )?,
        RouteCommand::Del { prefix } => send(instance, ControlCommand::RouteDel { prefix })?,
        RouteCommand::List { json } => {
            let routes = open(instance)?.routes(&kernel::links()?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&routes)?);
            } else {
                println!(
                    "{:<44} {:<40} {:<16} {:<28} NEXT HOP",
                    "PREFIX", "VIA", "DEV", "MAC"
                );
                for r in routes {
                    // Connected subnets, kernel routes and groups have no
                    // one MAC: each host's, the kernel's, each member's.
                    let one_mac =
                        r.via != "connected" && r.via != "kernel" && !r.via.starts_with("group");
                    let mac = match (&r.mac, r.mac_static) {
                        (Some(m), true) => format!("{m} (static)"),
                        (Some(m), false) => m.clone(),
                        (None, _) if !one_mac => "-".into(),
                        (None, _) => "unresolved".into(),
                    };
                    println!(
                        "{:<44} {:<40} {:<16} {:<28} {}",
                        r.prefix, r.via, r.dev, mac, r.next_hop
                    );
                }
            }
        }
    }
    Ok(())
}

fn stats(instance: &Instance, json: bool) -> Result<()> {
    let stats = open(instance)?.stats(&kernel::links()?)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
        return Ok(());
    }
    println!("{:<24} {:>16}", "OUTCOME", "PACKETS");
    for c in pop_forwarder_common::Counter::ALL {
        println!("{:<24} {:>16}", c.name(), stats.counters[c.name()]);
    }
    println!();
    println!(
        "{:<16} {:>14} {:>16} {:>14} {:>14} {:>14} {:>12} {:>12}",
        "INTERFACE",
        "PACKETS IN",
        "BYTES IN",
        "FORWARDED",
        "PASSED",
        "DROPPED",
        "XMIT DROPS",
        "REDIR ERRS"
    );
    for i in &stats.interfaces {
        println!(
            "{:<16} {:>14} {:>16} {:>14} {:>14} {:>14} {:>12} {:>12}",
            i.name,
            i.packets,
            i.bytes,
            i.forwarded,
            i.passed,
            i.dropped,
            i.xmit_drops,
            i.redirect_errors
        );
    }
    println!();
    println!(
        "{:<9} {:<40} {:<16} {:>16} {:>18}",
        "NEXT HOP", "VIA", "DEV", "PACKETS", "BYTES"
    );
    for nh in &stats.next_hops {
        println!(
            "{:<9} {:<40} {:<16} {:>16} {:>18}",
            nh.id, nh.via, nh.dev, nh.packets, nh.bytes
        );
    }
    Ok(())
}

/// Everything `stats --watch` follows, as totals: (what, packets, bytes).
fn watch_totals(
    tables: &Tables,
    instance: &Instance,
    links: &[kernel::Link],
) -> Result<Vec<(String, u64, Option<u64>)>> {
    let stats = tables.stats(links)?;
    let mut out: Vec<(String, u64, Option<u64>)> = stats
        .counters
        .iter()
        .map(|(name, n)| ((*name).to_owned(), *n, None))
        .collect();
    for i in &stats.interfaces {
        out.push((format!("interface {} in", i.name), i.packets, Some(i.bytes)));
    }
    for nh in &stats.next_hops {
        out.push((
            format!("next hop {} via {} dev {}", nh.id, nh.via, nh.dev),
            nh.packets,
            Some(nh.bytes),
        ));
    }
    if let Some(state) = instance.read_state() {
        let steering = &state.steering;
        let vip_slots = steering.vips.iter().map(|v| v.slot + 1).max().unwrap_or(0);
        let node_slots = steering.nodes.iter().map(|n| n.slot + 1).max().unwrap_or(0);
        let (vips, nodes) = tables.steering_stats(vip_slots, node_slots)?;
        for v in &steering.vips {
            let t = vips[v.slot as usize];
            let port = if v.port == 0 {
                "any".to_owned()
            } else {
                v.port.to_string()
            };
            out.push((
                format!("vip {} {} {port}", v.address, v.protocol),
                t.packets,
                Some(t.bytes),
            ));
        }
        for n in &steering.nodes {
            let t = nodes[n.slot as usize];
            out.push((format!("node {}", n.name), t.packets, Some(t.bytes)));
        }
    }
    Ok(out)
}

/// `stats --watch`: each second, the rate of everything that moved.
fn stats_watch(instance: &Instance, count: Option<u64>) -> Result<()> {
    let tables = open(instance)?;
    let links = kernel::links()?;
    let mut last = watch_totals(&tables, instance, &links)?;
    let mut at = std::time::Instant::now();
    let mut seconds = 0;
    while count.is_none_or(|c| seconds < c) {
        std::thread::sleep(Duration::from_secs(1));
        seconds += 1;
        let now = watch_totals(&tables, instance, &links)?;
        let elapsed = at.elapsed().as_secs_f64();
        at = std::time::Instant::now();
        let previous: std::collections::HashMap<&str, (u64, Option<u64>)> = last
            .iter()
            .map(|(what, p, b)| (what.as_str(), (*p, *b)))
            .collect();
        let mut lines = Vec::new();
        let mut total = 0.0;
        for (what, packets, bytes) in &now {
            let (p0, b0) = previous.get(what.as_str()).copied().unwrap_or((0, None));
            let rate = packets.saturating_sub(p0) as f64 / elapsed;
            if rate == 0.0 {
                continue;
            }
            if !what.contains(' ') {
                total += rate; // outcomes: each packet has exactly one
            }
            let bits = match (bytes, b0) {
                (Some(b), Some(b0)) => {
                    format!(
                        "{:>12.1} Mbit/s",
                        b.saturating_sub(b0) as f64 * 8.0 / elapsed / 1e6
                    )
                }
                _ => String::new(),
            };
            lines.push(format!("  {what:<56} {rate:>14.0} pkt/s{bits}"));
        }
        println!("{}s  {total:.0} packets/s", seconds);
        for line in lines {
            println!("{line}");
        }
        last = now;
    }
    Ok(())
}

fn status(instance: &Instance, json: bool) -> Result<()> {
    instance.require()?;
    let tables = Tables::from_pins(&instance.pin_dir())?;
    let state = instance.read_state();
    // Running: a daemon holds the instance and has recorded itself, which
    // it does once its program is attached (or swapped in) and the tables
    // are filled.
    let owner = instance.daemon_pid();
    let pid = owner.filter(|p| state.as_ref().is_some_and(|s| s.pid == *p));
    let (v4, v6) = tables.route_counts();
    let links = kernel::links()?;
    let announced = match state.as_ref().and_then(|s| s.vip_route_table) {
        Some(table) => Some(pop_forwarder::announce::announced(table)?),
        None => None,
    };
    let interfaces: Vec<_> = state
        .iter()
        .flat_map(|s| &s.interfaces)
        .map(|i| {
            let attached = links.iter().any(|l| l.ifindex == i.ifindex && l.xdp_attached);
            serde_json::json!({ "name": i.name, "ifindex": i.ifindex, "mode": i.mode, "xdp_attached": attached })
        })
        .collect();
    let report = serde_json::json!({
        "instance": instance.name,
        "daemon_pid": owner,
        "running": pid.is_some(),
        "pin_dir": instance.pin_dir(),
        "config": state.as_ref().map(|s| &s.config),
        "interfaces": interfaces,
        "routes_v4": v4,
        "routes_v6": v6,
        // "kernel" (the table in mirrored_table), "static" (the config and
        // the CLI), or null: a state file written by a build that did not
        // record it.
        "route_source": match state.as_ref().and_then(|s| s.mirrored_table) {
            Some(Some(_)) => Some("kernel"),
            Some(None) => Some("static"),
            None => None,
        },
        "mirrored_table": state.as_ref().and_then(|s| s.mirrored_table).flatten(),
        "route_miss": format!("{:?}", tables.route_miss()?).to_lowercase(),
        "ipv4_lookup": tables.ipv4_lookup().to_string(),
        "ipv6_lookup": tables.ipv6_lookup().to_string(),
        "vip_route_table": state.as_ref().and_then(|s| s.vip_route_table),
        "draining": state.as_ref().is_some_and(|s| s.draining),
        "announced": announced,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    match (pid, owner) {
        (Some(pid), _) => println!("instance {}: running (pid {pid})", instance.name),
        (None, Some(pid)) => println!(
            "instance {}: daemon (pid {pid}) starting; not yet forwarding its config",
            instance.name
        ),
        (None, None) => println!(
            "instance {}: no daemon; the data plane pinned at {} forwards on its last tables (`run` adopts it, `detach` removes it)",
            instance.name,
            instance.pin_dir().display()
        ),
    }
    if let Some(s) = &state {
        println!("config:      {}", s.config.display());
    }
    for i in &interfaces {
        println!(
            "interface:   {} (ifindex {}, {} mode, {})",
            i["name"].as_str().unwrap_or_default(),
            i["ifindex"],
            i["mode"].as_str().unwrap_or_default(),
            if i["xdp_attached"].as_bool() == Some(true) {
                "XDP attached"
            } else {
                "XDP NOT attached"
            }
        );
    }
    match state.as_ref().and_then(|s| s.mirrored_table) {
        Some(Some(table)) => println!(
            "routes:      {v4} IPv4, {v6} IPv6, mirrored from kernel table {table} (the config's routes win)"
        ),
        Some(None) => println!("routes:      {v4} IPv4, {v6} IPv6, from the config and the CLI"),
        None => println!("routes:      {v4} IPv4, {v6} IPv6"),
    }
    println!(
        "route miss:  {}",
        report["route_miss"].as_str().unwrap_or_default()
    );
    println!(
        "ipv4 lookup: {}",
        report["ipv4_lookup"].as_str().unwrap_or_default()
    );
    println!(
        "ipv6 lookup: {}",
        report["ipv6_lookup"].as_str().unwrap_or_default()
    );
    match (state.as_ref().and_then(|s| s.vip_route_table), &announced) {
        (Some(table), Some(announced)) => println!(
            "announced:   {} VIP addresses in table {table}{}{}",
            announced.len(),
            if state.as_ref().is_some_and(|s| s.draining) {
                " (DRAINING: `resume` announces again)"
            } else {
                ""
            },
            announced
                .iter()
                .map(|a| format!("\n             {a}"))
                .collect::<String>()
        ),
        _ => println!("announced:   no (no vip_route_table)"),
    }
    Ok(())
}

/// Packets to VIPs so far: steered ones (per VIP) and those no node could
/// take.
fn vip_packets(tables: &Tables, links: &[kernel::Link]) -> Result<u64> {
    let (vips, _) = tables.steering_stats(pop_forwarder_common::steering::MAX_VIPS, 0)?;
    let unsteered =
        tables.stats(links)?.counters[pop_forwarder_common::Counter::PassVipNoNode.name()];
    Ok(vips.iter().map(|s| s.packets).sum::<u64>() + unsteered)
}

/// `drain`'s wait: prints the VIP packet rate each second until it has been
/// 0 for `settle` seconds in a row.
fn wait_for_vip_traffic_to_stop(instance: &Instance, settle: u64, timeout: u64) -> Result<()> {
    let tables = open(instance)?;
    let links = kernel::links()?;
    let start = std::time::Instant::now();
    let mut last = vip_packets(&tables, &links)?;
    let mut quiet = 0;
    while quiet < settle {
        if start.elapsed() >= Duration::from_secs(timeout) {
            bail!(
                "VIP traffic still arrives after {timeout} s (the drain stays; is BGP withdrawing the routes? `birdc show route export PEER`)"
            );
        }
        std::thread::sleep(Duration::from_secs(1));
        let now = vip_packets(&tables, &links)?;
        let rate = now.saturating_sub(last);
        last = now;
        quiet = if rate == 0 { quiet + 1 } else { 0 };
        println!("VIP traffic: {rate} packets/s");
    }
    println!(
        "drained: no VIP packet for {settle} s (after {} s)",
        start.elapsed().as_secs()
    );
    Ok(())
}

fn detach(instance: &Instance) -> Result<()> {
    if let Some(pid) = instance.daemon_pid() {
        control::request(instance, ControlCommand::Detach)?;
        for _ in 0..100 {
            // The daemon removes its pins before it exits: once it is
            // gone, what is left of them stays.
            if instance.daemon_pid().is_none() {
                if instance.exists() {
                    bail!(
                        "daemon pid {pid} stopped, but some of the instance's pins are left (its log says which); `detach` again removes them without it"
                    );
                }
                println!(
                    "instance {}: daemon (pid {pid}) detached and stopped",
                    instance.name
                );
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("daemon pid {pid} did not detach within 10 s");
    }
    instance.require()?;
    // No daemon: take the instance, so that none starts and adopts the pins
    // while they are being removed.
    let _lock = instance.lock(None)?;
    instance.remove_pins()?;
    instance.remove_state();
    println!(
        "instance {}: no daemon; removed its pins (XDP detached)",
        instance.name
    );
    Ok(())
}
