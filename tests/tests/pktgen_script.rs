//! scripts/pktgen.sh: the kernel pktgen driver for real NICs. This kernel
//! has no pktgen, so only its argument handling and the commands it would
//! write (--dry-run) are tested.

use std::process::{Command, Output};

fn pktgen(args: &[&str]) -> Output {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/pktgen.sh");
    Command::new("bash")
        .arg(script)
        .args(args)
        .output()
        .expect("running pktgen.sh")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn dry_run_prints_the_pktgen_commands_for_each_thread() {
    let out = pktgen(&[
        "-i",
        "eth1",
        "-d",
        "198.51.100.1",
        "-m",
        "0c:42:a1:00:00:01",
        "-c",
        "4096",
        "-s",
        "128",
        "-t",
        "2",
        "-p",
        "16",
        "--dry-run",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "kpktgend_0: add_device eth1@0",
        "kpktgend_1: add_device eth1@1",
        "eth1@1: pkt_size 124",
        "eth1@0: dst_min 198.51.100.1",
        "eth1@0: dst_max 198.51.116.0",
        "eth1@0: dst_mac 0c:42:a1:00:00:01",
        "eth1@1: udp_src_max 1039",
        "eth1@1: queue_map_min 1",
        "pgctrl: start",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
    assert_eq!(text.lines().filter(|l| l.ends_with("start")).count(), 1);
}

#[test]
fn bad_arguments_are_refused_with_the_option_named() {
    let base = [
        "-i",
        "eth1",
        "-d",
        "198.51.100.1",
        "-m",
        "0c:42:a1:00:00:01",
        "--dry-run",
    ];
    let cases: [(&[&str], &str); 9] = [
        (
            &["-d", "198.51.100.256"],
            "-d: '198.51.100.256' is not an IPv4 address",
        ),
        (
            &["-m", "0c:42:a1:00:01"],
            "-m: '0c:42:a1:00:01' is not a MAC address",
        ),
        (&["-s", "63"], "-s: '63' is not a frame size"),
        (&["-s", "big"], "-s: 'big' is not a frame size"),
        (&["-c", "0"], "-c: '0' is not a count"),
        (&["-t", "0"], "-t: '0' is not a thread count"),
        (&["-p", "70000"], "-p: '70000' is not a port count"),
        (&["-i", "a/b"], "-i: 'a/b' is not an interface name"),
        (
            &["-d", "255.255.255.255", "-c", "2"],
            "run past 255.255.255.255",
        ),
    ];
    for (extra, needle) in cases {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let out = pktgen(&args);
        assert_eq!(out.status.code(), Some(1), "{extra:?}");
        assert!(
            stderr(&out).contains(needle),
            "{extra:?}: expected {needle:?} in {}",
            stderr(&out)
        );
        assert!(out.stdout.is_empty(), "{extra:?}: nothing may be written");
    }
    let out = pktgen(&["-i", "eth1", "--dry-run"]);
    assert!(stderr(&out).contains("-d DST_IP is required"));
    let out = pktgen(&["--frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("usage: pktgen.sh"));
}

#[test]
fn without_pktgen_in_the_kernel_it_says_so() {
    if std::path::Path::new("/proc/net/pktgen").exists() {
        return; // a kernel with pktgen: nothing to check here
    }
    let out = pktgen(&[
        "-i",
        "eth1",
        "-d",
        "198.51.100.1",
        "-m",
        "0c:42:a1:00:00:01",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("this kernel has no pktgen"),
        "{}",
        stderr(&out)
    );
}
