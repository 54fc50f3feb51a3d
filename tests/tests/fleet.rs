//! A PoP of forwarders: VIPs announced while they can be served, and
//! withdrawn when they cannot, on `drain` and on `detach` (not on a stop);
//! two forwarders behind an upstream router's ECMP, fed by BGP (real
//! BIRDs), agreeing on every flow's cache node and carrying each other's
//! flows when one fails.

use std::time::{Duration, Instant};

use tests::{Bird, Forwarder, Lab, send_udp};

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
        || is_announced(),
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
        || is_announced(),
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

/// The upstream router's BIRD: a session to each forwarder, the VIP routes
/// they announce merged into one ECMP route in its kernel table.
const UPSTREAM_BIRD: &str = r#"
router id 10.0.11.1;
log stderr all;
protocol device { scan time 1; }
protocol kernel {
    ipv4 { import none; export where source = RTS_BGP; };
    merge paths on limit 16;
}
protocol bgp f1 {
    local 10.0.11.1 as 65000; neighbor 10.0.11.2 as 65001;
    hold time 3; keepalive time 1; connect retry time 1;
    ipv4 { import all; export none; };
}
protocol bgp f2 {
    local 10.0.12.1 as 65000; neighbor 10.0.12.2 as 65001;
    hold time 3; keepalive time 1; connect retry time 1;
    ipv4 { import all; export none; };
}
"#;

/// A forwarder's BIRD, as packaging/bird.conf has it: routes from BGP into
/// the main table (nothing is announced to it here), and the daemon's VIP
/// routes (table 100) learned into a BIRD table of their own (one kernel
/// syncer per BIRD table), piped into master4 and exported to the upstream
/// router.
const FORWARDER_BIRD: &str = r#"
router id LOCAL;
log stderr all;
protocol device { scan time 1; }
protocol kernel {
    ipv4 { import none; export where source = RTS_BGP; };
    merge paths on limit 16;
}
ipv4 table vips4;
protocol kernel vip_routes4 {
    kernel table 100;
    learn;
    scan time 1;
    ipv4 { table vips4; import all; export none; };
}
protocol pipe vips {
    table master4; peer table vips4;
    import all; export none;
}
protocol bgp upstream {
    local LOCAL as 65001; neighbor UPSTREAM as 65000;
    hold time 3; keepalive time 1; connect retry time 1;
    ipv4 { import all; export where proto = "vip_routes4"; };
}
"#;

/// One forwarder's config. The nodes and the pool are listed in `order`:
/// forwarders must agree whatever order they learned them in.
fn forwarder_config(order: &[&str]) -> String {
    let nodes: String = order
        .iter()
        .map(|n| {
            let i = &n[n.len() - 1..];
            format!("[[nodes]]\nname = \"{n}\"\naddress = \"10.0.50.1{i}\"\ndev = \"b0\"\n\n")
        })
        .collect();
    let pool = order
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "vip_route_table = 100\nflow_hash_seed = 7\nroute_miss = \"drop\"\n\n\
         [[interfaces]]\nname = \"u0\"\n\n[[interfaces]]\nname = \"b0\"\n\n{nodes}\
         [[vips]]\naddress = \"192.0.2.10\"\nprotocol = \"udp\"\nnodes = [{pool}]\n"
    )
}

/// The PoP:
///
/// ```text
///                               u0 [fwd1] b0 --+
/// client --- [up] (BIRD, ECMP) <                 lan (bridge) --- cache-1, cache-2, cache-3
///                               u0 [fwd2] b0 --+
/// ```
///
/// Each forwarder runs pop-forwarder (on u0 and b0) and BIRD; kernel
/// forwarding is off in them, so what reaches a node was steered by XDP.
/// The nodes hold the VIP on lo and listen on it.
struct Pop {
    client: tests::Netns,
    up: tests::Netns,
    fwd: [tests::Netns; 2],
    lan: tests::Netns,
    nodes: Vec<tests::Netns>,
}

