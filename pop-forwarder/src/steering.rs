//! VIP steering, host side: cache nodes resolved against the namespace,
//! one Maglev table per VIP, all written into the program's maps.

use std::{
    collections::VecDeque,
    net::{IpAddr, Ipv6Addr},
};

use anyhow::{Context as _, Result, bail};
use pop_forwarder_common::{
    maglev::{self, PoolNode},
    steering::{
        CacheNode, ENCAP_SOURCE_V4, ENCAP_SOURCE_V6, MAX_CACHE_NODES, MAX_VIPS, NODE_F_IN_USE,
        NODE_F_IPIP, NODE_F_MAC_VALID, VipKey,
    },
};
use serde::{Deserialize, Serialize};

use crate::{
    config::{Delivery, Model, Node, Vip},
    kernel::{self, Link, Neighbour},
    maps::Tables,
    net::Mac,
};

/// A node's stable identity for Maglev: a hash of its name (FNV-1a, then
/// mixed), the same wherever and in whatever order it is configured.
pub fn node_key(name: &str) -> u64 {
    let fnv = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    maglev::mix64(fnv)
}

pub fn vip_key(vip: &Vip) -> VipKey {
    VipKey {
        addr: widen(vip.address),
        port: vip.port,
        protocol: vip.protocol.number(),
        family: family(vip.address),
    }
}

pub fn widen(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => {
            let mut w = [0u8; 16];
            w[..4].copy_from_slice(&a.octets());
            w
        }
        IpAddr::V6(a) => a.octets(),
    }
}

pub fn family(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 4 } else { 6 }
}

/// The node as the program needs it: egress index and MACs, the
/// destination MAC from the config or the neighbour table.
pub fn resolve_node(node: &Node, links: &[Link], neighbours: &[Neighbour]) -> Result<CacheNode> {
    if node.delivery == Delivery::Ipip {
        // Reached by routing to its address: nothing to resolve here.
        let free: CacheNode = bytemuck::Zeroable::zeroed();
        return Ok(CacheNode {
            flags: NODE_F_IN_USE | NODE_F_IPIP,
            addr: widen(node.address),
            family: u32::from(family(node.address)),
            ..free
        });
    }
    let link = kernel::link(links, &node.dev).context("dev")?;
    if let Some(vlan) = link.vlan {
        bail!(
            "dev: {:?} is a VLAN subinterface (VLAN {}); direct server return over a VLAN is not supported yet: reach the node untagged, or by IP-in-IP",
            node.dev,
            vlan.id
        );
    }
    let src_mac = link
        .mac
        .with_context(|| format!("dev: interface {:?} has no Ethernet address", node.dev))?;
    let mut resolved = CacheNode {
        ifindex: link.ifindex,
        flags: NODE_F_IN_USE,
        dst_mac: [0; 6],
        src_mac: src_mac.0,
        addr: widen(node.address),
        family: u32::from(family(node.address)),
        mtu: link.mtu,
    };
    let learned = neighbours
        .iter()
        .find(|n| n.addr == node.address && n.ifname == node.dev)
        .map(|n| n.mac);
    if let Some(mac) = node.mac.or(learned) {
        resolved.dst_mac = mac.0;
        resolved.flags |= NODE_F_MAC_VALID;
    }
    Ok(resolved)
}

/// DSR nodes whose MAC nobody knows yet: (address, dev).
pub type Unresolved = Vec<(IpAddr, String)>;

/// The steering part of a config: what `Steering::apply` makes the
/// tables hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub flow_hash_seed: u32,
    pub maglev_table_size: u32,
    pub encap_source_v4: Option<crate::config::SourcePool>,
    pub encap_source_v6: Option<Ipv6Addr>,
    pub nodes: Vec<Node>,
    pub vips: Vec<Vip>,
}

/// A node's largest weight (share of new flows); 0 drains it.
pub const MAX_WEIGHT: u32 = 1000;

