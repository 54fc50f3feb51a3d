//! Routes: the IPv4 record and the structure the program reads (DIR-24-8
//! or the LPM trie), the IPv6 record (an LPM trie) and the structure the
//! program reads (the range table or that trie), and this box's own
//! addresses as /32 and /128 routes. A change is planned (`plan`), checked for room, then
//! written, new next hop before the route that uses it.

use super::*;

/// A route as the tables hold it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RouteEntry {
    pub prefix: String,
    pub next_hop: u32,
    pub via: String,
    pub dev: String,
    /// None while the neighbour is unresolved.
    pub mac: Option<String>,
    pub mac_static: bool,
}

pub(super) fn refuse_local(locals: &HashSet<IpAddr>, prefix: Prefix) -> Result<()> {
    if prefix == host_prefix(prefix.addr) && locals.contains(&prefix.addr) {
        bail!("{prefix} is one of this box's own addresses; its packets always go to the kernel");
    }
    Ok(())
}

/// The error for the route a batch update stopped at.
pub(super) fn batch_error(prefix: Prefix, e: std::io::Error) -> anyhow::Error {
    anyhow::Error::new(e).context(format!("inserting routes (stopped at {prefix})"))
}

/// The record key of an IPv4 prefix.
pub(super) fn key_v4(len: u8, a: std::net::Ipv4Addr) -> RouteKeyV4 {
    RouteKeyV4 {
        prefix_len: len.into(),
        addr: a.octets(),
    }
}

/// The /32 or /128 of one address.
pub(super) fn host_prefix(addr: IpAddr) -> Prefix {
    Prefix {
        addr,
        len: if addr.is_ipv4() { 32 } else { 128 },
    }
}

pub(super) fn dir24_error(e: Dir24Error) -> anyhow::Error {
    match e {
        Dir24Error::Tbl8Full => anyhow!(
            "the IPv4 table has no free tbl8 group: at most {} distinct /24s may hold prefixes longer than /24",
            pop_forwarder_common::dir24::TBL8_GROUPS
        ),
        Dir24Error::NextHopTooLarge => anyhow!("next-hop id does not fit the IPv4 table"),
        Dir24Error::BadLength => anyhow!("prefix length over 32"),
    }
}

