//! Where a running instance keeps its state, so that other processes can
//! find it: pinned maps and links in bpffs, and a lock, state file and
//! control socket under /run. Both places are root-only: what is found
//! there is adopted by the next daemon, so a directory another user could
//! have written is refused, not trusted.

use std::{
    fs::{self, File},
    io::Write as _,
    os::{
        fd::AsRawFd,
        unix::{
            ffi::OsStrExt as _,
            fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _},
        },
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::config::XdpMode;

/// bpffs mount point; pins live in `BPFFS/pop-forwarder/<instance>/`.
pub const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;
/// Where instances keep their lock, state file and control socket, unless
/// `--run-dir` (POP_FORWARDER_RUN_DIR) says otherwise.
pub const RUN_DIR: &str = "/run/pop-forwarder";

/// What `run` records about itself for `status` and `detach`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub pid: u32,
    pub config: PathBuf,
    pub interfaces: Vec<AttachedInterface>,
    pub started_unix: u64,
    /// VIPs and cache nodes as they are now, with their slots and health.
    #[serde(default)]
    pub steering: crate::steering::SteeringState,
    /// `drain`ed: no VIP is announced until `resume`. Kept across
    /// restarts, so an upgrade of a drained forwarder stays drained.
    #[serde(default)]
    pub draining: bool,
    /// The table VIP routes were announced in (`vip_route_table`), so that
    /// a daemon started with another table withdraws them from this one.
    #[serde(default)]
    pub vip_route_table: Option<u32>,
    /// Where the routes come from: `Some(Some(table))`, mirrored from that
    /// kernel table (`route_source = "kernel"`); `Some(None)`, the config
    /// and the CLI; None, not known (a file written by a build before this
    /// field, whose `null` would otherwise read as "the config").
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub mirrored_table: Option<Option<u32>>,
}

/// A field that is in the file, `null` or not: `Some`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<u32>>, D::Error> {
    Ok(Some(Option::<u32>::deserialize(d)?))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttachedInterface {
    pub name: String,
    pub ifindex: u32,
    pub mode: XdpMode,
}

#[derive(Debug, Clone)]
pub struct Instance {
    pub name: String,
    /// The run directory (default `RUN_DIR`).
    pub run_dir: PathBuf,
}

