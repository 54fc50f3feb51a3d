//! The routes the daemon wants in the program's tables, from its three
//! sources, in order of precedence: the config file's static routes; the
//! mirrored kernel routing table (`route_source = "kernel"`: BIRD's or
//! FRR's routes); the connected subnets of the interfaces. Pure: the
//! kernel's state comes in as values, so it is unit-tested without one.

use std::collections::HashMap;

use pop_forwarder_common::{AF_INET, AF_INET6, NextHop};

use crate::{
    kernel::{KernelKind, KernelRoute, Link, Neighbour},
    maps::{connected_next_hop, connected_routes, gateway_next_hop, kernel_next_hop},
    net::{Prefix, PrefixSet},
    plan::{Want, WantKey},
};

/// The routes wanted, with what the daemon must know of them.
#[derive(Debug, Default)]
pub struct Wanted {
    /// Every route, each prefix once.
    pub routes: Vec<(Prefix, Want)>,
    /// The connected subnets among them (derived from addresses).
    pub connected: Vec<(Prefix, NextHop)>,
    /// Kernel routes handed to the kernel (`KERNEL_NEXT_HOP`), and why.
    pub to_kernel: Vec<(Prefix, String)>,
}

/// What the tables hold from the mirrored table and the connected subnets,
/// by prefix, as much as a notification needs to know: whether a prefix's
/// new Want is the one the tables hold already (`Want::same`). A prefix
/// holds the number of its Want's key (`Want::key`), each key numbered
/// once: a million routes through a few next hops take about 24 bytes each
/// (an ordered map built whole: nodes full, where a hash map holds twice
/// its entries' room), not a next hop's copy each. Numbers are not reused;
/// a whole re-read of the table starts afresh (`of`).
#[derive(Debug, Default)]
pub struct Mirrored {
    routes: std::collections::BTreeMap<Prefix, u32>,
    keys: HashMap<WantKey, u32>,
}

impl Mirrored {
    /// What `wanted` puts in the tables, `statics` (the config's routes)
    /// aside.
    pub fn of(wanted: &Wanted, statics: &PrefixSet) -> Mirrored {
        let mut keys = HashMap::new();
        let routes = wanted
            .routes
            .iter()
            .filter(|(prefix, _)| !statics.contains(prefix))
            .map(|(prefix, want)| {
                let next = keys.len() as u32;
                (*prefix, *keys.entry(want.key()).or_insert(next))
            })
            .collect();
        Mirrored { routes, keys }
    }

    /// Whether the tables hold `want` for `prefix` (None: nothing).
    pub fn holds(&self, prefix: &Prefix, want: Option<&Want>) -> bool {
        match (self.routes.get(prefix), want) {
            (Some(have), Some(want)) => self.keys.get(&want.key()) == Some(have),
            (None, None) => true,
            _ => false,
        }
    }

    /// Records that the tables hold `want` for `prefix` (None: nothing).
    pub fn set(&mut self, prefix: Prefix, want: Option<&Want>) {
        let Some(want) = want else {
            self.routes.remove(&prefix);
            return;
        };
        let next = self.keys.len() as u32;
        let id = *self.keys.entry(want.key()).or_insert(next);
        self.routes.insert(prefix, id);
    }
}

/// What the program does with one kernel route: the Want, or why the
/// kernel must handle it.
pub fn want_of(
    route: &KernelRoute,
    links: &[Link],
    neighbours: &[Neighbour],
    attached: &[u32],
) -> Result<Want, String> {
    let usable = |ifindex: u32| {
        links
            .iter()
            .find(|l| l.ifindex == ifindex)
            .filter(|l| attached.contains(&l.tx_ifindex()))
            .and_then(|l| l.mac.map(|mac| (l, mac)))
    };
    match &route.kind {
        KernelKind::Kernel(why) => Err((*why).to_owned()),
        KernelKind::Direct(ifindex) => match usable(*ifindex) {
            Some((link, mac)) => Ok(Want::One(connected_next_hop(
                link,
                mac,
                family(route.prefix),
            ))),
            None => Err(format!(
                "its interface (index {ifindex}) has no XDP program of this instance"
            )),
        },
        KernelKind::Via(paths) => {
            let mut members = Vec::with_capacity(paths.len());
            for path in paths.iter() {
                let Some((link, mac)) = usable(path.ifindex) else {
                    return Err(format!(
                        "its next hop {} is on an interface (index {}) without an XDP program of this instance",
                        path.gateway, path.ifindex
                    ));
                };
                members.push((
                    gateway_next_hop(path.gateway, link, mac, neighbours),
                    path.weight,
                ));
            }
            Want::group(members).ok_or_else(|| {
                format!(
                    "{} next hops are more than a group holds ({})",
                    paths.len(),
                    pop_forwarder_common::ecmp::MAX_GROUP_MEMBERS
                )
            })
        }
    }
}

