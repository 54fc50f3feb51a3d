//! Builds the XDP program (pop-forwarder-ebpf) with the nightly toolchain and
//! bpf-linker, so that the host binary can embed the object.
//! `cargo xtask setup` installs both; `cargo xtask` commands put bpf-linker on
//! PATH.

fn main() -> anyhow::Result<()> {
    let ebpf_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../pop-forwarder-ebpf");
    // aya-build watches the eBPF crate; the common crate feeds it too.
    println!(
        "cargo:rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../pop-forwarder-common")
    );
    let package = aya_build::Package {
        name: "pop-forwarder-ebpf",
        root_dir: ebpf_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
