//! `pop-forwarder run`: load, pin, fill, attach, keep current, detach.

use std::{
    collections::HashMap,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{
    Xdp,
    links::{FdLink, PinnedLink},
};
use log::{info, warn};
use pop_forwarder_common::{PROGRAM_NAME, map_names};
use tokio::sync::mpsc::UnboundedSender;

use crate::{
    EBPF_OBJECT,
    config::{Ipv4Lookup, Model, Node, NodeConfig, Vip, VipConfig, XdpMode},
    health::HealthEvent,
    instance::{self, AttachedInterface, Instance, State},
    kernel, steering,
    tables::{Tables, resolve_next_hop},
};

/// How often the daemon re-reads interfaces, addresses and neighbours.
const REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// A loaded and attached forwarder. Dropping it without `shutdown` leaves the
/// pins (and so forwarding) in place, as a crash would.
struct Running {
    instance: Instance,
    // Kept so the program and its maps live as long as the daemon.
    _ebpf: aya::Ebpf,
    tables: Tables,
    links: Vec<PinnedLink>,
    /// Gateways the kernel was asked to resolve (once each).
    requested_neighbours: std::collections::HashSet<(std::net::IpAddr, u32)>,
    /// Cache nodes and VIPs in their slots.
    steering: steering::Steering,
    /// The running health check of each checked node: (checker id, task).
    checkers: HashMap<String, (u64, tokio::task::AbortHandle)>,
    next_checker: u64,
    health_events: UnboundedSender<HealthEvent>,
    /// Local addresses shadowed by operator routes, as last logged.
    local_conflicts: Vec<std::net::IpAddr>,
}

/// Level of the log records the XDP program emits (aya-log), set in the
/// program before it is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BpfLogLevel {
    Off = 0,
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
    Trace = 5,
}

pub async fn run(instance: &Instance, config_path: &Path, bpf_log: BpfLogLevel) -> Result<()> {
    let model = Model::from_file(config_path)?;
    let (health_tx, mut health_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut running = start(instance, &model, config_path, bpf_log, health_tx)?;
    info!(
        "instance {:?}: forwarding on {} with {} routes (IPv4 lookup: {}); maps pinned at {}",
        instance.name,
        model
            .interfaces
            .iter()
            .map(|(n, m)| format!("{n} ({m})"))
            .collect::<Vec<_>>()
            .join(", "),
        model.routes.len(),
        model.ipv4_lookup,
        instance.pin_dir().display()
    );

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    let control_path = instance.control_path();
    let _ = std::fs::remove_file(&control_path);
    let control = tokio::net::UnixListener::bind(&control_path)
        .with_context(|| format!("creating the control socket {}", control_path.display()))?;
    let names: Vec<String> = model.nodes.iter().map(|n| n.name.clone()).collect();
    start_checks(&mut running, &names, &[]);
    // The first refresh asks the kernel to resolve gateways and nodes
    // without a MAC; quick ones after it pick up what the kernel resolved
    // (IPv6 neighbour discovery can take a second) rather than a whole
    // refresh interval later: every 200 ms while any gateway is unresolved,
    // for at most 3 s.
    for round in 0..15 {
        if let Err(e) = refresh(&mut running) {
            warn!("refreshing interfaces and neighbours: {e:#}");
        }
        let unresolved = running.tables.unresolved_gateways().map_or(0, |g| g.len());
        if round > 0 && unresolved == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut tick = tokio::time::interval(REFRESH_INTERVAL);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            Ok((stream, _)) = control.accept() => {
                if let Err(e) = serve_control(&mut running, stream).await {
                    warn!("control socket: {e:#}");
                }
            }
            Some(event) = health_rx.recv() => {
                if let Err(e) = apply_health(&mut running, event.clone()) {
                    warn!("applying a health change of node {}: {e:#}", event.node);
                }
            }
            _ = sighup.recv() => match reload(&mut running, config_path) {
                Ok(summary) => info!("reloaded {}: {summary}", config_path.display()),
                Err(e) => warn!("reload of {} refused, tables unchanged: {e:#}", config_path.display()),
            },
            _ = tick.tick() => {
                if let Err(e) = refresh(&mut running) {
                    warn!("refreshing interfaces and neighbours: {e:#}");
                }
            }
        }
    }
    let _ = std::fs::remove_file(&control_path);
    shutdown(running)
}

