//! VIP steering, host side: cache nodes resolved against the namespace,
//! one Maglev table per VIP, all written into the program's maps.

use std::net::IpAddr;

use anyhow::{Context as _, Result};
use pop_forwarder_common::{
    maglev::{self, PoolNode},
    steering::{
        CacheNode, ENCAP_SOURCE_V4, ENCAP_SOURCE_V6, NODE_F_IN_USE, NODE_F_IPIP, NODE_F_MAC_VALID,
        VipKey,
    },
};
use serde::{Deserialize, Serialize};

use crate::{
    config::{Delivery, Mac, Model, Node, Vip},
    kernel::{self, Link, Neighbour},
    tables::Tables,
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

/// The VIP's Maglev table: node slots (positions in `nodes`). Nodes whose
/// health check failed (`healthy[i]` false) take no new flows.
pub fn maglev_table(nodes: &[Node], vip: &Vip, size: u32, healthy: &[bool]) -> Vec<u32> {
    let mut pool: Vec<PoolNode> = vip
        .nodes
        .iter()
        .map(|&i| PoolNode {
            id: i as u32,
            key: node_key(&nodes[i].name),
            weight: if healthy.get(i).copied().unwrap_or(true) {
                nodes[i].weight
            } else {
                0
            },
        })
        .collect();
    let mut table = vec![0u32; size as usize];
    let mut scratch = vec![(0, 0, 0, 0); pool.len()];
    maglev::populate(&mut pool, &mut table, &mut scratch);
    table
}

/// Writes every node and VIP of `model`, then turns steering on if there is
/// any VIP.
pub fn install(
    tables: &mut Tables,
    model: &Model,
    links: &[Link],
    neighbours: &[Neighbour],
) -> Result<()> {
    let mut resolved = Vec::new();
    for node in &model.nodes {
        resolved.push(
            resolve_node(node, links, neighbours).with_context(|| format!("node {}", node.name))?,
        );
    }
    tables.set_steering(model.flow_hash_seed, false)?;
    if let Some(a) = model.encap_source_v4 {
        tables.set_encap_source(ENCAP_SOURCE_V4, widen(a.into()))?;
    }
    if let Some(a) = model.encap_source_v6 {
        tables.set_encap_source(ENCAP_SOURCE_V6, widen(a.into()))?;
    }
    for (i, node) in resolved.iter().enumerate() {
        tables.write_node(i as u32, node)?;
    }
    for (i, vip) in model.vips.iter().enumerate() {
        let table = maglev_table(&model.nodes, vip, model.maglev_table_size, &[]);
        tables
            .write_vip(i as u32, &vip_key(vip), &table)
            .with_context(|| format!("VIP {} {} port {}", vip.address, vip.protocol, vip.port))?;
    }
    tables.set_steering(model.flow_hash_seed, !model.vips.is_empty())
}

/// Brings learned node MACs in line with the neighbour table; returns a
/// line per change and the nodes still unresolved (address, dev).
pub fn refresh_nodes(
    tables: &mut Tables,
    nodes: &[Node],
    healthy: &[bool],
    links: &[Link],
    neighbours: &[Neighbour],
) -> Result<(Vec<String>, Vec<(IpAddr, String)>)> {
    let mut changes = Vec::new();
    let mut unresolved = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        // A node that failed its health check stays out of the node table.
        if !healthy.get(i).copied().unwrap_or(true) {
            continue;
        }
        let Ok(want) = resolve_node(node, links, neighbours) else {
            continue;
        };
        if want.flags & NODE_F_MAC_VALID == 0 {
            if node.delivery == Delivery::Dsr {
                unresolved.push((node.address, node.dev.clone()));
            }
        }
        if tables.node(i as u32)? != want {
            tables.write_node(i as u32, &want)?;
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

/// What `run` records of its steering config, for the CLI.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SteeringState {
    pub flow_hash_seed: u32,
    pub maglev_table_size: u32,
    pub nodes: Vec<NodeState>,
    pub vips: Vec<VipState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub address: IpAddr,
    pub dev: String,
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipState {
    pub address: IpAddr,
    pub protocol: crate::config::Protocol,
    pub port: u16,
    pub nodes: Vec<String>,
}

impl SteeringState {
    pub fn of(model: &Model) -> SteeringState {
        SteeringState {
            flow_hash_seed: model.flow_hash_seed,
            maglev_table_size: model.maglev_table_size,
            nodes: model
                .nodes
                .iter()
                .map(|n| NodeState {
                    name: n.name.clone(),
                    address: n.address,
                    dev: n.dev.clone(),
                    weight: n.weight,
                })
                .collect(),
            vips: model
                .vips
                .iter()
                .map(|v| VipState {
                    address: v.address,
                    protocol: v.protocol,
                    port: v.port,
                    nodes: v
                        .nodes
                        .iter()
                        .map(|&i| model.nodes[i].name.clone())
                        .collect(),
                })
                .collect(),
        }
    }
}