impl Instance {
    pub fn new(name: &str, run_dir: &Path) -> Result<Instance> {
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!("--instance: {name:?} must be 1 to 64 letters, digits, '-' or '_'");
        }
        if !run_dir.is_absolute() {
            bail!("--run-dir: {} is not an absolute path", run_dir.display());
        }
        Ok(Instance {
            name: name.to_owned(),
            run_dir: run_dir.to_owned(),
        })
    }

    pub fn pin_dir(&self) -> PathBuf {
        Path::new(BPFFS).join("pop-forwarder").join(&self.name)
    }

    pub fn link_pin(&self, ifname: &str) -> PathBuf {
        self.pin_dir().join(format!("link_{ifname}"))
    }

    fn run_file(&self, ext: &str) -> PathBuf {
        self.run_dir.join(format!("{}.{ext}", self.name))
    }

    pub fn state_path(&self) -> PathBuf {
        self.run_file("json")
    }

    /// The daemon's control socket (commands that change its own state,
    /// such as a node's weight).
    pub fn control_path(&self) -> PathBuf {
        self.run_file("sock")
    }

    pub fn lock_path(&self) -> PathBuf {
        self.run_file("lock")
    }

    pub fn exists(&self) -> bool {
        self.pin_dir().exists()
    }

    /// Fails with a message an operator can act on if no instance of this
    /// name has pinned its maps.
    pub fn require(&self) -> Result<()> {
        if !self.exists() {
            bail!(
                "no pop-forwarder instance {:?} is running (nothing pinned at {}); start one with `pop-forwarder run --config FILE`",
                self.name,
                self.pin_dir().display()
            );
        }
        Ok(())
    }

    /// Takes the instance's lock, which its daemon holds for its whole life
    /// (and `detach` while it removes the pins of an instance whose daemon
    /// is gone): two processes never own one instance. Fails, naming the
    /// holder, if another process has it. A process that only probes the
    /// lock (`daemon_pid`) holds it for microseconds, so the attempt is
    /// repeated for a second before giving up.
    pub fn lock(&self, group: Option<u32>) -> Result<InstanceLock> {
        self.prepare_run_dir(group)?;
        let path = self.lock_path();
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        for attempt in 0.. {
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
            if attempt == 50 {
                let holder =
                    read_pid(&path).map_or("another process".into(), |p| format!("pid {p}"));
                bail!(
                    "instance {:?} is already owned by {holder} (it holds {}); stop it first, or pick another --instance",
                    self.name,
                    path.display()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        file.set_len(0)
            .and_then(|()| (&file).write_all(format!("{}\n", std::process::id()).as_bytes()))
            .with_context(|| format!("writing the pid into {}", path.display()))?;
        Ok(InstanceLock { _file: file })
    }

    pub fn write_state(&self, state: &State) -> Result<()> {
        let path = self.state_path();
        // Written aside and renamed over: a reader never sees half a file.
        let tmp = path.with_extension("json.tmp");
        let _ = fs::remove_file(&tmp);
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(&serde_json::to_vec_pretty(state)?))
            .with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    }

    pub fn read_state(&self) -> Option<State> {
        serde_json::from_slice(&fs::read(self.state_path()).ok()?).ok()
    }

    pub fn remove_state(&self) {
        let _ = fs::remove_file(self.state_path());
    }

    /// The pid of the daemon that owns this instance, if one does: liveness
    /// is the lock its daemon holds, never a process list.
    pub fn daemon_pid(&self) -> Option<u32> {
        let path = self.lock_path();
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .ok()?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
            // Nobody holds it: no daemon. Closing the file releases it.
            return None;
        }
        read_pid(&path)
    }

    /// Removes every pin of this instance: the links first, each detached
    /// from its interface, so that the data plane is off before anything
    /// else goes; then the maps. A pin that cannot be removed does not stop
    /// the others: every one is tried, and the first failure (with how many
    /// there were) is returned, the directory then left in place. A pin
    /// named as a link that holds something else (only root can put one in
    /// the root-only directory) has nothing to detach: its pin is removed.
    pub fn remove_pins(&self) -> Result<()> {
        let dir = self.pin_dir();
        if !dir.exists() {
            return Ok(());
        }
        let (links, others): (Vec<_>, Vec<_>) = self
            .pin_names()?
            .into_iter()
            .map(|name| dir.join(name))
            .partition(|path| {
                path.file_name()
                    .is_some_and(|n| n.as_bytes().starts_with(b"link_"))
            });
        let mut failed = Vec::new();
        for path in &links {
            if let Err(e) = remove_link_pin(path) {
                failed.push(e);
            }
        }
        for path in &others {
            if let Err(e) = remove_pin(path) {
                failed.push(e);
            }
        }
        let count = failed.len();
        if let Some(first) = failed.into_iter().next() {
            return Err(first.context(format!(
                "{count} of the {} pins in {} could not be removed; the rest were",
                links.len() + others.len(),
                dir.display()
            )));
        }
        fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
        Ok(())
    }

    /// What is pinned in the instance's directory: each entry's name,
    /// sorted.
    fn pin_names(&self) -> Result<Vec<std::ffi::OsString>> {
        let dir = self.pin_dir();
        let mut names = Vec::new();
        for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            names.push(entry?.file_name());
        }
        names.sort();
        Ok(names)
    }

    /// The interfaces with an XDP link pinned here (`link_pin`): every
    /// `link_NAME` but the tracepoints' (`link_tp_TRACEPOINT`).
    pub fn xdp_link_names(&self, tracepoints: &[&str]) -> Result<Vec<String>> {
        Ok(self
            .pin_names()?
            .iter()
            .filter_map(|file| file.to_str()?.strip_prefix("link_"))
            .filter(|name| {
                !name
                    .strip_prefix("tp_")
                    .is_some_and(|t| tracepoints.contains(&t))
            })
            .map(str::to_owned)
            .collect())
    }

    /// Where a migration (`daemon::start`, pins of another map layout)
    /// pins the new map `name` until the new program is on every link.
    pub fn staged_pin(&self, name: &str) -> PathBuf {
        self.pin_dir().join(format!("{STAGED}{name}"))
    }

    /// Removes the staged pins a migration left (one that failed, or a
    /// daemon that died in one): their maps are not this instance's yet,
    /// and a new migration must not reuse them. Returns how many went.
    pub fn remove_staged_pins(&self) -> Result<usize> {
        let dir = self.pin_dir();
        let mut removed = 0;
        for name in self.pin_names()? {
            if name.as_bytes().starts_with(STAGED.as_bytes()) {
                remove_pin(&dir.join(name))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Ends a migration once the new program is on every link. The old
    /// settings map's pin goes first: from then until the new one is in
    /// its place, the pins are a mix of old and new tables that no build
    /// may adopt, and without a settings map none does (this one migrates
    /// again, reading nothing of the old maps; an older one refuses). Then
    /// each staged map pin replaces the old map's (a rename), the old
    /// maps this layout has not lose their pins, and the new settings
    /// map's pin goes in last.
    pub fn commit_staged_pins(&self, names: &[&str], settings: &str) -> Result<()> {
        let dir = self.pin_dir();
        let old_settings = dir.join(settings);
        if old_settings.exists() {
            remove_pin(&old_settings)?;
        }
        for name in names.iter().filter(|n| **n != settings) {
            let (from, to) = (self.staged_pin(name), dir.join(name));
            fs::rename(&from, &to)
                .with_context(|| format!("renaming {} to {}", from.display(), to.display()))?;
        }
        for name in self.pin_names()? {
            let file = name.to_string_lossy();
            if !file.starts_with("link_")
                && !file.starts_with(STAGED)
                && !names.iter().any(|n| *n == file)
            {
                remove_pin(&dir.join(&name))?;
            }
        }
        let (from, to) = (self.staged_pin(settings), dir.join(settings));
        fs::rename(&from, &to)
            .with_context(|| format!("renaming {} to {}", from.display(), to.display()))
    }

    /// The run directory: root's, mode 0700, or 0710 with `group` (the
    /// config's `control_group`, whose members may then reach the control
    /// socket).
    pub fn prepare_run_dir(&self, group: Option<u32>) -> Result<()> {
        secure_dir(&self.run_dir, 0o010, group)
    }

    /// Makes the instance's pin directory (and its parent) root-only, or
    /// refuses one that another user could have written: a map or link
    /// planted there would be adopted as the instance's own. Returns whether
    /// the instance already had pins.
    pub fn prepare_pin_dir(&self) -> Result<bool> {
        let dir = self.pin_dir();
        let parent = dir.parent().expect("the pin dir has a parent");
        secure_dir(parent, 0, None)?;
        let existed = dir.exists();
        secure_dir(&dir, 0, None)?;
        Ok(existed && fs::read_dir(&dir)?.next().is_some())
    }
}

/// What a staged map pin's name starts with (`Instance::staged_pin`).
const STAGED: &str = "new_";

/// Removes the link pinned at `path`, detached first (`detach_link`).
pub fn remove_link_pin(path: &Path) -> Result<()> {
    detach_link(path)?;
    remove_pin(path)
}

fn remove_pin(path: &Path) -> Result<()> {
    fs::remove_file(path).with_context(|| format!("removing pin {}", path.display()))
}

/// Detaches the link pinned at `path` (XDP: from its interface) now
/// (BPF_LINK_DETACH). Removing the pin alone drops the link's last
/// reference, but the kernel releases it in deferred work: for a moment
/// after `detach` returned, the program would still see packets. Detaching
/// a link another process holds too is the point: `detach` removes the data
/// plane, whoever holds it. A link already detached (its interface gone)
/// detaches again without error.
fn detach_link(path: &Path) -> Result<()> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    /// The `obj_get` member of union bpf_attr (linux/bpf.h).
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let name = std::ffi::CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("{} is not a path", path.display()))?;
    let mut get = ObjGet {
        pathname: name.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: attr is an obj_get of the size passed, its path alive for the
    // call; a non-negative result is a new descriptor, owned from here.
    let link = unsafe {
        let fd = libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &mut get as *mut ObjGet,
            size_of::<ObjGet>(),
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("opening the pinned link {}", path.display()));
        }
        OwnedFd::from_raw_fd(fd as i32)
    };
    // The `link_detach` member of union bpf_attr.
    let mut link_fd = link.as_raw_fd() as u32;
    // SAFETY: attr is a link_detach of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            &mut link_fd as *mut u32,
            size_of::<u32>(),
        )
    };
    let e = std::io::Error::last_os_error();
    // A kind of link that cannot be detached (the tracepoint link counting
    // failed redirects, EOPNOTSUPP) goes when its pin does; so does an
    // object pinned there that is no link at all (a map or a program,
    // EINVAL): it holds no interface.
    if rc != 0 && !matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) {
        return Err(e).with_context(|| {
            format!(
                "detaching the link pinned at {} (BPF_LINK_DETACH)",
                path.display()
            )
        });
    }
    Ok(())
}

