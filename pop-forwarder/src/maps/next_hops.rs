//! The next-hop table: one slot per gateway on an interface, shared by
//! every route through it; learned MACs, MTUs and source MACs kept current.

use super::*;

pub(super) fn gateway_bytes(addr: IpAddr) -> ([u8; 16], u32) {
    let mut gw = [0u8; 16];
    match addr {
        IpAddr::V4(a) => {
            gw[..4].copy_from_slice(&a.octets());
            (gw, AF_INET)
        }
        IpAddr::V6(a) => (a.octets(), AF_INET6),
    }
}

/// Marks the stand-in for `KERNEL_NEXT_HOP` among wanted next hops: a
/// route to it is the kernel's to handle. Never written to the table.
pub const NH_F_KERNEL: u32 = 1 << 31;

/// The next hop of a route the kernel handles (`KERNEL_NEXT_HOP`).
pub fn kernel_next_hop(family: u32) -> NextHop {
    NextHop {
        flags: NH_F_KERNEL,
        family,
        ..NextHop::default_free()
    }
}

/// The VLAN fields of a next hop on `link`: (TCI, TPID, the interface the
/// frames leave on).
fn vlan_of(link: &Link) -> (u16, u16, u32) {
    match link.vlan {
        Some(v) => (v.id, v.proto, v.parent),
        None => (0, 0, link.ifindex),
    }
}

/// The next hop of a connected subnet on `link`: packets go to the
/// destination host itself (its MAC from `NEIGHBOURS`).
pub fn connected_next_hop(link: &Link, mac: Mac, family: u32) -> NextHop {
    let (vlan_tci, vlan_proto, tx_ifindex) = vlan_of(link);
    NextHop {
        ifindex: link.ifindex,
        mtu: link.mtu,
        flags: NH_F_IN_USE | NH_F_CONNECTED,
        dst_mac: [0; 6],
        src_mac: mac.0,
        gateway: [0; 16],
        family,
        vlan_tci,
        vlan_proto,
        tx_ifindex,
    }
}

/// The routes of this namespace's connected subnets: through the
/// interface itself where the program is attached (`attached`, ifindexes)
/// and it has an Ethernet address; handed to the kernel elsewhere, so that
/// no shorter route (a default route, say) takes their packets.
pub fn connected_routes(links: &[Link], attached: &[u32]) -> Vec<(Prefix, NextHop)> {
    let mut out: Vec<(Prefix, NextHop)> = Vec::new();
    for link in links {
        for subnet in &link.subnets {
            let family = if subnet.addr.is_ipv4() {
                AF_INET
            } else {
                AF_INET6
            };
            let nh = match link.mac {
                Some(mac) if attached.contains(&link.tx_ifindex()) => {
                    connected_next_hop(link, mac, family)
                }
                _ => kernel_next_hop(family),
            };
            // The same subnet on two interfaces: the first keeps it, as the
            // kernel's first route would.
            if !out.iter().any(|(p, _)| p == subnet) {
                out.push((*subnet, nh));
            }
        }
    }
    out
}

pub fn gateway_addr(nh: &NextHop) -> IpAddr {
    if nh.family == AF_INET {
        let mut a = [0u8; 4];
        a.copy_from_slice(&nh.gateway[..4]);
        IpAddr::from(a)
    } else {
        IpAddr::from(nh.gateway)
    }
}

/// The next hop a route needs, resolved against this namespace's interfaces
/// and neighbours: egress index, MTU and source MAC from the interface; the
/// destination MAC from the route or, failing that, the neighbour table.
pub fn resolve_next_hop(
    route: &Route,
    links: &[Link],
    neighbours: &[Neighbour],
) -> Result<NextHop> {
    let link = kernel::link(links, &route.dev).context("dev")?;
    let src_mac = link
        .mac
        .with_context(|| format!("dev: interface {:?} has no Ethernet address", route.dev))?;
    let mut nh = gateway_next_hop(route.via, link, src_mac, neighbours);
    if let Some(mac) = route.mac {
        nh.dst_mac = mac.0;
        nh.flags |= NH_F_MAC_VALID | NH_F_MAC_STATIC;
    }
    Ok(nh)
}

