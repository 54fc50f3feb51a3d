//! Differential tests: the compiled program (BPF_PROG_TEST_RUN) and the
//! reference model (`tests::model`, written from README's table of
//! outcomes) get the same tables and the same frames, and must agree on
//! the action, the counter that moved and every byte of the frame that
//! leaves. A corpus of odd frames first, then random structure-aware
//! frames from a fixed seed: 100,000 a run (`POP_FORWARDER_FUZZ_FRAMES`
//! and `POP_FORWARDER_FUZZ_SEED` change that; `cargo xtask fuzz` runs
//! longer). A divergence prints the frame as hex and fails.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::{Duration, Instant},
};

use aya::{Ebpf, programs::Xdp};
use pop_forwarder::{
    EBPF_OBJECT,
    config::{Ipv4Lookup, RouteMissPolicy},
    maps::Tables,
    net::Mac,
    plan::Want,
};
use pop_forwarder_common::{
    Counter, KERNEL_NEXT_HOP, NH_F_CONNECTED, NH_F_IN_USE, NextHop, PROGRAM_NAME, VlanKey,
    steering::{
        CacheNode, ENCAP_SOURCE_V4, ENCAP_SOURCE_V6, NODE_F_IN_USE, NODE_F_IPIP, NODE_F_MAC_VALID,
        VipKey,
    },
};
use tests::model::{self, Hop, Node, Outcome, Rng, Target, World};

fn hex(frame: &[u8]) -> String {
    frame.iter().map(|b| format!("{b:02x}")).collect()
}

/// The next hop the tables hold for a model's hop.
fn next_hop(hop: &Hop) -> NextHop {
    let mut nh = tests::static_next_hop(hop.ifindex, hop.gateway, hop.mtu, hop.mac, hop.src_mac);
    nh.tx_ifindex = hop.tx_ifindex;
    if hop.connected {
        nh.flags = NH_F_IN_USE | NH_F_CONNECTED;
        nh.dst_mac = [0; 6];
    }
    if let Some((proto, tci)) = hop.vlan {
        nh.vlan_proto = proto;
        nh.vlan_tci = tci;
    }
    nh
}

/// Fills the tables with `world`: routes (one next hop per gateway, ECMP
/// groups, connected subnets, kernel routes), local addresses, the deny
/// list, neighbours, VLANs, the ingress MAC, the route-miss policy, and
/// for steering its nodes, VIPs and outer sources.
fn fill(tables: &mut Tables, world: &World) {
    let mut routes = Vec::new();
    for (prefix, target) in &world.routes {
        match target {
            Target::Kernel => tables.add_route_to(*prefix, KERNEL_NEXT_HOP).unwrap(),
            Target::Hop(hop) => routes.push((*prefix, Want::One(next_hop(hop)))),
            Target::Group(members) => routes.push((
                *prefix,
                Want::group(members.iter().map(|(h, w)| (next_hop(h), *w)).collect())
                    .expect("a valid group"),
            )),
        }
    }
    tables.add_wanted_routes(&routes).unwrap();
    tables.sync_local_addrs(&world.local).unwrap();
    tables.apply_deny(&world.deny).unwrap();
    for (addr, ifindex, mac) in &world.neighbours {
        tables
            .set_neighbour(*ifindex, *addr, Some(Mac(*mac)))
            .unwrap();
    }
    let vlans: Vec<VlanKey> = world
        .vlans
        .iter()
        .map(|&(outer, inner)| VlanKey {
            ifindex: world.ingress,
            outer,
            inner,
        })
        .collect();
    tables.sync_vlans(&vlans).unwrap();
    tables
        .set_interface_mac(world.ingress, Mac(world.ingress_mac))
        .unwrap();
    tables
        .set_route_miss(if world.route_miss_drop {
            RouteMissPolicy::Drop
        } else {
            RouteMissPolicy::Pass
        })
        .unwrap();
    let widen = |a: IpAddr| match a {
        IpAddr::V4(a) => {
            let mut w = [0u8; 16];
            w[..4].copy_from_slice(&a.octets());
            w
        }
        IpAddr::V6(a) => a.octets(),
    };
    let family = |a: IpAddr| if a.is_ipv4() { 4 } else { 6 };
    for (id, node) in &world.nodes {
        let node = match *node {
            Node::Dsr {
                ifindex,
                mac,
                src_mac,
                mtu,
            } => CacheNode {
                ifindex,
                flags: NODE_F_IN_USE | if mac.is_some() { NODE_F_MAC_VALID } else { 0 },
                dst_mac: mac.unwrap_or_default(),
                src_mac,
                addr: [0; 16],
                family: 4,
                mtu,
            },
            Node::Ipip { addr } => CacheNode {
                ifindex: 0,
                flags: NODE_F_IN_USE | NODE_F_IPIP,
                dst_mac: [0; 6],
                src_mac: [0; 6],
                addr: widen(addr),
                family: family(addr),
                mtu: 0,
            },
        };
        tables.write_node(*id, &node).unwrap();
    }
    for (index, vip) in world.vips.iter().enumerate() {
        let key = VipKey {
            addr: widen(vip.addr),
            port: vip.port,
            protocol: vip.protocol,
            family: family(vip.addr) as u8,
        };
        tables.write_vip(index as u32, &key, &vip.table).unwrap();
    }
    if let Some((base, len)) = world.encap_v4 {
        let mut w = widen(base.into());
        w[4] = len;
        tables.set_encap_source(ENCAP_SOURCE_V4, w).unwrap();
    }
    if let Some(a) = world.encap_v6 {
        tables
            .set_encap_source(ENCAP_SOURCE_V6, a.octets())
            .unwrap();
    }
    tables
        .set_steering(world.seed, !world.vips.is_empty())
        .unwrap();
}

