//! Addresses as the forwarder handles them: an IP prefix (host bits zero)
//! and a unicast MAC, each parsed with a message that says what is wrong.

use std::{fmt, net::IpAddr, str::FromStr};

use anyhow::{Context as _, Result, bail};

/// Maps and sets keyed by prefix, for the daemon's tables of a million
/// routes: foldhash, seeded at random per map, rather than the standard
/// SipHash, which cost a quarter of a 1M-route reload. Foldhash resists
/// inputs chosen to collide without seeing the maps (routes from a
/// config or a BGP feed), not an attacker who can observe its hashes;
/// nothing the daemon shows depends on them.
pub type PrefixMap<V> = std::collections::HashMap<Prefix, V, foldhash::fast::RandomState>;
pub type PrefixSet = std::collections::HashSet<Prefix, foldhash::fast::RandomState>;

/// An IP prefix whose host bits are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl FromStr for Prefix {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (addr, len) = s
            .split_once('/')
            .with_context(|| format!("{s:?} is not a prefix (expected ADDRESS/LENGTH)"))?;
        let addr: IpAddr = addr
            .parse()
            .with_context(|| format!("{addr:?} in {s:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len: u8 = match len.parse() {
            Ok(len) if len <= max => len,
            _ => bail!("prefix length {len:?} in {s:?} is not a number from 0 to {max}"),
        };
        let prefix = Prefix { addr, len };
        let network = prefix.network();
        if network != addr {
            bail!("{s:?} has host bits set; the prefix is {network}/{len}");
        }
        Ok(prefix)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Prefix {
    /// The prefix of length `len` that holds `addr` (host bits cleared), or
    /// None for a length past the family's.
    pub fn containing(addr: IpAddr, len: u8) -> Option<Prefix> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return None;
        }
        let prefix = Prefix { addr, len };
        Some(Prefix {
            addr: prefix.network(),
            len,
        })
    }

    /// Whether `addr` lies inside this prefix.
    pub fn contains(&self, addr: IpAddr) -> bool {
        addr.is_ipv4() == self.addr.is_ipv4()
            && Prefix::containing(addr, self.len).is_some_and(|p| p.addr == self.addr)
    }

    /// The address with the bits past the prefix length cleared.
    pub fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        }
    }
}

/// A MAC address written as six colon-separated hex bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl FromStr for Mac {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts.next().unwrap_or("");
            *byte = match u8::from_str_radix(part, 16) {
                Ok(b) if part.len() == 2 => b,
                _ => {
                    bail!("{s:?} is not a MAC address (expected six hex bytes, aa:bb:cc:dd:ee:ff)")
                }
            };
        }
        if parts.next().is_some() {
            bail!("{s:?} is not a MAC address (expected six hex bytes, aa:bb:cc:dd:ee:ff)");
        }
        if mac == [0; 6] || mac[0] & 1 == 1 {
            bail!("{s:?} is not a unicast MAC address");
        }
        Ok(Mac(mac))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// An interface name held inline (Linux names are 1 to 15 bytes; which
/// characters they may hold is `config::check_interface_name`'s to say):
/// a million routes name a handful of interfaces, and a heap string each
/// would cost 32 bytes more a route.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IfName {
    len: u8,
    bytes: [u8; 15],
}

impl IfName {
    /// `name` if it is 1 to 15 bytes long.
    pub fn new(name: &str) -> Option<IfName> {
        let len = name.len();
        if !(1..=15).contains(&len) {
            return None;
        }
        let mut bytes = [0; 15];
        bytes[..len].copy_from_slice(name.as_bytes());
        Some(IfName {
            len: len as u8,
            bytes,
        })
    }

    pub fn as_str(&self) -> &str {
        // Whole UTF-8 characters of a `str` were copied in `new`.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl std::ops::Deref for IfName {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interface_name_is_held_whole_or_refused() {
        for name in ["r1", "eth0.100", "a-fifteen-bytes", "ü-eth"] {
            let held = IfName::new(name).unwrap();
            assert_eq!(held.as_str(), name);
            assert_eq!(format!("{held} {held:?}"), format!("{name} {name:?}"));
        }
        assert!(IfName::new("").is_none());
        assert!(IfName::new("sixteen-bytes-ab").is_none());
        assert_ne!(IfName::new("eth1"), IfName::new("eth10"));
    }
}
