//! Planning a change of the route tables: what must be added, repointed and
//! deleted to go from what the tables hold to what is wanted. Pure, so it is
//! unit-tested without the kernel; `tables` carries a plan out.

use std::{collections::HashMap, sync::Arc};

use pop_forwarder_common::{NH_F_MAC_STATIC, NextHop, ecmp::MAX_GROUP_MEMBERS};

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

/// Where a route is wanted to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// One next hop: a gateway, a connected subnet, or the kernel
    /// (`NH_F_KERNEL`).
    One(NextHop),
    /// An ECMP group of two or more members with weights, in gateway-key
    /// order (`Want::group` makes it so); shared between the routes that
    /// have the same members.
    Group(Arc<[(NextHop, u32)]>),
}

/// A next hop as `same_next_hop` sees it: its gateway key and static MAC.
pub type NextHopKey = (GatewayKey, Option<[u8; 6]>);

/// A Want as `Want::same` sees it (`Want::key`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum WantKey {
    One(NextHopKey),
    Group(Vec<(NextHopKey, u32)>),
}

/// A group's identity: its members' gateways and weights, in order.
pub type GroupKey = Vec<(GatewayKey, u32)>;

impl Want {
    /// The wanted target of a route through `members` (next hop, weight):
    /// one next hop for one member; a group, its members in gateway-key
    /// order, a gateway listed twice counted once with its weights added;
    /// None for no member or more than a group holds.
    pub fn group(mut members: Vec<(NextHop, u32)>) -> Option<Want> {
        members.sort_by_key(|(nh, _)| gateway_key(nh));
        let mut merged: Vec<(NextHop, u32)> = Vec::with_capacity(members.len());
        for (nh, weight) in members {
            match merged.last_mut() {
                Some((last, w)) if gateway_key(last) == gateway_key(&nh) => *w += weight,
                _ => merged.push((nh, weight)),
            }
        }
        match merged.len() {
            0 => None,
            1 => Some(Want::One(merged[0].0)),
            n if n > MAX_GROUP_MEMBERS => None,
            _ => Some(Want::Group(merged.into())),
        }
    }

    /// The key of a group (None for one next hop).
    pub fn group_key(&self) -> Option<GroupKey> {
        match self {
            Want::One(_) => None,
            Want::Group(members) => Some(
                members
                    .iter()
                    .map(|(nh, w)| (gateway_key(nh), *w))
                    .collect(),
            ),
        }
    }

    /// Whether a route at `self` needs no change to reach `want`.
    pub fn same(&self, want: &Want) -> bool {
        match (self, want) {
            (Want::One(a), Want::One(b)) => same_next_hop(a, b),
            (Want::Group(a), Want::Group(b)) => {
                a.len() == b.len()
                    && a.iter()
                        .zip(b.iter())
                        .all(|((x, wx), (y, wy))| wx == wy && same_next_hop(x, y))
            }
            _ => false,
        }
    }

    /// What `same` compares, as a value: `a.same(b)` exactly when
    /// `a.key() == b.key()`.
    pub fn key(&self) -> WantKey {
        let of = |nh: &NextHop| {
            (
                gateway_key(nh),
                (nh.flags & NH_F_MAC_STATIC != 0).then_some(nh.dst_mac),
            )
        };
        match self {
            Want::One(nh) => WantKey::One(of(nh)),
            Want::Group(members) => {
                WantKey::Group(members.iter().map(|(nh, w)| (of(nh), *w)).collect())
            }
        }
    }

    /// The next hops it goes through.
    pub fn next_hops(&self) -> Vec<NextHop> {
        match self {
            Want::One(nh) => vec![*nh],
            Want::Group(members) => members.iter().map(|(nh, _)| *nh).collect(),
        }
    }
}

/// What a change of the operator routes does.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RoutePlan<'a> {
    /// Prefixes not routed now, in the order wanted.
    pub new: Vec<&'a (Prefix, Want)>,
    /// Prefixes routed now through another next hop, in the order wanted.
    pub changed: Vec<&'a (Prefix, Want)>,
    /// Prefixes routed now and not wanted.
    pub gone: Vec<Prefix>,
}

