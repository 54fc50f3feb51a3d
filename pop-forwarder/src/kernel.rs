//! What the kernel knows about this network namespace: interfaces (index,
//! MTU, MAC, addresses and their subnets) and the neighbour table.
//!
//! Read over rtnetlink (`netlink`), which asks the namespace this process
//! is in, unlike /sys/class/net, which shows the namespace sysfs was
//! mounted in (under `nsenter --net`, the original one's).

use std::{collections::HashMap, net::IpAddr};

use anyhow::{Context as _, Result};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{
        InfoData, InfoVlan, LinkAttribute, LinkInfo, LinkLayerType, LinkMessage, LinkXdp,
        VlanProtocol, XdpAttached,
    },
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourMessage, NeighbourState,
    },
    route::{RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteNextHopFlags, RouteType},
};

use crate::{
    net::{Mac, Prefix},
    netlink,
};

/// One network interface.
#[derive(Debug, Clone)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
    pub mtu: u32,
    /// None for interfaces without an Ethernet address (loopback, tunnels).
    pub mac: Option<Mac>,
    pub addrs: Vec<IpAddr>,
    /// The subnet of each address shorter than a host route (IPv6
    /// link-local ones left out): the interface's connected subnets.
    pub subnets: Vec<Prefix>,
    /// IPv4 broadcast addresses of its subnets: this box's, like its own
    /// addresses.
    pub broadcasts: Vec<IpAddr>,
    /// An XDP program is attached (any mode).
    pub xdp_attached: bool,
    /// The mode it is attached in, if one program is, in the driver or
    /// generic (not offloaded, nor several at once).
    pub xdp_mode: Option<crate::config::XdpMode>,
    /// For a VLAN subinterface: its VLAN and the real device under it.
    pub vlan: Option<Vlan>,
}

/// A VLAN subinterface's tag and parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vlan {
    pub id: u16,
    /// TPID: 0x8100 (802.1Q) or 0x88a8 (802.1ad).
    pub proto: u16,
    /// The device the tagged frames leave on.
    pub parent: u32,
}

impl Link {
    /// The interface frames for it are sent out of: itself, or the parent
    /// of a VLAN subinterface.
    pub fn tx_ifindex(&self) -> u32 {
        self.vlan.map_or(self.ifindex, |v| v.parent)
    }
}

/// The VLANs (as the program keys them) of the VLAN subinterfaces on
/// attached interfaces: one tag (an 802.1Q or 802.1ad subinterface of an
/// attached device), or two (an 802.1Q subinterface of an 802.1ad one).
pub fn vlan_keys(links: &[Link], attached: &[u32]) -> Vec<pop_forwarder_common::VlanKey> {
    let by_index: HashMap<u32, &Link> = links.iter().map(|l| (l.ifindex, l)).collect();
    links
        .iter()
        .filter_map(|l| {
            let v = l.vlan?;
            if attached.contains(&v.parent) {
                return Some(pop_forwarder_common::VlanKey {
                    ifindex: v.parent,
                    outer: v.id,
                    inner: 0,
                });
            }
            let outer = by_index.get(&v.parent)?.vlan?;
            (attached.contains(&outer.parent) && v.proto == 0x8100).then_some(
                pop_forwarder_common::VlanKey {
                    ifindex: outer.parent,
                    outer: outer.id,
                    inner: v.id,
                },
            )
        })
        .collect()
}

/// The interfaces the program can send on: those it is attached to
/// (`attached`), and the VLAN subinterfaces of those.
pub fn forwarding(links: &[Link], attached: &[u32]) -> Vec<u32> {
    links
        .iter()
        .filter(|l| attached.contains(&l.tx_ifindex()))
        .map(|l| l.ifindex)
        .collect()
}

/// A neighbour-table entry with a usable link-layer address.
#[derive(Debug, Clone)]
pub struct Neighbour {
    pub addr: IpAddr,
    pub ifindex: u32,
    pub ifname: String,
    pub mac: Mac,
}

/// Every interface of this network namespace.
pub fn links() -> Result<Vec<Link>> {
    let links = netlink::dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
        .context("reading interfaces (rtnetlink)")?;
    let addresses = netlink::dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))
        .context("reading addresses (rtnetlink)")?;
    let mut out: Vec<Link> = links
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(m) => Some(link_of(&m)),
            _ => None,
        })
        .collect();
    let at: HashMap<u32, usize> = out
        .iter()
        .enumerate()
        .map(|(i, l)| (l.ifindex, i))
        .collect();
    for message in addresses {
        let RouteNetlinkMessage::NewAddress(m) = message else {
            continue;
        };
        let Some(&i) = at.get(&m.header.index) else {
            continue;
        };
        add_address(&mut out[i], &m);
    }
    Ok(out)
}

