//! Running pop-forwarder as an operator does: the Prometheus endpoint
//! (scraped over HTTP, parsed by the Prometheus project's Python client
//! parser), `stats --watch`, systemd's notification protocol, the unit
//! file and shell completions.

use std::{io::Write as _, time::Duration};

use tests::{Forwarder, Lab, ROUTE_TO_C, http, neighbour_c_v4, receive, send_udp, udp_socket};

/// The samples of a text exposition, as the Prometheus Python client's
/// parser (Debian's python3-prometheus-client) reads them: (family type,
/// sample name, labels, value). A malformed exposition fails the parser.
fn parse_exposition(text: &str) -> Vec<(String, String, serde_json::Value, f64)> {
    const PARSER: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append([family.type, s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new("/usr/bin/python3")
        .args(["-c", PARSER])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (with python3-prometheus-client)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the exposition does not parse: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<(String, String, serde_json::Value, f64)> =
        serde_json::from_slice(&out.stdout).unwrap();
    rows
}

fn sample(
    rows: &[(String, String, serde_json::Value, f64)],
    name: &str,
    label: (&str, &str),
) -> Option<f64> {
    rows.iter()
        .find(|(_, n, labels, _)| n == name && labels[label.0] == label.1)
        .map(|r| r.3)
}

#[test]
fn metrics_are_served_parsed_and_agree_with_stats() {
    let lab = Lab::new().unwrap();
    neighbour_c_v4(&lab);
    let config = format!(
        "metrics_listen = \"9464\"\n{}",
        lab.config("pass", ROUTE_TO_C)
    );
    let fwd = Forwarder::start(&lab.router, &config).unwrap();
    // Logged once the main loop runs, a moment after the daemon records
    // itself running (the port is bound before either).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !fwd.log().contains("metrics: http://127.0.0.1:9464/metrics") {
        assert!(std::time::Instant::now() < deadline, "{}", fwd.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let sink = udp_socket(&lab.c, "10.0.2.2:7000").unwrap();
    send_udp(&lab.a, "10.0.2.2:7000".parse().unwrap(), 64, "m", 20).unwrap();
    assert_eq!(receive(&sink, 20, Duration::from_secs(3)).len(), 20);

    let response = http(
        &lab.router,
        9464,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    let rows = parse_exposition(body);
    // Every sample is pop-forwarder's, every counter ends in _total.
    for (kind, name, _, _) in &rows {
        assert!(name.starts_with("pop_forwarder_"), "{name}");
        if kind == "counter" {
            assert!(name.ends_with("_total"), "{name}");
        }
    }
    let stats: serde_json::Value =
        serde_json::from_str(&fwd.cli_ok(&["stats", "--json"]).unwrap()).unwrap();
    let forwarded = stats["counters"]["forwarded"].as_u64().unwrap();
    assert!(forwarded >= 20, "{stats}");
    assert_eq!(
        sample(
            &rows,
            "pop_forwarder_packets_total",
            ("outcome", "forwarded")
        ),
        Some(forwarded as f64),
        "the endpoint and `stats --json` disagree"
    );
    assert!(
        sample(
            &rows,
            "pop_forwarder_next_hop_packets_total",
            ("via", "10.0.2.2")
        )
        .is_some_and(|v| v >= 20.0)
    );
    assert!(
        sample(&rows, "pop_forwarder_next_hop_bytes_total", ("dev", "r1"))
            .is_some_and(|v| v >= 20.0 * 40.0)
    );
    // The configured route, the connected 10.0.1.0/24, lo's 127.0.0.0/8,
    // as `status` counts them.
    let status: serde_json::Value =
        serde_json::from_str(&fwd.cli_ok(&["status", "--json"]).unwrap()).unwrap();
    assert_eq!(
        sample(&rows, "pop_forwarder_routes", ("family", "ipv4")),
        status["routes_v4"].as_f64()
    );
    assert_eq!(
        sample(
            &rows,
            "pop_forwarder_interface_xdp_attached",
            ("interface", "r0")
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &rows,
            "pop_forwarder_table_capacity",
            ("table", "next_hops")
        ),
        Some(4096.0)
    );
    assert_eq!(
        sample(&rows, "pop_forwarder_errors_total", ("kind", "route_sync")),
        Some(0.0)
    );

    // Nothing but GET /metrics.
    let other = http(
        &lab.router,
        9464,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
    let post = http(
        &lab.router,
        9464,
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    let junk = http(&lab.router, 9464, "\x16\x03\x01 not http\r\n\r\n");
    assert!(
        junk.is_empty() || junk.starts_with("HTTP/1.1 400"),
        "{junk}"
    );

    // A second instance on the same port: a clear start-up error, and
    // nothing of it attached or pinned.
    let other = Forwarder::spawn(&lab.router, &config).unwrap();
    let mut other = other;
    let status = other.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(status.is_some_and(|s| !s.success()), "{}", other.log());
    assert!(
        other
            .log()
            .contains("metrics_listen: binding 127.0.0.1:9464"),
        "{}",
        other.log()
    );
    assert!(!other.has_pins());
}

#[test]
fn stats_watch_prints_the_rates_of_what_moved_each_second() {
    let lab = Lab::new().unwrap();
    neighbour_c_v4(&lab);
    let fwd = Forwarder::start(&lab.router, &lab.config("pass", ROUTE_TO_C)).unwrap();
    let _sink = udp_socket(&lab.c, "10.0.2.2:7000").unwrap();
    // 2,000 datagrams a second through the forwarder, for the watch's
    // three seconds and a little more.
    let stream = tests::Stream::start(
        &lab.a,
        "10.0.2.2:7000".parse().unwrap(),
        2000,
        Duration::from_secs(10),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = fwd.cli_ok(&["stats", "--watch", "--count", "3"]).unwrap();
    stream.finish().unwrap();
    let seconds: Vec<&str> = out.lines().filter(|l| !l.starts_with(' ')).collect();
    assert_eq!(seconds.len(), 3, "{out}");
    // Each second's forwarded rate is about 2,000 (the sender catches up
    // each millisecond; the watch's seconds are not exactly aligned).
    let forwarded: Vec<f64> = out
        .lines()
        .filter(|l| l.trim_start().starts_with("forwarded "))
        .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(forwarded.len(), 3, "{out}");
    for rate in forwarded {
        assert!((1500.0..2500.0).contains(&rate), "{rate}\n{out}");
    }
    assert!(out.contains("next hop 0 via 10.0.2.2 dev r1"), "{out}");
    // Nothing that did not move is listed.
    assert!(!out.contains("drop_truncated"), "{out}");
    let e = fwd.cli_err(&["stats", "--count", "3"]).unwrap();
    assert!(e.contains("--watch"), "{e}");
}

/// The repository's packaging folder.
fn packaging(file: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging")
        .join(file)
}

#[test]
fn the_systemd_unit_verifies_and_the_samples_are_valid() {
    // The unit, with the binary under test where the package puts it.
    let unit = std::fs::read_to_string(packaging("pop-forwarder@.service")).unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("WatchdogSec="));
    if std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let dir = std::env::temp_dir().join(tests::unique("unit"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pop-forwarder@lab.service");
        std::fs::write(
            &path,
            unit.replace("/usr/sbin/pop-forwarder", tests::binary().to_str().unwrap()),
        )
        .unwrap();
        let out = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "systemd-analyze verify: {stderr}"
        );
    } else {
        println!("systemd-analyze not installed: the unit file was not verified");
    }
    // The sample config validates; the sample BIRD config parses.
    let out = std::process::Command::new(tests::binary())
        .arg("check")
        .arg("--config")
        .arg(packaging("pop-forwarder.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tests::sh(
        "bird",
        &["-p", "-c", packaging("bird.conf").to_str().unwrap()],
    )
    .unwrap();
}

#[test]
fn shell_completions_cover_the_commands() {
    for shell in ["bash", "zsh", "fish"] {
        let out = std::process::Command::new(tests::binary())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success());
        let script = String::from_utf8_lossy(&out.stdout);
        for command in ["drain", "resume", "reload", "detach", "lookup"] {
            assert!(script.contains(command), "{shell}: no {command}");
        }
    }
}

#[test]
fn the_daemon_tells_systemd_it_is_ready_feeds_the_watchdog_and_says_it_stops() {
    let lab = Lab::new().unwrap();
    let dir = std::env::temp_dir().join(tests::unique("notify"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut fwd = Forwarder::start_with_env(
        &lab.router,
        &lab.config("pass", ""),
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            // A 200 ms watchdog: fed every 100 ms.
            ("WATCHDOG_USEC", "200000"),
        ],
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    let mut next = || {
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = next();
    assert!(first.contains("READY=1\n"), "{first}");
    assert!(first.contains("STATUS=forwarding on r0, r1"), "{first}");
    let watchdogs = (0..5).filter(|_| next() == "WATCHDOG=1\n").count();
    assert_eq!(watchdogs, 5);
    fwd.stop().unwrap();
    let mut stopping = false;
    while let Ok(n) = socket.recv(&mut buf) {
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(stopping, "no STOPPING=1\n{}", fwd.log());
}