/// The plan from `current` (each routed prefix with what the tables hold
/// for it, `T`) to `desired` (validated: each prefix once); `same` says
/// whether what the tables hold is what is wanted. Linear in both. The
/// plan points into `desired` rather than copying it: with a million
/// routes, a copy is 80 MB.
pub fn plan_routes<'a, T, S: std::hash::BuildHasher>(
    current: &HashMap<Prefix, T, S>,
    desired: &'a [(Prefix, Want)],
    same: impl Fn(&T, &Want) -> bool,
) -> RoutePlan<'a> {
    let mut plan = RoutePlan::default();
    let mut kept = 0;
    for route in desired {
        match current.get(&route.0) {
            None => plan.new.push(route),
            Some(have) => {
                kept += 1;
                if !same(have, &route.1) {
                    plan.changed.push(route);
                }
            }
        }
    }
    // Every prefix routed now is wanted still (a reload that deletes
    // nothing): no set of the wanted prefixes to build.
    if kept < current.len() {
        let wanted: crate::net::PrefixSet = desired.iter().map(|(p, _)| *p).collect();
        plan.gone = current
            .keys()
            .filter(|p| !wanted.contains(p))
            .copied()
            .collect();
        plan.gone.sort_by_key(|p| (p.addr, p.len));
    }
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

    fn one(routes: &[(Prefix, NextHop)]) -> Vec<(Prefix, Want)> {
        routes.iter().map(|(p, nh)| (*p, Want::One(*nh))).collect()
    }

    #[test]
    fn groups_are_canonical_and_compared_by_members_and_weights() {
        let a = nh(1, 1, None);
        let b = nh(1, 2, None);
        let ab = Want::group(vec![(b, 1), (a, 1)]).unwrap();
        assert!(ab.same(&Want::group(vec![(a, 1), (b, 1)]).unwrap()));
        assert!(!ab.same(&Want::group(vec![(a, 1), (b, 2)]).unwrap()));
        // A gateway listed twice is one member; one member is one next hop.
        assert_eq!(Want::group(vec![(a, 1), (a, 2)]), Some(Want::One(a)));
        assert_eq!(Want::group(vec![]), None);
        let many = (0..=MAX_GROUP_MEMBERS as u8)
            .map(|i| (nh(1, i, None), 1))
            .collect();
        assert_eq!(Want::group(many), None);
        assert!(!ab.same(&Want::One(a)));
    }

    #[test]
    fn a_wants_key_is_equal_exactly_when_it_is_the_same() {
        let a = nh(1, 1, None);
        let mut learned = a;
        learned.dst_mac = [2, 0, 0, 0, 0, 9];
        learned.flags |= NH_F_MAC_VALID;
        let wants = [
            Want::One(a),
            Want::One(learned),
            Want::One(nh(1, 1, Some(7))),
            Want::One(nh(1, 1, Some(8))),
            Want::One(nh(2, 1, None)),
            Want::One(nh(1, 2, None)),
            Want::group(vec![(a, 1), (nh(1, 2, None), 1)]).unwrap(),
            Want::group(vec![(learned, 1), (nh(1, 2, None), 1)]).unwrap(),
            Want::group(vec![(a, 2), (nh(1, 2, None), 1)]).unwrap(),
            Want::group(vec![(a, 1), (nh(1, 3, None), 1)]).unwrap(),
            Want::group(vec![(a, 1), (nh(1, 2, None), 1), (nh(1, 3, None), 1)]).unwrap(),
        ];
        for x in &wants {
            for y in &wants {
                assert_eq!(x.same(y), x.key() == y.key(), "{x:?} and {y:?}");
            }
        }
        // A learned MAC is not the config's: the same, as `same` says.
        assert_eq!(wants[0].key(), wants[1].key());
    }

    #[test]
    fn a_plan_adds_repoints_and_deletes_only_what_differs() {
        let current: HashMap<Prefix, Want> = [
            ("10.1.0.0/16", nh(1, 1, None)),
            ("10.2.0.0/16", nh(1, 1, None)),
            ("10.3.0.0/16", nh(1, 1, Some(7))),
            ("10.4.0.0/16", nh(1, 1, None)),
            ("10.5.0.0/16", nh(1, 1, None)),
        ]
        .into_iter()
        .map(|(s, nh)| (p(s), Want::One(nh)))
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
        let desired = one(&desired);
        let plan = plan_routes(&current, &desired, Want::same);
        assert_eq!(plan.new, vec![&desired[4]]);
        assert_eq!(plan.changed, desired[1..4].iter().collect::<Vec<_>>());
        assert_eq!(plan.gone, vec![p("10.5.0.0/16")]);
        // The plan of the result is empty.
        let after: HashMap<Prefix, Want> = desired.iter().cloned().collect();
        let plan = plan_routes(&after, &desired, Want::same);
        assert!(plan.new.is_empty() && plan.changed.is_empty() && plan.gone.is_empty());
    }

    #[test]
    fn a_plan_of_a_large_change_is_linear() {
        // 200,000 routes now, 200,000 wanted, half of them the same: a
        // quadratic step here would take minutes, not milliseconds.
        let route = |i: u32, gw: u8| {
            let a = std::net::Ipv4Addr::from(0x0a00_0000 + (i << 8));
            (p(&format!("{a}/24")), nh(1, gw, None))
        };
        let current: HashMap<Prefix, Want> = (0..200_000)
            .map(|i| {
                let (p, nh) = route(i, 1);
                (p, Want::One(nh))
            })
            .collect();
        let desired: Vec<_> = (0..100_000)
            .map(|i| route(i, 1))
            .chain((100_000..150_000).map(|i| route(i, 2)))
            .chain((200_000..250_000).map(|i| route(i, 1)))
            .collect();
        let desired = one(&desired);
        let plan = plan_routes(&current, &desired, Want::same);
        assert_eq!(
            (plan.new.len(), plan.changed.len(), plan.gone.len()),
            (50_000, 50_000, 50_000)
        );
    }
}
