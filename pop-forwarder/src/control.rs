//! The control socket: how the CLI asks the daemon, the one writer of an
//! instance's maps, to change them. One JSON line each way, typed by the
//! enums below (the CLI and the daemon share them), with a protocol version.
//!
//! The socket is a security boundary: it lives in a root-only directory
//! (see `instance`), is mode 0600 (0660 with the config's `control_group`),
//! and the daemon checks every peer's credentials (SO_PEERCRED) before it
//! reads a byte. Requests are bounded in size and time, and each connection
//! is served by its own task, so a slow or idle client stalls nothing else.

use std::{
    io::{BufRead as _, Read as _, Write as _},
    net::IpAddr,
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};

use crate::{
    config::{NodeConfig, Protocol, VipConfig},
    instance::Instance,
};

/// Bumped when a request or reply changes shape or meaning.
pub const PROTOCOL_VERSION: u32 = 1;
/// The largest request the daemon reads; larger ones are refused unread.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// How long a client may take to send its request, and to read the reply.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the CLI waits for the daemon's answer (a reload of a large
/// config takes a few seconds).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(120);
/// Connections served at once; more are refused until one ends.
pub const MAX_CONNECTIONS: usize = 32;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub version: u32,
    pub command: Command,
}

/// Everything that changes a running instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Command {
    /// Adds a route (refused if the prefix is already routed).
    RouteAdd {
        prefix: String,
        via: String,
        dev: String,
        #[serde(default)]
        mac: Option<String>,
    },
    /// Deletes the route to exactly this prefix.
    RouteDel { prefix: String },
    /// Adds a cache node (in no VIP's pool yet).
    NodeAdd(NodeConfig),
    /// Removes a node from every pool, then from the node table.
    NodeDel { name: String },
    /// Sets a node's weight (0 drains it: no new flows, its flows stay).
    NodeWeight { name: String, weight: u32 },
    /// Adds a VIP, or sets the pool of an existing one.
    VipAdd(VipConfig),
    /// Removes a VIP: its packets are routed like any others.
    VipDel {
        address: IpAddr,
        protocol: Protocol,
        port: u16,
    },
    /// Re-reads the config file and applies it (what SIGHUP does), answering
    /// with what changed or why it was refused.
    Reload,
    /// Adds a deny-list entry: `source PREFIX` or `destination PREFIX`.
    DenyAdd { entry: String },
    /// Removes a deny-list entry.
    DenyDel { entry: String },
    /// Withdraws every VIP route (maintenance); flows that still arrive
    /// are steered as before.
    Drain,
    /// Ends a drain: VIPs that can be served are announced again.
    Resume,
    /// Removes the data plane: unpins and detaches everything, then the
    /// daemon exits. The one command that stops forwarding.
    Detach,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reply {
    pub version: u32,
    pub result: Outcome,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Outcome {
    /// Done; what changed.
    Ok(String),
    /// Refused, and nothing changed; why.
    Error(String),
}

impl Reply {
    pub fn new(result: Result<String>) -> Reply {
        Reply {
            version: PROTOCOL_VERSION,
            result: match result {
                Ok(message) => Outcome::Ok(message),
                Err(e) => Outcome::Error(format!("{e:#}")),
            },
        }
    }
}

/// Parses one request line, refusing other protocol versions.
pub fn parse_request(line: &[u8]) -> Result<Command> {
    let request: Request = serde_json::from_slice(line).context("not a request")?;
    if request.version != PROTOCOL_VERSION {
        bail!(
            "protocol version {} is not this daemon's ({PROTOCOL_VERSION}); use the pop-forwarder binary the daemon runs",
            request.version
        );
    }
    Ok(request.command)
}

/// Who may use the control socket: root, this process's own user, and the
/// members of `group` (the config's `control_group`) if one is set.
#[derive(Debug, Clone, Copy)]
pub struct Access {
    pub group: Option<u32>,
}

impl Access {
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        // SAFETY: geteuid cannot fail.
        if uid == 0 || uid == unsafe { libc::geteuid() } {
            return true;
        }
        self.group
            .is_some_and(|group| gid == group || user_in_group(uid, group))
    }
}

