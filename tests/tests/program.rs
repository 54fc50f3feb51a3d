//! Program tests: the compiled XDP program, as embedded in the binary, run on
//! crafted frames with BPF_PROG_TEST_RUN (repeat = 1: the kernel does not
//! restore the packet between repeats). Each case asserts the action, every
//! byte of the output frame and which counter moved.
//!
//! Runs inside a namespace of its own: the test run's ingress interface is
//! that namespace's loopback (ifindex 1), and the redirect target a veth
//! created there.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use aya::{Ebpf, programs::Xdp};
use pop_forwarder::{
    EBPF_OBJECT,
    config::{Ipv4Lookup, RouteMissPolicy},
    maps::Tables,
    net::{Mac, Prefix},
    plan::Want,
};
use pop_forwarder_common::{
    Counter, KERNEL_NEXT_HOP, NH_F_CONNECTED, NH_F_IN_USE, NextHop, PROGRAM_NAME, VlanKey, checksum,
};
use tests::packets::{Eth, fix_ipv4_checksum, forwarded, udp_v4, udp_v6, with_ipv4_options};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

/// What arrives: from a client's MAC to the router's.
const IN: Eth = Eth {
    src: [0x02, 0, 0, 0, 0, 0xa0],
    dst: [0x02, 0, 0, 0, 0, 0x10],
};
/// What the next hop's frames must carry: the router's egress MAC to the
/// gateway's.
const OUT: Eth = Eth {
    src: [0x02, 0, 0, 0, 0, 0x11],
    dst: [0x02, 0, 0, 0, 0, 0xc0],
};

struct Program {
    ebpf: Ebpf,
    tables: Tables,
    /// The redirect target: the veth made in the test's namespace.
    veth: u32,
}

impl Program {
    fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        tests::test_run(
            self.ebpf.program(PROGRAM_NAME).unwrap().try_into().unwrap(),
            frame,
        )
    }

    fn counters(&self) -> BTreeMap<&'static str, u64> {
        self.tables.stats(&[]).unwrap().counters
    }
}

fn next_hop(ifindex: u32, gateway: &str, mac: Option<[u8; 6]>, mtu: u32) -> NextHop {
    tests::static_next_hop(ifindex, gateway.parse().unwrap(), mtu, mac, OUT.src)
}

/// Loads the embedded object in a fresh namespace and fills its tables:
///
/// | prefix          | next hop                                 |
/// |-----------------|------------------------------------------|
/// | 10.0.0.0/8      | 10.255.0.1 on veth, MAC unknown          |
/// | 10.0.3.0/24     | 10.0.2.2 on veth, MAC OUT.dst            |
/// | 10.0.4.0/24     | 10.0.1.9 on lo (the ingress): XDP_TX      |
/// | 10.0.5.0/24     | 10.0.2.5 on veth, MTU 100                |
/// | 10.0.6.128/25   | 10.0.1.9 on lo: XDP_TX                    |
/// | 10.0.6.7/32     | 10.0.1.9 on lo: XDP_TX                    |
/// | fd00:3::/64     | fd00:2::2 on veth, MAC OUT.dst           |
///
/// Local addresses: 10.0.0.1 and fd00::1. Every test runs twice: looked up
/// in DIR-24-8 and the IPv6 range table, and in the LPM tries.
fn with_program(test: impl Fn(&mut Program) + Send + Sync + Clone + 'static) {
    for lookup in [Ipv4Lookup::Dir24, Ipv4Lookup::Trie] {
        eprintln!(
            "IPv4 lookup: {lookup}, IPv6 lookup: {}",
            tests::ipv6_lookup_with(lookup)
        );
        with_program_using(lookup, test.clone());
    }
}

