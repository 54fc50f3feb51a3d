//! Planning a change of the route tables: what must be added, repointed and
//! deleted to go from what the tables hold to what is wanted. Pure, so it is
//! unit-tested without the kernel; `tables` carries a plan out.

use std::collections::{HashMap, HashSet};

use pop_forwarder_common::{NH_F_MAC_STATIC, NextHop};

use crate::net::Prefix;

/// One gateway on one interface is one next hop.
pub type GatewayKey = (u32, u32, [u8; 16]);

pub fn gateway_key(nh: &NextHop) -> GatewayKey {
    (nh.ifindex, nh.family, nh.gateway)
}

/// Whether a route already at `have` needs no change to reach `want`: the
/// same gateway on the same interface and the same static MAC (a learned
/// MAC is the kernel's to change, not the config's).
pub fn same_next_hop(have: &NextHop, want: &NextHop) -> bool {
    let static_mac = |nh: &NextHop| (nh.flags & NH_F_MAC_STATIC != 0).then_some(nh.dst_mac);
    gateway_key(have) == gateway_key(want) && static_mac(have) == static_mac(want)
}

/// What a change of the operator routes does.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RoutePlan {
    /// Prefixes not routed now, in the order wanted.
    pub new: Vec<(Prefix, NextHop)>,
    /// Prefixes routed now through another next hop, in the order wanted.
    pub changed: Vec<(Prefix, NextHop)>,
    /// Prefixes routed now and not wanted.
    pub gone: Vec<Prefix>,
}

/// The plan from `current` (each routed prefix with its next hop as the
/// tables hold it) to `desired` (validated: each prefix once). Linear in
/// both.
pub fn plan_routes<T>(
    current: &HashMap<Prefix, (T, NextHop)>,
    desired: &[(Prefix, NextHop)],
) -> RoutePlan {
    let mut plan = RoutePlan::default();
    for &(prefix, nh) in desired {
        match current.get(&prefix) {
            None => plan.new.push((prefix, nh)),
            Some((_, have)) if !same_next_hop(have, &nh) => plan.changed.push((prefix, nh)),
            Some(_) => {}
        }
    }
    let wanted: HashSet<Prefix> = desired.iter().map(|(p, _)| *p).collect();
    plan.gone = current
        .keys()
        .filter(|p| !wanted.contains(p))
        .copied()
        .collect();
    plan.gone.sort_by_key(|p| (p.addr, p.len));
    plan
}

#[cfg(test)]
mod tests {
    use pop_forwarder_common::{NH_F_IN_USE, NH_F_MAC_VALID};

    use super::*;

    fn nh(ifindex: u32, gw: u8, mac: Option<u8>) -> NextHop {
        let mut nh: NextHop = bytemuck::Zeroable::zeroed();
        nh.ifindex = ifindex;
        nh.family = 2;
        nh.gateway[..4].copy_from_slice(&[10, 0, 0, gw]);
        nh.flags = NH_F_IN_USE;
        if let Some(m) = mac {
            nh.dst_mac = [2, 0, 0, 0, 0, m];
            nh.flags |= NH_F_MAC_STATIC | NH_F_MAC_VALID;
        }
        nh
    }

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    #[test]
    fn a_plan_adds_repoints_and_deletes_only_what_differs() {
        let current: HashMap<Prefix, (u32, NextHop)> = [
            ("10.1.0.0/16", nh(1, 1, None)),
            ("10.2.0.0/16", nh(1, 1, None)),
            ("10.3.0.0/16", nh(1, 1, Some(7))),
            ("10.4.0.0/16", nh(1, 1, None)),
            ("10.5.0.0/16", nh(1, 1, None)),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, (s, nh))| (p(s), (i as u32, nh)))
        .collect();
        let mut learned = nh(1, 1, None);
        learned.dst_mac = [2, 0, 0, 0, 0, 9];
        learned.flags |= NH_F_MAC_VALID;
        let desired = [
            (p("10.1.0.0/16"), learned),           // a learned MAC: no change
            (p("10.2.0.0/16"), nh(1, 2, None)),    // another gateway
            (p("10.3.0.0/16"), nh(1, 1, Some(8))), // another static MAC
            (p("10.4.0.0/16"), nh(2, 1, None)),    // another interface
            (p("10.9.0.0/16"), nh(1, 1, None)),    // new
        ];
        let plan = plan_routes(&current, &desired);
        assert_eq!(plan.new, vec![desired[4]]);
        assert_eq!(plan.changed, desired[1..4].to_vec());
        assert_eq!(plan.gone, vec![p("10.5.0.0/16")]);
        // The plan of the result is empty.
        let after: HashMap<Prefix, (u32, NextHop)> =
            desired.iter().map(|&(p, nh)| (p, (0, nh))).collect();
        assert_eq!(plan_routes(&after, &desired), RoutePlan::default());
    }

    #[test]
    fn a_plan_of_a_large_change_is_linear() {
        // 200,000 routes now, 200,000 wanted, half of them the same: a
        // quadratic step here would take minutes, not milliseconds.
        let route = |i: u32, gw: u8| {
            let a = std::net::Ipv4Addr::from(0x0a00_0000 + (i << 8));
            (p(&format!("{a}/24")), nh(1, gw, None))
        };
        let current: HashMap<Prefix, (u32, NextHop)> = (0..200_000)
            .map(|i| {
                let (p, nh) = route(i, 1);
                (p, (0, nh))
            })
            .collect();
        let desired: Vec<_> = (0..100_000)
            .map(|i| route(i, 1))
            .chain((100_000..150_000).map(|i| route(i, 2)))
            .chain((200_000..250_000).map(|i| route(i, 1)))
            .collect();
        let plan = plan_routes(&current, &desired);
        assert_eq!(
            (plan.new.len(), plan.changed.len(), plan.gone.len()),
            (50_000, 50_000, 50_000)
        );
    }
}
