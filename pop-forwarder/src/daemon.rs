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
    xdp::XdpLink,
};
use log::{info, warn};
use pop_forwarder_common::{MAP_LAYOUT_VERSION, NextHop, PROGRAM_NAME, map_names};
use tokio::sync::mpsc::UnboundedSender;

use crate::{
    EBPF_OBJECT, announce,
    config::{Delivery, Ipv4Lookup, Ipv6Lookup, Model, Node, Route, RouteSource, Vip, XdpMode},
    control,
    health::HealthEvent,
    instance::{self, AttachedInterface, Instance, State},
    kernel,
    maps::{self, Tables, resolve_next_hop},
    mirror,
    net::Prefix,
    plan::Want,
    steering,
};

/// How often what failed (a health change's table writes, a refresh, a
/// mirroring of the kernel table) is tried again.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// How long after a first announced route change the mirrored table is
/// read and applied, with every change announced meanwhile.
const ROUTE_BATCH: Duration = Duration::from_millis(50);
/// The same for interfaces, addresses and neighbours.
const INTERFACE_BATCH: Duration = Duration::from_millis(20);
/// Receive buffer of the notification socket (SO_RCVBUFFORCE): room for
/// a BGP session's burst; past it, an overflow makes the daemon read
/// everything again.
const NOTIFY_BUFFER: usize = 32 << 20;
/// Route notifications queued for the next batch at most; past that (a
/// BGP session's full table arriving at once) the table is read whole.
const MAX_QUEUED_ROUTE_EVENTS: usize = 1 << 18;

