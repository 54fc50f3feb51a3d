//! A PoP of forwarders: VIPs announced while they can be served, and
//! withdrawn when they cannot, on `drain` and on `detach` (not on a stop);
//! two forwarders behind an upstream router's ECMP, fed by BGP (real
//! BIRDs), agreeing on every flow's cache node and carrying each other's
//! flows when one fails.

use std::time::{Duration, Instant};

use tests::{Forwarder, Lab, fleet::Pop, send_udp};

/// The forwarder's announced VIP routes in `table`, as the kernel lists
/// them (`ip route show table T proto 201`).
fn announced(fwd_ns: &tests::Netns, table: &str) -> String {
    fwd_ns
        .ip(&["route", "show", "table", table, "proto", "201"])
        .unwrap()
}

fn wait_until(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> bool,
    log: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what} within {timeout:?}\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn vips_are_announced_while_served_and_withdrawn_when_not_on_drain_and_on_detach() {
    let lab = Lab::new().unwrap();
    let n1 = lab.cache_node("r2", 5, "192.0.2.10").unwrap();
    // Someone else's route to a VIP in the same table: left alone, and
    // reported.
    lab.router
        .ip(&["route", "add", "192.0.2.20/32", "dev", "lo", "table", "100"])
        .unwrap();
    let health = r#"health = { kind = "tcp", port = 8080, interval_ms = 100, timeout_ms = 50, rise = 2, fall = 3 }"#;
    // The announcement table is a top-level key: before the lab's tables.
    let config = "vip_route_table = 100\n".to_owned()
        + &lab.config(
            "drop",
            &format!(
                r#"
[[interfaces]]
name = "r2"

[[nodes]]
name = "cache-1"
address = "10.0.5.11"
dev = "r2"
{health}

[[vips]]
address = "192.0.2.10"
protocol = "udp"
nodes = ["cache-1"]

[[vips]]
address = "192.0.2.20"
protocol = "udp"
nodes = ["cache-1"]
"#
            ),
        );
    let listen = |ns: &tests::Netns| {
        ns.enter(|| std::net::TcpListener::bind("10.0.5.11:8080"))
            .unwrap()
            .unwrap()
    };
    let l1 = listen(&n1);
    let mut fwd = Forwarder::start(&lab.router, &config).unwrap();
    let is_announced = || announced(&lab.router, "100").contains("192.0.2.10");
    wait_until(
        "192.0.2.10 announced",
        Duration::from_secs(5),
        &is_announced,
        || fwd.log(),
    );
    let route = announced(&lab.router, "100");
    assert!(route.contains("blackhole 192.0.2.10"), "{route}");
    assert!(!route.contains("192.0.2.20"), "{route}");
    assert!(
        lab.router
            .ip(&["route", "show", "table", "100", "192.0.2.20/32"])
            .unwrap()
            .contains("dev lo"),
        "the other route is left alone"
    );
    assert!(
        fwd.log().contains("VIP 192.0.2.20 is not announced"),
        "{}",
        fwd.log()
    );

    // The pool's one node fails its health check: withdrawn (3 failed
    // checks of 100 ms), and back once it answers again.
    drop(l1);
    wait_until(
        "withdrawn after the health check failed",
        Duration::from_secs(5),
        || !is_announced(),
        || fwd.log(),
    );
    let l1 = listen(&n1);
    wait_until(
        "announced again",
        Duration::from_secs(5),
        &is_announced,
        || fwd.log(),
    );

    // Drain: withdrawn, and `drain` reports when VIP traffic has stopped;
    // steering goes on meanwhile (a flow still arriving is served).
    let sink = tests::udp_socket(&n1, "192.0.2.10:9999").unwrap();
    let out = fwd.cli_ok(&["drain", "--settle", "1"]).unwrap();
    assert!(out.contains("drained: no VIP packet for 1 s"), "{out}");
    assert!(!is_announced());
    send_udp(&lab.a, "192.0.2.10:9999".parse().unwrap(), 64, "late", 3).unwrap();
    assert_eq!(tests::receive(&sink, 3, Duration::from_secs(3)).len(), 3);
    let status = fwd.cli_ok(&["status"]).unwrap();
    assert!(status.contains("DRAINING"), "{status}");
    // A drain outlives a restart of the daemon.
    fwd.stop().unwrap();
    fwd.run_again(&lab.router, &[]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!is_announced(), "a restart ended the drain\n{}", fwd.log());
    let out = fwd.cli_ok(&["resume"]).unwrap();
    assert!(
        out.contains("resumed: 1 VIP addresses announced in table 100"),
        "{out}"
    );
    assert!(is_announced());

    // A stop (an upgrade) leaves the route: the data plane still serves.
    let changes = |fwd: &Forwarder| fwd.log().matches("VIP 192.0.2.10 withdrawn").count();
    let before = changes(&fwd);
    fwd.stop().unwrap();
    assert!(is_announced(), "a stop withdrew the VIP");
    fwd.run_again(&lab.router, &[]).unwrap();
    assert!(is_announced());
    assert_eq!(
        changes(&fwd),
        before,
        "the restart withdrew it\n{}",
        fwd.log()
    );

    // Deleting the VIP withdraws it; adding it back announces it.
    fwd.cli_ok(&["vip", "del", "192.0.2.10", "udp"]).unwrap();
    assert!(!is_announced());
    fwd.cli_ok(&["vip", "add", "192.0.2.10", "udp", "--nodes", "cache-1"])
        .unwrap();
    assert!(is_announced());

    // Detach withdraws everything of its own, and only that.
    fwd.cli_ok(&["detach"]).unwrap();
    assert_eq!(announced(&lab.router, "100").trim(), "");
    assert!(
        lab.router
            .ip(&["route", "show", "table", "100"])
            .unwrap()
            .contains("192.0.2.20")
    );
    drop(l1);
}