/// Whether `uid`'s user is listed as a member of `gid` (supplementary
/// groups; SO_PEERCRED carries only the primary one).
fn user_in_group(uid: u32, gid: u32) -> bool {
    // SAFETY: getpwuid/getgrgid return pointers into static storage, read
    // at once; the daemon calls this from one thread at a time (the control
    // socket's tasks run on the current-thread runtime).
    unsafe {
        let pw = libc::getpwuid(uid);
        let gr = libc::getgrgid(gid);
        if pw.is_null() || gr.is_null() {
            return false;
        }
        let name = std::ffi::CStr::from_ptr((*pw).pw_name).to_owned();
        let mut member = (*gr).gr_mem;
        while !member.is_null() && !(*member).is_null() {
            if std::ffi::CStr::from_ptr(*member) == name.as_c_str() {
                return true;
            }
            member = member.add(1);
        }
        false
    }
}

/// The gid of group `name`, for `control_group`.
pub fn group_id(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name).context("control_group: has a NUL byte")?;
    // SAFETY: getgrnam with a NUL-terminated name; the result is read at once.
    let gr = unsafe { libc::getgrnam(c.as_ptr()) };
    if gr.is_null() {
        bail!("control_group: no group is named {name:?}");
    }
    // SAFETY: non-null result of getgrnam.
    Ok(unsafe { (*gr).gr_gid })
}

/// Binds the control socket (an old one at the path, left by a daemon that
/// died, is removed: the caller holds the instance lock) and gives it its
/// mode: 0600, or 0660 and `group`.
pub fn bind(path: &Path, access: Access) -> Result<tokio::net::UnixListener> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("creating the control socket {}", path.display()))?;
    let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
        .context("the socket path has a NUL byte")?;
    let mode = if access.group.is_some() { 0o660 } else { 0o600 };
    // SAFETY: chmod/chown on a NUL-terminated path.
    if unsafe { libc::chmod(c.as_ptr(), mode) } != 0
        || unsafe { libc::chown(c.as_ptr(), u32::MAX, access.group.unwrap_or(u32::MAX)) } != 0
    {
        let e = std::io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(e).with_context(|| format!("setting the mode of {}", path.display()));
    }
    Ok(listener)
}

/// A request the daemon's main loop is to carry out, with where to answer.
pub type Pending = (Command, tokio::sync::oneshot::Sender<Result<String>>);

/// Accepts connections for as long as the daemon runs, each served by its
/// own task that hands its request to the main loop over `requests`.
pub async fn serve(
    listener: tokio::net::UnixListener,
    access: Access,
    requests: tokio::sync::mpsc::Sender<Pending>,
) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                log::warn!("control socket: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            log::warn!("control socket: {MAX_CONNECTIONS} connections open; refused one more");
            continue;
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, access, requests).await {
                log::warn!("control socket: {e:#}");
            }
            drop(permit);
        });
    }
}

async fn connection(
    stream: tokio::net::UnixStream,
    access: Access,
    requests: tokio::sync::mpsc::Sender<Pending>,
) -> Result<()> {
    let cred = stream
        .peer_cred()
        .context("reading the peer's credentials")?;
    let (uid, gid) = (cred.uid(), cred.gid());
    let pid = cred.pid().map_or("?".into(), |p| p.to_string());
    let (read, mut write) = stream.into_split();
    let result = if !access.allows(uid, gid) {
        log::warn!(
            "control socket: refused uid {uid} gid {gid} (pid {pid}): not root, nor in the control group"
        );
        Err(anyhow::anyhow!(
            "permission denied: uid {uid} may not change this instance"
        ))
    } else {
        match read_line(read).await {
            Err(e) => Err(e),
            Ok(line) => match parse_request(&line) {
                Err(e) => Err(e),
                Ok(command) => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    requests
                        .send((command, tx))
                        .await
                        .context("the daemon is stopping")?;
                    rx.await.context("the daemon dropped the request")?
                }
            },
        }
    };
    let reply = serde_json::to_string(&Reply::new(result))? + "\n";
    tokio::time::timeout(IO_TIMEOUT, write.write_all(reply.as_bytes()))
        .await
        .context("the client did not read its reply in time")??;
    Ok(())
}