/// Changes the kernel announced: the mirrored table's route notifications
/// in order, and permits (coalesced) to look again.
struct KernelChanges {
    routes: std::sync::Arc<tokio::sync::Notify>,
    interfaces: std::sync::Arc<tokio::sync::Notify>,
    events: std::sync::Arc<std::sync::Mutex<Vec<kernel::RouteEvent>>>,
    /// Notifications were lost: the table must be read whole.
    overflow: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// An address came or went: connected subnets may have changed.
    addresses: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl KernelChanges {
    fn take_events(&self) -> Vec<kernel::RouteEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Subscribes to the kernel's announcements of links, addresses and
/// neighbours, and with `route_source = "kernel"` of the mirrored table's
/// routes. An overflow of the socket is both kinds of change: everything
/// is read again.
fn watch_kernel(model: &Model) -> Result<KernelChanges> {
    use crate::netlink::{Event, groups};
    use netlink_packet_route::RouteNetlinkMessage as M;
    let changes = KernelChanges {
        routes: Default::default(),
        interfaces: Default::default(),
        events: Default::default(),
        overflow: Default::default(),
        addresses: Default::default(),
    };
    let mut subscribe = vec![
        groups::LINK,
        groups::NEIGH,
        groups::IPV4_IFADDR,
        groups::IPV6_IFADDR,
    ];
    if model.route_source == RouteSource::Kernel {
        subscribe.extend([groups::IPV4_ROUTE, groups::IPV6_ROUTE]);
    }
    let table = model.kernel_table;
    let (routes, interfaces) = (changes.routes.clone(), changes.interfaces.clone());
    let (events, overflow) = (changes.events.clone(), changes.overflow.clone());
    let addresses = changes.addresses.clone();
    let stall = crate::failpoint::notify_stall();
    let buffer = stall.map_or(NOTIFY_BUFFER, |(bytes, _)| bytes);
    let mut neighbours_seen = kernel::NeighboursSeen::new();
    crate::netlink::subscribe(&subscribe, buffer, move |event| {
        if let Some((_, pause)) = stall {
            std::thread::sleep(pause);
        }
        match event {
            // A refresh reads every neighbour: only for one whose MAC
            // moved, not for the state changes each announces every
            // half minute.
            Event::Message(_, M::NewNeighbour(n)) => {
                if kernel::neighbour_moved(&mut neighbours_seen, &n, false) {
                    interfaces.notify_one();
                }
            }
            Event::Message(_, M::DelNeighbour(n)) => {
                if kernel::neighbour_moved(&mut neighbours_seen, &n, true) {
                    interfaces.notify_one();
                }
            }
            Event::Message(flags, m @ (M::NewRoute(_) | M::DelRoute(_))) => {
                if let Some(event) = kernel::route_event(flags, &m, table) {
                    let mut queued = events.lock().unwrap_or_else(|e| e.into_inner());
                    if queued.len() < MAX_QUEUED_ROUTE_EVENTS {
                        queued.push(event);
                    } else {
                        // A whole table's worth: reading it is cheaper than
                        // holding them all.
                        queued.clear();
                        overflow.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    routes.notify_one();
                }
            }
            Event::Message(_, M::NewAddress(_) | M::DelAddress(_)) => {
                addresses.store(true, std::sync::atomic::Ordering::SeqCst);
                interfaces.notify_one();
            }
            Event::Message(..) => interfaces.notify_one(),
            Event::Overflow => {
                neighbours_seen.clear();
                warn!("the kernel's change notifications overflowed: reading everything again");
                overflow.store(true, std::sync::atomic::Ordering::SeqCst);
                routes.notify_one();
                interfaces.notify_one();
            }
        }
        true
    })?;
    Ok(changes)
}

/// Reads the mirrored kernel table again and brings the program's routes
/// to it (with the config's routes, which win, and connected subnets), in
/// one transaction.
fn sync_kernel_routes(running: &mut Running) -> Result<()> {
    if running.route_source != RouteSource::Kernel {
        return Ok(());
    }
    let started = std::time::Instant::now();
    // The old copy of the table, and of what was written from it, go
    // before the new ones are read: a million routes' worth less at the
    // re-read's peak. Until this re-read succeeds, none is needed: the
    // next batch reads the table whole again (`kernel_routes` is None).
    running.kernel_routes = None;
    running.mirrored = mirror::Mirrored::default();
    // A whole read plans every prefix.
    running.replan.clear();
    let links = kernel::links()?;
    let neighbours = kernel::neighbours(&links)?;
    let statics: Vec<(Prefix, NextHop)> = running
        .static_routes
        .iter()
        .filter_map(|r| match resolve_next_hop(r, &links, &neighbours) {
            Ok(nh) => Some((r.prefix, nh)),
            Err(e) => {
                warn!("static route {} left out: {e:#}", r.prefix);
                None
            }
        })
        .collect();
    let table = kernel::KernelTable::dump(running.kernel_table)?;
    let routes = table.bests();
    let static_prefixes: crate::net::PrefixSet = statics.iter().map(|(p, _)| *p).collect();
    let wanted = mirror::wanted(
        statics,
        Some(&routes),
        &links,
        &neighbours,
        &running.attached(),
    );
    let kernel_count = routes.len();
    drop(routes);
    let ((added, changed, deleted), writes) = transaction(running, |running| {
        let done = running.tables.apply_routes(&wanted.routes)?;
        // Next hops and groups left unused by notifications applied one
        // by one.
        running.tables.sweep_unused()?;
        Ok(done)
    })?;
    running.sync_failed = false;
    running.reread_routes = false;
    running.subnets = kernel::SubnetView::of(&links);
    running.mirrored = mirror::Mirrored::of(&wanted, &static_prefixes);
    running.connected = wanted.connected;
    running.kernel_routes = Some(table);
    log_to_kernel(running, &wanted.to_kernel, true);
    if added + changed + deleted > 0 {
        info!(
            "kernel table {}: {added} routes added, {changed} changed, {deleted} deleted ({} routes, {writes} table writes, {} ms)",
            running.kernel_table,
            kernel_count,
            started.elapsed().as_millis()
        );
    }
    // A whole re-read's copies of the table go now, not at the next one.
    drop((wanted.routes, wanted.to_kernel));
    release_freed_memory();
    Ok(())
}

/// The prefixes of the config's routes, if a mirrored table's
/// notifications need them (`Running::static_prefixes`).
fn static_prefixes_of(source: RouteSource, routes: &[Route]) -> crate::net::PrefixSet {
    match source {
        RouteSource::Kernel => routes.iter().map(|r| r.prefix).collect(),
        RouteSource::Static => Default::default(),
    }
}

/// Hands the heap's free memory back to the kernel. Building the tables
/// from a large config or kernel table frees hundreds of megabytes of
/// small allocations at once; the allocator would otherwise keep them for
/// the daemon's life (glibc `malloc_trim`).
fn release_freed_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe { libc::malloc_trim(0) };
}

/// Applies the mirrored table's notifications to the prefixes they changed
/// alone, in one transaction: its cost follows the notifications, not the
/// table's size.
fn apply_route_events(running: &mut Running, events: Vec<kernel::RouteEvent>) -> Result<()> {
    let started = std::time::Instant::now();
    let Some(mut table) = running.kernel_routes.take() else {
        return sync_kernel_routes(running);
    };
    let replanned = running.replan.len();
    let mut changed: Vec<Prefix> = std::mem::take(&mut running.replan).into_iter().collect();
    let mut seen: std::collections::HashSet<Prefix> = changed.iter().copied().collect();
    for event in &events {
        let prefix = table.apply(event);
        if seen.insert(prefix) {
            changed.push(prefix);
        }
    }
    let result = (|| -> Result<Applied> {
        let links = kernel::links()?;
        let neighbours = kernel::neighbours(&links)?;
        let connected: HashMap<Prefix, NextHop> =
            maps::connected_routes(&links, &running.attached())
                .into_iter()
                .collect();
        let mut patch = Vec::new();
        let mut to_kernel = Vec::new();
        for prefix in changed {
            if running.static_prefixes.contains(&prefix) {
                continue;
            }
            let want = match table.best(&prefix) {
                Some(route) => Some(
                    match mirror::want_of(&route, &links, &neighbours, &running.attached()) {
                        Ok(want) => want,
                        Err(why) => {
                            to_kernel.push((prefix, why));
                            let family = if prefix.addr.is_ipv4() {
                                pop_forwarder_common::AF_INET
                            } else {
                                pop_forwarder_common::AF_INET6
                            };
                            Want::One(maps::kernel_next_hop(family))
                        }
                    },
                ),
                None => connected.get(&prefix).map(|nh| Want::One(*nh)),
            };
            if !running.mirrored.holds(&prefix, want.as_ref()) {
                patch.push((prefix, want));
            }
        }
        let ((added, changed, removed), writes) =
            transaction(running, |running| running.tables.patch_routes(&patch))?;
        for (prefix, want) in &patch {
            running.mirrored.set(*prefix, want.as_ref());
        }
        Ok(Applied {
            added,
            changed,
            removed,
            writes,
            to_kernel,
        })
    })();
    running.kernel_routes = Some(table);
    let Applied {
        added,
        changed,
        removed,
        writes,
        to_kernel,
    } = result?;
    log_to_kernel(running, &to_kernel, false);
    if added + changed + removed > 0 {
        info!(
            "kernel table {}: {added} routes added, {changed} changed, {removed} deleted ({} notifications, {replanned} prefixes planned again, {writes} table writes, {} ms)",
            running.kernel_table,
            events.len(),
            started.elapsed().as_millis()
        );
    }
    Ok(())
}

/// What a batch of kernel route events did to the tables: routes added,
/// changed and removed, table writes, and the routes left to the kernel
/// (with why).
struct Applied {
    added: usize,
    changed: usize,
    removed: usize,
    writes: usize,
    to_kernel: Vec<(Prefix, String)>,
}

/// The first few of `items`, and how many more, for a log line.
fn few<T: std::fmt::Display>(items: &[T]) -> String {
    const SHOWN: usize = 8;
    let mut out = items
        .iter()
        .take(SHOWN)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > SHOWN {
        out += &format!(" and {} more", items.len() - SHOWN);
    }
    out
}

/// Logs, once each, the kernel routes handed to the kernel and why. With
/// `whole` (`to_kernel` lists them all), forgets those no longer among
/// them, so that they are logged again if they come back.
fn log_to_kernel(running: &mut Running, to_kernel: &[(Prefix, String)], whole: bool) {
    for (prefix, why) in to_kernel {
        if running.to_kernel.insert(*prefix) {
            info!("kernel route {prefix} is left to the kernel (pass_kernel_route): {why}");
        }
    }
    if whole {
        let now: std::collections::HashSet<Prefix> = to_kernel.iter().map(|(p, _)| *p).collect();
        running.to_kernel.retain(|p| now.contains(p));
    }
}

/// A loaded forwarder: its maps (pinned), its program (attached through
/// pinned links) and the daemon's view of them. Dropping it leaves the pins,
/// and so forwarding, in place: that is what a stop, or a crash, does.
struct Running {
    instance: Instance,
    // Kept so that this daemon's program and log buffer live as long as it.
    ebpf: aya::Ebpf,
    tables: Tables,
    /// Gateways the kernel was asked to resolve (once each).
    requested_neighbours: std::collections::HashSet<(std::net::IpAddr, u32)>,
    /// Cache nodes and VIPs in their slots.
    steering: steering::Steering,
    /// The running health check of each checked node: (checker id, task).
    checkers: HashMap<String, (u64, tokio::task::AbortHandle)>,
    next_checker: u64,
    health_events: UnboundedSender<HealthEvent>,
    /// Health changes whose table writes failed, to try again.
    pending_health: Vec<HealthEvent>,
    /// Local addresses shadowed by operator routes, as last logged.
    local_conflicts: Vec<std::net::IpAddr>,
    /// The interfaces the program is attached to, by name and ifindex as
    /// attached (`attached()` lists the ifindexes); one found gone keeps
    /// its old ifindex until an interface made again under its name takes
    /// the program (the program went with the old interface).
    attached_names: Vec<(String, u32)>,
    lost_interfaces: std::collections::BTreeMap<String, String>,
    /// The name of every interface here at the last refresh, and of those
    /// gone since that next hops still go through: where an interface made
    /// again under its name takes them (`follow_recreated_interfaces`).
    link_names: HashMap<u32, String>,
    /// The connected-subnet routes last applied (static routes to the same
    /// prefixes win and are not among them).
    connected: Vec<(Prefix, NextHop)>,
    /// Neighbours left out of a full `NEIGHBOURS`, as last logged.
    neighbours_left_out: usize,
    /// VLANs left out of a full `VLANS`, as last logged.
    vlans_left_out: usize,
    /// Where routes come from (the config's `route_source`,
    /// `kernel_table`), and the config's own routes, which win.
    route_source: RouteSource,
    kernel_table: u32,
    static_routes: Vec<Route>,
    /// Their prefixes, with a mirrored table (a notification for one of
    /// them leaves the config's route in place), kept rather than built
    /// for every batch of notifications; empty without one.
    static_prefixes: crate::net::PrefixSet,
    /// Kernel routes handed to the kernel, as last logged (each once).
    to_kernel: std::collections::HashSet<Prefix>,
    /// The last mirroring of the kernel table failed: try again.
    sync_failed: bool,
    /// The interfaces could not be read to see what changed: read the
    /// mirrored table whole at the next batch.
    reread_routes: bool,
    /// Prefixes to plan again at the next batch, from the table's copy
    /// (no kernel read), though no notification named them: their
    /// connected subnet came, went or moved, or an interface their routes
    /// go through was attached to again.
    replan: std::collections::BTreeSet<Prefix>,
    /// The interfaces' connected subnets as last followed: an address
    /// notification that leaves them as they are plans nothing again.
    subnets: kernel::SubnetView,
    /// The mirrored kernel table as last read and notified, and what the
    /// tables hold for each of its prefixes and each connected subnet
    /// (the config's routes aside).
    kernel_routes: Option<kernel::KernelTable>,
    mirrored: mirror::Mirrored,
    /// The last refresh of interfaces and neighbours failed: try again.
    refresh_failed: bool,
    /// VIP announcement: the table its routes go in (None: off), whether
    /// the forwarder is drained (nothing announced), whether the last
    /// announcement failed (try again), and the VIPs someone else's route
    /// in the table keeps from being announced, as last logged.
    vip_route_table: Option<u32>,
    draining: bool,
    announce_failed: bool,
    announce_conflicts: std::collections::BTreeSet<std::net::IpAddr>,
    /// The Prometheus endpoint's address (fixed for the daemon's life).
    metrics_listen: Option<std::net::SocketAddr>,
    /// The VIP addresses announced by the last successful announcement.
    announced: std::collections::BTreeSet<std::net::IpAddr>,
    /// For the metrics: errors by kind, mirrorings of the kernel table
    /// (by notifications, whole), and the last one's lag (first
    /// notification to applied).
    errors: std::collections::BTreeMap<&'static str, u64>,
    route_syncs: (u64, u64),
    route_sync_lag: Duration,
}

impl Running {
    /// The ifindexes of the interfaces the program is attached to.
    fn attached(&self) -> Vec<u32> {
        self.attached_names
            .iter()
            .map(|(_, ifindex)| *ifindex)
            .collect()
    }
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

/// What to run: the instance, its config, the program's log level, and the
/// XDP object (None: the one built into this binary).
pub struct RunOptions<'a> {
    pub instance: &'a Instance,
    pub config: &'a Path,
    pub bpf_log: BpfLogLevel,
    pub xdp_object: Option<&'a Path>,
}

pub async fn run(options: RunOptions<'_>) -> Result<()> {
    let RunOptions {
        instance,
        config: config_path,
        ..
    } = options;
    use tokio::signal::unix::{SignalKind, signal};
    // Signals first: from here on SIGTERM, SIGINT and SIGHUP are queued for
    // the loop below, never fatal, whatever start-up is doing.
    let mut sigterm = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    let mut sighup = signal(SignalKind::hangup()).context("handling SIGHUP")?;
    let model = Model::from_file(config_path)?;
    let access = control::Access {
        group: model
            .control_group
            .as_deref()
            .map(control::group_id)
            .transpose()?,
    };
    // The lock before anything of the instance is looked at: a second `run`
    // of a running instance stops here, having touched nothing.
    let _lock = instance.lock(access.group)?;
    let control_path = instance.control_path();
    let listener = control::bind(&control_path, access)?;
    // Bound before anything is loaded: a port in use is a start-up error
    // that touched nothing.
    let metrics_listener = match model.metrics_listen.map(crate::metrics::bind).transpose() {
        Ok(l) => l,
        Err(e) => {
            let _ = std::fs::remove_file(&control_path);
            return Err(e);
        }
    };
    let (health_tx, mut health_rx) = tokio::sync::mpsc::unbounded_channel();
    // Subscribed before anything is read, so that no change between a
    // dump and the subscription is missed.
    let changes = match watch_kernel(&model) {
        Ok(changes) => changes,
        Err(e) => {
            let _ = std::fs::remove_file(&control_path);
            return Err(e);
        }
    };
    let (mut running, how) = match start(&options, &model, health_tx) {
        Ok(started) => started,
        Err(e) => {
            let _ = std::fs::remove_file(&control_path);
            return Err(e);
        }
    };
    info!(
        "instance {:?}: {} on {} with {} routes (IPv4 lookup: {}, IPv6 lookup: {}); maps pinned at {}",
        instance.name,
        how,
        model
            .interfaces
            .iter()
            .map(|(n, m)| format!("{n} ({m})"))
            .collect::<Vec<_>>()
            .join(", "),
        model.routes.len(),
        model.ipv4_lookup,
        model.ipv6_lookup,
        instance.pin_dir().display()
    );
    let (requests_tx, mut requests) = tokio::sync::mpsc::channel(16);
    let server = tokio::spawn(control::serve(listener, access, requests_tx));
    let (scrapes_tx, mut scrapes) = tokio::sync::mpsc::channel(4);
    let metrics_server = metrics_listener.map(|listener| {
        info!(
            "metrics: http://{}/metrics",
            listener
                .local_addr()
                .map_or_else(|_| "?".to_owned(), |a| a.to_string())
        );
        tokio::spawn(crate::metrics::serve(
            listener,
            scrapes_tx,
            instance.pin_dir(),
        ))
    });
    let names: Vec<String> = running
        .steering
        .nodes()
        .map(|(_, n)| n.node.name.clone())
        .collect();
    start_checks(&mut running, &names, &[]);
    announce_vips(&mut running);
    // systemd (Type=notify): ready once the data plane forwards the
    // config; the watchdog is fed from this loop, so a daemon stuck in it
    // is restarted (and the restart adopts the data plane).
    notify_systemd(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!(
            "forwarding on {}",
            model
                .interfaces
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    ]);
    // The running daemon keeps its own copy of the routes
    // (`Running::static_routes`); the config's would double them for the
    // daemon's whole life.
    drop(model);
    release_freed_memory();
    let watchdog = sd_notify::watchdog_enabled();
    let mut watchdog_tick =
        tokio::time::interval(watchdog.map_or(Duration::from_secs(3600), |d| d / 2));
    // Nothing is polled: interfaces, addresses and neighbours are read
    // again when the kernel announces a change of them (and after every
    // change of the tables, for the neighbours new next hops need), the
    // mirrored table when it announces a route change. Kernel changes are
    // batched: the first one sets a moment a little later, and whatever
    // arrives until then is applied with it. The first refresh, right
    // away, asks the kernel to resolve gateways and nodes without a MAC;
    // their resolution is announced like any neighbour change. The tick
    // only retries what failed.
    let mut tick = tokio::time::interval(RETRY_INTERVAL);
    let never = || tokio::time::Instant::now() + Duration::from_secs(86_400);
    let mut route_sync_at: Option<tokio::time::Instant> = None;
    // When the first route notification not yet applied arrived.
    let mut route_batch_since: Option<std::time::Instant> = None;
    let mut refresh_at = Some(tokio::time::Instant::now());
    let detach = loop {
        tokio::select! {
            _ = watchdog_tick.tick(), if watchdog.is_some() => {
                notify_systemd(&[sd_notify::NotifyState::Watchdog]);
            }
            _ = sigterm.recv() => break false,
            _ = sigint.recv() => break false,
            Some((command, reply)) = requests.recv() => {
                if command == control::Command::Detach {
                    let _ = reply.send(Ok(format!("instance {:?}: detaching", instance.name)));
                    break true;
                }
                let result = control_command(&mut running, config_path, command);
                match &result {
                    Ok(_) => {
                        refresh_at.get_or_insert_with(|| tokio::time::Instant::now() + INTERFACE_BATCH);
                    }
                    Err(e) => {
                        count_error(&mut running, "control_request_refused");
                        warn!("control request refused, tables unchanged: {e:#}");
                    }
                }
                let _ = reply.send(result);
            }
            Some(event) = health_rx.recv() => {
                // A newer state of a node replaces one still waiting.
                running.pending_health.retain(|p| p.node != event.node);
                apply_health_or_retry(&mut running, event);
            }
            _ = sighup.recv() => {
                let reloaded = reload(&mut running, config_path);
                announce_vips(&mut running);
                match reloaded {
                    Ok(_) => {
                        refresh_at.get_or_insert_with(|| tokio::time::Instant::now() + INTERFACE_BATCH);
                    }
                    Err(e) => {
                        count_error(&mut running, "reload_refused");
                        warn!("{e:#}");
                    }
                }
            }
            Some(reply) = scrapes.recv() => {
                match metrics_families(&running) {
                    Ok(families) => {
                        let _ = reply.send(families);
                    }
                    Err(e) => {
                        count_error(&mut running, "metrics");
                        warn!("metrics: {e:#}");
                    }
                }
            }
            _ = changes.routes.notified() => {
                route_batch_since.get_or_insert_with(std::time::Instant::now);
                route_sync_at.get_or_insert_with(|| tokio::time::Instant::now() + ROUTE_BATCH);
            }
            _ = changes.interfaces.notified() => {
                refresh_at.get_or_insert_with(|| tokio::time::Instant::now() + INTERFACE_BATCH);
                // An address's subnet may be in no mirrored table: the
                // subnets that came, went or moved are planned again, from
                // the table's copy. Most address notifications move none
                // (each router advertisement renews an IPv6 SLAAC address's
                // lifetimes).
                if running.route_source == RouteSource::Kernel
                    && changes.addresses.swap(false, std::sync::atomic::Ordering::SeqCst)
                {
                    match kernel::links() {
                        Ok(links) => {
                            let now = kernel::SubnetView::of(&links);
                            let moved = running.subnets.moved(&now);
                            if !moved.is_empty() {
                                info!(
                                    "connected subnets changed ({}): planned again from the mirrored table's copy",
                                    few(&moved)
                                );
                                running.subnets = now;
                                running.replan.extend(moved);
                                route_sync_at.get_or_insert_with(|| tokio::time::Instant::now() + ROUTE_BATCH);
                            }
                        }
                        Err(e) => {
                            warn!("reading the interfaces: {e:#}: kernel table {} is read again", running.kernel_table);
                            running.reread_routes = true;
                            route_sync_at.get_or_insert_with(|| tokio::time::Instant::now() + ROUTE_BATCH);
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(route_sync_at.unwrap_or_else(never)), if route_sync_at.is_some() => {
                route_sync_at = None;
                // Notifications applied one by one, unless some were lost,
                // the last application failed, or the interfaces changed
                // (connected subnets): then the table is read whole.
                let whole = changes.overflow.swap(false, std::sync::atomic::Ordering::SeqCst)
                    || running.sync_failed
                    || running.reread_routes
                    || running.kernel_routes.is_none();
                let synced = if whole {
                    // What is queued now is in the dump about to be read.
                    drop(changes.take_events());
                    running.route_syncs.1 += 1;
                    sync_kernel_routes(&mut running)
                } else {
                    running.route_syncs.0 += 1;
                    apply_route_events(&mut running, changes.take_events())
                };
                match synced {
                    Ok(()) => {
                        if let Some(since) = route_batch_since.take() {
                            running.route_sync_lag = since.elapsed();
                        }
                        refresh_at.get_or_insert_with(|| tokio::time::Instant::now() + INTERFACE_BATCH);
                    }
                    Err(e) => {
                        // Tried again at the next change, or the next tick.
                        count_error(&mut running, "route_sync");
                        warn!("mirroring kernel table {}: {e:#}", running.kernel_table);
                        running.sync_failed = true;
                    }
                }
            }
            _ = tokio::time::sleep_until(refresh_at.unwrap_or_else(never)), if refresh_at.is_some() => {
                refresh_at = None;
                running.refresh_failed = false;
                if let Err(e) = refresh(&mut running) {
                    count_error(&mut running, "refresh");
                    warn!("refreshing interfaces and neighbours: {e:#}");
                    running.refresh_failed = true;
                }
                // An interface the program was attached to again: the
                // mirrored routes through it were the kernel's until now.
                if !running.replan.is_empty() || running.reread_routes {
                    route_sync_at.get_or_insert_with(|| tokio::time::Instant::now() + ROUTE_BATCH);
                }
            }
            _ = tick.tick() => {
                if running.sync_failed {
                    route_sync_at.get_or_insert_with(tokio::time::Instant::now);
                }
                for event in std::mem::take(&mut running.pending_health) {
                    apply_health_or_retry(&mut running, event);
                }
                if running.refresh_failed {
                    refresh_at.get_or_insert_with(tokio::time::Instant::now);
                }
                if running.announce_failed {
                    announce_vips(&mut running);
                }
            }
        }
    };
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    if detach {
        // Let the connection that asked hear its answer before the
        // socket goes.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.abort();
    if let Some(metrics_server) = metrics_server {
        metrics_server.abort();
    }
    let _ = std::fs::remove_file(&control_path);
    if detach {
        shutdown_and_detach(running)
    } else {
        stop(running);
        Ok(())
    }
}

/// Carries out one control request as one transaction: an error means
/// nothing changed.
fn control_command(
    running: &mut Running,
    config_path: &Path,
    command: control::Command,
) -> Result<String> {
    match command {
        control::Command::Reload => {
            let result = reload(running, config_path);
            announce_vips(running);
            return result;
        }
        control::Command::Drain | control::Command::Resume => {
            return drain(running, command == control::Command::Drain);
        }
        _ => {}
    }
    let ((message, applied), writes) = transaction(running, |running| change(running, command))?;
    if let Some(applied) = applied {
        steering_applied(running, &applied)?;
        announce_vips(running);
    }
    let message = format!("{message} ({writes} table writes)");
    info!("{message}");
    Ok(message)
}

/// Runs `change` as one transaction: every table write it makes is
/// journaled, and if it fails they are taken back, newest first, and the
/// daemon's view of the steering tables is restored, so that a refused
/// change leaves every table as it was. Returns what `change` did and how
/// many table writes it took.
fn transaction<T>(
    running: &mut Running,
    change: impl FnOnce(&mut Running) -> Result<T>,
) -> Result<(T, usize)> {
    let steering = running.steering.clone();
    running.tables.begin();
    match change(running) {
        Ok(done) => Ok((done, running.tables.commit())),
        Err(e) => {
            let failed = running.tables.rollback();
            running.steering = steering;
            Err(if failed == 0 {
                e.context("every table write of the change was taken back")
            } else {
                e.context(format!(
                    "{failed} table writes of the change could not be taken back (logged): the tables may be neither as they were nor as asked"
                ))
            })
        }
    }
}

/// One control request's change of the tables; with the steering changes
/// it made, whose health checks start once it is committed.
fn change(
    running: &mut Running,
    command: control::Command,
) -> Result<(String, Option<steering::Applied>)> {
    use control::Command;
    let mut spec = running.steering.spec();
    let message = match command {
        Command::Detach | Command::Reload | Command::Drain | Command::Resume => {
            unreachable!("handled by the caller")
        }
        Command::RouteAdd { .. } | Command::RouteDel { .. }
            if running.route_source == RouteSource::Kernel =>
        {
            bail!(
                "routes come from kernel table {} (route_source = \"kernel\"): change them there (BIRD, FRR, `ip route`), or in the config file, whose routes win",
                running.kernel_table
            );
        }
        Command::RouteAdd {
            prefix,
            via,
            dev,
            mac,
        } => {
            let route = Route::parse(&prefix, &via, &dev, mac.as_deref())?;
            let links = kernel::links()?;
            check_egress(&route.dev, &links, &running.attached())?;
            let nh = resolve_next_hop(&route, &links, &kernel::neighbours(&links)?)?;
            let id = running.tables.add_route(route.prefix, &nh)?;
            let message = format!(
                "added {} via {} dev {} (next hop {id})",
                route.prefix, route.via, route.dev
            );
            return Ok((message, None));
        }
        Command::RouteDel { prefix } => {
            let prefix: Prefix = prefix.parse()?;
            running.tables.del_route(prefix)?;
            return Ok((format!("deleted {prefix}"), None));
        }
        Command::DenyAdd { ref entry } | Command::DenyDel { ref entry } => {
            let adding = matches!(command, Command::DenyAdd { .. });
            let entry = entry.clone();
            let entry = crate::config::Deny::parse_line(&entry)?;
            let mut list: Vec<crate::config::Deny> =
                running.tables.deny_entries()?.into_keys().collect();
            let present = list.contains(&entry);
            match (adding, present) {
                (true, true) => bail!("{entry} is in the deny list already"),
                (false, false) => bail!("{entry} is not in the deny list"),
                (true, false) => list.push(entry),
                (false, true) => list.retain(|e| *e != entry),
            }
            running.tables.apply_deny(&list)?;
            let message = format!(
                "{} deny-list entry {entry} ({} entries)",
                if adding { "added" } else { "removed" },
                list.len()
            );
            return Ok((message, None));
        }
        Command::NodeWeight { name, weight } => {
            spec_node(&mut spec.nodes, &name)?.weight = weight;
            format!("cache node {name} weight {weight}")
        }
        Command::NodeAdd(config) => {
            let node = Node::from_config(&config)?;
            check_node_egress(
                std::slice::from_ref(&node),
                &kernel::links()?,
                &running.attached(),
            )?;
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
            let vip = Vip::from_config(&config)?;
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
    let links = kernel::links()?;
    let applied = running.steering.apply(
        &mut running.tables,
        &spec,
        &links,
        &kernel::neighbours(&links)?,
    )?;
    Ok((format!("{message}; {applied}"), Some(applied)))
}

fn spec_node<'a>(nodes: &'a mut [Node], name: &str) -> Result<&'a mut Node> {
    nodes
        .iter_mut()
        .find(|n| n.name == name)
        .with_context(|| format!("no cache node is named {name:?}"))
}

/// After a committed steering change: starts and stops health checks to
/// match, and records the result in the state file.
fn steering_applied(running: &mut Running, applied: &steering::Applied) -> Result<()> {
    start_checks(running, &applied.check, &applied.uncheck);
    write_steering_state(running)
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
            slot.healthy,
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

const STILL_FORWARDS: &str = "adopting the pinned data plane failed; it still forwards as before (fix the cause and run again, or `detach`)";

const MIGRATION_FAILED: &str = "migrating the pinned data plane to new tables failed; an interface whose program was not yet swapped still forwards on the old tables, one whose program was swapped forwards on the new ones, unpinned, until the next `run` migrates again (fix the cause and run again, or `detach`)";

/// What `run` does with an instance's pins.
enum Adoption {
    /// Brings them to the config in place: the previous daemon's state.
    Adopt(State),
    /// Pins this build cannot bring to the config in place (another map
    /// layout, or another `ipv4_lookup` or `ipv6_lookup`; what changed,
    /// for the log): it makes new tables beside them, fills them from the
    /// config, swaps its program in on each pinned link (bpf_link_update:
    /// no moment without XDP) and then replaces the old tables' pins.
    Migrate(String),
}

/// Validates everything that can be validated before touching the kernel,
/// then either creates the data plane (loads, pins, fills, attaches) or, if
/// the instance's pins exist (a daemon stopped, crashed or was upgraded),
/// adopts it: the pinned maps are reused by this daemon's program, which is
/// swapped in atomically on each pinned link (no moment without XDP), and
/// the config's difference is applied. Returns whether it adopted. A failed
/// creation removes what it made; a failed adoption leaves the pinned data
/// plane forwarding as it was.
fn start(
    options: &RunOptions<'_>,
    model: &Model,
    health_events: UnboundedSender<HealthEvent>,
) -> Result<(Running, &'static str)> {
    let instance = options.instance;
    let config_path = options.config;
    let links = kernel::links()?;
    let neighbours = kernel::neighbours(&links)?;
    let static_routes = resolve_routes(model, &links, &neighbours)?;
    check_node_egress(&model.nodes, &links, &attached_of(model, &links))?;
    for node in &model.nodes {
        steering::resolve_node(node, &links, &neighbours)
            .with_context(|| format!("nodes ({})", node.name))?;
    }
    let mut attach_to = Vec::new();
    for (i, (name, mode)) in model.interfaces.iter().enumerate() {
        let link = kernel::link(&links, name).with_context(|| format!("interfaces[{i}].name"))?;
        if link.mac.is_none() {
            bail!(
                "interfaces[{i}].name: {name:?} has no Ethernet address (loopback, a tunnel): the program forwards Ethernet frames, and on lo it would see this box's own traffic"
            );
        }
        if link.xdp_attached && !instance.link_pin(name).exists() {
            bail!(
                "interfaces[{i}].name: {name:?} already has an XDP program attached (not this instance's)"
            );
        }
        attach_to.push(AttachedInterface {
            name: name.clone(),
            ifindex: link.ifindex,
            mode: *mode,
        });
    }
    let attached: Vec<u32> = attach_to.iter().map(|a| a.ifindex).collect();
    let kernel_table = match model.route_source {
        RouteSource::Kernel => Some(kernel::KernelTable::dump(model.kernel_table)?),
        RouteSource::Static => None,
    };
    let kernel_routes = kernel_table.as_ref().map(kernel::KernelTable::bests);
    // Only a mirror needs them apart (a million set inserts otherwise);
    // every route of the config resolved above, so these are theirs.
    let static_prefixes = static_prefixes_of(model.route_source, &model.routes);
    let wanted = mirror::wanted(
        static_routes,
        kernel_routes.as_deref(),
        &links,
        &neighbours,
        &attached,
    );
    // Each kernel route's copy goes now: the rest of the start holds the
    // table, what is wanted of it, and the tables' own copy at once.
    drop(kernel_routes);
    let (routes, connected) = (&wanted.routes, wanted.connected.clone());
    instance::ensure_bpffs()?;
    let adopting = instance.prepare_pin_dir()?;
    // Pins of another map layout or lookup are migrated, not adopted: see
    // `Adoption::Migrate`. `previous` is then only the state file, for
    // what it says beyond the tables (interfaces, modes, draining).
    let (previous, migrating) = if adopting {
        match adoptable(instance, model).context(STILL_FORWARDS)? {
            Adoption::Adopt(state) => (Some(state), None),
            Adoption::Migrate(what) => (instance.read_state(), Some(what)),
        }
    } else {
        (None, None)
    };
    // The mode the kernel says the pinned link is attached in, not the
    // state file's (which may be gone): a link keeps its mode when a
    // program is swapped in on it.
    for (i, iface) in attach_to.iter().enumerate() {
        if let Some(was) = links
            .iter()
            .find(|l| l.ifindex == iface.ifindex)
            .and_then(|l| l.xdp_mode)
            && instance.link_pin(&iface.name).exists()
            && was != iface.mode
        {
            return Err(anyhow::anyhow!(
                "interfaces[{i}].mode: {:?} is attached in {} mode; changing the mode needs `detach`, then `run`",
                iface.name,
                was
            )
            .context(STILL_FORWARDS));
        }
    }
    warn_if_kernel_forwarding_off();

    let level = options.bpf_log as u8;
    let mut loader = aya::EbpfLoader::new();
    loader.override_global(aya_log::LEVEL, &level, true);
    if model.ipv4_lookup == Ipv4Lookup::Trie {
        // The DIR-24-8 arrays are not read: do not allocate their 72 MiB.
        loader
            .map_max_entries(map_names::IPV4_TBL24, 1)
            .map_max_entries(map_names::IPV4_TBL8, 1);
    }
    if model.ipv6_lookup == Ipv6Lookup::Trie {
        // Nor the range table's 64 MiB.
        loader
            .map_max_entries(map_names::IPV6_CHUNKS, 1)
            .map_max_entries(map_names::IPV6_RANGES, 1);
    }
    // Every table is pinned by name: created and pinned on the first start,
    // reused from its pin on every later one. A migration creates every
    // table anew, pinned beside the old ones until its program is on
    // every link; what an earlier migration left staged is not reused.
    if migrating.is_some() {
        let left = instance.remove_staged_pins().context(STILL_FORWARDS)?;
        if left > 0 {
            warn!("map pins staged by an unfinished migration, removed: {left}");
        }
    }
    let pins: Vec<_> = map_names::ALL
        .iter()
        .map(|name| match migrating {
            Some(_) => (*name, instance.staged_pin(name)),
            None => (*name, instance.pin_dir().join(name)),
        })
        .collect();
    for (name, path) in &pins {
        loader.map_pin_path(name, path.as_path());
    }
    let loaded = match options.xdp_object {
        None => loader.load(EBPF_OBJECT),
        Some(path) => loader.load_file(path),
    }
    .with_context(|| match options.xdp_object {
        None => "loading the XDP object".to_owned(),
        Some(path) => format!("loading the XDP object {}", path.display()),
    });
    let result = loaded.and_then(|mut ebpf| {
        fill_and_attach(
            instance,
            &mut ebpf,
            model,
            &attach_to,
            routes,
            // A migration fills its new tables from the config, and takes
            // the nodes' health from the state file.
            match migrating {
                None => (previous.as_ref(), None),
                Some(_) => (None, previous.as_ref().map(|p| &p.steering.nodes[..])),
            },
            (&links, &neighbours),
        )
        .map(|(tables, steering)| (ebpf, tables, steering))
    });
    let result = result.and_then(|done| match &migrating {
        Some(what) => {
            instance
                .commit_staged_pins(&map_names::ALL, map_names::SETTINGS)
                .context("replacing the old tables' map pins with the new ones")?;
            info!(
                "migrated the pinned data plane ({what}): new tables filled from the config, the program swapped in on every pinned link; the connection table, the counters, the nodes' slots and the seen-once notes started afresh, the nodes' health taken from the state file"
            );
            Ok(done)
        }
        None => Ok(done),
    });
    let (ebpf, tables, steering) = match result {
        Ok(done) => done,
        Err(e) if migrating.is_some() => {
            if let Err(cleanup) = instance.remove_staged_pins() {
                warn!("removing the staged map pins: {cleanup:#}");
            }
            return Err(e.context(MIGRATION_FAILED));
        }
        Err(e) if adopting => return Err(e.context(STILL_FORWARDS)),
        Err(e) => {
            // Links attached so far were dropped with the error (detaching
            // them); the pins go here.
            if let Err(cleanup) = instance.remove_pins() {
                warn!("cleaning up after a failed start: {cleanup:#}");
            }
            return Err(e);
        }
    };
    // Interfaces the old config had and this one has not, as the link pins
    // say (the state file may be gone).
    if adopting {
        let pinned = instance
            .xdp_link_names(&TRANSMIT_TRACEPOINTS)
            .unwrap_or_else(|e| {
                warn!("listing the pinned links: {e:#}");
                Vec::new()
            });
        for gone in pinned
            .iter()
            .filter(|n| !attach_to.iter().any(|b| &b.name == *n))
        {
            match crate::instance::remove_link_pin(&instance.link_pin(gone)) {
                Ok(()) => info!("detached from {gone} (no longer in the config)"),
                Err(e) => warn!("detaching from {gone}: {e:#}"),
            }
        }
    }
    let mut running = Running {
        instance: instance.clone(),
        ebpf,
        tables,
        local_conflicts: Vec::new(),
        attached_names: attach_to
            .iter()
            .map(|a| (a.name.clone(), a.ifindex))
            .collect(),
        lost_interfaces: Default::default(),
        link_names: links.iter().map(|l| (l.ifindex, l.name.clone())).collect(),
        connected,
        neighbours_left_out: 0,
        vlans_left_out: 0,
        route_source: model.route_source,
        kernel_table: model.kernel_table,
        static_routes: model.routes.clone(),
        mirrored: if kernel_table.is_some() {
            mirror::Mirrored::of(&wanted, &static_prefixes)
        } else {
            mirror::Mirrored::default()
        },
        static_prefixes,
        to_kernel: Default::default(),
        sync_failed: false,
        reread_routes: false,
        replan: Default::default(),
        subnets: kernel::SubnetView::of(&links),
        kernel_routes: kernel_table,
        refresh_failed: false,
        steering,
        checkers: HashMap::new(),
        next_checker: 0,
        health_events,
        pending_health: Vec::new(),
        requested_neighbours: Default::default(),
        vip_route_table: model.vip_route_table,
        draining: previous.as_ref().is_some_and(|p| p.draining),
        announce_failed: false,
        announce_conflicts: Default::default(),
        announced: Default::default(),
        metrics_listen: model.metrics_listen,
        errors: Default::default(),
        route_syncs: (0, 0),
        route_sync_lag: Duration::ZERO,
    };
    log_to_kernel(&mut running, &wanted.to_kernel, true);
    instance.write_state(&State {
        pid: std::process::id(),
        config: config_path
            .canonicalize()
            .unwrap_or_else(|_| config_path.to_owned()),
        interfaces: attach_to,
        steering: running.steering.state(),
        started_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        draining: running.draining,
        vip_route_table: running.vip_route_table,
        mirrored_table: Some(
            (running.route_source == RouteSource::Kernel).then_some(running.kernel_table),
        ),
    })?;
    // VIPs the previous daemon announced in a table this config no longer
    // uses.
    if let Some(old) = previous
        .as_ref()
        .and_then(|p| p.vip_route_table)
        .filter(|t| Some(*t) != model.vip_route_table)
    {
        match announce::withdraw_all(old) {
            Ok(gone) => info!(
                "vip_route_table is no longer {old}: withdrew {} VIP routes from it",
                gone.len()
            ),
            Err(e) => warn!(
                "withdrawing the VIP routes of table {old}, which the config no longer uses: {e:#}"
            ),
        }
    }
    // How it started, for the log.
    Ok((
        running,
        match (migrating, adopting) {
            (Some(_), _) => {
                "migrated the pinned data plane to new tables (program swapped in place)"
            }
            (None, true) => {
                "adopted the pinned data plane (program swapped in place, no packet lost)"
            }
            (None, false) => "forwarding",
        },
    ))
}

/// Checks that the instance's pins can be adopted by this build, before
/// anything is loaded: every map pinned, the same map layout and the same
/// IPv4 and IPv6 lookups (else they are migrated). Returns what the
/// previous daemon recorded, or what a migration changes.
fn adoptable(instance: &Instance, model: &Model) -> Result<Adoption> {
    let dir = instance.pin_dir();
    let how = format!(
        "to start over, `pop-forwarder --instance {} detach` (forwarding stops until the next `run`)",
        instance.name
    );
    // No settings map: a migration stopped while it replaced the pins
    // (`Instance::commit_staged_pins`), leaving old and new tables mixed;
    // migrating again reads none of them.
    if !dir.join(map_names::SETTINGS).exists() {
        return Ok(Adoption::Migrate(
            "no settings map pinned: a migration that did not finish".to_owned(),
        ));
    }
    let version = Tables::pinned_layout_version(&dir)?;
    if version != MAP_LAYOUT_VERSION {
        return Ok(Adoption::Migrate(format!(
            "map layout version {version} to {MAP_LAYOUT_VERSION}"
        )));
    }
    if let Some(missing) = map_names::ALL.iter().find(|n| !dir.join(n).exists()) {
        bail!(
            "{} holds no map {missing}: these pins are not a whole instance; {how}",
            dir.display()
        );
    }
    let pinned = Tables::from_pins(&dir)?;
    if pinned.ipv4_lookup() != model.ipv4_lookup {
        return Ok(Adoption::Migrate(format!(
            "ipv4_lookup {} to {}",
            pinned.ipv4_lookup(),
            model.ipv4_lookup
        )));
    }
    if pinned.ipv6_lookup() != model.ipv6_lookup {
        return Ok(Adoption::Migrate(format!(
            "ipv6_lookup {} to {}",
            pinned.ipv6_lookup(),
            model.ipv6_lookup
        )));
    }
    let state = instance.read_state();
    if state.is_none() && !pinned.vips()?.is_empty() {
        bail!(
            "{} is gone, so the pinned VIPs' cache nodes cannot be named: {how}",
            instance.state_path().display()
        );
    }
    Ok(Adoption::Adopt(state.unwrap_or_else(|| State {
        pid: 0,
        config: Default::default(),
        interfaces: Vec::new(),
        started_unix: 0,
        steering: Default::default(),
        draining: false,
        vip_route_table: None,
        mirrored_table: None,
    })))
}

/// Fills the tables (new ones, or adopted ones to bring to the config),
/// then loads the program and attaches it: a fresh attachment pinned, or an
/// atomic swap on the pinned link.
fn fill_and_attach(
    instance: &Instance,
    ebpf: &mut aya::Ebpf,
    model: &Model,
    attach_to: &[AttachedInterface],
    routes: &[(Prefix, Want)],
    (previous, carried_health): (Option<&State>, Option<&[steering::NodeState]>),
    (links, neighbours): (&[kernel::Link], &[kernel::Neighbour]),
) -> Result<(Tables, steering::Steering)> {
    let mut tables = Tables::from_ebpf(ebpf)?;
    forward_bpf_logs(ebpf)?;
    // Adopted tables are changed in one transaction, taken back if anything
    // fails before the new program is in: the pinned data plane then goes on
    // exactly as it was.
    if previous.is_some() {
        tables.begin();
    }
    let filled = fill(
        &mut tables,
        model,
        attach_to,
        routes,
        previous,
        carried_health,
        links,
        neighbours,
    )
    .and_then(|steering| load_program(ebpf).map(|()| steering));
    let steering = match filled {
        Ok(steering) => steering,
        Err(e) => {
            if tables.rollback() > 0 {
                warn!("some writes to the adopted tables could not be taken back (logged)");
            }
            return Err(e);
        }
    };
    let program = xdp_program(ebpf)?;
    let tag = program
        .info()
        .context("reading the loaded program's tag")?
        .tag();
    for iface in attach_to {
        let path = instance.link_pin(&iface.name);
        if path.exists() {
            let pinned = PinnedLink::from_pin(&path)
                .with_context(|| format!("opening the pinned link {}", path.display()))?;
            let fd_link = FdLink::from(pinned);
            let was = fd_link
                .info()
                .ok()
                .and_then(|info| program_tag(info.program_id()));
            let link = XdpLink::try_from(fd_link)
                .with_context(|| format!("{} is not an XDP link", path.display()))?;
            match program.attach_to_link(link) {
                Ok(_) => {
                    info!(
                        "{}: program {tag:016x} swapped in on the pinned link, replacing {} ({})",
                        iface.name,
                        was.map_or("?".into(), |t| format!("{t:016x}")),
                        match was {
                            Some(t) if t == tag => "the same build",
                            Some(_) => "a different build",
                            None => "unknown",
                        }
                    );
                    continue;
                }
                // The interface the link held is gone (deleted, and maybe
                // re-created under its name: a bond or VLAN the network
                // configuration made again): the link is severed, and the
                // interface of that name has no program. Its pin goes, and
                // the program is attached afresh below.
                Err(e) if severed(&e) => {
                    warn!(
                        "{}: the pinned link's interface is gone (deleted, or re-created under this name): attaching the program afresh",
                        iface.name
                    );
                    instance::remove_link_pin(&path)?;
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!(
                        "swapping the program on {} (bpf_link_update)",
                        iface.name
                    )));
                }
            }
        }
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
        // The pin holds the attachment from here on; this handle may go.
        fd_link
            .pin(&path)
            .with_context(|| format!("pinning link at {}", path.display()))?;
    }
    tables.commit();
    let program_id = program
        .info()
        .context("reading the loaded program's id")?
        .id();
    if let Err(e) = watch_transmit_errors(instance, ebpf, &mut tables, program_id) {
        warn!("transmit errors will not be counted (stats' xmit_drops, redirect_errors): {e:#}");
    }
    Ok((tables, steering))
}

/// Whether a link update failed because the link's interface is gone
/// (ENOLINK: the kernel severed the link when the interface went).
fn severed(e: &aya::programs::ProgramError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::ENOLINK))
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// The xdp tracepoints `watch_transmit_errors` attaches to, whose links are
/// pinned beside the XDP links (`link_tp_NAME`).
const TRANSMIT_TRACEPOINTS: [&str; 2] = ["xdp_devmap_xmit", "xdp_redirect_err"];

/// Attaches the xdp tracepoint programs that count what the kernel drops
/// after the program handed a frame over (`TX_ERRORS`), their links pinned
/// beside the XDP links so that they outlive the daemon. A restart replaces
/// them (a moment uncounted). Failing costs only these counts.
fn watch_transmit_errors(
    instance: &Instance,
    ebpf: &mut aya::Ebpf,
    tables: &mut Tables,
    program_id: u32,
) -> Result<()> {
    use pop_forwarder_common::tracepoints;
    tables.set_xdp_prog_id(program_id)?;
    let events = instance::ensure_tracefs()?;
    for (name, fields) in TRANSMIT_TRACEPOINTS.into_iter().zip([
        &tracepoints::DEVMAP_XMIT[..],
        &tracepoints::REDIRECT_ERR[..],
    ]) {
        let format_path = events.join("xdp").join(name).join("format");
        let format = std::fs::read_to_string(&format_path)
            .with_context(|| format!("reading {}", format_path.display()))?;
        for (field, offset) in fields {
            let found = format.lines().find_map(|l| {
                l.contains(&format!(" {field};"))
                    .then(|| {
                        l.split("offset:")
                            .nth(1)?
                            .split(';')
                            .next()?
                            .parse::<usize>()
                            .ok()
                    })
                    .flatten()
            });
            if found != Some(*offset) {
                bail!(
                    "xdp:{name}'s field {field} is at offset {found:?} in this kernel, not {offset}"
                );
            }
        }
        let path = instance.pin_dir().join(format!("link_tp_{name}"));
        if path.exists() {
            std::fs::remove_file(&path)
                .with_context(|| format!("removing the old link {}", path.display()))?;
        }
        let program: &mut aya::programs::TracePoint = ebpf
            .program_mut(name)
            .with_context(|| format!("the object has no program {name}"))?
            .try_into()?;
        program.load().with_context(|| format!("loading {name}"))?;
        let id = program
            .attach("xdp", name)
            .with_context(|| format!("attaching to xdp:{name}"))?;
        let link = FdLink::try_from(program.take_link(id)?)
            .context("the tracepoint attachment is not a bpf_link")?;
        link.pin(&path)
            .with_context(|| format!("pinning {}", path.display()))?;
    }
    Ok(())
}

/// Brings the tables to the config: new ones, or adopted ones (whose
/// steering slots the previous daemon recorded). New tables of a migration
/// take over the nodes' health the previous daemon recorded
/// (`carried_health`).
#[allow(clippy::too_many_arguments)]
fn fill(
    tables: &mut Tables,
    model: &Model,
    attach_to: &[AttachedInterface],
    routes: &[(Prefix, Want)],
    previous: Option<&State>,
    carried_health: Option<&[steering::NodeState]>,
    links: &[kernel::Link],
    neighbours: &[kernel::Neighbour],
) -> Result<steering::Steering> {
    let mut steering = match previous {
        Some(state) => {
            // Groups the previous daemon retired and did not reclaim.
            let orphans = tables.retire_unreferenced_groups()?;
            if orphans > 0 {
                info!(
                    "{orphans} DIR-24-8 groups the previous daemon left retired are freed after the grace period"
                );
            }
            steering::Steering::adopt(tables, &state.steering)?
        }
        None => {
            tables.set_layout_version()?;
            tables.set_ipv4_lookup(model.ipv4_lookup)?;
            tables.set_ipv6_lookup(model.ipv6_lookup)?;
            steering::Steering::default()
        }
    };
    tables.set_route_miss(model.route_miss)?;
    tables.set_route_lookup(model.route_lookup)?;
    tables.set_flow_idle(model.flow_idle_timeout.0, model.flow_idle_timeout.1)?;
    for iface in attach_to {
        tables.add_egress(iface.ifindex)?;
        if let Some(mac) = links
            .iter()
            .find(|l| l.ifindex == iface.ifindex)
            .and_then(|l| l.mac)
            && !tables.set_interface_mac(iface.ifindex, mac)?
        {
            warn!(
                "{}: ifindex {} is past the {} interfaces whose MAC the program checks: frames for other hosts arriving there are routed",
                iface.name,
                iface.ifindex,
                pop_forwarder_common::MAX_INTERFACES
            );
        }
    }
    tables.sync_local_addrs(&own_addresses(links))?;
    tables.apply_routes(routes)?;
    let attached: Vec<u32> = attach_to.iter().map(|a| a.ifindex).collect();
    mirror_neighbours(tables, links, neighbours, &attached)?;
    tables.sync_vlans(&kernel::vlan_keys(links, &attached))?;
    tables.apply_deny(&model.deny)?;
    steering.apply(tables, &steering::Spec::of(model), links, neighbours)?;
    if let Some(was) = carried_health {
        let down = steering.carry_health(tables, was)?;
        if down > 0 {
            info!(
                "{down} cache nodes failing their health check when the tables were migrated stay out of the new ones until their checks pass"
            );
        }
    }
    Ok(steering)
}

fn xdp_program(ebpf: &mut aya::Ebpf) -> Result<&mut Xdp> {
    ebpf.program_mut(PROGRAM_NAME)
        .context("the object has no XDP program")?
        .try_into()
        .context("the program is not XDP")
}

/// Loads the program into the kernel (the verifier runs here).
fn load_program(ebpf: &mut aya::Ebpf) -> Result<()> {
    xdp_program(ebpf)?
        .load()
        .context("loading the XDP program into the kernel (verifier)")
}

/// The kernel's tag (a hash of the instructions) of loaded program `id`.
fn program_tag(id: u32) -> Option<u64> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .map(|p| p.tag())
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

/// Re-reads the config and applies it (SIGHUP, `reload`), logging and
/// returning what changed, or why it was refused.
fn reload(running: &mut Running, config_path: &Path) -> Result<String> {
    let result = apply_config(running, config_path);
    // Whether applied or refused, the new config's copies are gone.
    release_freed_memory();
    match result {
        Ok(summary) => {
            let message = format!("reloaded {}: {summary}", config_path.display());
            info!("{message}");
            Ok(message)
        }
        Err(e) => Err(e.context(format!(
            "reload of {} refused, tables unchanged",
            config_path.display()
        ))),
    }
}

/// Applies a changed config without detaching: routes, the route-miss
/// policy, cache nodes and VIPs. Interfaces and the IPv4 lookup are fixed
/// for the daemon's life; a config that changes them is refused whole, as
/// is one that does not validate or resolve. Routes, nodes and VIPs added
/// with the CLI and not in the file go: on reload the file is the truth.
fn apply_config(running: &mut Running, config_path: &Path) -> Result<String> {
    let mut model = Model::from_file(config_path)?;
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
        bail!("interfaces changed; attaching and detaching need a restart of the daemon");
    }
    if model.ipv4_lookup != running.tables.ipv4_lookup() {
        bail!(
            "ipv4_lookup changed to {}; that needs `detach`, then `run`",
            model.ipv4_lookup
        );
    }
    if model.ipv6_lookup != running.tables.ipv6_lookup() {
        bail!(
            "ipv6_lookup changed to {}; that needs `detach`, then `run`",
            model.ipv6_lookup
        );
    }
    if model.metrics_listen != running.metrics_listen {
        bail!("metrics_listen changed; the endpoint moves with a restart of the daemon");
    }
    let links = kernel::links()?;
    let neighbours = kernel::neighbours(&links)?;
    check_node_egress(&model.nodes, &kernel::links()?, &running.attached())?;
    if model.route_source != running.route_source || model.kernel_table != running.kernel_table {
        bail!(
            "route_source or kernel_table changed (to {} {}): that needs a restart of the daemon",
            model.route_source,
            model.kernel_table
        );
    }
    // A mirrored table is planned from the daemon's copy, which the
    // notifications keep current (those still queued are applied at the
    // next batch, against what this writes); read whole only when there
    // is no copy (a re-read failed).
    let from_copy = running.kernel_routes.is_some();
    let kernel_routes = match (model.route_source, &running.kernel_routes) {
        (RouteSource::Kernel, Some(table)) => Some(table.bests()),
        (RouteSource::Kernel, None) => Some(kernel::routes(model.kernel_table)?),
        (RouteSource::Static, _) => None,
    };
    let wanted = mirror::wanted(
        resolve_routes(&model, &links, &neighbours)?,
        kernel_routes.as_deref(),
        &links,
        &neighbours,
        &running.attached(),
    );
    // Planned: a million routes' worth less at the reload's peak.
    drop(kernel_routes);
    let (routes, connected) = (&wanted.routes, wanted.connected.clone());
    // Steering is checked whole before its first write, routes were
    // resolved above and are checked for room before theirs: from here on
    // only a failing write can stop it, and then the transaction takes
    // every write back.
    let ((applied, (added, changed, deleted)), writes) = transaction(running, |running| {
        let applied = running.steering.apply(
            &mut running.tables,
            &steering::Spec::of(&model),
            &links,
            &neighbours,
        )?;
        let routes = running.tables.apply_routes(routes)?;
        running.tables.apply_deny(&model.deny)?;
        running.tables.set_route_miss(model.route_miss)?;
        running.tables.set_route_lookup(model.route_lookup)?;
        running
            .tables
            .set_flow_idle(model.flow_idle_timeout.0, model.flow_idle_timeout.1)?;
        Ok((applied, routes))
    })?;
    running.connected = connected;
    running.static_routes = std::mem::take(&mut model.routes);
    running.static_prefixes = static_prefixes_of(running.route_source, &running.static_routes);
    if running.route_source == RouteSource::Kernel {
        if from_copy {
            // What the tables now hold for each mirrored prefix and
            // subnet: the next batch patches from there. The old record
            // goes first, not after the new one is built.
            running.mirrored = mirror::Mirrored::default();
            running.mirrored = mirror::Mirrored::of(&wanted, &running.static_prefixes);
            running.subnets = kernel::SubnetView::of(&links);
            running.replan.clear();
        } else {
            // The next batch of route notifications reads the table whole.
            running.kernel_routes = None;
        }
    }
    log_to_kernel(running, &wanted.to_kernel, true);
    steering_applied(running, &applied)?;
    if model.vip_route_table != running.vip_route_table {
        if let Some(old) = running.vip_route_table {
            match announce::withdraw_all(old) {
                Ok(gone) => info!("withdrew {} VIP routes from table {old}", gone.len()),
                Err(e) => warn!("withdrawing the VIP routes of table {old}: {e:#}"),
            }
        }
        running.vip_route_table = model.vip_route_table;
        running.announce_conflicts.clear();
        if let Some(mut state) = running.instance.read_state() {
            state.vip_route_table = model.vip_route_table;
            running.instance.write_state(&state)?;
        }
    }
    Ok(format!(
        "{added} routes added, {changed} changed, {deleted} deleted; route miss {:?}; {applied} ({writes} table writes)",
        model.route_miss
    ))
}

/// This box's addresses and its subnets' IPv4 broadcast addresses: packets
/// to them are the kernel's.
fn own_addresses(links: &[kernel::Link]) -> Vec<std::net::IpAddr> {
    links
        .iter()
        .flat_map(|l| l.addrs.iter().chain(&l.broadcasts).copied())
        .collect()
}

/// Every route of `model` with its next hop resolved against the namespace,
/// the first one that does not resolve, or leaves by an interface the
/// program cannot send on, named in the error.
fn resolve_routes(
    model: &Model,
    links: &[kernel::Link],
    neighbours: &[kernel::Neighbour],
) -> Result<Vec<(Prefix, pop_forwarder_common::NextHop)>> {
    let attached = attached_of(model, links);
    model
        .routes
        .iter()
        .enumerate()
        .map(|(i, route)| {
            check_egress(&route.dev, links, &attached)
                .and_then(|()| resolve_next_hop(route, links, neighbours))
                .map(|nh| (route.prefix, nh))
                .with_context(|| format!("routes[{i}] ({})", route.prefix))
        })
        .collect()
}

/// The ifindexes of `model`'s interfaces that exist.
fn attached_of(model: &Model, links: &[kernel::Link]) -> Vec<u32> {
    model
        .interfaces
        .iter()
        .filter_map(|(name, _)| links.iter().find(|l| &l.name == name))
        .map(|l| l.ifindex)
        .collect()
}

/// Refuses an egress the program cannot send on: an interface it is not
/// attached to (nor a VLAN subinterface of one). XDP redirects only to
/// interfaces ready for XDP frames; to another, a redirect fails in the
/// kernel while the program has counted the packet as forwarded.
fn check_egress(dev: &str, links: &[kernel::Link], attached: &[u32]) -> Result<()> {
    let link = kernel::link(links, dev).context("dev")?;
    if !attached.contains(&link.tx_ifindex()) {
        bail!(
            "dev: {dev:?} has no XDP program of this instance: the program sends only out of the interfaces it is attached to (`interfaces`) and their VLAN subinterfaces; attach it there too, or go through one of those"
        );
    }
    Ok(())
}

/// `check_egress` for every direct-server-return node of `nodes`.
fn check_node_egress(nodes: &[Node], links: &[kernel::Link], attached: &[u32]) -> Result<()> {
    for node in nodes.iter().filter(|n| n.delivery == Delivery::Dsr) {
        check_egress(&node.dev, links, attached)
            .with_context(|| format!("nodes ({})", node.name))?;
    }
    Ok(())
}

/// Applies a health change; one that fails (taken back whole) waits for
/// the next retry tick and is tried again, until it is applied or a newer
/// state of the node replaces it: never lost.
fn apply_health_or_retry(running: &mut Running, event: HealthEvent) {
    if let Err(e) = apply_health(running, event.clone()) {
        count_error(running, "health_apply");
        warn!(
            "applying a health change of node {} ({}): {e:#}; trying again in {} s",
            event.node,
            if event.healthy { "up" } else { "down" },
            RETRY_INTERVAL.as_secs()
        );
        running.pending_health.push(event);
    }
}

/// Takes a node that failed its health check out of its VIPs' Maglev tables
/// and out of the node table (so its flows move too), or puts it back.
fn apply_health(running: &mut Running, event: HealthEvent) -> Result<()> {
    if running.checkers.get(&event.node).map(|c| c.0) != Some(event.checker) {
        return Ok(()); // from a checker since stopped
    }
    let links = kernel::links()?;
    let neighbours = kernel::neighbours(&links)?;
    let (rebuilt, _) = transaction(running, |running| {
        running.steering.set_health(
            &mut running.tables,
            &event.node,
            event.healthy,
            &links,
            &neighbours,
        )
    })?;
    // The state file first: the log line is what watchers wait for.
    write_steering_state(running)?;
    announce_vips(running);
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

/// Brings next hops, node MACs and local addresses in line with the kernel,
/// and has it resolve the neighbours nobody has resolved yet. Returns how
/// many of those (gateways and cache nodes) are still unresolved.
fn refresh(running: &mut Running) -> Result<usize> {
    let links = kernel::links()?;
    let neighbours = kernel::neighbours(&links)?;
    let not_attached = follow_recreated_interfaces(running, &links, &neighbours)?;
    warn_of_lost_interfaces(running, &links, &not_attached);
    for change in running.tables.refresh_next_hops(&links, &neighbours)? {
        info!("{change}");
    }
    for change in running.tables.refresh_interface_macs(&links)? {
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
    let unresolved: Vec<_> = running
        .tables
        .unresolved_gateways()?
        .into_iter()
        .chain(unresolved_nodes)
        .collect();
    for &(gateway, ifindex) in &unresolved {
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
    if running.route_source == RouteSource::Static {
        refresh_connected(running, &links)?;
    }
    let conflicts = running.tables.sync_local_addrs(&own_addresses(&links))?;
    let attached = running.attached();
    let left_out = mirror_neighbours(&mut running.tables, &links, &neighbours, &attached)?;
    let vlans = kernel::vlan_keys(&links, &attached);
    let vlans_left_out = running.tables.sync_vlans(&vlans)?;
    if vlans_left_out > 0 && vlans_left_out != running.vlans_left_out {
        warn!(
            "{vlans_left_out} VLAN subinterfaces do not fit the program's table ({}): their tagged frames go to the kernel",
            pop_forwarder_common::MAX_VLANS
        );
    }
    running.vlans_left_out = vlans_left_out;
    if left_out != running.neighbours_left_out {
        if left_out > 0 {
            warn!(
                "{left_out} neighbours on connected subnets do not fit the program's table ({} entries): their packets go to the kernel",
                pop_forwarder_common::MAX_NEIGHBOURS
            );
        }
        running.neighbours_left_out = left_out;
    }
    if conflicts != running.local_conflicts {
        for addr in &conflicts {
            warn!(
                "local address {addr} has an operator route to exactly it; its packets are forwarded, not delivered"
            );
        }
        running.local_conflicts = conflicts;
    }
    Ok(unresolved.len())
}

/// Mirrors the kernel's neighbours on attached interfaces (and their VLAN
/// subinterfaces) into
/// `NEIGHBOURS`, where the program finds hosts on connected subnets.
/// Returns how many did not fit.
fn mirror_neighbours(
    tables: &mut Tables,
    links: &[kernel::Link],
    neighbours: &[kernel::Neighbour],
    attached: &[u32],
) -> Result<usize> {
    let forwarding = kernel::forwarding(links, attached);
    let hosts: Vec<_> = neighbours
        .iter()
        .filter(|n| forwarding.contains(&n.ifindex))
        .map(|n| (n.ifindex, n.addr, n.mac))
        .collect();
    Ok(tables.sync_neighbours(&hosts)?.2)
}

/// Follows interfaces deleted and made again under their names (a bond or
/// VLAN the network configuration re-creates): the program goes with the
/// old interface, and is attached here to the new one, its pinned link
/// replaced; next hops through any interface that is gone move to the one
/// now under its name, if the program can send there. Returns why the
/// program could not be attached to those it could not (by name), for
/// `warn_of_lost_interfaces` to say once; tried again at every refresh.
fn follow_recreated_interfaces(
    running: &mut Running,
    links: &[kernel::Link],
    neighbours: &[kernel::Neighbour],
) -> Result<HashMap<String, String>> {
    let mut not_attached = HashMap::new();
    let here = |ifindex: u32| links.iter().any(|l| l.ifindex == ifindex);
    let recreated: Vec<(String, u32, &kernel::Link)> = running
        .attached_names
        .iter()
        .filter(|(_, old)| !here(*old))
        .filter_map(|(name, old)| {
            let link = links.iter().find(|l| &l.name == name)?;
            Some((name.clone(), *old, link))
        })
        .collect();
    for (name, old, link) in recreated {
        match reattach(running, &name, link) {
            Ok(()) => {
                info!(
                    "interface {name} was re-created (ifindex {old}, now {}): the program is attached to it again",
                    link.ifindex
                );
                for entry in &mut running.attached_names {
                    if entry.0 == name {
                        entry.1 = link.ifindex;
                    }
                }
                // Mirrored routes through it went to the kernel while the
                // program was not on it: they, and its subnets, are
                // planned again (the table read whole if there is no copy
                // to plan from).
                if running.route_source == RouteSource::Kernel {
                    match &running.kernel_routes {
                        Some(table) => {
                            let through = table.prefixes_through(link.ifindex);
                            running.replan.extend(through);
                            running.replan.extend(link.subnets.iter().copied());
                        }
                        None => running.reread_routes = true,
                    }
                }
            }
            Err(e) => {
                not_attached.insert(name, format!("{e:#}"));
            }
        }
    }
    // Most refreshes find no interface gone: they read nothing more.
    if running.link_names.keys().any(|i| !here(*i)) {
        let attached = running.attached();
        let moved: Vec<(u32, &kernel::Link)> = running
            .link_names
            .iter()
            .filter(|(ifindex, _)| !here(**ifindex))
            .filter_map(|(ifindex, name)| {
                links
                    .iter()
                    .find(|l| &l.name == name && attached.contains(&l.tx_ifindex()))
                    .map(|l| (*ifindex, l))
            })
            .collect();
        if !moved.is_empty() {
            let (lines, _) = transaction(running, |running| {
                running.tables.move_next_hops(&moved, neighbours)
            })?;
            for line in lines {
                info!("{line}");
            }
        }
        // Names of interfaces gone are kept while next hops go through
        // them.
        let in_use: std::collections::HashSet<u32> = running
            .tables
            .next_hop_slots()?
            .iter()
            .filter(|nh| nh.is_in_use())
            .map(|nh| nh.ifindex)
            .collect();
        running
            .link_names
            .retain(|ifindex, _| here(*ifindex) || in_use.contains(ifindex));
    }
    running
        .link_names
        .extend(links.iter().map(|l| (l.ifindex, l.name.clone())));
    Ok(not_attached)
}

/// Attaches the program to `link`, the interface now under `name`, in the
/// mode the instance attached it in, and pins the new link where the old
/// one's pin was (that link severed: its interface is gone).
fn reattach(running: &mut Running, name: &str, link: &kernel::Link) -> Result<()> {
    let mut state = running
        .instance
        .read_state()
        .context("the instance's state file is gone")?;
    let entry = state
        .interfaces
        .iter_mut()
        .find(|i| i.name == name)
        .context("the state file does not name it")?;
    let mac = link.mac.context("it has no Ethernet address")?;
    if link.xdp_attached {
        bail!("it has an XDP program already (not this instance's)");
    }
    // The tables first: the program sends nothing there before it is on
    // the interface.
    transaction(running, |running| {
        running.tables.add_egress(link.ifindex)?;
        running.tables.set_interface_mac(link.ifindex, mac)?;
        Ok(())
    })?;
    let mode = match entry.mode {
        XdpMode::Native => aya::programs::XdpMode::Driver,
        XdpMode::Skb => aya::programs::XdpMode::Skb,
    };
    let program = xdp_program(&mut running.ebpf)?;
    let id = program
        .attach(name, mode)
        .with_context(|| format!("attaching XDP in {} mode", entry.mode))?;
    let fd_link =
        FdLink::try_from(program.take_link(id)?).context("XDP attachment is not a bpf_link")?;
    let path = running.instance.link_pin(name);
    if path.exists() {
        instance::remove_link_pin(&path)?;
    }
    fd_link
        .pin(&path)
        .with_context(|| format!("pinning link at {}", path.display()))?;
    entry.ifindex = link.ifindex;
    running.instance.write_state(&state)
}

/// Says so, once, when an interface the program was attached to is gone,
/// or is there again as a new interface of the same name that the program
/// could not be attached to (`follow_recreated_interfaces`): the new one's
/// packets go through the kernel until the program is on it.
fn warn_of_lost_interfaces(
    running: &mut Running,
    links: &[kernel::Link],
    not_attached: &HashMap<String, String>,
) {
    for (name, ifindex) in &running.attached_names {
        let lost = match links.iter().find(|l| &l.name == name) {
            None => Some("is gone".to_owned()),
            Some(l) if l.ifindex != *ifindex => Some(match not_attached.get(name) {
                Some(why) => format!(
                    "was re-created (ifindex {ifindex}, now {}) and the program could not be attached to it ({why}): its packets go through the kernel; the daemon tries again at each change of the interfaces",
                    l.ifindex
                ),
                None => format!(
                    "is another interface now (ifindex {ifindex}, now {}), the old one still here under another name: the program stays on that one, and the new one's packets go through the kernel",
                    l.ifindex
                ),
            }),
            Some(_) => None,
        };
        match lost {
            Some(why) if running.lost_interfaces.get(name) != Some(&why) => {
                warn!("interface {name}, which the program was attached to, {why}");
                running.lost_interfaces.insert(name.clone(), why);
            }
            Some(_) => {}
            None => {
                running.lost_interfaces.remove(name);
            }
        }
    }
}

/// Follows the interfaces' connected subnets as addresses come and go: a
/// subnet that went loses its route (if it still has its connected one);
/// one that has no route (new, or its route deleted with `route del`) gets
/// its connected one. One transaction.
fn refresh_connected(running: &mut Running, links: &[kernel::Link]) -> Result<()> {
    // A subnet is the same route while its prefix and next hop (interface,
    // or the kernel) are: an MTU or MAC change is the next hop's refresh.
    let key = |(p, nh): &(Prefix, NextHop)| (*p, crate::plan::gateway_key(nh), nh.flags);
    let now = maps::connected_routes(links, &running.attached());
    let is: Vec<_> = now.iter().map(key).collect();
    let mut gone = Vec::new();
    for route in &running.connected {
        if !is.contains(&key(route)) && running.tables.routes_to(route.0, &route.1)? {
            gone.push(route.0);
        }
    }
    let mut missing = Vec::new();
    for route in &now {
        if !running.tables.is_routed(route.0)? && !gone.contains(&route.0) {
            missing.push(*route);
        }
    }
    if gone.is_empty() && missing.is_empty() {
        running.connected = now;
        return Ok(());
    }
    transaction(running, |running| {
        for prefix in &gone {
            running.tables.del_route(*prefix)?;
            info!("connected subnet {prefix} gone: route removed");
        }
        for (prefix, nh) in &missing {
            running.tables.add_route(*prefix, nh)?;
            info!("connected subnet {prefix}: route added");
        }
        Ok(())
    })?;
    running.connected = now;
    Ok(())
}

/// A stop (SIGTERM, SIGINT): the daemon goes, the data plane stays. The
/// program keeps forwarding through its pinned links on the pinned tables,
/// which the next `run` adopts.
fn stop(running: Running) {
    for (_, task) in running.checkers.values() {
        task.abort();
    }
    info!(
        "instance {:?}: daemon stopped; XDP stays attached and forwarding on the pinned tables at {} (the next `run` adopts them; `detach` removes them)",
        running.instance.name,
        running.instance.pin_dir().display()
    );
}

/// Brings the VIP routes for BGP in line with what this forwarder can serve
/// (nothing while drained). A failure is logged and retried each tick.
fn announce_vips(running: &mut Running) {
    let Some(table) = running.vip_route_table else {
        return;
    };
    let want: std::collections::BTreeSet<std::net::IpAddr> = if running.draining {
        Default::default()
    } else {
        running.steering.servable_addresses()
    };
    match announce::sync(table, &want) {
        Ok(done) => {
            running.announce_failed = false;
            for addr in &done.added {
                info!("VIP {addr} announced (route in table {table})");
            }
            for addr in &done.withdrawn {
                info!("VIP {addr} withdrawn (route removed from table {table})");
            }
            let conflicts: std::collections::BTreeSet<_> = done.conflicts.into_iter().collect();
            for addr in conflicts.difference(&running.announce_conflicts) {
                warn!(
                    "VIP {addr} is not announced: routing table {table} has a route to it that is not this daemon's (left alone; the VIP still steers what arrives)"
                );
            }
            running.announced = want.difference(&conflicts).copied().collect();
            running.announce_conflicts = conflicts;
        }
        Err(e) => {
            count_error(running, "announce");
            if !running.announce_failed {
                warn!(
                    "announcing VIPs in routing table {table}: {e:#}; trying again every {} s",
                    RETRY_INTERVAL.as_secs()
                );
            }
            running.announce_failed = true;
        }
    }
}

/// `drain` (maintenance: withdraw every VIP, keep steering what still
/// arrives) and `resume`. Recorded in the state file, so a restart keeps it.
fn drain(running: &mut Running, draining: bool) -> Result<String> {
    let Some(table) = running.vip_route_table else {
        bail!(
            "this forwarder announces no VIPs (no vip_route_table in its config): there is nothing to {}",
            if draining { "withdraw" } else { "announce" }
        );
    };
    let was = running.draining;
    running.draining = draining;
    if let Some(mut state) = running.instance.read_state() {
        state.draining = draining;
        if let Err(e) = running.instance.write_state(&state) {
            running.draining = was;
            return Err(e.context("recording the drain in the state file; nothing changed"));
        }
    }
    announce_vips(running);
    let message = match (draining, running.announce_failed) {
        (true, false) => format!(
            "drained: every VIP withdrawn from table {table}; flows that still arrive are steered as before"
        ),
        (false, false) => {
            let held = running.announce_conflicts.len();
            format!(
                "resumed: {} VIP addresses announced in table {table}{}",
                running.steering.servable_addresses().len() - held,
                if held > 0 {
                    format!(" ({held} not: another route to them is in the table)")
                } else {
                    String::new()
                }
            )
        }
        (_, true) => format!(
            "{} recorded, but changing table {table} failed (logged; tried again every {} s)",
            if draining { "drain" } else { "resume" },
            RETRY_INTERVAL.as_secs()
        ),
    };
    info!("{message}");
    Ok(message)
}

/// Tells systemd (NOTIFY_SOCKET) how the daemon is; nothing without it.
fn notify_systemd(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!("notifying systemd (NOTIFY_SOCKET): {e}");
    }
}

fn count_error(running: &mut Running, kind: &'static str) {
    *running.errors.entry(kind).or_default() += 1;
}

/// Everything the metrics endpoint reports but the route counts, read now.
fn metrics_families(running: &Running) -> Result<Vec<crate::metrics::Family>> {
    use crate::metrics::{Family, Value};
    use pop_forwarder_common::{MAX_NEXT_HOPS, steering::MAX_CACHE_NODES, steering::MAX_VIPS};
    use prometheus_client::registry::Unit;
    let links = kernel::links()?;
    let stats = running.tables.stats(&links)?;
    let mut out = Vec::new();
    let mut packets = Family::new(
        "packets",
        "Packets the XDP program handled, by outcome (see README, What it does with each packet)",
    );
    for (outcome, n) in &stats.counters {
        packets.push(vec![("outcome", (*outcome).to_owned())], Value::Counter(*n));
    }
    out.push(packets);
    let mut nh_packets = Family::new("next_hop_packets", "Packets forwarded to each next hop");
    let mut nh_bytes =
        Family::new("next_hop", "Bytes forwarded to each next hop").unit(Unit::Bytes);
    for nh in &stats.next_hops {
        let labels = vec![
            ("next_hop", nh.id.to_string()),
            ("via", nh.via.clone()),
            ("dev", nh.dev.clone()),
        ];
        nh_packets.push(labels.clone(), Value::Counter(nh.packets));
        nh_bytes.push(labels, Value::Counter(nh.bytes));
    }
    out.extend([nh_packets, nh_bytes]);
    let mut if_packets = Family::new(
        "interface_packets",
        "Packets received on each interface the program runs on, by what became of them",
    );
    let mut if_bytes =
        Family::new("interface_received", "Bytes received on each interface").unit(Unit::Bytes);
    let mut if_tx = Family::new(
        "interface_transmit_errors",
        "Frames sent out of the interface that the kernel dropped (xmit_drop: the devmap transmit; redirect_error: this program's redirect refused)",
    );
    for i in &stats.interfaces {
        for (action, n) in [
            ("forwarded", i.forwarded),
            ("passed", i.passed),
            ("dropped", i.dropped),
        ] {
            if_packets.push(
                vec![("interface", i.name.clone()), ("action", action.into())],
                Value::Counter(n),
            );
        }
        if_bytes.push(vec![("interface", i.name.clone())], Value::Counter(i.bytes));
        for (kind, n) in [
            ("xmit_drop", i.xmit_drops),
            ("redirect_error", i.redirect_errors),
        ] {
            if_tx.push(
                vec![("interface", i.name.clone()), ("kind", kind.into())],
                Value::Counter(n),
            );
        }
    }
    out.extend([if_packets, if_bytes, if_tx]);

    let state = running.steering.state();
    let vip_slots = state.vips.iter().map(|v| v.slot + 1).max().unwrap_or(0);
    let node_slots = state.nodes.iter().map(|n| n.slot + 1).max().unwrap_or(0);
    let (vip_stats, node_stats) = running.tables.steering_stats(vip_slots, node_slots)?;
    let mut vip_packets = Family::new("vip_packets", "Packets steered to a cache node, per VIP");
    let mut vip_bytes =
        Family::new("vip", "Bytes steered to a cache node, per VIP").unit(Unit::Bytes);
    let mut vip_announced = Family::new(
        "vip_announced",
        "1 while the VIP's address is announced (a route in vip_route_table), 0 if not",
    );
    for v in &state.vips {
        let labels = vec![
            ("vip", v.address.to_string()),
            ("protocol", v.protocol.to_string()),
            ("port", v.port.to_string()),
        ];
        let t = vip_stats[v.slot as usize];
        vip_packets.push(labels.clone(), Value::Counter(t.packets));
        vip_bytes.push(labels.clone(), Value::Counter(t.bytes));
        if running.vip_route_table.is_some() {
            let on = running.announced.contains(&v.address);
            vip_announced.push(labels, Value::Gauge(f64::from(u8::from(on))));
        }
    }
    out.extend([vip_packets, vip_bytes, vip_announced]);
    if running.vip_route_table.is_some() {
        out.push(Family::one(
            "draining",
            "1 while the forwarder is drained (`drain`: no VIP announced)",
            Value::Gauge(f64::from(u8::from(running.draining))),
        ));
    }
    let mut node_packets = Family::new("node_packets", "Packets steered to each cache node");
    let mut node_bytes = Family::new("node", "Bytes steered to each cache node").unit(Unit::Bytes);
    let mut healthy = Family::new(
        "node_healthy",
        "1 while the node passes its health check (or is unchecked), 0 while it fails",
    );
    let mut changes = Family::new(
        "node_health_changes",
        "How often the node went down or came back",
    );
    let mut weight = Family::new("node_weight", "The node's share of new flows (0: drained)");
    for (slot, n) in running.steering.nodes() {
        let labels = vec![("node", n.node.name.clone())];
        let t = node_stats.get(slot as usize).copied().unwrap_or_default();
        node_packets.push(labels.clone(), Value::Counter(t.packets));
        node_bytes.push(labels.clone(), Value::Counter(t.bytes));
        healthy.push(labels.clone(), Value::Gauge(f64::from(u8::from(n.healthy))));
        changes.push(labels.clone(), Value::Counter(n.health_changes));
        weight.push(labels, Value::Gauge(f64::from(n.node.weight)));
    }
    out.extend([node_packets, node_bytes, healthy, changes, weight]);

    let mut entries = Family::new("table_entries", "Entries in use in the program's tables");
    let mut capacity = Family::new("table_capacity", "Entries the program's tables can hold");
    let deny = running.tables.deny_len()?;
    for (table, used, max) in [
        ("deny", deny, pop_forwarder_common::MAX_DENY as usize),
        ("next_hops", stats.next_hops.len(), MAX_NEXT_HOPS as usize),
        ("cache_nodes", state.nodes.len(), MAX_CACHE_NODES as usize),
        ("vips", state.vips.len(), MAX_VIPS as usize),
    ] {
        entries.push(vec![("table", table.into())], Value::Gauge(used as f64));
        capacity.push(vec![("table", table.into())], Value::Gauge(max as f64));
    }
    out.extend([entries, capacity]);

    let mut attached = Family::new(
        "interface_xdp_attached",
        "1 if the XDP program is attached to the interface, 0 if not",
    );
    if let Some(state) = running.instance.read_state() {
        for i in &state.interfaces {
            let on = links
                .iter()
                .any(|l| l.ifindex == i.ifindex && l.xdp_attached);
            attached.push(
                vec![("interface", i.name.clone()), ("mode", i.mode.to_string())],
                Value::Gauge(f64::from(u8::from(on))),
            );
        }
    }
    out.push(attached);

    if running.route_source == RouteSource::Kernel {
        let mut syncs = Family::new(
            "route_syncs",
            "Mirrorings of the kernel table: by notifications, or read whole",
        );
        syncs.push(
            vec![("kind", "notifications".into())],
            Value::Counter(running.route_syncs.0),
        );
        syncs.push(
            vec![("kind", "whole".into())],
            Value::Counter(running.route_syncs.1),
        );
        out.push(syncs);
        out.push(
            Family::one(
                "route_sync_lag",
                "From the first route notification of the last batch to the batch applied",
                Value::Gauge(running.route_sync_lag.as_secs_f64()),
            )
            .unit(Unit::Seconds),
        );
        out.push(Family::one(
            "kernel_routes",
            "Routes in the mirrored kernel table",
            Value::Gauge(running.kernel_routes.as_ref().map_or(0, |t| t.len()) as f64),
        ));
    }
    let mut errors = Family::new(
        "errors",
        "The daemon's own errors, by kind (each is logged; most are retried)",
    );
    for kind in [
        "announce",
        "control_request_refused",
        "health_apply",
        "metrics",
        "refresh",
        "reload_refused",
        "route_sync",
    ] {
        let n = running.errors.get(kind).copied().unwrap_or(0);
        errors.push(vec![("kind", kind.into())], Value::Counter(n));
    }
    out.push(errors);
    let mut info = Family::new("build_info", "The daemon's version");
    info.push(
        vec![("version", env!("CARGO_PKG_VERSION").into())],
        Value::Gauge(1.0),
    );
    out.push(info);
    Ok(out)
}

/// `detach`: the one way the data plane is removed.
fn shutdown_and_detach(running: Running) -> Result<()> {
    let Running {
        instance,
        ebpf,
        tables,
        checkers,
        vip_route_table,
        ..
    } = running;
    for (_, task) in checkers.into_values() {
        task.abort();
    }
    // The VIPs first: BGP moves their traffic to other forwarders before
    // this one stops taking it.
    if let Some(table) = vip_route_table {
        let withdrawn = announce::withdraw_all(table).with_context(|| {
            format!("withdrawing the VIP routes of table {table}; detach stopped before removing anything")
        })?;
        info!("withdrew {} VIP routes from table {table}", withdrawn.len());
    }
    drop(tables);
    // This process's handles to the links go with the program; removing
    // the pins detaches each link first.
    drop(ebpf);
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