/// Flows the test sends: UDP from the client's ports FIRST_PORT.. to the
/// VIP's port 9999.
const FLOWS: u16 = 64;
const FIRST_PORT: u16 = 40000;
const PER_FLOW: usize = 3;

/// The node a new flow from the client's `port` gets, as `lookup` says.
fn new_flow_node(fwd: &Forwarder, port: u16) -> String {
    let port = port.to_string();
    #[rustfmt::skip]
    let out = fwd.cli_ok(&[
        "lookup", "--src", "10.1.0.2", "--dst", "192.0.2.10", "--protocol", "udp",
        "--src-port", &port, "--dst-port", "9999", "--json",
    ]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["new_flow"].as_str().unwrap_or("none").to_owned()
}

/// Sends every flow and returns, per flow (source port), the nodes its
/// datagrams reached (index into the pop's nodes).
fn send_flows(
    client: &[std::net::UdpSocket],
    sinks: &[std::net::UdpSocket],
    tag: &str,
) -> std::collections::BTreeMap<u16, std::collections::BTreeSet<usize>> {
    for (f, sock) in client.iter().enumerate() {
        for i in 0..PER_FLOW {
            sock.send_to(format!("{tag} {f} {i}").as_bytes(), "192.0.2.10:9999")
                .unwrap();
        }
    }
    let mut got: std::collections::BTreeMap<u16, std::collections::BTreeSet<usize>> =
        Default::default();
    let mut total = 0;
    let mut buf = [0u8; 128];
    let deadline = Instant::now() + Duration::from_secs(5);
    while total < client.len() * PER_FLOW && Instant::now() < deadline {
        for (n, s) in sinks.iter().enumerate() {
            while let Ok((len, from)) = s.recv_from(&mut buf) {
                if String::from_utf8_lossy(&buf[..len]).starts_with(tag) {
                    got.entry(from.port()).or_default().insert(n);
                    total += 1;
                }
            }
        }
    }
    assert_eq!(
        total,
        client.len() * PER_FLOW,
        "datagrams of {tag} that arrived"
    );
    got
}

fn vip_packets(fwd: &Forwarder) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&fwd.cli_ok(&["vip", "list", "--json"]).unwrap()).unwrap();
    v[0]["packets"].as_u64().unwrap()
}

