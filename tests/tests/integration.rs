//! Integration tests: the real binary in the middle namespace of a
//! three-namespace lab, real UDP from `a` to a socket in `c`, checked on the
//! wire in `c` and in the forwarder's counters.
//!
//! The router namespace keeps kernel forwarding off unless a test says
//! otherwise, so a datagram that arrives was forwarded by XDP.

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use pop_forwarder_common::checksum;
use tests::{
    Capture, Forwarder, Lab, ROUTE_TO_C, mac_str, neighbour_c_v4,
    packets::{Eth, udp_v4},
    receive, routed_lab, send_udp, udp_socket,
};

const COUNT: usize = 20;
const WAIT: Duration = Duration::from_secs(3);

#[test]
fn ipv4_udp_crosses_with_ttl_checksum_and_macs_rewritten() {
    let (lab, mut fwd) = routed_lab(&[]);
    let sink = udp_socket(&lab.c, "10.0.2.2:9999").unwrap();
    let capture = Capture::new(&lab.c, "c0").unwrap();

    send_udp(
        &lab.a,
        "10.0.2.2:9999".parse().unwrap(),
        64,
        "v4-cross",
        COUNT,
    )
    .unwrap();

    let got = receive(&sink, COUNT, WAIT);
    assert_eq!(
        got.len(),
        COUNT,
        "datagrams received: {got:?}\n{}",
        fwd.log()
    );
    let frames = capture.frames_containing(b"v4-cross", COUNT, WAIT);
    assert_eq!(frames.len(), COUNT);
    let (r1, c0) = (lab.router.mac("r1").unwrap(), lab.c.mac("c0").unwrap());
    for f in &frames {
        assert_eq!(f[0..6], c0, "destination MAC");
        assert_eq!(f[6..12], r1, "source MAC");
        assert_eq!(f[12..14], [0x08, 0x00]);
        let ihl = usize::from(f[14] & 0x0f) * 4;
        assert_eq!(f[14 + 8], 63, "TTL exactly one lower");
        assert!(
            checksum::ipv4_header_valid(&f[14..14 + ihl]),
            "IPv4 header checksum"
        );
    }
    // The socket got them, so the kernel found the UDP checksum right too.
    assert!(fwd.counter("forwarded").unwrap() >= COUNT as u64);
    let status = fwd.stop().unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    // A stop leaves the data plane: attached, pinned, reported as such.
    assert!(lab.router.has_xdp("r0").unwrap() && lab.router.has_xdp("r1").unwrap());
    assert!(fwd.has_pins());
    let status = fwd.cli_ok(&["status"]).unwrap();
    assert!(
        status.contains("no daemon; the data plane pinned at"),
        "{status}"
    );
    assert!(status.contains("from the config and the CLI"), "{status}");
    let json: serde_json::Value =
        serde_json::from_str(&fwd.cli_ok(&["status", "--json"]).unwrap()).unwrap();
    assert_eq!(json["route_source"], "static", "{json}");
    assert_eq!(json["mirrored_table"], serde_json::Value::Null, "{json}");
    // `detach` is what removes it.
    let out = fwd.cli_ok(&["detach"]).unwrap();
    assert!(out.contains("removed its pins"), "{out}");
    assert!(!lab.router.has_xdp("r0").unwrap() && !lab.router.has_xdp("r1").unwrap());
    assert!(!fwd.has_pins());
}

