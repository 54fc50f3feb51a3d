//! The TOML config file and the validated model behind it.
//!
//! Parsing and validation are pure: nothing here touches the kernel, so a
//! config is refused whole, with the field and value named, before anything
//! is loaded or attached.

use std::{collections::HashSet, fmt, net::IpAddr, path::Path, str::FromStr};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

pub use crate::net::{IfName, Mac, Prefix};

/// A whole config file, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// What to do with a packet whose destination matches no route.
    #[serde(default)]
    pub route_miss: RouteMissPolicy,
    /// How IPv4 destinations are looked up.
    #[serde(default)]
    pub ipv4_lookup: Ipv4Lookup,
    /// How IPv6 destinations are looked up.
    #[serde(default)]
    pub ipv6_lookup: Ipv6Lookup,
    /// Whether routed packets are looked up in the program's tables or in
    /// the kernel's FIB.
    #[serde(default)]
    pub route_lookup: RouteLookup,
    /// Interfaces to attach the XDP program to.
    pub interfaces: Vec<InterfaceConfig>,
    /// Where routes come from besides this file: nowhere (`static`), or a
    /// kernel routing table (`kernel`), filled by BIRD or FRR.
    #[serde(default)]
    pub route_source: RouteSource,
    /// The kernel routing table mirrored with `route_source = "kernel"`:
    /// 254 (main) unless given.
    #[serde(default = "default_kernel_table")]
    pub kernel_table: u32,
    /// Static routes.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// More static routes, one per line (`PREFIX via GATEWAY dev IFACE [mac
    /// MAC]`), for tables too large for TOML to parse quickly; relative to
    /// the config file's directory.
    pub routes_file: Option<std::path::PathBuf>,
    /// Seed of the flow hash; the same on every forwarder of a PoP.
    #[serde(default)]
    pub flow_hash_seed: u32,
    /// Seconds a TCP flow's connection-table entry may stay idle; 0: for
    /// ever.
    #[serde(default = "default_flow_idle_tcp")]
    pub flow_idle_timeout_tcp: u32,
    /// The same for other protocols (UDP).
    #[serde(default = "default_flow_idle_udp")]
    pub flow_idle_timeout_udp: u32,
    /// Entries of each VIP's Maglev table: a prime, at most 65537.
    #[serde(default = "default_table_size")]
    pub maglev_table_size: u32,
    /// Outer source addresses of IP-in-IP packets to cache nodes.
    /// IPv4: an address, or a prefix (a pool) whose host bits come from
    /// each flow's hash, for routers and NICs to spread the flows.
    pub encap_source_v4: Option<String>,
    pub encap_source_v6: Option<std::net::Ipv6Addr>,
    /// Cache nodes.
    #[serde(default)]
    pub nodes: Vec<NodeConfig>,
    /// Service addresses and their pools.
    #[serde(default)]
    pub vips: Vec<VipConfig>,
    /// A group whose members may use the control socket besides root.
    pub control_group: Option<String>,
    /// Kernel routing table in which the daemon keeps a route to every VIP
    /// address it can serve, for a BGP daemon on the box to announce
    /// (README "Announcing VIPs"). Unset: VIPs are not announced.
    pub vip_route_table: Option<u32>,
    /// Where the Prometheus endpoint listens: "PORT" (loopback) or
    /// "ADDRESS:PORT". Unset: no endpoint.
    pub metrics_listen: Option<String>,
    /// Deny list: packets from or to these prefixes are dropped first.
    #[serde(default)]
    pub deny: Vec<DenyConfig>,
    /// More deny-list entries, one per line (`source PREFIX`,
    /// `destination PREFIX`), relative to the config file's directory.
    pub deny_file: Option<std::path::PathBuf>,
}

fn default_flow_idle_tcp() -> u32 {
    pop_forwarder_common::steering::FLOW_IDLE_TCP_DEFAULT_S
}

fn default_flow_idle_udp() -> u32 {
    pop_forwarder_common::steering::FLOW_IDLE_UDP_DEFAULT_S
}

fn default_kernel_table() -> u32 {
    254
}

/// The outer IPv4 source of IP-in-IP packets: one address (`len` 32), or a
/// pool, `base/len`, each flow taking the address its entropy picks (as
/// Katran does), so that ECMP and RSS on the way spread a node's flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourcePool {
    pub base: std::net::Ipv4Addr,
    pub len: u8,
}

impl SourcePool {
    /// `ADDRESS` or `PREFIX/LEN` (LEN 16 to 32: a pool of at most 65,536
    /// addresses, routed back to this box or not at all).
    pub fn parse(s: &str) -> Result<SourcePool> {
        if s.contains('/') {
            let p: Prefix = s.parse()?;
            let IpAddr::V4(base) = p.addr else {
                bail!("{s} is not an IPv4 prefix");
            };
            if p.len < 16 {
                bail!("{s}: a pool is /16 to /32");
            }
            return Ok(SourcePool { base, len: p.len });
        }
        let base: std::net::Ipv4Addr = s
            .parse()
            .with_context(|| format!("{s:?} is not an IPv4 address or prefix"))?;
        Ok(SourcePool { base, len: 32 })
    }
}