/// One command on the control socket: a JSON line in, a JSON line out.
/// `{"node_weight": {"name": N, "weight": W}}` sets a node's weight (0
/// drains it: no new flows, its existing flows stay) and rebuilds the
/// Maglev tables of its VIPs.
async fn serve_control(running: &mut Running, stream: tokio::net::UnixStream) -> Result<()> {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(read);
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .context("no command within 5 s")??;
    let reply = match control_command(running, &line) {
        Ok(message) => serde_json::json!({ "ok": message }),
        Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
    };
    write.write_all(format!("{reply}\n").as_bytes()).await?;
    Ok(())
}

/// The control socket's commands, one JSON object per line, e.g.
/// `{"node_weight": {"name": "cache-a", "weight": 0}}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum Command {
    /// Sets a node's weight (0 drains it: no new flows, its existing flows
    /// stay).
    NodeWeight { name: String, weight: u32 },
    /// Adds a cache node (in no VIP's pool yet).
    NodeAdd(NodeConfig),
    /// Removes a node from every pool, then from the node table.
    NodeDel { name: String },
    /// Adds a VIP, or sets the pool of an existing one.
    VipAdd(VipConfig),
    /// Removes a VIP: its packets are routed like any others.
    VipDel {
        address: std::net::IpAddr,
        protocol: crate::config::Protocol,
        port: u16,
    },
}

fn control_command(running: &mut Running, line: &str) -> Result<String> {
    let command: Command = serde_json::from_str(line.trim()).context("not a command")?;
    let mut spec = running.steering.spec();
    let message = match command {
        Command::NodeWeight { name, weight } => {
            if weight > 1000 {
                bail!("weight {weight} is not from 0 (drained) to 1000");
            }
            spec_node(&mut spec.nodes, &name)?.weight = weight;
            format!("cache node {name} weight {weight}")
        }
        Command::NodeAdd(config) => {
            let node = Node::from_config(
                &config,
                spec.encap_source_v4.is_some(),
                spec.encap_source_v6.is_some(),
            )?;
            if spec.nodes.iter().any(|n| n.name == node.name) {
                bail!("a cache node is already named {:?}", node.name);
            }
            let message = format!("cache node {} ({}) added", node.name, node.address);
            spec.nodes.push(node);
            message
        }
        Command::NodeDel { name } => {
            spec_node(&mut spec.nodes, &name)?;
            spec.nodes.retain(|n| n.name != name);
            let mut pools = 0;
            for vip in &mut spec.vips {
                let before = vip.nodes.len();
                vip.nodes.retain(|n| *n != name);
                pools += before - vip.nodes.len();
            }
            format!("cache node {name} removed (it was in {pools} VIP pools)")
        }
        Command::VipAdd(config) => {
            let known: Vec<&str> = spec.nodes.iter().map(|n| n.name.as_str()).collect();
            let vip = Vip::from_config(&config, &known)?;
            match spec.vips.iter_mut().find(|v| v.same_service(&vip)) {
                Some(existing) => {
                    *existing = vip.clone();
                    format!("VIP {vip}: pool set to [{}]", vip.nodes.join(", "))
                }
                None => {
                    spec.vips.push(vip.clone());
                    format!("VIP {vip} added, pool [{}]", vip.nodes.join(", "))
                }
            }
        }
        Command::VipDel {
            address,
            protocol,
            port,
        } => {
            let gone = Vip {
                address,
                protocol,
                port,
                nodes: Vec::new(),
            };
            let before = spec.vips.len();
            spec.vips.retain(|v| !v.same_service(&gone));
            if spec.vips.len() == before {
                bail!("{gone} is no VIP");
            }
            format!("VIP {gone} removed")
        }
    };
    let applied = apply_steering(running, &spec, &kernel::links()?, &kernel::neighbours()?)?;
    let message = format!("{message}; {applied}");
    info!("{message}");
    Ok(message)
}

