//! The soak (`cargo xtask soak [--minutes N]`, 10 by default): mixed traffic
//! through the namespace lab for N minutes while the daemon's routes
//! change every few seconds, then the books: every frame sent reached the
//! program (its ingress interface's counter), the program forwarded,
//! passed or dropped each exactly once, the forwarded ones all reached
//! the sink, and each kind of frame ended where it should. The daemon's
//! memory is reported at start and end. Exits non-zero if the books do
//! not balance.
//!
//! Frames are sent raw from `a` (a packet socket on a0, whose kernel sends
//! nothing of its own: no ARP, no IPv6), so that what reaches r0 is
//! exactly what was sent.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use tests::{
    Capture, Forwarder, Lab,
    packets::{Eth, udp_v4, udp_v6},
    udp_socket,
};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Frames a second, all kinds together.
const RATE: u64 = 10_000;

/// The kinds of frame, their share (of 20), and the counter each must end
/// in.
const KINDS: [(&str, u64, &str); 6] = [
    ("ipv4 to c", 11, "forwarded"),
    ("ipv6 to c", 4, "forwarded"),
    ("ipv4 ttl 1", 1, "pass_ttl_exceeded"),
    ("ipv4 to the router", 1, "pass_local"),
    ("ipv4 to a denied address", 2, "drop_denied"),
    ("ipv4 from a martian source", 1, "drop_martian_source"),
];

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

