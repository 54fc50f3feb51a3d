//! A PoP of two forwarders behind an upstream router's ECMP, fed by BGP:
//! the fleet test's and the fleet demo's (`cargo xtask demo --fleet`).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::{Bird, Forwarder, Netns};

/// The upstream router's BIRD: a session to each forwarder, the VIP routes
/// they announce merged into one ECMP route in its kernel table.
pub const UPSTREAM_BIRD: &str = r#"
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
pub const FORWARDER_BIRD: &str = r#"
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
pub fn forwarder_config(order: &[&str]) -> String {
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
pub struct Pop {
    pub client: Netns,
    pub up: Netns,
    pub fwd: [Netns; 2],
    pub lan: Netns,
    pub nodes: Vec<Netns>,
}

impl Pop {
    pub fn new() -> Result<Pop> {
        let pop = Pop {
            client: Netns::new("cl")?,
            up: Netns::new("up")?,
            fwd: [Netns::new("fa")?, Netns::new("fb")?],
            lan: Netns::new("lan")?,
            nodes: (0..3).map(|_| Netns::new("n")).collect::<Result<_>>()?,
        };
        crate::wire(
            &pop.client,
            "c0",
            "10.1.0.2/24",
            &pop.up,
            "uc",
            "10.1.0.1/24",
        );
        pop.client
            .ip(&["route", "add", "default", "via", "10.1.0.1"])?;
        pop.up.sysctl("net.ipv4.ip_forward", "1")?;
        // Flows spread over the forwarders by ports, as a PoP router's
        // ECMP does.
        pop.up.sysctl("net.ipv4.fib_multipath_hash_policy", "1")?;
        pop.lan.ip(&["link", "add", "br0", "type", "bridge"])?;
        pop.lan.ip(&["link", "set", "br0", "up"])?;
        for (i, f) in pop.fwd.iter().enumerate() {
            let net = 11 + i;
            // up's end takes the forwarder's frames like any veth; the
            // forwarder's u0 is where its XDP program runs.
            crate::wire(
                &pop.up,
                &format!("u{}", i + 1),
                &format!("10.0.{net}.1/24"),
                f,
                "u0",
                &format!("10.0.{net}.2/24"),
            );
            crate::wire(
                &pop.lan,
                &format!("pf{i}"),
                "",
                f,
                "b0",
                &format!("10.0.50.{}/24", i + 1),
            );
            pop.lan
                .ip(&["link", "set", &format!("pf{i}"), "master", "br0"])?;
        }
        for (i, n) in pop.nodes.iter().enumerate() {
            crate::wire(
                &pop.lan,
                &format!("pn{i}"),
                "",
                n,
                "n0",
                &format!("10.0.50.1{}/24", i + 1),
            );
            pop.lan
                .ip(&["link", "set", &format!("pn{i}"), "master", "br0"])?;
            n.ip(&["addr", "add", "192.0.2.10/32", "dev", "lo"])?;
        }
        Ok(pop)
    }

    /// The upstream router's BIRD.
    pub fn upstream_bird(&self) -> Result<Bird> {
        Bird::start(&self.up, UPSTREAM_BIRD)
    }

    /// Forwarder `i` (0 or 1): pop-forwarder on `forwarder_config(order)`,
    /// with every node's MAC resolved, and its BIRD.
    pub fn start_forwarder(&self, i: usize, order: &[&str]) -> Result<(Forwarder, Bird)> {
        let ns = &self.fwd[i];
        let fwd = Forwarder::start(ns, &forwarder_config(order))?;
        fwd.wait_for_node_macs();
        let net = 11 + i;
        let bird = FORWARDER_BIRD
            .replace("LOCAL", &format!("10.0.{net}.2"))
            .replace("UPSTREAM", &format!("10.0.{net}.1"));
        Ok((fwd, Bird::start(ns, &bird)?))
    }

    /// The upstream router's route to the VIP, as `ip route` shows it.
    pub fn upstream_route(&self) -> String {
        self.up
            .ip(&["route", "show", "192.0.2.10"])
            .unwrap_or_default()
    }

    /// Waits until the upstream router's route to the VIP satisfies `ok`.
    pub fn wait_for_route(&self, what: &str, ok: impl Fn(&str) -> bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let route = self.upstream_route();
            if ok(&route) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the upstream router's route to the VIP: not {what} within 20 s: {route:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Forwarder `i` fails hard, as a box losing power: its daemon and its
    /// BIRD killed, its uplink gone.
    pub fn fail(&self, i: usize, fwd: &mut Forwarder, bird: &mut Bird) -> Result<()> {
        fwd.kill()?;
        bird.kill();
        self.up.ip(&["link", "del", &format!("u{}", i + 1)])?;
        Ok(())
    }
}