fn link_of(m: &LinkMessage) -> Link {
    let mut link = Link {
        ifindex: m.header.index,
        name: String::new(),
        mtu: 0,
        mac: None,
        addrs: Vec::new(),
        subnets: Vec::new(),
        broadcasts: Vec::new(),
        xdp_attached: false,
        xdp_mode: None,
        vlan: None,
    };
    let mut parent = None;
    let mut vlan = None;
    for attribute in &m.attributes {
        match attribute {
            LinkAttribute::IfName(name) => link.name = name.clone(),
            LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
            LinkAttribute::Address(a) if m.header.link_layer_type == LinkLayerType::Ether => {
                link.mac = <[u8; 6]>::try_from(a.as_slice()).ok().map(Mac);
            }
            LinkAttribute::Link(p) => parent = Some(*p),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Data(InfoData::Vlan(data)) = info {
                        let id = data.iter().find_map(|d| match d {
                            InfoVlan::Id(id) => Some(*id),
                            _ => None,
                        });
                        let proto = data.iter().find_map(|d| match d {
                            InfoVlan::Protocol(VlanProtocol::Ieee8021Ad) => Some(0x88a8),
                            InfoVlan::Protocol(_) => Some(0x8100),
                            _ => None,
                        });
                        vlan = id.map(|id| (id, proto.unwrap_or(0x8100)));
                    }
                }
            }
            LinkAttribute::Xdp(xdp) => {
                for x in xdp {
                    if let LinkXdp::Attached(a) = x {
                        link.xdp_attached = *a != XdpAttached::None;
                        link.xdp_mode = match a {
                            XdpAttached::Driver => Some(crate::config::XdpMode::Native),
                            XdpAttached::SocketBuffer => Some(crate::config::XdpMode::Skb),
                            _ => None,
                        };
                    }
                }
            }
            _ => {}
        }
    }
    link.vlan = vlan
        .zip(parent)
        .map(|((id, proto), parent)| Vlan { id, proto, parent });
    link
}

/// Adds one address (RTM_NEWADDR) to its interface: the address, its
/// subnet and (IPv4) broadcast address.
fn add_address(link: &mut Link, m: &AddressMessage) {
    // IFA_LOCAL is the interface's own address (on point-to-point links
    // IFA_ADDRESS is the peer's); IFA_ADDRESS when there is no IFA_LOCAL.
    let local = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(a) => Some(*a),
        _ => None,
    });
    let address = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(a) => Some(*a),
        _ => None,
    });
    let Some(addr) = local.or(address) else {
        return;
    };
    link.addrs.push(addr);
    let len = m.header.prefix_len;
    let host = if addr.is_ipv4() { 32 } else { 128 };
    let link_local = matches!(addr, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80);
    if len < host
        && !link_local
        && let Some(subnet) = Prefix::containing(addr, len)
        && !link.subnets.contains(&subnet)
    {
        link.subnets.push(subnet);
    }
    for a in &m.attributes {
        if let AddressAttribute::Broadcast(b) = a {
            link.broadcasts.push(IpAddr::V4(*b));
        }
    }
}

/// The interface called `name`, or an error that says it is missing.
pub fn link<'a>(links: &'a [Link], name: &str) -> Result<&'a Link> {
    links
        .iter()
        .find(|l| l.name == name)
        .with_context(|| format!("interface {name:?} does not exist in this network namespace"))
}

/// Asks the kernel to resolve `addr` on `ifname` and keep it resolved,
/// without any traffic to it: a "managed" neighbour entry (NTF_EXT_MANAGED,
/// Linux 5.16), which the kernel probes itself.
pub fn request_neighbour(addr: IpAddr, ifname: &str) -> Result<()> {
    let ifindex = links()?
        .into_iter()
        .find(|l| l.name == ifname)
        .with_context(|| format!("interface {ifname:?} does not exist"))?
        .ifindex;
    let mut m = NeighbourMessage::default();
    m.header.family = match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    m.header.ifindex = ifindex;
    m.header.state = NeighbourState::None;
    m.attributes
        .push(NeighbourAttribute::Destination(match addr {
            IpAddr::V4(a) => NeighbourAddress::Inet(a),
            IpAddr::V6(a) => NeighbourAddress::Inet6(a),
        }));
    m.attributes
        .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
    netlink::replace(RouteNetlinkMessage::NewNeighbour(m)).with_context(|| {
        format!("asking the kernel to resolve {addr} on {ifname} (a managed neighbour entry)")
    })
}

/// Neighbour entries whose link-layer address can be used now. FAILED and
/// INCOMPLETE entries have none; STALE ones are still right until proven
/// otherwise, and the kernel re-validates them as it uses them.
pub fn neighbours(links: &[Link]) -> Result<Vec<Neighbour>> {
    let names: HashMap<u32, &str> = links.iter().map(|l| (l.ifindex, l.name.as_str())).collect();
    let dumped = netlink::dump(RouteNetlinkMessage::GetNeighbour(
        NeighbourMessage::default(),
    ))
    .context("reading the neighbour table (rtnetlink)")?;
    Ok(dumped
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewNeighbour(m) => neighbour_of(&m, &names),
            _ => None,
        })
        .collect())
}