impl Spec {
    /// The rules of a whole steering state: one check for the config file,
    /// a reload, and every control command (which each build the state they
    /// want, then apply it), before anything is resolved or written. Field
    /// names are the config's.
    pub fn check(&self) -> Result<()> {
        let size = self.maglev_table_size;
        if !(7..=maglev::DEFAULT_TABLE_SIZE).contains(&size) || !maglev::is_prime(size) {
            bail!(
                "maglev_table_size: {size} is not a prime from 7 to {}",
                maglev::DEFAULT_TABLE_SIZE
            );
        }
        if self.nodes.len() > MAX_CACHE_NODES as usize {
            bail!(
                "nodes: {} cache nodes; at most {MAX_CACHE_NODES}",
                self.nodes.len()
            );
        }
        if self.vips.len() > MAX_VIPS as usize {
            bail!("vips: {} VIPs; at most {MAX_VIPS}", self.vips.len());
        }
        let mut names = std::collections::HashMap::new();
        for node in &self.nodes {
            if names.insert(node.name.as_str(), node).is_some() {
                bail!("nodes: {:?} is listed twice", node.name);
            }
            if node.weight > MAX_WEIGHT {
                bail!(
                    "nodes ({}): weight: {} is not from 0 (drained) to {MAX_WEIGHT}",
                    node.name,
                    node.weight
                );
            }
            let (source, field) = match node.address {
                IpAddr::V4(_) => (self.encap_source_v4.is_some(), "encap_source_v4"),
                IpAddr::V6(_) => (self.encap_source_v6.is_some(), "encap_source_v6"),
            };
            if node.delivery == Delivery::Ipip && !source {
                bail!(
                    "nodes ({}): an ipip node at {} needs {field}, the outer source address, in the config",
                    node.name,
                    node.address
                );
            }
        }
        let mut services = std::collections::HashSet::new();
        for vip in &self.vips {
            if !services.insert((vip.address, vip.protocol, vip.port)) {
                bail!("vips: {vip} is listed twice");
            }
            for name in &vip.nodes {
                let Some(node) = names.get(name.as_str()) else {
                    bail!("vips ({vip}): nodes: no node is named {name:?}");
                };
                if node.delivery == Delivery::Ipip
                    && vip.address.is_ipv6()
                    && node.address.is_ipv4()
                {
                    bail!(
                        "vips ({vip}): nodes: {name:?} is an IPv4 ipip node, and IPv6 in IPv4 is not offered; an IPv6 VIP's ipip nodes need IPv6 addresses"
                    );
                }
            }
        }
        Ok(())
    }

    pub fn of(model: &Model) -> Spec {
        Spec {
            flow_hash_seed: model.flow_hash_seed,
            maglev_table_size: model.maglev_table_size,
            encap_source_v4: model.encap_source_v4,
            encap_source_v6: model.encap_source_v6,
            nodes: model.nodes.clone(),
            vips: model.vips.clone(),
        }
    }
}

/// A node in its slot of the node table.
#[derive(Debug, Clone)]
pub struct NodeSlot {
    pub node: Node,
    /// False while its health check fails: out of the node table and of
    /// every Maglev table.
    pub healthy: bool,
    /// How often it went down or came back.
    pub health_changes: u64,
}

/// A VIP in its slot, with the Maglev table the slot holds.
#[derive(Debug, Clone)]
struct VipSlot {
    vip: Vip,
    table: Vec<u32>,
}

/// What an `apply` changed, and the health checks to start or stop.
#[derive(Debug, Default)]
pub struct Applied {
    pub nodes_added: usize,
    pub nodes_changed: usize,
    pub nodes_removed: usize,
    pub vips_added: usize,
    pub vips_changed: usize,
    pub vips_removed: usize,
    /// Nodes whose health check must (re)start: new, or checked differently.
    pub check: Vec<String>,
    /// Nodes whose health check must stop: gone, or no longer checked.
    pub uncheck: Vec<String>,
}

impl std::fmt::Display for Applied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cache nodes {} added, {} changed, {} removed; VIPs {} added, {} changed, {} removed",
            self.nodes_added,
            self.nodes_changed,
            self.nodes_removed,
            self.vips_added,
            self.vips_changed,
            self.vips_removed
        )
    }
}