impl Tables {
    /// The DIR-24-8 tables, if the program uses them.
    pub(super) fn dir24(&mut self) -> Result<Option<Dir24<'_>>> {
        if self.ipv4_lookup != Ipv4Lookup::Dir24 {
            return Ok(None);
        }
        if self.dir24.is_none() {
            self.dir24 = Some((
                Mmap::new(&self.tbl24, names::IPV4_TBL24, 8)?,
                Mmap::new(&self.tbl8, names::IPV4_TBL8, 8)?,
            ));
        }
        let (t24, t8) = self.dir24.as_mut().expect("mapped above");
        Ok(Some(Dir24 {
            tbl24: t24.slice(),
            tbl8: t8.slice(),
        }))
    }

    /// The IPv6 range table, if the program uses it. The first use maps it
    /// and builds the host's side from the record (the table may be an
    /// adopted one: blocks no chunk points at are free, after a grace
    /// period, since the previous writer may have retired them just now).
    pub(super) fn dxr6(&mut self) -> Result<Option<&mut Dxr6Host>> {
        if self.ipv6_lookup != Ipv6Lookup::Dxr {
            return Ok(None);
        }
        if self.dxr6.is_none() {
            let mut chunks = Mmap::new(
                &self.chunks6,
                names::IPV6_CHUNKS,
                dxr6_layout::CHUNK_WORDS * 8,
            )?;
            let mut ranges = Mmap::new(&self.ranges6, names::IPV6_RANGES, 8)?;
            let mut record = Vec::new();
            for item in self.routes_v6.iter() {
                let (key, target) = item.context("reading the IPv6 routes")?;
                record.push((
                    u128::from_be_bytes(key.data()),
                    key.prefix_len() as u8,
                    target.next_hop,
                ));
            }
            let tables = Tables6 {
                chunks: chunks.slice(),
                ranges: ranges.slice(),
            };
            let adopted = tables.chunks.iter().any(|&e| e != 0);
            let dxr = Dxr6::adopt(&tables, record).map_err(|e| anyhow!("{e}"))?;
            if adopted {
                std::thread::sleep(GRACE);
            }
            self.dxr6 = Some(Dxr6Host {
                chunks,
                ranges,
                dxr,
            });
        }
        Ok(self.dxr6.as_mut())
    }

    /// Adds (or repoints) an IPv6 route in the range table, if in use.
    pub(super) fn index_v6(&mut self, a: std::net::Ipv6Addr, len: u8, target: u32) -> Result<()> {
        self.edit_dxr6(|dxr, t| dxr.insert(t, u128::from(a), len, target))
    }

    /// Removes an IPv6 route from the range table, if in use.
    pub(super) fn unindex_v6(&mut self, a: std::net::Ipv6Addr, len: u8) -> Result<()> {
        self.edit_dxr6(|dxr, t| dxr.remove(t, u128::from(a), len))
    }

    /// Runs `edit` on the range table, if in use; again, once the resting
    /// blocks are free, if it ran out of room. Retires the block it
    /// replaced.
    fn edit_dxr6(
        &mut self,
        edit: impl Fn(&mut Dxr6, &mut Tables6<'_>) -> Result<Option<Block>, Dxr6Error>,
    ) -> Result<()> {
        let Some(host) = self.dxr6()? else {
            return Ok(());
        };
        let (dxr, mut t) = host.parts();
        let mut done = edit(dxr, &mut t);
        if done == Err(Dxr6Error::RangesFull) && !self.retired.blocks.is_empty() {
            self.reclaim_blocks(true)?;
            let (dxr, mut t) = self.dxr6()?.expect("in use").parts();
            done = edit(dxr, &mut t);
        }
        self.retire_block(done.map_err(|e| anyhow!("{e}"))?);
        Ok(())
    }

    fn retire_block(&mut self, block: Option<Block>) {
        if let Some(b) = block {
            self.retired.blocks.push((b, std::time::Instant::now()));
        }
    }

    /// Frees the range-table blocks retired at least `GRACE` ago (all of
    /// them, after waiting, if `wait`).
    pub(super) fn reclaim_blocks(&mut self, wait: bool) -> Result<()> {
        if wait {
            wait_out(&self.retired.blocks);
        }
        let blocks = settled(&mut self.retired.blocks);
        if blocks.is_empty() {
            return Ok(());
        }
        let host = self
            .dxr6()?
            .expect("blocks are retired only by the range table");
        for b in blocks {
            host.dxr.reclaim(b);
        }
        Ok(())
    }

    /// Whether a route to exactly `prefix` exists.
    pub fn is_routed(&self, prefix: Prefix) -> Result<bool> {
        Ok(self
            .longest_match(prefix)?
            .is_some_and(|t| t.prefix_len == u32::from(prefix.len)))
    }

    /// Whether the route to exactly `prefix` goes through `nh` (the same
    /// gateway on the same interface, or both the kernel's).
    pub fn routes_to(&self, prefix: Prefix, nh: &NextHop) -> Result<bool> {
        let Some(t) = self
            .longest_match(prefix)?
            .filter(|t| t.prefix_len == u32::from(prefix.len))
        else {
            return Ok(false);
        };
        if nh.flags & next_hops::NH_F_KERNEL != 0 {
            return Ok(t.next_hop == KERNEL_NEXT_HOP);
        }
        Ok(t.next_hop < MAX_NEXT_HOPS
            && self
                .next_hops
                .get(&t.next_hop, 0)
                .is_ok_and(|have| gateway_key(&have) == gateway_key(nh)))
    }

    /// Installs `prefix` -> route target `target` as it is: a next-hop id
    /// already written, `KERNEL_NEXT_HOP`, or an ECMP group
    /// (`ecmp::FIRST_GROUP_ID` + index) already written. Fails if the
    /// prefix is already routed.
    pub fn add_route_to(&mut self, prefix: Prefix, target: u32) -> Result<()> {
        self.refuse_local(prefix)?;
        self.insert_route(prefix, target)
    }

    /// Installs `prefix` -> `next_hop`. Fails if the prefix is already routed.
    pub fn add_route(&mut self, prefix: Prefix, next_hop: &NextHop) -> Result<u32> {
        self.refuse_local(prefix)?;
        let mut table = self.next_hop_table()?;
        let mut uses = self.uses(&self.operator_routes()?, &table);
        let id = self.acquire(&Want::One(*next_hop), &mut table, &mut uses)?;
        if let Err(e) = self.insert_route(prefix, id) {
            self.release(id, &mut uses, &mut table)?;
            return Err(e);
        }
        Ok(id)
    }

    pub(super) fn insert_route(&mut self, prefix: Prefix, next_hop: u32) -> Result<()> {
        self.failpoint("route")?;
        let target = RouteTarget {
            next_hop,
            prefix_len: prefix.len.into(),
        };
        // BPF_NOEXIST: the record (and the IPv6 trie) refuse an exact
        // duplicate prefix.
        let inserted = match prefix.addr {
            IpAddr::V4(a) => self
                .routes_v4
                .insert(key_v4(prefix.len, a), target, BPF_NOEXIST),
            IpAddr::V6(a) => self.routes_v6.insert(
                &Key::new(prefix.len.into(), a.octets()),
                target,
                BPF_NOEXIST,
            ),
        };
        match inserted {
            Ok(()) => {}
            Err(e) if os_error(&e) == Some(libc::EEXIST) => {
                bail!("a route to {prefix} already exists; delete it first")
            }
            Err(e) => return Err(e).with_context(|| format!("inserting the route to {prefix}")),
        }
        let indexed = match prefix.addr {
            IpAddr::V4(a) => self.index_v4(a, prefix.len, target),
            IpAddr::V6(a) => self.index_v6(a, prefix.len, next_hop),
        };
        if let Err(e) = indexed {
            let _ = match prefix.addr {
                IpAddr::V4(a) => self.routes_v4.remove(&key_v4(prefix.len, a)),
                IpAddr::V6(a) => self
                    .routes_v6
                    .remove(&Key::new(prefix.len.into(), a.octets())),
            };
            return Err(e).with_context(|| format!("inserting the route to {prefix}"));
        }
        if let Some(journal) = &mut self.journal {
            journal.push(Undo::RouteAdded(prefix));
        }
        Ok(())
    }

    /// Points the existing route to `prefix` at `target`: the record, then
    /// the structure the program reads.
    pub(super) fn write_route(&mut self, prefix: Prefix, target: RouteTarget) -> Result<()> {
        match prefix.addr {
            IpAddr::V4(a) => {
                self.routes_v4.insert(key_v4(prefix.len, a), target, 0)?;
                self.index_v4(a, prefix.len, target)
            }
            IpAddr::V6(a) => {
                let key = Key::new(prefix.len.into(), a.octets());
                let old = self.routes_v6.get(&key, 0)?;
                self.routes_v6.insert(&key, target, 0)?;
                self.index_v6(a, prefix.len, target.next_hop)
                    .inspect_err(|_| drop(self.routes_v6.insert(&key, old, 0)))
            }
        }
    }

    /// Adds an IPv4 route to the structure the program reads.
    pub(super) fn index_v4(
        &mut self,
        a: std::net::Ipv4Addr,
        len: u8,
        target: RouteTarget,
    ) -> Result<()> {
        match self.ipv4_lookup {
            Ipv4Lookup::Trie => self
                .trie_v4
                .insert(&Key::new(len.into(), a.octets()), target, 0)
                .map_err(Into::into),
            Ipv4Lookup::Dir24 => {
                let mut dir = self.dir24()?.expect("DIR-24-8 is in use");
                match dir.add(u32::from(a), len.into(), target.next_hop) {
                    // Groups resting after a removal: once their grace
                    // period is over they are free.
                    Err(Dir24Error::Tbl8Full) if !self.retired.groups.is_empty() => {
                        self.reclaim_groups(true)?;
                        let mut dir = self.dir24()?.expect("DIR-24-8 is in use");
                        dir.add(u32::from(a), len.into(), target.next_hop)
                            .map_err(dir24_error)
                    }
                    done => done.map_err(dir24_error),
                }
            }
        }
    }

    /// Retires the tbl8 groups no route points at: those a previous daemon
    /// retired and did not live to reclaim. Run when adopting pinned
    /// tables; they are freed `GRACE` later, like any retired group.
    pub fn retire_unreferenced_groups(&mut self) -> Result<usize> {
        let mut found = Vec::new();
        if let Some(dir) = self.dir24()? {
            dir.for_each_unreferenced_group(|g| found.push(g));
        }
        let now = std::time::Instant::now();
        for &g in &found {
            if !self.retired.groups.iter().any(|(r, _)| *r == g) {
                self.retired.groups.push((g, now));
            }
        }
        Ok(found.len())
    }

    /// Frees the tbl8 groups retired at least `GRACE` ago (all of them,
    /// after waiting, if `wait`).
    pub(super) fn reclaim_groups(&mut self, wait: bool) -> Result<()> {
        if wait {
            wait_out(&self.retired.groups);
        }
        let groups = settled(&mut self.retired.groups);
        if groups.is_empty() {
            return Ok(());
        }
        let mut dir = self
            .dir24()?
            .expect("groups are retired only under DIR-24-8");
        for g in groups {
            dir.reclaim(g);
        }
        Ok(())
    }

    /// Removes exactly `prefix`. For IPv4 its addresses then belong to the
    /// longest remaining prefix that covers them, found in the record.
    pub(super) fn remove_route(&mut self, prefix: Prefix) -> Result<()> {
        self.failpoint("route")?;
        let old = self.longest_match(prefix)?;
        let removed = match prefix.addr {
            IpAddr::V4(a) => self.routes_v4.remove(&key_v4(prefix.len, a)),
            IpAddr::V6(a) => self
                .routes_v6
                .remove(&Key::new(prefix.len.into(), a.octets())),
        };
        match removed {
            Ok(()) => {}
            Err(e)
                if matches!(e, aya::maps::MapError::KeyNotFound)
                    || os_error(&e) == Some(libc::ENOENT) =>
            {
                bail!("there is no route to {prefix}")
            }
            Err(e) => return Err(e).with_context(|| format!("removing the route to {prefix}")),
        }
        if let IpAddr::V6(a) = prefix.addr
            && let Err(e) = self.unindex_v6(a, prefix.len)
        {
            if let Some(old) = old {
                let _ = self
                    .routes_v6
                    .insert(&Key::new(prefix.len.into(), a.octets()), old, 0);
            }
            return Err(e).with_context(|| format!("removing the route to {prefix}"));
        }
        if let IpAddr::V4(a) = prefix.addr {
            match self.ipv4_lookup {
                Ipv4Lookup::Trie => self
                    .trie_v4
                    .remove(&Key::new(prefix.len.into(), a.octets()))
                    .with_context(|| format!("removing the route to {prefix} from the trie"))?,
                Ipv4Lookup::Dir24 => {
                    let covering = self.covering_v4(a, prefix.len)?;
                    let mut dir = self.dir24()?.expect("DIR-24-8 is in use");
                    if let Some(group) = dir
                        .remove(u32::from(a), prefix.len.into(), covering)
                        .map_err(dir24_error)?
                    {
                        self.retired.groups.push((group, std::time::Instant::now()));
                    }
                }
            }
        }
        if let (Some(journal), Some(old)) = (&mut self.journal, old) {
            journal.push(Undo::RouteRemoved(prefix, old));
        }
        Ok(())
    }

    /// The longest IPv4 route shorter than `len` covering `a`, as (next hop,
    /// length): at most `len` exact lookups in the record.
    pub(super) fn covering_v4(&self, a: std::net::Ipv4Addr, len: u8) -> Result<Option<(u32, u32)>> {
        for shorter in (0..len).rev() {
            let net = u32::from(a) & u32::MAX.checked_shl(32 - u32::from(shorter)).unwrap_or(0);
            match self.routes_v4.get(&key_v4(shorter, net.into()), 0) {
                Ok(t) => return Ok(Some((t.next_hop, t.prefix_len))),
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) if os_error(&e) == Some(libc::ENOENT) => {}
                Err(e) => return Err(e).context("looking up a covering route"),
            }
        }
        Ok(None)
    }

    /// Local addresses are the daemon's to route: refuses `prefix` if it is
    /// exactly one of them.
    pub(super) fn refuse_local(&self, prefix: Prefix) -> Result<()> {
        refuse_local(&self.local_addrs(), prefix)
    }

    /// Installs a whole set of routes, one next hop each; on any failure,
    /// removes what it added (routes, then the next hops it allocated) so
    /// the tables are as they were. The tries are written with
    /// BPF_MAP_UPDATE_BATCH, a syscall per chunk rather than per route.
    pub fn add_routes(&mut self, routes: &[(Prefix, NextHop)]) -> Result<()> {
        let wanted: Vec<(Prefix, Want)> =
            routes.iter().map(|(p, nh)| (*p, Want::One(*nh))).collect();
        self.add_wanted_routes(&wanted)
    }

    /// `add_routes` for routes through next hops or ECMP groups.
    pub fn add_wanted_routes(&mut self, routes: &[(Prefix, Want)]) -> Result<()> {
        // A batch update cannot refuse an existing key (elem_flags takes only
        // BPF_F_LOCK), so duplicates are found first: against what the
        // tries hold (few entries when a daemon starts) and within the batch.
        let mut present = self.prefixes()?;
        let mut table = self.next_hop_table()?;
        let mut uses = self.uses(&self.operator_routes()?, &table);
        let routes: Vec<&(Prefix, Want)> = routes.iter().collect();
        self.insert_new_routes(&routes, &mut present, &mut table, &mut uses)
    }

    /// `add_wanted_routes` given what the tries hold (`present`, which it
    /// extends), the tables as read and the uses of every target; each new
    /// route counted in `uses`.
    pub(super) fn insert_new_routes(
        &mut self,
        routes: &[&(Prefix, Want)],
        present: &mut PrefixSet,
        table: &mut NextHopTable,
        uses: &mut std::collections::HashMap<u32, usize>,
    ) -> Result<()> {
        let locals = self.local_addrs();
        let mut targets = Vec::with_capacity(routes.len());
        for (prefix, want) in routes {
            let found = refuse_local(&locals, *prefix)
                .and_then(|()| match present.insert(*prefix) {
                    true => Ok(()),
                    false => Err(anyhow!(
                        "a route to {prefix} already exists; delete it first"
                    )),
                })
                .and_then(|()| self.acquire(want, table, uses));
            match found {
                Ok(id) => targets.push(RouteTarget {
                    next_hop: id,
                    prefix_len: prefix.len.into(),
                }),
                Err(e) => {
                    for t in targets.iter().rev() {
                        let _ = self.release(t.next_hop, uses, table);
                    }
                    return Err(e);
                }
            }
        }
        let prefixes: Vec<Prefix> = routes.iter().map(|(p, _)| *p).collect();
        let mut inserted = Vec::with_capacity(routes.len());
        let result = self.insert_routes(&prefixes, &targets, &mut inserted);
        if let Some(journal) = &mut self.journal {
            journal.extend(inserted.iter().map(|p| Undo::RouteAdded(*p)));
        }
        if let Err(e) = result {
            for prefix in inserted.iter().rev() {
                let _ = self.remove_route(*prefix);
            }
            for t in targets.iter().rev() {
                let _ = self.release(t.next_hop, uses, table);
            }
            return Err(e);
        }
        Ok(())
    }

    /// Every prefix in the tries, local ones included.
    pub(super) fn prefixes(&self) -> Result<PrefixSet> {
        self.scanned();
        let v4 = self.routes_v4_all()?.into_iter().map(|(k, _)| {
            Ok(Prefix {
                addr: IpAddr::from(k.addr),
                len: k.prefix_len as u8,
            })
        });
        let v6 = self.routes_v6.keys().map(|k| {
            k.map(|k| Prefix {
                addr: IpAddr::from(k.data()),
                len: k.prefix_len() as u8,
            })
        });
        v4.chain(v6)
            .collect::<Result<_, _>>()
            .context("reading the route tables")
    }

    /// Writes `routes` into the tries in batches, then (IPv4) into DIR-24-8;
    /// records every prefix written in `inserted`.
    pub(super) fn insert_routes(
        &mut self,
        routes: &[Prefix],
        targets: &[RouteTarget],
        inserted: &mut Vec<Prefix>,
    ) -> Result<()> {
        const CHUNK: usize = 1 << 16;
        self.failpoint("route")?;
        let (v4, v6): (Vec<usize>, Vec<usize>) =
            (0..routes.len()).partition(|&i| routes[i].addr.is_ipv4());
        for chunk in v4.chunks(CHUNK) {
            let v4_of = |i: usize| match routes[i].addr {
                IpAddr::V4(a) => (a, routes[i].len),
                IpAddr::V6(_) => unreachable!("partitioned by family"),
            };
            let keys: Vec<RouteKeyV4> = chunk
                .iter()
                .map(|&i| {
                    let (a, len) = v4_of(i);
                    key_v4(len, a)
                })
                .collect();
            let values: Vec<RouteTarget> = chunk.iter().map(|&i| targets[i]).collect();
            let result = update_batch(self.routes_v4_fd.as_fd(), &keys, &values);
            let done = result.as_ref().err().map_or(chunk.len(), |(n, _)| *n);
            inserted.extend(chunk[..done].iter().map(|&i| routes[i]));
            // Then the structure the program reads.
            match self.ipv4_lookup {
                Ipv4Lookup::Trie => {
                    let keys: Vec<Key<[u8; 4]>> = chunk[..done]
                        .iter()
                        .map(|&i| {
                            let (a, len) = v4_of(i);
                            Key::new(len.into(), a.octets())
                        })
                        .collect();
                    if let Err((n, e)) =
                        update_batch(self.trie_v4_fd.as_fd(), &keys, &values[..done])
                    {
                        return Err(batch_error(routes[chunk[n.min(done.saturating_sub(1))]], e));
                    }
                }
                Ipv4Lookup::Dir24 => {
                    let mut dir = self.dir24()?.expect("DIR-24-8 is in use");
                    for &i in &chunk[..done] {
                        let (a, len) = v4_of(i);
                        dir.add(u32::from(a), len.into(), targets[i].next_hop)
                            .map_err(dir24_error)
                            .with_context(|| format!("inserting the route to {}", routes[i]))?;
                    }
                }
            }
            if let Err((n, e)) = result {
                return Err(batch_error(routes[chunk[n.min(chunk.len() - 1)]], e));
            }
        }
        for chunk in v6.chunks(CHUNK) {
            let keys: Vec<Key<[u8; 16]>> = chunk
                .iter()
                .map(|&i| match routes[i].addr {
                    IpAddr::V6(a) => Key::new(routes[i].len.into(), a.octets()),
                    IpAddr::V4(_) => unreachable!("partitioned by family"),
                })
                .collect();
            let values: Vec<RouteTarget> = chunk.iter().map(|&i| targets[i]).collect();
            let result = update_batch(self.routes_v6_fd.as_fd(), &keys, &values);
            let done = result.as_ref().err().map_or(chunk.len(), |(n, _)| *n);
            inserted.extend(chunk[..done].iter().map(|&i| routes[i]));
            // Then the range table, each /20 rebuilt once. Routes it could
            // not take stay in the record and in `inserted`: the change's
            // undo removes them from both.
            if let Some(host) = self.dxr6()? {
                let batch: Vec<(u128, u8, u32)> = chunk[..done]
                    .iter()
                    .map(|&i| match routes[i].addr {
                        IpAddr::V6(a) => (u128::from(a), routes[i].len, targets[i].next_hop),
                        IpAddr::V4(_) => unreachable!("partitioned by family"),
                    })
                    .collect();
                let (dxr, mut t) = host.parts();
                let mut retired = Vec::new();
                let mut written = dxr.insert_many(&mut t, &batch, &mut retired);
                if let Err((Dxr6Error::RangesFull, left)) = &written
                    && !self.retired.blocks.is_empty()
                {
                    let left: HashSet<(u128, u8)> = left.iter().copied().collect();
                    let rest: Vec<_> = batch
                        .iter()
                        .filter(|(a, l, _)| left.contains(&(*a, *l)))
                        .copied()
                        .collect();
                    let now = std::time::Instant::now();
                    self.retired
                        .blocks
                        .extend(retired.drain(..).map(|b| (b, now)));
                    self.reclaim_blocks(true)?;
                    let (dxr, mut t) = self.dxr6()?.expect("in use").parts();
                    written = dxr.insert_many(&mut t, &rest, &mut retired);
                }
                let now = std::time::Instant::now();
                self.retired
                    .blocks
                    .extend(retired.into_iter().map(|b| (b, now)));
                if let Err((e, left)) = written {
                    let err = anyhow!("{e}");
                    return Err(match left.first() {
                        Some(&(a, l)) => err.context(format!(
                            "inserting the route to {}/{l} (and {} more)",
                            std::net::Ipv6Addr::from(a),
                            left.len() - 1
                        )),
                        None => err,
                    });
                }
            }
            if let Err((n, e)) = result {
                return Err(batch_error(routes[chunk[n.min(chunk.len() - 1)]], e));
            }
        }
        Ok(())
    }

    /// The next-hop id the longest prefix covering `prefix` points at.
    /// The route for `prefix`: exact for IPv4 (the record); the longest
    /// match covering it for IPv6 (the trie), which is `prefix` itself when
    /// it is routed.
    pub(super) fn longest_match(&self, prefix: Prefix) -> Result<Option<RouteTarget>> {
        let got = match prefix.addr {
            IpAddr::V4(a) => self.routes_v4.get(&key_v4(prefix.len, a), 0),
            IpAddr::V6(a) => self
                .routes_v6
                .get(&Key::new(prefix.len.into(), a.octets()), 0),
        };
        match got {
            Ok(t) => Ok(Some(t)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) if os_error(&e) == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e).context("looking up a route"),
        }
    }

    /// Removes the route to exactly `prefix`, and its next hop if no other
    /// route uses it.
    pub fn del_route(&mut self, prefix: Prefix) -> Result<()> {
        self.refuse_local(prefix)?;
        // If the exact prefix is routed, this is its target; if it is not,
        // the removal below says so.
        let id = self.longest_match(prefix)?.map(|t| t.next_hop);
        let mut table = self.next_hop_table()?;
        let mut uses = self.uses(&self.operator_routes()?, &table);
        self.remove_route(prefix)?;
        if let Some(id) = id {
            self.release(id, &mut uses, &mut table)?;
        }
        Ok(())
    }

    /// The IPv4 record, whole: batched, a syscall per 16,384 routes.
    pub(super) fn routes_v4_all(&self) -> Result<Vec<(RouteKeyV4, RouteTarget)>> {
        lookup_all(self.routes_v4_fd.as_fd()).context("reading IPv4 routes")
    }

    /// Operator routes (local addresses left out) and their next-hop ids,
    /// IPv4 first, each family in address order.
    pub(super) fn operator_routes(&self) -> Result<Vec<(Prefix, u32)>> {
        self.scanned();
        let mut v4 = self.routes_v4_all()?;
        v4.sort_by_key(|(k, _)| (k.addr, k.prefix_len));
        let mut v6: Vec<_> = self
            .routes_v6
            .iter()
            .collect::<Result<_, _>>()
            .context("reading IPv6 routes")?;
        v6.sort_by_key(|(k, _)| (k.data(), k.prefix_len()));
        let v4 = v4.into_iter().map(|(k, t)| {
            (
                Prefix {
                    addr: IpAddr::from(k.addr),
                    len: k.prefix_len as u8,
                },
                t.next_hop,
            )
        });
        let v6 = v6.into_iter().map(|(k, t)| {
            (
                Prefix {
                    addr: IpAddr::from(k.data()),
                    len: k.prefix_len() as u8,
                },
                t.next_hop,
            )
        });
        Ok(v4
            .chain(v6)
            .filter(|(_, id)| *id != LOCAL_NEXT_HOP)
            .collect())
    }

    /// Every operator route, IPv4 first, with its next hop described.
    pub fn routes(&self, links: &[Link]) -> Result<Vec<RouteEntry>> {
        let table = self.next_hop_table()?;
        let (slots, groups) = (table.slots, table.groups);
        Ok(self
            .operator_routes()?
            .into_iter()
            .map(|(prefix, id)| {
                let nh = slots
                    .get(id as usize)
                    .copied()
                    .unwrap_or(NextHop::default_free());
                let via = if id == KERNEL_NEXT_HOP {
                    "kernel".to_owned()
                } else if let Some(group) = ecmp::group_index(id) {
                    // "group 3 (10.0.2.2 r1 x1, 10.0.3.2 r2 x1)"
                    let g = groups
                        .get(group as usize)
                        .copied()
                        .unwrap_or(bytemuck::Zeroable::zeroed());
                    let members: Vec<String> = (0..g.count as usize)
                        .map(|m| {
                            let nh = slots
                                .get(usize::from(g.members[m]))
                                .copied()
                                .unwrap_or(NextHop::default_free());
                            format!(
                                "{} {} x{}",
                                gateway_addr(&nh),
                                ifname(links, nh.ifindex),
                                g.weights[m]
                            )
                        })
                        .collect();
                    format!("group {group} ({})", members.join(", "))
                } else if nh.flags & NH_F_CONNECTED != 0 {
                    "connected".to_owned()
                } else {
                    gateway_addr(&nh).to_string()
                };
                RouteEntry {
                    prefix: prefix.to_string(),
                    next_hop: id,
                    via,
                    dev: if nh.is_in_use() {
                        ifname(links, nh.ifindex)
                    } else {
                        "-".to_owned()
                    },
                    mac: nh.mac_valid().then(|| Mac(nh.dst_mac).to_string()),
                    mac_static: nh.flags & NH_F_MAC_STATIC != 0,
                }
            })
            .collect())
    }

    /// Makes the operator routes exactly `desired` (a reloaded config):
    /// adds the new prefixes first, as one batch that is undone whole if it
    /// fails; then points changed prefixes at their new next hops in place
    /// (no moment without a route); then deletes the prefixes no longer
    /// wanted. Returns (added, changed, deleted).
    pub fn apply_routes(&mut self, desired: &[(Prefix, Want)]) -> Result<(usize, usize, usize)> {
        self.change_routes(desired, true)
    }

    /// Adds the routes of `routes` not there yet and points those there at
    /// their new target in place; leaves every other route as it is.
    /// Returns (added, changed).
    pub fn upsert_routes(&mut self, routes: &[(Prefix, Want)]) -> Result<(usize, usize)> {
        let (added, changed, _) = self.change_routes(routes, false)?;
        Ok((added, changed))
    }

    /// `apply_routes` (`whole`: the routes not in `desired` go) or
    /// `upsert_routes` (they stay).
    fn change_routes(
        &mut self,
        desired: &[(Prefix, Want)],
        whole: bool,
    ) -> Result<(usize, usize, usize)> {
        // One walk over the routes and one read of the next-hop and group
        // tables serve the whole change: it costs in proportion to its
        // routes, never to routes times routes.
        let ops = self.operator_routes()?;
        let mut table = self.next_hop_table()?;
        let mut uses = self.uses(&ops, &table);
        let only: Option<PrefixSet> = (!whole).then(|| desired.iter().map(|(p, _)| *p).collect());
        // Each route's target id and family, and what each of those is
        // (read once each: a few next hops and groups serve a million
        // routes, and a copy of one per route would be 56 bytes each).
        let current: crate::net::PrefixMap<(u32, u32)> = ops
            .iter()
            .filter(|(p, _)| only.as_ref().is_none_or(|only| only.contains(p)))
            .map(|&(p, id)| (p, (id, if p.addr.is_ipv4() { AF_INET } else { AF_INET6 })))
            .collect();
        let mut targets: std::collections::HashMap<(u32, u32), Want> =
            std::collections::HashMap::new();
        for &(id, family) in current.values() {
            targets
                .entry((id, family))
                .or_insert_with(|| table.want_of(id, family));
        }
        let RoutePlan { new, changed, gone } =
            plan_routes(&current, desired, |have, want| targets[have].same(want));
        let locals = self.local_addrs();
        let v4 = ops.iter().filter(|(p, _)| p.addr.is_ipv4()).count();
        self.check_room(&new, &changed, &table, (v4, ops.len() - v4), &locals)?;
        // A new prefix is in no route now: `current` holds every route
        // (or, for an upsert, every one to a prefix of `desired`), and the
        // plan's new ones are those it lacks. So what a new route may
        // collide with is this box's own addresses and the batch itself,
        // not a set of every route (a million inserts a reload).
        let mut present: PrefixSet = locals.iter().map(|a| host_prefix(*a)).collect();
        self.insert_new_routes(&new, &mut present, &mut table, &mut uses)?;
        for (prefix, want) in changed.iter().copied() {
            let old = current[prefix].0;
            if self.repoint_route(*prefix, old, want, &mut table, &mut uses)? {
                self.release(old, &mut uses, &mut table)?;
            }
        }
        for prefix in &gone {
            self.remove_route(*prefix)?;
            self.release(current[prefix].0, &mut uses, &mut table)?;
        }
        Ok((new.len(), changed.len(), gone.len()))
    }

    /// Refuses a change of the operator routes that would not fit, before
    /// its first write: new next hops beyond the free slots, routes beyond
    /// the tables' sizes, /24s cut up by longer prefixes beyond the free
    /// tbl8 groups. Routes that go are not counted as room: they are deleted
    /// last, once everything new is in place.
    pub(super) fn check_room(
        &mut self,
        new: &[&(Prefix, Want)],
        changed: &[&(Prefix, Want)],
        table: &NextHopTable,
        (op_v4, op_v6): (usize, usize),
        locals: &HashSet<IpAddr>,
    ) -> Result<()> {
        let gateways: HashSet<GatewayKey> = new
            .iter()
            .chain(changed)
            .flat_map(|(_, want)| want.next_hops())
            .filter(|nh| nh.flags & next_hops::NH_F_KERNEL == 0)
            .map(|nh| gateway_key(&nh))
            .filter(|k| !table.by_gateway.contains_key(k))
            .collect();
        let free = table.slots.iter().filter(|nh| !nh.is_in_use()).count();
        if gateways.len() > free {
            bail!(
                "the change needs {} new next hops; the next-hop table has {free} free of {MAX_NEXT_HOPS}",
                gateways.len()
            );
        }
        let groups: HashSet<GroupKey> = new
            .iter()
            .chain(changed)
            .filter_map(|(_, want)| want.group_key())
            .filter(|k| !table.by_group.contains_key(k))
            .collect();
        let free = table.groups.iter().filter(|g| g.count == 0).count();
        if groups.len() > free {
            bail!(
                "the change needs {} new ECMP groups; the group table has {free} free of {}",
                groups.len(),
                ecmp::MAX_GROUPS
            );
        }
        let new_v4: Vec<(u32, u32)> = new
            .iter()
            .filter_map(|(p, _)| match p.addr {
                IpAddr::V4(a) => Some((u32::from(a), u32::from(p.len))),
                IpAddr::V6(_) => None,
            })
            .collect();
        let local_v4 = locals.iter().filter(|a| a.is_ipv4()).count();
        let v4 = op_v4 + local_v4 + new_v4.len();
        let v6 = op_v6 + (locals.len() - local_v4) + (new.len() - new_v4.len());
        for (family, n, max) in [("IPv4", v4, MAX_ROUTES_V4), ("IPv6", v6, MAX_ROUTES_V6)] {
            if n > max as usize {
                bail!("the change makes {n} {family} routes; the table holds {max}");
            }
        }
        // The IPv6 range table: the blocks the /20s the change touches
        // would take (new routes, and changed ones: a repointed route's /20
        // is rebuilt too).
        let v6: Vec<(u128, u8)> = new
            .iter()
            .chain(changed)
            .filter_map(|(p, _)| match p.addr {
                IpAddr::V6(a) => Some((u128::from(a), p.len)),
                IpAddr::V4(_) => None,
            })
            .collect();
        if !v6.is_empty() && self.dxr6()?.is_some() {
            let room = |t: &mut Tables| t.dxr6().map(|h| h.expect("in use").dxr.room_for(&v6));
            let mut room_now = room(self)?;
            if room_now == Err(Dxr6Error::RangesFull) && !self.retired.blocks.is_empty() {
                // Blocks resting after a change will do, once rested.
                self.reclaim_blocks(true)?;
                room_now = room(self)?;
            }
            match room_now {
                Ok(_) => {}
                Err(Dxr6Error::RangesFull) => {
                    let free = self.dxr6()?.expect("in use").dxr.free_ranges();
                    bail!(
                        "the change's IPv6 routes need more of the range table than is free ({free} of {} slots; see README, The IPv6 range table)",
                        dxr6_layout::RANGE_SLOTS
                    )
                }
                Err(e) => bail!("the change's IPv6 routes: {e}"),
            }
        }
        if !self.retired.groups.is_empty() {
            self.reclaim_groups(false)?;
        }
        if let Some(dir) = self.dir24()? {
            let cut: HashSet<u32> = new_v4
                .iter()
                .filter(|(a, len)| dir.needs_group(*a, *len))
                .map(|(a, _)| dir24_layout::tbl24_index(*a))
                .collect();
            let mut free = TBL8_GROUPS - dir.groups_in_use();
            if cut.len() as u32 > free && !self.retired.groups.is_empty() {
                // Groups resting after a removal will do, once rested.
                self.reclaim_groups(true)?;
                let dir = self.dir24()?.expect("DIR-24-8 is in use");
                free = TBL8_GROUPS - dir.groups_in_use();
            }
            if cut.len() as u32 > free {
                bail!(
                    "the change cuts up {} more /24s with longer prefixes, each taking a DIR-24-8 tbl8 group; {free} of {TBL8_GROUPS} are free",
                    cut.len()
                );
            }
        }
        Ok(())
    }

    /// Points the existing route to `prefix`, now through next hop `old`,
    /// at `next_hop`, overwriting it where the program reads it (no moment
    /// without a route). Returns the next-hop id it now uses; the caller
    /// releases `old` if that differs.
    pub(super) fn repoint_route(
        &mut self,
        prefix: Prefix,
        old: u32,
        want: &Want,
        table: &mut NextHopTable,
        uses: &mut std::collections::HashMap<u32, usize>,
    ) -> Result<bool> {
        // Same gateway, new static MAC: the next hop itself changes, for
        // every route through it (a config gives a gateway one MAC).
        if let Want::One(next_hop) = want
            && next_hop.flags & next_hops::NH_F_KERNEL == 0
            && table
                .slots
                .get(old as usize)
                .is_some_and(|have| have.is_in_use() && gateway_key(have) == gateway_key(next_hop))
        {
            self.write_next_hop(old, next_hop)?;
            table.slots[old as usize] = *next_hop;
            return Ok(false);
        }
        let id = self.acquire(want, table, uses)?;
        let target = RouteTarget {
            next_hop: id,
            prefix_len: prefix.len.into(),
        };
        self.failpoint("route")?;
        if let Some(journal) = &mut self.journal {
            journal.push(Undo::RouteReplaced(
                prefix,
                RouteTarget {
                    next_hop: old,
                    prefix_len: prefix.len.into(),
                },
            ));
        }
        self.write_route(prefix, target)?;
        Ok(true)
    }

    /// Changes the routes of `patch` alone: each prefix to its Want (added,
    /// or repointed in place), or removed (None). Costs in proportion to
    /// the patch, not to the tables: next hops and groups no route uses any
    /// more are not freed here but by `sweep_unused`, which runs first if
    /// the patch needs more free slots than there are. A prefix that is one
    /// of this box's addresses is left alone. Returns (added, changed,
    /// removed).
    pub fn patch_routes(
        &mut self,
        patch: &[(Prefix, Option<Want>)],
    ) -> Result<(usize, usize, usize)> {
        let mut table = self.next_hop_table()?;
        let wants: Vec<&Want> = patch.iter().filter_map(|(_, w)| w.as_ref()).collect();
        let hops: HashSet<GatewayKey> = wants
            .iter()
            .flat_map(|w| w.next_hops())
            .filter(|nh| nh.flags & next_hops::NH_F_KERNEL == 0)
            .map(|nh| gateway_key(&nh))
            .filter(|k| !table.by_gateway.contains_key(k))
            .collect();
        let groups: HashSet<GroupKey> = wants
            .iter()
            .filter_map(|w| w.group_key())
            .filter(|k| !table.by_group.contains_key(k))
            .collect();
        let free_hops = table.slots.iter().filter(|nh| !nh.is_in_use()).count();
        let free_groups = table.groups.iter().filter(|g| g.count == 0).count();
        if hops.len() > free_hops || groups.len() > free_groups {
            self.sweep_unused()?;
            table = self.next_hop_table()?;
        }
        let locals = self.local_addrs();
        let mut scratch = std::collections::HashMap::new();
        let (mut added, mut changed, mut removed) = (0, 0, 0);
        for (prefix, want) in patch {
            if *prefix == host_prefix(prefix.addr) && locals.contains(&prefix.addr) {
                continue;
            }
            let routed = self.is_routed(*prefix)?;
            match want {
                Some(want) if routed => {
                    let old = self.longest_match(*prefix)?.map_or(0, |t| t.next_hop);
                    self.repoint_route(*prefix, old, want, &mut table, &mut scratch)?;
                    changed += 1;
                }
                Some(want) => {
                    let id = self.acquire(want, &mut table, &mut scratch)?;
                    self.insert_route(*prefix, id)?;
                    added += 1;
                }
                None if routed => {
                    self.remove_route(*prefix)?;
                    removed += 1;
                }
                None => {}
            }
        }
        Ok((added, changed, removed))
    }

    /// Frees the next hops and ECMP groups no route uses (left by
    /// `patch_routes`). One walk over the routes. Returns (next hops,
    /// groups) freed.
    pub fn sweep_unused(&mut self) -> Result<(usize, usize)> {
        let ops = self.operator_routes()?;
        let table = self.next_hop_table()?;
        let mut uses = self.uses(&ops, &table);
        let mut groups = 0;
        for (index, g) in table.groups.iter().enumerate() {
            let id = ecmp::FIRST_GROUP_ID + index as u32;
            if g.count == 0 || uses.get(&id).copied().unwrap_or(0) > 0 {
                continue;
            }
            self.write_group(index as u32, &bytemuck::Zeroable::zeroed())?;
            self.retired
                .ecmp
                .push((index as u32, std::time::Instant::now()));
            groups += 1;
            for m in 0..g.count as usize {
                if let Some(n) = uses.get_mut(&u32::from(g.members[m])) {
                    *n = n.saturating_sub(1);
                }
            }
        }
        let mut hops = 0;
        for (id, nh) in table.slots.iter().enumerate() {
            if nh.is_in_use() && uses.get(&(id as u32)).copied().unwrap_or(0) == 0 {
                self.free_next_hop(id as u32)?;
                hops += 1;
            }
        }
        Ok((hops, groups))
    }

    /// Operator routes per family (local addresses not counted).
    pub fn route_counts(&self) -> (usize, usize) {
        self.scanned();
        let operator = |t: RouteTarget| t.next_hop != LOCAL_NEXT_HOP;
        (
            self.routes_v4_all()
                .unwrap_or_default()
                .into_iter()
                .filter(|(_, t)| operator(*t))
                .count(),
            self.routes_v6
                .iter()
                .filter_map(Result::ok)
                .filter(|(_, t)| operator(*t))
                .count(),
        )
    }

    /// Makes this box's addresses exactly `addrs`: each is a /32 or /128
    /// route to LOCAL_NEXT_HOP (so the program's one route lookup also says
    /// "ours"), recorded in the LOCAL maps. Returns the addresses that could
    /// not be made local because an operator route to exactly that /32 or
    /// /128 exists.
    pub fn sync_local_addrs(&mut self, addrs: &[IpAddr]) -> Result<Vec<IpAddr>> {
        let want: HashSet<IpAddr> = addrs.iter().copied().collect();
        let have = self.local_addrs();
        let mut conflicts = Vec::new();
        for addr in want.difference(&have) {
            let prefix = host_prefix(*addr);
            match self.insert_route(prefix, LOCAL_NEXT_HOP) {
                Ok(()) => {}
                Err(_)
                    if self
                        .longest_match(prefix)?
                        .is_some_and(|t| t.prefix_len == u32::from(prefix.len)) =>
                {
                    conflicts.push(*addr);
                    continue;
                }
                Err(e) => return Err(e).with_context(|| format!("making {addr} local")),
            }
            self.journal("local", |_| Undo::Local(*addr, false))?;
            match addr {
                IpAddr::V4(a) => self.local_v4.insert(a.octets(), 1, 0),
                IpAddr::V6(a) => self.local_v6.insert(a.octets(), 1, 0),
            }
            .with_context(|| format!("recording local address {addr}"))?;
        }
        for addr in have.difference(&want) {
            self.remove_route(host_prefix(*addr))
                .with_context(|| format!("removing local address {addr}"))?;
            self.journal("local", |_| Undo::Local(*addr, true))?;
            match addr {
                IpAddr::V4(a) => self.local_v4.remove(&a.octets()),
                IpAddr::V6(a) => self.local_v6.remove(&a.octets()),
            }
            .with_context(|| format!("forgetting local address {addr}"))?;
        }
        Ok(conflicts)
    }

    /// This box's addresses as the tables know them.
    pub fn local_addrs(&self) -> HashSet<IpAddr> {
        let v4 = self
            .local_v4
            .keys()
            .filter_map(Result::ok)
            .map(IpAddr::from);
        let v6 = self
            .local_v6
            .keys()
            .filter_map(Result::ok)
            .map(IpAddr::from);
        v4.chain(v6).collect()
    }
}