fn run(ebpf: &Ebpf, frame: &[u8]) -> (u32, Vec<u8>) {
    tests::test_run(
        ebpf.program(PROGRAM_NAME).unwrap().try_into().unwrap(),
        frame,
    )
}

fn counters(tables: &Tables) -> BTreeMap<&'static str, u64> {
    tables.counters().unwrap()
}

/// Runs `frames` through program and model under `world`; panics on the
/// first divergence with the frame in hex. Returns how many frames ended
/// in each counter.
fn differ(
    lookup: Ipv4Lookup,
    world_seed: u64,
    steering: bool,
    frames: Vec<Vec<u8>>,
) -> BTreeMap<&'static str, u64> {
    tests::with_egress_veth("d", move |veth| {
        let mut rng = Rng::new(world_seed);
        // The test run's ingress is the namespace's loopback, ifindex 1.
        let world = model::world(&mut rng, 1, veth, 400, steering);
        let mut ebpf = Ebpf::load(EBPF_OBJECT).expect("loading the embedded object");
        let mut tables = Tables::from_ebpf(&mut ebpf).unwrap();
        tables.set_ipv4_lookup(lookup).unwrap();
        tables
            .set_ipv6_lookup(tests::ipv6_lookup_with(lookup))
            .unwrap();
        let xdp: &mut Xdp = ebpf.program_mut(PROGRAM_NAME).unwrap().try_into().unwrap();
        xdp.load().expect("the verifier accepts the program");
        fill(&mut tables, &world);
        let mut seen: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut before = counters(&tables);
        // Too-big answers sent, by source, and when: the program answers a
        // source at most 8 times a second. The model keeps no time; a
        // drop it did not expect is accepted when 8 answers to that
        // source were sent in the second before (counted generously: the
        // time is taken after each run, so a window may only look fuller
        // than the program's).
        let mut answers: HashMap<IpAddr, Vec<Instant>> = HashMap::new();
        for frame in frames {
            // BPF_PROG_TEST_RUN takes no frame shorter than an Ethernet
            // header (nor does a NIC deliver one).
            if frame.len() < 14 {
                continue;
            }
            let want: Outcome = model::expect(&world, &frame);
            let started = Instant::now();
            let (action, out) = run(&ebpf, &frame);
            let after = counters(&tables);
            let moved: Vec<&str> = Counter::ALL
                .iter()
                .map(|c| c.name())
                .filter(|n| after[n] != before[n])
                .collect();
            before = after;
            let rate_limited = match want.answered {
                Some(source)
                    if moved == ["drop_icmp_rate_limited"] && action == model::XDP_DROP =>
                {
                    let window = started - Duration::from_millis(1010);
                    let recent = answers
                        .get(&source)
                        .map_or(0, |t| t.iter().filter(|&&t| t > window).count());
                    recent >= 8
                }
                Some(source) => {
                    answers.entry(source).or_default().push(Instant::now());
                    false
                }
                None => false,
            };
            // Nothing leaves a dropped frame: its bytes are not compared.
            let bytes = |action: u32, f: &[u8]| {
                if action == model::XDP_DROP {
                    Vec::new()
                } else {
                    f.to_vec()
                }
            };
            let got = (action, moved.clone(), bytes(action, &out));
            let expected = (
                want.action,
                vec![want.counter.name()],
                bytes(want.action, &want.frame),
            );
            if got != expected && !rate_limited {
                panic!(
                    "program and model disagree ({lookup}, world seed {world_seed:#x}, \
                     steering {steering})\n\
                     frame:    {}\n\
                     program:  action {action}, counters {moved:?}\n          {}\n\
                     model:    action {}, counter {}\n          {}",
                    hex(&frame),
                    hex(&out),
                    want.action,
                    want.counter.name(),
                    hex(&want.frame)
                );
            }
            *seen
                .entry(moved.first().copied().unwrap_or("none"))
                .or_default() += 1;
        }
        seen
    })
    .unwrap()
}

