//! Project tasks: `cargo xtask setup | build | test | demo [--fleet] | fuzz | soak | bench`.
//!
//! Every task first makes sure the machine has what it needs (Debian
//! packages, the nightly's rust-src, bpf-linker built against the nightly's
//! own LLVM; see the README's first section), doing only the work that is
//! missing.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the lab and the tests run: ip (iproute2), ethtool,
/// nsenter (util-linux), sysctl (procps), BIRD (bird2) for the BGP tests,
/// and the Prometheus Python client's exposition parser for the metrics
/// test.
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "util-linux",
    "procps",
    "bird2",
    "python3-prometheus-client",
];

#[derive(Parser)]
#[command(about = "pop-forwarder project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need; a second run does nothing.
    Setup,
    /// Build the pop-forwarder binary (with the XDP object embedded).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run every test: formatting, unit, program (BPF_PROG_TEST_RUN) and
    /// integration (network namespaces). Needs root.
    Test,
    /// Run the demo lab: three namespaces, the forwarder in the middle, real
    /// traffic, live counters, clean teardown. Needs root.
    Demo {
        /// How long to send traffic (default 10 s, 20 s with --fleet).
        #[arg(long)]
        seconds: Option<u64>,
        /// The PoP instead: two forwarders behind BGP ECMP (BIRD), three
        /// cache nodes, per-forwarder and per-node rates each second, one
        /// forwarder failing midway.
        #[arg(long)]
        fleet: bool,
    },
    /// The soak: mixed traffic through the namespace lab for MINUTES while
    /// routes change, then the books (sent = received = forwarded +
    /// passed + dropped, forwarded = delivered, each kind in its counter)
    /// and the daemon's memory at start and end. Needs root.
    Soak {
        #[arg(long, default_value_t = 10)]
        minutes: u64,
    },
    /// Differential fuzzing, longer than the test suite's 100,000 frames:
    /// the program and the reference model on random frames from a seed.
    /// Needs root.
    Fuzz {
        /// Frames to run (half under each IPv4 lookup).
        #[arg(long, default_value_t = 5_000_000)]
        frames: u64,
        /// Seed of the frames (and of the tables).
        #[arg(long, default_value_t = 0xf00d)]
        seed: u64,
    },
    /// Benchmarks: Linux forwarding, a bare XDP redirect and pop-forwarder
    /// side by side (pps, loss, ns/packet, route load time); writes
    /// target/bench/bench.{md,json}. Needs root; takes several minutes.
    Bench {
        /// Fewer, shorter runs and smaller tables: checks the harness, not
        /// the numbers.
        #[arg(long)]
        quick: bool,
        /// Set up only these sections, comma-separated: daemon, mirror,
        /// linux, redirect, pop, vip, deny, fib (the harness rows always
        /// run).
        #[arg(long, value_name = "SECTIONS")]
        only: Option<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup().map(drop),
        Task::Build { release } => {
            let env = setup()?;
            build(&env, release)
        }
        Task::Test => {
            require_root()?;
            let env = setup()?;
            cargo(&env, &["fmt", "--all", "--check"])
                .context("formatting (run `cargo fmt --all`)")?;
            build(&env, false)?;
            cargo(
                &env,
                &[
                    "test",
                    "--workspace",
                    "--exclude",
                    "pop-forwarder-ebpf",
                    "--",
                    "--test-threads=2",
                ],
            )
        }
        Task::Demo { seconds, fleet } => {
            require_root()?;
            let env = setup()?;
            build(&env, true)?;
            let (bin, default) = if fleet { ("fleet", 20) } else { ("lab", 10) };
            run_tests_bin(&env, bin, &[&seconds.unwrap_or(default).to_string()])
        }
        Task::Soak { minutes } => {
            require_root()?;
            let env = setup()?;
            build(&env, true)?;
            run_tests_bin(&env, "soak", &[&minutes.to_string()])
        }
        Task::Fuzz { frames, seed } => {
            require_root()?;
            let env = setup()?;
            build(&env, true)?;
            // The test reads these; the child inherits them.
            // SAFETY: single-threaded here, before any child runs.
            unsafe {
                env::set_var("POP_FORWARDER_FUZZ_FRAMES", frames.to_string());
                env::set_var("POP_FORWARDER_FUZZ_SEED", seed.to_string());
            }
            cargo(
                &env,
                &[
                    "test",
                    "--release",
                    "-p",
                    "tests",
                    "--test",
                    "differential",
                    "--",
                    "--nocapture",
                    "program_and_model_agree_on_random_frames",
                ],
            )
        }
        Task::Bench { quick, only } => {
            require_root()?;
            let env = setup()?;
            build(&env, true)?;
            let mut args = Vec::new();
            if quick {
                args.push("--quick".to_owned());
            }
            if let Some(only) = only {
                args.push(format!("--only={only}"));
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_tests_bin(&env, "bench", &args)
        }
    }
}

