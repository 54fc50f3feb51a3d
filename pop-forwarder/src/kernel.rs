//! What the kernel knows about this network namespace: interfaces (index,
//! MTU, MAC, addresses) and the neighbour table.
//!
//! Read through iproute2's JSON output (`ip -json`), which speaks rtnetlink
//! for us. It asks the namespace this process is in, unlike /sys/class/net,
//! which shows the namespace sysfs was mounted in (under `nsenter --net`,
//! the original one's).

use std::{net::IpAddr, process::Command};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

use crate::net::Mac;

/// One network interface.
#[derive(Debug, Clone)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
    pub mtu: u32,
    /// None for interfaces without an Ethernet address (loopback, tunnels).
    pub mac: Option<Mac>,
    pub addrs: Vec<IpAddr>,
    /// An XDP program is attached (any mode).
    pub xdp_attached: bool,
}

/// A neighbour-table entry with a usable link-layer address.
#[derive(Debug, Clone)]
pub struct Neighbour {
    pub addr: IpAddr,
    pub ifname: String,
    pub mac: Mac,
}

#[derive(Deserialize)]
struct IpLink {
    ifindex: u32,
    ifname: String,
    mtu: u32,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    link_type: Option<String>,
    #[serde(default)]
    addr_info: Vec<IpAddrInfo>,
    #[serde(default)]
    xdp: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct IpAddrInfo {
    local: Option<String>,
}

#[derive(Deserialize)]
struct IpNeigh {
    dst: String,
    dev: Option<String>,
    lladdr: Option<String>,
    #[serde(default)]
    state: Vec<String>,
}

fn ip_json(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .arg("-json")
        .args(args)
        .output()
        .context("running `ip` (iproute2) to read interfaces and neighbours")?;
    if !out.status.success() {
        bail!(
            "`ip -json {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).context("`ip -json` printed non-UTF-8")
}

/// Every interface of this network namespace.
pub fn links() -> Result<Vec<Link>> {
    let text = ip_json(&["-details", "address", "show"])?;
    let raw: Vec<IpLink> =
        serde_json::from_str(&text).context("parsing `ip -json address show`")?;
    Ok(raw
        .into_iter()
        .map(|l| Link {
            ifindex: l.ifindex,
            mac: match l.link_type.as_deref() {
                Some("ether") => l.address.as_deref().and_then(|a| a.parse().ok()),
                _ => None,
            },
            addrs: l
                .addr_info
                .iter()
                .filter_map(|a| a.local.as_deref()?.parse().ok())
                .collect(),
            xdp_attached: l.xdp.is_some(),
            name: l.ifname,
            mtu: l.mtu,
        })
        .collect())
}

/// The interface called `name`, or an error that says it is missing.
pub fn link<'a>(links: &'a [Link], name: &str) -> Result<&'a Link> {
    links
        .iter()
        .find(|l| l.name == name)
        .with_context(|| format!("interface {name:?} does not exist in this network namespace"))
}

/// Asks the kernel to resolve `addr` on `ifname` and keep it resolved,
/// without any traffic to it: a "managed" neighbour entry (NTF_MANAGED,
/// Linux 5.16), which the kernel probes itself.
pub fn request_neighbour(addr: IpAddr, ifname: &str) -> Result<()> {
    let out = Command::new("ip")
        .args([
            "neighbour",
            "replace",
            &addr.to_string(),
            "dev",
            ifname,
            "managed",
        ])
        .output()
        .context("running `ip neighbour replace`")?;
    if !out.status.success() {
        bail!(
            "`ip neighbour replace {addr} dev {ifname} managed` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Neighbour entries whose link-layer address can be used now. FAILED and
/// INCOMPLETE entries have none; STALE ones are still right until proven
/// otherwise, and the kernel re-validates them as it uses them.
pub fn neighbours() -> Result<Vec<Neighbour>> {
    let text = ip_json(&["neighbour", "show"])?;
    let raw: Vec<IpNeigh> =
        serde_json::from_str(&text).context("parsing `ip -json neighbour show`")?;
    Ok(raw
        .into_iter()
        .filter(|n| !n.state.iter().any(|s| s == "FAILED" || s == "INCOMPLETE"))
        .filter_map(|n| {
            Some(Neighbour {
                addr: n.dst.parse().ok()?,
                ifname: n.dev?,
                mac: n.lladdr?.parse().ok()?,
            })
        })
        .collect())
}