#[test]
fn a_pop_of_two_forwarders_agrees_on_every_flow_and_survives_one_failing() {
    let pop = Pop::new().unwrap();
    let _upstream = pop.upstream_bird().unwrap();
    // The forwarders learn the same nodes in opposite orders.
    let orders = [["cache-1", "cache-2"], ["cache-2", "cache-1"]];
    let (mut fwds, mut birds): (Vec<_>, Vec<_>) = (0..2)
        .map(|i| pop.start_forwarder(i, &orders[i]).unwrap())
        .unzip();
    pop.wait_for_route("ECMP through both forwarders", |r| {
        r.matches("nexthop via").count() == 2
    })
    .unwrap();

    // Agreement on the Maglev tables, and a node added to both: about
    // 1/3 of new flows move, the same ones on both.
    let ports = FIRST_PORT..FIRST_PORT + 256;
    let before: Vec<Vec<String>> = fwds
        .iter()
        .map(|f| ports.clone().map(|p| new_flow_node(f, p)).collect())
        .collect();
    assert_eq!(before[0], before[1], "the forwarders disagree");
    for fwd in &fwds {
        fwd.cli_ok(&["node", "add", "cache-3", "10.0.50.13", "--dev", "b0"])
            .unwrap();
        fwd.cli_ok(&[
            "vip",
            "add",
            "192.0.2.10",
            "udp",
            "--nodes",
            "cache-3,cache-1,cache-2",
        ])
        .unwrap();
        fwd.wait_for_node_macs();
    }
    let after: Vec<Vec<String>> = fwds
        .iter()
        .map(|f| ports.clone().map(|p| new_flow_node(f, p)).collect())
        .collect();
    assert_eq!(
        after[0], after[1],
        "the forwarders disagree after the same change"
    );
    let moved = before[0]
        .iter()
        .zip(&after[0])
        .filter(|(b, a)| b != a)
        .count();
    let to_new = before[0]
        .iter()
        .zip(&after[0])
        .filter(|(b, a)| b != a && *a == "cache-3")
        .count();
    let fraction = moved as f64 / ports.len() as f64;
    println!(
        "cache-3 added: {moved} of {} flows moved ({fraction:.3}; 1/3 expected), {to_new} of them to cache-3",
        ports.len()
    );
    assert!((0.2..0.47).contains(&fraction), "{fraction}");

    // Real flows through the PoP: each stays on one node, and the upstream
    // spreads them over both forwarders.
    let sinks: Vec<_> = pop
        .nodes
        .iter()
        .map(|n| tests::udp_socket(n, "192.0.2.10:9999").unwrap())
        .collect();
    for s in &sinks {
        s.set_nonblocking(true).unwrap();
    }
    let client: Vec<std::net::UdpSocket> = (0..FLOWS)
        .map(|f| {
            let addr = format!("10.1.0.2:{}", FIRST_PORT + f);
            pop.client
                .enter(move || std::net::UdpSocket::bind(addr))
                .unwrap()
                .unwrap()
        })
        .collect();
    let first = send_flows(&client, &sinks, "first");
    assert_eq!(first.len(), FLOWS as usize);
    for (port, nodes) in &first {
        assert_eq!(nodes.len(), 1, "flow {port} reached nodes {nodes:?}");
        let node = format!("cache-{}", nodes.first().unwrap() + 1);
        assert_eq!(after[0][(port - FIRST_PORT) as usize], node, "flow {port}");
    }
    let carried: Vec<u64> = fwds.iter().map(vip_packets).collect();
    println!(
        "forwarders carried {carried:?} of {} datagrams",
        FLOWS as usize * PER_FLOW
    );
    assert!(
        carried.iter().all(|&c| c > 0),
        "ECMP used one forwarder only: {carried:?}"
    );

    // fwd1 fails hard: daemon and BIRD killed, its uplink gone. Its flows
    // continue through fwd2, each on the node it had.
    pop.fail(0, &mut fwds[0], &mut birds[0]).unwrap();
    pop.wait_for_route("through fwd2 alone", |r| {
        r.contains("via 10.0.12.2") && !r.contains("10.0.11.2")
    })
    .unwrap();
    let second_before = vip_packets(&fwds[1]);
    let second = send_flows(&client, &sinks, "second");
    assert_eq!(second, first, "flows changed nodes when fwd1 failed");
    assert_eq!(
        vip_packets(&fwds[1]) - second_before,
        (FLOWS as usize * PER_FLOW) as u64
    );
}
