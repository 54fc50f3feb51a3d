//! Table updates never show a lookup a wrong answer: the compiled program
//! runs lookups (BPF_PROG_TEST_RUN, on one CPU) while a second handle to
//! the same pinned tables churns routes on the other: /25s added and
//! removed inside /24s (tbl8 groups taken, folded, retired and reclaimed),
//! routes re-pointed at new next hops (slots freed, rested and reused).
//! Every next hop's MAC names the /24 and the prefix length it was made
//! for; a frame must leave with the MAC of a prefix that covers its
//! destination (or go to the kernel, while its route is being replaced),
//! never with another route's.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::{EbpfLoader, programs::Xdp};
use pop_forwarder::{EBPF_OBJECT, config::Ipv4Lookup, maps::Tables, net::Prefix};
use pop_forwarder_common::{PROGRAM_NAME, map_names};
use tests::packets::{Eth, udp_v4};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
/// /24s churned: 10.1.N.0/24 for N below this.
const NETS: u8 = 32;

/// The next hop of 10.1.`net`.0/`len` in its `variant`: gateway and MAC
/// say which route it is.
fn hop(egress: u32, net: u8, len: u8, variant: u8) -> pop_forwarder_common::NextHop {
    tests::static_next_hop(
        egress,
        std::net::IpAddr::from([100, 64 + variant, net, len]),
        1500,
        Some([0x02, 0xee, net, len, variant, 0]),
        [0x02, 0, 0, 0, 0, 0x11],
    )
}

fn prefix(net: u8, len: u8) -> Prefix {
    let last = if len == 25 { 128 } else { 0 };
    Prefix::containing(std::net::IpAddr::from([10, 1, net, last]), len).unwrap()
}

#[test]
fn lookups_racing_route_churn_never_leave_by_another_routes_next_hop() {
    let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/{}", tests::unique("churn")));
    std::fs::create_dir_all(&pins).unwrap();
    let dir = pins.clone();
    let result = tests::with_egress_veth("ch", move |egress| {
        let mut loader = EbpfLoader::new();
        for name in map_names::ALL {
            loader.map_pin_path(name, dir.join(name));
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .expect("loading the embedded object");
        let xdp: &mut Xdp = ebpf.program_mut(PROGRAM_NAME).unwrap().try_into().unwrap();
        xdp.load().expect("the verifier accepts the program");
        let mut tables = Tables::from_pins(&dir).unwrap();
        tables.set_ipv4_lookup(Ipv4Lookup::Dir24).unwrap();
        for net in 0..NETS {
            tables
                .add_route(prefix(net, 24), &hop(egress, net, 24, 0))
                .unwrap();
        }
        // The churn, on a handle of its own, for three seconds.
        let stop = Arc::new(AtomicBool::new(false));
        let changes = Arc::new(AtomicU64::new(0));
        let churn = {
            let (stop, changes, dir) = (stop.clone(), changes.clone(), dir.clone());
            std::thread::spawn(move || {
                let mut t = Tables::from_pins(&dir).unwrap();
                let mut rng = tests::model::Rng::new(7);
                let mut has_25 = [false; NETS as usize];
                let mut variant = [0u8; NETS as usize];
                while !stop.load(Ordering::Relaxed) {
                    let net = rng.below(u64::from(NETS)) as u8;
                    let n = net as usize;
                    if rng.chance(50) {
                        // A /25 in or out: a tbl8 group taken or folded.
                        if has_25[n] {
                            t.del_route(prefix(net, 25)).unwrap();
                        } else {
                            let v = rng.below(4) as u8;
                            t.add_route(prefix(net, 25), &hop(egress, net, 25, v))
                                .unwrap();
                        }
                        has_25[n] = !has_25[n];
                    } else {
                        // The /24 re-pointed at another next hop: its old
                        // slot freed, another taken.
                        variant[n] = (variant[n] + 1) % 4;
                        t.del_route(prefix(net, 24)).unwrap();
                        t.add_route(prefix(net, 24), &hop(egress, net, 24, variant[n]))
                            .unwrap();
                    }
                    changes.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let xdp: &Xdp = ebpf.program(PROGRAM_NAME).unwrap().try_into().unwrap();
        let eth = Eth {
            src: [0x02, 0, 0, 0, 0, 0xa0],
            dst: [0x02, 0, 0, 0, 0, 0x10],
        };
        let mut rng = tests::model::Rng::new(11);
        let (mut forwarded, mut passed, mut lookups) = (0u64, 0u64, 0u64);
        let mut wrong = Vec::new();
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end {
            let net = rng.below(u64::from(NETS)) as u8;
            let host = rng.next_u64() as u8;
            let frame = udp_v4(
                eth,
                "192.0.2.1".parse().unwrap(),
                [10, 1, net, host].into(),
                64,
                b"churn",
            );
            let (action, out) = tests::test_run(xdp, &frame);
            lookups += 1;
            match action {
                XDP_REDIRECT => {
                    forwarded += 1;
                    let mac = &out[..6];
                    let covers = mac[0..2] == [0x02, 0xee]
                        && mac[2] == net
                        && (mac[3] == 24 || (mac[3] == 25 && host >= 128));
                    if !covers {
                        wrong.push(format!("10.1.{net}.{host} left for {mac:02x?}"));
                    }
                }
                // A route being replaced: the kernel's to decide.
                XDP_PASS => passed += 1,
                other => wrong.push(format!("10.1.{net}.{host}: action {other}")),
            }
        }
        stop.store(true, Ordering::Relaxed);
        churn.join().unwrap();
        (
            lookups,
            forwarded,
            passed,
            changes.load(Ordering::Relaxed),
            wrong,
        )
    });
    let _ = std::fs::remove_dir_all(&pins);
    let (lookups, forwarded, passed, changes, wrong) = result.unwrap();
    println!(
        "{lookups} lookups ({forwarded} forwarded, {passed} to the kernel) during {changes} route changes"
    );
    assert!(changes > 50, "too little churn: {changes}");
    assert!(
        forwarded > lookups / 2,
        "{forwarded} of {lookups} forwarded"
    );
    assert!(
        wrong.is_empty(),
        "{} wrong: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
}