/// Held by the daemon for its whole life: see `Instance::lock`.
pub struct InstanceLock {
    _file: File,
}

fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Creates `dir` root-only (0700), or checks an existing one: a real
/// directory (not a link), owned by this (root) user, with no permission
/// for others beyond `allowed` (for the run directory, the search bit of a
/// control group). Anything else is refused with a message saying what is
/// wrong, never trusted or repaired. With `group`, the directory is opened
/// to that group (0710); without, its mode is left as it is, since another
/// instance may have opened it to its own control group.
pub fn secure_dir(dir: &Path, allowed: u32, group: Option<u32>) -> Result<()> {
    let meta = match fs::symlink_metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
            fs::symlink_metadata(dir).with_context(|| format!("reading {}", dir.display()))?
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if !meta.file_type().is_dir() {
        bail!(
            "{} is not a directory (a symbolic link or a file?); refusing to use it: remove it and start again",
            dir.display()
        );
    }
    if meta.uid() != me {
        bail!(
            "{} is owned by uid {}, not by uid {me} (this process); refusing to trust it: remove it, or `chown {me} {}`",
            dir.display(),
            meta.uid(),
            dir.display()
        );
    }
    let loose = meta.mode() & 0o077 & !allowed;
    if loose != 0 {
        bail!(
            "{} has mode {:o}: other users may {} it; refusing to trust what it holds: `chmod 700 {}` (or remove it) and start again",
            dir.display(),
            meta.mode() & 0o7777,
            if loose & 0o022 != 0 {
                "write to"
            } else {
                "look into"
            },
            dir.display()
        );
    }
    let Some(group) = group else {
        return Ok(());
    };
    if meta.mode() & 0o070 != 0 && meta.gid() != group {
        bail!(
            "{} is open to group {} (another instance's control_group); one run directory serves one control group: give this instance its own with --run-dir",
            dir.display(),
            meta.gid()
        );
    }
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .with_context(|| format!("{} has a NUL byte", dir.display()))?;
    // SAFETY: chown/chmod on a NUL-terminated path.
    if unsafe { libc::chown(path.as_ptr(), u32::MAX, group) } != 0
        || unsafe { libc::chmod(path.as_ptr(), 0o710) } != 0
    {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("opening {} to group {group}", dir.display()));
    }
    Ok(())
}