/// Which address of a packet a deny-list entry matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DenyDirection {
    Source,
    Destination,
}

impl fmt::Display for DenyDirection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DenyDirection::Source => "source",
            DenyDirection::Destination => "destination",
        })
    }
}

impl FromStr for DenyDirection {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<DenyDirection> {
        match s {
            "source" | "src" => Ok(DenyDirection::Source),
            "destination" | "dst" => Ok(DenyDirection::Destination),
            _ => bail!("{s:?} is not source or destination"),
        }
    }
}

/// One deny-list entry: packets whose `direction` address is in `prefix`
/// are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Deny {
    pub direction: DenyDirection,
    pub prefix: Prefix,
}

impl Deny {
    /// `source PREFIX` or `destination PREFIX` (a line of a `deny_file`,
    /// and the CLI's words).
    pub fn parse_line(line: &str) -> Result<Deny> {
        let mut words = line.split_whitespace();
        let (Some(direction), Some(prefix), None) = (words.next(), words.next(), words.next())
        else {
            bail!("{line:?} is not `source PREFIX` or `destination PREFIX`");
        };
        Ok(Deny {
            direction: direction.parse()?,
            prefix: prefix.parse().context("prefix")?,
        })
    }
}

impl fmt::Display for Deny {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.direction, self.prefix)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenyConfig {
    pub prefix: String,
    pub direction: DenyDirection,
}

/// Where routes come from.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteSource {
    /// The config file and the CLI.
    #[default]
    Static,
    /// A kernel routing table, mirrored over rtnetlink; the file's routes
    /// too, and they win.
    Kernel,
}

impl fmt::Display for RouteSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RouteSource::Static => "static",
            RouteSource::Kernel => "kernel",
        })
    }
}

fn default_table_size() -> u32 {
    pop_forwarder_common::maglev::DEFAULT_TABLE_SIZE
}

/// A cache node as the config file (and `node add`) gives it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub name: String,
    pub address: String,
    #[serde(default)]
    pub delivery: Delivery,
    /// Direct server return only: the interface the node is reached on.
    #[serde(default)]
    pub dev: String,
    pub mac: Option<String>,
    #[serde(default = "default_weight")]
    pub weight: u32,
    pub health: Option<HealthConfig>,
}

fn default_weight() -> u32 {
    1
}

/// How packets reach a cache node.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// Direct server return: same L2 segment, MAC rewrite only.
    #[default]
    Dsr,
    /// IP-in-IP to the node's address, the outer packet routed.
    Ipip,
}

/// A node's health check: a TCP connect, or an HTTP GET answered 2xx/3xx.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    pub kind: HealthKind,
    pub port: u16,
    /// HTTP only: the path to GET.
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Successes in a row that bring a failed node back.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Failures in a row that take a node out.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    Tcp,
    Http,
}

fn default_path() -> String {
    "/".into()
}
fn default_interval() -> u64 {
    1000
}
fn default_timeout() -> u64 {
    500
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

/// A VIP as the config file (and `vip add`) gives it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VipConfig {
    pub address: String,
    pub protocol: Protocol,
    #[serde(default)]
    pub port: u16,
    pub nodes: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => pop_forwarder_common::steering::PROTO_TCP,
            Protocol::Udp => pop_forwarder_common::steering::PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// A cache node after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub address: IpAddr,
    pub dev: String,
    pub mac: Option<Mac>,
    pub weight: u32,
    pub health: Option<HealthConfig>,
    pub delivery: Delivery,
}

/// A VIP after validation; `nodes` are node names, each known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vip {
    pub address: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
    pub nodes: Vec<String>,
}

impl Vip {
    /// The same service: address, protocol and port.
    pub fn same_service(&self, other: &Vip) -> bool {
        self.address == other.address && self.protocol == other.protocol && self.port == other.port
    }

    /// Validates a VIP against the names of the known nodes.
    /// Parses one VIP; whether its pool's nodes exist is a rule of the whole
    /// state (`steering::Spec::check`).
    pub fn from_config(v: &VipConfig) -> Result<Vip> {
        let address: IpAddr = v
            .address
            .parse()
            .map_err(|_| anyhow::anyhow!("address: {:?} is not an IP address", v.address))?;
        let mut members: Vec<String> = Vec::new();
        for name in &v.nodes {
            if members.contains(name) {
                bail!("nodes: {name:?} is listed twice");
            }
            members.push(name.clone());
        }
        Ok(Vip {
            address,
            protocol: v.protocol,
            port: v.port,
            nodes: members,
        })
    }
}