fn family(prefix: Prefix) -> u32 {
    if prefix.addr.is_ipv4() {
        AF_INET
    } else {
        AF_INET6
    }
}

/// The routes wanted: `static_routes` first; then, if given, the kernel
/// table's routes to other prefixes (each as `want_of` says, or to the
/// kernel); then the connected subnets of `links` to prefixes neither
/// names.
pub fn wanted(
    static_routes: Vec<(Prefix, NextHop)>,
    kernel: Option<&[KernelRoute]>,
    links: &[Link],
    neighbours: &[Neighbour],
    attached: &[u32],
) -> Wanted {
    // With no kernel table, the few connected subnets are looked for
    // among the static routes one by one, not through a set of them all.
    let mut named: PrefixSet = match kernel {
        Some(_) => static_routes.iter().map(|(p, _)| *p).collect(),
        None => PrefixSet::default(),
    };
    let connected = connected_routes(links, attached);
    // Sized once: grown by doubling, a million routes would take room for
    // two million while the plan is made.
    let mut routes = Vec::with_capacity(
        static_routes.len() + kernel.map_or(0, <[KernelRoute]>::len) + connected.len(),
    );
    routes.extend(static_routes.into_iter().map(|(p, nh)| (p, Want::One(nh))));
    let mut out = Wanted {
        routes,
        ..Wanted::default()
    };
    let statics = out.routes.len();
    for route in kernel.unwrap_or_default() {
        if !named.insert(route.prefix) {
            continue;
        }
        let want = match want_of(route, links, neighbours, attached) {
            Ok(want) => want,
            Err(why) => {
                out.to_kernel.push((route.prefix, why));
                Want::One(kernel_next_hop(family(route.prefix)))
            }
        };
        out.routes.push((route.prefix, want));
    }
    for (prefix, nh) in connected {
        let named_already = match kernel {
            Some(_) => !named.insert(prefix),
            None => {
                out.routes[..statics].iter().any(|(p, _)| *p == prefix) || !named.insert(prefix)
            }
        };
        if !named_already {
            out.connected.push((prefix, nh));
            out.routes.push((prefix, Want::One(nh)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use pop_forwarder_common::{NH_F_CONNECTED, NH_F_MAC_VALID};

    use super::*;
    use crate::{maps::NH_F_KERNEL, net::Mac};

    fn link(ifindex: u32, subnet: &str) -> Link {
        Link {
            ifindex,
            name: format!("eth{ifindex}"),
            mtu: 1500,
            mac: Some(Mac([2, 0, 0, 0, 0, ifindex as u8])),
            addrs: Vec::new(),
            subnets: vec![subnet.parse().unwrap()],
            broadcasts: Vec::new(),
            xdp_attached: true,
            xdp_mode: Some(crate::config::XdpMode::Native),
            vlan: None,
        }
    }

    fn via(prefix: &str, paths: &[(&str, u32)]) -> KernelRoute {
        crate::kernel::via_route(prefix, 0, paths)
    }

    #[test]
    fn static_routes_win_then_kernel_routes_then_connected_subnets() {
        let links = [
            link(2, "10.0.1.0/24"),
            link(3, "10.0.2.0/24"),
            link(4, "10.0.4.0/24"),
        ];
        let neighbours = [Neighbour {
            addr: "10.0.2.2".parse().unwrap(),
            ifindex: 3,
            ifname: "eth3".into(),
            mac: Mac([2, 0, 0, 0, 0, 0x22]),
        }];
        let static_nh = gateway_next_hop("10.0.1.9".parse().unwrap(), &links[0], Mac([2; 6]), &[]);
        let kernel = [
            via("198.51.100.0/24", &[("10.0.2.2", 3), ("10.0.1.2", 2)]),
            via("203.0.113.0/24", &[("10.0.2.2", 3)]),
            via("192.0.2.0/24", &[("10.0.1.2", 2)]),
            // On an interface without the program: the kernel's.
            via("192.0.2.128/25", &[("10.0.4.2", 4)]),
            KernelRoute {
                prefix: "10.9.0.0/16".parse().unwrap(),
                priority: 0,
                kind: KernelKind::Kernel("blackhole"),
            },
            KernelRoute {
                prefix: "10.0.2.0/24".parse().unwrap(),
                priority: 0,
                kind: KernelKind::Direct(3),
            },
        ];
        let w = wanted(
            vec![("192.0.2.0/24".parse().unwrap(), static_nh)],
            Some(&kernel),
            &links,
            &neighbours,
            &[2, 3],
        );
        let get = |p: &str| {
            let p: Prefix = p.parse().unwrap();
            w.routes
                .iter()
                .find(|(q, _)| *q == p)
                .map(|(_, w)| w.clone())
        };
        // The file's route to 192.0.2.0/24 wins over the kernel's.
        assert_eq!(get("192.0.2.0/24"), Some(Want::One(static_nh)));
        match get("198.51.100.0/24") {
            Some(Want::Group(members)) => assert_eq!(members.len(), 2),
            other => panic!("not a group: {other:?}"),
        }
        let Some(Want::One(one)) = get("203.0.113.0/24") else {
            panic!("one next hop wanted")
        };
        assert_eq!(
            one.flags & NH_F_MAC_VALID,
            NH_F_MAC_VALID,
            "MAC from the neighbour"
        );
        let Some(Want::One(k)) = get("10.9.0.0/16") else {
            panic!()
        };
        assert_eq!(k.flags, NH_F_KERNEL);
        let Some(Want::One(k)) = get("192.0.2.128/25") else {
            panic!()
        };
        assert_eq!(k.flags, NH_F_KERNEL);
        assert_eq!(w.to_kernel.len(), 2);
        // The kernel's connected route and the derived one agree; the
        // subnet of eth2 (no kernel route to it here) is derived; eth4's
        // subnet goes to the kernel.
        let Some(Want::One(c)) = get("10.0.2.0/24") else {
            panic!()
        };
        assert_ne!(c.flags & NH_F_CONNECTED, 0);
        assert!(get("10.0.1.0/24").is_some());
        let Some(Want::One(k)) = get("10.0.4.0/24") else {
            panic!()
        };
        assert_eq!(k.flags, NH_F_KERNEL);
        assert_eq!(w.connected.len(), 2);
        let prefixes: PrefixSet = w.routes.iter().map(|(p, _)| *p).collect();
        assert_eq!(prefixes.len(), w.routes.len(), "each prefix once");

        // What the tables hold of it, the file's route aside.
        let statics: PrefixSet = ["192.0.2.0/24".parse().unwrap()].into_iter().collect();
        let mut held = Mirrored::of(&w, &statics);
        let p = |s: &str| -> Prefix { s.parse().unwrap() };
        assert!(
            held.holds(&p("192.0.2.0/24"), None),
            "the file's is not the mirror's"
        );
        for (prefix, want) in w.routes.iter().filter(|(q, _)| !statics.contains(q)) {
            assert!(held.holds(prefix, Some(want)), "{prefix}");
        }
        // The group, one member's MAC learned anew: still what is held.
        let Some(Want::Group(members)) = get("198.51.100.0/24") else {
            panic!()
        };
        let mut relearned = members.to_vec();
        relearned[0].0.dst_mac = [2, 0, 0, 0, 0, 0x99];
        let relearned = Want::Group(relearned.into());
        assert!(held.holds(&p("198.51.100.0/24"), Some(&relearned)));
        // Another next hop is not; nor is a route where none is held.
        assert!(!held.holds(&p("198.51.100.0/24"), Some(&Want::One(static_nh))));
        assert!(!held.holds(&p("198.18.0.0/15"), Some(&Want::One(static_nh))));
        assert!(!held.holds(&p("203.0.113.0/24"), None));
        held.set(p("203.0.113.0/24"), None);
        assert!(held.holds(&p("203.0.113.0/24"), None));
        held.set(p("198.51.100.0/24"), Some(&Want::One(static_nh)));
        assert!(held.holds(&p("198.51.100.0/24"), Some(&Want::One(static_nh))));
        assert!(!held.holds(&p("198.51.100.0/24"), Some(&relearned)));
    }
}