/// The tracepoints' directory of tracefs (its `events`), mounting tracefs
/// at /sys/kernel/tracing if it is mounted nowhere, as systemd does at
/// boot.
pub fn ensure_tracefs() -> Result<std::path::PathBuf> {
    for dir in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        let events = Path::new(dir).join("events");
        if events.join("xdp").exists() {
            return Ok(events);
        }
    }
    let path = c"/sys/kernel/tracing";
    // SAFETY: plain mount(2) with NUL-terminated strings.
    if unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            path.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error())
            .context("mounting tracefs at /sys/kernel/tracing");
    }
    Ok(Path::new("/sys/kernel/tracing").join("events"))
}

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there, as systemd does
/// at boot (root-only, mode 0700); a fresh machine of this kind has the
/// directory but no mount.
pub fn ensure_bpffs() -> Result<()> {
    let path = std::ffi::CString::new(BPFFS).expect("no NUL in a constant");
    // SAFETY: statfs into a zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    fs::create_dir_all(BPFFS).with_context(|| format!("creating {BPFFS}"))?;
    let fstype = std::ffi::CString::new("bpf").expect("no NUL in a constant");
    // SAFETY: plain mount(2) with NUL-terminated strings.
    if unsafe {
        libc::mount(
            fstype.as_ptr(),
            path.as_ptr(),
            fstype.as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mounting bpffs at {BPFFS}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the routes come from survives the state file: mirrored, from
    /// the config, or (a file of a build before the field) not known,
    /// which must not read as "from the config".
    #[test]
    fn the_mirrored_table_is_known_only_when_the_file_says() {
        let state = |mirrored_table| State {
            pid: 1,
            config: "/etc/pop.toml".into(),
            interfaces: Vec::new(),
            started_unix: 0,
            steering: Default::default(),
            draining: false,
            vip_route_table: None,
            mirrored_table,
        };
        for known in [Some(Some(254)), Some(None)] {
            let text = serde_json::to_string(&state(known)).unwrap();
            let back: State = serde_json::from_str(&text).unwrap();
            assert_eq!(back.mirrored_table, known, "{text}");
        }
        let old = serde_json::to_string(&state(None)).unwrap();
        assert!(!old.contains("mirrored_table"), "{old}");
        let back: State = serde_json::from_str(&old).unwrap();
        assert_eq!(back.mirrored_table, None);
    }
}