fn spec_node<'a>(nodes: &'a mut [Node], name: &str) -> Result<&'a mut Node> {
    nodes
        .iter_mut()
        .find(|n| n.name == name)
        .with_context(|| format!("no cache node is named {name:?}"))
}

/// Applies a steering spec (validated and resolved first: refused whole),
/// starts and stops health checks to match, and records the result in the
/// state file.
fn apply_steering(
    running: &mut Running,
    spec: &steering::Spec,
    links: &[kernel::Link],
    neighbours: &[kernel::Neighbour],
) -> Result<steering::Applied> {
    let _lock = running.instance.lock()?;
    let applied = running
        .steering
        .apply(&mut running.tables, spec, links, neighbours)?;
    start_checks(running, &applied.check, &applied.uncheck);
    write_steering_state(running)?;
    Ok(applied)
}

/// Starts (or restarts) the health checks of the nodes in `check` and
/// stops those of the nodes in `uncheck`.
fn start_checks(running: &mut Running, check: &[String], uncheck: &[String]) {
    for name in uncheck.iter().chain(check) {
        if let Some((_, task)) = running.checkers.remove(name) {
            task.abort();
        }
    }
    for name in check {
        let Some((_, slot)) = running.steering.node(name) else {
            continue;
        };
        let Some(health) = slot.node.health.clone() else {
            continue;
        };
        running.next_checker += 1;
        let id = running.next_checker;
        let task = crate::health::spawn(
            name,
            slot.node.address,
            health,
            id,
            running.health_events.clone(),
        );
        running.checkers.insert(name.clone(), (id, task));
    }
}

fn write_steering_state(running: &Running) -> Result<()> {
    if let Some(mut state) = running.instance.read_state() {
        state.steering = running.steering.state();
        running.instance.write_state(&state)?;
    }
    Ok(())
}