/// The next hop through `gateway` on `link` (whose MAC is `src_mac`), its
/// MAC from the neighbour table if the kernel has resolved it.
pub fn gateway_next_hop(
    gateway: IpAddr,
    link: &Link,
    src_mac: Mac,
    neighbours: &[Neighbour],
) -> NextHop {
    let (bytes, family) = gateway_bytes(gateway);
    let (vlan_tci, vlan_proto, tx_ifindex) = vlan_of(link);
    let mut nh = NextHop {
        ifindex: link.ifindex,
        mtu: link.mtu,
        flags: NH_F_IN_USE,
        dst_mac: [0; 6],
        src_mac: src_mac.0,
        gateway: bytes,
        family,
        vlan_tci,
        vlan_proto,
        tx_ifindex,
    };
    if let Some(n) = neighbours
        .iter()
        .find(|n| n.addr == gateway && n.ifindex == link.ifindex)
    {
        nh.dst_mac = n.mac.0;
        nh.flags |= NH_F_MAC_VALID;
    }
    nh
}

/// The next-hop and group tables as read once, indexed by gateway and by
/// members, so that a batch of routes costs a hash lookup per route rather
/// than a scan of the tables.
pub(super) struct NextHopTable {
    pub(super) slots: Vec<NextHop>,
    pub(super) by_gateway: std::collections::HashMap<GatewayKey, u32>,
    pub(super) groups: Vec<NextHopGroup>,
    pub(super) by_group: std::collections::HashMap<GroupKey, u32>,
}

impl NextHopTable {
    /// What route target `id` goes through, as the tables hold it.
    pub(super) fn want_of(&self, id: u32, family: u32) -> Want {
        if id == KERNEL_NEXT_HOP {
            return Want::One(kernel_next_hop(family));
        }
        if let Some(g) = ecmp::group_index(id).and_then(|i| self.groups.get(i as usize)) {
            let members: Vec<(NextHop, u32)> = (0..g.count as usize)
                .map(|m| (self.slot(u32::from(g.members[m])), u32::from(g.weights[m])))
                .collect();
            return Want::Group(members.into());
        }
        Want::One(self.slot(id))
    }

    fn slot(&self, id: u32) -> NextHop {
        self.slots
            .get(id as usize)
            .copied()
            .unwrap_or(NextHop::default_free())
    }

    /// The key of an in-use group slot.
    fn group_key(&self, g: &NextHopGroup) -> GroupKey {
        (0..g.count as usize)
            .map(|m| {
                (
                    gateway_key(&self.slot(u32::from(g.members[m]))),
                    u32::from(g.weights[m]),
                )
            })
            .collect()
    }
}

impl Tables {
    /// Every slot of the next-hop table, free ones too.
    pub fn next_hop_slots(&self) -> Result<Vec<NextHop>> {
        use aya::maps::IterableMap as _;
        sys::array_all(self.next_hops.map().fd().as_fd(), MAX_NEXT_HOPS)
            .context("reading the next-hop table")
    }

    /// Every slot of the ECMP group table, free ones too.
    pub(super) fn group_slots(&self) -> Result<Vec<NextHopGroup>> {
        use aya::maps::IterableMap as _;
        sys::array_all(self.next_hop_groups.map().fd().as_fd(), ecmp::MAX_GROUPS)
            .context("reading the ECMP group table")
    }