/// Runs one of the tests crate's binaries (the lab, the bench), released.
fn run_tests_bin(env: &BuildEnv, bin: &str, args: &[&str]) -> Result<()> {
    let mut all = vec![
        "run",
        "--release",
        "--quiet",
        "-p",
        "tests",
        "--bin",
        bin,
        "--",
    ];
    all.extend_from_slice(args);
    cargo(env, &all)
}

/// The environment cargo runs with: bpf-linker on PATH.
struct BuildEnv {
    path: OsString,
}

fn build(env: &BuildEnv, release: bool) -> Result<()> {
    let mut args = vec!["build", "-p", "pop-forwarder", "-p", "tests", "--bins"];
    if release {
        args.push("--release");
    }
    cargo(env, &args)
}

fn cargo(env: &BuildEnv, args: &[&str]) -> Result<()> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(Command::new(cargo)
        .args(args)
        .env("PATH", &env.path)
        .current_dir(workspace_root()))
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_owned()
}

fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("this task needs root: it creates network namespaces and loads BPF programs");
    }
    Ok(())
}

fn setup() -> Result<BuildEnv> {
    debian_packages()?;
    rust_src()?;
    let linker_bin = bpf_linker()?;
    let mut path = OsString::from(linker_bin);
    path.push(":");
    path.push(env::var_os("PATH").unwrap_or_default());
    Ok(BuildEnv { path })
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    require_root().context(format!("installing Debian packages {missing:?}"))?;
    eprintln!("setup: installing Debian packages {missing:?}");
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .context("the nightly toolchain is needed to build the XDP program")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the nightly toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// bpf-linker must use the same LLVM as the rustc that emits the bitcode;
/// Debian 12 has no LLVM 22, but rustup's nightly ships its own
/// libLLVM.so, and bpf-linker 0.13 (feature llvm-22) links against it
/// through a prefix of two symlinks to that file; the binary keeps an rpath
/// to the prefix. Installed under ~/.cache/pop-forwarder; returns its bin
/// directory.
fn bpf_linker() -> Result<PathBuf> {
    let cache = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .context("neither XDG_CACHE_HOME nor HOME is set")?
        .join("pop-forwarder");
    let root = cache.join("bpf-linker");
    let bin = root.join("bin");
    let linker = bin.join("bpf-linker");
    // Also fails when the nightly changed and its libLLVM went away.
    let works = Command::new(&linker)
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        });
    if works {
        return Ok(bin);
    }

    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib)
        .with_context(|| format!("listing {}", lib.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let major = llvm
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .filter(|m| m.chars().all(|c| c.is_ascii_digit()))
        .with_context(|| format!("cannot read the LLVM version from {llvm}"))?
        .to_owned();
    let prefix = cache.join("llvm-prefix");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so", llvm.as_str()] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&llvm), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {major} (about a minute)"
    );
    run(
        Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args([
                "install",
                "bpf-linker",
                "--force",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ])
            .arg("--root")
            .arg(&root)
            .env("LLVM_PREFIX", &prefix),
    )?;
    Ok(bin)
}