/// Validates everything that can be validated before touching the kernel,
/// then loads, pins, fills and attaches; on any failure undoes what it did.
fn start(
    instance: &Instance,
    model: &Model,
    config_path: &Path,
    bpf_log: BpfLogLevel,
    health_events: UnboundedSender<HealthEvent>,
) -> Result<Running> {
    if let Some(pid) = instance.daemon_pid() {
        bail!(
            "instance {:?} is already running (pid {pid})",
            instance.name
        );
    }
    if instance.exists() {
        bail!(
            "instance {:?} left pins at {} (its daemon is gone); run `pop-forwarder --instance {} detach` first",
            instance.name,
            instance.pin_dir().display(),
            instance.name
        );
    }
    let links = kernel::links()?;
    let mut attach_to = Vec::new();
    for (i, (name, mode)) in model.interfaces.iter().enumerate() {
        let link = kernel::link(&links, name).with_context(|| format!("interfaces[{i}].name"))?;
        if link.xdp_attached {
            bail!("interfaces[{i}].name: {name:?} already has an XDP program attached");
        }
        attach_to.push(AttachedInterface {
            name: name.clone(),
            ifindex: link.ifindex,
            mode: *mode,
        });
    }
    let neighbours = kernel::neighbours()?;
    let routes = resolve_routes(model, &links, &neighbours)?;
    for node in &model.nodes {
        steering::resolve_node(node, &links, &neighbours)
            .with_context(|| format!("nodes ({})", node.name))?;
    }
    warn_if_kernel_forwarding_off();

    instance::ensure_bpffs()?;
    let _lock = instance.lock()?;
    let level = bpf_log as u8;
    let mut loader = aya::EbpfLoader::new();
    loader.override_global(aya_log::LEVEL, &level, true);
    if model.ipv4_lookup == Ipv4Lookup::Trie {
        // The DIR-24-8 arrays are not read: do not allocate their 72 MiB.
        loader
            .map_max_entries(map_names::IPV4_TBL24, 1)
            .map_max_entries(map_names::IPV4_TBL8, 1);
    }
    let mut ebpf = loader.load(EBPF_OBJECT).context("loading the XDP object")?;
    let pin_dir = instance.pin_dir();
    std::fs::create_dir_all(&pin_dir).with_context(|| format!("creating {}", pin_dir.display()))?;
    // The interfaces and neighbours read while validating serve the fill too.
    let mut steering = steering::Steering::default();
    match fill_and_attach(
        instance,
        &mut ebpf,
        model,
        &attach_to,
        &routes,
        &mut steering,
        (&links, &neighbours),
    ) {
        Ok((tables, links)) => {
            instance.write_state(&State {
                pid: std::process::id(),
                config: config_path
                    .canonicalize()
                    .unwrap_or_else(|_| config_path.to_owned()),
                interfaces: attach_to,
                steering: steering.state(),
                started_unix: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            })?;
            Ok(Running {
                instance: instance.clone(),
                _ebpf: ebpf,
                tables,
                links,
                local_conflicts: Vec::new(),
                steering,
                checkers: HashMap::new(),
                next_checker: 0,
                health_events,
                requested_neighbours: Default::default(),
            })
        }
        Err(e) => {
            // Links attached so far are dropped with the error's stack frame
            // (detaching them); the pins go here.
            if let Err(cleanup) = instance.remove_pins() {
                warn!("cleaning up after a failed start: {cleanup:#}");
            }
            Err(e)
        }
    }
}

fn fill_and_attach(
    instance: &Instance,
    ebpf: &mut aya::Ebpf,
    model: &Model,
    attach_to: &[AttachedInterface],
    routes: &[(crate::config::Prefix, pop_forwarder_common::NextHop)],
    steering: &mut steering::Steering,
    (links, neighbours): (&[kernel::Link], &[kernel::Neighbour]),
) -> Result<(Tables, Vec<PinnedLink>)> {
    // The tables the CLI acts on; the program's own globals and log ring
    // buffer stay private to this process.
    for name in map_names::ALL {
        let map = ebpf
            .map(name)
            .with_context(|| format!("map {name} missing from the object"))?;
        let path = instance.pin_dir().join(name);
        map.pin(&path)
            .with_context(|| format!("pinning map {name} at {}", path.display()))?;
    }
    let mut tables = Tables::from_ebpf(ebpf)?;
    forward_bpf_logs(ebpf)?;
    tables.set_route_miss(model.route_miss)?;
    tables.set_ipv4_lookup(model.ipv4_lookup)?;
    for iface in attach_to {
        tables.add_egress(iface.ifindex)?;
    }
    let addrs: Vec<_> = links.iter().flat_map(|l| l.addrs.iter().copied()).collect();
    tables.sync_local_addrs(&addrs)?;
    tables.add_routes(routes)?;
    steering.apply(&mut tables, &steering::Spec::of(model), links, neighbours)?;

    let program: &mut Xdp = ebpf
        .program_mut(PROGRAM_NAME)
        .context("the object has no XDP program")?
        .try_into()
        .context("the program is not XDP")?;
    program
        .load()
        .context("loading the XDP program into the kernel (verifier)")?;
    let mut pinned = Vec::new();
    for iface in attach_to {
        let mode = match iface.mode {
            XdpMode::Native => aya::programs::XdpMode::Driver,
            XdpMode::Skb => aya::programs::XdpMode::Skb,
        };
        let id = program
            .attach(&iface.name, mode)
            .with_context(|| format!("attaching XDP to {} in {} mode", iface.name, iface.mode))?;
        let link = program.take_link(id)?;
        let fd_link =
            FdLink::try_from(link).context("XDP attachment is not a bpf_link (kernel < 5.9?)")?;
        let path = instance.link_pin(&iface.name);
        pinned.push(
            fd_link
                .pin(&path)
                .with_context(|| format!("pinning link at {}", path.display()))?,
        );
    }
    Ok((tables, pinned))
}