impl fmt::Display for Vip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} port ", self.address, self.protocol)?;
        if self.port == 0 {
            f.write_str("any")
        } else {
            write!(f, "{}", self.port)
        }
    }
}

impl Node {
    /// Parses one node, field by field; its weight, and whether the state
    /// it joins can reach it, are rules of the whole state
    /// (`steering::Spec::check`).
    pub fn from_config(n: &NodeConfig) -> Result<Node> {
        if n.name.is_empty() || n.name.len() > 64 || n.name.chars().any(char::is_whitespace) {
            bail!(
                "name: {:?} must be 1 to 64 characters without spaces",
                n.name
            );
        }
        let address: IpAddr = n
            .address
            .parse()
            .map_err(|_| anyhow::anyhow!("address: {:?} is not an IP address", n.address))?;
        match n.delivery {
            Delivery::Dsr => check_interface_name(&n.dev).context("dev")?,
            Delivery::Ipip => {
                if !n.dev.is_empty() || n.mac.is_some() {
                    bail!("an ipip node is reached by routing; dev and mac are for dsr nodes");
                }
            }
        }
        let mac = n
            .mac
            .as_deref()
            .map(|m| m.parse::<Mac>().context("mac"))
            .transpose()?;
        if let Some(h) = &n.health {
            if h.port == 0 {
                bail!("health.port: 0 is not a port");
            }
            if !(10..=60_000).contains(&h.interval_ms)
                || h.timeout_ms == 0
                || h.timeout_ms > h.interval_ms
            {
                bail!(
                    "health: interval_ms {} must be 10..=60000 and timeout_ms {} from 1 to the interval",
                    h.interval_ms,
                    h.timeout_ms
                );
            }
            if !(1..=100).contains(&h.rise) || !(1..=100).contains(&h.fall) {
                bail!(
                    "health: rise {} and fall {} must be 1..=100",
                    h.rise,
                    h.fall
                );
            }
            if !h.path.starts_with('/')
                || h.path.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                bail!(
                    "health.path: {:?} is not an absolute path without spaces",
                    h.path
                );
            }
        }
        Ok(Node {
            name: n.name.clone(),
            address,
            dev: n.dev.clone(),
            delivery: n.delivery,
            mac,
            weight: n.weight,
            health: n.health.clone(),
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceConfig {
    pub name: String,
    #[serde(default)]
    pub mode: XdpMode,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub prefix: String,
    pub via: String,
    pub dev: String,
    pub mac: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteMissPolicy {
    /// Hand the packet to the kernel's own routing.
    #[default]
    Pass,
    Drop,
}

/// The IPv4 lookup structure the program reads.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum Ipv4Lookup {
    /// DIR-24-8 arrays (72 MiB, one or two memory reads per lookup whatever
    /// the table size).
    #[default]
    #[serde(rename = "dir-24-8")]
    Dir24,
    /// The kernel's LPM trie (memory grows with the table, lookups slow
    /// down as it grows).
    #[serde(rename = "lpm-trie")]
    Trie,
}

impl fmt::Display for Ipv4Lookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ipv4Lookup::Dir24 => "dir-24-8",
            Ipv4Lookup::Trie => "lpm-trie",
        })
    }
}

/// The IPv6 lookup structure the program reads.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum Ipv6Lookup {
    /// A range table (64 MiB: a direct index over the first 20 bits, 32
    /// bytes each that hold a sparse /20's routes themselves, else a
    /// binary search over the few address ranges of that /20; see
    /// pop_forwarder_common::dxr6), whose cost barely grows with the table.
    #[default]
    #[serde(rename = "dxr")]
    Dxr,
    /// The kernel's LPM trie (memory grows with the table, lookups slow
    /// down as it grows).
    #[serde(rename = "lpm-trie")]
    Trie,
}

impl fmt::Display for Ipv6Lookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ipv6Lookup::Dxr => "dxr",
            Ipv6Lookup::Trie => "lpm-trie",
        })
    }
}

/// How routed packets are looked up.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum RouteLookup {
    /// The program's own tables, filled by the daemon.
    #[default]
    #[serde(rename = "tables")]
    Tables,
    /// The kernel's FIB, per packet (bpf_fib_lookup).
    #[serde(rename = "kernel-fib")]
    KernelFib,
}

impl fmt::Display for RouteLookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RouteLookup::Tables => "tables",
            RouteLookup::KernelFib => "kernel-fib",
        })
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// In the driver (XDP_FLAGS_DRV_MODE): the fast path.
    #[default]
    Native,
    /// Generic XDP in the kernel's receive path, for drivers without XDP.
    Skb,
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XdpMode::Native => "native",
            XdpMode::Skb => "skb",
        })
    }
}

/// A route after validation: the prefix is normalised and the gateway is of
/// the prefix's family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub prefix: Prefix,
    pub via: IpAddr,
    pub dev: IfName,
    pub mac: Option<Mac>,
}

