//! Where to connect or listen: a socket address, or a tbnet spec string.
//!
//! tbnet names endpoints with strings such as `"tcp:10.0.0.1:5000"`; this
//! crate also takes plain `"host:port"` and any [`SocketAddr`]. Strings that
//! are not literal addresses go through the system resolver
//! ([`ToSocketAddrs`]), which may block: resolve once with
//! [`ToEndpoint::to_endpoint`] and pass the [`SocketAddr`] on hot paths.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, ToSocketAddrs};
use std::sync::Arc;

use crate::client::ServerId;
use crate::error::Error;

/// Anything that names one TCP endpoint: a [`SocketAddr`] (and the types
/// that convert into one, including tbnet's [`ServerId`]), or a spec string
/// `"tcp:host:port"` / `"host:port"`.
///
/// A host name resolves with the system resolver to its first address. A
/// spec with another protocol (tbnet also knew `"udp:"`), no port, or a
/// host that does not resolve is an [`Error::InvalidAddress`].
///
/// # Examples
/// ```
/// use std::net::SocketAddr;
/// use tbnet::ToEndpoint;
///
/// let addr: SocketAddr = "127.0.0.1:5000".parse().unwrap();
/// assert_eq!("tcp:127.0.0.1:5000".to_endpoint()?, addr);
/// assert_eq!("127.0.0.1:5000".to_endpoint()?, addr);
/// assert_eq!(addr.to_endpoint()?, addr);
/// assert_eq!("tcp:[::1]:80".to_endpoint()?, "[::1]:80".parse::<SocketAddr>().unwrap());
/// assert!("udp:127.0.0.1:5000".to_endpoint().is_err());
/// assert!("tcp:127.0.0.1".to_endpoint().is_err());
/// # Ok::<(), tbnet::Error>(())
/// ```
pub trait ToEndpoint {
    /// The socket address this names.
    ///
    /// # Errors
    /// [`Error::InvalidAddress`] for a spec that does not parse or resolve
    /// (never for a [`SocketAddr`]).
    fn to_endpoint(&self) -> Result<SocketAddr, Error>;
}

impl ToEndpoint for SocketAddr {
    fn to_endpoint(&self) -> Result<SocketAddr, Error> {
        Ok(*self)
    }
}

impl ToEndpoint for SocketAddrV4 {
    fn to_endpoint(&self) -> Result<SocketAddr, Error> {
        Ok(SocketAddr::V4(*self))
    }
}

impl ToEndpoint for SocketAddrV6 {
    fn to_endpoint(&self) -> Result<SocketAddr, Error> {
        Ok(SocketAddr::V6(*self))
    }
}

impl ToEndpoint for (IpAddr, u16) {
    fn to_endpoint(&self) -> Result<SocketAddr, Error> {
        Ok(SocketAddr::from(*self))
    }
}

impl ToEndpoint for (Ipv4Addr, u16) {
    fn to_endpoint(&self) -> Result<SocketAddr, Error> {
        Ok(SocketAddr::from(*self))
    }
}

impl ToEndpoint for (Ipv6Addr, u16) {
    fn to_endpoint(&self) -> Result<SocketAddr, Error> {
        Ok(SocketAddr::from(*self))
    }
}

impl ToEndpoint for ServerId {
    fn to_endpoint(&self) -> Result<SocketAddr, Error> {
        Ok(SocketAddr::from(*self))
    }
}

impl ToEndpoint for str {
    fn to_endpoint(&self) -> Result<SocketAddr, Error> {
        parse_spec(self)
    }
}

impl ToEndpoint for String {
    fn to_endpoint(&self) -> Result<SocketAddr, Error> {
        parse_spec(self)
    }
}

impl<T: ToEndpoint + ?Sized> ToEndpoint for &T {
    fn to_endpoint(&self) -> Result<SocketAddr, Error> {
        (**self).to_endpoint()
    }
}