/// A usable neighbour entry (RTM_NEWNEIGH), if `m` is one.
pub fn neighbour_of(m: &NeighbourMessage, names: &HashMap<u32, &str>) -> Option<Neighbour> {
    let (addr, mac) = address_and_mac(m);
    Some(Neighbour {
        addr: addr?,
        ifindex: m.header.ifindex,
        ifname: (*names.get(&m.header.ifindex)?).to_owned(),
        mac: mac?,
    })
}

/// A neighbour entry's address, and its link-layer address if it can be
/// used now (see `neighbours`).
fn address_and_mac(m: &NeighbourMessage) -> (Option<IpAddr>, Option<Mac>) {
    let mut addr = None;
    let mut mac = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                addr = Some(IpAddr::V4(*a))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                addr = Some(IpAddr::V6(*a))
            }
            NeighbourAttribute::LinkLayerAddress(l) => {
                mac = <[u8; 6]>::try_from(l.as_slice()).ok().map(Mac)
            }
            _ => {}
        }
    }
    let unusable = matches!(
        m.header.state,
        NeighbourState::Failed | NeighbourState::Incomplete | NeighbourState::None
    );
    (addr, mac.filter(|_| !unusable))
}

/// What the neighbour notifications said of each entry: its usable MAC,
/// or None while it has none.
pub type NeighboursSeen = HashMap<(u32, IpAddr), Option<Mac>>;

/// Records what a neighbour notification (RTM_NEWNEIGH, or RTM_DELNEIGH
/// if `deleted`) says of its entry's usable MAC; returns whether that
/// moved, or may have: an entry not seen before, a MAC that came, went or
/// changed. Most notifications move nothing: the kernel announces each
/// neighbour's state changes (REACHABLE to STALE, DELAY, PROBE and back,
/// every half minute or so), and the MAC stays.
pub fn neighbour_moved(seen: &mut NeighboursSeen, m: &NeighbourMessage, deleted: bool) -> bool {
    let (Some(addr), mac) = address_and_mac(m) else {
        return true;
    };
    let key = (m.header.ifindex, addr);
    let now = if deleted { None } else { mac };
    let before = if deleted {
        seen.remove(&key)
    } else {
        seen.insert(key, now)
    };
    before != Some(now)
}

/// What of the interfaces' addresses a whole read of the mirrored table
/// follows: each interface's connected subnets (the box's own addresses
/// are followed by every refresh). Not the lifetimes or flags the kernel
/// also announces a change of: every router advertisement renews an IPv6
/// SLAAC address's lifetimes, and is announced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubnetView(Vec<(u32, Vec<Prefix>)>);

impl SubnetView {
    pub fn of(links: &[Link]) -> SubnetView {
        let mut view: Vec<_> = links
            .iter()
            .filter(|l| !l.subnets.is_empty())
            .map(|l| {
                let mut subnets = l.subnets.clone();
                subnets.sort_unstable();
                (l.ifindex, subnets)
            })
            .collect();
        view.sort_unstable_by_key(|v| v.0);
        SubnetView(view)
    }

    /// The subnets that are not on the same interfaces in `other`: come,
    /// gone, or moved to another interface (each prefix once, sorted).
    pub fn moved(&self, other: &SubnetView) -> Vec<Prefix> {
        let pairs = |v: &SubnetView| -> std::collections::BTreeSet<(Prefix, u32)> {
            v.0.iter()
                .flat_map(|(ifindex, subnets)| subnets.iter().map(move |p| (*p, *ifindex)))
                .collect()
        };
        let (old, new) = (pairs(self), pairs(other));
        let mut out: Vec<Prefix> = old.symmetric_difference(&new).map(|(p, _)| *p).collect();
        out.dedup();
        out
    }
}

/// One path of a kernel route: a gateway on an interface, with its weight
/// (RTNH hops + 1; 1 for a single-path route).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Path {
    pub gateway: IpAddr,
    pub ifindex: u32,
    pub weight: u32,
}

/// What a kernel route does, as far as the forwarder can follow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelKind {
    /// Through one gateway, or several (ECMP). Shared: a table's routes go
    /// through a few sets of paths, each held once (`KernelTable`).
    Via(std::sync::Arc<[Path]>),
    /// Straight to the destination on an interface: a connected subnet
    /// (scope link, no gateway).
    Direct(u32),
    /// What only the kernel can do with it, and why: blackhole,
    /// unreachable, prohibit, throw, a next-hop object, an encapsulation,
    /// a source-specific or TOS route, a gateway of the other family.
    Kernel(&'static str),
}

/// A route of the mirrored kernel table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelRoute {
    pub prefix: Prefix,
    /// Its metric: of two routes to one prefix, the lower wins.
    pub priority: u32,
    pub kind: KernelKind,
}

/// The routes of kernel routing table `table`, IPv4 and IPv6, one per
/// prefix (the lowest metric).
pub fn routes(table: u32) -> Result<Vec<KernelRoute>> {
    Ok(KernelTable::dump(table)?.bests())
}