/// One request line, at most MAX_REQUEST_BYTES, within IO_TIMEOUT.
async fn read_line(read: tokio::net::unix::OwnedReadHalf) -> Result<Vec<u8>> {
    let mut reader = tokio::io::BufReader::new(read.take(MAX_REQUEST_BYTES as u64 + 1));
    let mut line = Vec::new();
    tokio::time::timeout(IO_TIMEOUT, reader.read_until(b'\n', &mut line))
        .await
        .with_context(|| format!("no whole request within {} s", IO_TIMEOUT.as_secs()))?
        .context("reading the request")?;
    if line.len() > MAX_REQUEST_BYTES {
        bail!("request larger than {MAX_REQUEST_BYTES} bytes; refused");
    }
    Ok(line)
}

/// Sends `command` to the instance's daemon and returns its answer; a
/// refusal comes back as an error with the daemon's reason.
pub fn request(instance: &Instance, command: Command) -> Result<String> {
    let path = instance.control_path();
    let mut stream = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(stream) => stream,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => bail!(
            "permission denied: {} is root's (or the config's control_group's)",
            path.display()
        ),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            bail!(
                "instance {:?} has no running daemon (nothing listens on {})",
                instance.name,
                path.display()
            )
        }
        Err(e) => return Err(e).with_context(|| format!("connecting to {}", path.display())),
    };
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    let request = Request {
        version: PROTOCOL_VERSION,
        command,
    };
    // A daemon that refuses the peer answers before reading the request, so
    // the write may fail (EPIPE) with the answer waiting: read it anyway.
    let sent = stream.write_all((serde_json::to_string(&request)? + "\n").as_bytes());
    let mut line = String::new();
    let read =
        std::io::BufReader::new((&stream).take(MAX_REQUEST_BYTES as u64)).read_line(&mut line);
    if line.is_empty() {
        sent.context("sending the request")?;
        read.context("reading the daemon's reply")?;
        bail!("the daemon closed the connection without a reply");
    }
    let reply: Reply = serde_json::from_str(&line)
        .with_context(|| format!("the daemon's reply {:?}", line.trim()))?;
    match reply.result {
        Outcome::Ok(message) => Ok(message),
        Outcome::Error(error) => bail!("{error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_are_versioned() {
        let command = Command::RouteAdd {
            prefix: "10.0.0.0/8".into(),
            via: "192.0.2.1".into(),
            dev: "eth1".into(),
            mac: None,
        };
        let line = serde_json::to_vec(&Request {
            version: PROTOCOL_VERSION,
            command: command.clone(),
        })
        .unwrap();
        assert_eq!(parse_request(&line).unwrap(), command);
        let other = br#"{"version":2,"command":"reload"}"#;
        assert!(format!("{:#}", parse_request(other).unwrap_err()).contains("protocol version 2"));
    }

    #[test]
    fn malformed_requests_are_refused() {
        for line in [
            &b"{}"[..],
            b"not json",
            br#"{"version":1}"#,
            br#"{"version":1,"command":"format_disk"}"#,
            br#"{"version":1,"command":{"route_del":{"prefix":"10.0.0.0/8","extra":1}}}"#,
            br#"{"version":1,"command":"reload","admin":true}"#,
        ] {
            assert!(
                parse_request(line).is_err(),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn access_is_root_self_or_the_group() {
        let closed = Access { group: None };
        assert!(closed.allows(0, 0));
        assert!(!closed.allows(65534, 65534));
        let open = Access { group: Some(4242) };
        assert!(open.allows(65534, 4242));
        assert!(!open.allows(65534, 65534));
    }
}
