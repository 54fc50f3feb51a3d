//! Where a running instance keeps its state, so that other processes can
//! find it: pinned maps and links in bpffs, and a pid, lock and state file
//! under /run.

use std::{
    fs::{self, File},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::config::XdpMode;

/// bpffs mount point; pins live in `BPFFS/pop-forwarder/<instance>/`.
pub const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;
const RUN_DIR: &str = "/run/pop-forwarder";

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
}

impl Instance {
    pub fn new(name: &str) -> Result<Instance> {
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!("--instance: {name:?} must be 1 to 64 letters, digits, '-' or '_'");
        }
        Ok(Instance {
            name: name.to_owned(),
        })
    }

    pub fn pin_dir(&self) -> PathBuf {
        Path::new(BPFFS).join("pop-forwarder").join(&self.name)
    }

    pub fn link_pin(&self, ifname: &str) -> PathBuf {
        self.pin_dir().join(format!("link_{ifname}"))
    }

    fn run_file(&self, ext: &str) -> PathBuf {
        Path::new(RUN_DIR).join(format!("{}.{ext}", self.name))
    }

    pub fn state_path(&self) -> PathBuf {
        self.run_file("json")
    }

    /// The daemon's control socket (commands that change its own state,
    /// such as a node's weight).
    pub fn control_path(&self) -> PathBuf {
        self.run_file("sock")
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

    /// Serialises table writers (daemon and CLI) of this instance. Held until
    /// the returned file is dropped.
    pub fn lock(&self) -> Result<File> {
        fs::create_dir_all(RUN_DIR).with_context(|| format!("creating {RUN_DIR}"))?;
        let path = self.run_file("lock");
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("locking {}", path.display()));
        }
        Ok(file)
    }

    pub fn write_state(&self, state: &State) -> Result<()> {
        fs::create_dir_all(RUN_DIR).with_context(|| format!("creating {RUN_DIR}"))?;
        let path = self.state_path();
        // Written aside and renamed over: a reader never sees half a file.
        let tmp = path.with_extension("json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(state)?)
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

    /// The daemon's pid, if the state file names one that is alive.
    pub fn daemon_pid(&self) -> Option<u32> {
        let state = self.read_state()?;
        let cmdline = fs::read(format!("/proc/{}/cmdline", state.pid)).ok()?;
        // A pid is reused after a crash; only trust one running our binary.
        String::from_utf8_lossy(&cmdline)
            .contains("pop-forwarder")
            .then_some(state.pid)
    }

    /// Removes every pin of this instance: links (which detaches XDP where no
    /// process still holds the link) and maps.
    pub fn remove_pins(&self) -> Result<()> {
        let dir = self.pin_dir();
        if !dir.exists() {
            return Ok(());
        }
        for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry?.path();
            fs::remove_file(&path).with_context(|| format!("removing pin {}", path.display()))?;
        }
        fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
        Ok(())
    }
}

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there, as systemd does
/// at boot; a fresh machine of this kind has the directory but no mount.
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
            std::ptr::null(),
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mounting bpffs at {BPFFS}"));
    }
    Ok(())
}