impl Route {
    /// A route in the words of `route add`: `PREFIX via GATEWAY dev IFACE
    /// [mac MAC]` (a line of a `routes_file`).
    pub fn parse_line(line: &str) -> Result<Route> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[..] {
            [prefix, "via", via, "dev", dev] => Route::parse(prefix, via, dev, None),
            [prefix, "via", via, "dev", dev, "mac", mac] => {
                Route::parse(prefix, via, dev, Some(mac))
            }
            _ => bail!("{line:?} is not `PREFIX via GATEWAY dev IFACE [mac MAC]`"),
        }
    }

    /// Validates one route given as strings (from the file or the CLI).
    pub fn parse(prefix: &str, via: &str, dev: &str, mac: Option<&str>) -> Result<Route> {
        let prefix: Prefix = prefix.parse().context("prefix")?;
        let via: IpAddr = via
            .parse()
            .map_err(|_| anyhow::anyhow!("via: {via:?} is not an IP address"))?;
        if via.is_ipv4() != prefix.addr.is_ipv4() {
            bail!("via: gateway {via} is not of the same address family as prefix {prefix}");
        }
        if via.is_unspecified() || via.is_multicast() {
            bail!("via: {via} cannot be a gateway");
        }
        check_interface_name(dev).context("dev")?;
        let mac = mac.map(|m| m.parse::<Mac>().context("mac")).transpose()?;
        Ok(Route {
            prefix,
            via,
            dev: IfName::new(dev).context("dev")?,
            mac,
        })
    }
}

/// Linux interface names: 1 to 15 bytes, no '/', ':' or whitespace.
pub fn check_interface_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 15
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        bail!("{name:?} is not a valid interface name");
    }
    Ok(())
}

/// A validated config.
#[derive(Debug, Clone)]
pub struct Model {
    pub route_miss: RouteMissPolicy,
    pub ipv4_lookup: Ipv4Lookup,
    pub ipv6_lookup: Ipv6Lookup,
    pub route_lookup: RouteLookup,
    pub interfaces: Vec<(String, XdpMode)>,
    pub route_source: RouteSource,
    pub kernel_table: u32,
    pub routes: Vec<Route>,
    pub flow_hash_seed: u32,
    /// Connection-table idle timeouts, TCP and other protocols (seconds).
    pub flow_idle_timeout: (u32, u32),
    pub maglev_table_size: u32,
    pub encap_source_v4: Option<SourcePool>,
    pub encap_source_v6: Option<std::net::Ipv6Addr>,
    /// Sorted by name: a node's slot in the node table is its position here.
    pub nodes: Vec<Node>,
    pub vips: Vec<Vip>,
    /// Members of this group may use the control socket too (the group must
    /// exist when `run` starts).
    pub control_group: Option<String>,
    /// Where VIP routes for BGP go (`announce`); None: not announced.
    pub vip_route_table: Option<u32>,
    /// The Prometheus endpoint's address; None: off.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The deny list, sorted, each entry once.
    pub deny: Vec<Deny>,
}