/// Relays the program's aya-log records to this process's logger, under the
/// target `bpf`.
fn forward_bpf_logs(ebpf: &mut aya::Ebpf) -> Result<()> {
    struct Relay;
    impl log::Log for Relay {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            log::logger().log(
                &log::Record::builder()
                    .args(*record.args())
                    .level(record.level())
                    .target("bpf")
                    .build(),
            );
        }
        fn flush(&self) {}
    }
    let logger = aya_log::EbpfLogger::init_with_logger(ebpf, Relay)
        .context("opening the program's log ring buffer")?;
    // SAFETY: the fd is the logger's ring buffer, owned by the logger, which
    // the AsyncFd owns for its whole life.
    let mut logger = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow::anyhow!("{e}"))
    .context("polling the program's log ring buffer")?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}

/// Applies a changed config without detaching: routes, the route-miss
/// policy, cache nodes and VIPs. Interfaces and the IPv4 lookup are fixed
/// for the daemon's life; a config that changes them is refused whole, as
/// is one that does not validate or resolve. Routes, nodes and VIPs added
/// with the CLI and not in the file go: on reload the file is the truth.
fn reload(running: &mut Running, config_path: &Path) -> Result<String> {
    let model = Model::from_file(config_path)?;
    let state = running
        .instance
        .read_state()
        .context("the instance's state file is gone")?;
    let attached: Vec<(String, XdpMode)> = state
        .interfaces
        .iter()
        .map(|i| (i.name.clone(), i.mode))
        .collect();
    if model.interfaces != attached {
        bail!("interfaces changed; attaching and detaching need a restart (`detach`, then `run`)");
    }
    if model.ipv4_lookup != running.tables.ipv4_lookup() {
        bail!(
            "ipv4_lookup changed to {}; that needs a restart",
            model.ipv4_lookup
        );
    }
    let links = kernel::links()?;
    let neighbours = kernel::neighbours()?;
    let routes = resolve_routes(&model, &links, &neighbours)?;
    // Steering is checked whole before its first write, routes were
    // resolved above: from here on only a failing map write can stop it.
    let applied = apply_steering(running, &steering::Spec::of(&model), &links, &neighbours)?;
    let _lock = running.instance.lock()?;
    let (added, changed, deleted) = running.tables.apply_routes(&routes)?;
    running.tables.set_route_miss(model.route_miss)?;
    Ok(format!(
        "{added} routes added, {changed} changed, {deleted} deleted; route miss {:?}; {applied}",
        model.route_miss
    ))
}

/// Every route of `model` with its next hop resolved against the namespace,
/// the first one that does not resolve named in the error.
fn resolve_routes(
    model: &Model,
    links: &[kernel::Link],
    neighbours: &[kernel::Neighbour],
) -> Result<Vec<(crate::config::Prefix, pop_forwarder_common::NextHop)>> {
    model
        .routes
        .iter()
        .enumerate()
        .map(|(i, route)| {
            resolve_next_hop(route, links, neighbours)
                .map(|nh| (route.prefix, nh))
                .with_context(|| format!("routes[{i}] ({})", route.prefix))
        })
        .collect()
}

