//! Failure injection, for the tests of transactional changes:
//! `POP_FORWARDER_FAILPOINT=KIND:N[,KIND:N…]` in a daemon's environment
//! makes the N-th table write of KIND (`route`, `next-hop`, `node`,
//! `maglev`, `vip`, `setting`, `egress`, `encap`, `local`) made inside a
//! change (a transaction: a control request, a reload, a health change, an
//! adoption) fail, once, as a failing syscall would. Only debug builds (what
//! the tests run) read it; a release build never fails on purpose.

use anyhow::Result;

#[cfg(debug_assertions)]
pub fn hit(kind: &'static str) -> Result<()> {
    use std::sync::{Mutex, OnceLock};
    /// (kind, the hit that fails, hits so far); removed once it fired.
    static ARMED: OnceLock<Mutex<Vec<(String, u32, u32)>>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| {
        let spec = std::env::var("POP_FORWARDER_FAILPOINT").unwrap_or_default();
        Mutex::new(
            spec.split(',')
                .filter_map(|one| {
                    let (kind, n) = one.split_once(':')?;
                    Some((kind.to_owned(), n.parse().ok()?, 0))
                })
                .collect(),
        )
    });
    let mut armed = armed.lock().unwrap_or_else(|e| e.into_inner());
    let Some(at) = armed.iter().position(|(k, _, _)| k == kind) else {
        return Ok(());
    };
    armed[at].2 += 1;
    if armed[at].2 == armed[at].1 {
        let n = armed.remove(at).1;
        anyhow::bail!("injected failure of {kind} write {n} (POP_FORWARDER_FAILPOINT)");
    }
    Ok(())
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn hit(_kind: &'static str) -> Result<()> {
    Ok(())
}

/// `POP_FORWARDER_NOTIFY_STALL=BYTES:MS`: the receive buffer of the kernel
/// notification socket, and a pause after each notification read, so that
/// a burst of changes overflows it (ENOBUFS), for the test of the re-read
/// that follows. Debug builds only.
#[cfg(debug_assertions)]
pub fn notify_stall() -> Option<(usize, std::time::Duration)> {
    let spec = std::env::var("POP_FORWARDER_NOTIFY_STALL").ok()?;
    let (bytes, ms) = spec.split_once(':')?;
    Some((
        bytes.parse().ok()?,
        std::time::Duration::from_millis(ms.parse().ok()?),
    ))
}

#[cfg(not(debug_assertions))]
pub fn notify_stall() -> Option<(usize, std::time::Duration)> {
    None
}