impl Model {
    pub fn from_file(path: &Path) -> Result<Model> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Model::from_toml_in(&text, base).with_context(|| format!("config file {}", path.display()))
    }

    /// A config given as text; a `routes_file` is looked for relative to
    /// the working directory.
    pub fn from_toml(text: &str) -> Result<Model> {
        Model::from_toml_in(text, Path::new("."))
    }

    /// A config given as text, a relative `routes_file` being in `base`.
    pub fn from_toml_in(text: &str, base: &Path) -> Result<Model> {
        let config: Config = toml::from_str(text)?;
        let read = |field: &str, file: &Option<std::path::PathBuf>| -> Result<_> {
            match file {
                None => Ok(None),
                Some(file) => {
                    let path = base.join(file);
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("{field}: reading {}", path.display()))?;
                    Ok(Some((path, text)))
                }
            }
        };
        let routes_file = read("routes_file", &config.routes_file)?;
        let deny_file = read("deny_file", &config.deny_file)?;
        let deny = validate_deny(
            &config.deny,
            deny_file.as_ref().map(|(p, t)| (p.as_path(), t.as_str())),
        )?;
        let mut model = Model::validate(
            config,
            routes_file.as_ref().map(|(p, t)| (p.as_path(), t.as_str())),
        )?;
        model.deny = deny;
        Ok(model)
    }

    fn validate(config: Config, routes_file: Option<(&Path, &str)>) -> Result<Model> {
        let (nodes, vips) = validate_steering(&config)?;
        if config.interfaces.is_empty() {
            bail!("interfaces: at least one interface is needed");
        }
        let mut names = HashSet::new();
        let mut interfaces = Vec::new();
        for (i, iface) in config.interfaces.into_iter().enumerate() {
            check_interface_name(&iface.name).with_context(|| format!("interfaces[{i}].name"))?;
            if !names.insert(iface.name.clone()) {
                bail!("interfaces[{i}].name: {:?} is listed twice", iface.name);
            }
            interfaces.push((iface.name, iface.mode));
        }
        // Sized for the routes to come, at most a routes file's lines: a
        // set that grows by rehashing costs a quarter of the time, and a
        // vector that grows by doubling holds up to twice its routes.
        let lines = routes_file.map_or(0, |(_, t)| t.lines().count());
        let expected = config.routes.len() + lines;
        let mut prefixes =
            crate::net::PrefixSet::with_capacity_and_hasher(expected, Default::default());
        let mut routes = Vec::with_capacity(expected);
        for (i, r) in config.routes.iter().enumerate() {
            let route = Route::parse(&r.prefix, &r.via, &r.dev, r.mac.as_deref())
                .with_context(|| format!("routes[{i}] ({})", r.prefix))?;
            if !prefixes.insert(route.prefix) {
                bail!("routes[{i}].prefix: {} is listed twice", route.prefix);
            }
            routes.push(route);
        }
        if let Some((path, text)) = routes_file {
            for (n, line) in text.lines().enumerate() {
                let line = line.split('#').next().unwrap_or_default().trim();
                if line.is_empty() {
                    continue;
                }
                let at = || format!("routes_file {}:{}", path.display(), n + 1);
                let route = Route::parse_line(line).with_context(at)?;
                if !prefixes.insert(route.prefix) {
                    bail!("{}: {} is listed twice", at(), route.prefix);
                }
                routes.push(route);
            }
        }
        // One gateway on one interface is one next hop: two static MACs for
        // it would make the table depend on the order of the routes. One
        // pass, remembering the first static MAC of each gateway.
        let mut macs: std::collections::HashMap<(IpAddr, &str), (Mac, Prefix)> =
            std::collections::HashMap::new();
        for (i, a) in routes.iter().enumerate() {
            let Some(mac) = a.mac else { continue };
            let (first, from) = *macs
                .entry((a.via, a.dev.as_str()))
                .or_insert((mac, a.prefix));
            if first != mac {
                bail!(
                    "routes[{i}].mac: gateway {} on {} already has MAC {first} from the route to {from}",
                    a.via,
                    a.dev
                );
            }
        }
        // RT_TABLE_UNSPEC (0), and the kernel's own local table (255, its
        // addresses and broadcasts, which the daemon reads from the
        // interfaces) are no route source.
        if config.kernel_table == 0 || config.kernel_table == 255 {
            bail!(
                "kernel_table: {} is not a routing table to mirror (254 is main; 1 to 252 and 256 up are tables of your own)",
                config.kernel_table
            );
        }
        if let Some(table) = config.vip_route_table {
            crate::announce::check_table(table)
                .map_err(|e| anyhow::anyhow!("vip_route_table: {e}"))?;
            if config.route_source == RouteSource::Kernel && table == config.kernel_table {
                bail!(
                    "vip_route_table: {table} is the mirrored kernel_table; announced VIPs need a table of their own"
                );
            }
        }
        let metrics_listen = config
            .metrics_listen
            .as_deref()
            .map(crate::metrics::parse_listen)
            .transpose()
            .map_err(|e| anyhow::anyhow!("metrics_listen: {e}"))?;
        Model {
            route_miss: config.route_miss,
            ipv4_lookup: config.ipv4_lookup,
            ipv6_lookup: config.ipv6_lookup,
            route_lookup: config.route_lookup,
            interfaces,
            route_source: config.route_source,
            kernel_table: config.kernel_table,
            routes,
            flow_hash_seed: config.flow_hash_seed,
            flow_idle_timeout: (config.flow_idle_timeout_tcp, config.flow_idle_timeout_udp),
            maglev_table_size: config.maglev_table_size,
            encap_source_v4: config
                .encap_source_v4
                .as_deref()
                .map(SourcePool::parse)
                .transpose()
                .context("encap_source_v4")?,
            encap_source_v6: config.encap_source_v6,
            nodes,
            vips,
            control_group: config.control_group,
            vip_route_table: config.vip_route_table,
            metrics_listen,
            deny: Vec::new(),
        }
        .checked()
    }

    /// The model, if its steering state keeps the rules every steering
    /// change keeps.
    fn checked(self) -> Result<Model> {
        crate::steering::Spec::of(&self).check()?;
        Ok(self)
    }
}

