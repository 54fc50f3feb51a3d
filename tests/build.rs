//! Builds a second XDP object for the upgrade test: the program with the
//! `upgrade-test` feature, which differs from the shipped one by one check
//! no real frame meets. The test runs a daemon on the shipped program, then
//! `run --xdp-object` with this one, under traffic.

fn main() -> anyhow::Result<()> {
    let ebpf_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../pop-forwarder-ebpf");
    println!(
        "cargo:rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../pop-forwarder-common")
    );
    let package = aya_build::Package {
        name: "pop-forwarder-ebpf",
        root_dir: ebpf_dir,
        features: &["upgrade-test"],
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
