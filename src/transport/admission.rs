//! Who may connect: address allow-lists, connection limits, and the
//! refusal log that a flood of refusals cannot flood.
//!
//! Checked by the IO thread at accept, before a byte is read: a refused
//! peer's socket is closed at once and costs nothing more.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::time::{Duration, Instant};

/// An address range: an IPv4 or IPv6 network in CIDR notation
/// (`10.0.0.0/8`, `fd00::/8`), or one address (`127.0.0.1`, `::1`).
///
/// An IPv4 range also matches the IPv4-mapped IPv6 form of its addresses
/// (`::ffff:10.1.2.3`), which is how a dual-stack listener sees IPv4 peers.
///
/// # Examples
/// ```
/// use tbnet::Cidr;
///
/// let net: Cidr = "10.0.0.0/8".parse().unwrap();
/// assert!(net.contains("10.200.0.1".parse().unwrap()));
/// assert!(net.contains("::ffff:10.0.0.1".parse().unwrap()));
/// assert!(!net.contains("11.0.0.1".parse().unwrap()));
/// assert!("::1".parse::<Cidr>().unwrap().contains("::1".parse().unwrap()));
/// assert!("10.0.0.0/33".parse::<Cidr>().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// The network address, with the bits past the prefix cleared.
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The range of addresses sharing `addr`'s first `prefix` bits.
    ///
    /// # Errors
    /// The prefix is longer than the address (32 bits for IPv4, 128 for
    /// IPv6); it is handed back.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, u8> {
        let bits = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        if prefix > bits {
            return Err(prefix);
        }
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(prefix))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(prefix))),
        };
        Ok(Cidr { addr, prefix })
    }

    /// Whether `ip` is in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                u32::from(ip) & mask32(self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                u128::from(ip) & mask128(self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Why a string is not a [`Cidr`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CidrParseError(String);

impl fmt::Display for CidrParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not an address range: {}", self.0)
    }
}

impl std::error::Error for CidrParseError {}

impl FromStr for Cidr {
    type Err = CidrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || CidrParseError(s.to_string());
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => {
                let addr: IpAddr = addr.parse().map_err(|_| bad())?;
                (addr, Some(prefix.parse::<u8>().map_err(|_| bad())?))
            }
            None => (s.parse().map_err(|_| bad())?, None),
        };
        let full = if addr.is_ipv4() { 32 } else { 128 };
        Cidr::new(addr, prefix.unwrap_or(full)).map_err(|_| bad())
    }
}

impl From<IpAddr> for Cidr {
    /// The range holding only `addr`.
    fn from(addr: IpAddr) -> Self {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        Cidr { addr, prefix }
    }
}

/// The peers a listener (or the status page) admits: a list of address
/// ranges. An empty list admits everyone.
///
/// # Examples
/// ```
/// use tbnet::AllowList;
///
/// let list: AllowList = ["10.0.0.0/8", "::1"].iter().map(|s| s.parse().unwrap()).collect();
/// assert!(list.admits("10.1.2.3".parse().unwrap()));
/// assert!(list.admits("::1".parse().unwrap()));
/// assert!(!list.admits("192.0.2.1".parse().unwrap()));
/// assert!(AllowList::everyone().admits("192.0.2.1".parse().unwrap()));
/// assert!(AllowList::loopback().admits("127.0.0.2".parse().unwrap()));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    ranges: Vec<Cidr>,
}

impl AllowList {
    /// The empty list: everyone is admitted.
    pub fn everyone() -> Self {
        AllowList::default()
    }

    /// `127.0.0.0/8` and `::1`.
    pub fn loopback() -> Self {
        AllowList {
            ranges: vec![
                Cidr {
                    addr: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)),
                    prefix: 8,
                },
                Cidr::from(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            ],
        }
    }

    /// Adds `range` to the admitted ones.
    pub fn allow(mut self, range: Cidr) -> Self {
        self.ranges.push(range);
        self
    }

    /// Whether `ip` is admitted: the list is empty, or a range holds it.
    pub fn admits(&self, ip: IpAddr) -> bool {
        self.ranges.is_empty() || self.ranges.iter().any(|r| r.contains(ip))
    }

    /// The ranges (empty: everyone).
    pub fn ranges(&self) -> &[Cidr] {
        &self.ranges
    }
}