    /// The id of the next hop for `want`'s gateway and interface, allocating
    /// a slot if there is none. Returns whether the slot is new.
    pub(super) fn find_or_add_next_hop(
        &mut self,
        table: &mut NextHopTable,
        want: &NextHop,
    ) -> Result<(u32, bool)> {
        if want.flags & NH_F_KERNEL != 0 {
            return Ok((KERNEL_NEXT_HOP, false));
        }
        if let Some(&id) = table.by_gateway.get(&gateway_key(want)) {
            let have = table.slots[id as usize];
            let want_static = want.flags & NH_F_MAC_STATIC != 0;
            let have_static = have.flags & NH_F_MAC_STATIC != 0;
            if want_static && have_static && have.dst_mac != want.dst_mac {
                bail!(
                    "mac: gateway {} already has MAC {} (next hop {id})",
                    gateway_addr(&have),
                    Mac(have.dst_mac)
                );
            }
            if want_static && !have_static {
                self.write_next_hop(id, want)?;
                table.slots[id as usize] = *want;
            }
            return Ok((id, false));
        }
        // A slot freed less than GRACE ago may still be read by a lookup of
        // the route that used it: take a rested one, or wait for one.
        settled(&mut self.retired.next_hops);
        let free = |retired: &Retired| {
            table.slots.iter().enumerate().position(|(i, nh)| {
                !nh.is_in_use() && !retired.next_hops.iter().any(|(r, _)| *r == i as u32)
            })
        };
        let id = match free(&self.retired) {
            Some(id) => id,
            None => {
                wait_out(&self.retired.next_hops);
                settled(&mut self.retired.next_hops);
                free(&self.retired).with_context(|| {
                    format!("the next-hop table is full ({MAX_NEXT_HOPS} next hops)")
                })?
            }
        } as u32;
        self.add_egress(want.tx_ifindex)?;
        let zeros = vec![TrafficCounter::default(); aya::util::nr_cpus().map_err(|(_, e)| e)?];
        self.next_hop_stats
            .set(id, PerCpuValues::try_from(zeros)?, 0)
            .context("resetting next-hop counters")?;
        self.write_next_hop(id, want)?;
        table.slots[id as usize] = *want;
        table.by_gateway.insert(gateway_key(want), id);
        Ok((id, true))
    }

    pub(super) fn write_next_hop(&mut self, id: u32, nh: &NextHop) -> Result<()> {
        self.journal("next-hop", |t| {
            Undo::NextHop(
                id,
                Box::new(t.next_hops.get(&id, 0).unwrap_or(NextHop::default_free())),
            )
        })?;
        self.next_hops
            .set(id, nh, 0)
            .with_context(|| format!("writing next hop {id}"))
    }

    pub(super) fn next_hop_table(&self) -> Result<NextHopTable> {
        let slots = self.next_hop_slots()?;
        let by_gateway = slots
            .iter()
            .enumerate()
            .filter(|(_, nh)| nh.is_in_use())
            .map(|(id, nh)| (gateway_key(nh), id as u32))
            .collect();
        let groups = self.group_slots()?;
        let mut table = NextHopTable {
            slots,
            by_gateway,
            groups,
            by_group: Default::default(),
        };
        table.by_group = table
            .groups
            .iter()
            .enumerate()
            .filter(|(_, g)| g.count > 0)
            .map(|(i, g)| (table.group_key(g), i as u32))
            .collect();
        Ok(table)
    }

    /// The route target for `want`, found or made (next hops, a group), with
    /// one more use counted in `uses` (and, for a group made here, one more
    /// for each of its members).
    pub(super) fn acquire(
        &mut self,
        want: &Want,
        table: &mut NextHopTable,
        uses: &mut std::collections::HashMap<u32, usize>,
    ) -> Result<u32> {
        let id = match want {
            Want::One(nh) => self.find_or_add_next_hop(table, nh)?.0,
            Want::Group(members) => {
                let key = want.group_key().expect("a group");
                match table.by_group.get(&key) {
                    Some(&index) => ecmp::FIRST_GROUP_ID + index,
                    None => self.add_group(members, key, table, uses)?,
                }
            }
        };
        *uses.entry(id).or_default() += 1;
        Ok(id)
    }

