//! What the data plane counted: outcomes, and traffic per next hop, VIP
//! and cache node (per-CPU, summed here).

use super::*;

/// Counters summed over CPUs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stats {
    pub counters: BTreeMap<&'static str, u64>,
    pub next_hops: Vec<NextHopStats>,
    /// Every interface packets came in on, with what became of them.
    pub interfaces: Vec<InterfaceStats>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct InterfaceStats {
    pub name: String,
    pub ifindex: u32,
    pub packets: u64,
    pub bytes: u64,
    pub forwarded: u64,
    pub passed: u64,
    pub dropped: u64,
    /// Sent out of this interface but dropped by the transmit, as the
    /// kernel reports it (`xdp:xdp_devmap_xmit`; on a box with other XDP
    /// programs redirecting, theirs too).
    pub xmit_drops: u64,
    /// This program's redirects to this interface the kernel refused
    /// (`xdp:xdp_redirect_err`).
    pub redirect_errors: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct NextHopStats {
    pub id: u32,
    pub via: String,
    pub dev: String,
    pub packets: u64,
    pub bytes: u64,
}

impl Tables {
    /// Packets and bytes per VIP slot and per node, summed over CPUs.
    pub fn steering_stats(
        &self,
        vips: u32,
        nodes: u32,
    ) -> Result<(Vec<TrafficCounter>, Vec<TrafficCounter>)> {
        let sum = |v: PerCpuValues<TrafficCounter>| TrafficCounter {
            packets: v.iter().map(|t| t.packets).sum(),
            bytes: v.iter().map(|t| t.bytes).sum(),
        };
        let v = (0..vips)
            .map(|i| self.vip_stats.get(&i, 0).map(sum))
            .collect::<Result<_, _>>()?;
        let n = (0..nodes)
            .map(|i| self.node_stats.get(&i, 0).map(sum))
            .collect::<Result<_, _>>()?;
        Ok((v, n))
    }

    /// The outcome counters alone, summed over CPUs.
    pub fn counters(&self) -> Result<BTreeMap<&'static str, u64>> {
        let mut counters = BTreeMap::new();
        for c in Counter::ALL {
            let per_cpu = self
                .counters
                .get(&c.index(), 0)
                .with_context(|| format!("reading counter {}", c.name()))?;
            counters.insert(c.name(), per_cpu.iter().sum());
        }
        Ok(counters)
    }

    pub fn stats(&self, links: &[Link]) -> Result<Stats> {
        let counters = self.counters()?;
        let mut next_hops = Vec::new();
        for (id, nh) in self.next_hop_slots()?.into_iter().enumerate() {
            if !nh.is_in_use() {
                continue;
            }
            let per_cpu = self
                .next_hop_stats
                .get(&(id as u32), 0)
                .context("reading next-hop counters")?;
            next_hops.push(NextHopStats {
                id: id as u32,
                via: gateway_addr(&nh).to_string(),
                dev: ifname(links, nh.ifindex),
                packets: per_cpu.iter().map(|t| t.packets).sum(),
                bytes: per_cpu.iter().map(|t| t.bytes).sum(),
            });
        }
        let mut interfaces = Vec::new();
        for link in links {
            if link.ifindex >= MAX_INTERFACES {
                continue;
            }
            let per_cpu = self
                .interface_stats
                .get(&link.ifindex, 0)
                .context("reading interface counters")?;
            let sum = |f: fn(&pop_forwarder_common::InterfaceCounter) -> u64| {
                per_cpu.iter().map(f).sum::<u64>()
            };
            let packets = sum(|c| c.packets);
            let tx = self
                .tx_errors
                .get(&link.ifindex, 0)
                .context("reading transmit errors")?;
            let xmit_drops: u64 = tx.iter().map(|t| t.xmit_drops).sum();
            let redirect_errors: u64 = tx.iter().map(|t| t.redirect_errors).sum();
            if packets == 0 && xmit_drops == 0 && redirect_errors == 0 {
                continue;
            }
            interfaces.push(InterfaceStats {
                name: link.name.clone(),
                ifindex: link.ifindex,
                packets,
                bytes: sum(|c| c.bytes),
                forwarded: sum(|c| c.forwarded),
                passed: sum(|c| c.passed),
                dropped: sum(|c| c.dropped),
                xmit_drops,
                redirect_errors,
            });
        }
        Ok(Stats {
            counters,
            next_hops,
            interfaces,
        })
    }
}