impl FromIterator<Cidr> for AllowList {
    fn from_iter<I: IntoIterator<Item = Cidr>>(iter: I) -> Self {
        AllowList {
            ranges: iter.into_iter().collect(),
        }
    }
}

/// Why an accepted connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The peer is not on the listener's allow-list.
    NotAllowed,
    /// The listener has its maximum of connections open.
    ListenerFull,
    /// The transport has its maximum of accepted connections open.
    TransportFull,
}

impl Refusal {
    fn as_str(self) -> &'static str {
        match self {
            Refusal::NotAllowed => "peer not on the allow-list",
            Refusal::ListenerFull => "listener at its connection limit",
            Refusal::TransportFull => "transport at its connection limit",
        }
    }
}

/// What a listener admits.
#[derive(Clone, Debug, Default)]
pub(crate) struct Policy {
    pub(crate) allow: AllowList,
    pub(crate) max_connections: Option<usize>,
}

impl Policy {
    /// Whether a connection from `ip` may open, with `open` connections
    /// open on this listener and `transport_open` of `transport_max` on the
    /// whole transport.
    pub(crate) fn judge(
        &self,
        ip: IpAddr,
        open: usize,
        transport_open: usize,
        transport_max: usize,
    ) -> Result<(), Refusal> {
        if !self.allow.admits(ip) {
            return Err(Refusal::NotAllowed);
        }
        if self.max_connections.is_some_and(|max| open >= max) {
            return Err(Refusal::ListenerFull);
        }
        if transport_open >= transport_max {
            return Err(Refusal::TransportFull);
        }
        Ok(())
    }
}

/// Logs refusals at debug level, at most one line per second: the first
/// refusal, then a count of those suppressed meanwhile.
#[derive(Debug, Default)]
pub(crate) struct RefusalLog {
    last: Option<Instant>,
    suppressed: u64,
}

/// Shortest time between two refusal log lines.
const LOG_EVERY: Duration = Duration::from_secs(1);

impl RefusalLog {
    pub(crate) fn refused(&mut self, peer: std::net::SocketAddr, why: &str) {
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return;
        }
        let now = Instant::now();
        if self.last.is_some_and(|last| now - last < LOG_EVERY) {
            self.suppressed += 1;
            return;
        }
        let suppressed = std::mem::take(&mut self.suppressed);
        self.last = Some(now);
        tracing::debug!(%peer, reason = why, suppressed, "connection refused");
    }

    pub(crate) fn refusal(&mut self, peer: std::net::SocketAddr, refusal: Refusal) {
        self.refused(peer, refusal.as_str());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ranges_match_by_prefix_in_both_families() {
        let v4: Cidr = "192.168.4.7/22".parse().unwrap();
        assert_eq!(v4.to_string(), "192.168.4.0/22");
        assert!(v4.contains(ip("192.168.7.255")));
        assert!(!v4.contains(ip("192.168.8.0")));
        assert!(!v4.contains(ip("::1")));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.9")));
        let all6: Cidr = "::/0".parse().unwrap();
        assert!(all6.contains(ip("fe80::1")));
        let one: Cidr = "10.0.0.1".parse().unwrap();
        assert!(one.contains(ip("10.0.0.1")) && !one.contains(ip("10.0.0.2")));
    }

    #[test]
    fn bad_ranges_do_not_parse() {
        for bad in [
            "",
            "10.0.0.0/",
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "x/8",
            "1.2.3.4/-1",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn mapped_ipv4_peers_match_ipv4_ranges() {
        let list = AllowList::loopback();
        assert!(list.admits(ip("::ffff:127.0.0.1")));
        assert!(list.admits(ip("::1")));
        assert!(!list.admits(ip("::2")));
    }

    #[test]
    fn policy_refuses_in_order() {
        let policy = Policy {
            allow: AllowList::loopback(),
            max_connections: Some(2),
        };
        let lo = ip("127.0.0.1");
        assert_eq!(policy.judge(lo, 1, 0, 10), Ok(()));
        assert_eq!(
            policy.judge(ip("10.0.0.1"), 0, 0, 10),
            Err(Refusal::NotAllowed)
        );
        assert_eq!(policy.judge(lo, 2, 0, 10), Err(Refusal::ListenerFull));
        assert_eq!(policy.judge(lo, 0, 10, 10), Err(Refusal::TransportFull));
    }
}