/// With a mirrored kernel table, a config route wins over the kernel's
/// route to the same prefix, also when the kernel's is announced after the
/// start; the kernel's other routes are followed.
#[test]
fn a_config_route_wins_over_a_mirrored_kernel_route_to_its_prefix() {
    let lab = Lab::new().unwrap();
    let own = "[[routes]]\nprefix = \"10.0.9.0/24\"\nvia = \"10.0.2.2\"\ndev = \"r1\"\n";
    let config = format!("route_source = \"kernel\"\n{}", lab.config("pass", own));
    let fwd = Forwarder::start(&lab.router, &config).unwrap();
    let via = |prefix: &str| fwd.route_via(prefix).unwrap();
    assert_eq!(via("10.0.9.0/24").as_deref(), Some("10.0.2.2"));
    let follow = |prefix: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while via(prefix).as_deref() != Some("10.0.1.2") {
            assert!(
                Instant::now() < deadline,
                "{prefix} not mirrored\n{}",
                fwd.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // A first kernel route, followed: from here on, notifications are
    // applied prefix by prefix (the start's first batch may read the
    // table whole).
    lab.router
        .ip(&[
            "route",
            "add",
            "10.0.8.0/24",
            "via",
            "10.0.1.2",
            "dev",
            "r0",
        ])
        .unwrap();
    follow("10.0.8.0/24");
    // The kernel's route to the config's prefix, and one more: once the
    // other is followed, the first has been seen.
    for prefix in ["10.0.9.0/24", "10.0.7.0/24"] {
        lab.router
            .ip(&["route", "add", prefix, "via", "10.0.1.2", "dev", "r0"])
            .unwrap();
    }
    follow("10.0.7.0/24");
    assert_eq!(
        via("10.0.9.0/24").as_deref(),
        Some("10.0.2.2"),
        "{}",
        fwd.log()
    );
    // `status` says where the routes come from.
    let status = fwd.cli_ok(&["status"]).unwrap();
    assert!(
        status.contains("mirrored from kernel table 254 (the config's routes win)"),
        "{status}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&fwd.cli_ok(&["status", "--json"]).unwrap()).unwrap();
    assert_eq!(json["route_source"], "kernel", "{json}");
    assert_eq!(json["mirrored_table"], 254, "{json}");
}

/// IPv6 routes of a mirrored kernel table, as the kernel announces them:
/// one path; a second path appended (`ip -6 route append`; Linux 6.18
/// announces the route with both paths, as `ip -6 monitor route` shows),
/// making an ECMP group; one path of two deleted (announced alone),
/// leaving the other; a route with two paths added at once, then deleted
/// whole. Forwarded by the program through its one path.
#[test]
fn ipv6_kernel_routes_are_mirrored_with_appended_and_deleted_paths() {
    let lab = Lab::new().unwrap();
    lab.neighbours_c(&["fd00:2::2"]).unwrap();
    let config = format!("route_source = \"kernel\"\n{}", lab.config("pass", ""));
    let fwd = Forwarder::start(&lab.router, &config).unwrap();
    let via = |prefix: &str| fwd.route_via(prefix).unwrap();
    let until = |prefix: &str, want: &dyn Fn(Option<&str>) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = via(prefix);
            if want(got.as_deref()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{prefix}: {got:?}\n{}",
                fwd.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let ip6 = |args: &[&str]| {
        let mut all = vec!["-6", "route"];
        all.extend_from_slice(args);
        lab.router.ip(&all).unwrap()
    };
    let one = "2001:db8:1::/48";
    ip6(&["add", one, "via", "fd00:2::2", "dev", "r1"]);
    until(one, &|v| v == Some("fd00:2::2"));
    ip6(&["append", one, "via", "fd00:1::2", "dev", "r0"]);
    until(one, &|v| v.is_some_and(|v| v.starts_with("group")));
    ip6(&["del", one, "via", "fd00:2::2", "dev", "r1"]);
    until(one, &|v| v == Some("fd00:1::2"));
    ip6(&["del", one, "via", "fd00:1::2", "dev", "r0"]);
    ip6(&["add", one, "via", "fd00:2::2", "dev", "r1"]);
    until(one, &|v| v == Some("fd00:2::2"));

    let two = "2001:db8:2::/48";
    #[rustfmt::skip]
    ip6(&[
        "add", two, "nexthop", "via", "fd00:1::2", "dev", "r0",
        "nexthop", "via", "fd00:2::2", "dev", "r1",
    ]);
    until(two, &|v| v.is_some_and(|v| v.starts_with("group")));
    ip6(&["del", two]);
    until(two, &|v| v.is_none());

    // Through c's MAC (a permanent neighbour): forwarded by the program
    // (c's kernel has no such address and drops them: the router's count
    // is the check).
    let before = fwd.counter("forwarded").unwrap();
    send_udp(&lab.a, "[2001:db8:1::9]:9999".parse().unwrap(), 64, "v6", 5).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while fwd.counter("forwarded").unwrap() < before + 5 {
        assert!(Instant::now() < deadline, "{}", fwd.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A restart whose config no longer lists an interface detaches the
/// program from it before it comes up (the link detached, then its pin
/// removed), and leaves the others attached.
#[test]
fn a_restart_without_an_interface_detaches_from_it() {
    let lab = Lab::new().unwrap();
    let mut fwd = Forwarder::start(&lab.router, &lab.config("pass", "")).unwrap();
    assert!(lab.router.has_xdp("r0").unwrap() && lab.router.has_xdp("r1").unwrap());
    // A restart on a config with r0 alone.
    let restart_on_r0 = |fwd: &mut Forwarder| {
        std::fs::write(
            &fwd.config,
            "route_miss = \"pass\"\n\n[[interfaces]]\nname = \"r0\"\n",
        )
        .unwrap();
        fwd.run_again(&lab.router, &[]).unwrap();
    };
    fwd.stop().unwrap();
    restart_on_r0(&mut fwd);
    assert!(
        fwd.log()
            .contains("detached from r1 (no longer in the config)"),
        "{}",
        fwd.log()
    );
    assert!(lab.router.has_xdp("r0").unwrap());
    assert!(!lab.router.has_xdp("r1").unwrap());

    // The same with the state file gone: the pinned links say which
    // interfaces were attached.
    std::fs::write(&fwd.config, lab.config("pass", "")).unwrap();
    fwd.stop().unwrap();
    fwd.run_again(&lab.router, &[]).unwrap();
    assert!(lab.router.has_xdp("r1").unwrap());
    fwd.stop().unwrap();
    std::fs::remove_file(fwd.run_dir.join(format!("{}.json", fwd.instance))).unwrap();
    restart_on_r0(&mut fwd);
    assert_eq!(
        fwd.log()
            .matches("detached from r1 (no longer in the config)")
            .count(),
        2,
        "{}",
        fwd.log()
    );
    assert!(lab.router.has_xdp("r0").unwrap());
    assert!(!lab.router.has_xdp("r1").unwrap());
}

#[test]
fn ipv6_udp_crosses_with_hop_limit_and_macs_rewritten() {
    let lab = Lab::new().unwrap();
    let c0 = lab.c.mac("c0").unwrap();
    let routes = format!(
        "[[routes]]\nprefix = \"fd00:2::/64\"\nvia = \"fd00:2::2\"\ndev = \"r1\"\nmac = \"{}\"\n",
        mac_str(c0)
    );
    let fwd = Forwarder::start(&lab.router, &lab.config("pass", &routes)).unwrap();
    let sink = udp_socket(&lab.c, "[fd00:2::2]:9999").unwrap();
    let capture = Capture::new(&lab.c, "c0").unwrap();

    let dst: SocketAddr = "[fd00:2::2]:9999".parse().unwrap();
    send_udp(&lab.a, dst, 64, "v6-cross", COUNT).unwrap();

    let got = receive(&sink, COUNT, WAIT);
    assert_eq!(
        got.len(),
        COUNT,
        "datagrams received: {got:?}\n{}",
        fwd.log()
    );
    let frames = capture.frames_containing(b"v6-cross", COUNT, WAIT);
    assert_eq!(frames.len(), COUNT);
    let r1 = lab.router.mac("r1").unwrap();
    for f in &frames {
        assert_eq!(f[0..6], c0);
        assert_eq!(f[6..12], r1);
        assert_eq!(f[12..14], [0x86, 0xdd]);
        assert_eq!(f[14 + 7], 63, "hop limit exactly one lower");
    }
    assert!(fwd.counter("forwarded").unwrap() >= COUNT as u64);
}

#[test]
fn routes_added_and_deleted_from_the_cli_take_effect_while_running() {
    let lab = Lab::new().unwrap();
    neighbour_c_v4(&lab);
    // c also holds 10.0.9.2, on no subnet of the router's: reached only
    // through a route via c.
    lab.c
        .ip(&["addr", "add", "10.0.9.2/32", "dev", "c0"])
        .unwrap();
    let fwd = Forwarder::start(&lab.router, &lab.config("drop", "")).unwrap();
    let sink = udp_socket(&lab.c, "10.0.9.2:9999").unwrap();
    let dst: SocketAddr = "10.0.9.2:9999".parse().unwrap();

    send_udp(&lab.a, dst, 64, "before", 5).unwrap();
    assert!(
        receive(&sink, 1, Duration::from_millis(800)).is_empty(),
        "no route yet: nothing may arrive"
    );
    assert!(fwd.counter("drop_route_miss").unwrap() >= 5);

    let out = fwd
        .cli_ok(&[
            "route",
            "add",
            "10.0.9.0/24",
            "--via",
            "10.0.2.2",
            "--dev",
            "r1",
        ])
        .unwrap();
    assert!(out.contains("added 10.0.9.0/24"), "{out}");
    let list = fwd.cli_ok(&["route", "list"]).unwrap();
    assert!(
        list.contains("10.0.9.0/24") && list.contains("10.0.2.2"),
        "{list}"
    );
    send_udp(&lab.a, dst, 64, "during", 5).unwrap();
    assert_eq!(receive(&sink, 5, WAIT).len(), 5, "{}", fwd.log());

    // Adding the same prefix again is refused; the table is unchanged.
    let again = fwd
        .cli(&[
            "route",
            "add",
            "10.0.9.0/24",
            "--via",
            "10.0.2.2",
            "--dev",
            "r1",
        ])
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    fwd.cli_ok(&["route", "del", "10.0.9.0/24"]).unwrap();
    let list: serde_json::Value =
        serde_json::from_str(&fwd.cli_ok(&["route", "list", "--json"]).unwrap()).unwrap();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|r| r["prefix"] != "10.0.9.0/24"),
        "{list}"
    );
    let dropped = fwd.counter("drop_route_miss").unwrap();
    send_udp(&lab.a, dst, 64, "after", 5).unwrap();
    assert!(
        receive(&sink, 1, Duration::from_millis(800)).is_empty(),
        "route deleted: nothing may arrive"
    );
    assert!(fwd.counter("drop_route_miss").unwrap() >= dropped + 5);
}

#[test]
fn ttl_one_and_local_traffic_go_to_the_kernel() {
    let (lab, fwd) = routed_lab(&[]);
    let sink = udp_socket(&lab.c, "10.0.2.2:9999").unwrap();
    send_udp(&lab.a, "10.0.2.2:9999".parse().unwrap(), 1, "ttl1", 5).unwrap();
    assert!(receive(&sink, 1, Duration::from_millis(800)).is_empty());
    assert_eq!(fwd.counter("pass_ttl_exceeded").unwrap(), 5);

    // 10.0.2.1 is the router's own address inside a routed prefix.
    let local = udp_socket(&lab.router, "10.0.2.1:9999").unwrap();
    send_udp(&lab.a, "10.0.2.1:9999".parse().unwrap(), 64, "local", 5).unwrap();
    assert_eq!(receive(&local, 5, WAIT).len(), 5);
    assert_eq!(fwd.counter("pass_local").unwrap(), 5);
}

#[test]
fn next_hop_macs_are_resolved_by_the_kernel_before_any_traffic() {
    let lab = Lab::new().unwrap();
    // No static MAC, no neighbour entry, kernel forwarding off, no traffic:
    // the daemon has the kernel resolve the gateways (managed neighbour
    // entries) and picks the MACs up from its neighbour table.
    let routes = format!(
        "{ROUTE_TO_C}\n[[routes]]\nprefix = \"fd00:2::/64\"\nvia = \"fd00:2::2\"\ndev = \"r1\"\n"
    );
    let fwd = Forwarder::start(&lab.router, &lab.config("pass", &routes)).unwrap();
    let c0 = mac_str(lab.c.mac("c0").unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list: serde_json::Value =
            serde_json::from_str(&fwd.cli_ok(&["route", "list", "--json"]).unwrap()).unwrap();
        let macs: Vec<_> = list
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["via"] != "connected" && r["via"] != "kernel")
            .map(|r| r["mac"].clone())
            .collect();
        if macs.len() == 2 && macs.iter().all(|m| m == &serde_json::json!(c0)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "gateways not resolved: {list}\n{}",
            fwd.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let sink = udp_socket(&lab.c, "10.0.2.2:9999").unwrap();
    send_udp(
        &lab.a,
        "10.0.2.2:9999".parse().unwrap(),
        64,
        "learned",
        COUNT,
    )
    .unwrap();
    assert_eq!(receive(&sink, COUNT, WAIT).len(), COUNT);
    assert_eq!(fwd.counter("pass_no_neighbour").unwrap(), 0);
    assert!(fwd.counter("forwarded").unwrap() >= COUNT as u64);
}

#[test]
fn bad_configs_exit_non_zero_and_leave_nothing_attached() {
    let lab = Lab::new().unwrap();
    // A bridge has an Ethernet address but no native XDP.
    lab.router
        .ip(&["link", "add", "rbr0", "type", "bridge"])
        .unwrap();
    lab.router.ip(&["link", "set", "rbr0", "up"]).unwrap();
    let cases = [
        // Caught while validating the file.
        (
            lab.config(
                "pass",
                "[[routes]]\nprefix = \"10.0.2.1/24\"\nvia = \"10.0.2.2\"\ndev = \"r1\"\n",
            ),
            "host bits set",
        ),
        (lab.config("sometimes", ""), "sometimes"),
        // Caught against the namespace's interfaces.
        (
            lab.config("pass", "").replace("\"r1\"", "\"nosuch0\""),
            "interfaces[1].name: interface \"nosuch0\" does not exist",
        ),
        (
            lab.config(
                "pass",
                "[[routes]]\nprefix = \"10.0.9.0/24\"\nvia = \"10.0.2.2\"\ndev = \"nosuch0\"\n",
            ),
            "routes[0] (10.0.9.0/24): dev",
        ),
        // An egress the program is not attached to: redirects there would
        // fail while counted as forwarded.
        (
            lab.config(
                "pass",
                "[[routes]]\nprefix = \"10.0.9.0/24\"\nvia = \"10.0.2.2\"\ndev = \"lo\"\n",
            ),
            "routes[0] (10.0.9.0/24): dev: \"lo\" has no XDP program of this instance",
        ),
        (
            lab.config(
                "pass",
                "[[nodes]]\nname = \"n1\"\naddress = \"10.0.2.2\"\ndev = \"lo\"\n",
            ),
            "nodes (n1): dev: \"lo\" has no XDP program of this instance",
        ),
        (
            lab.config("pass", "").replace("\"r1\"", "\"lo\""),
            "interfaces[1].name: \"lo\" has no Ethernet address",
        ),
        // Caught by the kernel after r0 was attached: native XDP on a
        // bridge is refused, and r0 must be detached again.
        (
            lab.config("pass", "").replace("\"r1\"", "\"rbr0\""),
            "attaching XDP to rbr0 in native mode",
        ),
    ];
    for (config, needle) in cases {
        let mut fwd = Forwarder::spawn(&lab.router, &config).unwrap();
        let status = fwd.wait_exit(Duration::from_secs(20)).unwrap();
        let log = fwd.log();
        assert!(
            matches!(status, Some(s) if !s.success()),
            "expected a non-zero exit for {needle:?}, got {status:?}: {log}"
        );
        assert!(log.contains(needle), "expected {needle:?} in {log}");
        assert!(
            !lab.router.has_xdp("r0").unwrap(),
            "r0 left attached after: {needle}"
        );
        assert!(
            !lab.router.has_xdp("r1").unwrap(),
            "r1 left attached after: {needle}"
        );
        assert!(!fwd.has_pins(), "pins left after: {needle}");
    }
}

#[test]
fn cli_errors_name_the_problem() {
    let lab = Lab::new().unwrap();
    let fwd = Forwarder::start(&lab.router, &lab.config("pass", "")).unwrap();
    let routes_before = fwd.cli_ok(&["route", "list", "--json"]).unwrap();
    let cases: [(&[&str], &str); 7] = [
        (
            &[
                "route",
                "add",
                "10.0.9.0/24",
                "--via",
                "10.0.2.2",
                "--dev",
                "lo",
            ],
            "dev: \"lo\" has no XDP program of this instance",
        ),
        (
            &["node", "add", "n9", "10.0.2.9", "--dev", "lo"],
            "dev: \"lo\" has no XDP program of this instance",
        ),
        (
            &[
                "route",
                "add",
                "10.0.2.0/33",
                "--via",
                "10.0.2.2",
                "--dev",
                "r1",
            ],
            "\"33\"",
        ),
        (
            &[
                "route",
                "add",
                "10.0.2.0/24",
                "--via",
                "fd00::1",
                "--dev",
                "r1",
            ],
            "same address family",
        ),
        (
            &[
                "route",
                "add",
                "10.0.2.0/24",
                "--via",
                "10.0.2.2",
                "--dev",
                "nosuch0",
            ],
            "interface \"nosuch0\" does not exist",
        ),
        (
            &[
                "route",
                "add",
                "10.0.2.0/24",
                "--via",
                "10.0.2.2",
                "--dev",
                "r1",
                "--mac",
                "zz",
            ],
            "mac: \"zz\"",
        ),
        (&["route", "del", "10.0.7.0/24"], "no route to 10.0.7.0/24"),
    ];
    for (args, needle) in cases {
        let out = fwd.cli(args).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            stderr.contains(needle),
            "{args:?}: expected {needle:?} in {stderr}"
        );
    }
    let out = std::process::Command::new(tests::binary())
        .args(["--instance", "pft-no-such-instance", "stats"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("no pop-forwarder instance \"pft-no-such-instance\"")
    );
    let out = std::process::Command::new(tests::binary())
        .args(["--instance", "../etc", "stats"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--instance: \"../etc\""));
    // Nothing above changed the tables (the connected subnets alone).
    assert_eq!(
        fwd.cli_ok(&["route", "list", "--json"]).unwrap(),
        routes_before
    );
}

#[test]
fn detach_from_another_process_stops_the_daemon_and_unpins() {
    let lab = Lab::new().unwrap();
    let mut fwd = Forwarder::start(&lab.router, &lab.config("pass", "")).unwrap();
    assert!(lab.router.has_xdp("r0").unwrap() && lab.router.has_xdp("r1").unwrap());
    let status: serde_json::Value =
        serde_json::from_str(&fwd.cli_ok(&["status", "--json"]).unwrap()).unwrap();
    assert_eq!(status["running"], true);
    assert_eq!(status["interfaces"].as_array().unwrap().len(), 2);

    let out = fwd.cli_ok(&["detach"]).unwrap();
    assert!(out.contains("detached and stopped"), "{out}");
    assert!(!lab.router.has_xdp("r0").unwrap() && !lab.router.has_xdp("r1").unwrap());
    assert!(!fwd.has_pins());
    let status = fwd.stop().unwrap();
    assert!(status.success(), "{status}");
}

/// The routes `route list --json` shows, by prefix: (dev, MAC).
fn route_devs(fwd: &Forwarder) -> HashMap<String, (String, Option<String>)> {
    let list: serde_json::Value =
        serde_json::from_str(&fwd.cli_ok(&["route", "list", "--json"]).unwrap()).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["prefix"].as_str().unwrap().to_owned(),
                (
                    r["dev"].as_str().unwrap().to_owned(),
                    r["mac"].as_str().map(str::to_owned),
                ),
            )
        })
        .collect()
}

/// Waits until the route to `prefix` has its MAC (its gateway's resolved).
fn until_resolved(fwd: &Forwarder, prefix: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while route_devs(fwd)[prefix].1.is_none() {
        assert!(Instant::now() < deadline, "{}", fwd.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Five datagrams from a reach c, forwarded by the program.
fn forwards_to_c(lab: &Lab, fwd: &Forwarder) {
    let sink = udp_socket(&lab.c, "10.0.2.2:9999").unwrap();
    let before = fwd.counter("forwarded").unwrap();
    send_udp(&lab.a, "10.0.2.2:9999".parse().unwrap(), 64, "again", 5).unwrap();
    assert_eq!(receive(&sink, 5, Duration::from_secs(3)).len(), 5);
    assert!(
        fwd.counter("forwarded").unwrap() >= before + 5,
        "{}",
        fwd.log()
    );
}

/// An attached interface deleted and made again under its name (a bond or
/// VLAN the network configuration re-creates): the running daemon attaches
/// the program to the new one (the old link went with the old interface)
/// and moves the next hops through the old one there: the config's route,
/// and one added with the CLI, whose static MAC stays. Before, the daemon
/// only warned, and until a restart the interface's packets went through
/// the kernel and the routes through it nowhere.
#[test]
fn a_running_daemon_attaches_to_an_interface_made_again_under_its_name() {
    let (lab, mut fwd) = routed_lab(&[]);
    fwd.cli_ok(&[
        "route",
        "add",
        "10.0.9.0/24",
        "--via",
        "10.0.2.3",
        "--dev",
        "r1",
        "--mac",
        "02:00:00:00:09:09",
    ])
    .unwrap();
    lab.router.ip(&["link", "del", "r1"]).unwrap();
    lab.wire(&lab.c, "c0", "r1", 2).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fwd.log().contains("the program is attached to it again") {
        assert!(Instant::now() < deadline, "{}", fwd.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        fwd.log().contains("interface r1 was re-created (ifindex "),
        "{}",
        fwd.log()
    );
    assert!(lab.router.has_xdp("r0").unwrap() && lab.router.has_xdp("r1").unwrap());
    let status: serde_json::Value =
        serde_json::from_str(&fwd.cli_ok(&["status", "--json"]).unwrap()).unwrap();
    assert!(
        status["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["xdp_attached"] == true),
        "{status}"
    );
    // Both next hops on the new r1, the static MAC kept; the gateway's
    // learned MAC (gone with the old interface) back once it is resolved.
    neighbour_c_v4(&lab);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let routes = route_devs(&fwd);
        let c_mac = mac_str(lab.c.mac("c0").unwrap());
        if routes["10.0.2.0/24"] == ("r1".to_owned(), Some(c_mac))
            && routes["10.0.9.0/24"] == ("r1".to_owned(), Some("02:00:00:00:09:09".to_owned()))
        {
            break;
        }
        assert!(Instant::now() < deadline, "{routes:?}\n{}", fwd.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    forwards_to_c(&lab, &fwd);
    // A restart adopts it all as it is now.
    assert!(fwd.stop().unwrap().success());
    fwd.run_again(&lab.router, &[]).unwrap();
    assert!(
        fwd.log().contains("r1: program") && fwd.log().contains("swapped in on the pinned link"),
        "{}",
        fwd.log()
    );
    assert!(lab.router.has_xdp("r1").unwrap());
}

/// The same with routes mirrored from the kernel: the kernel takes the
/// routes through the old interface with it, and the network
/// configuration adds them again through the new one, maybe before the
/// program is on it (then they were handed to the kernel): once it is,
/// the table is read again and they are the program's.
#[test]
fn a_mirrored_route_through_an_interface_made_again_is_forwarded_again() {
    let lab = Lab::new().unwrap();
    neighbour_c_v4(&lab);
    let config = format!("route_source = \"kernel\"\n{}", lab.config("pass", ""));
    let fwd = Forwarder::start(&lab.router, &config).unwrap();
    let add = || {
        lab.router
            .ip(&[
                "route",
                "add",
                "10.0.8.0/24",
                "via",
                "10.0.2.2",
                "dev",
                "r1",
            ])
            .unwrap()
    };
    let wait_for = |want: (&str, &str)| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let list: serde_json::Value =
                serde_json::from_str(&fwd.cli_ok(&["route", "list", "--json"]).unwrap()).unwrap();
            let found = list.as_array().unwrap().iter().find_map(|r| {
                (r["prefix"] == "10.0.8.0/24").then(|| {
                    (
                        r["via"].as_str().unwrap().to_owned(),
                        r["dev"].as_str().unwrap().to_owned(),
                    )
                })
            });
            if found.as_ref().map(|(v, d)| (v.as_str(), d.as_str())) == Some(want) {
                return;
            }
            assert!(Instant::now() < deadline, "{found:?}\n{}", fwd.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    add();
    wait_for(("10.0.2.2", "r1"));
    lab.router.ip(&["link", "del", "r1"]).unwrap();
    lab.wire(&lab.c, "c0", "r1", 2).unwrap();
    add();
    neighbour_c_v4(&lab);
    wait_for(("10.0.2.2", "r1"));
    assert!(lab.router.has_xdp("r1").unwrap(), "{}", fwd.log());
    // Once the gateway's MAC is in its next hop (a refresh after the
    // neighbour's notification), not before: until then the kernel's.
    until_resolved(&fwd, "10.0.8.0/24");
    // Forwarded by the program (c's kernel has no such address and drops
    // them: the router's count is the check).
    let before = fwd.counter("forwarded").unwrap();
    send_udp(&lab.a, "10.0.8.9:9999".parse().unwrap(), 64, "again", 5).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while fwd.counter("forwarded").unwrap() < before + 5 {
        assert!(Instant::now() < deadline, "{}", fwd.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An interface made again under its name with someone else's XDP
/// program already on it (made under another name, the program put on,
/// then renamed): the daemon does not take it over; it says why, once,
/// however often the interfaces change, and attaches once that program
/// has gone.
#[test]
fn an_interface_made_again_with_another_program_on_it_is_left_alone() {
    let (lab, fwd) = routed_lab(&[]);
    lab.router.ip(&["link", "del", "r1"]).unwrap();
    lab.wire(&lab.c, "c0", "r1new", 2).unwrap();
    let other = lab
        .router
        .enter(|| pop_forwarder::bench::Sink::attach("r1new"))
        .unwrap()
        .unwrap();
    lab.router.ip(&["link", "set", "r1new", "down"]).unwrap();
    lab.router
        .ip(&["link", "set", "r1new", "name", "r1"])
        .unwrap();
    lab.router.ip(&["link", "set", "r1", "up"]).unwrap();
    let refused = "could not be attached to it (it has an XDP program already";
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fwd.log().contains(refused) {
        assert!(Instant::now() < deadline, "{}", fwd.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // More changes of the interfaces, each a refresh that tries again.
    for mtu in ["1400", "1500"] {
        lab.router.ip(&["link", "set", "r1", "mtu", mtu]).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(fwd.log().matches(refused).count(), 1, "{}", fwd.log());
    assert!(!fwd.log().contains("the program is attached to it again"));
    // The other program goes (its link dropped): the daemon attaches.
    drop(other);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fwd.log().contains("the program is attached to it again") {
        assert!(Instant::now() < deadline, "{}", fwd.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    neighbour_c_v4(&lab);
    until_resolved(&fwd, "10.0.2.0/24");
    forwards_to_c(&lab, &fwd);
}

/// The same while the daemon is stopped: the pinned link to the old
/// interface is severed, and the restart attaches afresh. Swapping the
/// program on that link failed, and the restart with it, before.
#[test]
fn a_restart_attaches_to_an_interface_made_again_under_its_name() {
    let (lab, mut fwd) = routed_lab(&[]);
    assert!(fwd.stop().unwrap().success());
    lab.router.ip(&["link", "del", "r1"]).unwrap();
    lab.wire(&lab.c, "c0", "r1", 2).unwrap();
    assert!(!lab.router.has_xdp("r1").unwrap());
    fwd.run_again(&lab.router, &[]).unwrap();
    assert!(
        fwd.log()
            .contains("r1: the pinned link's interface is gone (deleted, or re-created under this name): attaching the program afresh"),
        "{}",
        fwd.log()
    );
    assert!(lab.router.has_xdp("r0").unwrap() && lab.router.has_xdp("r1").unwrap());
    // Forwarded through it by the program again, once the gateway's MAC
    // (gone with the old interface) is back.
    neighbour_c_v4(&lab);
    until_resolved(&fwd, "10.0.2.0/24");
    forwards_to_c(&lab, &fwd);
}

/// A pin named as a link that holds something else (here one of the
/// instance's own maps, pinned a second time) stops nothing: `detach`
/// detaches every interface and removes every pin, the stray one too. It
/// failed on it before (BPF_LINK_DETACH: EINVAL), with the links read
/// after it still attached.
#[test]
fn detach_gets_past_a_map_pinned_under_a_link_name() {
    let lab = Lab::new().unwrap();
    let mut fwd = Forwarder::start(&lab.router, &lab.config("pass", "")).unwrap();
    let dir = std::path::PathBuf::from(format!("/sys/fs/bpf/pop-forwarder/{}", fwd.instance));
    let map = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            !p.file_name()
                .unwrap()
                .as_encoded_bytes()
                .starts_with(b"link_")
        })
        .expect("a pinned map");
    aya::maps::MapData::from_pin(&map)
        .unwrap()
        .pin(dir.join("link_0planted"))
        .unwrap();

    let out = fwd.cli_ok(&["detach"]).unwrap();
    assert!(out.contains("detached and stopped"), "{out}");
    assert!(!lab.router.has_xdp("r0").unwrap() && !lab.router.has_xdp("r1").unwrap());
    assert!(!fwd.has_pins());
    let status = fwd.stop().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn malformed_frames_on_the_wire_are_dropped_counted_and_logged() {
    let (lab, fwd) = routed_lab(&["--bpf-log-level", "debug"]);
    let capture = Capture::new(&lab.c, "c0").unwrap();
    let wire = Capture::new(&lab.a, "a0").unwrap();
    let eth = Eth {
        src: lab.a.mac("a0").unwrap(),
        dst: lab.router.mac("r0").unwrap(),
    };
    let good = udp_v4(
        eth,
        "10.0.1.2".parse().unwrap(),
        "10.0.2.2".parse().unwrap(),
        64,
        b"malformed-test",
    );
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x43;
    // A length past the frame, under a header checksum that is right.
    let mut bad_length = good.clone();
    bad_length[16..18].copy_from_slice(&1400u16.to_be_bytes());
    tests::packets::fix_ipv4_checksum(&mut bad_length);
    wire.send(&bad_ihl).unwrap();
    wire.send(&bad_length).unwrap();

    assert!(
        capture
            .frames_containing(b"malformed-test", 1, Duration::from_millis(800))
            .is_empty(),
        "a malformed frame was forwarded"
    );
    assert_eq!(fwd.counter("drop_bad_header").unwrap(), 1);
    assert_eq!(fwd.counter("drop_bad_length").unwrap(), 1);
    let deadline = Instant::now() + WAIT;
    while !fwd
        .log()
        .contains("dropped malformed packet (drop_bad_length)")
    {
        assert!(
            Instant::now() < deadline,
            "no aya-log record in: {}",
            fwd.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        fwd.log()
            .contains("dropped malformed packet (drop_bad_header)")
    );
    // The same frame, well formed, goes through.
    wire.send(&good).unwrap();
    assert_eq!(
        capture.frames_containing(b"malformed-test", 1, WAIT).len(),
        1
    );
}

/// On the wire, through the daemon (which records each attached
/// interface's MAC): a frame for another host's MAC and one from a
/// loopback source reach nobody, and are counted; the same frame addressed
/// right goes through.
#[test]
fn frames_for_other_hosts_and_martian_sources_stop_at_the_forwarder() {
    let (lab, fwd) = routed_lab(&[]);
    let capture = Capture::new(&lab.c, "c0").unwrap();
    let wire = Capture::new(&lab.a, "a0").unwrap();
    let eth = Eth {
        src: lab.a.mac("a0").unwrap(),
        dst: lab.router.mac("r0").unwrap(),
    };
    let frame = |eth: Eth, src: &str| {
        udp_v4(
            eth,
            src.parse().unwrap(),
            "10.0.2.2".parse().unwrap(),
            64,
            b"not-for-us-test",
        )
    };
    let other_host = Eth {
        dst: [0x02, 0, 0, 0, 0, 0x99],
        ..eth
    };
    wire.send(&frame(other_host, "10.0.1.2")).unwrap();
    wire.send(&frame(eth, "127.0.0.1")).unwrap();
    assert!(
        capture
            .frames_containing(b"not-for-us-test", 1, Duration::from_millis(800))
            .is_empty(),
        "a frame for another host, or from a martian source, was forwarded"
    );
    assert_eq!(fwd.counter("pass_not_for_us").unwrap(), 1);
    assert_eq!(fwd.counter("drop_martian_source").unwrap(), 1);
    wire.send(&frame(eth, "10.0.1.2")).unwrap();
    assert_eq!(
        capture.frames_containing(b"not-for-us-test", 1, WAIT).len(),
        1
    );
}

#[test]
fn generate_sends_line_rate_traffic_through_the_forwarder() {
    let (lab, fwd) = routed_lab(&[]);
    let sink = lab
        .c
        .enter(|| pop_forwarder::bench::Sink::attach("c0"))
        .unwrap()
        .unwrap();
    let r0 = mac_str(lab.router.mac("r0").unwrap());
    // `pop-forwarder generate` from a0 to `dst`, with `more` arguments.
    let generate = |dst: &str, more: &[&str]| {
        lab.a
            .command(tests::binary().to_str().unwrap())
            .args([
                "generate",
                "--dev",
                "a0",
                "--dst-mac",
                &r0,
                "--src",
                "10.0.1.2",
                "--dst",
                dst,
            ])
            .args(more)
            .output()
            .unwrap()
    };
    let out = generate(
        "10.0.2.100",
        &["--dst-count", "16", "--src-ports", "8", "--seconds", "1"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let sent: u64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("sent ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no total in {text}"));
    assert!(sent >= 65536, "{text}");
    std::thread::sleep(Duration::from_millis(200));
    let delivered = sink.count().unwrap().packets;
    let forwarded = fwd.counter("forwarded").unwrap();
    // Kernel forwarding is off, so what reached c0's sink (which also
    // counts the odd neighbour-discovery frame) was forwarded by XDP; veth
    // rings may drop some of a line-rate burst.
    assert!(
        forwarded >= sent / 2 && forwarded <= sent && delivered >= forwarded / 10 * 9,
        "sent {sent}, forwarded {forwarded}, delivered {delivered}"
    );

    let bad = generate("fd00:2::2", &[]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr)
            .contains("--dst: fd00:2::2 is not of the address family")
    );
    let bad = generate("10.0.2.2", &["--size", "20"]);
    assert!(
        String::from_utf8_lossy(&bad.stderr)
            .contains("--size: 20 bytes is not between 64 and 1514")
    );
}

#[test]
fn sighup_reload_applies_route_changes_and_refuses_bad_configs_whole() {
    let lab = Lab::new().unwrap();
    neighbour_c_v4(&lab);
    let v6_route = "[[routes]]\nprefix = \"fd00:2::/64\"\nvia = \"fd00:2::2\"\ndev = \"r1\"\n";
    let fwd = Forwarder::start(
        &lab.router,
        &lab.config("drop", &format!("{ROUTE_TO_C}\n{v6_route}")),
    )
    .unwrap();
    let mut fwd = fwd;
    let prefixes = |fwd: &Forwarder| -> Vec<String> {
        let list: serde_json::Value =
            serde_json::from_str(&fwd.cli_ok(&["route", "list", "--json"]).unwrap()).unwrap();
        // The routes of the config and the CLI: not the connected
        // subnets, nor lo's, which is the kernel's.
        list.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["via"] != "connected" && r["via"] != "kernel")
            .map(|r| r["prefix"].as_str().unwrap().to_owned())
            .collect()
    };
    let wait_for = |fwd: &Forwarder, want: &[&str]| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while prefixes(fwd) != want {
            assert!(
                Instant::now() < deadline,
                "routes {:?}, want {want:?}\n{}",
                prefixes(fwd),
                fwd.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // A CLI-added route is not in the file: reload removes it.
    fwd.cli_ok(&[
        "route",
        "add",
        "10.0.9.0/24",
        "--via",
        "10.0.2.2",
        "--dev",
        "r1",
    ])
    .unwrap();
    assert_eq!(
        prefixes(&fwd),
        ["10.0.2.0/24", "10.0.9.0/24", "fd00:2::/64"]
    );

    // The file now routes 10.0.3.0/24 instead of 10.0.2.0/24 and keeps IPv6.
    let new_route = ROUTE_TO_C.replace("10.0.2.0/24", "10.0.3.0/24");
    std::fs::write(
        &fwd.config,
        lab.config("drop", &format!("{new_route}\n{v6_route}")),
    )
    .unwrap();
    // `reload` answers with what the daemon changed: 10.0.3.0/24 added,
    // 10.0.2.0/24 now the connected subnet of r1 (no longer via c), the
    // CLI's 10.0.9.0/24 deleted.
    let out = fwd.cli_ok(&["reload"]).unwrap();
    assert!(
        out.contains("1 routes added, 1 changed, 1 deleted"),
        "{out}"
    );
    assert_eq!(prefixes(&fwd), ["10.0.3.0/24", "fd00:2::/64"]);
    assert!(
        lab.router.has_xdp("r0").unwrap() && lab.router.has_xdp("r1").unwrap(),
        "still attached"
    );
    lab.c
        .ip(&["addr", "add", "10.0.9.2/32", "dev", "c0"])
        .unwrap();
    let sink = udp_socket(&lab.c, "10.0.9.2:9999").unwrap();
    send_udp(&lab.a, "10.0.9.2:9999".parse().unwrap(), 64, "gone", 5).unwrap();
    assert!(
        receive(&sink, 1, Duration::from_millis(800)).is_empty(),
        "10.0.9.0/24 was removed"
    );

    // Bad files are refused whole: the tables stay as they are.
    for (config, why) in [
        (
            lab.config("drop", &new_route.replace("10.0.3.0/24", "10.0.3.1/24")),
            "host bits set",
        ),
        (
            lab.config("drop", &new_route)
                .replace("\"r1\"\n\n", "\"r9\"\n\n"),
            "interfaces changed",
        ),
        (
            lab.config(
                "drop",
                &new_route.replace("dev = \"r1\"", "dev = \"nosuch0\""),
            ),
            "does not exist",
        ),
    ] {
        std::fs::write(&fwd.config, config).unwrap();
        // Refused: the command fails with the daemon's reason.
        let err = fwd.cli_err(&["reload"]).unwrap();
        assert!(
            err.contains(why) && err.contains("refused, tables unchanged"),
            "{err}"
        );
        assert_eq!(prefixes(&fwd), ["10.0.3.0/24", "fd00:2::/64"]);
    }
    // SIGHUP does the same, answering in the log.
    std::fs::write(&fwd.config, lab.config("drop", &new_route)).unwrap();
    let pid = fwd.pid();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    // fd00:2::/64 leaves the file: the connected subnet of r1 takes it.
    wait_for_log(
        &fwd,
        "0 routes added, 1 changed, 0 deleted",
        Duration::from_secs(10),
    );
    wait_for(&fwd, &["10.0.3.0/24"]);
    let status = fwd.stop().unwrap();
    assert!(status.success());
}

/// Waits until the daemon's log contains `needle`, failing the test with
/// the log after `timeout`.
fn wait_for_log(fwd: &Forwarder, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !fwd.log().contains(needle) {
        assert!(Instant::now() < deadline, "no {needle:?} in {}", fwd.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `pop-forwarder lookup` for UDP from 10.0.1.2:`src_port` to
/// 192.0.2.10:9999, as JSON.
fn lookup_vip_flow(fwd: &Forwarder, src_port: u16) -> serde_json::Value {
    let port = src_port.to_string();
    #[rustfmt::skip]
    let out = fwd.cli_ok(&[
        "lookup", "--src", "10.0.1.2", "--dst", "192.0.2.10", "--protocol", "udp",
        "--src-port", &port, "--dst-port", "9999", "--json",
    ]);
    serde_json::from_str(&out.unwrap()).unwrap()
}

/// Two cache-node namespaces holding VIP 192.0.2.10 (cache-1 on r2,
/// cache-2 on r3), and the steering config for them (r2 and r3 attached
/// too): a UDP any-port VIP on both, each node's table given `extra1` /
/// `extra2` lines.
fn two_cache_nodes(lab: &Lab, extra1: &str, extra2: &str) -> (tests::Netns, tests::Netns, String) {
    let n1 = lab.cache_node("r2", 5, "192.0.2.10").unwrap();
    let n2 = lab.cache_node("r3", 6, "192.0.2.10").unwrap();
    // The program sends only out of interfaces it is attached to: r2 and
    // r3 too.
    let steering = format!(
        r#"
[[interfaces]]
name = "r2"

[[interfaces]]
name = "r3"

[[nodes]]
name = "cache-1"
address = "10.0.5.11"
dev = "r2"
{extra1}

[[nodes]]
name = "cache-2"
address = "10.0.6.11"
dev = "r3"
{extra2}

[[vips]]
address = "192.0.2.10"
protocol = "udp"
nodes = ["cache-1", "cache-2"]
"#
    );
    (n1, n2, steering)
}

/// `two_cache_nodes` with cache-2 cut from the config: cache-1 alone
/// serves the VIP (cache-2's namespace is there for a node added later).
/// Returns that config and the one with both.
fn one_cache_node(lab: &Lab) -> (tests::Netns, tests::Netns, String, String) {
    let (n1, n2, steering) = two_cache_nodes(lab, "", "");
    let one_node = steering
        .replace(
            "[[nodes]]\nname = \"cache-2\"\naddress = \"10.0.6.11\"\ndev = \"r3\"\n",
            "",
        )
        .replace("[\"cache-1\", \"cache-2\"]", "[\"cache-1\"]");
    assert!(!one_node.contains("cache-2"), "{one_node}");
    (n1, n2, one_node, steering)
}

#[test]
fn vip_flows_spread_over_cache_nodes_and_each_stays_on_one() {
    let lab = Lab::new().unwrap();
    let (n1, n2, steering) = two_cache_nodes(&lab, "", "weight = 3");
    let fwd = Forwarder::start(&lab.router, &lab.config("drop", &steering)).unwrap();
    fwd.wait_for_node_macs();
    let sockets = vip_sinks(&n1, &n2);

    // 128 flows (one source port each), PER_FLOW datagrams each; 256 in
    // all fit the nodes' default socket buffers, read after sending.
    const FLOWS: usize = 128;
    const PER_FLOW: usize = 2;
    for f in 0..FLOWS {
        send_udp(
            &lab.a,
            "192.0.2.10:9999".parse().unwrap(),
            64,
            &format!("flow{f:03}"),
            PER_FLOW,
        )
        .unwrap();
    }
    let mut by_flow: std::collections::HashMap<
        String,
        (std::collections::HashSet<usize>, u16, usize),
    > = Default::default();
    let deadline = Instant::now() + WAIT;
    let mut total = 0;
    let mut buf = [0u8; 256];
    while total < FLOWS * PER_FLOW && Instant::now() < deadline {
        for (i, s) in sockets.iter().enumerate() {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                let tag = String::from_utf8_lossy(&buf[..n])
                    .split(' ')
                    .next()
                    .unwrap()
                    .to_owned();
                let e = by_flow
                    .entry(tag)
                    .or_insert_with(|| (Default::default(), from.port(), 0));
                e.0.insert(i);
                e.2 += 1;
                total += 1;
            }
        }
    }
    assert_eq!(total, FLOWS * PER_FLOW, "datagrams received\n{}", fwd.log());
    assert_eq!(by_flow.len(), FLOWS);
    for (tag, (nodes, _, count)) in &by_flow {
        assert_eq!(nodes.len(), 1, "{tag} reached {nodes:?}");
        assert_eq!(*count, PER_FLOW, "{tag}");
    }
    let on_first = by_flow.values().filter(|(n, _, _)| n.contains(&0)).count();
    // Weights 1 and 3: cache-1's share is binomial(128, 1/4), 32 +- 4.9;
    // within 5 sigma, and well short of an even split.
    assert!(
        (8..=56).contains(&on_first),
        "{on_first} of {FLOWS} flows on cache-1"
    );
    assert!(fwd.counter("steered").unwrap() >= (FLOWS * PER_FLOW) as u64);

    // `lookup` agrees with where each flow went.
    for (tag, (nodes, port, _)) in by_flow.iter().take(8) {
        let v = lookup_vip_flow(&fwd, *port);
        let out = v.to_string();
        let want = if nodes.contains(&0) {
            "cache-1"
        } else {
            "cache-2"
        };
        assert_eq!(v["existing_flow"], want, "{tag}: {out}");
        assert_eq!(v["new_flow"], want, "{tag}: {out}");
    }
    let vips: serde_json::Value =
        serde_json::from_str(&fwd.cli_ok(&["vip", "list", "--json"]).unwrap()).unwrap();
    assert_eq!(vips[0]["packets"], (FLOWS * PER_FLOW) as u64);
}

#[test]
fn a_node_failing_its_health_check_loses_its_flows_and_comes_back() {
    let lab = Lab::new().unwrap();
    let health = "health = { kind = \"tcp\", port = 8080, interval_ms = 100, timeout_ms = 50, rise = 2, fall = 3 }";
    let (n1, n2, steering) = two_cache_nodes(&lab, health, health);
    // Both nodes answer on 8080 (the kernel completes the handshakes).
    let listen = |ns: &tests::Netns, addr: &str| {
        let addr = addr.to_owned();
        ns.enter(move || std::net::TcpListener::bind(addr))
            .unwrap()
            .unwrap()
    };
    let l1 = listen(&n1, "10.0.5.11:8080");
    let _l2 = listen(&n2, "10.0.6.11:8080");
    let mut fwd = Forwarder::start(&lab.router, &lab.config("drop", &steering)).unwrap();
    fwd.wait_for_node_macs();
    let new_flow_node = |fwd: &Forwarder, port: u16| -> String {
        lookup_vip_flow(fwd, port)["new_flow"]
            .as_str()
            .unwrap_or("none")
            .to_owned()
    };
    let nodes_for = |fwd: &Forwarder, ports: std::ops::Range<u16>| {
        ports
            .map(|p| new_flow_node(fwd, p))
            .collect::<std::collections::HashSet<String>>()
    };
    assert_eq!(
        nodes_for(&fwd, 40000..40032).len(),
        2,
        "both nodes take new flows"
    );

    // cache-1 stops answering: after 3 failed checks (about 0.3 s) it takes
    // no new flow, and its node entry is gone, so its flows move too.
    drop(l1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while nodes_for(&fwd, 40000..40032) != std::collections::HashSet::from(["cache-2".to_owned()]) {
        assert!(
            Instant::now() < deadline,
            "cache-1 still takes flows\n{}",
            fwd.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for_log(&fwd, "cache node cache-1 is down", WAIT);
    let nodes: serde_json::Value =
        serde_json::from_str(&fwd.cli_ok(&["node", "list", "--json"]).unwrap()).unwrap();
    assert_eq!(nodes[0]["healthy"], false);
    assert_eq!(nodes[0]["health_changes"], 1);
    // Traffic reaches cache-2 only.
    let s2 = udp_socket(&n2, "192.0.2.10:9999").unwrap();
    for f in 0..8 {
        send_udp(
            &lab.a,
            "192.0.2.10:9999".parse().unwrap(),
            64,
            &format!("after{f}"),
            1,
        )
        .unwrap();
    }
    assert_eq!(receive(&s2, 8, WAIT).len(), 8);

    // An upgrade that migrates the tables (another map layout) keeps
    // cache-1 out from the first packet: its failing health comes from the
    // state file, not from `fall` failed checks of the new daemon.
    fwd.stop().unwrap();
    tests::set_pinned_layout_version(&fwd.instance, 999).unwrap();
    fwd.run_again(&lab.router, &[]).unwrap();
    let log = fwd.log();
    assert!(
        log.contains("migrated the pinned data plane (map layout version 999"),
        "{log}"
    );
    assert!(
        log.contains("1 cache nodes failing their health check when the tables were migrated"),
        "{log}"
    );
    let nodes: serde_json::Value =
        serde_json::from_str(&fwd.cli_ok(&["node", "list", "--json"]).unwrap()).unwrap();
    assert_eq!(nodes[0]["healthy"], false, "{nodes}");
    assert_eq!(nodes[0]["health_changes"], 1, "{nodes}");
    assert_eq!(
        nodes_for(&fwd, 40000..40032),
        std::collections::HashSet::from(["cache-2".to_owned()])
    );

    // It answers again: back after 2 good checks.
    let _l1 = listen(&n1, "10.0.5.11:8080");
    let deadline = Instant::now() + Duration::from_secs(5);
    while nodes_for(&fwd, 40000..40032).len() != 2 {
        assert!(
            Instant::now() < deadline,
            "cache-1 did not come back\n{}",
            fwd.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for_log(&fwd, "cache node cache-1 is up", WAIT);
}

#[test]
fn http_health_checks_follow_the_status_code() {
    use std::{
        io::{Read as _, Write as _},
        sync::{
            Arc,
            atomic::{AtomicBool, AtomicU16, Ordering},
        },
    };
    let lab = Lab::new().unwrap();
    let n1 = lab.cache_node("r2", 5, "192.0.2.10").unwrap();
    let steering = r#"
[[interfaces]]
name = "r2"

[[nodes]]
name = "cache-1"
address = "10.0.5.11"
dev = "r2"
health = { kind = "http", port = 8081, path = "/healthz", interval_ms = 100, timeout_ms = 80, rise = 2, fall = 2 }

[[vips]]
address = "192.0.2.10"
protocol = "udp"
nodes = ["cache-1"]
"#;
    // A tiny HTTP server in the node: answers every request with `status`
    // and records the request line.
    let status = Arc::new(AtomicU16::new(200));
    let stop = Arc::new(AtomicBool::new(false));
    let listener = n1
        .enter(|| std::net::TcpListener::bind("10.0.5.11:8081"))
        .unwrap()
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    let request_line = Arc::new(std::sync::Mutex::new(String::new()));
    let server = {
        let (status, stop, request_line) = (status.clone(), stop.clone(), request_line.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        conn.set_read_timeout(Some(Duration::from_millis(200)))
                            .unwrap();
                        let mut buf = [0u8; 512];
                        let n = conn.read(&mut buf).unwrap_or(0);
                        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                        *request_line.lock().unwrap() =
                            text.lines().next().unwrap_or_default().to_owned();
                        let code = status.load(Ordering::Relaxed);
                        let _ = write!(conn, "HTTP/1.0 {code} X\r\nContent-Length: 0\r\n\r\n");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        })
    };
    let fwd = Forwarder::start(&lab.router, &lab.config("drop", steering)).unwrap();
    let wait_log = |needle: &str| wait_for_log(&fwd, needle, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(400));
    assert!(
        !fwd.log().contains("is down"),
        "a 200 node went down: {}",
        fwd.log()
    );
    assert_eq!(*request_line.lock().unwrap(), "GET /healthz HTTP/1.0");
    status.store(503, Ordering::Relaxed);
    wait_log(
        "cache node cache-1 is down (2 checks in a row failed, the last: GET /healthz answered 503)",
    );
    let out = lookup_vip_flow(&fwd, 1).to_string();
    assert!(
        out.contains("\"new_flow\":null"),
        "a down node takes no new flow: {out}"
    );
    status.store(204, Ordering::Relaxed);
    wait_log("cache node cache-1 is up");
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
}

#[test]
fn ip_in_ip_packets_arrive_with_correct_outer_headers() {
    let lab = Lab::new().unwrap();
    neighbour_c_v4(&lab);
    // The cache node is c (10.0.2.2), reached through the route to c's
    // subnet; c has no IPIP device, so the packets are captured on c0.
    let steering = r#"
[[nodes]]
name = "cache-c"
address = "10.0.2.2"
delivery = "ipip"

[[vips]]
address = "192.0.2.40"
protocol = "udp"
port = 9999
nodes = ["cache-c"]
"#;
    // A top-level key, so before any table.
    let config = format!(
        "encap_source_v4 = \"10.0.1.1\"\n{}",
        lab.config("drop", &format!("{ROUTE_TO_C}{steering}"))
    );
    let fwd = Forwarder::start(&lab.router, &config).unwrap();
    let capture = Capture::new(&lab.c, "c0").unwrap();
    send_udp(&lab.a, "192.0.2.40:9999".parse().unwrap(), 64, "wrapped", 5).unwrap();
    let frames = capture.frames_containing(b"wrapped", 5, WAIT);
    assert_eq!(frames.len(), 5, "{}", fwd.log());
    let (r1, c0) = (lab.router.mac("r1").unwrap(), lab.c.mac("c0").unwrap());
    for f in &frames {
        assert_eq!(f[0..6], c0);
        assert_eq!(f[6..12], r1);
        assert_eq!(f[12..14], [0x08, 0x00]);
        let outer = &f[14..34];
        assert_eq!(outer[0], 0x45);
        assert_eq!(outer[9], 4, "protocol IPIP");
        assert_eq!(outer[12..16], [10, 0, 1, 1], "outer source");
        assert_eq!(outer[16..20], [10, 0, 2, 2], "outer destination: the node");
        assert!(checksum::ipv4_header_valid(outer), "outer checksum");
        let inner = &f[34..];
        assert_eq!(
            u16::from_be_bytes([outer[2], outer[3]]) as usize,
            20 + inner
                .len()
                .min(u16::from_be_bytes([inner[2], inner[3]]) as usize)
        );
        assert_eq!(inner[16..20], [192, 0, 2, 40], "inner destination: the VIP");
        assert_eq!(inner[8], 64, "inner TTL untouched");
        assert!(checksum::ipv4_header_valid(&inner[..20]));
    }
    assert!(fwd.counter("steered").unwrap() >= 5);

    // A full-size datagram (1500 bytes of IP, don't-fragment: Linux's
    // default path-MTU discovery) is 1520 once wrapped. The client gets
    // ICMP fragmentation needed from the VIP, and its kernel learns the
    // path MTU of 1480.
    let answers = Capture::new(&lab.a, "a0").unwrap();
    let client = udp_socket(&lab.a, "0.0.0.0:0").unwrap();
    let mut datagram = vec![b'.'; 1472];
    datagram[..6].copy_from_slice(b"toobig");
    client.send_to(&datagram, "192.0.2.40:9999").unwrap();
    // The answer leaves by XDP_TX. A veth kicks its peer's NAPI after
    // XDP_TX only if the peer runs XDP itself (veth_xdp_flush), so here
    // the answer waits in a0's ring until a frame for a0 arrives through
    // that NAPI: one the router's kernel sends from r0 with TSO off
    // (veth_skb_is_eligible_for_gro). NICs transmit XDP_TX frames at once.
    std::thread::sleep(Duration::from_millis(200));
    lab.router
        .run("ethtool", &["-K", "r0", "tx", "off", "tso", "off"])
        .unwrap();
    udp_socket(&lab.router, "0.0.0.0:0")
        .unwrap()
        .send_to(b"kick", "10.0.1.2:9")
        .unwrap();
    let icmp = answers.frames_containing(b"toobig", 1, WAIT);
    assert_eq!(icmp.len(), 1, "no ICMP answer\n{}", fwd.log());
    let f = &icmp[0];
    assert_eq!(f[6..12], lab.router.mac("r0").unwrap(), "from the router");
    assert_eq!(f[14 + 9], 1, "ICMP");
    assert_eq!(f[14 + 12..14 + 16], [192, 0, 2, 40], "from the VIP");
    assert_eq!(f[14 + 16..14 + 20], [10, 0, 1, 2], "to the client");
    assert!(checksum::ipv4_header_valid(&f[14..34]));
    assert_eq!(f[34..36], [3, 4], "fragmentation needed");
    assert_eq!(u16::from_be_bytes([f[40], f[41]]), 1480, "next-hop MTU");
    assert_eq!(
        checksum::fold(checksum::sum(&f[34..])),
        0xffff,
        "ICMP checksum"
    );
    assert_eq!(fwd.counter("icmp_too_big").unwrap(), 1);
    let deadline = Instant::now() + WAIT;
    loop {
        let route = lab.a.ip(&["route", "get", "192.0.2.40"]).unwrap();
        if route.contains("mtu 1480") {
            break;
        }
        assert!(Instant::now() < deadline, "client's route: {route}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_drained_node_keeps_its_flows_and_takes_no_new_ones() {
    let lab = Lab::new().unwrap();
    let (n1, n2, steering) = two_cache_nodes(&lab, "", "");
    // UDP entries idle for 4 s are gone: the drain's end is seen quickly.
    let config = format!(
        "flow_idle_timeout_udp = 4\n{}",
        lab.config("drop", &steering)
    );
    let fwd = Forwarder::start(&lab.router, &config).unwrap();
    fwd.wait_for_node_macs();
    let sinks = vip_sinks(&n1, &n2);
    let round = |senders: &[std::net::UdpSocket], tag: &str| landing(&fwd, &sinks, senders, tag);
    let old = senders(&lab, 32);
    // Two datagrams a flow: a UDP flow is remembered from its second.
    let first = round(&old, "first");
    let before = round(&old, "old");
    assert_eq!(first, before);
    assert!(before.contains(&0) && before.contains(&1), "{before:?}");

    let out = fwd.cli_ok(&["node", "drain", "cache-1"]).unwrap();
    assert!(
        out.contains("cache node cache-1 weight 0;") && out.contains("VIPs 0 added, 1 changed"),
        "{out}"
    );
    // Existing flows keep their node, cache-1 included.
    assert_eq!(round(&old, "again"), before);
    // New flows all go to cache-2.
    assert!(round(&senders(&lab, 32), "new").iter().all(|&n| n == 1));
    let nodes: serde_json::Value =
        serde_json::from_str(&fwd.cli_ok(&["node", "list", "--json"]).unwrap()).unwrap();
    assert_eq!(nodes[0]["weight"], 0);
    // Its flows are live: draining, not drained. Once they have been idle
    // past the timeout, `node list` says it is drained.
    let on_first = before.iter().filter(|&&n| n == 0).count() as u64;
    assert_eq!(nodes[0]["flows"], on_first, "{nodes}");
    assert_eq!(nodes[0]["drained"], false);
    assert!(
        fwd.cli_ok(&["node", "list"])
            .unwrap()
            .contains("0 (draining)")
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let nodes: serde_json::Value =
            serde_json::from_str(&fwd.cli_ok(&["node", "list", "--json"]).unwrap()).unwrap();
        if nodes[0]["drained"] == true {
            assert_eq!(nodes[0]["flows"], 0);
            break;
        }
        assert!(Instant::now() < deadline, "never drained: {nodes}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        fwd.cli_ok(&["node", "list"])
            .unwrap()
            .contains("0 (drained)")
    );

    // Bad commands are refused with the reason.
    let err = fwd.cli(&["node", "drain", "cache-9"]).unwrap();
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("no cache node is named \"cache-9\""));
    let err = fwd.cli(&["node", "weight", "cache-1", "5000"]).unwrap();
    assert!(String::from_utf8_lossy(&err.stderr).contains("weight: 5000 is not from 0"));
    fwd.cli_ok(&["node", "weight", "cache-1", "1"]).unwrap();
    assert!(
        round(&senders(&lab, 32), "back").contains(&0),
        "cache-1 takes new flows again"
    );
}

/// A socket on the VIP 192.0.2.10:9999 in each node, polled in turn: a
/// short timeout, so an idle node does not hold up reading the other.
fn vip_sinks(n1: &tests::Netns, n2: &tests::Netns) -> [std::net::UdpSocket; 2] {
    let sinks = [
        udp_socket(n1, "192.0.2.10:9999").unwrap(),
        udp_socket(n2, "192.0.2.10:9999").unwrap(),
    ];
    for s in &sinks {
        s.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
    }
    sinks
}

/// `n` UDP sockets in namespace a: `n` flows to the VIP.
fn senders(lab: &Lab, n: usize) -> Vec<std::net::UdpSocket> {
    // Ports of their own, never one an earlier sender had: a new sender on
    // a reused port would be an old flow, kept on its old node by the
    // connection table.
    static NEXT_PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(20000);
    (0..n)
        .map(|_| {
            let port = NEXT_PORT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            udp_socket(&lab.a, &format!("0.0.0.0:{port}")).unwrap()
        })
        .collect()
}

/// Sends one datagram on each of `senders` to the VIP 192.0.2.10:9999 and
/// returns, per sender, the index of the sink (cache node) that got it.
fn landing(
    fwd: &Forwarder,
    sinks: &[std::net::UdpSocket],
    senders: &[std::net::UdpSocket],
    tag: &str,
) -> Vec<usize> {
    let vip: SocketAddr = "192.0.2.10:9999".parse().unwrap();
    for (i, s) in senders.iter().enumerate() {
        s.send_to(format!("{tag}{i:02}").as_bytes(), vip).unwrap();
    }
    let mut landed = vec![usize::MAX; senders.len()];
    let deadline = Instant::now() + WAIT;
    let mut buf = [0u8; 64];
    while landed.contains(&usize::MAX) && Instant::now() < deadline {
        for (node, sink) in sinks.iter().enumerate() {
            if let Ok(n) = sink.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if let Some(i) = text.strip_prefix(tag).and_then(|i| i.parse::<usize>().ok()) {
                    landed[i] = node;
                }
            }
        }
    }
    assert!(
        !landed.contains(&usize::MAX),
        "{tag}: lost datagrams: {landed:?}\n{}",
        fwd.log()
    );
    landed
}

fn json_of(fwd: &Forwarder, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&fwd.cli_ok(args).unwrap()).unwrap()
}

/// The names (and slots) of the running instance's nodes, and the pools of
/// its VIPs.
type Pool = (String, u64, Vec<String>);

fn steering_now(fwd: &Forwarder) -> (Vec<(String, u64)>, Vec<Pool>) {
    let nodes = json_of(fwd, &["node", "list", "--json"]);
    let vips = json_of(fwd, &["vip", "list", "--json"]);
    (
        nodes
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["name"].as_str().unwrap().to_owned(),
                    n["slot"].as_u64().unwrap(),
                )
            })
            .collect(),
        vips.as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["address"].as_str().unwrap().to_owned(),
                    v["port"].as_u64().unwrap(),
                    v["nodes"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|n| n.as_str().unwrap().to_owned())
                        .collect(),
                )
            })
            .collect(),
    )
}

/// A daemon that stops between a change's map writes and its state file's
/// leaves the maps holding a VIP and a node the file does not name. The
/// next daemon takes them out: the VIP's traffic is not steered by a table
/// nobody keeps, and the node's slot is not handed to the next new node
/// while flows still name it. (Simulated: the change is made, the daemon
/// stopped, and the two taken out of the state file.)
#[test]
fn a_restart_takes_out_what_the_maps_hold_and_the_state_file_does_not_name() {
    let lab = Lab::new().unwrap();
    let (n1, n2, one_node, _) = one_cache_node(&lab);
    let mut fwd = Forwarder::start(&lab.router, &lab.config("drop", &one_node)).unwrap();
    fwd.wait_for_node_macs();
    let sinks = vip_sinks(&n1, &n2);
    fwd.cli_ok(&["node", "add", "cache-2", "10.0.6.11", "--dev", "r3"])
        .unwrap();
    fwd.wait_for_node_macs();
    fwd.cli_ok(&[
        "vip",
        "add",
        "192.0.2.10",
        "udp",
        "9999",
        "--nodes",
        "cache-2",
    ])
    .unwrap();
    assert!(
        landing(&fwd, &sinks, &senders(&lab, 8), "port")
            .iter()
            .all(|&n| n == 1)
    );

    assert!(fwd.stop().unwrap().success());
    let path = fwd.run_dir.join(format!("{}.json", fwd.instance));
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let steering = &mut state["steering"];
    steering["nodes"]
        .as_array_mut()
        .unwrap()
        .retain(|n| n["name"] != "cache-2");
    steering["vips"]
        .as_array_mut()
        .unwrap()
        .retain(|v| v["port"] != 9999);
    std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();

    fwd.run_again(&lab.router, &[]).unwrap();
    assert!(
        fwd.log()
            .contains("hold 1 VIPs and 1 cache node slots the state file does not name"),
        "{}",
        fwd.log()
    );
    // Port 9999 is the any-port VIP's now: cache-1's.
    assert!(
        landing(&fwd, &sinks, &senders(&lab, 8), "any")
            .iter()
            .all(|&n| n == 0)
    );
    // cache-2 added again takes a fresh slot, not the one flows named.
    fwd.cli_ok(&["node", "add", "cache-2", "10.0.6.11", "--dev", "r3"])
        .unwrap();
    assert_eq!(
        steering_now(&fwd).0,
        vec![("cache-1".into(), 0), ("cache-2".into(), 2)]
    );
}

/// The other way round: a change that took a node and a VIP out of the
/// maps, its daemon stopped before the state file said so, and the config
/// still wanting both. The next daemon writes them again. (Simulated: the
/// node's slot and the VIP's entry taken out of the stopped instance's
/// maps.)
#[test]
fn a_restart_writes_again_what_the_state_file_names_and_the_maps_lack() {
    use pop_forwarder_common::{map_names as names, steering::CacheNode};
    let lab = Lab::new().unwrap();
    let (n1, n2, steering) = two_cache_nodes(&lab, "", "");
    let mut fwd = Forwarder::start(&lab.router, &lab.config("drop", &steering)).unwrap();
    fwd.wait_for_node_macs();
    let sinks = vip_sinks(&n1, &n2);
    let both = landing(&fwd, &sinks, &senders(&lab, 32), "before");
    assert!(both.contains(&0) && both.contains(&1), "{both:?}");

    assert!(fwd.stop().unwrap().success());
    let pins = format!("/sys/fs/bpf/pop-forwarder/{}", fwd.instance);
    let mut nodes: aya::maps::Array<_, CacheNode> =
        aya::maps::Array::try_from(aya::maps::Map::Array(
            aya::maps::MapData::from_pin(format!("{pins}/{}", names::CACHE_NODES)).unwrap(),
        ))
        .unwrap();
    let free = CacheNode {
        ifindex: 0,
        flags: 0,
        dst_mac: [0; 6],
        src_mac: [0; 6],
        addr: [0; 16],
        family: 0,
        mtu: 0,
    };
    nodes.set(1, free, 0).unwrap();
    let mut vips: aya::maps::HashMap<
        _,
        pop_forwarder_common::steering::VipKey,
        pop_forwarder_common::steering::VipInfo,
    > = aya::maps::HashMap::try_from(aya::maps::Map::HashMap(
        aya::maps::MapData::from_pin(format!("{pins}/{}", names::VIPS)).unwrap(),
    ))
    .unwrap();
    let keys: Vec<_> = vips.keys().map(Result::unwrap).collect();
    assert_eq!(keys.len(), 1);
    vips.remove(&keys[0]).unwrap();
    drop((nodes, vips));

    fwd.run_again(&lab.router, &[]).unwrap();
    assert!(
        fwd.log()
            .contains("names 1 VIPs and 1 healthy cache nodes the pinned tables lack"),
        "{}",
        fwd.log()
    );
    let both = landing(&fwd, &sinks, &senders(&lab, 32), "after");
    assert!(both.contains(&0) && both.contains(&1), "{both:?}");
}

#[test]
fn nodes_and_vips_added_and_removed_on_a_running_instance() {
    let lab = Lab::new().unwrap();
    let (n1, n2, one_node, steering) = one_cache_node(&lab);
    let fwd = Forwarder::start(&lab.router, &lab.config("drop", &one_node)).unwrap();
    fwd.wait_for_node_macs();
    let sinks = vip_sinks(&n1, &n2);
    let round = |senders: &[std::net::UdpSocket], tag: &str| landing(&fwd, &sinks, senders, tag);
    let old = senders(&lab, 32);
    // Two datagrams a flow: a UDP flow is remembered from its second.
    assert!(round(&old, "one").iter().all(|&n| n == 0));
    assert!(round(&old, "two").iter().all(|&n| n == 0));

    // A second node, then a pool of two: old flows stay, new ones spread.
    let out = fwd
        .cli_ok(&["node", "add", "cache-2", "10.0.6.11", "--dev", "r3"])
        .unwrap();
    assert!(
        out.contains("cache node cache-2 (10.0.6.11) added"),
        "{out}"
    );
    fwd.wait_for_node_macs();
    let out = fwd
        .cli_ok(&[
            "vip",
            "add",
            "192.0.2.10",
            "udp",
            "--nodes",
            "cache-1,cache-2",
        ])
        .unwrap();
    assert!(out.contains("pool set to [cache-1, cache-2]"), "{out}");
    assert_eq!(
        steering_now(&fwd),
        (
            vec![("cache-1".into(), 0), ("cache-2".into(), 1)],
            vec![(
                "192.0.2.10".into(),
                0,
                vec!["cache-1".into(), "cache-2".into()]
            )]
        )
    );
    assert!(round(&old, "stay").iter().all(|&n| n == 0));
    let new = round(&senders(&lab, 32), "spread");
    assert!(new.contains(&0) && new.contains(&1), "{new:?}");

    // A port VIP beside the any-port one, and gone again.
    fwd.cli_ok(&[
        "vip",
        "add",
        "192.0.2.10",
        "udp",
        "9999",
        "--nodes",
        "cache-2",
    ])
    .unwrap();
    assert!(round(&senders(&lab, 16), "port").iter().all(|&n| n == 1));
    let out = fwd
        .cli_ok(&["vip", "del", "192.0.2.10", "udp", "9999"])
        .unwrap();
    assert!(
        out.contains("VIP 192.0.2.10 udp port 9999 removed"),
        "{out}"
    );

    // Removing cache-1 moves its flows, old ones included, to cache-2.
    let out = fwd.cli_ok(&["node", "del", "cache-1"]).unwrap();
    assert!(
        out.contains("cache node cache-1 removed (it was in 1 VIP pools)"),
        "{out}"
    );
    assert!(round(&old, "moved").iter().all(|&n| n == 1));
    // Added back, it takes a fresh slot, not the one its old flows remember.
    fwd.cli_ok(&["node", "add", "cache-1", "10.0.5.11", "--dev", "r2"])
        .unwrap();
    assert_eq!(
        steering_now(&fwd).0,
        vec![("cache-2".into(), 1), ("cache-1".into(), 2)]
    );

    // Bad commands are refused with the reason and change nothing.
    let before = steering_now(&fwd);
    for (args, why) in [
        (
            &["node", "add", "cache-2", "10.0.6.12", "--dev", "r3"][..],
            "nodes: \"cache-2\" is listed twice",
        ),
        (
            &["node", "add", "cache-3", "10.0.7.11", "--dev", "nosuch0"],
            "nosuch0",
        ),
        (&["node", "add", "cache-3", "10.0.7.11"], "--dev"),
        (
            &["node", "add", "cache-3", "10.0.7.11", "--ipip"],
            "needs encap_source_v4",
        ),
        (
            &[
                "vip",
                "add",
                "192.0.2.11",
                "tcp",
                "80",
                "--nodes",
                "cache-9",
            ],
            "no node is named \"cache-9\"",
        ),
        (
            &["vip", "del", "192.0.2.11", "tcp", "80"],
            "192.0.2.11 tcp port 80 is no VIP",
        ),
        (
            &["node", "del", "cache-9"],
            "no cache node is named \"cache-9\"",
        ),
    ] {
        let out = fwd.cli(args).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(why),
            "{args:?}: {stderr}"
        );
    }
    assert_eq!(steering_now(&fwd), before);

    // The last VIP gone: its packets are routed (no route here: dropped).
    fwd.cli_ok(&["vip", "del", "192.0.2.10", "udp"]).unwrap();
    let steered = fwd.counter("steered").unwrap();
    let gone = senders(&lab, 4);
    for s in &gone {
        s.send_to(b"gone", "192.0.2.10:9999").unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while fwd.counter("drop_route_miss").unwrap() < 4 {
        assert!(
            Instant::now() < deadline,
            "VIP traffic not routed\n{}",
            fwd.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(fwd.counter("steered").unwrap(), steered);

    // A reload makes the file the truth again: both nodes, one VIP.
    std::fs::write(&fwd.config, lab.config("drop", &steering)).unwrap();
    fwd.cli_ok(&["reload"]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fwd
        .log()
        .lines()
        .any(|l| l.contains("reloaded") && l.contains("VIPs 1 added"))
    {
        assert!(Instant::now() < deadline, "no reload\n{}", fwd.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        steering_now(&fwd),
        (
            vec![("cache-2".into(), 1), ("cache-1".into(), 2)],
            vec![(
                "192.0.2.10".into(),
                0,
                vec!["cache-1".into(), "cache-2".into()]
            )]
        )
    );
    let back = round(&senders(&lab, 32), "reloaded");
    assert!(back.contains(&0) && back.contains(&1), "{back:?}");
}

/// Sends COUNT datagrams from `from` to a socket at `sink_addr` in `to`,
/// checks that all of them arrive, and returns how many the program
/// counted as forwarded meanwhile.
fn all_arrive(
    fwd: &Forwarder,
    from: &tests::Netns,
    to: &tests::Netns,
    sink_addr: &str,
    tag: &str,
) -> u64 {
    let before = fwd.counter("forwarded").unwrap();
    let sink = udp_socket(to, sink_addr).unwrap();
    send_udp(from, sink_addr.parse().unwrap(), 64, tag, COUNT).unwrap();
    assert_eq!(
        receive(&sink, COUNT, WAIT).len(),
        COUNT,
        "{tag}: datagrams to {sink_addr}\n{}",
        fwd.log()
    );
    fwd.counter("forwarded").unwrap() - before
}

/// Gives the router permanent neighbour entries for a (10.0.1.2,
/// fd00:1::2), as ARP and ND would.
fn neighbour_a(lab: &Lab) {
    let a_mac = mac_str(lab.a.mac("a0").unwrap());
    for addr in ["10.0.1.2", "fd00:1::2"] {
        #[rustfmt::skip]
        lab.router
            .ip(&["neigh", "replace", addr, "lladdr", &a_mac, "dev", "r0", "nud", "permanent"])
            .unwrap();
    }
}

#[test]
fn connected_subnets_go_to_their_hosts_never_to_the_default_gateway() {
    let lab = Lab::new().unwrap();
    neighbour_c_v4(&lab);
    // a's addresses resolved on the router, as ARP and ND would.
    neighbour_a(&lab);
    // Default routes to c only: no route names a's subnet.
    let routes = "[[routes]]\nprefix = \"0.0.0.0/0\"\nvia = \"10.0.2.2\"\ndev = \"r1\"\n\n\
                  [[routes]]\nprefix = \"::/0\"\nvia = \"fd00:2::2\"\ndev = \"r1\"\n";
    let fwd = Forwarder::start(&lab.router, &lab.config("pass", routes)).unwrap();
    let list: serde_json::Value =
        serde_json::from_str(&fwd.cli_ok(&["route", "list", "--json"]).unwrap()).unwrap();
    for (prefix, dev) in [
        ("10.0.1.0/24", "r0"),
        ("fd00:1::/64", "r0"),
        ("10.0.2.0/24", "r1"),
        ("fd00:2::/64", "r1"),
    ] {
        assert!(
            list.as_array()
                .unwrap()
                .iter()
                .any(|r| r["prefix"] == prefix && r["via"] == "connected" && r["dev"] == dev),
            "no connected route to {prefix} on {dev}: {list}"
        );
    }
    // Kernel forwarding is off: what arrives in a was forwarded by XDP,
    // straight to a, not to c by the default route.
    for (sink_addr, tag) in [("10.0.1.2:9999", "v4"), ("[fd00:1::2]:9999", "v6")] {
        let forwarded = all_arrive(&fwd, &lab.c, &lab.a, sink_addr, tag);
        assert!(forwarded >= COUNT as u64, "{tag}");
    }
    // A host the router has not resolved: to the kernel (which would
    // resolve it), counted; never to the default gateway.
    let capture = Capture::new(&lab.c, "c0").unwrap();
    let before = fwd.counter("pass_no_neighbour").unwrap();
    send_udp(
        &lab.c,
        "10.0.1.3:9999".parse().unwrap(),
        64,
        "unresolved",
        COUNT,
    )
    .unwrap();
    let deadline = Instant::now() + WAIT;
    while fwd.counter("pass_no_neighbour").unwrap() - before < COUNT as u64 {
        assert!(Instant::now() < deadline, "{}", fwd.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        capture
            .frames_containing(b"unresolved", 1, Duration::from_millis(300))
            .iter()
            .all(|f| f[0..6] != lab.c.mac("c0").unwrap()),
        "a datagram for a's subnet came back to c"
    );
}

#[test]
fn kernel_fib_lookup_forwards_by_the_kernels_routes_and_neighbours() {
    let lab = Lab::new().unwrap();
    neighbour_c_v4(&lab);
    let c_mac = mac_str(lab.c.mac("c0").unwrap());
    #[rustfmt::skip]
    lab.router
        .ip(&["neigh", "replace", "fd00:2::2", "lladdr", &c_mac, "dev", "r1", "nud", "permanent"])
        .unwrap();
    // bpf_fib_lookup answers only where the kernel would forward.
    lab.router.sysctl("net.ipv4.ip_forward", "1").unwrap();
    lab.router
        .sysctl("net.ipv6.conf.all.forwarding", "1")
        .unwrap();
    // The program's tables send c's subnets back to a; the kernel's FIB
    // (its connected routes) to c. Only a FIB lookup delivers to c.
    neighbour_a(&lab);
    let wrong = "[[routes]]\nprefix = \"10.0.2.0/24\"\nvia = \"10.0.1.2\"\ndev = \"r0\"\n\n\
                 [[routes]]\nprefix = \"fd00:2::/64\"\nvia = \"fd00:1::2\"\ndev = \"r0\"\n";
    let config = format!(
        "route_lookup = \"kernel-fib\"\n{}",
        lab.config("pass", wrong)
    );
    let fwd = Forwarder::start(&lab.router, &config).unwrap();
    for (sink_addr, tag) in [("10.0.2.2:9999", "fib-v4"), ("[fd00:2::2]:9999", "fib-v6")] {
        let forwarded = all_arrive(&fwd, &lab.a, &lab.c, sink_addr, tag);
        // Forwarded by XDP, not by the kernel (whose forwarding is on).
        assert_eq!(forwarded, COUNT as u64, "{tag}");
    }
    // A host the kernel has not resolved: to the kernel, which resolves it.
    let before = fwd.counter("pass_no_neighbour").unwrap();
    send_udp(
        &lab.a,
        "10.0.2.7:9999".parse().unwrap(),
        64,
        "fib-unresolved",
        1,
    )
    .unwrap();
    let deadline = Instant::now() + WAIT;
    while fwd.counter("pass_no_neighbour").unwrap() == before {
        assert!(Instant::now() < deadline, "{}", fwd.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends five datagrams from a to c's 10.0.2.2:7000; how many `sink`
/// received.
fn five_through_to_c(lab: &Lab, sink: &std::net::UdpSocket, tag: &str) -> usize {
    send_udp(&lab.a, "10.0.2.2:7000".parse().unwrap(), 64, tag, 5).unwrap();
    receive(sink, 5, Duration::from_millis(700)).len()
}

/// One entry of `deny list --json`, with its counters.
fn deny_entry(fwd: &Forwarder, direction: &str, prefix: &str) -> Option<serde_json::Value> {
    let list: serde_json::Value =
        serde_json::from_str(&fwd.cli_ok(&["deny", "list", "--json"]).unwrap()).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|e| e["direction"] == direction && e["prefix"] == prefix)
        .cloned()
}

/// A /24 a short entry answers for whole is answered from the program's
/// per-CPU cache; every change of the list retires what it cached: an
/// entry added inside the /24 counts its own packets, and once the short
/// entry is gone the /24's packets are forwarded, not dropped from the
/// cache.
#[test]
fn the_deny_cache_follows_every_change_of_the_list() {
    let lab = Lab::new().unwrap();
    neighbour_c_v4(&lab);
    let config = format!(
        "{}\n[[deny]]\nprefix = \"10.0.0.0/14\"\ndirection = \"destination\"\n",
        lab.config("pass", ROUTE_TO_C)
    );
    let fwd = Forwarder::start(&lab.router, &config).unwrap();
    let sink = udp_socket(&lab.c, "10.0.2.2:7000").unwrap();
    let through = |tag: &str| five_through_to_c(&lab, &sink, tag);
    let packets = |prefix: &str| -> u64 {
        deny_entry(&fwd, "destination", prefix).map_or(0, |e| e["packets"].as_u64().unwrap())
    };
    // Twice: the second round is answered from the cache.
    assert_eq!(through("short"), 0);
    assert_eq!(through("short, cached"), 0);
    assert_eq!(packets("10.0.0.0/14"), 10);
    // A longer entry inside the /24: its packets are its own.
    fwd.cli_ok(&["deny", "add", "destination", "10.0.2.2/32"])
        .unwrap();
    assert_eq!(through("host"), 0);
    assert_eq!(through("host again"), 0);
    assert_eq!((packets("10.0.0.0/14"), packets("10.0.2.2/32")), (10, 10));
    // Gone again: the short entry answers, and is cached, again.
    fwd.cli_ok(&["deny", "del", "destination", "10.0.2.2/32"])
        .unwrap();
    assert_eq!(through("short again"), 0);
    assert_eq!(through("short again, cached"), 0);
    assert_eq!(packets("10.0.0.0/14"), 20);
    // No entry: forwarded, whatever the cache held.
    fwd.cli_ok(&["deny", "del", "destination", "10.0.0.0/14"])
        .unwrap();
    assert_eq!(through("allowed"), 5);
    assert_eq!(fwd.counter("drop_denied").unwrap(), 30);
}

#[test]
fn the_deny_list_comes_from_the_file_the_cli_and_reload() {
    let lab = Lab::new().unwrap();
    neighbour_c_v4(&lab);
    // 1,000 entries in a deny_file (benchmarking networks, not this lab's),
    // one in the config that stops this lab's traffic.
    let file = tests::TempPath::new("deny");
    let file = &file.0;
    let mut lines: String = (0..1000)
        .map(|i| format!("source 198.18.{}.{}/32\n", i / 256, i % 256))
        .collect();
    lines.push_str("# a comment\ndestination 2001:db8::/32\n");
    std::fs::write(file, &lines).unwrap();
    let config = format!(
        "deny_file = \"{}\"\n{}\n[[deny]]\nprefix = \"10.0.2.2/32\"\ndirection = \"destination\"\n",
        file.display(),
        lab.config("pass", ROUTE_TO_C)
    );
    let fwd = Forwarder::start(&lab.router, &config).unwrap();
    let sink = udp_socket(&lab.c, "10.0.2.2:7000").unwrap();
    let through = |tag: &str| five_through_to_c(&lab, &sink, tag);
    let entry = deny_entry;
    assert_eq!(through("denied"), 0);
    assert_eq!(
        entry(&fwd, "destination", "10.0.2.2/32").unwrap()["packets"],
        5
    );
    assert!(fwd.counter("drop_denied").unwrap() >= 5);
    let all: serde_json::Value =
        serde_json::from_str(&fwd.cli_ok(&["deny", "list", "--json"]).unwrap()).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 1002);

    // The CLI takes the entry out, and puts another in.
    let out = fwd
        .cli_ok(&["deny", "del", "destination", "10.0.2.2/32"])
        .unwrap();
    assert!(
        out.contains("removed deny-list entry destination 10.0.2.2/32"),
        "{out}"
    );
    assert_eq!(through("allowed"), 5);
    fwd.cli_ok(&["deny", "add", "source", "10.0.1.0/24"])
        .unwrap();
    assert_eq!(through("by source"), 0);
    let e = fwd
        .cli_err(&["deny", "add", "source", "10.0.1.0/24"])
        .unwrap();
    assert!(e.contains("already"), "{e}");
    let e = fwd
        .cli_err(&["deny", "add", "source", "10.0.1.1/24"])
        .unwrap();
    assert!(e.contains("host bits"), "{e}");

    // Reload: the file is the truth again (the CLI's entry goes, the
    // config's comes back); a bad line refuses the reload whole.
    fwd.cli_ok(&["reload"]).unwrap();
    assert!(entry(&fwd, "source", "10.0.1.0/24").is_none());
    assert_eq!(through("denied again"), 0);
    std::fs::write(file, format!("{lines}sideways 10.9.0.0/16\n")).unwrap();
    let e = fwd.cli_err(&["reload"]).unwrap();
    assert!(e.contains(":1003") && e.contains("sideways"), "{e}");
    assert!(entry(&fwd, "destination", "10.0.2.2/32").is_some());
}

#[test]
fn frames_the_kernel_drops_after_a_redirect_are_counted() {
    let (lab, fwd) = routed_lab(&[]);
    let sink = udp_socket(&lab.c, "10.0.2.2:7000").unwrap();
    let r1 = |fwd: &Forwarder| -> (u64, u64) {
        let stats: serde_json::Value =
            serde_json::from_str(&fwd.cli_ok(&["stats", "--json"]).unwrap()).unwrap();
        stats["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == "r1")
            .map(|i| {
                (
                    i["xmit_drops"].as_u64().unwrap(),
                    i["redirect_errors"].as_u64().unwrap(),
                )
            })
            .unwrap_or((0, 0))
    };
    // c0 without GRO: its veth has no NAPI to take XDP frames, so the
    // devmap transmit out of r1 drops them, after the program counted them
    // forwarded.
    lab.c.run("ethtool", &["-K", "c0", "gro", "off"]).unwrap();
    let before = r1(&fwd);
    let forwarded = fwd.counter("forwarded").unwrap();
    send_udp(&lab.a, "10.0.2.2:7000".parse().unwrap(), 64, "lost", COUNT).unwrap();
    assert_eq!(receive(&sink, COUNT, Duration::from_millis(700)).len(), 0);
    assert!(fwd.counter("forwarded").unwrap() >= forwarded + COUNT as u64);
    // This kernel refuses the redirect itself (the veth does not offer
    // XDP transmit without NAPI): a redirect error, for this program's id.
    let after = r1(&fwd);
    let lost = |(xmit, redirect): (u64, u64)| xmit + redirect;
    assert!(
        lost(after) >= lost(before) + COUNT as u64,
        "(xmit drops, redirect errors) {before:?} -> {after:?}\n{}",
        fwd.log()
    );
    // GRO back: the frames arrive, and the counts stop growing.
    lab.c.run("ethtool", &["-K", "c0", "gro", "on"]).unwrap();
    send_udp(&lab.a, "10.0.2.2:7000".parse().unwrap(), 64, "kept", COUNT).unwrap();
    assert_eq!(receive(&sink, COUNT, WAIT).len(), COUNT);
    assert_eq!(r1(&fwd), after);
    // The tracepoint links are pinned with the instance, and go with it.
    assert!(
        std::path::Path::new(&format!(
            "/sys/fs/bpf/pop-forwarder/{}/link_tp_xdp_devmap_xmit",
            fwd.instance
        ))
        .exists()
    );
}