fn with_program_using(lookup: Ipv4Lookup, test: impl FnOnce(&mut Program) + Send + 'static) {
    tests::with_egress_veth("p", move |veth| {
        let mut ebpf = Ebpf::load(EBPF_OBJECT).expect("loading the embedded object");
        let mut tables = Tables::from_ebpf(&mut ebpf).unwrap();
        tables.set_ipv4_lookup(lookup).unwrap();
        tables
            .set_ipv6_lookup(tests::ipv6_lookup_with(lookup))
            .unwrap();
        let xdp: &mut Xdp = ebpf.program_mut(PROGRAM_NAME).unwrap().try_into().unwrap();
        xdp.load().expect("the verifier accepts the program");
        let routes = [
            ("10.0.0.0/8", next_hop(veth, "10.255.0.1", None, 1500)),
            (
                "10.0.3.0/24",
                next_hop(veth, "10.0.2.2", Some(OUT.dst), 1500),
            ),
            ("10.0.4.0/24", next_hop(1, "10.0.1.9", Some(OUT.dst), 1500)),
            (
                "10.0.5.0/24",
                next_hop(veth, "10.0.2.5", Some(OUT.dst), 100),
            ),
            (
                "10.0.6.128/25",
                next_hop(1, "10.0.1.9", Some(OUT.dst), 1500),
            ),
            ("10.0.6.7/32", next_hop(1, "10.0.1.9", Some(OUT.dst), 1500)),
            (
                "fd00:3::/64",
                next_hop(veth, "fd00:2::2", Some(OUT.dst), 1500),
            ),
        ];
        let routes: Vec<(Prefix, NextHop)> = routes
            .iter()
            .map(|(p, nh)| (p.parse().unwrap(), *nh))
            .collect();
        tables.add_routes(&routes).unwrap();
        tables
            .sync_local_addrs(&["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()])
            .unwrap();
        test(&mut Program { ebpf, tables, veth });
    })
    .unwrap();
}

/// Routes through one next hop each, as `apply_routes` takes them.
fn one(routes: &[(Prefix, NextHop)]) -> Vec<(Prefix, Want)> {
    routes.iter().map(|(p, nh)| (*p, Want::One(*nh))).collect()
}

fn v4(dst: &str, ttl: u8) -> Vec<u8> {
    udp_v4(
        IN,
        Ipv4Addr::new(10, 0, 1, 2),
        dst.parse().unwrap(),
        ttl,
        b"pop-forwarder test payload",
    )
}

fn v6(dst: &str, hop_limit: u8) -> Vec<u8> {
    udp_v6(
        IN,
        "fd00:1::2".parse().unwrap(),
        dst.parse::<Ipv6Addr>().unwrap(),
        hop_limit,
        b"pop-forwarder test payload",
    )
}

/// The expected result of one frame.
struct Case {
    name: &'static str,
    frame: Vec<u8>,
    action: u32,
    /// None: the frame must come out unchanged.
    output: Option<Vec<u8>>,
    counter: Counter,
}

fn check(program: &Program, cases: Vec<Case>) {
    for case in cases {
        let before = program.counters();
        let (action, out) = program.run(&case.frame);
        let after = program.counters();
        assert_eq!(action, case.action, "{}: action", case.name);
        let expected = case.output.unwrap_or_else(|| case.frame.clone());
        assert_eq!(out, expected, "{}: output bytes", case.name);
        for c in Counter::ALL {
            let delta = after[c.name()] - before[c.name()];
            let want = u64::from(c == case.counter);
            assert_eq!(
                delta,
                want,
                "{}: counter {} moved by {delta}",
                case.name,
                c.name()
            );
        }
    }
}

#[test]
fn forwards_ipv4_ipv6_and_options_with_exact_bytes() {
    with_program(|p| {
        let options = with_ipv4_options(&v4("10.0.3.7", 64), &[0x94, 0x04, 0x00, 0x00]); // Router Alert
        let max_options = with_ipv4_options(&v4("10.0.3.7", 64), &[0x01; 40]); // IHL 15, NOPs
        check(
            p,
            vec![
                Case {
                    name: "ipv4",
                    frame: v4("10.0.3.7", 64),
                    action: XDP_REDIRECT,
                    output: Some(forwarded(&v4("10.0.3.7", 64), OUT)),
                    counter: Counter::Forwarded,
                },
                Case {
                    name: "ipv4 ttl 2",
                    frame: v4("10.0.3.7", 2),
                    action: XDP_REDIRECT,
                    output: Some(forwarded(&v4("10.0.3.7", 2), OUT)),
                    counter: Counter::Forwarded,
                },
                Case {
                    name: "ipv4 ttl 255",
                    frame: v4("10.0.3.7", 255),
                    action: XDP_REDIRECT,
                    output: Some(forwarded(&v4("10.0.3.7", 255), OUT)),
                    counter: Counter::Forwarded,
                },
                Case {
                    name: "ipv4 options ihl 6",
                    frame: options.clone(),
                    action: XDP_REDIRECT,
                    output: Some(forwarded(&options, OUT)),
                    counter: Counter::Forwarded,
                },
                // Forty options (NOPs) are more than the program walks:
                // the kernel's to forward.
                Case {
                    name: "ipv4 options ihl 15",
                    frame: max_options.clone(),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassIpOptions,
                },
                Case {
                    name: "ipv6",
                    frame: v6("fd00:3::7", 64),
                    action: XDP_REDIRECT,
                    output: Some(forwarded(&v6("fd00:3::7", 64), OUT)),
                    counter: Counter::Forwarded,
                },
                Case {
                    name: "ipv4 back out of the ingress",
                    frame: v4("10.0.4.4", 64),
                    action: XDP_TX,
                    output: Some(forwarded(&v4("10.0.4.4", 64), OUT)),
                    counter: Counter::ForwardedTx,
                },
            ],
        );
    });
}

#[test]
fn hands_the_kernel_what_it_must_decide() {
    with_program(|p| {
        let mut arp = v4("10.0.3.7", 64);
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        // 20 + 8 + 73 = 101 bytes of IP datagram on a 100-byte MTU.
        let too_big_v4 = udp_v4(
            IN,
            Ipv4Addr::new(10, 0, 1, 2),
            Ipv4Addr::new(10, 0, 5, 5),
            64,
            &[7u8; 73],
        );
        let fits_v4 = udp_v4(
            IN,
            Ipv4Addr::new(10, 0, 1, 2),
            Ipv4Addr::new(10, 0, 5, 5),
            64,
            &[7u8; 72],
        ); // 20+8+72 = 100
        check(
            p,
            vec![
                Case {
                    name: "arp",
                    frame: arp,
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassNonIp,
                },
                Case {
                    name: "ipv4 local",
                    frame: v4("10.0.0.1", 64),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassLocal,
                },
                Case {
                    name: "ipv6 local",
                    frame: v6("fd00::1", 64),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassLocal,
                },
                Case {
                    name: "ipv4 multicast",
                    frame: v4("224.0.0.5", 1),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassLinkScope,
                },
                Case {
                    name: "ipv4 broadcast",
                    frame: v4("255.255.255.255", 64),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassLinkScope,
                },
                Case {
                    name: "ipv6 multicast",
                    frame: v6("ff02::1:ff00:1", 255),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassLinkScope,
                },
                Case {
                    name: "ipv6 link-local",
                    frame: v6("fe80::1", 64),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassLinkScope,
                },
                Case {
                    name: "ipv4 ttl 1",
                    frame: v4("10.0.3.7", 1),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassTtlExceeded,
                },
                Case {
                    name: "ipv4 ttl 0",
                    frame: v4("10.0.3.7", 0),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassTtlExceeded,
                },
                Case {
                    name: "ipv6 hop limit 1",
                    frame: v6("fd00:3::7", 1),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassTtlExceeded,
                },
                Case {
                    name: "ipv4 route miss",
                    frame: v4("192.0.2.1", 64),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassRouteMiss,
                },
                Case {
                    name: "ipv6 route miss",
                    frame: v6("2001:db8::1", 64),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassRouteMiss,
                },
                // 10.7.7.7 matches only 10.0.0.0/8 (longest prefix: not the
                // /24s), whose gateway has no MAC yet.
                Case {
                    name: "unknown neighbour",
                    frame: v4("10.7.7.7", 64),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassNoNeighbour,
                },
                Case {
                    name: "too big for egress mtu",
                    frame: too_big_v4,
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassTooBig,
                },
                Case {
                    name: "exactly the egress mtu",
                    frame: fits_v4.clone(),
                    action: XDP_REDIRECT,
                    output: Some(forwarded(&fits_v4, OUT)),
                    counter: Counter::Forwarded,
                },
            ],
        );
    });
}

#[test]
fn route_miss_policy_drop_is_counted() {
    with_program(|p| {
        p.tables.set_route_miss(RouteMissPolicy::Drop).unwrap();
        check(
            p,
            vec![
                Case {
                    name: "ipv4 miss",
                    frame: v4("192.0.2.1", 64),
                    action: XDP_DROP,
                    output: None,
                    counter: Counter::DropRouteMiss,
                },
                Case {
                    name: "ipv6 miss",
                    frame: v6("2001:db8::1", 64),
                    action: XDP_DROP,
                    output: None,
                    counter: Counter::DropRouteMiss,
                },
                // A hit is unaffected by the policy.
                Case {
                    name: "ipv4 hit",
                    frame: v4("10.0.3.7", 64),
                    action: XDP_REDIRECT,
                    output: Some(forwarded(&v4("10.0.3.7", 64), OUT)),
                    counter: Counter::Forwarded,
                },
            ],
        );
    });
}

#[test]
fn malformed_packets_are_dropped_never_forwarded() {
    with_program(|p| {
        let good = v4("10.0.3.7", 64);
        let good6 = v6("fd00:3::7", 64);

        let truncated_ip = good[..14 + 10].to_vec();
        let truncated_ip6 = good6[..14 + 30].to_vec();
        let mut ihl4 = good.clone();
        ihl4[14] = 0x44;
        let mut ihl0 = good.clone();
        ihl0[14] = 0x40;
        // IHL 15 (60 bytes) announced on a frame that ends sooner.
        let mut ihl_past_end = good[..14 + 40].to_vec();
        ihl_past_end[14] = 0x4f;
        ihl_past_end[16..18].copy_from_slice(&40u16.to_be_bytes());
        // Lengths that are wrong under a checksum that is right.
        let mut total_too_long = good.clone();
        let tl = u16::from_be_bytes([good[16], good[17]]) + 1;
        total_too_long[16..18].copy_from_slice(&tl.to_be_bytes());
        fix_ipv4_checksum(&mut total_too_long);
        let mut total_below_header = good.clone();
        total_below_header[16..18].copy_from_slice(&19u16.to_be_bytes());
        fix_ipv4_checksum(&mut total_below_header);
        // Damaged on the way: a destination bit flipped (10.0.3.7 becomes
        // 10.0.3.6, which the table also routes), or the checksum itself.
        let mut dst_bit_flipped = good.clone();
        dst_bit_flipped[14 + 19] ^= 1;
        let mut checksum_wrong = good.clone();
        checksum_wrong[14 + 10] ^= 0x80;
        // Options count too: a damaged option byte under the old checksum.
        let with_options = with_ipv4_options(&good, &[1, 1, 1, 0]);
        let mut option_damaged = with_options.clone();
        option_damaged[14 + 20] ^= 2;
        let mut v6_in_v4 = good.clone();
        v6_in_v4[14] = 0x65;
        let mut payload_too_long = good6.clone();
        let pl = u16::from_be_bytes([good6[18], good6[19]]) + 1;
        payload_too_long[18..20].copy_from_slice(&pl.to_be_bytes());
        let mut v4_in_v6 = good6.clone();
        v4_in_v6[14] = 0x45;
        let mut padded = good.clone(); // Ethernet padding after the datagram is fine.
        padded.extend_from_slice(&[0u8; 6]);

        check(
            p,
            vec![
                Case {
                    name: "ipv4 header cut short",
                    frame: truncated_ip,
                    action: XDP_DROP,
                    output: None,
                    counter: Counter::DropTruncated,
                },
                Case {
                    name: "ipv6 header cut short",
                    frame: truncated_ip6,
                    action: XDP_DROP,
                    output: None,
                    counter: Counter::DropTruncated,
                },
                Case {
                    name: "ihl 4",
                    frame: ihl4,
                    action: XDP_DROP,
                    output: None,
                    counter: Counter::DropBadHeader,
                },
                Case {
                    name: "ihl 0",
                    frame: ihl0,
                    action: XDP_DROP,
                    output: None,
                    counter: Counter::DropBadHeader,
                },
                Case {
                    name: "ihl past the frame",
                    frame: ihl_past_end,
                    action: XDP_DROP,
                    output: None,
                    counter: Counter::DropTruncated,
                },
                Case {
                    name: "total length past the frame",
                    frame: total_too_long,
                    action: XDP_DROP,
                    output: None,
                    counter: Counter::DropBadLength,
                },
                Case {
                    name: "total length below the header",
                    frame: total_below_header,
                    action: XDP_DROP,
                    output: None,
                    counter: Counter::DropBadLength,
                },
                Case {
                    name: "destination bit flipped, checksum not",
                    frame: dst_bit_flipped,
                    action: XDP_DROP,
                    output: None,
                    counter: Counter::DropBadHeader,
                },
                Case {
                    name: "header checksum wrong",
                    frame: checksum_wrong,
                    action: XDP_DROP,
                    output: None,
                    counter: Counter::DropBadHeader,
                },
                Case {
                    name: "option byte damaged",
                    frame: option_damaged,
                    action: XDP_DROP,
                    output: None,
                    counter: Counter::DropBadHeader,
                },
                Case {
                    name: "options under a right checksum",
                    frame: with_options.clone(),
                    action: XDP_REDIRECT,
                    output: Some(forwarded(&with_options, OUT)),
                    counter: Counter::Forwarded,
                },
                Case {
                    name: "version 6 under ethertype ipv4",
                    frame: v6_in_v4,
                    action: XDP_DROP,
                    output: None,
                    counter: Counter::DropBadHeader,
                },
                Case {
                    name: "ipv6 payload length past the frame",
                    frame: payload_too_long,
                    action: XDP_DROP,
                    output: None,
                    counter: Counter::DropBadLength,
                },
                Case {
                    name: "version 4 under ethertype ipv6",
                    frame: v4_in_v6,
                    action: XDP_DROP,
                    output: None,
                    counter: Counter::DropBadHeader,
                },
                Case {
                    name: "ethernet padding",
                    frame: padded.clone(),
                    action: XDP_REDIRECT,
                    output: Some(forwarded(&padded, OUT)),
                    counter: Counter::Forwarded,
                },
            ],
        );
    });
}

#[test]
fn next_hop_counters_count_forwarded_packets_and_bytes() {
    with_program(|p| {
        let frame = v4("10.0.3.9", 64);
        for _ in 0..3 {
            assert_eq!(p.run(&frame).0, XDP_REDIRECT);
        }
        let stats = p.tables.stats(&[]).unwrap();
        let nh = stats
            .next_hops
            .iter()
            .find(|n| n.via == "10.0.2.2")
            .unwrap();
        assert_eq!((nh.packets, nh.bytes), (3, 3 * frame.len() as u64));
    });
}

#[test]
fn the_deny_list_drops_before_any_lookup_and_counts_each_entry() {
    use pop_forwarder::config::Deny;
    with_program(|p| {
        let deny = |s: &str| Deny::parse_line(s).unwrap();
        let list = vec![
            deny("source 10.0.1.0/24"),
            deny("destination fd00:3::/64"),
            deny("destination 10.0.3.7/32"),
        ];
        assert_eq!(p.tables.apply_deny(&list).unwrap(), (3, 0));
        let dropped = |name, frame| Case {
            name,
            frame,
            action: XDP_DROP,
            output: None,
            counter: Counter::DropDenied,
        };
        check(
            p,
            vec![
                dropped("an IPv4 source in a denied prefix", v4("10.0.3.9", 64)),
                // Before the TTL check and the local-address lookup.
                dropped("denied with TTL 1", v4("10.0.3.9", 1)),
                dropped("denied to a local address", v4("10.0.0.1", 64)),
                dropped(
                    "an IPv6 destination in a denied prefix",
                    v6("fd00:3::9", 64),
                ),
            ],
        );
        // Each entry counts what it dropped.
        let counted = |p: &Program, entry: &str| {
            let e = p
                .tables
                .deny_list()
                .unwrap()
                .into_iter()
                .find(|e| format!("{} {}", e.direction, e.prefix) == entry)
                .unwrap();
            (e.packets, e.bytes)
        };
        let v4_len = v4("10.0.3.9", 64).len() as u64;
        assert_eq!(counted(p, "source 10.0.1.0/24"), (3, 3 * v4_len));
        assert_eq!(counted(p, "destination fd00:3::/64").0, 1);
        assert_eq!(counted(p, "destination 10.0.3.7/32"), (0, 0));

        // The source entry goes: IPv4 is forwarded again, but the /32 still
        // stops its one destination. A change that fails is taken back.
        let smaller = vec![list[1], list[2]];
        assert_eq!(p.tables.apply_deny(&smaller).unwrap(), (0, 1));
        assert_eq!(p.run(&v4("10.0.3.9", 64)).0, XDP_REDIRECT);
        assert_eq!(p.run(&v4("10.0.3.7", 64)).0, XDP_DROP);
        let before = p.tables.deny_entries().unwrap();
        p.tables.begin();
        p.tables.apply_deny(&[deny("source 192.0.2.0/24")]).unwrap();
        assert_eq!(p.tables.rollback(), 0);
        assert_eq!(p.tables.deny_entries().unwrap(), before);
        assert_eq!(p.run(&v4("10.0.3.7", 64)).0, XDP_DROP);
        // An empty list: nothing is looked up, everything flows.
        p.tables.apply_deny(&[]).unwrap();
        assert_eq!(p.run(&v4("10.0.3.7", 64)).0, XDP_REDIRECT);
        assert_eq!(p.run(&v6("fd00:3::9", 64)).0, XDP_REDIRECT);
        // Entries the filter in front of the tries marks in many buckets
        // (an IPv4 /8) or cannot mark at all (an IPv6 /8: those lookups
        // skip the filter) still match.
        p.tables
            .apply_deny(&[deny("destination 10.0.0.0/8"), deny("source fd00::/8")])
            .unwrap();
        assert_eq!(p.run(&v4("10.0.3.9", 64)).0, XDP_DROP);
        assert_eq!(p.run(&v6("fd00:3::9", 64)).0, XDP_DROP);
        p.tables
            .apply_deny(&[deny("destination 10.0.3.0/25")])
            .unwrap();
        assert_eq!(p.run(&v4("10.0.3.9", 64)).0, XDP_DROP);
        assert_eq!(p.run(&v4("10.0.3.200", 64)).0, XDP_REDIRECT);
        assert_eq!(p.run(&v6("fd00:3::9", 64)).0, XDP_REDIRECT);
    });
}

/// The answer the deny list's tries give for a whole IPv4 /24 or IPv6 /48
/// is kept per CPU and used for the rest of that /24 (/48), not past it,
/// until the list changes. Shown by taking the entries out of the tries
/// behind the host's back, where the list's generation does not move.
#[test]
fn deny_answers_for_whole_24s_and_48s_are_cached_until_the_list_changes() {
    use aya::maps::{LpmTrie, Map, MapData, lpm_trie::Key};
    use pop_forwarder::config::Deny;
    use pop_forwarder_common::deny;
    with_program_using(Ipv4Lookup::Dir24, |p| {
        let entry = |s: &str| Deny::parse_line(s).unwrap();
        p.tables
            .apply_deny(&[
                entry("destination 10.0.0.0/16"),
                entry("destination fd00:3::/40"),
            ])
            .unwrap();
        // Without the list: 10.0.3.0/24 and fd00:3::/64 are forwarded,
        // 10.0.4.0/24 goes back out of the ingress, fd00:3:1:: has no route.
        assert_eq!(p.run(&v4("10.0.3.9", 64)).0, XDP_DROP);
        assert_eq!(p.run(&v6("fd00:3::9", 64)).0, XDP_DROP);
        let ids = p
            .ebpf
            .program(PROGRAM_NAME)
            .unwrap()
            .info()
            .unwrap()
            .map_ids()
            .unwrap()
            .unwrap();
        let trie = |name: &str| {
            let data = ids
                .iter()
                .map(|&id| MapData::from_id(id).unwrap())
                .find(|m| m.info().unwrap().name_as_str() == Some(name))
                .unwrap();
            Map::from_map_data(data).unwrap()
        };
        let mut v4_trie: LpmTrie<_, deny::KeyV4, u32> = LpmTrie::try_from(trie("DENY_V4")).unwrap();
        v4_trie
            .remove(&Key::new(
                24,
                deny::key_v4(deny::DESTINATION, [10, 0, 0, 0]),
            ))
            .unwrap();
        let mut v6_trie: LpmTrie<_, deny::KeyV6, u32> = LpmTrie::try_from(trie("DENY_V6")).unwrap();
        let net: std::net::Ipv6Addr = "fd00:3::".parse().unwrap();
        v6_trie
            .remove(&Key::new(48, deny::key_v6(deny::DESTINATION, net.octets())))
            .unwrap();
        // The /24 and the /48 the tries answered for are still dropped,
        // from the cache; the rest of the entries' space is not cached.
        assert_eq!(p.run(&v4("10.0.3.200", 64)).0, XDP_DROP);
        assert_eq!(p.run(&v6("fd00:3::10", 64)).0, XDP_DROP);
        assert_eq!(p.run(&v4("10.0.4.1", 64)).0, XDP_TX);
        assert_eq!(p.run(&v6("fd00:3:1::1", 64)).0, XDP_PASS);
        // Any change of the list retires every cached answer.
        p.tables
            .apply_deny(&[entry("source 192.0.2.0/24")])
            .unwrap();
        assert_eq!(p.run(&v4("10.0.3.200", 64)).0, XDP_REDIRECT);
        assert_eq!(p.run(&v6("fd00:3::10", 64)).0, XDP_REDIRECT);
    });
}

#[test]
fn a_freed_next_hop_slot_rests_for_the_grace_period_before_reuse() {
    with_program_using(Ipv4Lookup::Dir24, |p| {
        let route = |s: &str| -> Prefix { s.parse().unwrap() };
        let slot_of = |p: &Program, prefix: &str| {
            p.tables
                .routes(&[])
                .unwrap()
                .into_iter()
                .find(|r| r.prefix == prefix)
                .map(|r| r.next_hop)
                .unwrap()
        };
        let id = p
            .tables
            .add_route(
                route("10.20.0.0/16"),
                &next_hop(p.veth, "10.0.2.77", Some(OUT.dst), 1500),
            )
            .unwrap();
        // Freed: a new next hop right away takes another slot (a lookup of
        // the deleted route may still be reading this one).
        p.tables.del_route(route("10.20.0.0/16")).unwrap();
        let other = p
            .tables
            .add_route(
                route("10.21.0.0/16"),
                &next_hop(p.veth, "10.0.2.78", Some(OUT.dst), 1500),
            )
            .unwrap();
        assert_ne!(other, id, "a slot reused within its grace period");
        assert_eq!(slot_of(p, "10.21.0.0/16"), other);
        // Rested: it is free again (the lowest free slot).
        std::thread::sleep(pop_forwarder::maps::GRACE);
        let again = p
            .tables
            .add_route(
                route("10.22.0.0/16"),
                &next_hop(p.veth, "10.0.2.79", Some(OUT.dst), 1500),
            )
            .unwrap();
        assert_eq!(again, id);
    });
}

#[test]
fn interface_counters_say_what_became_of_the_packets_of_each_ingress() {
    with_program(|p| {
        let links = pop_forwarder::kernel::links().unwrap();
        let lo = |p: &Program| {
            p.tables
                .stats(&links)
                .unwrap()
                .interfaces
                .into_iter()
                .find(|i| i.name == "lo")
                .map(|i| (i.packets, i.forwarded, i.passed, i.dropped))
                .unwrap_or_default()
        };
        let before = lo(p);
        assert_eq!(p.run(&v4("10.0.3.9", 64)).0, XDP_REDIRECT);
        assert_eq!(p.run(&v4("10.0.3.9", 64)).0, XDP_REDIRECT);
        assert_eq!(p.run(&v4("10.0.0.1", 64)).0, XDP_PASS);
        assert_eq!(p.run(&v4("10.0.3.9", 64)[..20]).0, XDP_DROP);
        let after = lo(p);
        assert_eq!(
            (
                after.0 - before.0,
                after.1 - before.1,
                after.2 - before.2,
                after.3 - before.3
            ),
            (4, 2, 1, 1)
        );
    });
}

/// IPv6 routes nest across the range table's /20s: a /16 over many /20s,
/// a /64 and a /65 (ranges keyed by all 128 bits) inside one of them, a
/// /128; deleting a route hands its addresses to the covering one, in the
/// range table as in the trie.
#[test]
fn ipv6_longest_prefix_wins_at_any_length_and_deletes_fall_back() {
    with_program(|p| {
        let veth = p.veth;
        let tx = next_hop(1, "fd00:9::9", Some(OUT.dst), 1500);
        let routes: Vec<(Prefix, NextHop)> = [
            ("fd00::/16", next_hop(veth, "fd00:2::7", None, 1500)),
            ("fd00:3:0:0:8000::/65", tx),
            ("fd00:3::42/128", tx),
        ]
        .iter()
        .map(|(r, nh)| (r.parse().unwrap(), *nh))
        .collect();
        p.tables.add_routes(&routes).unwrap();
        // A frame to `dst` and what becomes of it: forwarded (XDP_TX out
        // of the ingress, or redirected), or passed unchanged.
        let case = |name, dst, action, counter| Case {
            name,
            frame: v6(dst, 64),
            action,
            output: (action != XDP_PASS).then(|| forwarded(&v6(dst, 64), OUT)),
            counter,
        };
        let tx_case = |name, dst| case(name, dst, XDP_TX, Counter::ForwardedTx);
        let via_veth = |name, dst| case(name, dst, XDP_REDIRECT, Counter::Forwarded);
        let no_mac = |name, dst| case(name, dst, XDP_PASS, Counter::PassNoNeighbour);
        check(
            p,
            vec![
                via_veth("fd00:3::7 (the /64)", "fd00:3::7"),
                tx_case("fd00:3::8000:0:0:1 (the /65)", "fd00:3::8000:0:0:1"),
                tx_case("fd00:3::42 (the /128)", "fd00:3::42"),
                via_veth("fd00:3::43 (the /64)", "fd00:3::43"),
                no_mac("fd00:ffff::1 (the /16, another /20)", "fd00:ffff::1"),
                no_mac("fd00:3:1::1 (the /16, beside the /64)", "fd00:3:1::1"),
            ],
        );
        p.tables.del_route("fd00:3::/64".parse().unwrap()).unwrap();
        p.tables
            .del_route("fd00:3::42/128".parse().unwrap())
            .unwrap();
        check(
            p,
            vec![
                no_mac("fd00:3::7 after its /64 went", "fd00:3::7"),
                no_mac("fd00:3::42 after its /128 went", "fd00:3::42"),
                tx_case("fd00:3::8000:0:0:1 still on the /65", "fd00:3::8000:0:0:1"),
            ],
        );
        p.tables.del_route("fd00::/16".parse().unwrap()).unwrap();
        check(
            p,
            vec![
                case(
                    "fd00:ffff::1 after the /16 went",
                    "fd00:ffff::1",
                    XDP_PASS,
                    Counter::PassRouteMiss,
                ),
                tx_case("fd00:3::8000:0:0:1 on the /65 still", "fd00:3::8000:0:0:1"),
            ],
        );
    });
}

/// A /20 with up to seven short ranges is looked up in the copy its entry
/// keeps; with more, in its block. Routes come and go across that line
/// (one /48, four, two) and every address answers by its longest match.
#[test]
fn ipv6_routes_of_a_sparse_20_are_found_in_its_entry_and_past_it() {
    with_program(|p| {
        let tx = next_hop(1, "fd00:9::9", Some(OUT.dst), 1500);
        let add = |p: &mut Program, r: &str| {
            p.tables.add_routes(&[(r.parse().unwrap(), tx)]).unwrap();
        };
        let case = |name: &'static str, dst: &'static str, routed: bool| Case {
            name,
            frame: v6(dst, 64),
            action: if routed { XDP_TX } else { XDP_PASS },
            output: routed.then(|| forwarded(&v6(dst, 64), OUT)),
            counter: if routed {
                Counter::ForwardedTx
            } else {
                Counter::PassRouteMiss
            },
        };
        add(p, "fd01:10:1::/48");
        check(
            p,
            vec![
                case("in the one /48", "fd01:10:1::5", true),
                case("past it", "fd01:10:2::1", false),
                case("before it", "fd01:10:0:ffff::1", false),
            ],
        );
        for r in ["fd01:10:3::/48", "fd01:10:5::/48", "fd01:10:7::/48"] {
            add(p, r);
        }
        check(
            p,
            vec![
                case("the first of four /48s", "fd01:10:1::5", true),
                case("the last of four", "fd01:10:7:ffff::1", true),
                case("between them", "fd01:10:6::1", false),
                case("past them", "fd01:10:8::", false),
            ],
        );
        for r in ["fd01:10:1::/48", "fd01:10:5::/48"] {
            p.tables.del_route(r.parse().unwrap()).unwrap();
        }
        check(
            p,
            vec![
                case("a deleted /48", "fd01:10:1::5", false),
                case("a kept one", "fd01:10:3::9", true),
                case("the other kept one", "fd01:10:7::9", true),
                case("another deleted one", "fd01:10:5::9", false),
            ],
        );
    });
}

#[test]
fn longest_prefix_wins_past_24_bits_and_deletes_fall_back_to_the_covering_route() {
    with_program(|p| {
        check(
            p,
            vec![
                // 10.0.6.0/24 has no route of its own: 10.0.0.0/8 (no MAC yet).
                Case {
                    name: "10.0.6.1 (the /8)",
                    frame: v4("10.0.6.1", 64),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassNoNeighbour,
                },
                Case {
                    name: "10.0.6.7 (the /32)",
                    frame: v4("10.0.6.7", 64),
                    action: XDP_TX,
                    output: Some(forwarded(&v4("10.0.6.7", 64), OUT)),
                    counter: Counter::ForwardedTx,
                },
                Case {
                    name: "10.0.6.8 (the /8)",
                    frame: v4("10.0.6.8", 64),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassNoNeighbour,
                },
                Case {
                    name: "10.0.6.200 (the /25)",
                    frame: v4("10.0.6.200", 64),
                    action: XDP_TX,
                    output: Some(forwarded(&v4("10.0.6.200", 64), OUT)),
                    counter: Counter::ForwardedTx,
                },
            ],
        );
        p.tables.del_route("10.0.6.7/32".parse().unwrap()).unwrap();
        p.tables.del_route("10.0.3.0/24".parse().unwrap()).unwrap();
        check(
            p,
            vec![
                Case {
                    name: "10.0.6.7 after its /32 went",
                    frame: v4("10.0.6.7", 64),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassNoNeighbour,
                },
                Case {
                    name: "10.0.3.7 after its /24 went",
                    frame: v4("10.0.3.7", 64),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassNoNeighbour,
                },
                Case {
                    name: "10.0.6.200 still on the /25",
                    frame: v4("10.0.6.200", 64),
                    action: XDP_TX,
                    output: Some(forwarded(&v4("10.0.6.200", 64), OUT)),
                    counter: Counter::ForwardedTx,
                },
            ],
        );
        p.tables.del_route("10.0.0.0/8".parse().unwrap()).unwrap();
        check(
            p,
            vec![Case {
                name: "10.0.3.7 with no route left",
                frame: v4("10.0.3.7", 64),
                action: XDP_PASS,
                output: None,
                counter: Counter::PassRouteMiss,
            }],
        );
    });
}

#[test]
fn a_batch_that_fails_leaves_the_tables_as_they_were() {
    with_program(|p| {
        let before = p.tables.routes(&[]).unwrap().len();
        let slots_before = p.tables.next_hop_slots().unwrap();
        let nh = next_hop(1, "10.0.9.9", Some(OUT.dst), 1500);
        let batch: Vec<(Prefix, NextHop)> = ["10.0.7.0/24", "10.0.7.128/25", "10.0.3.0/24"]
            .iter()
            .map(|p| (p.parse().unwrap(), nh))
            .collect();
        let err = format!("{:#}", p.tables.add_routes(&batch).unwrap_err());
        assert!(err.contains("10.0.3.0/24 already exists"), "{err}");
        assert_eq!(p.tables.routes(&[]).unwrap().len(), before);
        assert_eq!(
            p.tables.next_hop_slots().unwrap(),
            slots_before,
            "the new next hop was freed"
        );
        check(
            p,
            vec![
                Case {
                    name: "10.0.7.1 unrouted again",
                    frame: v4("10.0.7.1", 64),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassNoNeighbour,
                },
                Case {
                    name: "10.0.7.200 unrouted again",
                    frame: v4("10.0.7.200", 64),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassNoNeighbour,
                },
            ],
        );
    });
}

/// Pins removed on drop.
struct PinDir(std::path::PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A second writer on pinned tables (a restarted daemon) takes the IPv6
/// range table over from the route record and the /20 entries: what the
/// first wrote keeps answering while the second deletes, adds and
/// allocates blocks of its own beside the first's.
#[test]
fn a_restarted_writer_adopts_the_ipv6_range_table() {
    tests::with_egress_veth("a", |veth| {
        let dir = PinDir(std::path::Path::new("/sys/fs/bpf").join(tests::unique("pins")));
        std::fs::create_dir_all(&dir.0).unwrap();
        let load = || {
            let mut loader = aya::EbpfLoader::new();
            for name in pop_forwarder_common::map_names::ALL {
                loader.map_pin_path(name, dir.0.join(name));
            }
            loader.load(EBPF_OBJECT).unwrap()
        };
        let tx = next_hop(1, "fd00:9::9", Some(OUT.dst), 1500);
        // A /48 alone in each of 200 /20s from `first`, `at` /48s into
        // it (so that one writer's ranges differ from the other's).
        let spread = |first: u128, at: u128| -> Vec<(Prefix, NextHop)> {
            (first..first + 200)
                .map(|chunk| {
                    let net = (chunk << 108) | (at << 80);
                    (
                        Prefix::containing(Ipv6Addr::from(net).into(), 48).unwrap(),
                        tx,
                    )
                })
                .collect()
        };
        let host_in = |p: &Prefix| match p.addr {
            std::net::IpAddr::V6(a) => Ipv6Addr::from(u128::from(a) | 0x1234).to_string(),
            _ => unreachable!(),
        };
        let first = spread(0x20010, 7);
        let second = spread(0x20100, 9);
        let mut earlier = load();
        let mut a = Tables::from_ebpf(&mut earlier).unwrap();
        let mut routes = first.clone();
        routes.push(("fd00:3::/64".parse().unwrap(), tx));
        routes.push(("fd00:3:0:1::/64".parse().unwrap(), tx));
        a.add_routes(&routes).unwrap();

        let mut ebpf = load();
        let mut tables = Tables::from_ebpf(&mut ebpf).unwrap();
        let xdp: &mut Xdp = ebpf.program_mut(PROGRAM_NAME).unwrap().try_into().unwrap();
        xdp.load().expect("the verifier accepts the program");
        tables.del_route("fd00:3::/64".parse().unwrap()).unwrap();
        let mut more = second.clone();
        more.push(("fd00:3:0:2::/64".parse().unwrap(), tx));
        tables.add_routes(&more).unwrap();
        let p = Program { ebpf, tables, veth };
        let tx_case = |dst: String| {
            let frame = v6(&dst, 64);
            let (action, out) = p.run(&frame);
            assert_eq!(action, XDP_TX, "{dst}");
            assert_eq!(out, forwarded(&frame, OUT), "{dst}");
        };
        for (prefix, _) in first.iter().chain(&second) {
            tx_case(host_in(prefix));
        }
        tx_case("fd00:3:0:1::1".into());
        tx_case("fd00:3:0:2::1".into());
        assert_eq!(p.run(&v6("fd00:3::7", 64)).0, XDP_PASS, "its /64 went");
        drop(a);
    })
    .unwrap();
}

/// A batch of IPv6 routes the range table cannot take (one /20 past
/// 65,535 ranges: 32,768 /48s, none adjacent) is refused whole: record,
/// range table and next hops as they were.
#[test]
fn an_ipv6_batch_the_range_table_cannot_take_changes_nothing() {
    with_program_using(Ipv4Lookup::Dir24, |p| {
        let before = p.tables.routes(&[]).unwrap().len();
        let slots_before = p.tables.next_hop_slots().unwrap();
        let nh = next_hop(1, "fd00:9::9", Some(OUT.dst), 1500);
        let batch: Vec<(Prefix, NextHop)> = (0..32_768u128)
            .map(|i| {
                let net = (0xfd005u128 << 108) | (i * 2) << 80;
                (
                    Prefix::containing(Ipv6Addr::from(net).into(), 48).unwrap(),
                    nh,
                )
            })
            .collect();
        // Written, then taken back when the range table refuses it.
        let err = format!("{:#}", p.tables.add_routes(&batch).unwrap_err());
        assert!(err.contains("more than 65,535 ranges"), "{err}");
        assert_eq!(p.tables.routes(&[]).unwrap().len(), before);
        assert_eq!(p.tables.next_hop_slots().unwrap(), slots_before);
        // As a planned change (a reload, the kernel mirror): refused before
        // any write.
        let err = format!("{:#}", p.tables.upsert_routes(&one(&batch)).unwrap_err());
        assert!(
            err.contains("the change's IPv6 routes") && err.contains("more than 65,535 ranges"),
            "{err}"
        );
        assert_eq!(p.tables.routes(&[]).unwrap().len(), before);
        assert_eq!(p.tables.next_hop_slots().unwrap(), slots_before);
        check(
            p,
            vec![
                Case {
                    name: "fd00:5000::1 unrouted",
                    frame: v6("fd00:5000::1", 64),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassRouteMiss,
                },
                Case {
                    name: "fd00:3::7 as before",
                    frame: v6("fd00:3::7", 64),
                    action: XDP_REDIRECT,
                    output: Some(forwarded(&v6("fd00:3::7", 64), OUT)),
                    counter: Counter::Forwarded,
                },
            ],
        );
        // The range table has room for routes that fit, after all that.
        p.tables.add_routes(&batch[..1000]).unwrap();
        assert_eq!(p.run(&v6("fd00:5000::1", 64)).0, XDP_TX);
    });
}

#[test]
fn local_addresses_are_routes_the_operator_cannot_touch() {
    with_program(|p| {
        let nh = next_hop(1, "10.0.9.9", Some(OUT.dst), 1500);
        for prefix in ["10.0.0.1/32", "fd00::1/128"] {
            let err = format!(
                "{:#}",
                p.tables
                    .add_route(prefix.parse().unwrap(), &nh)
                    .unwrap_err()
            );
            assert!(err.contains("one of this box's own addresses"), "{err}");
            let err = format!(
                "{:#}",
                p.tables.del_route(prefix.parse().unwrap()).unwrap_err()
            );
            assert!(err.contains("one of this box's own addresses"), "{err}");
        }
        // Local routes are not operator routes.
        assert!(
            p.tables
                .routes(&[])
                .unwrap()
                .iter()
                .all(|r| !r.prefix.starts_with("10.0.0.1/"))
        );
        // An address that goes stops being local, and its /8 takes over.
        p.tables
            .sync_local_addrs(&["fd00::1".parse().unwrap()])
            .unwrap();
        check(
            p,
            vec![
                Case {
                    name: "10.0.0.1 no longer local",
                    frame: v4("10.0.0.1", 64),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassNoNeighbour,
                },
                Case {
                    name: "fd00::1 still local",
                    frame: v6("fd00::1", 64),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassLocal,
                },
            ],
        );
    });
}

#[test]
fn applying_a_route_set_adds_changes_and_deletes_in_place() {
    with_program(|p| {
        let veth = p.veth;
        let new_mac = [0x02, 0, 0, 0, 0, 0xc1];
        let desired: Vec<(Prefix, NextHop)> = [
            // Kept as it is.
            ("10.0.0.0/8", next_hop(veth, "10.255.0.1", None, 1500)),
            // Same gateway, new static MAC.
            (
                "10.0.3.0/24",
                next_hop(veth, "10.0.2.2", Some(new_mac), 1500),
            ),
            // Moved to the gateway on lo (XDP_TX).
            ("10.0.5.0/24", next_hop(1, "10.0.1.9", Some(OUT.dst), 1500)),
            // New.
            ("10.0.8.0/24", next_hop(1, "10.0.1.9", Some(OUT.dst), 1500)),
        ]
        .iter()
        .map(|(pfx, nh)| (pfx.parse().unwrap(), *nh))
        .collect();
        let (added, changed, deleted) = p.tables.apply_routes(&one(&desired)).unwrap();
        // 10.0.4.0/24, 10.0.6.128/25, 10.0.6.7/32 and fd00:3::/64 go.
        assert_eq!((added, changed, deleted), (1, 2, 4));
        let moved = Eth {
            src: OUT.src,
            dst: new_mac,
        };
        check(
            p,
            vec![
                Case {
                    name: "10.0.3.7 to the new MAC",
                    frame: v4("10.0.3.7", 64),
                    action: XDP_REDIRECT,
                    output: Some(forwarded(&v4("10.0.3.7", 64), moved)),
                    counter: Counter::Forwarded,
                },
                Case {
                    name: "10.0.5.5 now out of the ingress",
                    frame: v4("10.0.5.5", 64),
                    action: XDP_TX,
                    output: Some(forwarded(&v4("10.0.5.5", 64), OUT)),
                    counter: Counter::ForwardedTx,
                },
                Case {
                    name: "10.0.8.8 new",
                    frame: v4("10.0.8.8", 64),
                    action: XDP_TX,
                    output: Some(forwarded(&v4("10.0.8.8", 64), OUT)),
                    counter: Counter::ForwardedTx,
                },
                Case {
                    name: "10.0.4.4 back to the /8",
                    frame: v4("10.0.4.4", 64),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassNoNeighbour,
                },
                Case {
                    name: "fd00:3::7 gone",
                    frame: v6("fd00:3::7", 64),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassRouteMiss,
                },
            ],
        );
        // Applying the same set again changes nothing.
        assert_eq!(p.tables.apply_routes(&one(&desired)).unwrap(), (0, 0, 0));
    });
}

/// Router requirements (RFC 1812): a unicast frame for another host's MAC
/// is neither routed nor steered but left to the kernel, and a martian
/// source (unspecified, loopback, multicast, limited broadcast) is never
/// forwarded. The rest of 0/8 and 240/4 are unicast sources, as in Linux.
#[test]
fn frames_for_other_hosts_and_martian_sources_are_not_forwarded() {
    with_program(|p| {
        // BPF_PROG_TEST_RUN's frames arrive on lo (ifindex 1): give it the
        // MAC the test frames are sent to.
        p.tables.set_interface_mac(1, Mac(IN.dst)).unwrap();
        let payload = b"pop-forwarder test payload";
        let other_host = Eth {
            src: IN.src,
            dst: [0x02, 0, 0, 0, 0, 0x99],
        };
        let from_v4 = |src: &str| {
            udp_v4(
                IN,
                src.parse().unwrap(),
                Ipv4Addr::new(10, 0, 3, 7),
                64,
                payload,
            )
        };
        let from_v6 = |src: &str| {
            udp_v6(
                IN,
                src.parse().unwrap(),
                "fd00:3::7".parse().unwrap(),
                64,
                payload,
            )
        };
        let mut cases = vec![
            Case {
                name: "for another host's MAC",
                frame: udp_v4(
                    other_host,
                    Ipv4Addr::new(10, 0, 1, 2),
                    Ipv4Addr::new(10, 0, 3, 7),
                    64,
                    payload,
                ),
                action: XDP_PASS,
                output: None,
                counter: Counter::PassNotForUs,
            },
            Case {
                name: "for this interface's MAC",
                frame: v4("10.0.3.7", 64),
                action: XDP_REDIRECT,
                output: Some(forwarded(&v4("10.0.3.7", 64), OUT)),
                counter: Counter::Forwarded,
            },
        ];
        for src in [
            "0.0.0.0",
            "127.0.0.1",
            "127.255.3.4",
            "224.0.0.5",
            "239.1.2.3",
            "255.255.255.255",
        ] {
            cases.push(Case {
                name: src,
                frame: from_v4(src),
                action: XDP_DROP,
                output: None,
                counter: Counter::DropMartianSource,
            });
        }
        for src in ["::", "::1", "ff02::1", "ff0e::5"] {
            cases.push(Case {
                name: src,
                frame: from_v6(src),
                action: XDP_DROP,
                output: None,
                counter: Counter::DropMartianSource,
            });
        }
        // Source routes are not forwarded (Linux's accept_source_route 0),
        // wherever they stand among the options; malformed options are the
        // kernel's.
        let lsrr = [0x83, 7, 4, 10, 0, 0, 1, 0];
        let ssrr = [0x89, 7, 4, 10, 0, 0, 1, 0];
        let alert_then_lsrr = [0x94, 4, 0, 0, 0x83, 7, 4, 10, 0, 0, 1, 0];
        for (name, options, action, counter) in [
            ("LSRR", &lsrr[..], XDP_DROP, Counter::DropSourceRouted),
            ("SSRR", &ssrr[..], XDP_DROP, Counter::DropSourceRouted),
            (
                "router alert, then LSRR",
                &alert_then_lsrr[..],
                XDP_DROP,
                Counter::DropSourceRouted,
            ),
            (
                "an option of length 1",
                &[0x44, 1, 0, 0][..],
                XDP_PASS,
                Counter::PassIpOptions,
            ),
            (
                "an option past the header",
                &[0x44, 9, 0, 0][..],
                XDP_PASS,
                Counter::PassIpOptions,
            ),
        ] {
            cases.push(Case {
                name,
                frame: with_ipv4_options(&v4("10.0.3.7", 64), options),
                action,
                output: None,
                counter,
            });
        }
        for src in ["0.1.2.3", "240.0.0.1"] {
            cases.push(Case {
                name: src,
                frame: from_v4(src),
                action: XDP_REDIRECT,
                output: Some(forwarded(&from_v4(src), OUT)),
                counter: Counter::Forwarded,
            });
        }
        check(p, cases);
    });
}

/// A change costs in proportion to its routes: applying one that adds,
/// repoints and deletes thousands of routes walks the route tables a
/// constant number of times (a walk per route, as deletions once took,
/// makes large reloads quadratic), and leaves exactly the routes asked for.
#[test]
fn a_large_route_change_walks_the_tables_a_constant_number_of_times() {
    with_program(|p| {
        let veth = p.veth;
        let gateways: Vec<NextHop> = (0..4)
            .map(|i| next_hop(veth, &format!("10.255.1.{}", i + 1), None, 1500))
            .collect();
        let route = |i: u32, gw: usize| -> (Prefix, NextHop) {
            let addr = std::net::Ipv4Addr::from(0x6400_0000 + (i << 8));
            (format!("{addr}/24").parse().unwrap(), gateways[gw])
        };
        let first: Vec<_> = (0..2000).map(|i| route(i, i as usize % 4)).collect();
        p.tables.apply_routes(&one(&first)).unwrap();
        // Keep 500, repoint 500, delete 1,000, add 1,000.
        let second: Vec<_> = (0..500)
            .map(|i| route(i, i as usize % 4))
            .chain((500..1000).map(|i| route(i, (i as usize + 1) % 4)))
            .chain((2000..3000).map(|i| route(i, 0)))
            .collect();
        let scans = p.tables.route_table_scans();
        let (added, changed, deleted) = p.tables.apply_routes(&one(&second)).unwrap();
        assert_eq!((added, changed, deleted), (1000, 500, 1000));
        let walks = p.tables.route_table_scans() - scans;
        assert!(
            walks <= 2,
            "{walks} walks over the route tables for one change"
        );
        let links = pop_forwarder::kernel::links().unwrap();
        let mut have: Vec<(String, String)> = p
            .tables
            .routes(&links)
            .unwrap()
            .into_iter()
            .map(|r| (r.prefix, r.via))
            .collect();
        let mut want: Vec<(String, String)> = second
            .iter()
            .map(|(pfx, nh)| {
                (
                    pfx.to_string(),
                    pop_forwarder::maps::gateway_addr(nh).to_string(),
                )
            })
            .collect();
        have.sort();
        want.sort();
        assert_eq!(have, want);
        // Every gateway still in use kept its slot; none leaked.
        let in_use = p
            .tables
            .next_hop_slots()
            .unwrap()
            .iter()
            .filter(|nh| nh.is_in_use())
            .count();
        assert_eq!(in_use, 4);
    });
}

const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0xbb];

/// The destination MAC of each of 64 flows (sources 10.0.1.1 to .64, or
/// fd00:1::1 to ::40) to `dst`, after checking each came out forwarded
/// with exact bytes to A or B.
fn paths(p: &Program, dst: &str) -> Vec<[u8; 6]> {
    (1..=64u8)
        .map(|i| {
            let frame = if dst.contains(':') {
                udp_v6(
                    IN,
                    format!("fd00:1::{i:x}").parse().unwrap(),
                    dst.parse().unwrap(),
                    64,
                    b"ecmp",
                )
            } else {
                udp_v4(
                    IN,
                    Ipv4Addr::new(10, 0, 1, i),
                    dst.parse().unwrap(),
                    64,
                    b"ecmp",
                )
            };
            let (action, out) = p.run(&frame);
            assert_eq!(action, XDP_REDIRECT, "flow {i} to {dst}");
            let mac: [u8; 6] = out[0..6].try_into().unwrap();
            assert!(mac == MAC_A || mac == MAC_B, "flow {i}: dst MAC {mac:02x?}");
            let eth = Eth {
                src: OUT.src,
                dst: mac,
            };
            assert_eq!(out, forwarded(&frame, eth), "flow {i}: output bytes");
            mac
        })
        .collect()
}

#[test]
fn ecmp_groups_keep_each_flow_on_one_path_and_move_only_a_leaving_members_flows() {
    with_program(|p| {
        let a = next_hop(p.veth, "10.0.2.10", Some(MAC_A), 1500);
        let b = next_hop(p.veth, "10.0.2.11", Some(MAC_B), 1500);
        let in_use = |p: &Program| {
            let slots = p.tables.next_hop_slots().unwrap();
            slots.iter().filter(|nh| nh.is_in_use()).count()
        };
        let fixture = in_use(p);
        let both = Want::group(vec![(a, 1), (b, 1)]).unwrap();
        let routes = |want: &Want| {
            vec![
                ("10.0.7.0/24".parse().unwrap(), want.clone()),
                ("fd00:7::/64".parse().unwrap(), want.clone()),
            ]
        };
        assert_eq!(p.tables.upsert_routes(&routes(&both)).unwrap(), (2, 0));
        let listed = p.tables.routes(&[]).unwrap();
        let group = listed.iter().find(|r| r.prefix == "10.0.7.0/24").unwrap();
        assert!(
            group.via.starts_with("group 0 (10.0.2.10 ifindex")
                && group.via.contains(", 10.0.2.11"),
            "{}",
            group.via
        );
        for dst in ["10.0.7.7", "fd00:7::7"] {
            let first = paths(p, dst);
            assert_eq!(first, paths(p, dst), "{dst}: a flow changed paths");
            let on_a = first.iter().filter(|m| **m == MAC_A).count();
            assert!(
                (12..=52).contains(&on_a),
                "{dst}: {on_a} of 64 flows on A: the group does not spread flows"
            );
        }
        // B leaves (the route now through A alone): its flows move to A,
        // and no flow of A moves. The group, used by no route, is freed.
        let before = paths(p, "10.0.7.7");
        assert_eq!(
            p.tables.upsert_routes(&routes(&Want::One(a))).unwrap(),
            (0, 2)
        );
        assert!(paths(p, "10.0.7.7").iter().all(|m| *m == MAC_A));
        assert!(
            p.tables
                .routes(&[])
                .unwrap()
                .iter()
                .all(|r| !r.via.starts_with("group"))
        );
        // B comes back: exactly the flows it had return to it.
        assert_eq!(p.tables.upsert_routes(&routes(&both)).unwrap(), (0, 2));
        assert_eq!(paths(p, "10.0.7.7"), before);
        // A third gateway joins: only flows moving to it move.
        let c = next_hop(p.veth, "10.0.2.12", Some([0x02, 0, 0, 0, 0, 0xcc]), 1500);
        let three = Want::group(vec![(a, 1), (b, 1), (c, 1)]).unwrap();
        p.tables.upsert_routes(&routes(&three)).unwrap();
        let after: Vec<[u8; 6]> = (1..=64u8)
            .map(|i| {
                let frame = udp_v4(
                    IN,
                    Ipv4Addr::new(10, 0, 1, i),
                    "10.0.7.7".parse().unwrap(),
                    64,
                    b"ecmp",
                );
                p.run(&frame).1[0..6].try_into().unwrap()
            })
            .collect();
        for (was, now) in before.iter().zip(&after) {
            assert!(
                now == was || *now == [0x02, 0, 0, 0, 0, 0xcc],
                "a flow moved from A to B or back"
            );
        }
        // Deleting the routes frees the group and its next hops.
        p.tables.del_route("10.0.7.0/24".parse().unwrap()).unwrap();
        p.tables.del_route("fd00:7::/64".parse().unwrap()).unwrap();
        assert_eq!(in_use(p), fixture, "the fixture's next hops alone");
    });
}

#[test]
fn connected_subnets_go_to_the_host_itself_and_kernel_routes_to_the_kernel() {
    with_program(|p| {
        let mut subnet_v4 = next_hop(p.veth, "0.0.0.0", None, 1500);
        subnet_v4.flags = NH_F_IN_USE | NH_F_CONNECTED;
        let mut subnet_v6 = next_hop(p.veth, "::", None, 1500);
        subnet_v6.flags = NH_F_IN_USE | NH_F_CONNECTED;
        p.tables
            .add_routes(&[
                ("10.0.8.0/24".parse().unwrap(), subnet_v4),
                ("fd00:8::/64".parse().unwrap(), subnet_v6),
            ])
            .unwrap();
        // A route the kernel must handle (a blackhole, say) inside
        // 10.0.0.0/8: not the covering route's to forward.
        p.tables
            .add_route_to("10.0.9.0/24".parse().unwrap(), KERNEL_NEXT_HOP)
            .unwrap();
        p.tables
            .add_route_to("fd00:9::/64".parse().unwrap(), KERNEL_NEXT_HOP)
            .unwrap();
        let host = Eth {
            src: OUT.src,
            dst: MAC_A,
        };
        for addr in ["10.0.8.5", "fd00:8::5"] {
            p.tables
                .set_neighbour(p.veth, addr.parse().unwrap(), Some(Mac(MAC_A)))
                .unwrap();
        }
        // The same address on another interface says nothing of this one.
        p.tables
            .set_neighbour(1, "10.0.8.6".parse().unwrap(), Some(Mac(MAC_B)))
            .unwrap();
        check(
            p,
            vec![
                Case {
                    name: "connected ipv4, neighbour known",
                    frame: v4_frame("10.0.8.5"),
                    action: XDP_REDIRECT,
                    output: Some(forwarded(&v4_frame("10.0.8.5"), host)),
                    counter: Counter::Forwarded,
                },
                Case {
                    name: "connected ipv6, neighbour known",
                    frame: v6("fd00:8::5", 64),
                    action: XDP_REDIRECT,
                    output: Some(forwarded(&v6("fd00:8::5", 64), host)),
                    counter: Counter::Forwarded,
                },
                Case {
                    name: "connected ipv4, neighbour unknown here",
                    frame: v4_frame("10.0.8.6"),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassNoNeighbour,
                },
                Case {
                    name: "connected ipv6, neighbour unknown",
                    frame: v6("fd00:8::6", 64),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassNoNeighbour,
                },
                Case {
                    name: "kernel route ipv4",
                    frame: v4_frame("10.0.9.1"),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassKernelRoute,
                },
                Case {
                    name: "kernel route ipv6",
                    frame: v6("fd00:9::1", 64),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassKernelRoute,
                },
            ],
        );
        // The neighbour goes from the kernel's cache: so from the table.
        p.tables
            .set_neighbour(p.veth, "10.0.8.5".parse().unwrap(), None)
            .unwrap();
        assert_eq!(p.run(&v4_frame("10.0.8.5")).0, XDP_PASS);
    });
}

/// `frame` with a VLAN tag (TPID, VLAN ID) inserted after the MACs.
fn tagged(frame: &[u8], tpid: u16, vid: u16) -> Vec<u8> {
    let mut out = frame[..12].to_vec();
    out.extend_from_slice(&tpid.to_be_bytes());
    out.extend_from_slice(&vid.to_be_bytes());
    out.extend_from_slice(&frame[12..]);
    out
}

#[test]
fn vlan_tags_come_off_go_back_for_the_kernel_and_go_on_for_the_next_hop() {
    with_program(|p| {
        // The test run's ingress is lo (ifindex 1): VLAN 200 there, and
        // 300 inside 802.1ad 200.
        p.tables
            .sync_vlans(&[
                VlanKey {
                    ifindex: 1,
                    outer: 200,
                    inner: 0,
                },
                VlanKey {
                    ifindex: 1,
                    outer: 200,
                    inner: 300,
                },
            ])
            .unwrap();
        // 10.0.10.0/24 and fd00:10::/64 leave on VLAN 100 of the veth.
        let mut on_vlan = next_hop(p.veth, "10.0.2.20", Some(OUT.dst), 1500);
        on_vlan.vlan_tci = 100;
        on_vlan.vlan_proto = 0x8100;
        let mut on_vlan6 = next_hop(p.veth, "fd00:2::20", Some(OUT.dst), 1500);
        on_vlan6.vlan_tci = 100;
        on_vlan6.vlan_proto = 0x8100;
        p.tables
            .add_routes(&[
                ("10.0.10.0/24".parse().unwrap(), on_vlan),
                ("fd00:10::/64".parse().unwrap(), on_vlan6),
            ])
            .unwrap();
        let routed = forwarded(&v4("10.0.3.7", 64), OUT);
        let q = 0x8100;
        let ad = 0x88a8;
        check(
            p,
            vec![
                Case {
                    name: "tagged in, untagged out",
                    frame: tagged(&v4("10.0.3.7", 64), q, 200),
                    action: XDP_REDIRECT,
                    output: Some(routed.clone()),
                    counter: Counter::Forwarded,
                },
                Case {
                    name: "two tags in, untagged out",
                    frame: tagged(&tagged(&v4("10.0.3.7", 64), q, 300), ad, 200),
                    action: XDP_REDIRECT,
                    output: Some(routed),
                    counter: Counter::Forwarded,
                },
                Case {
                    name: "untagged in, tagged out",
                    frame: v4("10.0.10.5", 64),
                    action: XDP_REDIRECT,
                    output: Some(tagged(&forwarded(&v4("10.0.10.5", 64), OUT), q, 100)),
                    counter: Counter::Forwarded,
                },
                Case {
                    name: "tagged in, other tag out",
                    frame: tagged(&v4("10.0.10.5", 64), q, 200),
                    action: XDP_REDIRECT,
                    output: Some(tagged(&forwarded(&v4("10.0.10.5", 64), OUT), q, 100)),
                    counter: Counter::Forwarded,
                },
                Case {
                    name: "ipv6 tagged in, other tag out",
                    frame: tagged(&v6("fd00:10::5", 64), q, 200),
                    action: XDP_REDIRECT,
                    output: Some(tagged(&forwarded(&v6("fd00:10::5", 64), OUT), q, 100)),
                    counter: Counter::Forwarded,
                },
                // For the kernel: the tags go back on, exactly.
                Case {
                    name: "tagged, for this box",
                    frame: tagged(&v4("10.0.0.1", 64), q, 200),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassLocal,
                },
                Case {
                    name: "two tags, TTL 1",
                    frame: tagged(&tagged(&v4("10.0.3.7", 1), q, 300), ad, 200),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassTtlExceeded,
                },
                Case {
                    name: "a VLAN this box does not have",
                    frame: tagged(&v4("10.0.3.7", 64), q, 201),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassUnknownVlan,
                },
                Case {
                    name: "ARP, tagged",
                    frame: {
                        let mut arp = tagged(&v4("10.0.3.7", 64), q, 200);
                        arp[16..18].copy_from_slice(&0x0806u16.to_be_bytes());
                        arp
                    },
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassNonIp,
                },
                Case {
                    name: "a tag and nothing after it",
                    frame: v4("10.0.3.7", 64)[..12]
                        .iter()
                        .chain(&[0x81, 0x00, 0x00, 0xc8, 0x08, 0x00])
                        .copied()
                        .collect(),
                    action: XDP_DROP,
                    output: None,
                    counter: Counter::DropTruncated,
                },
            ],
        );
    });
}

fn v4_frame(dst: &str) -> Vec<u8> {
    v4(dst, 64)
}

mod steering {
    use pop_forwarder::steering::{family, widen};
    use pop_forwarder_common::{
        maglev::{self, NO_NODE},
        steering::{
            CacheNode, ENCAP_SOURCE_V4, ENCAP_SOURCE_V6, FLOW_WAYS, FLOWS_SEEN_SLOTS, FlowKey,
            NODE_F_IN_USE, NODE_F_IPIP, NODE_F_MAC_VALID, PROTO_TCP, PROTO_UDP, VipKey,
            flow_set_v4,
        },
    };
    use tests::packets::flow_frame;

    use super::*;

    const SEED: u32 = 42;
    const SIZE: u32 = 251;
    const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0xaa, 0x01];
    const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0xbb, 0x02];

    fn vip(addr: &str, protocol: u8, port: u16) -> VipKey {
        let a: std::net::IpAddr = addr.parse().unwrap();
        VipKey {
            addr: widen(a),
            port,
            protocol,
            family: family(a),
        }
    }

    /// Node 0 (A) behind the veth, node 1 (B) behind lo (XDP_TX); VIPs:
    /// 192.0.2.10 UDP any port and 2001:db8::10 TCP 443, both on a table
    /// of A and B; 192.0.2.20 TCP 80 on an empty table.
    fn setup(p: &mut Program) {
        let veth = p.veth;
        let flags = NODE_F_IN_USE | NODE_F_MAC_VALID;
        p.tables
            .write_node(
                0,
                &CacheNode {
                    ifindex: veth,
                    flags,
                    dst_mac: MAC_A,
                    src_mac: OUT.src,
                    addr: [0; 16],
                    family: 4,
                    mtu: 1500,
                },
            )
            .unwrap();
        p.tables
            .write_node(
                1,
                &CacheNode {
                    ifindex: 1,
                    flags,
                    dst_mac: MAC_B,
                    src_mac: OUT.src,
                    addr: [0; 16],
                    family: 4,
                    mtu: 1500,
                },
            )
            .unwrap();
        let mut pool = vec![
            maglev::PoolNode {
                id: 0,
                key: 11,
                weight: 1,
            },
            maglev::PoolNode {
                id: 1,
                key: 22,
                weight: 1,
            },
        ];
        let mut table = vec![0u32; SIZE as usize];
        maglev::populate(&mut pool, &mut table, &mut [(0, 0, 0, 0); 2]);
        p.tables
            .write_vip(0, &vip("192.0.2.10", PROTO_UDP, 0), &table)
            .unwrap();
        p.tables
            .write_vip(1, &vip("2001:db8::10", PROTO_TCP, 443), &table)
            .unwrap();
        p.tables
            .write_vip(
                2,
                &vip("192.0.2.20", PROTO_TCP, 80),
                &[NO_NODE; SIZE as usize],
            )
            .unwrap();
        p.tables.set_steering(SEED, true).unwrap();
    }

    /// The node Maglev gives a new flow, as `pop-forwarder lookup` finds it.
    fn maglev_node(
        p: &Program,
        index: u32,
        src: &str,
        dst: &str,
        protocol: u8,
        sport: u16,
        dport: u16,
    ) -> u32 {
        let (s, d) = (widen(src.parse().unwrap()), widen(dst.parse().unwrap()));
        let hash = maglev::flow_hash(u64::from(SEED), &s, &d, sport, dport, protocol);
        p.tables.maglev_entry(index, hash % SIZE).unwrap()
    }

    /// The connection table's key of a flow.
    fn flow_key(src: &str, dst: &str, protocol: u8, sport: u16, dport: u16) -> FlowKey {
        let dst = dst.parse().unwrap();
        FlowKey {
            src: widen(src.parse().unwrap()),
            dst: widen(dst),
            src_port: sport,
            dst_port: dport,
            protocol,
            family: family(dst),
            pad: [0; 2],
        }
    }

    /// What a frame becomes when steered to `node`: MACs only, IP as it was.
    fn steered(frame: &[u8], node: u32) -> (u32, Vec<u8>) {
        let mut out = frame.to_vec();
        out[0..6].copy_from_slice(if node == 0 { &MAC_A } else { &MAC_B });
        out[6..12].copy_from_slice(&OUT.src);
        (if node == 0 { XDP_REDIRECT } else { XDP_TX }, out)
    }

    fn flow(src: &str, dst: &str, tcp: bool, sport: u16, dport: u16) -> Vec<u8> {
        flow_frame(
            IN,
            src.parse().unwrap(),
            dst.parse().unwrap(),
            tcp,
            sport,
            dport,
        )
    }

    #[test]
    fn an_idle_flow_is_forgotten_after_its_timeout() {
        with_program(|p| {
            setup(p);
            // UDP entries idle for a second are gone; TCP ones never.
            p.tables.set_flow_idle(0, 1).unwrap();
            let frame = flow("10.0.1.2", "192.0.2.10", false, 42000, 9999);
            let first = maglev_node(p, 0, "10.0.1.2", "192.0.2.10", PROTO_UDP, 42000, 9999);
            // A UDP flow is remembered from its second packet.
            assert_eq!(p.run(&frame), steered(&frame, first));
            assert_eq!(p.run(&frame), steered(&frame, first));
            // The pool now sends every new flow to the other node; the
            // flow, known, stays where it is.
            let other = 1 - first;
            p.tables
                .write_vip(0, &vip("192.0.2.10", PROTO_UDP, 0), &[other; SIZE as usize])
                .unwrap();
            assert_eq!(p.run(&frame), steered(&frame, first));
            // Idle past its timeout, it is a new flow again: the other node
            // (and remembered from its second packet, as any new flow).
            std::thread::sleep(std::time::Duration::from_millis(1300));
            assert_eq!(p.run(&frame), steered(&frame, other));
            // The expired entry was deleted when the packet met it.
            let key = flow_key("10.0.1.2", "192.0.2.10", PROTO_UDP, 42000, 9999);
            assert_eq!(p.tables.flow_node(&key).unwrap(), None);
            assert_eq!(p.run(&frame), steered(&frame, other));
            assert_eq!(p.tables.flow_node(&key).unwrap(), Some(other));
            // And it is remembered there.
            p.tables
                .write_vip(0, &vip("192.0.2.10", PROTO_UDP, 0), &[first; SIZE as usize])
                .unwrap();
            assert_eq!(p.run(&frame), steered(&frame, other));
        });
    }

    /// The IPv4 connection table is sets of FLOW_WAYS slots: a flow that
    /// finds its set full takes the slot of the flow seen least recently
    /// there, and the others stay.
    #[test]
    fn a_full_set_forgets_its_least_recently_seen_flow() {
        with_program(|p| {
            setup(p);
            // FLOW_WAYS + 1 UDP flows whose keys fall in one set.
            let key =
                |(src, sport): &(String, u16)| flow_key(src, "192.0.2.10", PROTO_UDP, *sport, 9999);
            let set = |flow: &(String, u16)| flow_set_v4(key(flow).v4().unwrap().words(), SEED);
            let first = ("10.0.1.2".to_string(), 20000);
            let flows: Vec<(String, u16)> = (2..=250)
                .flat_map(|host| (20000..26000).map(move |sport| (format!("10.0.1.{host}"), sport)))
                .filter(|flow| set(flow) == set(&first))
                .take(FLOW_WAYS + 1)
                .collect();
            assert_eq!(flows.len(), FLOW_WAYS + 1);
            for (src, sport) in &flows {
                // Remembered from its second packet, a few jiffies after
                // the flow before it.
                let frame = flow(src, "192.0.2.10", false, *sport, 9999);
                p.run(&frame);
                p.run(&frame);
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let nodes: Vec<Option<u32>> = flows
                .iter()
                .map(|flow| p.tables.flow_node(&key(flow)).unwrap())
                .collect();
            assert_eq!(
                nodes[0], None,
                "the least recently seen flow stayed: {nodes:?}"
            );
            assert!(nodes[1..].iter().all(Option::is_some), "{nodes:?}");
        });
    }

    #[test]
    fn a_known_flow_follows_the_vips_of_its_address() {
        with_program(|p| {
            setup(p);
            let frame = flow("10.0.1.2", "192.0.2.10", false, 44000, 53);
            let key = flow_key("10.0.1.2", "192.0.2.10", PROTO_UDP, 44000, 53);
            let node = maglev_node(p, 0, "10.0.1.2", "192.0.2.10", PROTO_UDP, 44000, 53);
            let vip_packets = |p: &Program| -> Vec<u64> {
                let (vips, _) = p.tables.steering_stats(4, 2).unwrap();
                vips.iter().map(|t| t.packets).collect()
            };
            // Remembered under the any-port VIP (slot 0).
            assert_eq!(p.run(&frame), steered(&frame, node));
            assert_eq!(p.run(&frame), steered(&frame, node));
            assert_eq!(p.tables.flow_node(&key).unwrap(), Some(node));
            assert_eq!(vip_packets(p), [2, 0, 0, 0]);
            // A VIP of its port (slot 3) takes the flow from the next
            // packet: on the node it has, counted by the new VIP.
            p.tables
                .write_vip(
                    3,
                    &vip("192.0.2.10", PROTO_UDP, 53),
                    &[1 - node; SIZE as usize],
                )
                .unwrap();
            assert_eq!(p.run(&frame), steered(&frame, node));
            assert_eq!(p.run(&frame), steered(&frame, node));
            assert_eq!(vip_packets(p), [2, 0, 0, 2]);
            // That VIP gone, the any-port one has the flow again.
            p.tables
                .remove_vip(&vip("192.0.2.10", PROTO_UDP, 53))
                .unwrap();
            assert_eq!(p.run(&frame), steered(&frame, node));
            assert_eq!(vip_packets(p), [3, 0, 0, 2]);
            // No VIP left at the address: its packets are routed, the
            // flow's entry notwithstanding.
            p.tables
                .remove_vip(&vip("192.0.2.10", PROTO_UDP, 0))
                .unwrap();
            let steered_before = p.counters()["steered"];
            assert_eq!(p.run(&frame).0, XDP_PASS);
            assert_eq!(p.counters()["steered"], steered_before);
            assert_eq!(vip_packets(p), [3, 0, 0, 2]);
        });
    }

    #[test]
    fn only_a_tcp_syn_makes_a_connection_table_entry() {
        with_program(|p| {
            setup(p);
            let key = |sport| flow_key("2001:db8::1", "2001:db8::10", PROTO_TCP, sport, 443);
            // A flood of mid-connection packets (ACKs) for flows never seen:
            // steered by Maglev, remembered never, so established flows keep
            // their entries.
            for sport in 41000..41032u16 {
                let ack = flow("2001:db8::1", "2001:db8::10", true, sport, 443);
                let node = maglev_node(p, 1, "2001:db8::1", "2001:db8::10", PROTO_TCP, sport, 443);
                assert_eq!(p.run(&ack), steered(&ack, node), "ACK {sport}");
                assert_eq!(
                    p.tables.flow_node(&key(sport)).unwrap(),
                    None,
                    "ACK {sport}"
                );
            }
            // A SYN starts a connection: remembered, on the node it went to.
            // (The program does not read the TCP checksum: left as it was.)
            let mut syn = flow("2001:db8::1", "2001:db8::10", true, 41100, 443);
            syn[14 + 40 + 13] = 0x02;
            let node = maglev_node(p, 1, "2001:db8::1", "2001:db8::10", PROTO_TCP, 41100, 443);
            assert_eq!(p.run(&syn), steered(&syn, node));
            assert_eq!(p.tables.flow_node(&key(41100)).unwrap(), Some(node));
        });
    }

    #[test]
    fn a_udp_flow_is_remembered_from_its_second_packet() {
        with_program(|p| {
            setup(p);
            let key = |src: &str, sport| flow_key(src, "192.0.2.10", PROTO_UDP, sport, 9999);
            // An established flow: two packets, remembered.
            let frame = flow("10.0.1.2", "192.0.2.10", false, 43000, 9999);
            let node = maglev_node(p, 0, "10.0.1.2", "192.0.2.10", PROTO_UDP, 43000, 9999);
            assert_eq!(p.run(&frame), steered(&frame, node));
            assert_eq!(p.tables.flow_node(&key("10.0.1.2", 43000)).unwrap(), None);
            assert_eq!(p.run(&frame), steered(&frame, node));
            assert_eq!(
                p.tables.flow_node(&key("10.0.1.2", 43000)).unwrap(),
                Some(node)
            );
            // A flood of one-packet flows from spoofed sources, a quarter
            // of the seen-once table's slots: each steered by Maglev, none
            // remembered, so the established flow keeps its entry.
            let flood = FLOWS_SEEN_SLOTS / 4;
            let source = |i: u32| format!("10.2.{}.{}", i >> 8 & 0xff, i & 0xff);
            for i in 0..flood {
                let src = if i < 1 << 16 {
                    source(i)
                } else {
                    format!("10.3.{}.{}", i >> 8 & 0xff, i & 0xff)
                };
                let f = flow(&src, "192.0.2.10", false, 5000, 9999);
                let (action, _) = p.run(&f);
                assert!(
                    action == XDP_REDIRECT || action == XDP_TX,
                    "{src}: {action}"
                );
            }
            for i in [0, 1000, 40000, 65535] {
                let src = source(i);
                assert_eq!(p.tables.flow_node(&key(&src, 5000)).unwrap(), None, "{src}");
            }
            assert_eq!(
                p.tables.flow_node(&key("10.0.1.2", 43000)).unwrap(),
                Some(node)
            );
            assert_eq!(p.counters()["steered"], u64::from(flood) + 2);
        });
    }

    #[test]
    fn vip_traffic_goes_to_its_maglev_node_by_direct_server_return() {
        with_program(|p| {
            setup(p);
            let mut seen = [false; 2];
            for sport in 40000..40016u16 {
                let node = maglev_node(p, 0, "10.0.1.2", "192.0.2.10", PROTO_UDP, sport, 9999);
                seen[node as usize] = true;
                let frame = flow("10.0.1.2", "192.0.2.10", false, sport, 9999);
                let (action, out) = steered(&frame, node);
                check(
                    p,
                    vec![Case {
                        name: "udp to the VIP, any port",
                        frame,
                        action,
                        output: Some(out),
                        counter: Counter::Steered,
                    }],
                );
            }
            assert!(seen[0] && seen[1], "16 flows all went to one node");
            let node = maglev_node(p, 1, "2001:db8::1", "2001:db8::10", PROTO_TCP, 50000, 443);
            let frame = flow("2001:db8::1", "2001:db8::10", true, 50000, 443);
            let (action, out) = steered(&frame, node);
            check(
                p,
                vec![
                    Case {
                        name: "tcp to the IPv6 VIP",
                        frame,
                        action,
                        output: Some(out),
                        counter: Counter::Steered,
                    },
                    // Port 443 only: port 80 of the same address is routed (no route here).
                    Case {
                        name: "not the VIP's port",
                        frame: flow("2001:db8::1", "2001:db8::10", true, 50000, 80),
                        action: XDP_PASS,
                        output: None,
                        counter: Counter::PassRouteMiss,
                    },
                    Case {
                        name: "empty pool",
                        frame: flow("10.0.1.2", "192.0.2.20", true, 50000, 80),
                        action: XDP_PASS,
                        output: None,
                        counter: Counter::PassVipNoNode,
                    },
                ],
            );
            let stats = p.tables.steering_stats(2, 2).unwrap();
            assert_eq!(stats.0[0].packets, 16);
            assert_eq!(stats.0[1].packets, 1);
            assert_eq!(stats.1[0].packets + stats.1[1].packets, 17);
        });
    }

    /// `frame` (IPv6) with `header`, an extension header of type `kind`,
    /// inserted after the fixed header.
    fn with_extension_header(frame: &[u8], kind: u8, header: [u8; 8]) -> Vec<u8> {
        let (fixed, rest) = frame.split_at(14 + 40);
        let mut out = fixed.to_vec();
        out[14 + 6] = kind;
        let payload_len = u16::from_be_bytes([out[18], out[19]]) + 8;
        out[18..20].copy_from_slice(&payload_len.to_be_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(rest);
        out
    }

    #[test]
    fn fragments_hash_by_addresses_and_extension_headers_are_skipped() {
        with_program(|p| {
            setup(p);
            // Every fragment of an IPv4 datagram, the first (more-fragments,
            // ports readable) included, goes where the addresses send it.
            let node = maglev_node(p, 0, "10.0.1.7", "192.0.2.10", PROTO_UDP, 0, 0);
            // A source port whose full 5-tuple would pick the other node.
            let sport = (40000..)
                .find(|&sp| maglev_node(p, 0, "10.0.1.7", "192.0.2.10", PROTO_UDP, sp, 53) != node)
                .unwrap();
            let whole = flow("10.0.1.7", "192.0.2.10", false, sport, 53);
            let mut first = whole.clone();
            first[14 + 6] = 0x20; // more fragments, offset 0
            fix_ipv4_checksum(&mut first);
            let mut second = whole.clone();
            second[14 + 6..14 + 8].copy_from_slice(&[0x00, 0x01]); // offset 8
            fix_ipv4_checksum(&mut second);
            second[34..42].copy_from_slice(b"payload!");
            let mut cases = Vec::new();
            for (name, frame) in [("first fragment", first), ("second fragment", second)] {
                let (action, out) = steered(&frame, node);
                cases.push(Case {
                    name,
                    frame,
                    action,
                    output: Some(out),
                    counter: Counter::Steered,
                });
            }
            check(p, cases);

            // IPv6: TCP behind a hop-by-hop header (PadN option) still matches
            // the port-443 VIP and hashes with its ports.
            let plain = flow("2001:db8::1", "2001:db8::10", true, 50001, 443);
            let hop_by_hop = [PROTO_TCP, 0, 1, 4, 0, 0, 0, 0];
            let node = maglev_node(p, 1, "2001:db8::1", "2001:db8::10", PROTO_TCP, 50001, 443);
            let frame = with_extension_header(&plain, 0, hop_by_hop);
            let (action, out) = steered(&frame, node);
            // A fragment header: ports unknown, so only an any-port VIP
            // matches; the port-443 VIP does not, and the packet is routed.
            let fragment =
                with_extension_header(&plain, 44, [PROTO_TCP, 0, 0x00, 0x01, 0, 0, 0, 7]);
            check(
                p,
                vec![
                    Case {
                        name: "tcp behind a hop-by-hop header",
                        frame,
                        action,
                        output: Some(out),
                        counter: Counter::Steered,
                    },
                    Case {
                        name: "an IPv6 fragment of a port VIP's flow",
                        frame: fragment.clone(),
                        action: XDP_PASS,
                        output: None,
                        counter: Counter::PassRouteMiss,
                    },
                ],
            );
            p.tables
                .write_vip(3, &vip("2001:db8::10", PROTO_TCP, 0), &[1; SIZE as usize])
                .unwrap();
            let (action, out) = steered(&fragment, 1);
            check(
                p,
                vec![Case {
                    name: "an IPv6 fragment to an any-port VIP",
                    frame: fragment,
                    action,
                    output: Some(out),
                    counter: Counter::Steered,
                }],
            );
        });
    }

    #[test]
    fn a_flow_stays_on_its_node_when_the_pool_changes_until_the_node_goes() {
        with_program(|p| {
            setup(p);
            let first = maglev_node(p, 0, "10.0.1.2", "192.0.2.10", PROTO_UDP, 40000, 53);
            let other = 1 - first;
            let frame = flow("10.0.1.2", "192.0.2.10", false, 40000, 53);
            let (action, out) = steered(&frame, first);
            // Two packets: a UDP flow is remembered from its second.
            for name in ["first packet", "second packet"] {
                check(
                    p,
                    vec![Case {
                        name,
                        frame: frame.clone(),
                        action,
                        output: Some(out.clone()),
                        counter: Counter::Steered,
                    }],
                );
            }
            // The pool loses `first` (drained): new flows avoid it, the
            // existing flow keeps it.
            p.tables
                .write_vip(0, &vip("192.0.2.10", PROTO_UDP, 0), &[other; SIZE as usize])
                .unwrap();
            check(
                p,
                vec![Case {
                    name: "same flow after the change",
                    frame: frame.clone(),
                    action,
                    output: Some(out),
                    counter: Counter::Steered,
                }],
            );
            let new_flow = flow("10.0.1.2", "192.0.2.10", false, 40001, 53);
            let (action2, out2) = steered(&new_flow, other);
            check(
                p,
                vec![Case {
                    name: "new flow",
                    frame: new_flow,
                    action: action2,
                    output: Some(out2),
                    counter: Counter::Steered,
                }],
            );
            // The node goes altogether: its flows move to the pool's nodes,
            // and their entries go with it.
            let key = flow_key("10.0.1.2", "192.0.2.10", PROTO_UDP, 40000, 53);
            assert_eq!(p.tables.flow_node(&key).unwrap(), Some(first));
            p.tables.remove_node(first).unwrap();
            assert_eq!(p.tables.flow_node(&key).unwrap(), None);
            let (action3, out3) = steered(&frame, other);
            check(
                p,
                vec![Case {
                    name: "flow of a removed node",
                    frame: frame.clone(),
                    action: action3,
                    output: Some(out3.clone()),
                    counter: Counter::Steered,
                }],
            );
            // A new node takes the freed slot: the flow, whose entry went
            // with its node, does not follow the slot to it.
            p.tables
                .write_node(
                    first,
                    &CacheNode {
                        ifindex: p.veth,
                        flags: NODE_F_IN_USE | NODE_F_MAC_VALID,
                        dst_mac: [0x02, 0, 0, 0, 0, 0x77],
                        src_mac: OUT.src,
                        addr: [0; 16],
                        family: 4,
                        mtu: 1500,
                    },
                )
                .unwrap();
            check(
                p,
                vec![Case {
                    name: "flow of a removed node, its slot reused",
                    frame,
                    action: action3,
                    output: Some(out3),
                    counter: Counter::Steered,
                }],
            );
        });
    }

    #[test]
    fn with_steering_off_vips_are_plain_destinations() {
        with_program(|p| {
            setup(p);
            p.tables.set_steering(SEED, false).unwrap();
            check(
                p,
                vec![Case {
                    name: "VIP while off",
                    frame: flow("10.0.1.2", "192.0.2.10", false, 40000, 53),
                    action: XDP_PASS,
                    output: None,
                    counter: Counter::PassRouteMiss,
                }],
            );
        });
    }

    /// The frame IP-in-IP makes of `frame`: the next hop's Ethernet header,
    /// an outer header from `src` to `dst`, then the inner IP packet.
    fn encapsulated(frame: &[u8], src: std::net::IpAddr, dst: std::net::IpAddr) -> Vec<u8> {
        let v4 = frame[12..14] == [0x08, 0x00];
        // Exactly the IP datagram: not the Ethernet padding after it.
        let ip_len = if v4 {
            usize::from(u16::from_be_bytes([frame[16], frame[17]]))
        } else {
            40 + usize::from(u16::from_be_bytes([frame[18], frame[19]]))
        };
        let inner = &frame[14..14 + ip_len];
        let inner_protocol = if v4 { 4u8 } else { 41 };
        // DSCP and ECN as the inner header has them; the IPv6 flow label
        // from the inner flow (source, UDP ports, protocol).
        let tos = if v4 {
            inner[1]
        } else {
            inner[0] << 4 | inner[1] >> 4
        };
        let label = entropy(frame);
        let mut out = Vec::new();
        out.extend_from_slice(&OUT.dst);
        out.extend_from_slice(&OUT.src);
        match (src, dst) {
            (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => {
                out.extend_from_slice(&[0x08, 0x00]);
                let total = ((inner.len() + 20) as u16).to_be_bytes();
                let mut h = vec![
                    0x45,
                    tos,
                    total[0],
                    total[1],
                    0,
                    0,
                    0x40,
                    0,
                    64,
                    inner_protocol,
                    0,
                    0,
                ];
                h.extend_from_slice(&s.octets());
                h.extend_from_slice(&d.octets());
                let c = pop_forwarder_common::checksum::ipv4_header(&h).to_be_bytes();
                h[10..12].copy_from_slice(&c);
                out.extend_from_slice(&h);
            }
            (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => {
                out.extend_from_slice(&[0x86, 0xdd]);
                out.extend_from_slice(&[
                    0x60 | tos >> 4,
                    tos << 4 | (label >> 16) as u8,
                    (label >> 8) as u8,
                    label as u8,
                ]);
                out.extend_from_slice(&(inner.len() as u16).to_be_bytes());
                out.extend_from_slice(&[inner_protocol, 64]);
                out.extend_from_slice(&s.octets());
                out.extend_from_slice(&d.octets());
            }
            _ => panic!("mixed families"),
        }
        out.extend_from_slice(inner);
        out
    }

    /// The answer to a VIP packet too big once wrapped: ICMP fragmentation
    /// needed (IPv4) or packet too big (IPv6) giving `mtu`, from the VIP to
    /// the client, back to the MAC the packet came from, quoting the first
    /// 68 (IPv4) or 88 (IPv6) bytes of the packet. Built by etherparse,
    /// which computes the checksums itself.
    fn too_big_answer(frame: &[u8], mtu: u32) -> Vec<u8> {
        use etherparse::{Icmpv6Type, IpNumber, Ipv4Header, PacketBuilder, icmpv4};
        let eth = PacketBuilder::ethernet2(IN.dst, IN.src);
        let ip = &frame[14..];
        let mut out = Vec::new();
        if ip[0] >> 4 == 4 {
            let (client, vip) = (
                <[u8; 4]>::try_from(&ip[12..16]).unwrap(),
                <[u8; 4]>::try_from(&ip[16..20]).unwrap(),
            );
            let mut header = Ipv4Header::new(0, 64, IpNumber::ICMP, vip, client).unwrap();
            header.dont_fragment = false;
            eth.ip(etherparse::IpHeaders::Ipv4(header, Default::default()))
                .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                    icmpv4::DestUnreachableHeader::FragmentationNeeded {
                        next_hop_mtu: mtu as u16,
                    },
                ))
                .write(&mut out, &ip[..68])
                .unwrap();
        } else {
            let (client, vip) = (
                <[u8; 16]>::try_from(&ip[8..24]).unwrap(),
                <[u8; 16]>::try_from(&ip[24..40]).unwrap(),
            );
            eth.ipv6(vip, client, 64)
                .icmpv6(Icmpv6Type::PacketTooBig { mtu })
                .write(&mut out, &ip[..88])
                .unwrap();
        }
        out
    }

    /// A UDP frame of `ip_len` bytes of IP from 10.0.1.2 (or 2001:db8::1)
    /// to `vip`, don't-fragment set (IPv4).
    fn big_udp(vip: &str, ip_len: usize) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ethernet2(IN.src, IN.dst);
        let mut out = Vec::new();
        match vip.parse::<std::net::IpAddr>().unwrap() {
            std::net::IpAddr::V4(v) => b
                .ipv4([10, 0, 1, 2], v.octets(), 64)
                .udp(40000, 53)
                .write(&mut out, &vec![7u8; ip_len - 28]),
            std::net::IpAddr::V6(v) => b
                .ipv6(
                    "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets(),
                    v.octets(),
                    64,
                )
                .udp(40000, 53)
                .write(&mut out, &vec![7u8; ip_len - 48]),
        }
        .unwrap();
        out
    }

    #[test]
    fn ip_in_ip_wraps_the_packet_with_exact_outer_headers_or_answers_icmp_when_too_big() {
        with_program(|p| {
            setup(p);
            let ipip = |addr: &str| {
                let a: std::net::IpAddr = addr.parse().unwrap();
                CacheNode {
                    ifindex: 0,
                    flags: NODE_F_IN_USE | NODE_F_IPIP,
                    dst_mac: [0; 6],
                    src_mac: [0; 6],
                    addr: widen(a),
                    family: u32::from(family(a)),
                    mtu: 0,
                }
            };
            // Nodes behind 10.0.3.0/24 and fd00:3::/64 (the veth, MAC
            // OUT.dst) and behind 10.0.5.0/24 (MTU 100).
            p.tables.write_node(2, &ipip("10.0.3.50")).unwrap();
            p.tables.write_node(3, &ipip("fd00:3::50")).unwrap();
            p.tables.write_node(4, &ipip("10.0.5.50")).unwrap();
            p.tables
                .set_encap_source(ENCAP_SOURCE_V4, widen("10.0.0.1".parse().unwrap()))
                .unwrap();
            p.tables
                .set_encap_source(ENCAP_SOURCE_V6, widen("fd00::1".parse().unwrap()))
                .unwrap();
            p.tables
                .write_vip(3, &vip("192.0.2.30", PROTO_UDP, 0), &[2; SIZE as usize])
                .unwrap();
            p.tables
                .write_vip(4, &vip("2001:db8::30", PROTO_UDP, 0), &[3; SIZE as usize])
                .unwrap();
            p.tables
                .write_vip(5, &vip("192.0.2.31", PROTO_UDP, 0), &[3; SIZE as usize])
                .unwrap();
            p.tables
                .write_vip(6, &vip("192.0.2.32", PROTO_UDP, 0), &[4; SIZE as usize])
                .unwrap();
            let ip = |a: &str| -> std::net::IpAddr { a.parse().unwrap() };
            let v4in4 = flow("10.0.1.2", "192.0.2.30", false, 40000, 53);
            // A short datagram in a frame padded (here past the 60-byte
            // minimum) with bytes that are no part of it.
            let mut padded = flow("10.0.1.2", "192.0.2.30", false, 40001, 53);
            let ip_len = usize::from(u16::from_be_bytes([padded[16], padded[17]]));
            padded.truncate(14 + ip_len);
            padded.extend_from_slice(&[0xee; 24]);
            // DSCP EF (46) and ECT(1) in the TOS byte (checksum mended), and
            // the same as an IPv6 traffic class.
            let mut marked_v4 = flow("10.0.1.2", "192.0.2.30", false, 40002, 53);
            marked_v4[15] = 46 << 2 | 1;
            marked_v4[24..26].fill(0);
            let c = pop_forwarder_common::checksum::ipv4_header(&marked_v4[14..34]);
            marked_v4[24..26].copy_from_slice(&c.to_be_bytes());
            let mut marked_v6 = flow("2001:db8::1", "2001:db8::30", false, 40003, 53);
            let tc: u8 = 46 << 2 | 1;
            marked_v6[14] = 0x60 | tc >> 4;
            marked_v6[15] = tc << 4 | (marked_v6[15] & 0x0f);
            let v6in6 = flow("2001:db8::1", "2001:db8::30", false, 40000, 53);
            let v4in6 = flow("10.0.1.2", "192.0.2.31", false, 40000, 53);
            // 88 bytes of IP fit the MTU of 100; wrapped, 108 do not.
            let big = big_udp("192.0.2.32", 88);
            // Without don't-fragment (header checksum mended).
            let mut may_fragment = big.clone();
            may_fragment[14 + 6] = 0;
            may_fragment[24..26].fill(0);
            let c = pop_forwarder_common::checksum::ipv4_header(&may_fragment[14..34]);
            may_fragment[24..26].copy_from_slice(&c.to_be_bytes());
            // 1480 bytes of IP fit the veth's 1500; wrapped in IPv6, not.
            let big_v6 = big_udp("2001:db8::30", 1480);
            let big_v4in6 = big_udp("192.0.2.31", 1480);
            check(
                p,
                vec![
                    Case {
                        name: "IPv4 in IPv4",
                        frame: v4in4.clone(),
                        action: XDP_REDIRECT,
                        output: Some(encapsulated(&v4in4, ip("10.0.0.1"), ip("10.0.3.50"))),
                        counter: Counter::Steered,
                    },
                    // Ethernet padding after the datagram stays out.
                    Case {
                        name: "IPv4 in IPv4, padded frame",
                        frame: padded.clone(),
                        action: XDP_REDIRECT,
                        output: Some(encapsulated(&padded, ip("10.0.0.1"), ip("10.0.3.50"))),
                        counter: Counter::Steered,
                    },
                    // DSCP EF and ECT(1) go on the outer header too.
                    Case {
                        name: "IPv4 in IPv4, DSCP and ECN",
                        frame: marked_v4.clone(),
                        action: XDP_REDIRECT,
                        output: Some(encapsulated(&marked_v4, ip("10.0.0.1"), ip("10.0.3.50"))),
                        counter: Counter::Steered,
                    },
                    Case {
                        name: "IPv6 in IPv6, traffic class",
                        frame: marked_v6.clone(),
                        action: XDP_REDIRECT,
                        output: Some(encapsulated(&marked_v6, ip("fd00::1"), ip("fd00:3::50"))),
                        counter: Counter::Steered,
                    },
                    Case {
                        name: "IPv6 in IPv6",
                        frame: v6in6.clone(),
                        action: XDP_REDIRECT,
                        output: Some(encapsulated(&v6in6, ip("fd00::1"), ip("fd00:3::50"))),
                        counter: Counter::Steered,
                    },
                    Case {
                        name: "IPv4 in IPv6",
                        frame: v4in6.clone(),
                        action: XDP_REDIRECT,
                        output: Some(encapsulated(&v4in6, ip("fd00::1"), ip("fd00:3::50"))),
                        counter: Counter::Steered,
                    },
                    Case {
                        name: "too big once wrapped: ICMP fragmentation needed, MTU 80",
                        frame: big.clone(),
                        action: XDP_TX,
                        output: Some(too_big_answer(&big, 80)),
                        counter: Counter::IcmpTooBig,
                    },
                    Case {
                        name: "too big, fragmenting allowed: to the kernel",
                        frame: may_fragment,
                        action: XDP_PASS,
                        output: None,
                        counter: Counter::PassTooBig,
                    },
                    Case {
                        name: "IPv6 too big once wrapped: packet too big, MTU 1460",
                        frame: big_v6.clone(),
                        action: XDP_TX,
                        output: Some(too_big_answer(&big_v6, 1460)),
                        counter: Counter::IcmpTooBig,
                    },
                    Case {
                        name: "IPv4 too big once wrapped in IPv6: MTU 1460",
                        frame: big_v4in6.clone(),
                        action: XDP_TX,
                        output: Some(too_big_answer(&big_v4in6, 1460)),
                        counter: Counter::IcmpTooBig,
                    },
                    // Addressed to one VIP, quoting a packet "from" another:
                    // steered by the quote, it would reach 192.0.2.32's node.
                    // It is no flow of 192.0.2.30's, so it is routed like any
                    // packet (no route covers 192.0.2.30).
                    Case {
                        name: "ICMP error to one VIP quoting another",
                        frame: icmp_error_about(
                            "10.0.9.1",
                            "192.0.2.30",
                            "192.0.2.32",
                            "10.0.1.2",
                            0,
                        ),
                        action: XDP_PASS,
                        output: None,
                        counter: Counter::PassRouteMiss,
                    },
                    // An ICMP error about a flow of 192.0.2.32, too big
                    // once wrapped, don't-fragment set: no ICMP error is
                    // sent in answer to an ICMP error; the kernel has it.
                    Case {
                        name: "an ICMP error too big once wrapped",
                        frame: icmp_error_about(
                            "10.0.9.1",
                            "192.0.2.32",
                            "192.0.2.32",
                            "10.0.1.2",
                            60,
                        ),
                        action: XDP_PASS,
                        output: None,
                        counter: Counter::PassTooBig,
                    },
                ],
            );
            // ICMP errors are rate limited per source (RFC 1812 4.3.2.8,
            // RFC 4443 2.4 f): ICMP_TOO_BIG_PER_SECOND answers a second,
            // the rest dropped and counted. Twenty in a row, well inside a
            // second: some answered (those the second still allowed), the
            // rest dropped, never more answers than the limit.
            let before = p.counters();
            let results: Vec<u32> = (0..20).map(|_| p.run(&big).0).collect();
            let after = p.counters();
            let answered = results.iter().filter(|&&a| a == XDP_TX).count() as u64;
            let dropped = results.iter().filter(|&&a| a == XDP_DROP).count() as u64;
            assert_eq!(answered + dropped, 20, "{results:?}");
            assert!(
                dropped >= 20 - pop_forwarder_common::ICMP_TOO_BIG_PER_SECOND,
                "{results:?}"
            );
            assert_eq!(
                after["drop_icmp_rate_limited"] - before["drop_icmp_rate_limited"],
                dropped
            );
            // Another source has its own allowance.
            let mut other = big.clone();
            other[29] = 3; // 10.0.1.3
            other[24..26].fill(0);
            let c = pop_forwarder_common::checksum::ipv4_header(&other[14..34]);
            other[24..26].copy_from_slice(&c.to_be_bytes());
            assert_eq!(p.run(&other).0, XDP_TX);

            // An IPv4 source pool, 10.0.0.0/16: each flow's outer source
            // is the pool's base with the flow's entropy in the host bits,
            // so two flows of one node leave from different addresses.
            let mut pool = widen(ip("10.0.0.0"));
            pool[4] = 16;
            p.tables.set_encap_source(ENCAP_SOURCE_V4, pool).unwrap();
            let mut sources = std::collections::HashSet::new();
            for port in [40000u16, 40001, 40002, 40003] {
                let frame = flow("10.0.1.2", "192.0.2.30", false, port, 53);
                let host = (entropy(&frame) & 0xffff) as u16;
                let source = ip(&format!("10.0.{}.{}", host >> 8, host & 0xff));
                sources.insert(source);
                check(
                    p,
                    vec![Case {
                        name: "IPv4 in IPv4 from a source pool",
                        frame: frame.clone(),
                        action: XDP_REDIRECT,
                        output: Some(encapsulated(&frame, source, ip("10.0.3.50"))),
                        counter: Counter::Steered,
                    }],
                );
            }
            assert!(sources.len() > 1, "{sources:?}");
        });
    }

    /// The inner flow's entropy, as the IPv6 flow label and an IPv4 source
    /// pool take it: source, ports, protocol.
    fn entropy(frame: &[u8]) -> u32 {
        let v4 = frame[12..14] == [0x08, 0x00];
        let inner = &frame[14..];
        let (source, protocol, l4) = if v4 {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&inner[12..16]);
            (a, inner[9], usize::from(inner[0] & 0x0f) * 4)
        } else {
            (inner[8..24].try_into().unwrap(), inner[6], 40)
        };
        let ports = u32::from_be_bytes(inner[l4..l4 + 4].try_into().unwrap());
        pop_forwarder_common::ecmp::entropy_label(
            pop_forwarder_common::maglev::address_words(&source),
            ports,
            protocol,
        )
    }

    /// An ICMP error from a router on the way back to a client, about the
    /// node's reply (VIP -> client): it must reach the node of the client's
    /// flow, found through the embedded header.
    /// Direct server return respects the MTU of the link to the node, as
    /// routing respects the egress MTU: a packet too big for it goes to the
    /// kernel, which fragments it or answers ICMP.
    #[test]
    fn dsr_respects_the_mtu_of_the_link_to_the_node() {
        with_program(|p| {
            setup(p);
            let node = CacheNode {
                ifindex: p.veth,
                flags: NODE_F_IN_USE | NODE_F_MAC_VALID,
                dst_mac: MAC_A,
                src_mac: OUT.src,
                addr: [0; 16],
                family: 4,
                mtu: 100,
            };
            p.tables.write_node(5, &node).unwrap();
            p.tables
                .write_vip(7, &vip("192.0.2.40", PROTO_UDP, 0), &[5; SIZE as usize])
                .unwrap();
            let fits = big_udp("192.0.2.40", 100);
            let mut out = fits.clone();
            out[0..6].copy_from_slice(&MAC_A);
            out[6..12].copy_from_slice(&OUT.src);
            check(
                p,
                vec![
                    Case {
                        name: "100 bytes of IP on a link of MTU 100",
                        frame: fits,
                        action: XDP_REDIRECT,
                        output: Some(out),
                        counter: Counter::Steered,
                    },
                    Case {
                        name: "101 bytes of IP on a link of MTU 100",
                        frame: big_udp("192.0.2.40", 101),
                        action: XDP_PASS,
                        output: None,
                        counter: Counter::PassTooBig,
                    },
                ],
            );
        });
    }

    /// An IPv4 ICMP error (port unreachable) from `router` to `to`, quoting
    /// a UDP packet from `quoted_src` to `quoted_dst` and `extra` bytes of
    /// its payload, don't-fragment set.
    fn icmp_error_about(
        router: &str,
        to: &str,
        quoted_src: &str,
        quoted_dst: &str,
        extra: usize,
    ) -> Vec<u8> {
        let quoted = udp_v4(
            IN,
            quoted_src.parse().unwrap(),
            quoted_dst.parse().unwrap(),
            63,
            &vec![7; extra],
        );
        let ip = |a: &str| a.parse::<Ipv4Addr>().unwrap().octets();
        let mut frame = Vec::new();
        etherparse::PacketBuilder::ethernet2(IN.src, IN.dst)
            .ipv4(ip(router), ip(to), 64)
            .icmpv4_raw(3, 3, [0; 4])
            .write(&mut frame, &quoted[14..])
            .unwrap();
        frame[14 + 6] |= 0x40;
        frame[24..26].fill(0);
        let c = pop_forwarder_common::checksum::ipv4_header(&frame[14..34]);
        frame[24..26].copy_from_slice(&c.to_be_bytes());
        frame
    }

    #[test]
    fn icmp_errors_about_a_vip_flow_go_to_the_node_of_that_flow() {
        with_program(|p| {
            setup(p);
            // IPv4: the reply 192.0.2.10:9999 -> 10.0.1.2:40000 was too big.
            let reply = udp_v4(
                Eth {
                    src: MAC_A,
                    dst: IN.src,
                },
                "192.0.2.10".parse().unwrap(),
                "10.0.1.2".parse().unwrap(),
                63,
                b"reply",
            );
            let embedded = &reply[14..14 + 28];
            let b = etherparse::PacketBuilder::ethernet2(IN.src, IN.dst)
                .ipv4([10, 0, 9, 1], [192, 0, 2, 10], 64)
                .icmpv4_raw(3, 4, [0, 0, 0x05, 0x78]);
            let mut icmp = Vec::new();
            b.write(&mut icmp, embedded).unwrap();
            let reply_port = u16::from_be_bytes([reply[34], reply[35]]);
            let client_port = u16::from_be_bytes([reply[36], reply[37]]);
            let node = maglev_node(
                p,
                0,
                "10.0.1.2",
                "192.0.2.10",
                PROTO_UDP,
                client_port,
                reply_port,
            );
            let (action, out) = steered(&icmp, node);
            // IPv6: the reply [2001:db8::10]:443 -> [2001:db8::1]:50000, TCP.
            let reply6 = flow_frame(
                Eth {
                    src: MAC_A,
                    dst: IN.src,
                },
                "2001:db8::10".parse().unwrap(),
                "2001:db8::1".parse().unwrap(),
                true,
                443,
                50000,
            );
            let b = etherparse::PacketBuilder::ethernet2(IN.src, IN.dst)
                .ipv6(
                    "2001:db8:9::1"
                        .parse::<std::net::Ipv6Addr>()
                        .unwrap()
                        .octets(),
                    "2001:db8::10"
                        .parse::<std::net::Ipv6Addr>()
                        .unwrap()
                        .octets(),
                    64,
                )
                .icmpv6_raw(2, 0, [0, 0, 0x05, 0x00]);
            let mut icmp6 = Vec::new();
            b.write(&mut icmp6, &reply6[14..14 + 40 + 20]).unwrap();
            let node6 = maglev_node(p, 1, "2001:db8::1", "2001:db8::10", PROTO_TCP, 50000, 443);
            let (action6, out6) = steered(&icmp6, node6);
            check(
                p,
                vec![
                    Case {
                        name: "ICMP fragmentation needed",
                        frame: icmp,
                        action,
                        output: Some(out),
                        counter: Counter::Steered,
                    },
                    Case {
                        name: "ICMPv6 packet too big",
                        frame: icmp6,
                        action: action6,
                        output: Some(out6),
                        counter: Counter::Steered,
                    },
                ],
            );
        });
    }
}

