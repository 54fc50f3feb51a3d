//! rtnetlink, spoken directly: dumps (links, addresses, neighbours, routes)
//! and requests on a blocking socket, and a subscription to the kernel's
//! change notifications on a thread of its own.
//!
//! Messages are built and parsed by netlink-packet-route; the sockets are
//! netlink-sys's. Both ask the network namespace this process is in.

use std::{
    io,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result, bail};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REPLACE, NLM_F_REQUEST,
    NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// Receive buffer of one recv: a dump's datagrams are at most 32 KiB.
const RECV_BUFFER: usize = 1 << 17;
/// A dump interrupted by a change (NLM_F_DUMP_INTR) is tried this often.
const DUMP_ATTEMPTS: usize = 5;

static SEQUENCE: AtomicU32 = AtomicU32::new(1);

fn socket() -> Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE).context("opening a netlink socket")?;
    socket.bind_auto().context("binding a netlink socket")?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .context("connecting a netlink socket to the kernel")?;
    Ok(socket)
}

fn send(socket: &Socket, message: RouteNetlinkMessage, flags: u16) -> Result<u32> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0).context("sending a netlink request")?;
    Ok(header.sequence_number)
}

/// The messages of one datagram, in order.
pub(crate) fn parse(datagram: &[u8]) -> Result<Vec<NetlinkMessage<RouteNetlinkMessage>>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < datagram.len() {
        let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&datagram[at..])
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("decoding a netlink message")?;
        let len = message.header.length as usize;
        if len == 0 {
            bail!("a netlink message of length 0");
        }
        out.push(message);
        // Messages are aligned to 4 bytes.
        at += (len + 3) & !3;
    }
    Ok(out)
}

fn receive(socket: &Socket) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(RECV_BUFFER);
    let n = socket.recv(&mut buf, libc::MSG_TRUNC)?;
    if n > RECV_BUFFER {
        return Err(io::Error::other(format!(
            "a netlink datagram of {n} bytes is larger than the {RECV_BUFFER}-byte buffer"
        )));
    }
    Ok(buf)
}

/// Empties a subscription's socket after an overflow, dropping what it
/// held: the table read again afterwards is newer than all of it. The
/// kernel reports an overflow (ENOBUFS) once, then drops notifications
/// silently until the socket's queue has been empty; a table read while
/// the queue still held a backlog would miss what was dropped after it
/// and never hear of the loss. Once the queue is empty, the next drop is
/// reported again. A storm that refills it as fast as it empties is given
/// up on after a second: the table is read again then, as before.
fn drain(socket: &Socket) {
    let mut buf = Vec::with_capacity(RECV_BUFFER);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while std::time::Instant::now() < until {
        buf.clear();
        match socket.recv(&mut buf, libc::MSG_DONTWAIT | libc::MSG_TRUNC) {
            Ok(_) => {}
            // More dropped meanwhile, or a signal: go on.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::EINTR)) => {}
            // Empty (EAGAIN), or an error the next blocking read reports.
            Err(_) => return,
        }
    }
}