/// The deny list of a config: `[[deny]]` entries, then a `deny_file`'s
/// lines; each entry once, at most `MAX_DENY`.
fn validate_deny(entries: &[DenyConfig], file: Option<(&Path, &str)>) -> Result<Vec<Deny>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, d) in entries.iter().enumerate() {
        let entry = Deny {
            direction: d.direction,
            prefix: d
                .prefix
                .parse()
                .with_context(|| format!("deny[{i}].prefix"))?,
        };
        if !seen.insert(entry) {
            bail!("deny[{i}]: {entry} is listed twice");
        }
        out.push(entry);
    }
    if let Some((path, text)) = file {
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let at = || format!("deny_file {}:{}", path.display(), n + 1);
            let entry = Deny::parse_line(line).with_context(at)?;
            if !seen.insert(entry) {
                bail!("{}: {entry} is listed twice", at());
            }
            out.push(entry);
        }
    }
    if out.len() > pop_forwarder_common::MAX_DENY as usize {
        bail!(
            "deny: {} entries, more than the {} the program's deny list holds",
            out.len(),
            pop_forwarder_common::MAX_DENY
        );
    }
    out.sort();
    Ok(out)
}

/// Parses the steering part of a config, item by item; the rules of the
/// whole state are `steering::Spec::check`'s, run on the finished model.
fn validate_steering(config: &Config) -> Result<(Vec<Node>, Vec<Vip>)> {
    let mut nodes = config
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| Node::from_config(n).with_context(|| format!("nodes[{i}] ({})", n.name)))
        .collect::<Result<Vec<Node>>>()?;
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let vips = config
        .vips
        .iter()
        .enumerate()
        .map(|(i, v)| Vip::from_config(v).with_context(|| format!("vips[{i}]")))
        .collect::<Result<Vec<Vip>>>()?;
    Ok((nodes, vips))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
