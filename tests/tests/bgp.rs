//! Routes from BGP: a real BIRD in the forwarder's namespace learns a
//! prefix from BIRDs in two peer namespaces and installs it in the kernel's
//! main table (ECMP when both announce it); pop-forwarder mirrors that
//! table (`route_source = "kernel"`) into the program's tables.
//!
//! ```text
//!   a (10.0.1.2) --- f0 [fwd] f1 --- p1 (10.0.11.2, AS 65001)
//!                             f2 --- p2 (10.0.12.2, AS 65001)
//! ```
//!
//! p1 and p2 both hold 10.20.0.1 (anycast, on lo) and announce
//! 10.20.0.0/24; which of them a datagram reaches says which path it took.
//! Kernel forwarding is off in fwd: what arrives was forwarded by XDP.
//! Each BIRD runs in the foreground as a child of the test, which stops
//! exactly the processes it started.

use std::{
    collections::BTreeMap,
    net::UdpSocket,
    time::{Duration, Instant},
};

use tests::{Bird, Forwarder, Netns, udp_socket, unique, wire};

const PEER_BIRD: &str = r#"
router id ROUTER;
log stderr all;
protocol device { scan time 1; }
protocol static announce { ipv4; route 10.20.0.0/24 blackhole; }
protocol bgp up {
    local ROUTER as 65001;
    neighbor FWD as 65000;
    hold time 3; keepalive time 1; connect retry time 1;
    ipv4 { import none; export where proto = "announce"; };
}
"#;

const FWD_BIRD: &str = r#"
router id 10.0.1.1;
log stderr all;
protocol device { scan time 1; }
protocol kernel {
    ipv4 { import none; export where source = RTS_BGP; };
    merge paths on limit 16;
}
protocol bgp p1 {
    local 10.0.11.1 as 65000; neighbor 10.0.11.2 as 65001;
    hold time 3; keepalive time 1; connect retry time 1;
    ipv4 { import all; export none; };
}
protocol bgp p2 {
    local 10.0.12.1 as 65000; neighbor 10.0.12.2 as 65001;
    hold time 3; keepalive time 1; connect retry time 1;
    ipv4 { import all; export none; };
}
"#;

struct Pop {
    a: Netns,
    fwd: Netns,
    p1: Netns,
    p2: Netns,
}

impl Pop {
    fn new() -> Pop {
        let pop = Pop {
            a: Netns::new("a").unwrap(),
            fwd: Netns::new("f").unwrap(),
            p1: Netns::new("p").unwrap(),
            p2: Netns::new("q").unwrap(),
        };
        wire(&pop.a, "a0", "10.0.1.2/24", &pop.fwd, "f0", "10.0.1.1/24");
        wire(
            &pop.p1,
            "p0",
            "10.0.11.2/24",
            &pop.fwd,
            "f1",
            "10.0.11.1/24",
        );
        wire(
            &pop.p2,
            "q0",
            "10.0.12.2/24",
            &pop.fwd,
            "f2",
            "10.0.12.1/24",
        );
        pop.a
            .ip(&["route", "add", "default", "via", "10.0.1.1"])
            .unwrap();
        for p in [&pop.p1, &pop.p2] {
            p.ip(&["addr", "add", "10.20.0.1/32", "dev", "lo"]).unwrap();
        }
        pop
    }

    fn peer_bird(&self, p: &Netns, router: &str, fwd: &str) -> Bird {
        let config = PEER_BIRD.replace("ROUTER", router).replace("FWD", fwd);
        Bird::start(p, &config).unwrap()
    }
}

const CONFIG: &str = "route_source = \"kernel\"\n\n\
    [[interfaces]]\nname = \"f0\"\n\n[[interfaces]]\nname = \"f1\"\n\n[[interfaces]]\nname = \"f2\"\n";

/// The forwarder's route to `prefix` as `route list` shows its via.
fn via(fwd: &Forwarder, prefix: &str) -> Option<String> {
    fwd.route_via(prefix).unwrap()
}

