//! Test harness: network namespaces and veth pairs that clean up after
//! themselves, the three-namespace lab, the real binary, and packet builders.
//!
//! Everything a test creates is named `pft<pid>x<n>…`, lives inside
//! namespaces the test made, and is deleted on drop, also when the test
//! panics. Host interfaces are never touched: veth ends are created directly
//! inside their namespaces.

use std::{
    fs::File,
    net::IpAddr,
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use pop_forwarder::config::{Ipv4Lookup, Ipv6Lookup};

pub mod fleet;
pub mod model;
pub mod packets;

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A name no other test (in this run or a concurrent one) uses.
pub fn unique(tag: &str) -> String {
    format!(
        "pft{}x{}{tag}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// A uniquely named path in the temp directory, removed (a file or a
/// whole directory) when dropped, whether the test passed or not.
pub struct TempPath(pub std::path::PathBuf);

impl TempPath {
    pub fn new(tag: &str) -> TempPath {
        TempPath(std::env::temp_dir().join(unique(tag)))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a command, failing with its stderr if it fails.
pub fn sh(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace, deleted (with its interfaces) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Result<Netns> {
        let name = unique(tag);
        sh("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip -n NS …`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// A command run inside the namespace. nsenter enters only the network
    /// namespace, so /sys/fs/bpf (and the instance's pins) stay visible,
    /// which `ip netns exec` would hide: it also gives the command a mount
    /// namespace of its own with /sys mounted anew.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path())).arg(program);
        cmd
    }

    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = self.command(program).args(args).output()?;
        if !out.status.success() {
            bail!(
                "{program} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.run("sysctl", &["-qw", &format!("{key}={value}")])
            .map(drop)
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets made
    /// there stay in the namespace wherever they are used later.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let file = File::open(self.path()).with_context(|| format!("opening {}", self.path()))?;
        std::thread::spawn(move || {
            // SAFETY: setns on a thread of our own with a namespace fd we own.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error()).context("setns");
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in namespace panicked"))?
    }

    pub fn mac(&self, ifname: &str) -> Result<[u8; 6]> {
        let out = self.ip(&["-json", "link", "show", ifname])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        parse_mac(v[0]["address"].as_str().context("no address")?)
    }

    /// Whether an XDP program is attached to `ifname`.
    pub fn has_xdp(&self, ifname: &str) -> Result<bool> {
        let out = self.ip(&["-json", "-details", "link", "show", ifname])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        Ok(v[0].get("xdp").is_some())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let parts: Vec<_> = s.split(':').collect();
    if parts.len() != 6 {
        bail!("bad MAC {s}");
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16)?;
    }
    Ok(mac)
}

/// Three namespaces in a line: `a` (a0) — (r0) `router` (r1) — (c0) `c`.
///
/// Addresses: 10.0.1.0/24 and fd00:1::/64 between a and the router,
/// 10.0.2.0/24 and fd00:2::/64 between the router and c; the router is .1 /
/// ::1 on both, the hosts .2 / ::2. Hosts route everything via the router.
pub struct Lab {
    pub a: Netns,
    pub router: Netns,
    pub c: Netns,
}

impl Lab {
    pub fn new() -> Result<Lab> {
        let lab = Lab {
            a: Netns::new("a")?,
            router: Netns::new("r")?,
            c: Netns::new("c")?,
        };
        for (host, hif, rif, net) in [(&lab.a, "a0", "r0", 1), (&lab.c, "c0", "r1", 2)] {
            lab.wire(host, hif, rif, net)?;
        }
        Ok(lab)
    }

    /// One link between the router and `host`: `hif` in the host
    /// (10.0.`net`.2/24, fd00:`net`::2/64, default route through the
    /// router), `rif` in the router (10.0.`net`.1/24, fd00:`net`::1/64).
    pub fn wire(&self, host: &Netns, hif: &str, rif: &str, net: u8) -> Result<()> {
        // One queue each way: a veth hands a frame to the peer's native
        // XDP only if the TX queue it left on is one of the peer's real
        // RX queues (veth_xmit), which one queue on both ends ensures.
        #[rustfmt::skip]
        sh("ip", &[
            "link", "add", hif, "netns", &host.name, "numtxqueues", "1", "numrxqueues", "1",
            "type", "veth",
            "peer", "name", rif, "netns", &self.router.name, "numtxqueues", "1", "numrxqueues", "1",
        ])?;
        host.ip(&["addr", "add", &format!("10.0.{net}.2/24"), "dev", hif])?;
        host.ip(&[
            "addr",
            "add",
            &format!("fd00:{net}::2/64"),
            "dev",
            hif,
            "nodad",
        ])?;
        self.router
            .ip(&["addr", "add", &format!("10.0.{net}.1/24"), "dev", rif])?;
        self.router.ip(&[
            "addr",
            "add",
            &format!("fd00:{net}::1/64"),
            "dev",
            rif,
            "nodad",
        ])?;
        host.ip(&["link", "set", hif, "up"])?;
        self.router.ip(&["link", "set", rif, "up"])?;
        host.ip(&["route", "add", "default", "via", &format!("10.0.{net}.1")])?;
        host.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("fd00:{net}::1"),
        ])?;
        // A veth receiving XDP-redirected frames drops them unless its
        // peer runs NAPI (XDP attached or GRO on). The sender must put
        // real checksums in its frames: with TX checksum offload a veth
        // hands over CHECKSUM_PARTIAL packets whose L4 checksum is only
        // the pseudo-header sum, which XDP forwards as it is. And a veth
        // with any TSO feature on hands the peer some skbs outside its
        // NAPI, and so outside native XDP (veth_skb_is_eligible_for_gro);
        // 6.18's tx-tcp-accecn-segmentation survives `tx off`.
        host.run(
            "ethtool",
            &["-K", hif, "gro", "on", "tx", "off", "tso", "off"],
        )?;
        Ok(())
    }

    /// A cache-node namespace on its own link from the router: router side
    /// `dev` (10.0.`net`.1/24), node side n0 (10.0.`net`.11/24), with the
    /// VIP on its loopback (direct server return: the node holds the VIP).
    pub fn cache_node(&self, dev: &str, net: u8, vip: &str) -> Result<Netns> {
        let node = Netns::new("n")?;
        #[rustfmt::skip]
        sh("ip", &[
            "link", "add", "n0", "netns", &node.name, "numtxqueues", "1", "numrxqueues", "1",
            "type", "veth", "peer", "name", dev, "netns", &self.router.name, "numtxqueues", "1", "numrxqueues", "1",
        ])?;
        node.ip(&["addr", "add", &format!("10.0.{net}.11/24"), "dev", "n0"])?;
        node.ip(&["addr", "add", &format!("{vip}/32"), "dev", "lo"])?;
        node.ip(&["link", "set", "n0", "up"])?;
        self.router
            .ip(&["addr", "add", &format!("10.0.{net}.1/24"), "dev", dev])?;
        self.router.ip(&["link", "set", dev, "up"])?;
        node.run(
            "ethtool",
            &["-K", "n0", "gro", "on", "tx", "off", "tso", "off"],
        )?;
        Ok(node)
    }

    /// Makes c's addresses `addrs` (10.0.2.2, fd00:2::2) permanent
    /// neighbours of the router on r1, with c0's MAC: no resolution races.
    pub fn neighbours_c(&self, addrs: &[&str]) -> Result<()> {
        let c_mac = mac_str(self.c.mac("c0")?);
        for addr in addrs {
            self.router.ip(&[
                "neigh",
                "replace",
                addr,
                "lladdr",
                &c_mac,
                "dev",
                "r1",
                "nud",
                "permanent",
            ])?;
        }
        Ok(())
    }

    /// A config for this lab: both router interfaces, and `routes` (TOML
    /// `[[routes]]` tables) appended.
    pub fn config(&self, route_miss: &str, routes: &str) -> String {
        format!(
            "route_miss = \"{route_miss}\"\n\n[[interfaces]]\nname = \"r0\"\n\n[[interfaces]]\nname = \"r1\"\n\n{routes}"
        )
    }
}

/// The pop-forwarder binary under test: POP_FORWARDER_BIN, or the one cargo
/// built beside this executable (target/<profile>/ for the lab binary,
/// target/<profile>/deps/ for test executables).
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("POP_FORWARDER_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("executable directory");
    let beside = dir.join("pop-forwarder");
    if beside.exists() {
        return beside;
    }
    dir.parent().expect("target dir").join("pop-forwarder")
}

/// A `pop-forwarder run` in a namespace, with its own instance name; stopped
/// (and its pins removed) on drop.
pub struct Forwarder {
    pub instance: String,
    pub ns_path: String,
    /// The config file the daemon runs on (tests rewrite it to reload).
    pub config: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    /// The instance's run directory (lock, state, control socket).
    pub run_dir: PathBuf,
    /// Environment for the daemon (e.g. POP_FORWARDER_FAILPOINT).
    env: Vec<(String, String)>,
}

impl Forwarder {
    /// Starts the daemon on `config` and waits until it reports running.
    pub fn start(ns: &Netns, config: &str) -> Result<Forwarder> {
        Forwarder::start_with(ns, config, &[])
    }

    /// Like `start`, with more arguments for `run`.
    pub fn start_with(ns: &Netns, config: &str, run_args: &[&str]) -> Result<Forwarder> {
        let mut fwd = Forwarder::spawn_with(ns, config, run_args)?;
        fwd.wait_running(Duration::from_secs(20))?;
        Ok(fwd)
    }

    /// Starts `pop-forwarder run` on `config` without waiting for anything.
    pub fn spawn(ns: &Netns, config: &str) -> Result<Forwarder> {
        Forwarder::spawn_with(ns, config, &[])
    }

    fn spawn_with(ns: &Netns, config: &str, run_args: &[&str]) -> Result<Forwarder> {
        Forwarder::spawn_in(ns, config, run_args, "/run/pop-forwarder".as_ref(), &[])
    }

    /// Like `start_with`, the instance keeping its lock, state and socket in
    /// `run_dir` (`--run-dir`) rather than the default.
    pub fn start_in(
        ns: &Netns,
        config: &str,
        run_args: &[&str],
        run_dir: &std::path::Path,
    ) -> Result<Forwarder> {
        let mut fwd = Forwarder::spawn_in(ns, config, run_args, run_dir, &[])?;
        fwd.wait_running(Duration::from_secs(20))?;
        Ok(fwd)
    }

    fn spawn_in(
        ns: &Netns,
        config: &str,
        run_args: &[&str],
        run_dir: &std::path::Path,
        env: &[(&str, &str)],
    ) -> Result<Forwarder> {
        let instance = unique("");
        let dir = std::env::temp_dir().join(&instance);
        std::fs::create_dir_all(&dir)?;
        let config_path = dir.join("pop.toml");
        std::fs::write(&config_path, config)?;
        let mut fwd = Forwarder {
            instance,
            ns_path: ns.path(),
            config: config_path,
            child: None,
            log: dir.join("daemon.log"),
            run_dir: run_dir.to_owned(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        fwd.spawn_daemon(ns, run_args)?;
        Ok(fwd)
    }

    /// Starts `run` for this instance (its log appended to the same file).
    fn spawn_daemon(&mut self, ns: &Netns, run_args: &[&str]) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = ns
            .command(binary().to_str().context("binary path")?)
            .args(["--instance", &self.instance, "--run-dir"])
            .arg(&self.run_dir)
            .args(["run", "--config"])
            .arg(&self.config)
            .args(run_args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning pop-forwarder run")?;
        self.child = Some(child);
        Ok(())
    }

    /// Like `start`, with `env` in the daemon's environment.
    pub fn start_with_env(ns: &Netns, config: &str, env: &[(&str, &str)]) -> Result<Forwarder> {
        let mut fwd = Forwarder::spawn_in(ns, config, &[], "/run/pop-forwarder".as_ref(), env)?;
        fwd.wait_running(Duration::from_secs(20))?;
        Ok(fwd)
    }

    /// Runs a new daemon for this instance, which must have none now (a
    /// restart after `stop`, or an upgrade), and waits until it has adopted
    /// the data plane and reports itself running.
    pub fn run_again(&mut self, ns: &Netns, run_args: &[&str]) -> Result<()> {
        anyhow::ensure!(self.child.is_none(), "the daemon still runs");
        self.spawn_daemon(ns, run_args)?;
        self.wait_running(Duration::from_secs(20))
    }

    /// Waits until this process's daemon runs: it records its pid in the
    /// instance's state file once its program is attached (or swapped in)
    /// and its tables are filled. (Read directly: `status` counts every
    /// route, which takes a second with a million.)
    fn wait_running(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let state = self.run_dir.join(format!("{}.json", self.instance));
        loop {
            let child = self.child.as_mut().context("no daemon")?;
            if let Some(status) = child.try_wait()? {
                // Gone: a later `run_again` may start another.
                self.child = None;
                bail!("pop-forwarder run exited with {status}: {}", self.log());
            }
            let pid = child.id();
            let recorded = std::fs::read(&state).ok().is_some_and(|s| {
                serde_json::from_slice::<serde_json::Value>(&s).is_ok_and(|v| v["pid"] == pid)
            });
            if recorded {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "pop-forwarder did not come up in {timeout:?}: {}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for the daemon to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().context("already stopped")?;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether this instance has anything pinned in bpffs.
    pub fn has_pins(&self) -> bool {
        std::path::Path::new(&format!("/sys/fs/bpf/pop-forwarder/{}", self.instance)).exists()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs a CLI command against this instance, in its namespace.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new("nsenter")
            .arg(format!("--net={}", self.ns_path))
            .arg(binary())
            .args(["--instance", &self.instance, "--run-dir"])
            .arg(&self.run_dir)
            .args(args)
            .output()?)
    }

    /// Like `cli`, but failing unless the command succeeds; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args)?;
        if !out.status.success() {
            bail!(
                "pop-forwarder {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Like `cli`, but failing unless the command fails; returns stderr.
    pub fn cli_err(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args)?;
        if out.status.success() {
            bail!(
                "pop-forwarder {} succeeded: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// The route to `prefix` as `route list --json` shows its via (a
    /// gateway, `connected`, `kernel`, `group N`); None if the tables hold
    /// no route to exactly it.
    pub fn route_via(&self, prefix: &str) -> Result<Option<String>> {
        let list: serde_json::Value =
            serde_json::from_str(&self.cli_ok(&["route", "list", "--json"])?)?;
        Ok(list
            .as_array()
            .context("route list --json: not a list")?
            .iter()
            .find(|r| r["prefix"] == prefix)
            .map(|r| r["via"].as_str().unwrap_or_default().to_owned()))
    }

    /// One counter from `stats --json`.
    pub fn counter(&self, name: &str) -> Result<u64> {
        let v: serde_json::Value = serde_json::from_str(&self.cli_ok(&["stats", "--json"])?)?;
        v["counters"][name]
            .as_u64()
            .with_context(|| format!("no counter {name}"))
    }

    /// Waits until the daemon has every cache node's MAC (it has the
    /// kernel resolve them).
    pub fn wait_for_node_macs(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let nodes: serde_json::Value =
                serde_json::from_str(&self.cli_ok(&["node", "list", "--json"]).unwrap()).unwrap();
            if nodes
                .as_array()
                .unwrap()
                .iter()
                .all(|n| n["mac"].is_string())
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nodes unresolved: {nodes}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the daemon runs").id()
    }

    /// Kills the daemon (SIGKILL), as a crash would, and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        let mut child = self.child.take().context("no daemon")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("pop-forwarder did not exit within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: as in `stop`.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Whatever the daemon left (it may have been killed): remove pins.
        let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/pop-forwarder/{}", self.instance));
        for ext in ["json", "lock", "sock"] {
            let _ = std::fs::remove_file(self.run_dir.join(format!("{}.{ext}", self.instance)));
        }
        // The config and the daemon's log: kept, and named, if the test
        // is failing, so that the log can be read.
        if let Some(dir) = self.log.parent() {
            if std::thread::panicking() {
                eprintln!("daemon log kept: {}", self.log.display());
            } else {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

/// Makes an instance's pinned settings name map layout `version`, as if a
/// build of another layout had made its maps: the next `run` migrates them.
pub fn set_pinned_layout_version(instance: &str, version: u32) -> Result<()> {
    use pop_forwarder_common::{map_names, settings::LAYOUT_VERSION};
    let path = format!(
        "/sys/fs/bpf/pop-forwarder/{instance}/{}",
        map_names::SETTINGS
    );
    let data = aya::maps::MapData::from_pin(&path).with_context(|| path.clone())?;
    let mut map: aya::maps::Array<_, u32> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data))?;
    map.set(LAYOUT_VERSION, version, 0)?;
    Ok(())
}

/// A frame seen on an interface by a packet socket.
pub type Frame = Vec<u8>;

/// A UDP socket bound in `ns`, with a receive timeout.
pub fn udp_socket(ns: &Netns, bind: &str) -> Result<std::net::UdpSocket> {
    let bind = bind.to_owned();
    let sock = ns.enter(move || std::net::UdpSocket::bind(bind))??;
    sock.set_read_timeout(Some(Duration::from_millis(300)))?;
    Ok(sock)
}

/// Sends `count` datagrams with TTL / hop limit `ttl` from `ns` to `dst`,
/// each carrying `tag` and its sequence number.
pub fn send_udp(
    ns: &Netns,
    dst: std::net::SocketAddr,
    ttl: u32,
    tag: &str,
    count: usize,
) -> Result<()> {
    let tag = tag.to_owned();
    ns.enter(move || -> Result<()> {
        let bind = if dst.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let sock = std::net::UdpSocket::bind(bind)?;
        if dst.is_ipv4() {
            sock.set_ttl(ttl)?;
        } else {
            let hops = ttl as libc::c_int;
            // SAFETY: setsockopt with a c_int option value we own.
            let rc = unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::IPPROTO_IPV6,
                    libc::IPV6_UNICAST_HOPS,
                    (&hops as *const libc::c_int).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
        }
        for i in 0..count {
            sock.send_to(format!("{tag} {i}").as_bytes(), dst)?;
        }
        Ok(())
    })?
}

/// Receives datagrams until `want` arrived or `timeout` passed; returns
/// their payloads.
pub fn receive(sock: &std::net::UdpSocket, want: usize, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while got.len() < want && Instant::now() < deadline {
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    got
}

/// One HTTP/1.1 request to 127.0.0.1:`port` in `ns`; the whole response.
pub fn http(ns: &Netns, port: u16, request: &str) -> String {
    use std::io::{Read as _, Write as _};
    let request = request.to_owned();
    ns.enter(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .unwrap()
}

/// A steady stream of UDP datagrams, each carrying its sequence number,
/// sent from a namespace at a fixed rate until `finish`.
pub struct Stream {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sender: std::thread::JoinHandle<Result<u64>>,
}

impl Stream {
    /// Sends `rate` datagrams a second (in bursts each millisecond) from
    /// `ns` to `dst`, for at most `limit`.
    pub fn start(
        ns: &Netns,
        dst: std::net::SocketAddr,
        rate: u32,
        limit: Duration,
    ) -> Result<Stream> {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let file = File::open(ns.path()).with_context(|| format!("opening {}", ns.path()))?;
        let flag = stop.clone();
        let sender = std::thread::spawn(move || -> Result<u64> {
            // SAFETY: setns on a thread of our own with a namespace fd we own.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error()).context("setns");
            }
            let sock =
                std::net::UdpSocket::bind(if dst.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
            let start = Instant::now();
            let mut sent = 0u64;
            while !flag.load(Ordering::Relaxed) && start.elapsed() < limit {
                // Catch up to where the rate says we should be.
                let due = (start.elapsed().as_secs_f64() * f64::from(rate)) as u64;
                while sent < due {
                    sock.send_to(&sent.to_be_bytes(), dst)?;
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(sent)
        });
        Ok(Stream { stop, sender })
    }

    /// Stops sending; returns how many datagrams went out.
    pub fn finish(self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.sender
            .join()
            .map_err(|_| anyhow::anyhow!("the sender panicked"))?
    }
}

/// Counts the datagrams of a `Stream` arriving at a socket, on a thread of
/// its own, until `finish`: how many distinct sequence numbers arrived, and
/// how many arrived twice.
pub struct Sink {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    reader: std::thread::JoinHandle<(u64, u64)>,
}

impl Sink {
    pub fn start(sock: std::net::UdpSocket) -> Result<Sink> {
        // Room for a second of a fast stream while the reader sleeps.
        let size: libc::c_int = 16 << 20;
        // SAFETY: setsockopt with a c_int option value we own.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let reader = std::thread::spawn(move || {
            let mut seen = std::collections::HashSet::new();
            let mut twice = 0u64;
            let mut buf = [0u8; 64];
            loop {
                match sock.recv_from(&mut buf) {
                    Ok((8, _)) => {
                        let seq = u64::from_be_bytes(buf[..8].try_into().expect("8 bytes"));
                        if !seen.insert(seq) {
                            twice += 1;
                        }
                    }
                    Ok(_) => {}
                    // Nothing for 50 ms: done if asked to stop.
                    Err(_) if flag.load(Ordering::Relaxed) => break,
                    Err(_) => {}
                }
            }
            (seen.len() as u64, twice)
        });
        Ok(Sink { stop, reader })
    }

    /// Waits for the stream's tail, then returns (distinct, duplicates).
    pub fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.reader.join().expect("the sink's reader panicked")
    }
}

/// A packet socket capturing every frame received on `ifname` in `ns`.
pub struct Capture {
    fd: std::os::fd::OwnedFd,
}

impl Capture {
    pub fn new(ns: &Netns, ifname: &str) -> Result<Capture> {
        let ifname = std::ffi::CString::new(ifname)?;
        ns.enter(move || -> Result<Capture> {
            use std::os::fd::FromRawFd;
            let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
            // SAFETY: plain socket/bind/setsockopt calls on an fd we own.
            unsafe {
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error().into());
                }
                let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
                let mut addr: libc::sockaddr_ll = std::mem::zeroed();
                addr.sll_family = libc::AF_PACKET as u16;
                addr.sll_protocol = proto as u16;
                addr.sll_ifindex = libc::if_nametoindex(ifname.as_ptr()) as i32;
                if libc::bind(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    size_of::<libc::sockaddr_ll>() as u32,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error().into());
                }
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 200_000,
                };
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    size_of::<libc::timeval>() as u32,
                );
                Ok(Capture { fd })
            }
        })?
    }

    /// Sends one raw frame out of the interface.
    pub fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: send from a buffer we own, bounded by its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n != frame.len() as isize {
            bail!("sending a raw frame: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Incoming frames (not ones sent from here) that contain `needle`,
    /// until `want` or `timeout`.
    pub fn frames_containing(&self, needle: &[u8], want: usize, timeout: Duration) -> Vec<Frame> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        while got.len() < want && Instant::now() < deadline {
            // SAFETY: recvfrom into a buffer and an address we own, bounded
            // by their lengths.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            // Frames this namespace sends (its replies) are not what arrived.
            if n > 0 && from.sll_pkttype != libc::PACKET_OUTGOING {
                let frame = &buf[..n as usize];
                if frame.windows(needle.len()).any(|w| w == needle) {
                    got.push(frame.to_vec());
                }
            }
        }
        got
    }
}

/// Parses "addr" into an IpAddr, for brevity in tests.
pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// The `upgrade-test` build of the XDP program (see tests/build.rs): differs
/// from the shipped one, for `run --xdp-object`.
pub const UPGRADE_OBJECT: &str = concat!(env!("OUT_DIR"), "/pop-forwarder");

pub fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Gives the router a permanent neighbour entry for c (10.0.2.2), as the
/// kernel would after resolving it.
pub fn neighbour_c_v4(lab: &Lab) {
    lab.neighbours_c(&["10.0.2.2"]).unwrap();
}

/// The route most tests forward on: 10.0.2.0/24 via c.
pub const ROUTE_TO_C: &str =
    "[[routes]]\nprefix = \"10.0.2.0/24\"\nvia = \"10.0.2.2\"\ndev = \"r1\"\n";

/// A lab whose forwarder (run with `run_args`) routes 10.0.2.0/24 to c,
/// with c's MAC already in the router's neighbour table.
pub fn routed_lab(run_args: &[&str]) -> (Lab, Forwarder) {
    let lab = Lab::new().unwrap();
    neighbour_c_v4(&lab);
    let fwd =
        Forwarder::start_with(&lab.router, &lab.config("pass", ROUTE_TO_C), run_args).unwrap();
    (lab, fwd)
}

/// Maps the data plane writes itself (counters, the connection table): left
/// out of `dump_tables`, since traffic (a neighbour solicitation, say) may
/// move them while a test compares.
pub const DATA_PLANE_WRITTEN: [&str; 10] = [
    pop_forwarder_common::map_names::TX_ERRORS,
    pop_forwarder_common::map_names::DENY_CACHE,
    pop_forwarder_common::map_names::COUNTERS,
    pop_forwarder_common::map_names::NEXT_HOP_STATS,
    pop_forwarder_common::map_names::VIP_STATS,
    pop_forwarder_common::map_names::NODE_STATS,
    pop_forwarder_common::map_names::FLOWS,
    pop_forwarder_common::map_names::FLOWS_V4,
    pop_forwarder_common::map_names::DENY_STATS,
    pop_forwarder_common::map_names::INTERFACE_STATS,
];

/// Maps whose values only ever move forward, so that a change taken back
/// leaves them moved: the VIP filter's epochs (see
/// `steering::VIP_FILTER_BUCKETS`; an epoch put back could be met again by
/// an entry written under a VIP that was taken back). Left out of
/// `dump_tables` too.
pub const MOVE_FORWARD_ONLY: [&str; 1] = [pop_forwarder_common::map_names::VIP_FILTER];

/// Every entry of every table an instance pinned, the control plane's
/// (all but `DATA_PLANE_WRITTEN` and `MOVE_FORWARD_ONLY`), as bytes: arrays
/// in index order, other maps as (key, value) records sorted. Two dumps are
/// equal when the tables hold exactly the same.
pub fn dump_tables(instance: &str) -> Vec<(&'static str, Vec<u8>)> {
    pop_forwarder_common::map_names::ALL
        .iter()
        .filter(|name| !DATA_PLANE_WRITTEN.contains(name) && !MOVE_FORWARD_ONLY.contains(name))
        .map(|name| {
            let path = format!("/sys/fs/bpf/pop-forwarder/{instance}/{name}");
            let map = aya::maps::MapData::from_pin(&path).expect("a pinned map");
            (*name, dump_map(&map))
        })
        .collect()
}

fn dump_map(map: &aya::maps::MapData) -> Vec<u8> {
    use std::os::fd::AsFd as _;
    let info = map.info().expect("map info");
    let (key_size, value_size) = (info.key_size() as usize, info.value_size() as usize);
    let fd = map.fd().as_fd().as_raw_fd();
    // A per-CPU map's lookup writes a value for every CPU: the buffers
    // below hold one. The data plane writes those maps anyway.
    assert!(
        !matches!(
            info.map_type(),
            Ok(aya::maps::MapType::PerCpuArray
                | aya::maps::MapType::PerCpuHash
                | aya::maps::MapType::LruPerCpuHash)
        ),
        "a per-CPU map: list it in DATA_PLANE_WRITTEN"
    );
    let array = matches!(info.map_type(), Ok(aya::maps::MapType::Array));
    let mut records: Vec<Vec<u8>> = Vec::new();
    if array {
        // Batches of elements, index order.
        let mut out = Vec::with_capacity(info.max_entries() as usize * value_size);
        let chunk = 1usize << 16;
        let mut keys = vec![0u8; chunk * key_size];
        let mut values = vec![0u8; chunk * value_size];
        let mut in_batch = 0u64;
        let mut out_batch = 0u64;
        let mut first = true;
        loop {
            let mut attr = [0u64; 7];
            attr[0] = if first {
                0
            } else {
                &in_batch as *const u64 as u64
            };
            attr[1] = &mut out_batch as *mut u64 as u64;
            attr[2] = keys.as_mut_ptr() as u64;
            attr[3] = values.as_mut_ptr() as u64;
            attr[4] = chunk as u64 | ((fd as u64) << 32);
            // SAFETY: BPF_MAP_LOOKUP_BATCH (24) with buffers sized for
            // `chunk` keys and values that outlive the call.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    24,
                    attr.as_mut_ptr(),
                    std::mem::size_of_val(&attr),
                )
            };
            let count = (attr[4] & 0xffff_ffff) as usize;
            out.extend_from_slice(&values[..count * value_size]);
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                assert_eq!(
                    e.raw_os_error(),
                    Some(libc::ENOENT),
                    "dumping an array: {e}"
                );
                break;
            }
            in_batch = out_batch;
            first = false;
        }
        return out;
    }
    // Other maps: walk the keys.
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut value = vec![0u8; value_size];
    let mut have = false;
    loop {
        let mut attr = [0u64; 4];
        attr[0] = fd as u64;
        attr[1] = if have { key.as_ptr() as u64 } else { 0 };
        attr[2] = next.as_mut_ptr() as u64;
        // SAFETY: BPF_MAP_GET_NEXT_KEY (4) with key buffers of the map's size.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                4,
                attr.as_mut_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        if rc != 0 {
            break;
        }
        key.copy_from_slice(&next);
        have = true;
        let mut attr = [0u64; 4];
        attr[0] = fd as u64;
        attr[1] = key.as_ptr() as u64;
        attr[2] = value.as_mut_ptr() as u64;
        // SAFETY: BPF_MAP_LOOKUP_ELEM (1) with buffers of the map's sizes.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                1,
                attr.as_mut_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        if rc == 0 {
            records.push([key.as_slice(), value.as_slice()].concat());
        }
    }
    records.sort();
    records.concat()
}

/// A BIRD in a namespace: its config, control socket and log in a
/// directory of its own; killed (and the directory removed) on drop.
pub struct Bird {
    child: Option<Child>,
    dir: PathBuf,
}

impl Bird {
    pub fn start(ns: &Netns, config: &str) -> Result<Bird> {
        let dir = std::env::temp_dir().join(unique("bird"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("bird.conf"), config)?;
        let log = std::fs::File::create(dir.join("bird.log"))?;
        let child = ns
            .command("bird")
            .arg("-f")
            .arg("-c")
            .arg(dir.join("bird.conf"))
            .arg("-s")
            .arg(dir.join("bird.ctl"))
            .arg("-P")
            .arg(dir.join("bird.pid"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting bird (Debian package bird2)")?;
        let bird = Bird {
            child: Some(child),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while bird.birdc(&["show", "status"]).is_err() {
            if Instant::now() > deadline {
                bail!("bird did not start:\n{}", bird.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(bird)
    }

    pub fn birdc(&self, args: &[&str]) -> Result<String> {
        let socket = self.dir.join("bird.ctl");
        let mut all = vec!["-s", socket.to_str().unwrap()];
        all.extend_from_slice(args);
        sh("birdc", &all)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("bird.log")).unwrap_or_default()
    }

    /// Stops it outright, as a crash or a power cut would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A veth pair between two namespaces, one queue each way (see `Lab`),
/// with addresses (none where ""); `host_if`'s end set up to take
/// XDP-redirected frames.
pub fn wire(
    host: &Netns,
    host_if: &str,
    host_addr: &str,
    fwd: &Netns,
    fwd_if: &str,
    fwd_addr: &str,
) {
    #[rustfmt::skip]
    sh("ip", &[
        "link", "add", host_if, "netns", &host.name, "numtxqueues", "1", "numrxqueues", "1",
        "type", "veth",
        "peer", "name", fwd_if, "netns", &fwd.name, "numtxqueues", "1", "numrxqueues", "1",
    ])
    .unwrap();
    for (ns, addr, ifname) in [(host, host_addr, host_if), (fwd, fwd_addr, fwd_if)] {
        if !addr.is_empty() {
            ns.ip(&["addr", "add", addr, "dev", ifname]).unwrap();
        }
    }
    host.ip(&["link", "set", host_if, "up"]).unwrap();
    fwd.ip(&["link", "set", fwd_if, "up"]).unwrap();
    host.run(
        "ethtool",
        &["-K", host_if, "gro", "on", "tx", "off", "tso", "off"],
    )
    .unwrap();
}

/// A next hop as the tests write it straight into the tables: gateway
/// `gateway` on `ifindex`, MTU `mtu`, a static MAC or none (unresolved),
/// frames leaving with source MAC `src_mac`.
pub fn static_next_hop(
    ifindex: u32,
    gateway: IpAddr,
    mtu: u32,
    mac: Option<[u8; 6]>,
    src_mac: [u8; 6],
) -> pop_forwarder_common::NextHop {
    use pop_forwarder_common::{AF_INET, AF_INET6, NH_F_IN_USE, NH_F_MAC_STATIC, NH_F_MAC_VALID};
    let (gateway, family) = match gateway {
        IpAddr::V4(a) => {
            let mut g = [0u8; 16];
            g[..4].copy_from_slice(&a.octets());
            (g, AF_INET)
        }
        IpAddr::V6(a) => (a.octets(), AF_INET6),
    };
    pop_forwarder_common::NextHop {
        ifindex,
        mtu,
        flags: NH_F_IN_USE
            | if mac.is_some() {
                NH_F_MAC_VALID | NH_F_MAC_STATIC
            } else {
                0
            },
        dst_mac: mac.unwrap_or([0; 6]),
        src_mac,
        gateway,
        family,
        vlan_tci: 0,
        vlan_proto: 0,
        tx_ifindex: ifindex,
    }
}

/// Runs `f` in a fresh namespace (named from `tag`) that has a veth `eg0`
/// up (its peer `eg1` down): the redirect target of the tests that run the
/// program with BPF_PROG_TEST_RUN, whose ingress is the namespace's lo
/// (ifindex 1). `f` gets eg0's ifindex. The namespace goes when `f`
/// returns, or panics (Err).
pub fn with_egress_veth<T: Send + 'static>(
    tag: &str,
    f: impl FnOnce(u32) -> T + Send + 'static,
) -> Result<T> {
    let ns = Netns::new(tag)?;
    ns.ip(&["link", "add", "eg0", "type", "veth", "peer", "name", "eg1"])?;
    ns.ip(&["link", "set", "eg0", "up"])?;
    ns.enter(move || {
        // SAFETY: a NUL-terminated name.
        let veth = unsafe { libc::if_nametoindex(c"eg0".as_ptr()) };
        assert_ne!(veth, 0, "eg0 is in this namespace");
        f(veth)
    })
}

/// Runs the XDP program once on `frame` (BPF_PROG_TEST_RUN, repeat 1):
/// its action and the frame as it left.
pub fn test_run(xdp: &aya::programs::Xdp, frame: &[u8]) -> (u32, Vec<u8>) {
    use aya::programs::{TestRun as _, TestRunOptions};
    let mut out = vec![0u8; frame.len() + 256];
    let result = xdp
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// The IPv6 lookup a test pairs with an IPv4 one: the arrays together
/// (DIR-24-8 and the range table), the LPM tries together.
pub fn ipv6_lookup_with(lookup: Ipv4Lookup) -> Ipv6Lookup {
    match lookup {
        Ipv4Lookup::Dir24 => Ipv6Lookup::Dxr,
        Ipv4Lookup::Trie => Ipv6Lookup::Trie,
    }
}