fn main() -> Result<()> {
    let minutes: u64 = match std::env::args().nth(1) {
        None => 10,
        Some(s) => s
            .parse()
            .ok()
            .filter(|m| (1..=1440).contains(m))
            .context("usage: soak [MINUTES 1..1440]")?,
    };
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let lab = Lab::new()?;
    // a's kernel stays silent on a0: no ARP answers, no IPv6.
    lab.a.ip(&["link", "set", "a0", "arp", "off"])?;
    lab.a.sysctl("net.ipv6.conf.a0.disable_ipv6", "1")?;
    lab.router.sysctl("net.ipv4.ip_forward", "1")?;
    lab.neighbours_c(&["10.0.2.2", "fd00:2::2"])?;
    let config = format!(
        "{}\n[[deny]]\nprefix = \"10.0.2.99/32\"\ndirection = \"destination\"\n",
        lab.config("pass", "")
    );
    let fwd = Forwarder::start(&lab.router, &config)?;
    let rss_start = rss_kib(fwd.pid())?;
    println!(
        "== soak: {minutes} min of mixed traffic at {RATE} frames/s through {}; daemon RSS {rss_start} KiB",
        fwd.instance
    );

    let eth = Eth {
        src: lab.a.mac("a0")?,
        dst: lab.router.mac("r0")?,
    };
    let c4: Ipv4Addr = "10.0.2.2".parse()?;
    let frames: Vec<Vec<u8>> = vec![
        udp_v4(eth, "10.0.1.2".parse()?, c4, 64, b"soak ipv4"),
        udp_v6(
            eth,
            "fd00:1::2".parse()?,
            "fd00:2::2".parse::<Ipv6Addr>()?,
            64,
            b"soak ipv6",
        ),
        udp_v4(eth, "10.0.1.2".parse()?, c4, 1, b"soak ttl"),
        udp_v4(
            eth,
            "10.0.1.2".parse()?,
            "10.0.1.1".parse()?,
            64,
            b"soak local",
        ),
        udp_v4(
            eth,
            "10.0.1.2".parse()?,
            "10.0.2.99".parse()?,
            64,
            b"soak denied",
        ),
        udp_v4(eth, "127.0.0.1".parse()?, c4, 64, b"soak martian"),
    ];
    // The sink: IPv4 and IPv6 datagrams to port 9999 on c.
    let delivered = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for bind in ["10.0.2.2:9999", "[fd00:2::2]:9999"] {
        let sink = udp_socket(&lab.c, bind)?;
        let delivered = delivered.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !STOP.load(Ordering::Relaxed) {
                if sink.recv(&mut buf).is_ok() {
                    delivered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let sent: Arc<Vec<AtomicU64>> = Arc::new(KINDS.iter().map(|_| AtomicU64::new(0)).collect());
    let before = fwd.cli_ok(&["stats", "--json"])?;
    let sender = {
        let raw = Capture::new(&lab.a, "a0")?;
        let sent = sent.clone();
        let total_share: u64 = KINDS.iter().map(|k| k.1).sum();
        let schedule: Vec<usize> = KINDS
            .iter()
            .enumerate()
            .flat_map(|(i, k)| std::iter::repeat_n(i, k.1 as usize))
            .collect();
        assert_eq!(schedule.len() as u64, total_share);
        let end = Instant::now() + Duration::from_secs(minutes * 60);
        std::thread::spawn(move || -> Result<()> {
            let start = Instant::now();
            let mut n = 0u64;
            while !STOP.load(Ordering::Relaxed) && Instant::now() < end {
                let due = (start.elapsed().as_secs_f64() * RATE as f64) as u64;
                while n < due {
                    let kind = schedule[(n % total_share) as usize];
                    raw.send(&frames[kind])?;
                    sent[kind].fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(())
        })
    };
    // Route churn on the daemon while traffic flows.
    let mut churn = 0u64;
    let started = Instant::now();
    let mut last_report = Instant::now();
    while !sender.is_finished() {
        std::thread::sleep(Duration::from_secs(5));
        let prefix = format!("10.77.{}.0/24", churn % 250);
        fwd.cli_ok(&["route", "add", &prefix, "--via", "10.0.2.2", "--dev", "r1"])?;
        fwd.cli_ok(&["route", "del", &prefix])?;
        churn += 1;
        if last_report.elapsed() >= Duration::from_secs(60) {
            last_report = Instant::now();
            let total: u64 = sent.iter().map(|s| s.load(Ordering::Relaxed)).sum();
            println!(
                "  {:>3} min: sent {total}, delivered {}, daemon RSS {} KiB, {churn} route add/del pairs",
                started.elapsed().as_secs() / 60,
                delivered.load(Ordering::Relaxed),
                rss_kib(fwd.pid())?
            );
        }
    }
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("the sender panicked"))??;
    // Let the last frames land.
    std::thread::sleep(Duration::from_secs(1));
    STOP.store(true, Ordering::SeqCst);
    for t in threads {
        let _ = t.join();
    }
    let rss_end = rss_kib(fwd.pid())?;
    let after = fwd.cli_ok(&["stats", "--json"])?;
    let before: serde_json::Value = serde_json::from_str(&before)?;
    let after: serde_json::Value = serde_json::from_str(&after)?;
    let delta = |name: &str| {
        after["counters"][name].as_u64().unwrap_or(0)
            - before["counters"][name].as_u64().unwrap_or(0)
    };
    let r0 = |v: &serde_json::Value, field: &str| {
        v["interfaces"]
            .as_array()
            .and_then(|a| a.iter().find(|i| i["name"] == "r0"))
            .and_then(|i| i[field].as_u64())
            .unwrap_or(0)
    };
    let r0_delta = |field: &str| r0(&after, field) - r0(&before, field);
    let sent_total: u64 = sent.iter().map(|s| s.load(Ordering::Relaxed)).sum();
    let mut failures = Vec::new();
    println!("== after {} s:", started.elapsed().as_secs());
    println!("  sent {sent_total}; r0 received {}", r0_delta("packets"));
    if r0_delta("packets") != sent_total {
        failures.push(format!(
            "r0 received {}, not the {sent_total} sent",
            r0_delta("packets")
        ));
    }
    let (f, p, d) = (
        r0_delta("forwarded"),
        r0_delta("passed"),
        r0_delta("dropped"),
    );
    println!("  forwarded {f} + passed {p} + dropped {d} = {}", f + p + d);
    if f + p + d != sent_total {
        failures.push(format!(
            "forwarded + passed + dropped = {}, not {sent_total}",
            f + p + d
        ));
    }
    let mut by_counter: std::collections::BTreeMap<&str, u64> = Default::default();
    for (i, (kind, _, counter)) in KINDS.iter().enumerate() {
        let n = sent[i].load(Ordering::Relaxed);
        println!("  {kind:<28} sent {n:>10} -> {counter}");
        *by_counter.entry(counter).or_default() += n;
    }
    for (counter, want) in &by_counter {
        let got = delta(counter);
        if got != *want {
            failures.push(format!("{counter} moved by {got}, {want} were sent for it"));
        }
    }
    let forwarded = by_counter["forwarded"];
    let got = delivered.load(Ordering::Relaxed);
    println!("  delivered to c: {got} of {forwarded} forwarded");
    if got != forwarded {
        failures.push(format!("{got} delivered, {forwarded} forwarded"));
    }
    println!(
        "  daemon RSS: {rss_start} KiB at start, {rss_end} KiB at end ({churn} route add/del pairs)"
    );
    if failures.is_empty() {
        println!("== the books balance");
        Ok(())
    } else {
        bail!("the books do not balance: {}", failures.join("; "))
    }
}
