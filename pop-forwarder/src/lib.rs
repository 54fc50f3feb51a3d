//! pop-forwarder's host side: config model, map writers, loader and daemon.
//! The binary (main.rs) is a thin clap layer over this library; the tests
//! crate uses it to load the very object the binary embeds.

pub mod announce;
pub mod bench;
pub mod config;
pub mod control;
pub mod daemon;
pub mod failpoint;
pub mod health;
pub mod instance;
pub mod kernel;
pub mod maps;
pub mod metrics;
pub mod mirror;
pub mod net;
pub mod netlink;
pub mod plan;
pub mod steering;

/// The compiled XDP program, built by build.rs and embedded so that the
/// binary alone is enough on a server.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pop-forwarder"));
