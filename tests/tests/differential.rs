//! Differential tests: the compiled program (BPF_PROG_TEST_RUN) and the
//! reference model (`tests::model`, written from README's table of
//! outcomes) get the same tables and the same frames, and must agree on
//! the action, the counter that moved and every byte of the frame that
//! leaves. A corpus of odd frames first, then random structure-aware
//! frames from a fixed seed: 100,000 a run (`POP_FORWARDER_FUZZ_FRAMES`
//! and `POP_FORWARDER_FUZZ_SEED` change that; `cargo xtask fuzz` runs
//! longer). A divergence prints the frame as hex and fails.

use std::collections::BTreeMap;

use aya::{Ebpf, programs::Xdp};
use pop_forwarder::{
    EBPF_OBJECT,
    config::{Ipv4Lookup, RouteMissPolicy},
    maps::Tables,
    net::Mac,
};
use pop_forwarder_common::{Counter, KERNEL_NEXT_HOP, PROGRAM_NAME};
use tests::{
    Netns,
    model::{self, Outcome, Rng, Target, World},
};

fn hex(frame: &[u8]) -> String {
    frame.iter().map(|b| format!("{b:02x}")).collect()
}

/// Fills the tables with `world`: one next hop per route (a gateway of its
/// own, so that each route's MAC and MTU are its own), kernel routes,
/// local addresses, the deny list, the ingress MAC, the route-miss policy.
fn fill(tables: &mut Tables, world: &World) {
    let mut routes = Vec::new();
    for (i, (prefix, target)) in world.routes.iter().enumerate() {
        match *target {
            Target::Kernel => tables.add_route_to(*prefix, KERNEL_NEXT_HOP).unwrap(),
            Target::Hop {
                ifindex,
                mtu,
                mac,
                src_mac,
            } => {
                // Gateways 100.127.x.y / fd7f::x:y: one per route.
                let gateway: std::net::IpAddr = if prefix.addr.is_ipv4() {
                    [100, 127, (i >> 8) as u8, i as u8].into()
                } else {
                    let mut g = [0u8; 16];
                    g[0] = 0xfd;
                    g[1] = 0x7f;
                    g[14] = (i >> 8) as u8;
                    g[15] = i as u8;
                    g.into()
                };
                routes.push((
                    *prefix,
                    tests::static_next_hop(ifindex, gateway, mtu, mac, src_mac),
                ));
            }
        }
    }
    tables.add_routes(&routes).unwrap();
    tables.sync_local_addrs(&world.local).unwrap();
    tables.apply_deny(&world.deny).unwrap();
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
    frames: Vec<Vec<u8>>,
) -> BTreeMap<&'static str, u64> {
    let ns = Netns::new("d").unwrap();
    ns.ip(&["link", "add", "eg0", "type", "veth", "peer", "name", "eg1"])
        .unwrap();
    ns.ip(&["link", "set", "eg0", "up"]).unwrap();
    ns.enter(move || {
        let veth = unsafe { libc::if_nametoindex(c"eg0".as_ptr()) };
        assert_ne!(veth, 0);
        let mut rng = Rng::new(world_seed);
        // The test run's ingress is the namespace's loopback, ifindex 1.
        let world = model::world(&mut rng, 1, veth, 400);
        let mut ebpf = Ebpf::load(EBPF_OBJECT).expect("loading the embedded object");
        let mut tables = Tables::from_ebpf(&mut ebpf).unwrap();
        tables.set_ipv4_lookup(lookup).unwrap();
        let xdp: &mut Xdp = ebpf.program_mut(PROGRAM_NAME).unwrap().try_into().unwrap();
        xdp.load().expect("the verifier accepts the program");
        fill(&mut tables, &world);
        let mut seen: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut before = counters(&tables);
        for frame in frames {
            // BPF_PROG_TEST_RUN takes no frame shorter than an Ethernet
            // header (nor does a NIC deliver one).
            if frame.len() < 14 {
                continue;
            }
            let want: Outcome = model::expect(&world, &frame);
            let (action, out) = run(&ebpf, &frame);
            let after = counters(&tables);
            let moved: Vec<&str> = Counter::ALL
                .iter()
                .map(|c| c.name())
                .filter(|n| after[n] != before[n])
                .collect();
            before = after;
            let got = (action, moved.clone(), out.clone());
            let expected = (want.action, vec![want.counter.name()], want.frame.clone());
            if got != expected {
                panic!(
                    "program and model disagree ({lookup}, world seed {world_seed:#x})\n\
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
            *seen.entry(want.counter.name()).or_default() += 1;
        }
        seen
    })
    .unwrap()
}

/// Frames every row of the model's outcomes should see at least once,
/// built by hand: runts, every version and IHL, lengths off by one, TTL 0
/// to 2, IPv4 options of every length and kind, VLAN tags whole and cut.
fn corpus() -> Vec<Vec<u8>> {
    let mut rng = Rng::new(0xc0de);
    let world = model::world(&mut Rng::new(0x5eed), 1, 2, 400);
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
        // Every TTL from 0 to 2; every IHL; total length one off each way.
        for ttl in 0..3 {
            let mut f = b.clone();
            f[22] = ttl;
            out.push(f);
        }
        for ihl in 0..16u8 {
            let mut f = b.clone();
            f[14] = 0x40 | ihl;
            out.push(f);
        }
        for delta in [-1i32, 1] {
            let mut f = b.clone();
            let total = i32::from(u16::from_be_bytes([f[16], f[17]])) + delta;
            f[16..18].copy_from_slice(&(total as u16).to_be_bytes());
            out.push(f);
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
    for lookup in [Ipv4Lookup::Dir24, Ipv4Lookup::Trie] {
        let seen = differ(lookup, 0x5eed, corpus());
        println!("{lookup}: {seen:?}");
    }
}

#[test]
fn program_and_model_agree_on_random_frames() {
    let frames = count_from_env("POP_FORWARDER_FUZZ_FRAMES", 100_000);
    let seed = count_from_env("POP_FORWARDER_FUZZ_SEED", 0xf00d);
    let world_seed = seed ^ 0x5eed;
    let mut rng = Rng::new(seed);
    let world = model::world(&mut Rng::new(world_seed), 1, 2, 400);
    let batch: Vec<Vec<u8>> = (0..frames)
        .map(|_| model::frame(&mut rng, &world))
        .collect();
    // Half under each IPv4 lookup.
    let (a, b) = batch.split_at(batch.len() / 2);
    let mut seen = differ(Ipv4Lookup::Dir24, world_seed, a.to_vec());
    for (k, v) in differ(Ipv4Lookup::Trie, world_seed, b.to_vec()) {
        *seen.entry(k).or_default() += v;
    }
    println!("{frames} frames (seed {seed:#x}): {seen:?}");
    // The generator reaches the outcomes that matter.
    for c in [
        "forwarded",
        "forwarded_tx",
        "pass_local",
        "pass_ttl_exceeded",
        "pass_no_neighbour",
        "pass_too_big",
        "pass_kernel_route",
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