/// The steering tables as the daemon keeps them: nodes and VIPs in stable
/// slots (a node's slot is its id in the program's node table and
/// connection table; a VIP's slot picks its Maglev table).
#[derive(Debug, Default, Clone)]
pub struct Steering {
    spec: Option<Spec>,
    nodes: Vec<Option<NodeSlot>>,
    vips: Vec<Option<VipSlot>>,
    /// Node slots given up, oldest first. Fresh slots are used before any
    /// of these, so an idle flow still remembered for a removed node is
    /// unlikely to meet a new node in its slot.
    freed: VecDeque<u32>,
    /// What the adopted maps hold that the state file does not name: the
    /// next `apply` takes it out.
    orphans: Orphans,
}

/// VIPs and in-use node slots found in adopted maps and not in the state
/// file: written by a daemon that died between a change's last map write
/// and its state file's. Nothing names them, so nothing would take them
/// out, and a VIP or node given their slot later would inherit their
/// traffic.
///
/// And the other way round, a change that took a node or VIP out of the
/// maps before the file recorded it: a healthy node whose slot is free
/// (`unwritten`) is written again, a VIP the VIP table lacks has its
/// Maglev table read as empty, so that the next `apply` writes both whole
/// if they are still wanted.
#[derive(Debug, Default, Clone)]
struct Orphans {
    vips: Vec<VipKey>,
    nodes: Vec<u32>,
    unwritten: Vec<u32>,
}

impl Steering {
    /// The steering tables a previous daemon left, as its state file
    /// records them (names, slots, health) and the maps hold them (the
    /// Maglev tables are read back, so the next `apply` writes exactly what
    /// differs from what the program sees).
    pub fn adopt(tables: &Tables, state: &SteeringState) -> Result<Steering> {
        let mut steering = Steering::default();
        for n in &state.nodes {
            if n.slot >= MAX_CACHE_NODES {
                bail!(
                    "the state file puts node {:?} in slot {}, past the node table",
                    n.name,
                    n.slot
                );
            }
            let slot = n.slot as usize;
            if steering.nodes.len() <= slot {
                steering.nodes.resize(slot + 1, None);
            }
            let mac = n
                .mac
                .as_deref()
                .map(str::parse::<Mac>)
                .transpose()
                .with_context(|| format!("the state file's MAC of node {:?}", n.name))?;
            steering.nodes[slot] = Some(NodeSlot {
                node: Node {
                    name: n.name.clone(),
                    address: n.address,
                    dev: n.dev.clone(),
                    mac,
                    weight: n.weight,
                    health: n.health.clone(),
                    delivery: n.delivery,
                },
                healthy: n.healthy,
                health_changes: n.health_changes,
            });
        }
        for id in 0..MAX_CACHE_NODES {
            let in_use = tables.node(id)?.flags & NODE_F_IN_USE != 0;
            match steering.nodes.get(id as usize).and_then(Option::as_ref) {
                None if in_use => steering.orphans.nodes.push(id),
                Some(n) if n.healthy && !in_use => steering.orphans.unwritten.push(id),
                _ => {}
            }
        }
        // Fresh slots come after the orphans', which join the freed ones
        // once `apply` has taken them out.
        if let Some(&last) = steering.orphans.nodes.last()
            && steering.nodes.len() <= last as usize
        {
            steering.nodes.resize(last as usize + 1, None);
        }
        steering.freed = (0..steering.nodes.len() as u32)
            .filter(|&s| {
                steering.nodes[s as usize].is_none() && !steering.orphans.nodes.contains(&s)
            })
            .collect();
        for v in &state.vips {
            if v.slot >= MAX_VIPS {
                bail!(
                    "the state file puts a VIP in slot {}, past the VIP table",
                    v.slot
                );
            }
            let slot = v.slot as usize;
            if steering.vips.len() <= slot {
                steering.vips.resize(slot + 1, None);
            }
            steering.vips[slot] = Some(VipSlot {
                vip: Vip {
                    address: v.address,
                    protocol: v.protocol,
                    port: v.port,
                    nodes: v.nodes.clone(),
                },
                table: tables.maglev_table(v.slot, state.maglev_table_size)?,
            });
        }
        let pinned = tables.vips()?;
        for (key, info) in &pinned {
            let named = steering
                .vips
                .get(info.index as usize)
                .and_then(Option::as_ref)
                .is_some_and(|v| vip_key(&v.vip) == *key);
            if !named {
                steering.orphans.vips.push(*key);
            }
        }
        let mut unpinned = 0;
        for (slot, v) in steering.vips.iter_mut().enumerate() {
            if let Some(v) = v
                && !pinned
                    .iter()
                    .any(|(key, info)| info.index as usize == slot && *key == vip_key(&v.vip))
            {
                v.table.clear();
                unpinned += 1;
            }
        }
        let o = &steering.orphans;
        if !o.vips.is_empty() || !o.nodes.is_empty() {
            log::warn!(
                "the pinned tables hold {} VIPs and {} cache node slots the state file does not name (a daemon stopped between a change and recording it); they are taken out",
                o.vips.len(),
                o.nodes.len()
            );
        }
        if unpinned > 0 || !o.unwritten.is_empty() {
            log::warn!(
                "the state file names {unpinned} VIPs and {} healthy cache nodes the pinned tables lack (a daemon stopped between a change and recording it); those still configured are written again",
                o.unwritten.len()
            );
        }
        steering.spec = Some(Spec {
            flow_hash_seed: state.flow_hash_seed,
            maglev_table_size: state.maglev_table_size,
            encap_source_v4: None,
            encap_source_v6: None,
            nodes: steering
                .nodes
                .iter()
                .flatten()
                .map(|n| n.node.clone())
                .collect(),
            vips: steering
                .vips
                .iter()
                .flatten()
                .map(|v| v.vip.clone())
                .collect(),
        });
        Ok(steering)
    }