    /// Writes a new group of `members` (their next hops found or made, each
    /// counted one use), buckets assigned by `ecmp::assign`.
    fn add_group(
        &mut self,
        members: &[(NextHop, u32)],
        key: GroupKey,
        table: &mut NextHopTable,
        uses: &mut std::collections::HashMap<u32, usize>,
    ) -> Result<u32> {
        settled(&mut self.retired.ecmp);
        let free = |retired: &Retired| {
            table.groups.iter().enumerate().position(|(i, g)| {
                g.count == 0 && !retired.ecmp.iter().any(|(r, _)| *r == i as u32)
            })
        };
        let index = match free(&self.retired) {
            Some(index) => index,
            None => {
                wait_out(&self.retired.ecmp);
                settled(&mut self.retired.ecmp);
                free(&self.retired).with_context(|| {
                    format!("the ECMP group table is full ({} groups)", ecmp::MAX_GROUPS)
                })?
            }
        } as u32;
        let mut group: NextHopGroup = bytemuck::Zeroable::zeroed();
        let mut keys = Vec::with_capacity(members.len());
        for (m, (nh, weight)) in members.iter().enumerate() {
            let id = self.acquire(&Want::One(*nh), table, uses)?;
            group.members[m] = id as u16;
            group.weights[m] = *weight as u16;
            keys.push((ecmp::member_key(&nh.gateway, nh.ifindex), *weight));
        }
        group.count = members.len() as u32;
        let assigned = ecmp::assign(&keys).with_context(|| {
            format!(
                "an ECMP group of {} members: a weight out of 1..=256",
                members.len()
            )
        })?;
        for (bucket, member) in group.buckets.iter_mut().zip(assigned) {
            *bucket = group.members[member as usize];
        }
        self.write_group(index, &group)?;
        table.groups[index as usize] = group;
        table.by_group.insert(key, index);
        Ok(ecmp::FIRST_GROUP_ID + index)
    }

    /// One use fewer of route target `id`; at none, frees its slot (a next
    /// hop; a group, then one use fewer of each member).
    pub(super) fn release(
        &mut self,
        id: u32,
        uses: &mut std::collections::HashMap<u32, usize>,
        table: &mut NextHopTable,
    ) -> Result<()> {
        let Some(n) = uses.get_mut(&id) else {
            return Ok(());
        };
        *n -= 1;
        if *n > 0 {
            return Ok(());
        }
        uses.remove(&id);
        if id < MAX_NEXT_HOPS {
            self.free_next_hop(id)?;
            if let Some(slot) = table.slots.get_mut(id as usize) {
                table.by_gateway.remove(&gateway_key(slot));
                *slot = NextHop::default_free();
            }
        } else if let Some(index) = ecmp::group_index(id) {
            let g = table.groups[index as usize];
            table.by_group.remove(&table.group_key(&g));
            self.write_group(index, &bytemuck::Zeroable::zeroed())?;
            self.retired.ecmp.push((index, std::time::Instant::now()));
            table.groups[index as usize] = bytemuck::Zeroable::zeroed();
            for m in 0..g.count as usize {
                self.release(u32::from(g.members[m]), uses, table)?;
            }
        }
        Ok(())
    }

    /// How many routes (and groups) use each route target and next hop.
    pub(super) fn uses(
        &self,
        routes: &[(Prefix, u32)],
        table: &NextHopTable,
    ) -> std::collections::HashMap<u32, usize> {
        let mut uses = std::collections::HashMap::new();
        for (_, id) in routes {
            *uses.entry(*id).or_default() += 1;
        }
        for g in table.groups.iter().filter(|g| g.count > 0) {
            for m in 0..g.count as usize {
                *uses.entry(u32::from(g.members[m])).or_default() += 1;
            }
        }
        uses
    }

    /// Frees a next-hop slot; it rests for `GRACE` before it is reused.
    pub(super) fn free_next_hop(&mut self, id: u32) -> Result<()> {
        self.write_next_hop(id, &NextHop::default_free())?;
        self.retired.next_hops.push((id, std::time::Instant::now()));
        Ok(())
    }

