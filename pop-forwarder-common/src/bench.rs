//! Shared layout of the benchmark programs' maps (generator and sink).

/// Bytes of the frame the generator rewrites from its template on every
/// packet: Ethernet + IPv6 + UDP headers fit. Live-frames pages are recycled
/// without being reset, so everything a router may edit must be rewritten.
pub const GEN_HEADER_LEN: usize = 64;
/// Capacity of the generator's destination list.
pub const GEN_MAX_DSTS: u32 = 1 << 16;

/// Generator settings: how the flows of successive packets vary.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct GenConfig {
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
    /// Destinations used from `GEN_DSTS` (1..=GEN_MAX_DSTS).
    pub dst_count: u32,
    /// Source addresses: the template's plus 0..src_count-1 in the last
    /// 16 bits.
    pub src_count: u32,
    /// UDP source ports: the template's plus 0..src_port_count-1.
    pub src_port_count: u32,
}

/// Generator map names.
pub const GEN_CONFIG: &str = "GEN_CONFIG";
pub const GEN_TEMPLATE: &str = "GEN_TEMPLATE";
pub const GEN_DSTS: &str = "GEN_DSTS";
/// Sink map name: per-CPU packets and bytes (`TrafficCounter`) at index 0.
pub const SINK_COUNT: &str = "SINK_COUNT";
/// Bare-redirect map name: a devmap whose slot 0 is the egress.
pub const REDIRECT_PORT: &str = "REDIRECT_PORT";
/// The floor router's tables (`bench_route`): DIR-24-8's tbl24 and tbl8,
/// and its next hops.
pub const FLOOR_TBL24: &str = "FLOOR_TBL24";
pub const FLOOR_TBL8: &str = "FLOOR_TBL8";
pub const FLOOR_HOPS: &str = "FLOOR_HOPS";

#[cfg(feature = "user")]
// SAFETY: repr(C) without padding (bytemuck's Pod derive checks).
unsafe impl aya::Pod for GenConfig {}