/// The bench's floor router (`bench_route`) forwards as a router must, so
/// that its row measures a router: exact bytes of what it forwards, and
/// everything it does not route left to the kernel or dropped.
#[test]
fn the_benchs_floor_router_forwards_exact_bytes_and_nothing_it_should_not() {
    tests::with_egress_veth("fl", |veth| {
        let routes: Vec<Prefix> = ["10.1.0.0/16", "10.0.3.0/24", "10.2.0.0/25"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        let ebpf =
            pop_forwarder::bench::BareRedirect::floor(veth, &routes, Mac(OUT.dst), Mac(OUT.src))
                .expect("loading the floor router");
        let xdp: &Xdp = ebpf.program("bench_route").unwrap().try_into().unwrap();
        let mut bad_checksum = v4("10.0.3.7", 64);
        bad_checksum[14 + 10] ^= 0x01;
        let mut too_long = v4("10.0.3.7", 64);
        let len = u16::from_be_bytes([too_long[16], too_long[17]]) + 1;
        too_long[16..18].copy_from_slice(&len.to_be_bytes());
        fix_ipv4_checksum(&mut too_long);
        let forward = |f: Vec<u8>| {
            let out = forwarded(&f, OUT);
            (f, XDP_REDIRECT, out)
        };
        let keep = |f: Vec<u8>, action| (f.clone(), action, f);
        let cases = [
            ("a /24 (tbl24)", forward(v4("10.0.3.7", 64))),
            ("a /16 over 256 /24s", forward(v4("10.1.200.9", 2))),
            ("inside a /25 (tbl8)", forward(v4("10.2.0.100", 64))),
            (
                "the /24 of a /25, outside it",
                keep(v4("10.2.0.200", 64), XDP_DROP),
            ),
            ("no route", keep(v4("10.9.0.1", 64), XDP_DROP)),
            ("TTL 1", keep(v4("10.0.3.7", 1), XDP_PASS)),
            ("a damaged header", keep(bad_checksum, XDP_DROP)),
            ("total length past the frame", keep(too_long, XDP_PASS)),
            (
                "IPv4 options",
                keep(
                    with_ipv4_options(&v4("10.0.3.7", 64), &[0x94, 0x04, 0x00, 0x00]),
                    XDP_PASS,
                ),
            ),
            ("IPv6", keep(v6("fd00:3::1", 64), XDP_PASS)),
        ];
        for (name, (frame, action, output)) in cases {
            let (got, out) = tests::test_run(xdp, &frame);
            assert_eq!(got, action, "{name}: action");
            assert_eq!(out, output, "{name}: output bytes");
        }
    })
    .unwrap();
}

/// The bench's generator (`bench_gen`) varies its flows as its `FlowSpec`
/// says, frame after frame: the destinations in turn, the source address
/// one step on each time they wrap (back to the first after `src_count`),
/// the source port in turn, and a valid IPv4 header checksum on each.
#[test]
fn the_benchs_generator_cycles_destinations_sources_and_ports() {
    use pop_forwarder::bench::{FlowSpec, Generator};
    let dsts = ["10.0.2.1", "10.0.2.2", "10.0.2.3"];
    let (src_count, ports) = (2u32, 4u32);
    let spec = FlowSpec {
        src_mac: Mac(IN.src),
        dst_mac: Mac(IN.dst),
        src: "10.0.1.2".parse().unwrap(),
        dsts: dsts.iter().map(|d| d.parse().unwrap()).collect(),
        src_count,
        src_port_count: ports,
        frame_len: 64,
    };
    // The generator's place in the sequence is per CPU: the thread that
    // runs it stays on the one it started on.
    std::thread::spawn(move || {
        // SAFETY: a zeroed cpu_set_t with one CPU set, for this thread.
        unsafe {
            let cpu = usize::try_from(libc::sched_getcpu()).expect("sched_getcpu");
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            assert_eq!(
                libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
                0
            );
        }
        let generator = Generator::new(&spec).expect("loading the generator");
        let xdp = generator.program().unwrap();
        // Each frame is rewritten from the template whatever it held.
        let frame = vec![0xa5u8; spec.frame_len];
        for i in 0..2 * 3 * 2 * 4 {
            let (action, out) = tests::test_run(xdp, &frame);
            assert_eq!(action, XDP_TX, "frame {i}");
            let ip = &out[14..34];
            let dst: Ipv4Addr = dsts[i % 3].parse().unwrap();
            assert_eq!(ip[16..20], dst.octets(), "frame {i}: destination");
            let step = (i / 3) as u8 % src_count as u8;
            assert_eq!(ip[12..16], [10, 0, 1, 2 + step], "frame {i}: source");
            let port = 1024 + (i as u16) % ports as u16;
            assert_eq!(out[34..36], port.to_be_bytes(), "frame {i}: source port");
            let words: [u16; 10] =
                std::array::from_fn(|k| u16::from_ne_bytes([ip[2 * k], ip[2 * k + 1]]));
            assert_eq!(
                checksum::fold(checksum::sum_ne(&words)),
                0xffff,
                "frame {i}: checksum"
            );
        }
    })
    .join()
    .unwrap();
}
