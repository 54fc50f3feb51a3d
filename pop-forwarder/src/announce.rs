//! VIP announcement: while this forwarder can serve a VIP, a route to its
//! address (a blackhole /32 or /128, protocol `RTPROT_POP_FORWARDER`) sits
//! in a kernel routing table of its own (`vip_route_table`), which a BGP
//! daemon on the box exports to the PoP's routers. Nothing routes by that
//! table (no `ip rule` points at it): it is a list of what to announce, kept
//! where BIRD's and FRR's kernel imports already look.
//!
//! The daemon owns only the routes of its protocol. A route to a VIP that
//! someone else put in the table (another protocol, or the same prefix of
//! another type) is left alone and reported; the VIP still steers.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use anyhow::{Context as _, Result};
use netlink_packet_core::NLM_F_CREATE;
use netlink_packet_core::NLM_F_EXCL;
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
        RouteType,
    },
};

use crate::{kernel, netlink};

/// The route protocol number of announced VIP routes (`ip route show proto
/// 201`); iproute2 names it if `201 pop-forwarder` is in
/// /etc/iproute2/rt_protos.d/.
pub const RTPROT_POP_FORWARDER: u8 = 201;

/// Tables a VIP route table cannot be: unspecified, default, main, local.
pub fn check_table(table: u32) -> Result<(), String> {
    match table {
        0 | 253 | 254 | 255 => Err(format!(
            "{table} is a table the kernel routes by (0 unspecified, 253 default, 254 main, 255 local); give a table of its own (1 to 252, or 256 up)"
        )),
        _ => Ok(()),
    }
}

/// Routes to each address in `table`: `Some(true)` if one of them is ours.
fn routes_in(table: u32) -> Result<BTreeMap<IpAddr, bool>> {
    let mut out = BTreeMap::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        // Only table T's routes: a box with the Internet's routes in its
        // main table must not read them all to announce a VIP.
        let mut request = RouteMessage::default();
        request.header.address_family = family;
        request.header.table = u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
        request.attributes.push(RouteAttribute::Table(table));
        let dumped = netlink::dump_filtered(RouteNetlinkMessage::GetRoute(request))
            .with_context(|| format!("reading routing table {table} (rtnetlink)"))?;
        for m in dumped {
            let RouteNetlinkMessage::NewRoute(m) = m else {
                continue;
            };
            if kernel::route_table(&m) != table {
                continue;
            }
            let full = match m.header.address_family {
                AddressFamily::Inet => 32,
                AddressFamily::Inet6 => 128,
                _ => continue,
            };
            if m.header.destination_prefix_length != full {
                continue;
            }
            let Some(addr) = m.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
                RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
                _ => None,
            }) else {
                continue;
            };
            let ours = m.header.protocol == RouteProtocol::Other(RTPROT_POP_FORWARDER)
                && m.header.kind == RouteType::BlackHole;
            *out.entry(addr).or_insert(false) |= ours;
        }
    }
    Ok(out)
}

fn message(addr: IpAddr, table: u32) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header = RouteHeader {
        address_family: match addr {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        },
        destination_prefix_length: if addr.is_ipv4() { 32 } else { 128 },
        // Tables past 255 go in RTA_TABLE, which the kernel reads first.
        table: u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC),
        protocol: RouteProtocol::Other(RTPROT_POP_FORWARDER),
        scope: RouteScope::Universe,
        kind: RouteType::BlackHole,
        ..Default::default()
    };
    m.attributes.push(RouteAttribute::Destination(match addr {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }));
    m.attributes.push(RouteAttribute::Table(table));
    m
}

/// What one reconciliation did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Synced {
    /// Announced now.
    pub added: Vec<IpAddr>,
    /// Withdrawn now.
    pub withdrawn: Vec<IpAddr>,
    /// Wanted, but the table has a route to the address that is not ours
    /// (left alone): not announced by this forwarder.
    pub conflicts: Vec<IpAddr>,
}