/// Everything a dump request returns (NLM_F_DUMP), tried again if a change
/// interrupted it.
pub fn dump(request: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>> {
    dump_on(socket()?, request)
}

/// A dump the kernel filters by the request's fields (NETLINK_GET_STRICT_CHK):
/// a route dump with RTA_TABLE returns that table's routes only, rather than
/// every route of every table.
pub fn dump_filtered(request: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>> {
    let socket = socket()?;
    socket
        .set_netlink_get_strict_chk(true)
        .context("asking for strict netlink checking (NETLINK_GET_STRICT_CHK)")?;
    dump_on(socket, request)
}

fn dump_on(socket: Socket, request: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>> {
    'attempt: for _ in 0..DUMP_ATTEMPTS {
        let seq = send(&socket, request.clone(), NLM_F_REQUEST | NLM_F_DUMP)?;
        let mut out = Vec::new();
        let mut interrupted = false;
        loop {
            let datagram = receive(&socket).context("reading a netlink dump")?;
            for message in parse(&datagram)? {
                if message.header.sequence_number != seq {
                    continue;
                }
                interrupted |= message.header.flags & NLM_F_DUMP_INTR != 0;
                match message.payload {
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    NetlinkPayload::Done(_) if interrupted => continue 'attempt,
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => match e.code {
                        Some(code) => {
                            return Err(io::Error::from_raw_os_error(-code.get()))
                                .context("the kernel refused a netlink dump");
                        }
                        None => return Ok(out),
                    },
                    _ => {}
                }
            }
        }
    }
    bail!("a netlink dump was interrupted by changes {DUMP_ATTEMPTS} times in a row")
}

/// Sends a change (`NLM_F_CREATE | NLM_F_REPLACE`) and waits for the
/// kernel's answer.
pub fn replace(request: RouteNetlinkMessage) -> Result<()> {
    change(request, NLM_F_CREATE | NLM_F_REPLACE).map_err(Into::into)
}

/// Sends a change with `flags` (besides request and ack) and waits for the
/// kernel's answer, its error as an `io::Error` (EEXIST, ESRCH…).
pub fn change(request: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
    let socket = socket().map_err(io::Error::other)?;
    let seq =
        send(&socket, request, NLM_F_REQUEST | NLM_F_ACK | flags).map_err(io::Error::other)?;
    loop {
        let datagram = receive(&socket)?;
        for message in parse(&datagram).map_err(io::Error::other)? {
            if message.header.sequence_number != seq {
                continue;
            }
            if let NetlinkPayload::Error(e) = message.payload {
                return match e.code {
                    Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                    None => Ok(()),
                };
            }
        }
    }
}

/// What a subscription hears.
#[derive(Debug)]
pub enum Event {
    /// A change of routes, links, addresses or neighbours, as the kernel
    /// announced it, with its netlink header's flags.
    Message(u16, RouteNetlinkMessage),
    /// The socket overflowed (ENOBUFS): changes were lost, so whatever is
    /// mirrored must be read again whole.
    Overflow,
}

/// rtnetlink multicast groups (linux/rtnetlink.h, enum rtnetlink_groups).
pub mod groups {
    pub const LINK: u32 = 1;
    pub const NEIGH: u32 = 3;
    pub const IPV4_IFADDR: u32 = 5;
    pub const IPV4_ROUTE: u32 = 7;
    pub const IPV6_IFADDR: u32 = 9;
    pub const IPV6_ROUTE: u32 = 11;
}

/// Subscribes to `groups` now (so that nothing between this call and a dump
/// that follows it is missed), and hands every message heard to `deliver`
/// on a thread of its own, until `deliver` returns false.
pub fn subscribe(
    groups: &[u32],
    receive_buffer: usize,
    mut deliver: impl FnMut(Event) -> bool + Send + 'static,
) -> Result<()> {
    let socket = socket()?;
    for &group in groups {
        socket
            .add_membership(group)
            .with_context(|| format!("subscribing to rtnetlink group {group}"))?;
    }
    // SO_RCVBUFFORCE (root may pass rmem_max): a burst of route changes
    // from a BGP session coming up must not overflow the socket.
    let size = receive_buffer as libc::c_int;
    // SAFETY: a plain setsockopt on a socket this function owns, with a
    // pointer to an int that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        socket
            .set_rx_buf_sz(receive_buffer)
            .context("sizing the netlink receive buffer")?;
    }
    std::thread::Builder::new()
        .name("netlink".into())
        .spawn(move || {
            loop {
                let event = match receive(&socket) {
                    Ok(datagram) => match parse(&datagram) {
                        Ok(messages) => {
                            let mut open = true;
                            for m in messages {
                                let flags = m.header.flags;
                                if let NetlinkPayload::InnerMessage(m) = m.payload {
                                    open &= deliver(Event::Message(flags, m));
                                }
                            }
                            if !open {
                                return;
                            }
                            continue;
                        }
                        Err(e) => {
                            log::warn!("netlink: {e:#}; reading everything again");
                            Event::Overflow
                        }
                    },
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        drain(&socket);
                        Event::Overflow
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::error!("netlink: reading notifications: {e}; again in 1 s");
                        std::thread::sleep(std::time::Duration::from_secs(1));
                        Event::Overflow
                    }
                };
                if !deliver(event) {
                    return;
                }
            }
        })
        .context("starting the netlink thread")?;
    Ok(())
}
