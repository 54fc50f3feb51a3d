//! A PoP of forwarders: VIPs announced while they can be served, and
//! withdrawn when they cannot, on `drain` and on `detach` (not on a stop).

use std::time::{Duration, Instant};

use tests::{Forwarder, Lab, send_udp};

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
    let is_announced = |fwd: &Forwarder| announced(&lab.router, "100").contains("192.0.2.10");
    wait_until(
        "192.0.2.10 announced",
        Duration::from_secs(5),
        || is_announced(&fwd),
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
        || !is_announced(&fwd),
        || fwd.log(),
    );
    let l1 = listen(&n1);
    wait_until(
        "announced again",
        Duration::from_secs(5),
        || is_announced(&fwd),
        || fwd.log(),
    );

    // Drain: withdrawn, and `drain` reports when VIP traffic has stopped;
    // steering goes on meanwhile (a flow still arriving is served).
    let sink = tests::udp_socket(&n1, "192.0.2.10:9999").unwrap();
    let out = fwd.cli_ok(&["drain", "--settle", "1"]).unwrap();
    assert!(out.contains("drained: no VIP packet for 1 s"), "{out}");
    assert!(!is_announced(&fwd));
    send_udp(&lab.a, "192.0.2.10:9999".parse().unwrap(), 64, "late", 3).unwrap();
    assert_eq!(tests::receive(&sink, 3, Duration::from_secs(3)).len(), 3);
    let status = fwd.cli_ok(&["status"]).unwrap();
    assert!(status.contains("DRAINING"), "{status}");
    // A drain outlives a restart of the daemon.
    fwd.stop().unwrap();
    fwd.run_again(&lab.router, &[]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !is_announced(&fwd),
        "a restart ended the drain\n{}",
        fwd.log()
    );
    let out = fwd.cli_ok(&["resume"]).unwrap();
    assert!(
        out.contains("resumed: 1 VIP addresses announced in table 100"),
        "{out}"
    );
    assert!(is_announced(&fwd));

    // A stop (an upgrade) leaves the route: the data plane still serves.
    let changes = |fwd: &Forwarder| fwd.log().matches("VIP 192.0.2.10 withdrawn").count();
    let before = changes(&fwd);
    fwd.stop().unwrap();
    assert!(is_announced(&fwd), "a stop withdrew the VIP");
    fwd.run_again(&lab.router, &[]).unwrap();
    assert!(is_announced(&fwd));
    assert_eq!(changes(&fwd), before, "the restart withdrew it\n{}", fwd.log());

    // Deleting the VIP withdraws it; adding it back announces it.
    fwd.cli_ok(&["vip", "del", "192.0.2.10", "udp"]).unwrap();
    assert!(!is_announced(&fwd));
    fwd.cli_ok(&["vip", "add", "192.0.2.10", "udp", "--nodes", "cache-1"])
        .unwrap();
    assert!(is_announced(&fwd));

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