impl Pop {
    fn new() -> Pop {
        let pop = Pop {
            client: tests::Netns::new("cl").unwrap(),
            up: tests::Netns::new("up").unwrap(),
            fwd: [
                tests::Netns::new("fa").unwrap(),
                tests::Netns::new("fb").unwrap(),
            ],
            lan: tests::Netns::new("lan").unwrap(),
            nodes: (0..3).map(|_| tests::Netns::new("n").unwrap()).collect(),
        };
        tests::wire(
            &pop.client,
            "c0",
            "10.1.0.2/24",
            &pop.up,
            "uc",
            "10.1.0.1/24",
        );
        pop.client
            .ip(&["route", "add", "default", "via", "10.1.0.1"])
            .unwrap();
        pop.up.sysctl("net.ipv4.ip_forward", "1").unwrap();
        // Flows spread over the forwarders by ports, as a PoP router's
        // ECMP does.
        pop.up
            .sysctl("net.ipv4.fib_multipath_hash_policy", "1")
            .unwrap();
        pop.lan
            .ip(&["link", "add", "br0", "type", "bridge"])
            .unwrap();
        pop.lan.ip(&["link", "set", "br0", "up"]).unwrap();
        for (i, f) in pop.fwd.iter().enumerate() {
            let net = 11 + i;
            // up's end takes the forwarder's frames like any veth; the
            // forwarder's u0 is where its XDP program runs.
            tests::wire(
                &pop.up,
                &format!("u{}", i + 1),
                &format!("10.0.{net}.1/24"),
                f,
                "u0",
                &format!("10.0.{net}.2/24"),
            );
            tests::wire(
                &pop.lan,
                &format!("pf{i}"),
                "",
                f,
                "b0",
                &format!("10.0.50.{}/24", i + 1),
            );
            pop.lan
                .ip(&["link", "set", &format!("pf{i}"), "master", "br0"])
                .unwrap();
        }
        for (i, n) in pop.nodes.iter().enumerate() {
            tests::wire(
                &pop.lan,
                &format!("pn{i}"),
                "",
                n,
                "n0",
                &format!("10.0.50.1{}/24", i + 1),
            );
            pop.lan
                .ip(&["link", "set", &format!("pn{i}"), "master", "br0"])
                .unwrap();
            n.ip(&["addr", "add", "192.0.2.10/32", "dev", "lo"])
                .unwrap();
        }
        pop
    }
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
    let pop = Pop::new();
    let _upstream = Bird::start(&pop.up, UPSTREAM_BIRD).unwrap();
    // The forwarders learn the same nodes in opposite orders.
    let orders = [["cache-1", "cache-2"], ["cache-2", "cache-1"]];
    let mut fwds = Vec::new();
    let mut birds = Vec::new();
    for (i, ns) in pop.fwd.iter().enumerate() {
        let fwd = Forwarder::start(ns, &forwarder_config(&orders[i])).unwrap();
        fwd.wait_for_node_macs();
        fwds.push(fwd);
        let net = 11 + i;
        let bird = FORWARDER_BIRD
            .replace("LOCAL", &format!("10.0.{net}.2"))
            .replace("UPSTREAM", &format!("10.0.{net}.1"));
        birds.push(Bird::start(ns, &bird).unwrap());
    }
    let upstream_route = || pop.up.ip(&["route", "show", "192.0.2.10"]).unwrap();
    wait_until(
        "the upstream router has an ECMP route to the VIP through both forwarders",
        Duration::from_secs(20),
        || upstream_route().matches("nexthop via").count() == 2,
        || format!("{}\n{}", upstream_route(), birds[0].log()),
    );

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
    fwds[0].kill().unwrap();
    birds[0].kill();
    pop.up.ip(&["link", "del", "u1"]).unwrap();
    wait_until(
        "the upstream router routes the VIP through fwd2 alone",
        Duration::from_secs(20),
        || {
            let r = upstream_route();
            r.contains("via 10.0.12.2") && !r.contains("10.0.11.2")
        },
        upstream_route,
    );
    let second_before = vip_packets(&fwds[1]);
    let second = send_flows(&client, &sinks, "second");
    assert_eq!(second, first, "flows changed nodes when fwd1 failed");
    assert_eq!(
        vip_packets(&fwds[1]) - second_before,
        (FLOWS as usize * PER_FLOW) as u64
    );
}