/// A mirrored kernel routing table: every route, each prefix's routes by
/// metric, kept current by `RouteEvent`s between dumps.
///
/// Held compactly, for a full table is a million prefixes: a prefix's one
/// route (most have one) sits in its map entry, not behind an allocation
/// of its own, without the prefix again (50 bytes); the map is ordered,
/// built whole after a dump (its nodes full, where a hash map holds twice
/// its entries' room); and the sets of paths routes go through, a few for
/// a million routes, are each held once, routes sharing them (`paths`).
#[derive(Debug, Default)]
pub struct KernelTable {
    routes: std::collections::BTreeMap<Prefix, Routes>,
    paths: std::collections::HashSet<std::sync::Arc<[Path]>, foldhash::fast::RandomState>,
}

/// One route of a prefix, as `KernelTable` holds it.
#[derive(Debug, Clone)]
struct Held {
    priority: u32,
    kind: KernelKind,
}

/// A prefix's routes: one, or several (of different metrics).
#[derive(Debug)]
enum Routes {
    One(Held),
    Many(Vec<Held>),
}

// A map entry of a full table's million: the prefix, and its one route.
const _: () = assert!(std::mem::size_of::<Prefix>() + std::mem::size_of::<Routes>() == 50);

impl Routes {
    fn as_slice(&self) -> &[Held] {
        match self {
            Routes::One(h) => std::slice::from_ref(h),
            Routes::Many(v) => v,
        }
    }
}

/// A route notification of the mirrored table.
#[derive(Debug, Clone)]
pub struct RouteEvent {
    /// RTM_DELROUTE (else RTM_NEWROUTE).
    pub deleted: bool,
    /// NLM_F_APPEND: next hops added to an existing route (IPv6).
    pub append: bool,
    pub route: KernelRoute,
}

/// The event a route notification (its netlink header's flags, and its
/// message) is, if it is one of table `table`'s.
pub fn route_event(flags: u16, message: &RouteNetlinkMessage, table: u32) -> Option<RouteEvent> {
    let (deleted, m) = match message {
        RouteNetlinkMessage::NewRoute(m) => (false, m),
        RouteNetlinkMessage::DelRoute(m) => (true, m),
        _ => return None,
    };
    Some(RouteEvent {
        deleted,
        append: flags & netlink_packet_core::NLM_F_APPEND != 0,
        route: route_of(m, table)?,
    })
}

