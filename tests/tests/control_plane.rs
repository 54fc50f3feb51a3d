//! The control plane an operator can trust: hitless restarts and upgrades,
//! the control socket as a security boundary, one owner per instance, and
//! directories nobody else could have written.

use std::{
    io::{BufRead as _, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use tests::{
    Forwarder, Lab, ROUTE_TO_C, Sink, Stream, neighbour_c_v4, receive, routed_lab, send_udp,
    udp_socket, unique,
};

/// Everything the CLI shows of an instance's tables: routes, VIPs, nodes.
fn tables(fwd: &Forwarder) -> String {
    ["route", "vip", "node"]
        .iter()
        .map(|what| fwd.cli_ok(&[what, "list", "--json"]).unwrap())
        .collect()
}

/// Sends `line` to the control socket as it is and returns the reply line.
fn raw_request(socket: &Path, line: Vec<u8>) -> String {
    let stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    // The daemon may answer and close before reading all of a large request.
    let sending = std::thread::spawn(move || {
        let _ = writer.write_all(&line);
    });
    let mut reply = String::new();
    let _ = std::io::BufReader::new(&stream).read_line(&mut reply);
    let _ = sending.join();
    reply
}

/// UDP's RcvbufErrors in a /proc/net/snmp: datagrams for a socket whose
/// receive buffer was full.
fn udp_counter(snmp: &str, name: &str) -> u64 {
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        panic!("no Udp lines in /proc/net/snmp:\n{snmp}");
    };
    let at = names
        .split_whitespace()
        .position(|n| n == name)
        .unwrap_or_else(|| panic!("{name} in the Udp line"));
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// The daemon's log has recorded `n` program swaps on a pinned link of this
/// kind: `(the same build)` or `(a different build)`, one per interface.
fn swaps(fwd: &Forwarder, kind: &str, n: usize) {
    let log = fwd.log();
    assert_eq!(log.matches(kind).count(), n, "{log}");
}

/// Forwarding still works: datagrams from a reach c.
fn forwards(lab: &Lab, tag: &str) -> bool {
    let sink = udp_socket(&lab.c, "10.0.2.2:9999").unwrap();
    send_udp(&lab.a, "10.0.2.2:9999".parse().unwrap(), 64, tag, 10).unwrap();
    receive(&sink, 10, Duration::from_secs(3)).len() == 10
}

/// Checks that a stream's every datagram arrived, once: `sent` by the
/// stream, `arrived` and `twice` at the sink. Returns how many the
/// sender's own veth refused (they never reached the forwarder).
fn no_datagram_lost(lab: &Lab, fwd: &Forwarder, sent: u64, arrived: u64, twice: u64) -> u64 {
    // Datagrams the forwarder delivered to the sink's host that its socket
    // had no room for (its reader starved of CPU by the rest of a parallel
    // run): the kernel counts each, so they are accounted for, not lost.
    let snmp = lab.c.run("cat", &["/proc/net/snmp"]).unwrap();
    let no_room = udp_counter(&snmp, "RcvbufErrors");
    // And datagrams the sender's own veth refused (its UDP SndbufErrors,
    // a0's TX drops): r0's receive ring was full, the sender having caught
    // up in a burst after being starved of CPU on these two vCPUs while the
    // router's NAPI waited its turn. They never reached the forwarder,
    // which must have forwarded every one that did (the callers check
    // the program's count). The one such
    // failure seen with the counts printed: 2 of 530,140 lost, the
    // sender's SndbufErrors 2, a0's TX drops 2, the program's forwarded
    // count 530,138.
    let sender_snmp = lab.a.run("cat", &["/proc/net/snmp"]).unwrap();
    let refused = udp_counter(&sender_snmp, "SndbufErrors");
    eprintln!(
        "{sent} datagrams sent, {arrived} arrived, {twice} twice, {no_room} found the sink's socket full, {refused} refused by the sender's veth"
    );
    assert!(sent > 50_000, "the stream ran for {sent} datagrams only");
    // On a loss, where it happened: the program's outcomes and the
    // interfaces' counts (a packet handed to the kernel, a transmit
    // dropped, or none of them: lost before r0, in the lab's veths), and
    // the kernel's own counts on the way: the sender's veth, r0, the
    // router's IP stack (a moment without XDP), the sink's veth and stack.
    assert_eq!(
        (arrived + no_room + refused, twice),
        (sent, 0),
        "{} of {sent} datagrams lost\n{}\nthe sender's IP and UDP counters (SndbufErrors: its veth refused a datagram, r0's receive ring full):\n{}\na0 (the sender's veth): {}\nr0: {}\nthe router's IP counters (a packet XDP missed, forwarding off, is an InAddrErrors):\n{}\nc0 (the sink's veth): {}\nthe sink's IP and UDP counters (RcvbufErrors: its socket was full):\n{}\n{}",
        sent - arrived - no_room - refused,
        fwd.cli_ok(&["stats"]).unwrap_or_default(),
        sender_snmp,
        lab.a
            .ip(&["-s", "-s", "link", "show", "a0"])
            .unwrap_or_default(),
        lab.router
            .ip(&["-s", "-s", "link", "show", "r0"])
            .unwrap_or_default(),
        lab.router
            .run("cat", &["/proc/net/snmp"])
            .unwrap_or_default(),
        lab.c
            .ip(&["-s", "-s", "link", "show", "c0"])
            .unwrap_or_default(),
        snmp,
        fwd.log()
    );
    refused
}

/// Steady traffic, 50,000 datagrams a second, crosses the forwarder while
/// the control plane does what operators do to a live PoP: routes added and
/// deleted in a loop (one of them cutting up the very /24 the traffic is
/// for), reloads that change other routes and VIPs, a reload refused, a
/// restart of the daemon, an upgrade to a different build of the XDP
/// program, a downgrade back, and a crash of the daemon. Kernel forwarding is off in the router namespace, so a
/// moment without XDP, or a packet handed to the kernel, would be a loss;
/// every datagram must arrive, once, at the one socket it was sent to.
#[test]
fn restarts_upgrades_reloads_and_route_churn_lose_no_packet() {
    let (lab, mut fwd) = routed_lab(&[]);
    let sink = Sink::start(udp_socket(&lab.c, "10.0.2.2:9999").unwrap()).unwrap();
    let stream = Stream::start(
        &lab.a,
        "10.0.2.2:9999".parse().unwrap(),
        50_000,
        Duration::from_secs(60),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    for _ in 0..5 {
        for prefix in ["10.0.2.128/25", "10.0.9.0/24"] {
            fwd.cli_ok(&["route", "add", prefix, "--via", "10.0.2.2", "--dev", "r1"])
                .unwrap();
        }
        for prefix in ["10.0.2.128/25", "10.0.9.0/24"] {
            fwd.cli_ok(&["route", "del", prefix]).unwrap();
        }
    }

    // A reload that adds a route and turns VIP steering on (a cache node
    // and a VIP: from then on every packet is looked up as a VIP first),
    // then one that changes the VIP's pool.
    let other = "[[routes]]\nprefix = \"10.0.7.0/24\"\nvia = \"10.0.2.2\"\ndev = \"r1\"\n";
    let vips = "[[nodes]]\nname = \"n1\"\naddress = \"10.0.2.2\"\ndev = \"r1\"\n\n\
                [[nodes]]\nname = \"n2\"\naddress = \"10.0.2.3\"\ndev = \"r1\"\nmac = \"02:00:00:00:00:03\"\n\n\
                [[vips]]\naddress = \"192.0.2.10\"\nprotocol = \"udp\"\nnodes = [\"n1\"]\n";
    let good = lab.config("pass", &format!("{ROUTE_TO_C}\n{other}\n{vips}"));
    std::fs::write(&fwd.config, &good).unwrap();
    let out = fwd.cli_ok(&["reload"]).unwrap();
    assert!(
        out.contains("1 routes added, 0 changed, 0 deleted")
            && out.contains("cache nodes 2 added")
            && out.contains("VIPs 1 added"),
        "{out}"
    );
    let good = good.replace("nodes = [\"n1\"]", "nodes = [\"n1\", \"n2\"]");
    std::fs::write(&fwd.config, &good).unwrap();
    let out = fwd.cli_ok(&["reload"]).unwrap();
    assert!(out.contains("VIPs 0 added, 1 changed"), "{out}");
    std::fs::write(&fwd.config, good.replace("10.0.7.0/24", "10.0.7.1/24")).unwrap();
    fwd.cli_err(&["reload"]).unwrap();
    std::fs::write(&fwd.config, &good).unwrap();

    // Restart: the daemon goes, XDP forwards alone, a new daemon adopts.
    fwd.stop().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    fwd.run_again(&lab.router, &[]).unwrap();
    swaps(&fwd, "(the same build)", 2);
    // Upgrade to another build of the program, then back.
    fwd.stop().unwrap();
    fwd.run_again(&lab.router, &["--xdp-object", tests::UPGRADE_OBJECT])
        .unwrap();
    fwd.stop().unwrap();
    fwd.run_again(&lab.router, &[]).unwrap();
    swaps(&fwd, "(a different build)", 4);
    assert!(fwd.log().contains("adopted the pinned data plane"));
    // A crash: the daemon killed outright (its socket file left behind),
    // then adopted like any restart.
    fwd.kill().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    fwd.run_again(&lab.router, &[]).unwrap();
    swaps(&fwd, "(the same build)", 4);

    std::thread::sleep(Duration::from_millis(300));
    let sent = stream.finish().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let (arrived, twice) = sink.finish();
    let refused = no_datagram_lost(&lab, &fwd, sent, arrived, twice);
    // The adopted counters carried on: the data plane forwarded every
    // datagram that reached it.
    assert!(fwd.counter("forwarded").unwrap() >= sent - refused);
    assert_eq!(fwd.counter("pass_no_neighbour").unwrap(), 0);
    // The churned routes are gone; the configured ones and the connected
    // subnets (through r0 and r1, or the kernel's for lo's) are left.
    let list: serde_json::Value =
        serde_json::from_str(&fwd.cli_ok(&["route", "list", "--json"]).unwrap()).unwrap();
    let configured = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["via"] != "connected" && r["via"] != "kernel")
        .count();
    assert_eq!(configured, 2, "{list}");
}

/// A copy of the pop-forwarder binary that any user may run (the build's
/// own directory need not be), in a directory removed on drop.
struct PublicBinary(PathBuf);

impl PublicBinary {
    fn new() -> PublicBinary {
        let dir = std::env::temp_dir().join(unique("bin"));
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = dir.join("pop-forwarder");
        std::fs::copy(tests::binary(), &bin).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        PublicBinary(bin)
    }

    /// Runs the CLI against `fwd` as another user: `ids` are setpriv's
    /// options (--reuid, --regid, groups).
    fn run_as(&self, ids: &[&str], fwd: &Forwarder, args: &[&str]) -> std::process::Output {
        Command::new("setpriv")
            .args(ids)
            .arg(&self.0)
            .args(["--instance", &fwd.instance, "--run-dir"])
            .arg(&fwd.run_dir)
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for PublicBinary {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.0.parent().unwrap());
    }
}

/// A run directory of this test's own, removed on drop.
struct RunDir(PathBuf);

impl RunDir {
    fn new() -> RunDir {
        RunDir(std::env::temp_dir().join(unique("run")))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The socket admits root and, with `control_group`, that group's members;
/// the directory's and socket's modes keep everyone else out, and a socket
/// made reachable by mistake still refuses them (SO_PEERCRED).
#[test]
fn the_control_socket_admits_root_and_the_control_group_only() {
    let lab = Lab::new().unwrap();
    neighbour_c_v4(&lab);
    let run_dir = RunDir::new();
    let config = format!(
        "control_group = \"nogroup\"\n{}",
        lab.config("pass", ROUTE_TO_C)
    );
    let fwd = Forwarder::start_in(&lab.router, &config, &[], &run_dir.0).unwrap();
    let socket = run_dir.0.join(format!("{}.sock", fwd.instance));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&run_dir.0), 0o710);
    assert_eq!(mode(&socket), 0o660);
    let bin = PublicBinary::new();
    let add = [
        "route",
        "add",
        "10.0.9.0/24",
        "--via",
        "10.0.2.2",
        "--dev",
        "r1",
    ];
    let before = tables(&fwd);

    // Another user, not in the group: the directory keeps it out.
    let out = bin.run_as(
        &["--reuid=65533", "--regid=65533", "--clear-groups"],
        &fwd,
        &add,
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission denied"),
        "{out:?}"
    );
    // The same user, with the socket opened to all by mistake and the group
    // as a supplementary one (so it can reach the socket): the daemon reads
    // its credentials and refuses it.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = bin.run_as(
        &["--reuid=65533", "--regid=65533", "--groups=65534"],
        &fwd,
        &add,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("permission denied: uid 65533"), "{err}");
    assert!(fwd.log().contains("refused uid 65533"), "{}", fwd.log());
    assert_eq!(tables(&fwd), before, "a refused request changed the tables");

    // A member of the control group (its primary group) is served.
    let out = bin.run_as(
        &["--reuid=65532", "--regid=65534", "--clear-groups"],
        &fwd,
        &add,
    );
    assert!(out.status.success(), "{out:?}");
    assert!(tables(&fwd).contains("10.0.9.0/24"));
}

/// Malformed, unknown, oversized, wrongly versioned and slow requests get a
/// clear answer and change nothing; an idle client holds up no one.
#[test]
fn bad_requests_are_refused_and_change_nothing() {
    let (_lab, fwd) = routed_lab(&[]);
    let socket = fwd.run_dir.join(format!("{}.sock", fwd.instance));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&socket), 0o600);
    assert_eq!(mode(&fwd.run_dir), 0o700);
    let before = tables(&fwd);

    // An idle client, connected and silent, while others are served.
    let idle = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let mut oversized = br#"{"version":1,"command":{"route_del":{"prefix":""#.to_vec();
    oversized.extend(std::iter::repeat_n(b'1', 2 << 20));
    oversized.extend(b"\"}}}\n");
    for (line, why) in [
        (b"not json\n".to_vec(), "not a request"),
        (b"{}\n".to_vec(), "not a request"),
        (
            br#"{"version":1,"command":"format_disk"}"#.to_vec(),
            "not a request",
        ),
        (
            br#"{"version":1,"command":{"route_del":{"prefix":"10.0.2.0/24","force":true}}}"#
                .to_vec(),
            "not a request",
        ),
        (
            br#"{"version":7,"command":{"route_del":{"prefix":"10.0.2.0/24"}}}"#.to_vec(),
            "protocol version 7",
        ),
        (
            br#"{"version":1,"command":{"route_del":{"prefix":"10.0.2.1/24"}}}"#.to_vec(),
            "host bits",
        ),
        (oversized, "larger than 1048576 bytes"),
    ] {
        let mut line = line;
        if !line.ends_with(b"\n") {
            line.push(b'\n');
        }
        let reply = raw_request(&socket, line);
        assert!(
            reply.starts_with(r#"{"version":1,"result":{"error":"#) && reply.contains(why),
            "{why}: {reply}"
        );
    }
    // Served while the idle client still holds its connection.
    let started = std::time::Instant::now();
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
    fwd.cli_ok(&["route", "del", "10.0.9.0/24"]).unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(idle);
    assert_eq!(tables(&fwd), before, "a refused request changed the tables");
}