/// Brings the daemon's routes in `table` to exactly `want`: adds the
/// missing, deletes the unwanted (only its own protocol's). Every address
/// is tried; the first error is returned after the rest were done.
pub fn sync(table: u32, want: &BTreeSet<IpAddr>) -> Result<Synced> {
    let present = routes_in(table)?;
    let mut done = Synced::default();
    let mut first_error = None;
    for (&addr, &ours) in &present {
        if ours && !want.contains(&addr) {
            match netlink::change(RouteNetlinkMessage::DelRoute(message(addr, table)), 0) {
                Ok(()) => done.withdrawn.push(addr),
                // Gone already: what was wanted.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => {
                    first_error.get_or_insert_with(|| {
                        anyhow::Error::new(e)
                            .context(format!("withdrawing VIP {addr} from routing table {table}"))
                    });
                }
            }
        }
    }
    for &addr in want {
        match present.get(&addr) {
            Some(true) => continue,
            Some(false) => {
                done.conflicts.push(addr);
                continue;
            }
            None => {}
        }
        match netlink::change(
            RouteNetlinkMessage::NewRoute(message(addr, table)),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Ok(()) => done.added.push(addr),
            // Someone added a route to it since the dump.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => done.conflicts.push(addr),
            Err(e) => {
                first_error.get_or_insert_with(|| {
                    anyhow::Error::new(e)
                        .context(format!("announcing VIP {addr} in routing table {table}"))
                });
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(done),
    }
}

/// Withdraws every route of this daemon's protocol from `table`.
pub fn withdraw_all(table: u32) -> Result<Vec<IpAddr>> {
    Ok(sync(table, &BTreeSet::new())?.withdrawn)
}

/// The addresses announced in `table` now (routes of this daemon's
/// protocol), for `status` and `vip list`.
pub fn announced(table: u32) -> Result<BTreeSet<IpAddr>> {
    Ok(routes_in(table)?
        .into_iter()
        .filter_map(|(a, ours)| ours.then_some(a))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on a thread of its own in a new, empty network namespace
    /// (unshare affects only the calling thread), which goes with it.
    fn in_private_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            // SAFETY: unshare(2) of this thread's network namespace.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "unshare(CLONE_NEWNET) needs root");
            f()
        })
        .join()
        .unwrap()
    }

    #[test]
    fn vip_routes_are_added_withdrawn_and_others_left_alone_in_any_table() {
        in_private_netns(|| {
            let a: IpAddr = "192.0.2.10".parse().unwrap();
            let b: IpAddr = "2001:db8::10".parse().unwrap();
            // Table numbers past 255 travel in RTA_TABLE.
            for table in [100, 1000] {
                let want = BTreeSet::from([a, b]);
                let done = sync(table, &want).unwrap();
                assert_eq!(done.added, vec![a, b]);
                assert_eq!(announced(table).unwrap(), want);
                // Nothing to do the second time.
                assert_eq!(sync(table, &want).unwrap(), Synced::default());
                let done = sync(table, &BTreeSet::from([b])).unwrap();
                assert_eq!(done.withdrawn, vec![a]);
                assert_eq!(withdraw_all(table).unwrap(), vec![b]);
                assert!(announced(table).unwrap().is_empty());
            }
            // Another protocol's route to a VIP (a blackhole of proto
            // static, as `ip route add blackhole` makes): a conflict, left
            // in place, and never withdrawn.
            let mut theirs = message(a, 100);
            theirs.header.protocol = RouteProtocol::Static;
            netlink::change(
                RouteNetlinkMessage::NewRoute(theirs),
                NLM_F_CREATE | NLM_F_EXCL,
            )
            .unwrap();
            let done = sync(100, &BTreeSet::from([a])).unwrap();
            assert_eq!(done.conflicts, vec![a]);
            assert!(announced(100).unwrap().is_empty());
            assert!(withdraw_all(100).unwrap().is_empty());
            assert_eq!(routes_in(100).unwrap().get(&a), Some(&false));
        });
    }

    #[test]
    fn tables_the_kernel_routes_by_are_refused() {
        for t in [0, 253, 254, 255] {
            assert!(check_table(t).is_err(), "{t}");
        }
        assert!(check_table(100).is_ok());
    }
}