/// Takes a node that failed its health check out of its VIPs' Maglev tables
/// and out of the node table (so its flows move too), or puts it back.
fn apply_health(running: &mut Running, event: HealthEvent) -> Result<()> {
    if running.checkers.get(&event.node).map(|c| c.0) != Some(event.checker) {
        return Ok(()); // from a checker since stopped
    }
    let links = kernel::links()?;
    let neighbours = kernel::neighbours()?;
    let _lock = running.instance.lock()?;
    let rebuilt = running.steering.set_health(
        &mut running.tables,
        &event.node,
        event.healthy,
        &links,
        &neighbours,
    )?;
    // The state file first: the log line is what watchers wait for.
    write_steering_state(running)?;
    if event.healthy {
        info!(
            "cache node {} is up ({}); {rebuilt} VIP tables rebuilt",
            event.node, event.detail
        );
    } else {
        warn!(
            "cache node {} is down ({}); out of the node table, {rebuilt} VIP tables rebuilt, its flows move",
            event.node, event.detail
        );
    }
    Ok(())
}

fn refresh(running: &mut Running) -> Result<()> {
    let _lock = running.instance.lock()?;
    let links = kernel::links()?;
    let neighbours = kernel::neighbours()?;
    for change in running.tables.refresh_next_hops(&links, &neighbours)? {
        info!("{change}");
    }
    let (changes, unresolved_nodes) =
        running
            .steering
            .refresh(&mut running.tables, &links, &neighbours)?;
    for change in changes {
        info!("{change}");
    }
    let unresolved_nodes = unresolved_nodes.into_iter().filter_map(|(addr, dev)| {
        links
            .iter()
            .find(|l| l.name == dev)
            .map(|l| (addr, l.ifindex))
    });
    // Gateways and nodes nobody has resolved yet: have the kernel resolve
    // them now, rather than when the first packets for them reach it.
    for (gateway, ifindex) in running
        .tables
        .unresolved_gateways()?
        .into_iter()
        .chain(unresolved_nodes)
    {
        let Some(link) = links.iter().find(|l| l.ifindex == ifindex) else {
            continue;
        };
        if running.requested_neighbours.insert((gateway, ifindex)) {
            match kernel::request_neighbour(gateway, &link.name) {
                Ok(()) => info!(
                    "asked the kernel to resolve next hop {gateway} on {}",
                    link.name
                ),
                Err(e) => warn!("{e:#}"),
            }
        }
    }
    let addrs: Vec<_> = links.into_iter().flat_map(|l| l.addrs).collect();
    let conflicts = running.tables.sync_local_addrs(&addrs)?;
    if conflicts != running.local_conflicts {
        for addr in &conflicts {
            warn!(
                "local address {addr} has an operator route to exactly it; its packets are forwarded, not delivered"
            );
        }
        running.local_conflicts = conflicts;
    }
    Ok(())
}

fn shutdown(running: Running) -> Result<()> {
    let Running {
        instance,
        _ebpf,
        tables,
        links,
        local_conflicts: _,
        steering: _,
        checkers,
        next_checker: _,
        health_events: _,
        requested_neighbours: _,
    } = running;
    for (_, task) in checkers.into_values() {
        task.abort();
    }
    drop(tables);
    for link in links {
        match link.unpin() {
            // Dropping the last reference to the link detaches the program.
            Ok(fd_link) => drop(fd_link),
            Err(e) => warn!("unpinning a link: {e}"),
        }
    }
    drop(_ebpf);
    instance.remove_pins()?;
    instance.remove_state();
    info!("instance {:?}: detached and unpinned", instance.name);
    Ok(())
}

fn warn_if_kernel_forwarding_off() {
    for (family, path) in [
        ("IPv4", "/proc/sys/net/ipv4/ip_forward"),
        ("IPv6", "/proc/sys/net/ipv6/conf/all/forwarding"),
    ] {
        if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "0") {
            warn!(
                "{family} forwarding is off in the kernel ({path} = 0): packets handed to it \
                 (TTL expired, unresolved neighbour, too big) are dropped rather than answered"
            );
        }
    }
}
