//! 802.1Q and 802.1ad tags. A tagged frame has its tags (one, or two for
//! 802.1ad outside 802.1Q) taken off before anything else reads it, so
//! that routing and steering read one layout; a frame handed to the kernel
//! gets them back exactly as they were; a routed frame leaves with the tag
//! of its next hop's VLAN, if it has one.

use aya_ebpf::{helpers::bpf_xdp_adjust_head, macros::map, maps::HashMap, programs::XdpContext};
use pop_forwarder_common::{MAX_VLANS, VlanKey};

use crate::packet::{copy_mac, ptr_at};

/// The VLANs this box has on the interfaces the program is attached to.
#[map]
static VLANS: HashMap<VlanKey, u8> = HashMap::with_max_entries(MAX_VLANS, 0);

/// Whether the box has the VLAN of `tags` on interface `ifindex`.
#[inline(always)]
pub fn known(ifindex: u32, tags: &Tags) -> bool {
    let key = VlanKey {
        ifindex,
        outer: (tags.outer & 0x0fff) as u16,
        inner: (tags.inner & 0x0fff) as u16,
    };
    // SAFETY: only whether the key is there is read.
    unsafe { VLANS.get(&key) }.is_some()
}

const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

/// The tags taken off a frame: TPID and TCI of each, outer first.
#[derive(Clone, Copy)]
pub struct Tags {
    pub outer: u32,
    /// 0: one tag only.
    pub inner: u32,
}

impl Tags {
    #[inline(always)]
    const fn len(&self) -> usize {
        if self.inner == 0 { 4 } else { 8 }
    }
}

const fn is_tag(tpid: u16) -> bool {
    tpid == ETH_P_8021Q || tpid == ETH_P_8021AD
}

/// Takes the VLAN tags off a tagged frame: Ok(None) for an untagged one,
/// Err for a tagged frame too short to hold its tags.
#[inline(always)]
pub fn pop(ctx: &XdpContext) -> Result<Option<Tags>, ()> {
    let Some(head) = ptr_at::<[u8; 22]>(ctx, 0) else {
        // Shorter than two MACs, one tag and a type: untagged frames that
        // short are the parser's to refuse.
        return match ptr_at::<[u8; 14]>(ctx, 0) {
            // SAFETY: ptr_at checked the 14 bytes lie inside the packet.
            Some(h) if is_tag(u16::from_be_bytes(unsafe { [(*h)[12], (*h)[13]] })) => Err(()),
            _ => Ok(None),
        };
    };
    // SAFETY: ptr_at checked the 22 bytes lie inside the packet.
    let h = unsafe { &mut *head };
    let tpid = u16::from_be_bytes([h[12], h[13]]);
    if !is_tag(tpid) {
        return Ok(None);
    }
    let outer = u32::from(tpid) << 16 | u32::from(u16::from_be_bytes([h[14], h[15]]));
    let next = u16::from_be_bytes([h[16], h[17]]);
    let tags = if next == ETH_P_8021Q {
        Tags {
            outer,
            inner: u32::from(next) << 16 | u32::from(u16::from_be_bytes([h[18], h[19]])),
        }
    } else {
        Tags { outer, inner: 0 }
    };
    // The MACs move forward over the tags (the last byte first: the ranges
    // overlap), then the frame starts where they now are.
    let n = tags.len();
    let mut i = 12;
    while i > 0 {
        i -= 1;
        h[i + n] = h[i];
    }
    // SAFETY: a plain helper call on this program's context; no pointer
    // into the packet is used after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, n as i32) } != 0 {
        return Err(());
    }
    Ok(Some(tags))
}

/// Puts back the tags `pop` took off (before a frame goes to the kernel).
/// Returns false if the frame could not be grown again.
#[inline(always)]
pub fn restore(ctx: &XdpContext, tags: Tags) -> bool {
    let n = tags.len();
    // SAFETY: as in `pop`.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(n as i32)) } != 0 {
        return false;
    }
    let Some(head) = ptr_at::<[u8; 20]>(ctx, 0) else {
        return false;
    };
    // SAFETY: ptr_at checked the 20 bytes lie inside the packet.
    let h = unsafe { &mut *head };
    let mut i = 0;
    while i < 12 {
        h[i] = h[i + n];
        i += 1;
    }
    let outer = tags.outer.to_be_bytes();
    h[12] = outer[0];
    h[13] = outer[1];
    h[14] = outer[2];
    h[15] = outer[3];
    if tags.inner != 0 {
        let inner = tags.inner.to_be_bytes();
        h[16] = inner[0];
        h[17] = inner[1];
        h[18] = inner[2];
        h[19] = inner[3];
    }
    true
}

/// Makes room for one tag in front of the EtherType and writes it with
/// the MACs: the frame leaves on VLAN `tci` (TPID `proto`). Every pointer
/// into the packet is stale afterwards. Returns false if there was no room.
///
/// # Safety
/// `dst` and `src` are at even addresses (`copy_mac`), as the MAC fields
/// of map values are.
#[inline(always)]
pub unsafe fn push(ctx: &XdpContext, dst: &[u8; 6], src: &[u8; 6], proto: u16, tci: u16) -> bool {
    // SAFETY: as in `pop`.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -4) } != 0 {
        return false;
    }
    let Some(head) = ptr_at::<[u8; 18]>(ctx, 0) else {
        return false;
    };
    // SAFETY: ptr_at checked the 18 bytes lie inside the packet; the MACs
    // are at even addresses (`copy_mac`: the frame's start moved by 4).
    let h = unsafe {
        copy_mac(head as *mut [u8; 6], dst);
        copy_mac((head as *mut u8).add(6) as *mut [u8; 6], src);
        &mut *head
    };
    let [p0, p1] = proto.to_be_bytes();
    let [t0, t1] = tci.to_be_bytes();
    h[12] = p0;
    h[13] = p1;
    h[14] = t0;
    h[15] = t1;
    true
}