    /// Brings learned next-hop MACs, egress MTUs and source MACs in line with
    /// the kernel. Returns a line per change, for the log.
    pub fn refresh_next_hops(
        &mut self,
        links: &[Link],
        neighbours: &[Neighbour],
    ) -> Result<Vec<String>> {
        let mut changes = Vec::new();
        for (id, nh) in self.next_hop_slots()?.into_iter().enumerate() {
            if !nh.is_in_use() {
                continue;
            }
            let Some(link) = links.iter().find(|l| l.ifindex == nh.ifindex) else {
                continue;
            };
            let mut next = nh;
            next.mtu = link.mtu;
            (next.vlan_tci, next.vlan_proto, next.tx_ifindex) = vlan_of(link);
            if let Some(mac) = link.mac {
                next.src_mac = mac.0;
            }
            if nh.flags & (NH_F_MAC_STATIC | NH_F_CONNECTED) == 0 {
                let gw = gateway_addr(&nh);
                match neighbours
                    .iter()
                    .find(|n| n.addr == gw && n.ifname == link.name)
                {
                    Some(n) => {
                        next.dst_mac = n.mac.0;
                        next.flags |= NH_F_MAC_VALID;
                    }
                    None => {
                        next.dst_mac = [0; 6];
                        next.flags &= !NH_F_MAC_VALID;
                    }
                }
            }
            if next != nh {
                // Re-read under the caller's lock: the slot must still be the
                // same next hop, not one freed and reused meanwhile.
                let current = self.next_hops.get(&(id as u32), 0)?;
                if current != nh {
                    continue;
                }
                self.write_next_hop(id as u32, &next)?;
                changes.push(format!(
                    "next hop {id} ({} on {}): mac {} mtu {}",
                    gateway_addr(&nh),
                    link.name,
                    if next.mac_valid() {
                        Mac(next.dst_mac).to_string()
                    } else {
                        "unresolved".into()
                    },
                    next.mtu
                ));
            }
        }
        Ok(changes)
    }

    /// Moves the gateway next hops on interfaces that are gone to the
    /// interface now under the same name (`moved`: the gone ifindex, and
    /// that interface): a bond, VLAN or subinterface the network
    /// configuration deleted and made again. A next hop keeps its gateway,
    /// and its MAC if the route gave one; egress, MTU and source MAC come
    /// from the new interface, the gateway's MAC from its neighbour table.
    /// One write a next hop: every route and ECMP group through it follows
    /// at once. Connected subnets are not moved here: their routes follow
    /// the interfaces' addresses. A next hop whose gateway the new
    /// interface already has one for stays (logged). Returns a line per
    /// next hop, for the log.
    pub fn move_next_hops(
        &mut self,
        moved: &[(u32, &Link)],
        neighbours: &[Neighbour],
    ) -> Result<Vec<String>> {
        let mut lines = Vec::new();
        let slots = self.next_hop_slots()?;
        let keys: HashSet<GatewayKey> = slots
            .iter()
            .filter(|nh| nh.is_in_use())
            .map(gateway_key)
            .collect();
        for (id, nh) in slots.iter().enumerate() {
            if !nh.is_in_use() || nh.flags & NH_F_CONNECTED != 0 {
                continue;
            }
            let Some((_, link)) = moved.iter().find(|(old, _)| *old == nh.ifindex) else {
                continue;
            };
            let Some(src_mac) = link.mac else {
                continue;
            };
            let gateway = gateway_addr(nh);
            let mut next = gateway_next_hop(gateway, link, src_mac, neighbours);
            if nh.flags & NH_F_MAC_STATIC != 0 {
                next.dst_mac = nh.dst_mac;
                next.flags |= NH_F_MAC_VALID | NH_F_MAC_STATIC;
            }
            if keys.contains(&gateway_key(&next)) {
                lines.push(format!(
                    "next hop {id} ({gateway} on the old {}) stays: {} has a next hop through {gateway} already; reload to move its routes",
                    link.name, link.name
                ));
                continue;
            }
            self.add_egress(next.tx_ifindex)?;
            self.write_next_hop(id as u32, &next)?;
            lines.push(format!(
                "next hop {id} ({gateway}) moved to {} (ifindex {} was {})",
                link.name, link.ifindex, nh.ifindex
            ));
        }
        Ok(lines)
    }

    /// Gateways (and their interface index) of next hops that still wait for
    /// a MAC from the neighbour table.
    pub fn unresolved_gateways(&self) -> Result<Vec<(IpAddr, u32)>> {
        Ok(self
            .next_hop_slots()?
            .iter()
            .filter(|nh| {
                nh.is_in_use()
                    && !nh.mac_valid()
                    && nh.flags & (NH_F_MAC_STATIC | NH_F_CONNECTED) == 0
            })
            .map(|nh| (gateway_addr(nh), nh.ifindex))
            .collect())
    }
}
