//! The demo lab (`cargo xtask demo`): three network namespaces, pop-forwarder
//! in the middle, real UDP traffic through it in both address families, live
//! counters every second, and a clean teardown (also on Ctrl-C).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tests::{Forwarder, Lab, udp_socket};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

const CONFIG_ROUTES: &str = r#"
[[routes]]
prefix = "10.0.2.0/24"
via = "10.0.2.2"
dev = "r1"

[[routes]]
prefix = "10.0.1.0/24"
via = "10.0.1.2"
dev = "r0"

[[routes]]
prefix = "fd00:2::/64"
via = "fd00:2::2"
dev = "r1"

[[routes]]
prefix = "fd00:1::/64"
via = "fd00:1::2"
dev = "r0"
"#;

fn main() -> Result<()> {
    let seconds: u64 = match std::env::args().nth(1) {
        None => 10,
        Some(s) => s
            .parse()
            .ok()
            .filter(|s| (1..=3600).contains(s))
            .context("usage: lab [SECONDS 1..3600]")?,
    };
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }

    println!("== lab: a (10.0.1.2, fd00:1::2) -- r0 [pop-forwarder] r1 -- c (10.0.2.2, fd00:2::2)");
    let lab = Lab::new()?;
    // The kernel handles what XDP hands it (first packets to an unresolved
    // neighbour, TTL expiry), as on a real router.
    lab.router.sysctl("net.ipv4.ip_forward", "1")?;
    lab.router.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    let fwd = Forwarder::start(&lab.router, &lab.config("pass", CONFIG_ROUTES))?;
    println!(
        "== forwarder instance {} attached to r0 and r1 (native XDP)",
        fwd.instance
    );
    print!("{}", fwd.cli_ok(&["status"])?);
    // Until a gateway's MAC is in its next hop, the program hands its
    // packets to the kernel, which resolves it (pass_no_neighbour): the
    // daemon has the kernel resolve every gateway at start. The traffic
    // starts once they are, so that the counters show forwarding.
    let started = Instant::now();
    let unresolved = loop {
        let routes: serde_json::Value =
            serde_json::from_str(&fwd.cli_ok(&["route", "list", "--json"])?)?;
        let unresolved: Vec<String> = routes
            .as_array()
            .context("route list")?
            .iter()
            .filter(|r| r["via"] != "kernel" && r["via"] != "connected" && r["mac"].is_null())
            .filter_map(|r| r["via"].as_str().map(str::to_owned))
            .collect();
        if unresolved.is_empty() || started.elapsed() > Duration::from_secs(10) {
            break unresolved;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if unresolved.is_empty() {
        println!(
            "== every gateway resolved {} ms after the start",
            started.elapsed().as_millis()
        );
    } else {
        println!(
            "== gateways not resolved after 10 s: {} (their packets go to the kernel)",
            unresolved.join(", ")
        );
    }

    let received = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for (bind, dst) in [
        ("10.0.2.2:9999", "10.0.2.2:9999"),
        ("[fd00:2::2]:9999", "[fd00:2::2]:9999"),
    ] {
        let sink = udp_socket(&lab.c, bind)?;
        let received = received.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !STOP.load(Ordering::Relaxed) {
                if sink.recv(&mut buf).is_ok() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
        let dst: SocketAddr = dst.parse()?;
        let sender = udp_socket(&lab.a, if dst.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
        let sent = sent.clone();
        threads.push(std::thread::spawn(move || {
            let payload = [0x5au8; 18]; // 64-byte Ethernet frames over IPv4
            while !STOP.load(Ordering::Relaxed) {
                if sender.send_to(&payload, dst).is_ok() {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    println!("== {seconds} s of UDP, IPv4 and IPv6, a -> c (Ctrl-C stops early)");
    println!(
        "{:>4} {:>12} {:>12} {:>12} {:>10}",
        "s", "sent/s", "xdp fwd/s", "received/s", "to kernel/s"
    );
    let start = Instant::now();
    let (mut last_sent, mut last_fwd, mut last_recv, mut last_passed) = (0, 0, 0, 0);
    let mut samples = Vec::new();
    for second in 1..=seconds {
        while start.elapsed() < Duration::from_secs(second) && !STOP.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if STOP.load(Ordering::Relaxed) {
            break;
        }
        let stats: serde_json::Value = serde_json::from_str(&fwd.cli_ok(&["stats", "--json"])?)?;
        let counters = stats["counters"].as_object().context("counters")?;
        let forwarded = counters["forwarded"].as_u64().unwrap_or(0);
        let passed: u64 = counters
            .iter()
            .filter(|(k, _)| k.starts_with("pass_"))
            .filter_map(|(_, v)| v.as_u64())
            .sum();
        let (s, r) = (
            sent.load(Ordering::Relaxed),
            received.load(Ordering::Relaxed),
        );
        println!(
            "{second:>4} {:>12} {:>12} {:>12} {:>11}",
            s - last_sent,
            forwarded - last_fwd,
            r - last_recv,
            passed - last_passed
        );
        samples.push(forwarded - last_fwd);
        (last_sent, last_fwd, last_recv, last_passed) = (s, forwarded, r, passed);
    }
    STOP.store(true, Ordering::SeqCst);
    for t in threads {
        let _ = t.join();
    }

    println!("== counters");
    print!("{}", fwd.cli_ok(&["stats"])?);
    println!("== routes");
    print!("{}", fwd.cli_ok(&["route", "list"])?);
    if !samples.is_empty() {
        let mut sorted = samples.clone();
        sorted.sort_unstable();
        println!(
            "== XDP forwarded a median of {} packets/s over {} s (the UDP socket senders in namespace a, on the same two cores, set this pace)",
            sorted[sorted.len() / 2],
            samples.len()
        );
    }
    print!("== {}", fwd.cli_ok(&["detach"])?);
    println!("== namespaces removed");
    Ok(())
}
