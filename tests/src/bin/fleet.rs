//! The fleet demo (`cargo xtask demo --fleet`): a PoP of two forwarders
//! behind an upstream router's ECMP, each announcing the VIP over BGP
//! (BIRD), three cache nodes behind them; 64 UDP flows from a client;
//! packet rates per forwarder and per node each second; forwarder 1 fails
//! hard midway and its flows carry on through forwarder 2, on the nodes
//! they had. Everything is torn down at the end (also on Ctrl-C).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tests::{Forwarder, fleet::Pop, udp_socket};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

const FLOWS: u16 = 64;
const FIRST_PORT: u16 = 40000;
/// Datagrams per second, all flows together.
const RATE: u64 = 6400;

/// Packets the forwarder steered to the VIP so far (its own counter).
fn steered(fwd: &Forwarder) -> u64 {
    fwd.cli_ok(&["vip", "list", "--json"])
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v[0]["packets"].as_u64())
        .unwrap_or(0)
}

fn main() -> Result<()> {
    let seconds: u64 = match std::env::args().nth(1) {
        None => 20,
        Some(s) => s
            .parse()
            .ok()
            .filter(|s| (4..=3600).contains(s))
            .context("usage: fleet [SECONDS 4..3600]")?,
    };
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    println!(
        "== PoP: client -- up (BIRD, ECMP) -- fwd1, fwd2 (pop-forwarder + BIRD) -- LAN -- cache-1..3"
    );
    let pop = Pop::new()?;
    let _upstream = pop.upstream_bird()?;
    let nodes = ["cache-1", "cache-2", "cache-3"];
    let (mut fwd1, mut bird1) = pop.start_forwarder(0, &nodes)?;
    // The second forwarder learns the nodes in the opposite order: it
    // agrees all the same.
    let (fwd2, _bird2) = pop.start_forwarder(1, &["cache-3", "cache-2", "cache-1"])?;
    println!("== waiting for BGP: both forwarders announce 192.0.2.10");
    pop.wait_for_route("ECMP through both forwarders", |r| {
        r.matches("nexthop via").count() == 2
    })?;
    print!("upstream: {}", pop.upstream_route());

    // Node sinks: datagrams per node, and the nodes each flow reached.
    let per_node: Arc<Vec<AtomicU64>> = Arc::new((0..3).map(|_| AtomicU64::new(0)).collect());
    let flow_nodes: Arc<Mutex<BTreeMap<u16, BTreeSet<usize>>>> = Arc::default();
    let mut threads = Vec::new();
    for (n, ns) in pop.nodes.iter().enumerate() {
        let sink = udp_socket(ns, "192.0.2.10:9999")?;
        let (per_node, flow_nodes) = (per_node.clone(), flow_nodes.clone());
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while !STOP.load(Ordering::Relaxed) {
                if let Ok((_, from)) = sink.recv_from(&mut buf) {
                    per_node[n].fetch_add(1, Ordering::Relaxed);
                    let mut f = flow_nodes.lock().unwrap();
                    f.entry(from.port()).or_default().insert(n);
                }
            }
        }));
    }
    let clients: Vec<_> = (0..FLOWS)
        .map(|f| udp_socket(&pop.client, &format!("10.1.0.2:{}", FIRST_PORT + f)))
        .collect::<Result<_>>()?;
    let sent = Arc::new(AtomicU64::new(0));
    {
        let sent = sent.clone();
        threads.push(std::thread::spawn(move || {
            let start = Instant::now();
            while !STOP.load(Ordering::Relaxed) {
                let due = (start.elapsed().as_secs_f64() * RATE as f64) as u64;
                while sent.load(Ordering::Relaxed) < due {
                    let i = sent.fetch_add(1, Ordering::Relaxed);
                    let _ = clients[(i % u64::from(FLOWS)) as usize]
                        .send_to(b"pop-forwarder fleet demo", "192.0.2.10:9999");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }));
    }

    let fail_at = seconds / 2;
    println!(
        "== {seconds} s of {FLOWS} UDP flows at {RATE}/s to 192.0.2.10; fwd1 fails at {fail_at} s (Ctrl-C stops early)"
    );
    println!(
        "{:>4} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "s", "sent/s", "fwd1/s", "fwd2/s", "cache-1/s", "cache-2/s", "cache-3/s"
    );
    let mut fwd1_alive = true;
    let mut last = (0, 0, 0, [0u64; 3]);
    let mut before_failure = BTreeMap::new();
    for second in 1..=seconds {
        if STOP.load(Ordering::Relaxed) {
            break;
        }
        if second == fail_at + 1 && fwd1_alive {
            before_failure = flow_nodes.lock().unwrap().clone();
            flow_nodes.lock().unwrap().clear();
            pop.fail(0, &mut fwd1, &mut bird1)?;
            fwd1_alive = false;
            println!("== fwd1 fails: daemon and BIRD killed, its uplink gone");
        }
        std::thread::sleep(Duration::from_secs(1));
        let now = (
            sent.load(Ordering::Relaxed),
            if fwd1_alive { steered(&fwd1) } else { last.1 },
            steered(&fwd2),
            [0, 1, 2].map(|n| per_node[n].load(Ordering::Relaxed)),
        );
        println!(
            "{second:>4} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            now.0 - last.0,
            if fwd1_alive {
                (now.1 - last.1).to_string()
            } else {
                "down".to_owned()
            },
            now.2 - last.2,
            now.3[0] - last.3[0],
            now.3[1] - last.3[1],
            now.3[2] - last.3[2],
        );
        last = now;
    }
    STOP.store(true, Ordering::SeqCst);
    for t in threads {
        let _ = t.join();
    }
    let after = flow_nodes.lock().unwrap().clone();
    let changed = before_failure
        .iter()
        .filter(|(port, nodes)| after.get(port).is_some_and(|a| a != *nodes))
        .count();
    if !before_failure.is_empty() {
        println!(
            "== flows seen before and after the failure: {}; on another node after it: {changed}",
            before_failure
                .keys()
                .filter(|p| after.contains_key(p))
                .count()
        );
    }
    println!("== fwd2: {}", fwd2.cli_ok(&["vip", "list"])?.trim_end());
    println!("== tearing down");
    Ok(())
}