impl KernelTable {
    /// Table `table` read whole.
    pub fn dump(table: u32) -> Result<KernelTable> {
        let mut out = KernelTable::default();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut request = RouteMessage::default();
            request.header.address_family = family;
            let dumped = netlink::dump(RouteNetlinkMessage::GetRoute(request))
                .context("reading the kernel's routes (rtnetlink)")?;
            for message in dumped {
                let RouteNetlinkMessage::NewRoute(m) = message else {
                    continue;
                };
                if let Some(route) = route_of(&m, table) {
                    out.add(route, false);
                }
            }
        }
        // Built again whole, from the entries in order: its nodes full,
        // where inserts one by one leave them a third empty.
        out.routes = std::mem::take(&mut out.routes).into_iter().collect();
        Ok(out)
    }

    /// The route the kernel uses for `prefix`: its lowest metric.
    pub fn best(&self, prefix: &Prefix) -> Option<KernelRoute> {
        let held = self
            .routes
            .get(prefix)?
            .as_slice()
            .iter()
            .min_by_key(|r| r.priority)?;
        Some(KernelRoute {
            prefix: *prefix,
            priority: held.priority,
            kind: held.kind.clone(),
        })
    }

    /// Each prefix's route the kernel uses.
    pub fn bests(&self) -> Vec<KernelRoute> {
        let mut out = Vec::with_capacity(self.routes.len());
        out.extend(self.routes.keys().filter_map(|p| self.best(p)));
        out
    }

    /// The prefixes with a route through interface `ifindex` (any of its
    /// paths, any metric), in order: a walk of the copy, no kernel read.
    pub fn prefixes_through(&self, ifindex: u32) -> Vec<Prefix> {
        let through = |h: &Held| match &h.kind {
            KernelKind::Via(paths) => paths.iter().any(|p| p.ifindex == ifindex),
            KernelKind::Direct(i) => *i == ifindex,
            KernelKind::Kernel(_) => false,
        };
        self.routes
            .iter()
            .filter(|(_, r)| r.as_slice().iter().any(through))
            .map(|(p, _)| *p)
            .collect()
    }

    /// Prefixes routed.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Applies one notification; returns the prefix it changed.
    pub fn apply(&mut self, event: &RouteEvent) -> Prefix {
        if event.deleted {
            self.remove(&event.route);
        } else {
            self.add(event.route.clone(), event.append);
        }
        event.route.prefix
    }

    /// `kind` with its paths the table's own copy of them (made if new).
    fn shared(&mut self, kind: KernelKind) -> KernelKind {
        match kind {
            KernelKind::Via(paths) => KernelKind::Via(match self.paths.get(&*paths) {
                Some(have) => have.clone(),
                None => {
                    self.paths.insert(paths.clone());
                    paths
                }
            }),
            other => other,
        }
    }

    /// Lets go of `kind`'s paths: the table's copy goes with the last
    /// route through them.
    fn release(&mut self, kind: KernelKind) {
        if let KernelKind::Via(paths) = kind
            && std::sync::Arc::strong_count(&paths) == 2
        {
            self.paths.remove(&*paths);
        }
    }

    /// A route added (or replacing the one of its metric); with `append`,
    /// its paths join those of the route of its metric.
    fn add(&mut self, route: KernelRoute, append: bool) {
        let mut kind = route.kind;
        let have = self.routes.get(&route.prefix).and_then(|r| {
            r.as_slice()
                .iter()
                .find(|h| h.priority == route.priority)
                .map(|h| h.kind.clone())
        });
        if let (Some(KernelKind::Via(paths)), KernelKind::Via(more)) = (&have, &kind)
            && append
        {
            let mut joined = paths.to_vec();
            for path in more.iter() {
                if !joined.contains(path) {
                    joined.push(*path);
                }
            }
            kind = KernelKind::Via(joined.into());
        }
        let held = Held {
            priority: route.priority,
            kind: self.shared(kind),
        };
        let replaced = match self.routes.get_mut(&route.prefix) {
            None => {
                self.routes.insert(route.prefix, Routes::One(held));
                None
            }
            Some(routes) => {
                let slot = match routes {
                    Routes::One(h) => Some(h).filter(|h| h.priority == held.priority),
                    Routes::Many(v) => v.iter_mut().find(|h| h.priority == held.priority),
                };
                match slot {
                    Some(slot) => Some(std::mem::replace(slot, held).kind),
                    None => {
                        let mut all = Vec::with_capacity(routes.as_slice().len() + 1);
                        all.extend_from_slice(routes.as_slice());
                        all.push(held);
                        *routes = Routes::Many(all);
                        None
                    }
                }
            }
        };
        drop(have);
        if let Some(old) = replaced {
            self.release(old);
        }
    }

    /// A route deleted: the paths it lists leave the route of its metric
    /// (IPv6 deletes one next hop of a multipath route that way), which goes
    /// when none is left; a route without paths goes whole.
    fn remove(&mut self, route: &KernelRoute) {
        let Some(routes) = self.routes.get(&route.prefix) else {
            return;
        };
        let Some(at) = routes
            .as_slice()
            .iter()
            .position(|r| r.priority == route.priority)
        else {
            return;
        };
        let mut all = routes.as_slice().to_vec();
        let old = all[at].kind.clone();
        let left: Option<KernelKind> = match (&old, &route.kind) {
            (KernelKind::Via(paths), KernelKind::Via(gone)) => {
                let left: Vec<Path> = paths
                    .iter()
                    .filter(|p| {
                        !gone
                            .iter()
                            .any(|g| g.gateway == p.gateway && g.ifindex == p.ifindex)
                    })
                    .copied()
                    .collect();
                (!left.is_empty()).then(|| KernelKind::Via(left.into()))
            }
            _ => None,
        };
        match left {
            Some(kind) => all[at].kind = self.shared(kind),
            None => {
                all.remove(at);
            }
        }
        match all.len() {
            0 => {
                self.routes.remove(&route.prefix);
            }
            1 => {
                let one = all.pop().expect("one");
                self.routes.insert(route.prefix, Routes::One(one));
            }
            _ => {
                all.shrink_to_fit();
                self.routes.insert(route.prefix, Routes::Many(all));
            }
        }
        // The entry's old copy is gone: the old paths' last holder may be
        // `old` now.
        self.release(old);
    }
}