    /// Every live node with its slot.
    pub fn nodes(&self) -> impl Iterator<Item = (u32, &NodeSlot)> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.as_ref().map(|n| (i as u32, n)))
    }

    /// The spec last applied.
    pub fn spec(&self) -> Spec {
        self.spec.clone().unwrap_or(Spec {
            flow_hash_seed: 0,
            maglev_table_size: maglev::DEFAULT_TABLE_SIZE,
            encap_source_v4: None,
            encap_source_v6: None,
            nodes: Vec::new(),
            vips: Vec::new(),
        })
    }

    /// Addresses of the VIPs that can take a new flow: a VIP whose pool
    /// has a healthy node of weight above 0. These are what this forwarder
    /// announces; an address with several services (ports, protocols) is
    /// announced while any of them can be served.
    pub fn servable_addresses(&self) -> std::collections::BTreeSet<std::net::IpAddr> {
        self.vips
            .iter()
            .flatten()
            .filter(|v| {
                v.vip.nodes.iter().any(|name| {
                    self.node(name)
                        .is_some_and(|(_, n)| n.healthy && n.node.weight > 0)
                })
            })
            .map(|v| v.vip.address)
            .collect()
    }

    /// The live node called `name`, with its slot.
    pub fn node(&self, name: &str) -> Option<(u32, &NodeSlot)> {
        self.nodes.iter().enumerate().find_map(|(i, n)| {
            n.as_ref()
                .filter(|n| n.node.name == name)
                .map(|n| (i as u32, n))
        })
    }

    /// Makes the tables hold `spec`, changing only what differs: nodes are
    /// matched by name and keep their slots (and so their flows), VIPs by
    /// address, protocol and port. Everything that can fail is checked
    /// before the first write. Order: new nodes, then the VIP tables that
    /// use them, then VIPs that went, then nodes that went (no table points
    /// at them any more; their remembered flows go back to Maglev).
    pub fn apply(
        &mut self,
        tables: &mut Tables,
        spec: &Spec,
        links: &[Link],
        neighbours: &[Neighbour],
    ) -> Result<Applied> {
        spec.check()?;
        let size = spec.maglev_table_size;
        let resolved = spec
            .nodes
            .iter()
            .map(|node| {
                resolve_node(node, links, neighbours)
                    .with_context(|| format!("cache node {}", node.name))
            })
            .collect::<Result<Vec<_>>>()?;
        let added: Vec<usize> = (0..spec.nodes.len())
            .filter(|&i| self.node(&spec.nodes[i].name).is_none())
            .collect();
        let free = self.free_node_slots();
        if added.len() > free {
            bail!(
                "{} new cache nodes but {free} free slots of {MAX_CACHE_NODES} (removed nodes free theirs only after the new ones are in); apply the change in two steps",
                added.len()
            );
        }
        let mut applied = Applied::default();

        // VIPs nothing names go first (their traffic is routed from now),
        // so that their slots are free for this change's.
        for key in &self.orphans.vips {
            tables.remove_vip(key)?;
            applied.vips_removed += 1;
        }

        // Nodes: new ones into free slots, changed ones in place.
        // IPv4: the pool's base address, its prefix length in byte 4.
        let encap = [
            (
                ENCAP_SOURCE_V4,
                spec.encap_source_v4.map(|pool| {
                    let mut w = widen(IpAddr::from(pool.base));
                    w[4] = pool.len;
                    w
                }),
            ),
            (
                ENCAP_SOURCE_V6,
                spec.encap_source_v6.map(|a| widen(IpAddr::from(a))),
            ),
        ];
        for (slot, source) in encap {
            if let Some(source) = source {
                tables.set_encap_source(slot, source)?;
            }
        }
        for (node, want) in spec.nodes.iter().zip(&resolved) {
            match self.node(&node.name).map(|(slot, n)| (slot, n.clone())) {
                None => {
                    let slot = self.allocate_node_slot();
                    tables.write_node(slot, want)?;
                    self.nodes[slot as usize] = Some(NodeSlot {
                        node: node.clone(),
                        healthy: true,
                        health_changes: 0,
                    });
                    applied.nodes_added += 1;
                    if node.health.is_some() {
                        applied.check.push(node.name.clone());
                    }
                }
                Some((slot, old)) if old.node != *node => {
                    let mut now = old.clone();
                    now.node = node.clone();
                    // A node checked differently (or elsewhere) starts over.
                    if old.node.health != node.health || old.node.address != node.address {
                        now.healthy = true;
                        if node.health.is_some() {
                            applied.check.push(node.name.clone());
                        } else if old.node.health.is_some() {
                            applied.uncheck.push(node.name.clone());
                        }
                    }
                    if now.healthy {
                        tables.write_node(slot, want)?;
                    }
                    self.nodes[slot as usize] = Some(now);
                    applied.nodes_changed += 1;
                }
                Some((slot, _)) if self.orphans.unwritten.contains(&slot) => {
                    tables.write_node(slot, want)?;
                    applied.nodes_changed += 1;
                }
                Some(_) => {}
            }
        }

        // VIPs: tables rebuilt from the pools as they are now.
        let on = !spec.vips.is_empty();
        tables.set_steering(
            spec.flow_hash_seed,
            self.vips.iter().any(Option::is_some) || on,
        )?;
        self.spec = Some(spec.clone());
        for vip in &spec.vips {
            let table = self.maglev_table(vip, size);
            let existing = self
                .vips
                .iter()
                .position(|v| v.as_ref().is_some_and(|v| v.vip.same_service(vip)));
            match existing {
                Some(slot) => {
                    let old = self.vips[slot].take().expect("live slot");
                    if old.table != table {
                        tables.update_vip(slot as u32, &vip_key(vip), &old.table, &table)?;
                    }
                    if old.table != table || old.vip != *vip {
                        applied.vips_changed += 1;
                    }
                    self.vips[slot] = Some(VipSlot {
                        vip: vip.clone(),
                        table,
                    });
                }
                None => {
                    let slot = match self.vips.iter().position(Option::is_none) {
                        Some(slot) => slot,
                        None => {
                            self.vips.push(None);
                            self.vips.len() - 1
                        }
                    };
                    tables
                        .write_vip(slot as u32, &vip_key(vip), &table)
                        .with_context(|| format!("VIP {vip}"))?;
                    self.vips[slot] = Some(VipSlot {
                        vip: vip.clone(),
                        table,
                    });
                    applied.vips_added += 1;
                }
            }
        }
        for slot in &mut self.vips {
            if slot
                .as_ref()
                .is_some_and(|v| !spec.vips.iter().any(|w| w.same_service(&v.vip)))
            {
                let gone = slot.take().expect("live slot");
                tables.remove_vip(&vip_key(&gone.vip))?;
                applied.vips_removed += 1;
            }
        }
        tables.set_steering(spec.flow_hash_seed, on)?;

        // Nodes that went: nothing points at them now.
        for slot in 0..self.nodes.len() {
            let gone = self.nodes[slot]
                .as_ref()
                .is_some_and(|n| !spec.nodes.iter().any(|m| m.name == n.node.name));
            if gone {
                let old = self.nodes[slot].clone().expect("live slot");
                tables.remove_node(slot as u32)?;
                self.release_node_slot(slot as u32);
                applied.nodes_removed += 1;
                if old.node.health.is_some() {
                    applied.uncheck.push(old.node.name);
                }
            }
        }
        // And the node slots nothing names: no VIP table points at them
        // now either.
        for slot in std::mem::take(&mut self.orphans.nodes) {
            tables.remove_node(slot)?;
            self.release_node_slot(slot);
            applied.nodes_removed += 1;
        }
        self.orphans = Orphans::default();
        Ok(applied)
    }

    /// Records a health change of `name`: a failed node leaves the node
    /// table (its flows move) and every Maglev table; a recovered one comes
    /// back. Returns how many VIP tables changed.
    pub fn set_health(
        &mut self,
        tables: &mut Tables,
        name: &str,
        healthy: bool,
        links: &[Link],
        neighbours: &[Neighbour],
    ) -> Result<usize> {
        let (slot, _) = self
            .node(name)
            .with_context(|| format!("no cache node is named {name:?}"))?;
        let entry = self.nodes[slot as usize].as_mut().expect("live slot");
        entry.healthy = healthy;
        entry.health_changes += 1;
        let node = entry.node.clone();
        if healthy {
            // A node whose interface went meanwhile is written by a later
            // refresh, once it resolves; until then it takes no packets.
            if let Ok(resolved) = resolve_node(&node, links, neighbours) {
                tables.write_node(slot, &resolved)?;
            }
            self.rebuild_vips(tables)
        } else {
            // Tables first, so no new flow is given to the node once it is
            // out of the node table.
            let rebuilt = self.rebuild_vips(tables)?;
            tables.remove_node(slot)?;
            Ok(rebuilt)
        }
    }

    /// Takes over the health a previous daemon recorded (`was`, its state
    /// file) for the nodes checked as they were then (same address, same
    /// check): a migration fills new tables with every node up, and a node
    /// that was failing would otherwise take new flows until its check
    /// failed `fall` times again. Failing ones leave the node table and
    /// every Maglev table; each keeps its count of health changes. Returns
    /// how many were failing.
    pub fn carry_health(&mut self, tables: &mut Tables, was: &[NodeState]) -> Result<usize> {
        let mut down = Vec::new();
        for old in was {
            let Some((slot, _)) = self.node(&old.name) else {
                continue;
            };
            let entry = self.nodes[slot as usize].as_mut().expect("live slot");
            if entry.node.health.is_none()
                || entry.node.health != old.health
                || entry.node.address != old.address
            {
                continue;
            }
            entry.health_changes = old.health_changes;
            if !old.healthy && entry.healthy {
                entry.healthy = false;
                down.push(slot);
            }
        }
        if !down.is_empty() {
            // Tables first, as for a failed check.
            self.rebuild_vips(tables)?;
            for slot in &down {
                tables.remove_node(*slot)?;
            }
        }
        Ok(down.len())
    }

    /// Rebuilds every VIP's Maglev table from the current weights and
    /// health, writing what changed; returns how many changed.
    fn rebuild_vips(&mut self, tables: &mut Tables) -> Result<usize> {
        let size = self
            .spec
            .as_ref()
            .map_or(maglev::DEFAULT_TABLE_SIZE, |s| s.maglev_table_size);
        let mut changed = 0;
        for slot in 0..self.vips.len() {
            let Some(v) = &self.vips[slot] else { continue };
            let table = self.maglev_table(&v.vip, size);
            let v = self.vips[slot].as_mut().expect("live slot");
            if table != v.table {
                tables.update_vip(slot as u32, &vip_key(&v.vip), &v.table, &table)?;
                v.table = table;
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// The VIP's Maglev table over node slots; nodes that failed their
    /// health check take no new flows (weight 0).
    fn maglev_table(&self, vip: &Vip, size: u32) -> Vec<u32> {
        let mut pool: Vec<PoolNode> = vip
            .nodes
            .iter()
            .filter_map(|name| self.node(name))
            .map(|(slot, n)| PoolNode {
                id: slot,
                key: node_key(&n.node.name),
                weight: if n.healthy { n.node.weight } else { 0 },
            })
            .collect();
        let mut table = vec![0u32; size as usize];
        let mut scratch = vec![(0, 0, 0, 0); pool.len()];
        maglev::populate(&mut pool, &mut table, &mut scratch);
        table
    }

    /// Node slots a change may still take: the never used, and the freed.
    fn free_node_slots(&self) -> usize {
        MAX_CACHE_NODES as usize - self.nodes.len() + self.freed.len()
    }

    /// Gives up a node's slot; it is taken again only once no never-used
    /// slot is left, oldest freed first, so a flow the connection table
    /// still remembers for the node is unlikely to meet a new node there.
    fn release_node_slot(&mut self, slot: u32) {
        self.nodes[slot as usize] = None;
        self.freed.push_back(slot);
    }

    /// A slot for a new node (`free_node_slots` said there is one): a
    /// never-used one while any is left, else the oldest freed.
    fn allocate_node_slot(&mut self) -> u32 {
        if self.nodes.len() < MAX_CACHE_NODES as usize {
            self.nodes.push(None);
            return self.nodes.len() as u32 - 1;
        }
        self.freed
            .pop_front()
            .expect("apply checked for a free slot")
    }

    /// Brings learned node MACs in line with the neighbour table; returns a
    /// line per change and the DSR nodes still unresolved (address, dev).
    pub fn refresh(
        &mut self,
        tables: &mut Tables,
        links: &[Link],
        neighbours: &[Neighbour],
    ) -> Result<(Vec<String>, Unresolved)> {
        let mut changes = Vec::new();
        let mut unresolved = Vec::new();
        for (slot, entry) in self.nodes.iter().enumerate() {
            // A node that failed its health check stays out of the node table.
            let Some(NodeSlot {
                node,
                healthy: true,
                ..
            }) = entry
            else {
                continue;
            };
            let Ok(want) = resolve_node(node, links, neighbours) else {
                continue;
            };
            if want.flags & NODE_F_MAC_VALID == 0 && node.delivery == Delivery::Dsr {
                unresolved.push((node.address, node.dev.clone()));
            }
            if tables.node(slot as u32)? != want {
                tables.write_node(slot as u32, &want)?;
                let mac = if want.flags & NODE_F_MAC_VALID != 0 {
                    Mac(want.dst_mac).to_string()
                } else {
                    "unresolved".into()
                };
                changes.push(format!(
                    "cache node {} ({} on {}): mac {mac}",
                    node.name, node.address, node.dev
                ));
            }
        }
        Ok((changes, unresolved))
    }

    /// What the CLI reads of the steering tables (from the state file).
    pub fn state(&self) -> SteeringState {
        let spec = self.spec();
        SteeringState {
            flow_hash_seed: spec.flow_hash_seed,
            maglev_table_size: spec.maglev_table_size,
            nodes: self
                .nodes
                .iter()
                .enumerate()
                .filter_map(|(slot, n)| {
                    let n = n.as_ref()?;
                    Some(NodeState {
                        slot: slot as u32,
                        name: n.node.name.clone(),
                        address: n.node.address,
                        delivery: n.node.delivery,
                        dev: n.node.dev.clone(),
                        weight: n.node.weight,
                        health_checked: n.node.health.is_some(),
                        health: n.node.health.clone(),
                        mac: n.node.mac.map(|m| m.to_string()),
                        healthy: n.healthy,
                        health_changes: n.health_changes,
                    })
                })
                .collect(),
            vips: self
                .vips
                .iter()
                .enumerate()
                .filter_map(|(slot, v)| {
                    let v = v.as_ref()?;
                    Some(VipState {
                        slot: slot as u32,
                        address: v.vip.address,
                        protocol: v.vip.protocol,
                        port: v.vip.port,
                        nodes: v.vip.nodes.clone(),
                    })
                })
                .collect(),
        }
    }
}

/// What `run` records of its steering tables, for the CLI: live nodes and
/// VIPs with their slots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SteeringState {
    pub flow_hash_seed: u32,
    pub maglev_table_size: u32,
    pub nodes: Vec<NodeState>,
    pub vips: Vec<VipState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    pub slot: u32,
    pub name: String,
    pub address: IpAddr,
    pub delivery: Delivery,
    pub dev: String,
    pub weight: u32,
    pub health_checked: bool,
    pub healthy: bool,
    pub health_changes: u64,
    /// The node's health check and static MAC, as configured: what a new
    /// daemon needs to adopt the node as it is.
    #[serde(default)]
    pub health: Option<crate::config::HealthConfig>,
    #[serde(default)]
    pub mac: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipState {
    pub slot: u32,
    pub address: IpAddr,
    pub protocol: crate::config::Protocol,
    pub port: u16,
    pub nodes: Vec<String>,
}

impl SteeringState {
    /// The name of the node in `slot`.
    pub fn node_name(&self, slot: u32) -> Option<&str> {
        self.nodes
            .iter()
            .find(|n| n.slot == slot)
            .map(|n| n.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> NodeSlot {
        NodeSlot {
            node: Node {
                name: name.into(),
                address: "10.0.0.1".parse().unwrap(),
                dev: "eth0".into(),
                mac: None,
                weight: 1,
                health: None,
                delivery: Delivery::Dsr,
            },
            healthy: true,
            health_changes: 0,
        }
    }

    #[test]
    fn node_slots_are_fresh_first_then_freed_oldest_first() {
        let mut s = Steering::default();
        let take = |s: &mut Steering, name: &str| {
            let slot = s.allocate_node_slot();
            s.nodes[slot as usize] = Some(node(name));
            slot
        };
        assert_eq!(
            [take(&mut s, "a"), take(&mut s, "b"), take(&mut s, "c")],
            [0, 1, 2]
        );
        s.release_node_slot(1);
        s.release_node_slot(0);
        assert_eq!(s.free_node_slots(), MAX_CACHE_NODES as usize - 1);
        // Never-used slots come first, while any is left.
        assert_eq!(take(&mut s, "d"), 3);
        for i in 4..MAX_CACHE_NODES {
            assert_eq!(take(&mut s, &format!("n{i}")), i);
        }
        assert_eq!(s.free_node_slots(), 2);
        // Then the freed ones, oldest first.
        assert_eq!(take(&mut s, "e"), 1);
        assert_eq!(take(&mut s, "f"), 0);
        assert_eq!(s.free_node_slots(), 0);
        assert_eq!(s.node("f").map(|(slot, _)| slot), Some(0));
        assert!(s.node("a").is_none() && s.node("b").is_none());
    }

    #[test]
    fn one_check_holds_every_rule_of_a_steering_state() {
        let ok = Spec {
            flow_hash_seed: 0,
            maglev_table_size: 251,
            encap_source_v4: None,
            encap_source_v6: None,
            nodes: vec![node("a").node, node("b").node],
            vips: vec![Vip {
                address: "192.0.2.1".parse().unwrap(),
                protocol: crate::config::Protocol::Udp,
                port: 0,
                nodes: vec!["a".into(), "b".into()],
            }],
        };
        ok.check().unwrap();
        let mut weight = ok.clone();
        weight.nodes[1].weight = MAX_WEIGHT + 1;
        let mut twice = ok.clone();
        twice.nodes[1].name = "a".into();
        let mut unknown = ok.clone();
        unknown.vips[0].nodes.push("z".into());
        let mut ipip = ok.clone();
        ipip.nodes[0].delivery = Delivery::Ipip;
        let mut v6_over_v4 = ipip.clone();
        v6_over_v4.encap_source_v4 = Some(crate::config::SourcePool::parse("10.0.0.9").unwrap());
        v6_over_v4.vips[0].address = "2001:db8::1".parse().unwrap();
        let mut size = ok.clone();
        size.maglev_table_size = 250;
        for (spec, needle) in [
            (weight, "nodes (b): weight: 1001"),
            (twice, "nodes: \"a\" is listed twice"),
            (unknown, "no node is named \"z\""),
            (ipip, "needs encap_source_v4"),
            (v6_over_v4, "IPv6 in IPv4 is not offered"),
            (size, "maglev_table_size: 250"),
        ] {
            let e = format!("{:#}", spec.check().unwrap_err());
            assert!(e.contains(needle), "expected {needle:?} in {e:?}");
        }
    }
}