route_miss = "drop"
ipv4_lookup = "lpm-trie"
ipv6_lookup = "lpm-trie"
[[interfaces]]
name = "r0"
[[interfaces]]
name = "r1"
mode = "skb"
[[routes]]
prefix = "10.0.3.0/24"
via = "10.0.2.2"
dev = "r1"
[[routes]]
prefix = "fd00:3::/64"
via = "fd00:2::2"
dev = "r1"
mac = "02:00:00:00:00:03"
"#;

    fn err(text: &str) -> String {
        format!("{:#}", Model::from_toml(text).unwrap_err())
    }

    /// A config file naming a routes file, both in a directory of their own.
    fn with_routes_file(lines: &str) -> Result<Model> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pf-routes-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("routes.txt"), lines).unwrap();
        let config = dir.join("pop.toml");
        std::fs::write(&config, format!("routes_file = \"routes.txt\"\n{GOOD}")).unwrap();
        let model = Model::from_file(&config);
        std::fs::remove_dir_all(&dir).unwrap();
        model
    }

    #[test]
    fn a_routes_file_adds_routes_line_by_line() {
        let m = with_routes_file(
            "# static table\n\n198.51.100.0/24 via 10.0.2.2 dev r1\n\
             2001:db8::/32   via fd00:2::2 dev r1 mac 02:00:00:00:00:03  # peer\n",
        )
        .unwrap();
        assert_eq!(m.routes.len(), 4);
        assert_eq!(m.routes[2].prefix.to_string(), "198.51.100.0/24");
        assert_eq!(m.routes[3].mac, Some(Mac([2, 0, 0, 0, 0, 3])));
        for (lines, needle) in [
            (
                "198.51.100.0/24 via 10.0.2.2\n",
                "routes.txt:1: \"198.51.100.0/24 via 10.0.2.2\" is not `PREFIX via GATEWAY dev IFACE [mac MAC]`",
            ),
            (
                "\n198.51.100.1/24 via 10.0.2.2 dev r1\n",
                "routes.txt:2: prefix: \"198.51.100.1/24\" has host bits set",
            ),
            (
                "10.0.3.0/24 via 10.0.2.2 dev r1\n",
                "routes.txt:1: 10.0.3.0/24 is listed twice",
            ),
            (
                "198.51.100.0/24 via fd00::1 dev r1\n",
                "routes.txt:1: via: gateway fd00::1 is not of the same address family",
            ),
        ] {
            let e = format!("{:#}", with_routes_file(lines).unwrap_err());
            assert!(e.contains(needle), "expected {needle:?} in {e:?}");
        }
        let e = err(&format!(
            "routes_file = \"/nonexistent/routes.txt\"\n{GOOD}"
        ));
        assert!(
            e.contains("routes_file: reading /nonexistent/routes.txt"),
            "{e}"
        );
    }

    #[test]
    fn parses_a_full_config() {
        let m = Model::from_toml(GOOD).unwrap();
        assert_eq!(m.route_miss, RouteMissPolicy::Drop);
        assert_eq!(m.ipv4_lookup, Ipv4Lookup::Trie);
        assert_eq!(m.ipv6_lookup, Ipv6Lookup::Trie);
        assert_eq!(
            m.interfaces,
            vec![("r0".into(), XdpMode::Native), ("r1".into(), XdpMode::Skb)]
        );
        assert_eq!(m.routes.len(), 2);
        assert_eq!(m.routes[1].mac, Some(Mac([2, 0, 0, 0, 0, 3])));
        assert_eq!(m.routes[0].prefix.to_string(), "10.0.3.0/24");
    }

    #[test]
    fn errors_name_the_field_and_value() {
        let cases = [
            (GOOD.replace("10.0.3.0/24", "10.0.3.1/24"), "host bits set"),
            (GOOD.replace("10.0.3.0/24", "10.0.3.0/33"), "\"33\""),
            (GOOD.replace("10.0.2.2", "fd00::1"), "same address family"),
            (GOOD.replace("10.0.2.2", "banana"), "via: \"banana\""),
            (
                GOOD.replace("02:00:00:00:00:03", "02:00:00:00:03"),
                "mac: \"02:00:00:00:03\"",
            ),
            (
                GOOD.replace("02:00:00:00:00:03", "01:00:5e:00:00:01"),
                "not a unicast",
            ),
            (GOOD.replace("\"skb\"", "\"turbo\""), "turbo"),
            (GOOD.replace("\"drop\"", "\"maybe\""), "maybe"),
            (GOOD.replace("\"lpm-trie\"", "\"hash\""), "hash"),
            (
                GOOD.replace("name = \"r1\"", "name = \"r0\""),
                "interfaces[1].name: \"r0\" is listed twice",
            ),
            (
                GOOD.replace("fd00:3::/64", "10.0.3.0/24")
                    .replace("fd00:2::2", "10.0.2.9"),
                "routes[1].prefix: 10.0.3.0/24 is listed twice",
            ),
            (
                GOOD.replace("dev = \"r1\"\nmac", "dev = \"this-name-is-too-long\"\nmac"),
                "dev",
            ),
            (GOOD.replace("via =", "gateway ="), "gateway"),
            (
                "route_miss = \"pass\"\ninterfaces = []".to_string(),
                "at least one interface",
            ),
        ];
        for (text, needle) in cases {
            let e = err(&text);
            assert!(e.contains(needle), "expected {needle:?} in {e:?}");
        }
    }

    #[test]
    fn conflicting_static_macs_for_one_gateway_are_refused() {
        let text = r#"
[[interfaces]]
name = "r1"
[[routes]]
prefix = "10.1.0.0/16"
via = "10.0.2.2"
dev = "r1"
mac = "02:00:00:00:00:01"
[[routes]]
prefix = "10.2.0.0/16"
via = "10.0.2.2"
dev = "r1"
mac = "02:00:00:00:00:02"
"#;
        assert!(err(text).contains("already has MAC 02:00:00:00:00:01"));
    }

    #[test]
    fn route_source_lookup_and_flow_timeouts_are_read_and_checked() {
        let m = Model::from_toml(GOOD).unwrap();
        assert_eq!(
            (
                m.route_source,
                m.kernel_table,
                m.route_lookup,
                m.flow_idle_timeout
            ),
            (RouteSource::Static, 254, RouteLookup::Tables, (900, 300))
        );
        assert_eq!(m.vip_route_table, None);
        for (pool, ok) in [
            ("192.0.2.7", Some(("192.0.2.7", 32))),
            ("192.0.2.0/24", Some(("192.0.2.0", 24))),
            ("10.0.0.0/8", None),
            ("192.0.2.1/24", None),
            ("2001:db8::/64", None),
        ] {
            let got = SourcePool::parse(pool)
                .ok()
                .map(|p| (p.base.to_string(), p.len));
            assert_eq!(got, ok.map(|(a, l)| (a.to_owned(), l)), "{pool}");
        }
        assert_eq!(m.metrics_listen, None);
        let m = Model::from_toml(&format!("metrics_listen = \"9464\"\n{GOOD}")).unwrap();
        assert_eq!(m.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
        let m = Model::from_toml(&format!("vip_route_table = 1000\n{GOOD}")).unwrap();
        assert_eq!(m.vip_route_table, Some(1000));
        let m = Model::from_toml(&format!(
            "route_source = \"kernel\"\nkernel_table = 100\nroute_lookup = \"kernel-fib\"\n\
             flow_idle_timeout_tcp = 0\nflow_idle_timeout_udp = 30\n{GOOD}"
        ))
        .unwrap();
        assert_eq!(
            (
                m.route_source,
                m.kernel_table,
                m.route_lookup,
                m.flow_idle_timeout
            ),
            (RouteSource::Kernel, 100, RouteLookup::KernelFib, (0, 30))
        );
        for (line, why) in [
            (
                "kernel_table = 255",
                "kernel_table: 255 is not a routing table to mirror",
            ),
            (
                "kernel_table = 0",
                "kernel_table: 0 is not a routing table to mirror",
            ),
            (
                "vip_route_table = 254",
                "vip_route_table: 254 is a table the kernel routes by",
            ),
            (
                "route_source = \"kernel\"\nkernel_table = 100\nvip_route_table = 100",
                "vip_route_table: 100 is the mirrored kernel_table",
            ),
            (
                "metrics_listen = \"localhost:80\"",
                "metrics_listen: \"localhost:80\" is not PORT",
            ),
            ("route_source = \"bgp\"", "unknown variant `bgp`"),
            ("route_lookup = \"fib\"", "unknown variant `fib`"),
        ] {
            let e = format!(
                "{:#}",
                Model::from_toml(&format!("{line}\n{GOOD}")).unwrap_err()
            );
            assert!(e.contains(why), "{line}: {e}");
        }
        // The lookups GOOD sets, given values there are none of.
        for (line, bad, why) in [
            (
                "ipv6_lookup = \"lpm-trie\"",
                "ipv6_lookup = \"poptrie\"",
                "unknown variant `poptrie`",
            ),
            (
                "ipv4_lookup = \"lpm-trie\"",
                "ipv4_lookup = \"dir-16-8\"",
                "unknown variant `dir-16-8`",
            ),
        ] {
            let e = format!(
                "{:#}",
                Model::from_toml(&GOOD.replace(line, bad)).unwrap_err()
            );
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn prefix_normalisation_and_display() {
        let p: Prefix = "0.0.0.0/0".parse().unwrap();
        assert_eq!(p.network().to_string(), "0.0.0.0");
        let p: Prefix = "2001:db8::/32".parse().unwrap();
        assert_eq!(p.to_string(), "2001:db8::/32");
        assert!("2001:db8::1/32".parse::<Prefix>().is_err());
        assert!("10.0.0.0".parse::<Prefix>().is_err());
    }

    #[test]
    fn steering_config_is_validated_with_the_field_named() {
        let base = r#"
maglev_table_size = 251
[[interfaces]]
name = "r0"
[[nodes]]
name = "b"
address = "10.0.5.12"
dev = "r2"
weight = 2
[[nodes]]
name = "a"
address = "10.0.5.11"
dev = "r2"
[[vips]]
address = "192.0.2.10"
protocol = "tcp"
port = 443
nodes = ["a", "b"]
"#;
        let ipip = base
            .replace(
                "maglev_table_size = 251",
                "maglev_table_size = 251\nencap_source_v4 = \"10.0.0.1\"",
            )
            .replace("dev = \"r2\"\nweight = 2", "delivery = \"ipip\"");
        let m = Model::from_toml(&ipip).unwrap();
        assert_eq!(m.nodes[1].delivery, Delivery::Ipip);
        let m = Model::from_toml(base).unwrap();
        // Nodes are ordered by name: slot 0 is "a" whatever the file's order.
        assert_eq!(m.nodes[0].name, "a");
        assert_eq!(m.vips[0].nodes, vec!["a", "b"]);
        assert_eq!(m.vips[0].protocol, Protocol::Tcp);
        let cases = [
            (
                base.replace("251", "250"),
                "maglev_table_size: 250 is not a prime",
            ),
            (base.replace("251", "65539"), "maglev_table_size: 65539"),
            (
                base.replace("[\"a\", \"b\"]", "[\"a\", \"c\"]"),
                "vips (192.0.2.10 tcp port 443): nodes: no node is named \"c\"",
            ),
            (
                base.replace("[\"a\", \"b\"]", "[\"a\", \"a\"]"),
                "vips[0]: nodes: \"a\" is listed twice",
            ),
            (
                base.replace("name = \"b\"", "name = \"a\""),
                "nodes: \"a\" is listed twice",
            ),
            (
                base.replace("10.0.5.12", "ten"),
                "nodes[0] (b): address: \"ten\"",
            ),
            (
                base.replace("weight = 2", "weight = 5000"),
                "nodes (b): weight: 5000",
            ),
            (
                base.replace("dev = \"r2\"\nweight = 2", "delivery = \"ipip\""),
                "needs encap_source_v4",
            ),
            (base.replace("weight = 2", "delivery = \"gre\""), "gre"),
            (
                base.replace("weight = 2", "delivery = \"ipip\"").replace(
                    "maglev_table_size = 251",
                    "maglev_table_size = 251\nencap_source_v4 = \"10.0.0.1\"",
                ),
                "dev and mac are for dsr nodes",
            ),
            (base.replace("\"tcp\"", "\"sctp\""), "sctp"),
            (
                format!(
                    "{base}[[vips]]\naddress = \"192.0.2.10\"\nprotocol = \"tcp\"\nport = 443\nnodes = []\n"
                ),
                "vips: 192.0.2.10 tcp port 443 is listed twice",
            ),
            (
                // IPv6 in IPv4 is not offered: an IPv6 VIP's ipip node needs
                // an IPv6 address.
                ipip.replace("address = \"192.0.2.10\"", "address = \"2001:db8::10\""),
                "nodes: \"b\" is an IPv4 ipip node, and IPv6 in IPv4 is not offered",
            ),
        ];
        for (text, needle) in cases {
            let e = err(&text);
            assert!(e.contains(needle), "expected {needle:?} in {e:?}");
        }
    }
}