/// The route a RTM_NEWROUTE (or RTM_DELROUTE) message describes, if it is
/// one of table `table`'s unicast-like routes (local, broadcast, multicast
/// and cloned routes are not).
pub fn route_of(m: &RouteMessage, table: u32) -> Option<KernelRoute> {
    let h = &m.header;
    let mut destination = None;
    let mut gateway = None;
    let mut oif = None;
    let mut priority = 0;
    let mut multipath = None;
    let mut unsupported = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => {
                destination = Some(IpAddr::V4(*a))
            }
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => {
                destination = Some(IpAddr::V6(*a))
            }
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some(IpAddr::V4(*a)),
            RouteAttribute::Gateway(RouteAddress::Inet6(a)) => gateway = Some(IpAddr::V6(*a)),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Priority(p) => priority = *p,
            RouteAttribute::MultiPath(hops) => multipath = Some(hops),
            RouteAttribute::NhId(_) => unsupported = Some("a next-hop object (nhid)"),
            RouteAttribute::Via(_) => unsupported = Some("a gateway of the other address family"),
            RouteAttribute::Encap(_) | RouteAttribute::EncapType(_) => {
                unsupported = Some("an encapsulation")
            }
            _ => {}
        }
    }
    if route_table(m) != table || h.flags.contains(RouteFlags::Cloned) {
        return None;
    }
    let kind = match h.kind {
        RouteType::Unicast => None,
        RouteType::BlackHole => Some("blackhole"),
        RouteType::Unreachable => Some("unreachable"),
        RouteType::Prohibit => Some("prohibit"),
        RouteType::Throw => Some("throw"),
        _ => return None,
    };
    let any = match h.address_family {
        AddressFamily::Inet => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    let prefix = Prefix::containing(destination.unwrap_or(any), h.destination_prefix_length)?;
    // Link-local routes (fe80::/64 on every interface): the program hands
    // link-local packets to the kernel before any route lookup.
    if matches!(prefix.addr, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80) {
        return None;
    }
    let kind = if let Some(why) = kind.or(unsupported) {
        KernelKind::Kernel(why)
    } else if h.source_prefix_length != 0 {
        KernelKind::Kernel("a source-specific route")
    } else if h.tos != 0 {
        KernelKind::Kernel("a TOS route")
    } else if let Some(hops) = multipath {
        let mut paths = Vec::new();
        for hop in hops {
            // The kernel does not use dead or link-down next hops either.
            if hop
                .flags
                .intersects(RouteNextHopFlags::Dead | RouteNextHopFlags::Linkdown)
            {
                continue;
            }
            let gateway = hop.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
                RouteAttribute::Gateway(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
                _ => None,
            });
            match gateway {
                Some(gateway) if gateway.is_ipv4() == prefix.addr.is_ipv4() => paths.push(Path {
                    gateway,
                    ifindex: hop.interface_index,
                    weight: u32::from(hop.hops) + 1,
                }),
                _ => {
                    paths.clear();
                    break;
                }
            }
        }
        if paths.is_empty() {
            KernelKind::Kernel(
                "a multipath route with a next hop that has no gateway of its family",
            )
        } else {
            KernelKind::Via(paths.into())
        }
    } else {
        match (gateway, oif) {
            (Some(gateway), Some(ifindex)) if gateway.is_ipv4() == prefix.addr.is_ipv4() => {
                KernelKind::Via(
                    [Path {
                        gateway,
                        ifindex,
                        weight: 1,
                    }]
                    .into(),
                )
            }
            (None, Some(ifindex)) => KernelKind::Direct(ifindex),
            _ => KernelKind::Kernel("no interface"),
        }
    };
    Some(KernelRoute {
        prefix,
        priority,
        kind,
    })
}

/// The routing table a route message is about (RTA_TABLE, for tables past
/// 255, over the header's byte).
pub fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

