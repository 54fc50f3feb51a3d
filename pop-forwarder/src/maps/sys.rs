//! The raw syscalls and mappings aya 0.14 lacks: batched updates and
//! lookups (BPF_MAP_UPDATE_BATCH, BPF_MAP_LOOKUP_BATCH) and BPF array maps
//! mapped into this process (the DIR-24-8 and IPv6 range tables).

use super::*;

/// A BPF array map mapped into this process (BPF_F_MMAPABLE): the DIR-24-8
/// tables (u64 pairs read as u32 entries, see dir24::ENTRIES_PER_ELEMENT),
/// the IPv6 range table, the deny filter.
pub(super) struct Mmap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value.
unsafe impl Send for Mmap {}

impl Mmap {
    /// Maps `map`, which must hold `value_size`-byte values.
    pub(super) fn new(map: &MapData, name: &str, value_size: u32) -> Result<Mmap> {
        use std::os::fd::AsRawFd as _;
        let info = map.info().with_context(|| format!("map {name}"))?;
        if info.value_size() != value_size {
            bail!(
                "map {name} holds {}-byte values, not {value_size}",
                info.value_size()
            );
        }
        // Array elements are 8-byte aligned, so with these sizes (multiples
        // of 8) they lie back to back.
        let len = info.max_entries() as usize * value_size as usize;
        // SAFETY: mmap of a BPF map fd we hold; checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mmapping map {name}"));
        }
        Ok(Mmap {
            ptr: ptr.cast(),
            len,
        })
    }

    /// The mapping as `T`s (page-aligned, so aligned for any `T`).
    pub(super) fn slice<T: bytemuck::Pod>(&mut self) -> &mut [T] {
        // SAFETY: the mapping holds `len` bytes and lives as long as self.
        let bytes = unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) };
        bytemuck::cast_slice_mut(bytes)
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The `batch` member of union bpf_attr (linux/bpf.h).
#[repr(C)]
#[derive(Default)]
pub(super) struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

pub(super) const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// BPF_MAP_UPDATE_BATCH: writes `keys[i]` -> `values[i]` in one syscall
/// (aya 0.14 has no batch API). On failure, the kernel reports how many
/// elements it wrote before the one that failed.
pub(super) fn update_batch<K: aya::Pod, V: aya::Pod>(
    map: std::os::fd::BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, std::io::Error)> {
    use std::os::fd::AsRawFd as _;
    assert_eq!(keys.len(), values.len());
    if keys.is_empty() {
        return Ok(());
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: map.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: attr points at key and value arrays of `count` elements of the
    // map's key and value sizes, alive for the call.
    unsafe { batch(BPF_MAP_UPDATE_BATCH, &mut attr) }.map_err(|e| (attr.count as usize, e))
}

/// One batch command (the kernel writes back `attr.count`, the elements it
/// did, also on failure).
///
/// # Safety
/// `attr`'s pointers must point at buffers of `count` keys and values of the
/// map's sizes (and, for lookups, at the position tokens), alive for the
/// call.
unsafe fn batch(cmd: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    // SAFETY: as the caller promised.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub(super) const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// BPF_MAP_LOOKUP_BATCH over a whole hash map: every (key, value), tens of
/// thousands per syscall rather than two syscalls per key.
pub(super) fn lookup_all<K: aya::Pod, V: aya::Pod>(
    map: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<Vec<(K, V)>> {
    lookup_all_by(map, 1 << 14)
}

/// Every element of an array map of `len` elements, in index order, read
/// with BPF_MAP_LOOKUP_BATCH (arrays answer it too, since Linux 5.6): one
/// syscall for the next-hop table rather than one per slot.
pub(super) fn array_all<V: aya::Pod>(
    map: std::os::fd::BorrowedFd<'_>,
    len: u32,
) -> std::io::Result<Vec<V>> {
    let all: Vec<(u32, V)> = lookup_all_by(map, len as usize)?;
    if all.len() != len as usize || all.iter().enumerate().any(|(i, (k, _))| *k as usize != i) {
        return Err(std::io::Error::other(format!(
            "a batched read of an array of {len} returned {} elements out of order or short",
            all.len()
        )));
    }
    Ok(all.into_iter().map(|(_, v)| v).collect())
}

/// `lookup_all`, `chunk` elements a syscall.
fn lookup_all_by<K: aya::Pod, V: aya::Pod>(
    map: std::os::fd::BorrowedFd<'_>,
    chunk: usize,
) -> std::io::Result<Vec<(K, V)>> {
    use std::os::fd::AsRawFd as _;
    let chunk = chunk.max(1);
    let mut all = Vec::new();
    // SAFETY: keys and values are Pod: any bytes the kernel writes are valid.
    let mut keys: Vec<K> = vec![unsafe { std::mem::zeroed() }; chunk];
    let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; chunk];
    // The position token: a hash map's bucket index, an array's index.
    let (mut token_in, mut token_out) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &token_in as *const u64 as u64
            },
            out_batch: &mut token_out as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: attr points at key and value buffers of `count` elements
        // of the map's key and value sizes, and at the tokens, all alive for
        // the call.
        let done = unsafe { batch(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let n = attr.count as usize;
        all.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        if let Err(e) = done {
            // ENOENT: the walk is over.
            return if e.raw_os_error() == Some(libc::ENOENT) {
                Ok(all)
            } else {
                Err(e)
            };
        }
        token_in = token_out;
        first = false;
    }
}