/// Parses `"tcp:host:port"` or `"host:port"`; a literal address needs no
/// resolver.
fn parse_spec(spec: &str) -> Result<SocketAddr, Error> {
    let invalid = |reason: &str| Error::InvalidAddress {
        spec: Arc::from(spec),
        reason: Arc::from(reason),
    };
    let rest = match spec.split_once(':') {
        Some(("tcp", rest)) => rest,
        Some((proto, _))
            if !proto.is_empty()
                && !proto.starts_with('[')
                && proto.chars().all(|c| c.is_ascii_alphabetic())
                && spec.matches(':').count() == 2 =>
        {
            // `proto:host:port` with an unknown protocol (a host name
            // followed by a port has only one colon).
            return Err(invalid("only the tcp protocol is supported"));
        }
        _ => spec,
    };
    if let Ok(addr) = rest.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(invalid("expected host:port"));
    };
    if host.is_empty() {
        return Err(invalid("no host"));
    }
    if port.parse::<u16>().is_err() {
        return Err(invalid("the port is not a number from 0 to 65535"));
    }
    let mut addrs = rest
        .to_socket_addrs()
        .map_err(|e| invalid(&format!("cannot resolve: {e}")))?;
    addrs
        .next()
        .ok_or_else(|| invalid("the host resolved to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn literal_specs_with_and_without_the_protocol() {
        assert_eq!(
            parse_spec("tcp:127.0.0.1:80").unwrap(),
            addr("127.0.0.1:80")
        );
        assert_eq!(parse_spec("127.0.0.1:80").unwrap(), addr("127.0.0.1:80"));
        assert_eq!(parse_spec("tcp:[::1]:9").unwrap(), addr("[::1]:9"));
        assert_eq!(parse_spec("[::1]:9").unwrap(), addr("[::1]:9"));
        assert_eq!(parse_spec("tcp:0.0.0.0:0").unwrap(), addr("0.0.0.0:0"));
    }

    #[test]
    fn host_names_go_through_the_resolver() {
        let got = parse_spec("tcp:localhost:4000").unwrap();
        assert!(got.ip().is_loopback(), "{got}");
        assert_eq!(got.port(), 4000);
        assert_eq!(parse_spec("localhost:4001").unwrap().port(), 4001);
    }

    #[test]
    fn invalid_specs_say_why() {
        for (spec, why) in [
            ("udp:127.0.0.1:80", "only the tcp protocol"),
            ("tcp:127.0.0.1", "expected host:port"),
            ("127.0.0.1", "expected host:port"),
            ("tcp::80", "no host"),
            ("tcp:localhost:http", "port is not a number"),
            ("localhost:70000", "port is not a number"),
            ("", "expected host:port"),
            ("tcp:", "expected host:port"),
        ] {
            match parse_spec(spec) {
                Err(Error::InvalidAddress { spec: s, reason }) => {
                    assert_eq!(&*s, spec);
                    assert!(reason.contains(why), "{spec:?}: {reason}");
                }
                other => panic!("{spec:?} gave {other:?}"),
            }
        }
        let e = parse_spec("tcp:127.0.0.1").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid address \"tcp:127.0.0.1\": expected host:port"
        );
    }

    #[test]
    fn socket_addresses_and_server_ids_pass_through() {
        let a = addr("10.0.0.1:5000");
        assert_eq!(a.to_endpoint().unwrap(), a);
        fn generic(e: impl ToEndpoint) -> SocketAddr {
            e.to_endpoint().unwrap()
        }
        let specs = [String::from("tcp:10.0.0.1:5000")];
        for spec in &specs {
            // `&String`, through the blanket impl for references.
            assert_eq!(generic(spec), a);
        }
        let id = ServerId::try_from(a).unwrap();
        assert_eq!(id.to_endpoint().unwrap(), a);
        assert_eq!(String::from("tcp:10.0.0.1:5000").to_endpoint().unwrap(), a);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!((ip, 5000).to_endpoint().unwrap(), a);
    }
}
