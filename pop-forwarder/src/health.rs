//! Health checks of cache nodes: a tokio task per checked node, so a slow
//! or hanging node delays no other check. A node goes down after `fall`
//! failures in a row and comes back after `rise` successes; each change is
//! reported to the daemon, which takes the node out of (or puts it back
//! into) its VIPs' Maglev tables.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::mpsc::UnboundedSender,
    task::AbortHandle,
};

use crate::config::{HealthConfig, HealthKind};

/// A node's health changed.
#[derive(Debug, Clone)]
pub struct HealthEvent {
    pub node: String,
    /// Which checker saw it: events of a checker since replaced are stale.
    pub checker: u64,
    pub healthy: bool,
    /// What the last check saw.
    pub detail: String,
}

/// Starts checker `checker` of node `name` at `address`, from the state the
/// daemon has for it (`healthy`: a new node starts healthy and leaves after
/// `fall` failed checks; a node adopted from a previous daemon keeps its
/// state). Abort the handle to stop it.
pub fn spawn(
    name: &str,
    address: IpAddr,
    check: HealthConfig,
    healthy: bool,
    checker: u64,
    events: UnboundedSender<HealthEvent>,
) -> AbortHandle {
    let target = SocketAddr::new(address, check.port);
    let name = name.to_owned();
    tokio::spawn(async move {
        let (mut healthy, mut streak) = (healthy, 0u32);
        let mut tick = tokio::time::interval(Duration::from_millis(check.interval_ms));
        loop {
            tick.tick().await;
            let result = probe(target, &check).await;
            // Count results that disagree with the current state.
            if result.is_ok() == healthy {
                streak = 0;
                continue;
            }
            streak += 1;
            let needed = if healthy { check.fall } else { check.rise };
            if streak >= needed {
                healthy = !healthy;
                streak = 0;
                let detail = match result {
                    Ok(()) => format!("{needed} checks in a row passed"),
                    Err(e) => format!("{needed} checks in a row failed, the last: {e}"),
                };
                let event = HealthEvent {
                    node: name.clone(),
                    checker,
                    healthy,
                    detail,
                };
                if events.send(event).is_err() {
                    return; // the daemon is stopping
                }
            }
        }
    })
    .abort_handle()
}

/// One check, bounded by the check's timeout.
async fn probe(target: SocketAddr, check: &HealthConfig) -> Result<(), String> {
    let timeout = Duration::from_millis(check.timeout_ms);
    match tokio::time::timeout(timeout, probe_inner(target, check)).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {} ms", check.timeout_ms)),
    }
}

async fn probe_inner(target: SocketAddr, check: &HealthConfig) -> Result<(), String> {
    let mut stream = TcpStream::connect(target)
        .await
        .map_err(|e| format!("connect to {target}: {e}"))?;
    if check.kind == HealthKind::Tcp {
        return Ok(());
    }
    let request = format!(
        "GET {} HTTP/1.0\r\nHost: {}\r\nUser-Agent: pop-forwarder\r\n\r\n",
        check.path,
        target.ip()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send to {target}: {e}"))?;
    let mut head = [0u8; 32];
    let mut got = 0;
    while got < 12 {
        match stream.read(&mut head[got..]).await {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(format!("read from {target}: {e}")),
        }
    }
    // "HTTP/1.x NNN": 2xx and 3xx are healthy.
    let line = String::from_utf8_lossy(&head[..got]);
    match line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
    {
        Some(code) if (200..400).contains(&code) => Ok(()),
        Some(code) => Err(format!("GET {} answered {code}", check.path)),
        None => Err(format!("GET {} got no HTTP status line", check.path)),
    }
}
