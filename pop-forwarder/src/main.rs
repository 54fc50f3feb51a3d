//! The pop-forwarder command line.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use pop_forwarder::{
    config::{Model, Prefix, Route},
    daemon::{self, BpfLogLevel},
    instance::Instance,
    kernel,
    tables::{Tables, resolve_next_hop},
};

/// XDP router for PoP edge servers: longest-prefix-match forwarding in the
/// NIC driver, run and changed from this one command.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Which forwarder instance to act on; its maps are pinned under
    /// /sys/fs/bpf/pop-forwarder/<INSTANCE>.
    #[arg(
        long,
        global = true,
        default_value = "default",
        env = "POP_FORWARDER_INSTANCE"
    )]
    instance: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach to the config's interfaces, fill the tables and forward until
    /// Ctrl-C or SIGTERM, then detach.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Lowest level of the XDP program's own log records (malformed
        /// drops are `debug`); they are logged under the target `bpf`.
        #[arg(long, value_enum, default_value = "warn")]
        bpf_log_level: BpfLogLevel,
    },
    /// Validate a config file without touching the kernel.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Change or show the running instance's routes.
    #[command(subcommand)]
    Route(RouteCommand),
    /// Packet counters by outcome, and traffic per next hop.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Whether the instance runs, where it is attached, how big its tables are.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Stop the instance's daemon (or, if it died, remove what it left
    /// attached and pinned).
    Detach,
}

#[derive(Subcommand)]
enum RouteCommand {
    /// Add a route: PREFIX via GATEWAY on DEV. Without --mac, the gateway's
    /// MAC comes from the kernel's neighbour table.
    Add {
        prefix: String,
        #[arg(long)]
        via: String,
        #[arg(long)]
        dev: String,
        #[arg(long)]
        mac: Option<String>,
    },
    /// Delete the route to exactly PREFIX.
    Del { prefix: String },
    /// List the routes.
    List {
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info,bpf=trace"))
        .init();
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    let instance = Instance::new(&cli.instance)?;
    match cli.command {
        Command::Run {
            config,
            bpf_log_level,
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the tokio runtime")?
            .block_on(daemon::run(&instance, &config, bpf_log_level)),
        Command::Check { config } => {
            let model = Model::from_file(&config)?;
            println!(
                "{}: ok ({} interfaces, {} routes)",
                config.display(),
                model.interfaces.len(),
                model.routes.len()
            );
            Ok(())
        }
        Command::Route(cmd) => route(&instance, cmd),
        Command::Stats { json } => stats(&instance, json),
        Command::Status { json } => status(&instance, json),
        Command::Detach => detach(&instance),
    }
}

fn open(instance: &Instance) -> Result<Tables> {
    instance.require()?;
    Tables::from_pins(&instance.pin_dir())
}

fn route(instance: &Instance, cmd: RouteCommand) -> Result<()> {
    match cmd {
        RouteCommand::Add {
            prefix,
            via,
            dev,
            mac,
        } => {
            let route = Route::parse(&prefix, &via, &dev, mac.as_deref())?;
            let links = kernel::links()?;
            let nh = resolve_next_hop(&route, &links, &kernel::neighbours()?)?;
            let mut tables = open(instance)?;
            let _lock = instance.lock()?;
            let id = tables.add_route(route.prefix, &nh)?;
            println!(
                "added {} via {} dev {} (next hop {id})",
                route.prefix, route.via, route.dev
            );
        }
        RouteCommand::Del { prefix } => {
            let prefix: Prefix = prefix.parse()?;
            let mut tables = open(instance)?;
            let _lock = instance.lock()?;
            tables.del_route(prefix)?;
            println!("deleted {prefix}");
        }
        RouteCommand::List { json } => {
            let routes = open(instance)?.routes(&kernel::links()?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&routes)?);
            } else {
                println!(
                    "{:<44} {:<40} {:<16} {:<28} NEXT HOP",
                    "PREFIX", "VIA", "DEV", "MAC"
                );
                for r in routes {
                    let mac = match (&r.mac, r.mac_static) {
                        (Some(m), true) => format!("{m} (static)"),
                        (Some(m), false) => m.clone(),
                        (None, _) => "unresolved".into(),
                    };
                    println!(
                        "{:<44} {:<40} {:<16} {:<28} {}",
                        r.prefix, r.via, r.dev, mac, r.next_hop
                    );
                }
            }
        }
    }
    Ok(())
}