/// One instance, one daemon: a second `run` fails at the lock, before it
/// looks at anything, and the first keeps its pins and keeps forwarding.
#[test]
fn a_second_run_of_an_instance_fails_and_leaves_the_first_forwarding() {
    let (lab, fwd) = routed_lab(&[]);
    let out = Command::new("nsenter")
        .arg(format!("--net={}", fwd.ns_path))
        .arg(tests::binary())
        .args(["--instance", &fwd.instance, "run", "--config"])
        .arg(&fwd.config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("is already owned by pid"), "{err}");
    assert!(fwd.has_pins());
    assert!(lab.router.has_xdp("r0").unwrap() && lab.router.has_xdp("r1").unwrap());
    let status: serde_json::Value =
        serde_json::from_str(&fwd.cli_ok(&["status", "--json"]).unwrap()).unwrap();
    assert_eq!(status["running"], true);
    assert!(forwards(&lab, "first"));
}

/// Directories another user could have written are refused, not trusted:
/// what is pinned there would be adopted as the instance's own.
#[test]
fn pin_and_run_directories_others_could_write_are_refused() {
    let lab = Lab::new().unwrap();
    let config = lab.config("pass", "");
    // A pin directory someone made world-readable and -writable.
    let instance = unique("");
    let pins = PathBuf::from(format!("/sys/fs/bpf/pop-forwarder/{instance}"));
    std::fs::create_dir_all(&pins).unwrap();
    std::fs::set_permissions(&pins, std::fs::Permissions::from_mode(0o777)).unwrap();
    let config_path = std::env::temp_dir().join(format!("{instance}.toml"));
    std::fs::write(&config_path, &config).unwrap();
    let out = Command::new("nsenter")
        .arg(format!("--net={}", lab.router.path()))
        .arg(tests::binary())
        .args(["--instance", &instance, "run", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir(&pins);
    let _ = std::fs::remove_file(format!("/run/pop-forwarder/{instance}.lock"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("has mode 777") && err.contains("refusing to trust"),
        "{err}"
    );
    assert!(!lab.router.has_xdp("r0").unwrap());

    // A run directory owned by another user.
    let run_dir = RunDir::new();
    std::fs::create_dir(&run_dir.0).unwrap();
    std::os::unix::fs::chown(&run_dir.0, Some(65533), Some(65533)).unwrap();
    let out = Command::new("nsenter")
        .arg(format!("--net={}", lab.router.path()))
        .arg(tests::binary())
        .args(["--instance", &unique(""), "--run-dir"])
        .arg(&run_dir.0)
        .args(["run", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&config_path);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("is owned by uid 65533"), "{err}");
    assert!(!lab.router.has_xdp("r0").unwrap());
}

/// Maps pinned by a build with another layout (here: their settings say
/// layout 999) are migrated, not adopted: new tables filled from the
/// config, the program swapped in on each pinned link, then the old pins
/// replaced. Steady traffic (kernel forwarding off: a moment without XDP
/// would be a loss) loses no datagram on the way. The staged pins a
/// migration that died left are removed, not reused; a map of the old
/// layout that this one has not loses its pin, one of another type under
/// a name this layout has is replaced; the next restart adopts. A config
/// with another `ipv4_lookup` is migrated to the same way, and so are pins
/// without a settings map (a migration that died while replacing them).
#[test]
fn a_build_with_another_map_layout_migrates_without_losing_a_packet() {
    use pop_forwarder_common::{MAP_LAYOUT_VERSION, map_names, settings::LAYOUT_VERSION};
    let (lab, mut fwd) = routed_lab(&[]);
    let sink = Sink::start(udp_socket(&lab.c, "10.0.2.2:9999").unwrap()).unwrap();
    let stream = Stream::start(
        &lab.a,
        "10.0.2.2:9999".parse().unwrap(),
        50_000,
        Duration::from_secs(30),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    fwd.stop().unwrap();
    let dir = PathBuf::from(format!("/sys/fs/bpf/pop-forwarder/{}", fwd.instance));
    let layout = |path: &Path| -> u32 {
        let data = aya::maps::MapData::from_pin(path).unwrap();
        let map: aya::maps::Array<_, u32> =
            aya::maps::Array::try_from(aya::maps::Map::Array(data)).unwrap();
        map.get(&LAYOUT_VERSION, 0).unwrap()
    };
    let settings = dir.join(map_names::SETTINGS);
    let data = aya::maps::MapData::from_pin(&settings).unwrap();
    data.pin(dir.join(format!("new_{}", map_names::SETTINGS)))
        .unwrap();
    data.pin(dir.join("OLD_LAYOUT_ONLY")).unwrap();
    // And one of this layout's names holding a map of another type (an
    // array of u32 where this build has sets of flow slots), which this
    // build could not open as its own.
    std::fs::remove_file(dir.join(map_names::FLOWS_V4)).unwrap();
    data.pin(dir.join(map_names::FLOWS_V4)).unwrap();
    drop(data);
    tests::set_pinned_layout_version(&fwd.instance, 999).unwrap();

    fwd.run_again(&lab.router, &[]).unwrap();
    let log = fwd.log();
    assert!(
        log.contains("map pins staged by an unfinished migration, removed: 1")
            && log.contains(&format!(
                "migrated the pinned data plane (map layout version 999 to {MAP_LAYOUT_VERSION})"
            )),
        "{log}"
    );
    // Both links swapped in place (none attached afresh: that would have
    // failed on an interface that has XDP).
    swaps(&fwd, "swapped in on the pinned link", 2);
    assert_eq!(layout(&settings), MAP_LAYOUT_VERSION);
    let mut left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("link_") && !map_names::ALL.contains(&n.as_str()))
        .collect();
    left.sort();
    assert!(left.is_empty(), "pins left: {left:?}");

    std::thread::sleep(Duration::from_millis(300));
    let sent = stream.finish().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let (arrived, twice) = sink.finish();
    no_datagram_lost(&lab, &fwd, sent, arrived, twice);
    // The new tables count from the migration on.
    assert!(fwd.counter("forwarded").unwrap() > 0);
    assert_eq!(fwd.counter("pass_no_neighbour").unwrap(), 0);

    // The next restart adopts the migrated pins: its program swapped in
    // on both links, no second migration.
    fwd.stop().unwrap();
    fwd.run_again(&lab.router, &[]).unwrap();
    swaps(&fwd, "swapped in on the pinned link", 4);
    swaps(&fwd, "migrated the pinned data plane (", 1);
    assert!(forwards(&lab, "after the migration"));

    // Another IPv4 lookup is migrated to the same way, at a restart.
    let config = std::fs::read_to_string(&fwd.config).unwrap();
    std::fs::write(&fwd.config, format!("ipv4_lookup = \"lpm-trie\"\n{config}")).unwrap();
    fwd.stop().unwrap();
    fwd.run_again(&lab.router, &[]).unwrap();
    swaps(
        &fwd,
        "migrated the pinned data plane (ipv4_lookup dir-24-8 to lpm-trie)",
        1,
    );
    swaps(&fwd, "swapped in on the pinned link", 6);
    let status = fwd.cli_ok(&["status"]).unwrap();
    assert!(status.contains("ipv4 lookup: lpm-trie"), "{status}");
    assert!(forwards(&lab, "after the lookup's migration"));

    // A migration that died while it replaced the pins left no settings
    // map pinned (it goes first): the next run migrates again.
    fwd.stop().unwrap();
    std::fs::remove_file(&settings).unwrap();
    fwd.run_again(&lab.router, &[]).unwrap();
    swaps(
        &fwd,
        "migrated the pinned data plane (no settings map pinned: a migration that did not finish)",
        1,
    );
    assert_eq!(layout(&settings), MAP_LAYOUT_VERSION);
    assert!(forwards(&lab, "after a migration that did not finish"));
}

/// A restart that asks for another XDP mode on an attached interface is
/// refused, and the pinned data plane forwards on: with the state file and
/// without it (the mode is the kernel's, read from the interface). Back in
/// the mode it has, the next `run` adopts.
#[test]
fn an_xdp_mode_change_is_refused_with_or_without_the_state_file() {
    let (lab, mut fwd) = routed_lab(&[]);
    let native = std::fs::read_to_string(&fwd.config).unwrap();
    let skb = native.replacen("name = \"r0\"", "name = \"r0\"\nmode = \"skb\"", 1);
    assert_ne!(skb, native);
    fwd.stop().unwrap();
    std::fs::write(&fwd.config, &skb).unwrap();
    for with_state_file in [true, false] {
        if !with_state_file {
            std::fs::remove_file(fwd.run_dir.join(format!("{}.json", fwd.instance))).unwrap();
        }
        let e = fwd.run_again(&lab.router, &[]).unwrap_err().to_string();
        assert!(
            e.contains("interfaces[0].mode: \"r0\" is attached in native mode; changing the mode needs `detach`"),
            "state file {with_state_file}: {e}"
        );
        assert!(forwards(&lab, "while a mode change is refused"));
    }
    std::fs::write(&fwd.config, &native).unwrap();
    fwd.run_again(&lab.router, &[]).unwrap();
    swaps(&fwd, "swapped in on the pinned link", 2);
    assert!(forwards(&lab, "after the refusals"));
}

/// The tables once the router's own addresses have settled: its IPv6
/// link-local addresses finish duplicate address detection a second or two
/// after the links come up, and the daemon's refresh then adds them as
/// local routes, a change of the tables no test made.
fn settled_tables(lab: &Lab, fwd: &Forwarder) -> Vec<(&'static str, Vec<u8>)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !lab
        .router
        .ip(&["-6", "addr", "show", "tentative"])
        .unwrap()
        .trim()
        .is_empty()
    {
        assert!(std::time::Instant::now() < deadline, "DAD never ended");
        std::thread::sleep(Duration::from_millis(100));
    }
    // One refresh (every second) to pick them up.
    std::thread::sleep(Duration::from_millis(1500));
    tests::dump_tables(&fwd.instance)
}

/// Fails unless every table of `fwd` holds what `before` does, naming the
/// tables that differ.
fn same_tables(fwd: &Forwarder, before: &[(&'static str, Vec<u8>)], after: &str) {
    let now = tests::dump_tables(&fwd.instance);
    let differ: Vec<_> = now
        .iter()
        .zip(before)
        .filter(|(a, b)| a != b)
        .map(|(a, _)| a.0)
        .collect();
    assert!(
        differ.is_empty(),
        "after {after}, these tables changed: {differ:?}"
    );
}

/// Steering for the transaction tests: node n1 (c, by direct server
/// return) serving two VIPs, and `extra` appended.
fn steering_config(lab: &Lab, extra: &str) -> String {
    format!(
        "{}\n[[nodes]]\nname = \"n1\"\naddress = \"10.0.2.2\"\ndev = \"r1\"\n\n\
         [[vips]]\naddress = \"192.0.2.10\"\nprotocol = \"udp\"\nnodes = [\"n1\"]\n\n\
         [[vips]]\naddress = \"192.0.2.11\"\nprotocol = \"udp\"\nnodes = [\"n1\"]\n\n{extra}",
        lab.config("pass", ROUTE_TO_C)
    )
}

/// A change the tables have no room for is refused before its first write:
/// a reload cutting up more /24s with longer prefixes than DIR-24-8 has
/// tbl8 groups leaves every table byte for byte as it was.
#[test]
fn a_reload_without_room_is_refused_before_any_write() {
    let (lab, fwd) = routed_lab(&[]);
    let before = settled_tables(&lab, &fwd);
    let mut routes = String::from(ROUTE_TO_C);
    // 8,193 /32s, each in a /24 of its own: one more than there are groups.
    for i in 0..8193u32 {
        routes.push_str(&format!(
            "[[routes]]\nprefix = \"10.{}.{}.1/32\"\nvia = \"10.0.2.2\"\ndev = \"r1\"\n",
            100 + i / 256,
            i % 256
        ));
    }
    std::fs::write(&fwd.config, lab.config("pass", &routes)).unwrap();
    let err = fwd.cli_err(&["reload"]).unwrap();
    assert!(
        err.contains("cuts up 8193 more /24s") && err.contains("of 8192 are free"),
        "{err}"
    );
    same_tables(&fwd, &before, "the tables changed");
    assert!(forwards(&lab, "after a refused reload"));
}

/// A change whose write fails half-way is taken back whole: a `node drain`
/// whose second Maglev write fails, then a reload (new node, a pool
/// changed, a VIP removed, new routes) whose first route write fails after
/// all its steering writes are done. Each leaves every table byte for byte
/// as it was, answers why, and the same change goes through once the
/// failure is gone.
#[test]
fn a_change_whose_write_fails_is_taken_back_whole() {
    let lab = Lab::new().unwrap();
    neighbour_c_v4(&lab);
    let fwd = Forwarder::start_with_env(
        &lab.router,
        &steering_config(&lab, ""),
        &[("POP_FORWARDER_FAILPOINT", "maglev:2,route:1")],
    )
    .unwrap();
    let before = settled_tables(&lab, &fwd);
    let listed = tables(&fwd);

    // Draining n1 empties both VIPs' tables: the first Maglev write
    // changes what the program reads, the second fails.
    let err = fwd.cli_err(&["node", "drain", "n1"]).unwrap();
    assert!(
        err.contains("injected failure of maglev write 2") && err.contains("taken back"),
        "{err}"
    );
    same_tables(&fwd, &before, "a failed node drain");
    assert_eq!(tables(&fwd), listed);

    let changed = steering_config(
        &lab,
        "[[nodes]]\nname = \"n2\"\naddress = \"10.0.2.3\"\ndev = \"r1\"\nmac = \"02:00:00:00:00:03\"\n\n\
         [[routes]]\nprefix = \"10.0.7.0/24\"\nvia = \"10.0.2.2\"\ndev = \"r1\"\n",
    )
    .replace("nodes = [\"n1\"]\n\n[[vips]]\naddress = \"192.0.2.11\"\nprotocol = \"udp\"\nnodes = [\"n1\"]\n", "nodes = [\"n1\", \"n2\"]\n");
    assert!(changed.contains("[\"n1\", \"n2\"]") && !changed.contains("192.0.2.11"));
    std::fs::write(&fwd.config, &changed).unwrap();
    let err = fwd.cli_err(&["reload"]).unwrap();
    assert!(
        err.contains("injected failure of route write 1") && err.contains("taken back"),
        "{err}"
    );
    same_tables(&fwd, &before, "the reload left writes behind");
    assert_eq!(tables(&fwd), listed);
    assert!(forwards(&lab, "after a failed reload"));

    // Both failures were one-off: the same changes now go through.
    let out = fwd.cli_ok(&["reload"]).unwrap();
    assert!(
        out.contains("1 routes added")
            && out.contains("cache nodes 1 added")
            && out.contains("1 removed"),
        "{out}"
    );
    assert!(tests::dump_tables(&fwd.instance) != before);
    fwd.cli_ok(&["node", "drain", "n1"]).unwrap();
}

/// A health change whose write fails is taken back, kept, and applied on a
/// later tick: a node that fails its check leaves the node table even
/// though the first attempt to take it out failed.
#[test]
fn a_health_change_whose_write_fails_is_retried_until_applied() {
    let lab = Lab::new().unwrap();
    neighbour_c_v4(&lab);
    // Nothing listens on c's port 9: the check fails at once.
    let config = steering_config(&lab, "").replace(
        "dev = \"r1\"\n\n[[vips]]",
        "dev = \"r1\"\nhealth = { kind = \"tcp\", port = 9, interval_ms = 100, timeout_ms = 50, rise = 1, fall = 1 }\n\n[[vips]]",
    );
    assert!(config.contains("health = "));
    let fwd = Forwarder::start_with_env(
        &lab.router,
        &config,
        &[("POP_FORWARDER_FAILPOINT", "node:1")],
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !fwd.log().contains("cache node n1 is down") {
        assert!(std::time::Instant::now() < deadline, "{}", fwd.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = fwd.log();
    let failed = log
        .find("applying a health change of node n1 (down)")
        .expect("the first attempt failed");
    assert!(
        log[failed..].contains("injected failure of node write 1"),
        "{log}"
    );
    assert!(log.find("cache node n1 is down").unwrap() > failed);
    let nodes: serde_json::Value =
        serde_json::from_str(&fwd.cli_ok(&["node", "list", "--json"]).unwrap()).unwrap();
    assert_eq!(nodes[0]["healthy"], false, "{nodes}");
    assert_eq!(
        nodes[0]["mac"],
        serde_json::Value::Null,
        "out of the node table"
    );
}

/// A DIR-24-8 group retired by a route deletion rests for the grace
/// period before it is freed; a daemon that stops before then leaves it
/// allocated, and the next daemon, adopting the tables, finds it and frees
/// it in turn.
#[test]
fn groups_a_stopped_daemon_left_retired_are_freed_by_the_next() {
    let (lab, mut fwd) = tests::routed_lab(&[]);
    // A /24 with no other route (10.0.2.0/24 holds the box's own /32s,
    // which keep its group): the /25 takes a group, its deletion retires it.
    fwd.cli_ok(&[
        "route",
        "add",
        "10.0.9.128/25",
        "--via",
        "10.0.2.2",
        "--dev",
        "r1",
    ])
    .unwrap();
    fwd.cli_ok(&["route", "del", "10.0.9.128/25"]).unwrap();
    fwd.stop().unwrap();
    fwd.run_again(&lab.router, &[]).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let needle = "1 DIR-24-8 groups the previous daemon left retired";
    while !fwd.log().contains(needle) {
        assert!(std::time::Instant::now() < deadline, "{}", fwd.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The tables still route as configured.
    let list = fwd.cli_ok(&["route", "list"]).unwrap();
    assert!(
        list.contains("10.0.2.0/24") && !list.contains("10.0.9.128/25"),
        "{list}"
    );
}