/// A kernel route to `prefix` through `paths` (gateway, ifindex), each of
/// weight 1: for the tests.
#[cfg(test)]
pub(crate) fn via_route(prefix: &str, priority: u32, paths: &[(&str, u32)]) -> KernelRoute {
    KernelRoute {
        prefix: prefix.parse().unwrap(),
        priority,
        kind: KernelKind::Via(
            paths
                .iter()
                .map(|(gw, ifindex)| Path {
                    gateway: gw.parse().unwrap(),
                    ifindex: *ifindex,
                    weight: 1,
                })
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::link::InfoKind;

    use super::*;

    fn neighbour(state: NeighbourState, mac: Option<u8>) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.ifindex = 3;
        m.header.state = state;
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                "10.0.0.2".parse().unwrap(),
            )));
        if let Some(last) = mac {
            m.attributes.push(NeighbourAttribute::LinkLayerAddress(vec![
                2, 0, 0, 0, 0, last,
            ]));
        }
        m
    }

    #[test]
    fn only_a_neighbour_whose_usable_mac_moved_is_news() {
        use NeighbourState::{Delay, Failed, Incomplete, Permanent, Probe, Reachable, Stale};
        let mut seen = NeighboursSeen::new();
        // (state, last byte of the MAC, deleted, news?), in order.
        let steps = [
            // First word of an entry: news, whatever it says.
            (Reachable, Some(1), false, true),
            // Its state changes, the MAC kept: nothing moved.
            (Stale, Some(1), false, false),
            (Delay, Some(1), false, false),
            (Probe, Some(1), false, false),
            (Reachable, Some(1), false, false),
            (Permanent, Some(1), false, false),
            // A new MAC; then none usable (FAILED keeps no usable address).
            (Reachable, Some(2), false, true),
            (Failed, Some(2), false, true),
            (Incomplete, None, false, false),
            (Reachable, Some(2), false, true),
            // Deleted: news while it had a MAC; deleted again (an entry
            // nothing is known of), news too.
            (Reachable, Some(2), true, true),
            (Reachable, Some(2), true, true),
        ];
        for (i, (state, mac, deleted, news)) in steps.into_iter().enumerate() {
            assert_eq!(
                neighbour_moved(&mut seen, &neighbour(state, mac), deleted),
                news,
                "step {i}"
            );
        }
        // An entry without an address: news.
        let mut bare = NeighbourMessage::default();
        bare.header.state = Reachable;
        assert!(neighbour_moved(&mut seen, &bare, false));
    }

    fn vlan_link(name: &str, ifindex: u32, parent: u32, id: u16, proto: VlanProtocol) -> Link {
        let mut m = LinkMessage::default();
        m.header.index = ifindex;
        m.header.link_layer_type = LinkLayerType::Ether;
        m.attributes = vec![
            LinkAttribute::IfName(name.into()),
            LinkAttribute::Mtu(1500),
            LinkAttribute::Address(vec![2, 0, 0, 0, 0, ifindex as u8]),
            LinkAttribute::Link(parent),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Vlan),
                LinkInfo::Data(InfoData::Vlan(vec![
                    InfoVlan::Id(id),
                    InfoVlan::Protocol(proto),
                ])),
            ]),
        ];
        link_of(&m)
    }

    fn event(deleted: bool, append: bool, priority: u32, paths: &[(&str, u32)]) -> RouteEvent {
        RouteEvent {
            deleted,
            append,
            route: via_route("2001:db8::/32", priority, paths),
        }
    }

    fn paths(t: &KernelTable) -> Option<(u32, usize)> {
        let best = t.best(&"2001:db8::/32".parse().unwrap())?;
        match &best.kind {
            KernelKind::Via(p) => Some((best.priority, p.len())),
            _ => None,
        }
    }

    #[test]
    fn route_notifications_keep_the_mirrored_table_as_the_kernel_has_it() {
        let mut t = KernelTable::default();
        t.apply(&event(
            false,
            false,
            1024,
            &[("fe80::1", 2), ("fe80::2", 3)],
        ));
        assert_eq!(paths(&t), Some((1024, 2)));
        // IPv6 appends a next hop, and deletes one, by notifying just it.
        t.apply(&event(false, true, 1024, &[("fe80::3", 4)]));
        assert_eq!(paths(&t), Some((1024, 3)));
        t.apply(&event(true, false, 1024, &[("fe80::2", 3)]));
        assert_eq!(paths(&t), Some((1024, 2)));
        // A lower metric wins while it is there; a replace is whole.
        t.apply(&event(false, false, 20, &[("fe80::9", 2)]));
        assert_eq!(paths(&t), Some((20, 1)));
        t.apply(&event(true, false, 20, &[("fe80::9", 2)]));
        assert_eq!(paths(&t), Some((1024, 2)));
        t.apply(&event(false, false, 1024, &[("fe80::5", 2)]));
        assert_eq!(paths(&t), Some((1024, 1)));
        // The same notification twice (a dump that already had it) is the
        // same table.
        t.apply(&event(false, false, 1024, &[("fe80::5", 2)]));
        assert_eq!(paths(&t), Some((1024, 1)));
        t.apply(&event(true, false, 1024, &[("fe80::5", 2)]));
        assert_eq!(paths(&t), None);
        assert!(t.is_empty());
    }

    /// Routes through the same paths share one copy of them, which goes
    /// with the last route through it; the table holds no copy of paths
    /// no route goes through, after replaces, appends and deletes.
    #[test]
    fn routes_share_their_paths_and_the_last_one_out_lets_them_go() {
        let mut t = KernelTable::default();
        let add = |t: &mut KernelTable, prefix: &str, priority, paths: &[(&str, u32)]| {
            t.apply(&RouteEvent {
                deleted: false,
                append: false,
                route: via_route(prefix, priority, paths),
            });
        };
        let ecmp = [("10.0.0.1", 2), ("10.0.0.2", 3)];
        for i in 0..100 {
            add(&mut t, &format!("10.1.{i}.0/24"), 0, &ecmp);
        }
        add(&mut t, "10.2.0.0/16", 0, &[("10.0.0.1", 2)]);
        assert_eq!((t.len(), t.paths.len()), (101, 2));
        let best = t.best(&"10.1.7.0/24".parse().unwrap()).unwrap();
        let KernelKind::Via(shared) = &best.kind else {
            panic!("{best:?}")
        };
        // The table's copy, the 100 routes' and this one.
        assert_eq!(std::sync::Arc::strong_count(shared), 102);
        drop(best);
        // A second metric for a prefix, through the single path; another
        // prefix's route replaced by one through paths of its own.
        add(&mut t, "10.1.0.0/24", 10, &[("10.0.0.1", 2)]);
        add(&mut t, "10.1.1.0/24", 0, &[("10.0.0.9", 5)]);
        assert_eq!(t.paths.len(), 3);
        // Deletes naming `ecmp`'s paths: every route through them goes;
        // 10.1.1.0/24's, through none of them, stays.
        for i in 0..100 {
            t.apply(&RouteEvent {
                deleted: true,
                append: false,
                route: via_route(&format!("10.1.{i}.0/24"), 0, &ecmp),
            });
        }
        assert_eq!((t.len(), t.paths.len()), (3, 2), "{t:?}");
        for (prefix, priority, gateway) in [
            ("10.1.0.0/24", 10, ("10.0.0.1", 2)),
            ("10.1.1.0/24", 0, ("10.0.0.9", 5)),
            ("10.2.0.0/16", 0, ("10.0.0.1", 2)),
        ] {
            t.apply(&RouteEvent {
                deleted: true,
                append: false,
                route: via_route(prefix, priority, &[gateway]),
            });
        }
        assert!(t.is_empty() && t.paths.is_empty(), "{t:?}");
    }

    /// The prefixes planned again when an interface is attached to again:
    /// every one with a route through it, by any path and any metric, and
    /// none other.
    #[test]
    fn the_prefixes_through_an_interface_are_every_one_with_a_path_on_it() {
        let mut t = KernelTable::default();
        let mut add = |route: KernelRoute| {
            t.apply(&RouteEvent {
                deleted: false,
                append: false,
                route,
            });
        };
        add(via_route("10.1.0.0/24", 0, &[("10.0.0.1", 2)]));
        add(via_route(
            "10.2.0.0/24",
            0,
            &[("10.0.0.1", 2), ("10.0.1.1", 3)],
        ));
        add(via_route("10.3.0.0/24", 0, &[("10.0.1.1", 3)]));
        // Through 3 at its best metric, through 2 at a worse one.
        add(via_route("10.3.0.0/24", 20, &[("10.0.0.1", 2)]));
        add(via_route("10.4.0.0/24", 0, &[("10.0.1.1", 3)]));
        add(KernelRoute {
            prefix: "10.0.0.0/24".parse().unwrap(),
            priority: 0,
            kind: KernelKind::Direct(2),
        });
        add(KernelRoute {
            prefix: "10.5.0.0/24".parse().unwrap(),
            priority: 0,
            kind: KernelKind::Kernel("a blackhole"),
        });
        let prefixes =
            |v: &[&str]| -> Vec<Prefix> { v.iter().map(|p| p.parse().unwrap()).collect() };
        assert_eq!(
            t.prefixes_through(2),
            prefixes(&["10.0.0.0/24", "10.1.0.0/24", "10.2.0.0/24", "10.3.0.0/24"])
        );
        assert_eq!(
            t.prefixes_through(3),
            prefixes(&["10.2.0.0/24", "10.3.0.0/24", "10.4.0.0/24"])
        );
        assert!(t.prefixes_through(4).is_empty());
    }

    /// The subnets planned again at an address change: those that came,
    /// went, or are on another interface now; not those that stayed, nor
    /// an interface's order among the others.
    #[test]
    fn subnets_moved_are_those_come_gone_or_on_another_interface() {
        let view = |links: &[(u32, &[&str])]| {
            let links: Vec<Link> = links
                .iter()
                .map(|(ifindex, subnets)| Link {
                    ifindex: *ifindex,
                    name: format!("eth{ifindex}"),
                    mtu: 1500,
                    mac: None,
                    addrs: Vec::new(),
                    subnets: subnets.iter().map(|p| p.parse().unwrap()).collect(),
                    broadcasts: Vec::new(),
                    xdp_attached: false,
                    xdp_mode: None,
                    vlan: None,
                })
                .collect();
            SubnetView::of(&links)
        };
        let before = view(&[(2, &["10.0.1.0/24", "fd00:1::/64"]), (3, &["10.0.2.0/24"])]);
        // The same, listed in another order.
        let same = view(&[(3, &["10.0.2.0/24"]), (2, &["fd00:1::/64", "10.0.1.0/24"])]);
        assert!(before.moved(&same).is_empty());
        // 10.0.1.0/24 now on 4 (its interface made again), 10.0.2.0/24
        // gone, 10.0.3.0/24 new; fd00:1::/64 stays.
        let after = view(&[
            (2, &["fd00:1::/64"]),
            (3, &["10.0.3.0/24"]),
            (4, &["10.0.1.0/24"]),
        ]);
        let moved: Vec<String> = before.moved(&after).iter().map(|p| p.to_string()).collect();
        assert_eq!(moved, ["10.0.1.0/24", "10.0.2.0/24", "10.0.3.0/24"]);
        assert_eq!(after.moved(&before), before.moved(&after));
    }

    #[test]
    fn vlan_subinterfaces_are_read_and_keyed_on_their_attached_device() {
        let mut eth = LinkMessage::default();
        eth.header.index = 2;
        eth.header.link_layer_type = LinkLayerType::Ether;
        eth.attributes = vec![LinkAttribute::IfName("eth1".into())];
        let links = [
            link_of(&eth),
            vlan_link("eth1.100", 3, 2, 100, VlanProtocol::Ieee8021Q),
            vlan_link("eth1.200", 4, 2, 200, VlanProtocol::Ieee8021Ad),
            vlan_link("eth1.200.300", 5, 4, 300, VlanProtocol::Ieee8021Q),
            // On a device without the program.
            vlan_link("eth9.7", 6, 9, 7, VlanProtocol::Ieee8021Q),
        ];
        assert_eq!(links[0].vlan, None);
        assert_eq!(
            links[1].vlan,
            Some(Vlan {
                id: 100,
                proto: 0x8100,
                parent: 2
            })
        );
        assert_eq!(links[2].vlan.map(|v| v.proto), Some(0x88a8));
        assert_eq!(links[1].tx_ifindex(), 2);
        let key = |ifindex, outer, inner| pop_forwarder_common::VlanKey {
            ifindex,
            outer,
            inner,
        };
        assert_eq!(
            vlan_keys(&links, &[2]),
            vec![key(2, 100, 0), key(2, 200, 0), key(2, 200, 300)]
        );
        assert_eq!(forwarding(&links, &[2]), vec![2, 3, 4]);
    }
}