fn stats(instance: &Instance, json: bool) -> Result<()> {
    let stats = open(instance)?.stats(&kernel::links()?)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
        return Ok(());
    }
    println!("{:<24} {:>16}", "OUTCOME", "PACKETS");
    for c in pop_forwarder_common::Counter::ALL {
        println!("{:<24} {:>16}", c.name(), stats.counters[c.name()]);
    }
    println!();
    println!(
        "{:<9} {:<40} {:<16} {:>16} {:>18}",
        "NEXT HOP", "VIA", "DEV", "PACKETS", "BYTES"
    );
    for nh in &stats.next_hops {
        println!(
            "{:<9} {:<40} {:<16} {:>16} {:>18}",
            nh.id, nh.via, nh.dev, nh.packets, nh.bytes
        );
    }
    Ok(())
}

fn status(instance: &Instance, json: bool) -> Result<()> {
    instance.require()?;
    let tables = Tables::from_pins(&instance.pin_dir())?;
    let state = instance.read_state();
    let pid = instance.daemon_pid();
    let (v4, v6) = tables.route_counts();
    let links = kernel::links()?;
    let interfaces: Vec<_> = state
        .iter()
        .flat_map(|s| &s.interfaces)
        .map(|i| {
            let attached = links.iter().any(|l| l.ifindex == i.ifindex && l.xdp_attached);
            serde_json::json!({ "name": i.name, "ifindex": i.ifindex, "mode": i.mode, "xdp_attached": attached })
        })
        .collect();
    let report = serde_json::json!({
        "instance": instance.name,
        "daemon_pid": pid,
        "running": pid.is_some(),
        "pin_dir": instance.pin_dir(),
        "config": state.as_ref().map(|s| &s.config),
        "interfaces": interfaces,
        "routes_v4": v4,
        "routes_v6": v6,
        "route_miss": format!("{:?}", tables.route_miss()?).to_lowercase(),
        "ipv4_lookup": tables.ipv4_lookup()?.to_string(),
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    match pid {
        Some(pid) => println!("instance {}: running (pid {pid})", instance.name),
        None => println!(
            "instance {}: daemon NOT running; pins left at {}",
            instance.name,
            instance.pin_dir().display()
        ),
    }
    if let Some(s) = &state {
        println!("config:      {}", s.config.display());
    }
    for i in &interfaces {
        println!(
            "interface:   {} (ifindex {}, {} mode, {})",
            i["name"].as_str().unwrap_or_default(),
            i["ifindex"],
            i["mode"].as_str().unwrap_or_default(),
            if i["xdp_attached"].as_bool() == Some(true) {
                "XDP attached"
            } else {
                "XDP NOT attached"
            }
        );
    }
    println!("routes:      {v4} IPv4, {v6} IPv6");
    println!(
        "route miss:  {}",
        report["route_miss"].as_str().unwrap_or_default()
    );
    println!(
        "ipv4 lookup: {}",
        report["ipv4_lookup"].as_str().unwrap_or_default()
    );
    Ok(())
}

fn detach(instance: &Instance) -> Result<()> {
    if let Some(pid) = instance.daemon_pid() {
        // SAFETY: kill(2) on a pid we just verified runs pop-forwarder.
        if unsafe { libc::kill(pid as i32, libc::SIGTERM) } != 0 {
            return Err(std::io::Error::last_os_error()).context(format!("signalling pid {pid}"));
        }
        for _ in 0..100 {
            if !instance.exists() {
                println!(
                    "instance {}: daemon (pid {pid}) stopped and detached",
                    instance.name
                );
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("daemon pid {pid} did not detach within 10 s");
    }
    instance.require()?;
    instance.remove_pins()?;
    instance.remove_state();
    println!(
        "instance {}: no daemon; removed its pins (XDP detached)",
        instance.name
    );
    Ok(())
}