/// An untagged IPv4 frame with its header checksum recomputed, if its
/// IHL is valid and the header lies inside it (else as it is).
fn checksum_fixed(mut f: Vec<u8>) -> Vec<u8> {
    let ihl = usize::from(f[14] & 0x0f) * 4;
    if ihl >= 20 && f.len() >= 14 + ihl {
        tests::packets::fix_ipv4_checksum(&mut f);
    }
    f
}

/// Frames every row of the model's outcomes should see at least once,
/// built by hand: runts, every version and IHL (under the old header
/// checksum and a right one), lengths off by one, TTL 0 to 2, IPv4 options
/// of every length and kind, VLAN tags whole and cut.
fn corpus() -> Vec<Vec<u8>> {
    let mut rng = Rng::new(0xc0de);
    let world = model::world(&mut Rng::new(0x5eed), 1, 2, 400, true);
    let base: Vec<Vec<u8>> = (0..64).map(|_| model::frame(&mut rng, &world)).collect();
    let mut out = Vec::new();
    for len in 0..60 {
        // Every cut of a plain IPv4 and IPv6 frame.
        for b in base.iter().take(4) {
            out.push(b[..len.min(b.len())].to_vec());
        }
    }
    for b in &base {
        if b.len() < 34 || b[12..14] != [0x08, 0x00] {
            out.push(b.clone());
            continue;
        }
        // Every TTL from 0 to 2; every IHL; total length one off each way;
        // each under a header checksum made right again (where the header
        // is whole), and IHL also under the old one.
        for ttl in 0..3 {
            let mut f = b.clone();
            f[22] = ttl;
            out.push(checksum_fixed(f));
        }
        for ihl in 0..16u8 {
            let mut f = b.clone();
            f[14] = 0x40 | ihl;
            out.push(f.clone());
            out.push(checksum_fixed(f));
        }
        for delta in [-1i32, 1] {
            let mut f = b.clone();
            let total = i32::from(u16::from_be_bytes([f[16], f[17]])) + delta;
            f[16..18].copy_from_slice(&(total as u16).to_be_bytes());
            out.push(checksum_fixed(f));
        }
        // Options of every length 1..=40 of one kind each.
        for kind in [0u8, 1, 7, 68, 131, 137, 148, 255] {
            for n in [1usize, 2, 3, 4, 5, 8, 20, 40] {
                let mut options = vec![kind; n];
                if n > 1 && kind > 1 {
                    options[1] = n as u8;
                }
                out.push(tests::packets::with_ipv4_options(b, &options));
            }
        }
    }
    // IPv6 extension-header chains past the parser's bound of four (six
    // hop-by-hop headers), and IPv4 fragments, first and later: routing
    // treats them as any packet.
    for b in base
        .iter()
        .filter(|b| b.len() >= 54 && b[12..14] == [0x86, 0xdd])
        .take(4)
    {
        let mut f = b.clone();
        let chain: Vec<u8> = (0..6)
            .flat_map(|i| [if i < 5 { 0 } else { 17 }, 0, 1, 4, 0, 0, 0, 0])
            .collect();
        f[20] = 0; // next header: hop-by-hop
        f.splice(54..54, chain);
        let payload = (f.len() - 54) as u16;
        f[18..20].copy_from_slice(&payload.to_be_bytes());
        out.push(f);
    }
    for b in base
        .iter()
        .filter(|b| b.len() >= 34 && b[12..14] == [0x08, 0x00])
        .take(4)
    {
        for frag in [0x2000u16, 0x2010, 0x0010] {
            let mut f = b.clone();
            f[20..22].copy_from_slice(&frag.to_be_bytes());
            tests::packets::fix_ipv4_checksum(&mut f);
            out.push(f);
        }
    }
    // VLAN tags: one, two, cut at every length.
    let mut tagged = base[0].clone();
    tagged.splice(12..12, [0x81, 0x00, 0x00, 0x0a]);
    for len in 12..30 {
        out.push(tagged[..len.min(tagged.len())].to_vec());
    }
    let mut two = base[0].clone();
    two.splice(12..12, [0x88, 0xa8, 0x00, 0x0b, 0x81, 0x00, 0x00, 0x0a]);
    out.push(two);
    // Every outcome the model reaches, four frames each (from 50,000
    // random frames).
    let mut by_outcome: BTreeMap<&str, Vec<Vec<u8>>> = BTreeMap::new();
    for _ in 0..50_000 {
        let f = model::frame(&mut rng, &world);
        if f.len() < 14 {
            continue;
        }
        let want = model::expect(&world, &f);
        let found = by_outcome.entry(want.counter.name()).or_default();
        if found.len() < 4 {
            found.push(f);
        }
    }
    // A too-big answer on a VLAN the box has (answered on that VLAN),
    // then a burst of them to the same source: rate limited after 8.
    if let Some(f) = by_outcome.get("icmp_too_big").and_then(|v| v.first()) {
        let mut tagged = f.clone();
        tagged.splice(12..12, [0x81, 0x00, 0x00, 200]);
        out.push(tagged);
        for _ in 0..12 {
            out.push(f.clone());
        }
    }
    println!(
        "corpus outcomes: {:?}",
        by_outcome
            .iter()
            .map(|(k, v)| (*k, v.len()))
            .collect::<Vec<_>>()
    );
    out.extend(by_outcome.into_values().flatten());
    out
}