fn wait_for_via(fwd: &Forwarder, prefix: &str, want: impl Fn(&str) -> bool, birds: &[&Bird]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = via(fwd, prefix);
        if got.as_deref().is_some_and(&want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "route to {prefix}: {got:?}\n{}\n{}",
            fwd.log(),
            birds.iter().map(|b| b.log()).collect::<Vec<_>>().join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const FLOWS: u16 = 64;
const PER_FLOW: usize = 3;

/// Sends PER_FLOW datagrams on each of FLOWS flows (source ports) from a to
/// 10.20.0.1 and returns, per flow, the peers (1, 2) its datagrams reached,
/// in arrival order; retried (up to 20 s) until every datagram arrives, so
/// that a path whose MAC is still being resolved does not count.
fn flows(pop: &Pop, s1: &UdpSocket, s2: &UdpSocket) -> BTreeMap<u16, Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let sent = pop
            .a
            .enter(|| {
                for flow in 0..FLOWS {
                    let sock = UdpSocket::bind(("10.0.1.2", 41000 + flow)).unwrap();
                    for k in 0..PER_FLOW {
                        sock.send_to(format!("flow {flow} {k}").as_bytes(), "10.20.0.1:9999")
                            .unwrap();
                    }
                }
            })
            .is_ok();
        assert!(sent);
        let mut got: BTreeMap<u16, Vec<u8>> = BTreeMap::new();
        let mut buf = [0u8; 64];
        let quiet = Duration::from_millis(300);
        for (peer, sock) in [(1u8, s1), (2u8, s2)] {
            sock.set_read_timeout(Some(quiet)).unwrap();
            while let Ok(n) = sock.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let flow: u16 = text.split(' ').nth(1).unwrap().parse().unwrap();
                got.entry(flow).or_default().push(peer);
            }
        }
        let arrived: usize = got.values().map(Vec::len).sum();
        if arrived == FLOWS as usize * PER_FLOW {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{arrived} of {} datagrams arrived",
            FLOWS as usize * PER_FLOW
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Each flow's one peer; fails if a flow's datagrams took two paths.
fn paths(got: &BTreeMap<u16, Vec<u8>>) -> BTreeMap<u16, u8> {
    got.iter()
        .map(|(flow, peers)| {
            assert!(
                peers.iter().all(|p| *p == peers[0]),
                "flow {flow} took both paths: {peers:?}"
            );
            (*flow, peers[0])
        })
        .collect()
}

#[test]
fn bgp_routes_are_forwarded_by_xdp_with_ecmp_withdrawals_and_peers_going_down() {
    let pop = Pop::new();
    // pop-forwarder first: the routes arrive over BGP while it runs.
    let fwd = Forwarder::start(&pop.fwd, CONFIG).unwrap();
    let pid = fwd.pid();
    let p1 = pop.peer_bird(&pop.p1, "10.0.11.2", "10.0.11.1");
    let mut p2 = pop.peer_bird(&pop.p2, "10.0.12.2", "10.0.12.1");
    let router = Bird::start(&pop.fwd, FWD_BIRD).unwrap();
    let s1 = udp_socket(&pop.p1, "10.20.0.1:9999").unwrap();
    let s2 = udp_socket(&pop.p2, "10.20.0.1:9999").unwrap();
    let birds = [&router, &p1, &p2];

    // Both peers announce: an ECMP group, each flow on one path, both
    // paths used.
    let both =
        |v: &str| v.starts_with("group") && v.contains("10.0.11.2") && v.contains("10.0.12.2");
    wait_for_via(&fwd, "10.20.0.0/24", both, &birds);
    let forwarded = fwd.counter("forwarded").unwrap();
    let ecmp = paths(&flows(&pop, &s1, &s2));
    let on_p1 = ecmp.values().filter(|p| **p == 1).count();
    eprintln!("ECMP: {on_p1} of {FLOWS} flows through p1");
    assert!(
        (8..=56).contains(&on_p1),
        "{on_p1} of {FLOWS} flows through p1: not spread"
    );
    assert!(fwd.counter("forwarded").unwrap() - forwarded >= u64::from(FLOWS) * PER_FLOW as u64);

    // p1 withdraws the prefix: every flow moves to p2, with no restart.
    p1.birdc(&["disable", "announce"]).unwrap();
    wait_for_via(&fwd, "10.20.0.0/24", |v| v == "10.0.12.2", &birds);
    assert!(paths(&flows(&pop, &s1, &s2)).values().all(|p| *p == 2));
    assert_eq!(fwd.pid(), pid);
    // Applied as notified, the prefix alone, not by reading the table.
    assert!(
        fwd.log().contains("1 changed, 0 deleted (1 notifications"),
        "{}",
        fwd.log()
    );

    // It announces again: the group is back, and so is every flow's path
    // (the buckets are a function of the members alone).
    p1.birdc(&["enable", "announce"]).unwrap();
    wait_for_via(&fwd, "10.20.0.0/24", both, &birds);
    assert_eq!(paths(&flows(&pop, &s1, &s2)), ecmp);

    // p2 goes down hard: the group shrinks to p1; p1's flows stayed on it.
    p2.kill();
    wait_for_via(&fwd, "10.20.0.0/24", |v| v == "10.0.11.2", &[&router, &p1]);
    assert!(paths(&flows(&pop, &s1, &s2)).values().all(|p| *p == 1));

    // A route the program cannot express is the kernel's, counted.
    pop.fwd
        .ip(&["route", "add", "blackhole", "10.30.0.0/24"])
        .unwrap();
    wait_for_via(&fwd, "10.30.0.0/24", |v| v == "kernel", &[]);
    let before = fwd.counter("pass_kernel_route").unwrap();
    tests::send_udp(&pop.a, "10.30.0.1:9999".parse().unwrap(), 64, "hole", 5).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while fwd.counter("pass_kernel_route").unwrap() < before + 5 {
        assert!(Instant::now() < deadline, "{}", fwd.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        fwd.log()
            .contains("kernel route 10.30.0.0/24 is left to the kernel")
    );
    // The CLI does not edit a mirrored table.
    let err = fwd
        .cli_err(&[
            "route",
            "add",
            "10.40.0.0/24",
            "--via",
            "10.0.11.2",
            "--dev",
            "f1",
        ])
        .unwrap();
    assert!(err.contains("routes come from kernel table 254"), "{err}");
}

/// How many times the daemon has read its mirrored table whole (its
/// metrics, served in its namespace on `port`).
fn whole_reads(ns: &tests::Netns, port: u16) -> u64 {
    let body = tests::http(
        ns,
        port,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    body.lines()
        .find_map(|l| l.strip_prefix("pop_forwarder_route_syncs_total{kind=\"whole\"} "))
        .unwrap_or_else(|| panic!("no whole-read count in {body}"))
        .trim()
        .parse()
        .unwrap()
}

/// An address notification that moves no connected subnet (an address's
/// lifetimes renewed, as every router advertisement does for a SLAAC
/// address) plans nothing again; an address added routes its subnet, and
/// removed takes the route away, from the table's copy: the mirrored table
/// is never read whole again. The mirrored table here is not main, so the
/// subnet is in it under no route of the kernel's: only the subnets' own
/// following routes it.
#[test]
fn an_address_change_plans_its_subnet_again_without_reading_the_table() {
    let pop = Pop::new();
    let fwd = Forwarder::start(
        &pop.fwd,
        &format!("metrics_listen = \"9464\"\nkernel_table = 100\n{CONFIG}"),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !fwd.log().contains("metrics: http://127.0.0.1:9464/metrics") {
        assert!(Instant::now() < deadline, "{}", fwd.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // The start's own batch, then quiet.
    std::thread::sleep(Duration::from_millis(300));
    let before = whole_reads(&pop.fwd, 9464);
    // The renewal is announced (what `ip monitor` sees, the daemon hears).
    let mut monitor = pop
        .fwd
        .command("ip")
        .args(["monitor", "address"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    pop.fwd
        .ip(&[
            "addr",
            "change",
            "10.0.1.1/24",
            "dev",
            "f0",
            "valid_lft",
            "3600",
            "preferred_lft",
            "3600",
        ])
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    monitor.kill().unwrap();
    monitor.wait().unwrap();
    let mut seen = String::new();
    std::io::Read::read_to_string(&mut monitor.stdout.take().unwrap(), &mut seen).unwrap();
    assert!(seen.contains("10.0.1.1/24"), "no notification: {seen}");
    assert!(
        !fwd.log().contains("connected subnets changed"),
        "{}",
        fwd.log()
    );

    let until = |want: Option<&str>| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while via(&fwd, "10.0.77.0/24").as_deref() != want {
            assert!(Instant::now() < deadline, "{}", fwd.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    pop.fwd
        .ip(&["addr", "add", "10.0.77.1/24", "dev", "f0"])
        .unwrap();
    until(Some("connected"));
    assert!(
        fwd.log().contains(
            "connected subnets changed (10.0.77.0/24): planned again from the mirrored table's copy"
        ),
        "{}",
        fwd.log()
    );
    pop.fwd
        .ip(&["addr", "del", "10.0.77.1/24", "dev", "f0"])
        .unwrap();
    until(None);
    assert_eq!(whole_reads(&pop.fwd, 9464), before, "{}", fwd.log());
}

/// A reload with a mirrored table plans from the daemon's copy of it: the
/// table is not read whole (at the reload, nor at the next batch after it,
/// as it was), a route the config now names wins over the kernel's, the
/// kernel's comes back once the config lets go of it, and notifications
/// are followed one by one after each reload.
#[test]
fn a_reload_with_a_mirrored_table_plans_from_its_copy() {
    let pop = Pop::new();
    let config = |routes: &str| format!("metrics_listen = \"9465\"\n{CONFIG}\n{routes}");
    let fwd = Forwarder::start(&pop.fwd, &config("")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !fwd.log().contains("metrics: http://127.0.0.1:9465/metrics") {
        assert!(Instant::now() < deadline, "{}", fwd.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let kernel_route = |prefix: &str| {
        pop.fwd
            .ip(&["route", "add", prefix, "via", "10.0.11.2", "dev", "f1"])
            .unwrap()
    };
    let until = |prefix: &str, want: &str| wait_for_via(&fwd, prefix, |v| v == want, &[]);
    kernel_route("10.0.88.0/24");
    until("10.0.88.0/24", "10.0.11.2");
    let before = whole_reads(&pop.fwd, 9465);

    std::fs::write(
        &fwd.config,
        config("[[routes]]\nprefix = \"10.0.88.0/24\"\nvia = \"10.0.12.2\"\ndev = \"f2\"\n"),
    )
    .unwrap();
    let out = fwd.cli_ok(&["reload"]).unwrap();
    assert!(out.contains("1 changed"), "{out}\n{}", fwd.log());
    until("10.0.88.0/24", "10.0.12.2");
    kernel_route("10.0.89.0/24");
    until("10.0.89.0/24", "10.0.11.2");

    std::fs::write(&fwd.config, config("")).unwrap();
    let out = fwd.cli_ok(&["reload"]).unwrap();
    assert!(out.contains("1 changed"), "{out}\n{}", fwd.log());
    until("10.0.88.0/24", "10.0.11.2");
    pop.fwd
        .ip(&[
            "route",
            "del",
            "10.0.89.0/24",
            "via",
            "10.0.11.2",
            "dev",
            "f1",
        ])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while via(&fwd, "10.0.89.0/24").is_some() {
        assert!(Instant::now() < deadline, "{}", fwd.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(whole_reads(&pop.fwd, 9465), before, "{}", fwd.log());
}

/// Once a burst has overflowed the notification socket, the kernel drops
/// later notifications without saying so again until the socket's queue
/// has been empty. A second burst right after the table was read again
/// (the slow reader still behind) must not be lost that way.
#[test]
fn a_notification_overflow_is_followed_by_a_full_reread() {
    let pop = Pop::new();
    // A notification buffer far too small for the bursts below, read
    // slowly (a failpoint of debug builds).
    let fwd = Forwarder::start_with_env(
        &pop.fwd,
        CONFIG,
        &[("POP_FORWARDER_NOTIFY_STALL", "4096:20")],
    )
    .unwrap();
    let burst = |first: usize, count: usize| {
        let routes: String = (first..first + count)
            .map(|i| {
                format!(
                    "route add 10.{}.{}.0/24 via 10.0.11.2 dev f1\n",
                    100 + i / 256,
                    i % 256
                )
            })
            .collect();
        let batch = std::env::temp_dir().join(unique("routes"));
        std::fs::write(&batch, routes).unwrap();
        let out = pop.fwd.ip(&["-batch", batch.to_str().unwrap()]);
        let _ = std::fs::remove_file(&batch);
        out.unwrap();
    };
    let mirrored = |want: usize| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let list: serde_json::Value =
                serde_json::from_str(&fwd.cli_ok(&["route", "list", "--json"]).unwrap()).unwrap();
            let have = list
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["via"] == "10.0.11.2")
                .count();
            if have == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{have} of {want} routes mirrored\n{}",
                fwd.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    burst(0, 2000);
    // The table read again after the overflow.
    let deadline = Instant::now() + Duration::from_secs(20);
    let reread = |log: String| {
        log.find("overflowed: reading everything again")
            .is_some_and(|at| log[at..].contains("kernel table 254:"))
    };
    while !reread(fwd.log()) {
        assert!(
            Instant::now() < deadline,
            "the burst did not overflow the socket: the test proves nothing\n{}",
            fwd.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    burst(2000, 1000);
    mirrored(3000);
}
