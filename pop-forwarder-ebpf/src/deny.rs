//! The deny list: prefixes whose packets, by source or destination, are
//! dropped before any other lookup, each entry with its own counters.
//!
//! One LPM trie per family; a key is the direction byte followed by the
//! address, so a source and a destination entry for one prefix are two
//! keys. The host sets `DENY_ON` only while the list has an entry: an empty
//! list costs one settings read. An IPv4 /24 or IPv6 /48 the tries
//! answered for whole (`deny::DECIDES`) is answered from a per-CPU cache
//! until the list changes (see `deny::CacheSlot`).

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, LpmTrie, PerCpuArray, lpm_trie::Key},
};
use pop_forwarder_common::{MAX_DENY, TrafficCounter, deny, settings};

/// The answers the tries gave for whole IPv4 /24s and IPv6 /48s, per CPU,
/// of the list's generation they name (`settings::DENY_GENERATION`).
#[map]
static DENY_CACHE: PerCpuArray<deny::CacheSlot> =
    PerCpuArray::with_max_entries(deny::CACHE_SLOTS, 0);

use crate::maps::{SETTINGS, add_traffic};

#[map]
static DENY_V4: LpmTrie<deny::KeyV4, u32> = LpmTrie::with_max_entries(MAX_DENY, 0);

#[map]
static DENY_V6: LpmTrie<deny::KeyV6, u32> = LpmTrie::with_max_entries(MAX_DENY, 0);

/// Packets and bytes dropped by each entry (the entry's value indexes it).
#[map]
static DENY_STATS: PerCpuArray<TrafficCounter> = PerCpuArray::with_max_entries(MAX_DENY, 0);

/// The bitmaps in front of the tries (`deny::FILTER_WORDS`); the host
/// writes them through a mapping.
#[map]
static DENY_FILTER: Array<u64> = Array::with_max_entries(deny::FILTER_WORDS, BPF_F_MMAPABLE);

/// `DENY_ON`'s flags (0: the list is empty).
#[inline(always)]
fn flags() -> u32 {
    SETTINGS.get(settings::DENY_ON).copied().unwrap_or(0)
}

/// Whether an entry may cover `bucket` of `bitmap`.
#[inline(always)]
fn may_match(bitmap: u32, bucket: u32) -> bool {
    let (word, bit) = deny::filter_position(bitmap, bucket);
    DENY_FILTER
        .get(word)
        .is_some_and(|w| *w & (1u64 << bit) != 0)
}

/// Whether an IPv4 packet from `src` to `dst` is denied (and counted).
#[inline(always)]
pub fn denied_v4(src: [u8; 4], dst: [u8; 4], bytes: u64) -> bool {
    if flags() == 0 {
        return false;
    }
    for (direction, addr) in [(deny::SOURCE, src), (deny::DESTINATION, dst)] {
        let bucket = deny::bucket_v4(addr);
        if !may_match(deny::bitmap(4, direction), bucket) {
            continue;
        }
        let cached = Cached::look(deny::cache_tag(direction, bucket), 0, bytes);
        if cached.hit {
            return true;
        }
        let key = Key::new(40, deny::key_v4(direction, addr));
        if let Some(&value) = DENY_V4.get(&key) {
            cached.count_and_keep(value, bytes);
            return true;
        }
    }
    false
}

/// A /24's or /48's two slots of `DENY_CACHE`, looked at.
struct Cached {
    /// Where a new answer goes: a slot of the two that holds none of this
    /// generation, else the second.
    slot: Option<*mut deny::CacheSlot>,
    tag: u32,
    high: u32,
    generation: u32,
    /// A slot held this generation's answer for the tag (counted).
    hit: bool,
}

impl Cached {
    /// The slots of (`tag`, `high`) (`deny::cache_index`,
    /// `deny::cache_index_2`); if one holds this generation's answer, a
    /// hit, and the packet of `bytes` counted on its entry.
    #[inline(always)]
    fn look(tag: u32, high: u32, bytes: u64) -> Cached {
        // Read before the cache and the trie: an answer is kept under the
        // generation the list had at most when the trie gave it.
        let generation = SETTINGS
            .get(settings::DENY_GENERATION)
            .copied()
            .unwrap_or(0);
        let mut cached = Cached {
            slot: None,
            tag,
            high,
            generation,
            hit: false,
        };
        // One slot after the other, each null-checked where it is read.
        if let Some(ptr) = DENY_CACHE.get_ptr_mut(deny::cache_index(tag, high)) {
            // SAFETY: this CPU's slot; nothing else runs on it meanwhile.
            let slot = unsafe { &*ptr };
            if slot.generation == generation && slot.tag != 0 {
                if slot.tag == tag && slot.high == high {
                    add_traffic(&DENY_STATS, slot.entry, bytes);
                    cached.hit = true;
                    return cached;
                }
            } else {
                // Holds nothing of this generation: a new answer goes here.
                cached.slot = Some(ptr);
            }
        }
        if let Some(ptr) = DENY_CACHE.get_ptr_mut(deny::cache_index_2(tag, high)) {
            // SAFETY: as above.
            let slot = unsafe { &*ptr };
            if slot.generation == generation && slot.tag == tag && slot.high == high {
                add_traffic(&DENY_STATS, slot.entry, bytes);
                cached.hit = true;
                return cached;
            }
            // Free, or both taken: the second gives way, so that answers
            // that collide fight over one slot and the first ones stay.
            if cached.slot.is_none() {
                cached.slot = Some(ptr);
            }
        }
        cached
    }

    /// Counts the packet on the entry a trie answered with (`value`), and
    /// keeps the answer if the entry decides its /24 (/48).
    #[inline(always)]
    fn count_and_keep(&self, value: u32, bytes: u64) {
        let entry = value & deny::SLOT_MASK;
        if value & deny::DECIDES != 0
            && let Some(slot) = self.slot
        {
            // SAFETY: as in `look`.
            unsafe {
                *slot = deny::CacheSlot {
                    tag: self.tag,
                    generation: self.generation,
                    entry,
                    high: self.high,
                }
            };
        }
        add_traffic(&DENY_STATS, entry, bytes);
    }
}

/// Whether an IPv6 packet from `src` to `dst` is denied (and counted).
#[inline(always)]
pub fn denied_v6(src: &[u8; 16], dst: &[u8; 16], bytes: u64) -> bool {
    let flags = flags();
    if flags == 0 {
        return false;
    }
    for (direction, addr, unfiltered) in [
        (deny::SOURCE, src, deny::V6_SOURCE_UNFILTERED),
        (deny::DESTINATION, dst, deny::V6_DESTINATION_UNFILTERED),
    ] {
        let top32 = u32::from_be_bytes([addr[0], addr[1], addr[2], addr[3]]);
        if flags & unfiltered == 0 && !may_match(deny::bitmap(6, direction), deny::bucket_v6(top32))
        {
            continue;
        }
        // As for IPv4, by /48.
        let next16 = u32::from(u16::from_be_bytes([addr[4], addr[5]]));
        let (tag, high) = deny::cache_tag_v6(direction, top32, next16);
        let cached = Cached::look(tag, high, bytes);
        if cached.hit {
            return true;
        }
        let key = Key::new(136, deny::key_v6(direction, *addr));
        if let Some(&value) = DENY_V6.get(&key) {
            cached.count_and_keep(value, bytes);
            return true;
        }
    }
    false
}