fn count_from_env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn program_and_model_agree_on_a_corpus_of_odd_frames() {
    let corpus = corpus();
    for lookup in [Ipv4Lookup::Dir24, Ipv4Lookup::Trie] {
        for steering in [true, false] {
            let seen = differ(lookup, 0x5eed, steering, corpus.clone());
            println!("{lookup}, steering {steering}: {seen:?}");
        }
    }
}

#[test]
fn program_and_model_agree_on_random_frames() {
    let frames = count_from_env("POP_FORWARDER_FUZZ_FRAMES", 100_000);
    let seed = count_from_env("POP_FORWARDER_FUZZ_SEED", 0xf00d);
    let world_seed = seed ^ 0x5eed;
    let mut rng = Rng::new(seed);
    let world = model::world(&mut Rng::new(world_seed), 1, 2, 400, true);
    let batch: Vec<Vec<u8>> = (0..frames)
        .map(|_| model::frame(&mut rng, &world))
        .collect();
    // Under each IPv4 lookup with VIPs, and without VIPs (their packets
    // are then routed).
    let (a, rest) = batch.split_at(batch.len() * 2 / 5);
    let (b, c) = rest.split_at(rest.len() * 2 / 3);
    let mut seen = BTreeMap::new();
    for (lookup, steering, part) in [
        (Ipv4Lookup::Dir24, true, a),
        (Ipv4Lookup::Trie, true, b),
        (Ipv4Lookup::Dir24, false, c),
    ] {
        for (k, v) in differ(lookup, world_seed, steering, part.to_vec()) {
            *seen.entry(k).or_default() += v;
        }
    }
    println!("{frames} frames (seed {seed:#x}): {seen:?}");
    // The generator reaches the outcomes that matter.
    for c in [
        "forwarded",
        "forwarded_tx",
        "steered",
        "icmp_too_big",
        "pass_vip_no_node",
        "pass_local",
        "pass_ttl_exceeded",
        "pass_no_neighbour",
        "pass_too_big",
        "pass_kernel_route",
        "pass_unknown_vlan",
        "pass_non_ip",
        "drop_denied",
        "drop_martian_source",
        "pass_link_scope",
        "drop_truncated",
        "drop_bad_header",
        "drop_bad_length",
        "pass_not_for_us",
        "pass_ip_options",
        "drop_source_routed",
    ] {
        if frames >= 10_000 {
            assert!(
                seen.get(c).copied().unwrap_or(0) > 0,
                "no frame ended in {c}: {seen:?}"
            );
        }
    }
}
