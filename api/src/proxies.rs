//! Where a request comes from behind a load balancer: `X-Forwarded-For` is
//! believed only when the TCP peer is one of the `TRUSTED_PROXIES`. The
//! client's address ([`ClientAddr`]) is what the per-source login limit,
//! the refusal audit limit, the audit trail's `source_ip` and a session's
//! address are keyed on; a client that could choose it could spoof its
//! address on the trail and escape its login limit by sending another one
//! with each attempt.

use std::net::IpAddr;

use axum::http::HeaderMap;
use ipnet::IpNet;

/// The networks whose `X-Forwarded-For` is believed (`TRUSTED_PROXIES`,
/// comma-separated CIDRs; empty by default: the header is ignored).
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

/// The address of the client a request is from, as [`TrustedProxies::client`]
/// decided it (a request extension, set by the server for every request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

impl std::str::FromStr for TrustedProxies {
    type Err = String;

    /// `10.0.0.0/8, 192.168.1.10/32, fd00::/8`; a bare address is a /32 or
    /// /128. The error quotes the entry it could not read (an address of
    /// the operator's network, not a secret).
    fn from_str(list: &str) -> Result<Self, String> {
        let nets = list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|entry| {
            entry
                .parse::<IpNet>()
                .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| format!("`{entry}` is not a CIDR such as 10.0.0.0/8 or an IP address"))
        });
        nets.collect::<Result<_, _>>().map(Self)
    }
}

impl TrustedProxies {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn trusts(&self, addr: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&addr))
    }

    /// The client of a request from TCP peer `peer`: the peer itself unless
    /// it is a trusted proxy; then the right-most `X-Forwarded-For` address
    /// that is not itself a trusted proxy (each proxy appends the address it
    /// was reached from, so everything left of that may be the client's own
    /// invention). When every listed address is a trusted proxy, the
    /// left-most of them; an entry that is no address ends the walk there.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.trusts(peer) {
            return peer;
        }
        // Several X-Forwarded-For headers are one list, in order.
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("").split(','))
            .map(str::trim)
            .collect();
        let mut client = peer;
        for hop in hops.iter().rev() {
            let Some(addr) = parse_hop(hop) else { break };
            client = addr;
            if !self.trusts(addr) {
                break;
            }
        }
        client
    }
}

/// An `X-Forwarded-For` entry: an address, or one with a port
/// (`192.0.2.1:4711`, `[2001:db8::1]:4711`), as some proxies write it.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let addr = hop.parse::<IpAddr>().ok().or_else(|| hop.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))?;
    Some(addr.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append("x-forwarded-for", v.parse().unwrap());
        }
        headers
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn without_trusted_proxies_the_header_is_ignored() {
        let none = TrustedProxies::default();
        assert_eq!(none.client(ip("127.0.0.1"), &headers(&["10.9.9.9"])), ip("127.0.0.1"));
        let lb: TrustedProxies = "10.0.0.0/8".parse().unwrap();
        assert_eq!(lb.client(ip("192.0.2.7"), &headers(&["10.9.9.9"])), ip("192.0.2.7"), "peer is no proxy");
    }

    #[test]
    fn from_a_trusted_proxy_the_right_most_untrusted_address_is_the_client() {
        let lb: TrustedProxies = "10.0.0.0/8, 192.168.1.10".parse().unwrap();
        let peer = ip("10.0.0.2");
        assert_eq!(lb.client(peer, &headers(&["198.51.100.4"])), ip("198.51.100.4"));
        // A client's own "X-Forwarded-For: 6.6.6.6" is left of what the proxy appended.
        assert_eq!(lb.client(peer, &headers(&["6.6.6.6, 198.51.100.4"])), ip("198.51.100.4"));
        // Two proxies deep, across two headers.
        assert_eq!(lb.client(peer, &headers(&["6.6.6.6, 198.51.100.4", "192.168.1.10"])), ip("198.51.100.4"));
        assert_eq!(lb.client(peer, &headers(&["[2001:db8::1]:4711"])), ip("2001:db8::1"));
        assert_eq!(lb.client(peer, &headers(&["198.51.100.4:4711"])), ip("198.51.100.4"));
        // No header, only proxies, or garbage where the walk would go on.
        assert_eq!(lb.client(peer, &HeaderMap::new()), peer);
        assert_eq!(lb.client(peer, &headers(&["10.1.1.1, 10.2.2.2"])), ip("10.1.1.1"));
        assert_eq!(lb.client(peer, &headers(&["6.6.6.6, not-an-address, 10.2.2.2"])), ip("10.2.2.2"));
        assert_eq!(lb.client(peer, &headers(&[""])), peer);
    }

    #[test]
    fn ipv4_mapped_peers_and_addresses_are_their_ipv4_selves() {
        let lb: TrustedProxies = "127.0.0.1/32".parse().unwrap();
        assert_eq!(lb.client(ip("::ffff:127.0.0.1"), &headers(&["::ffff:10.9.9.9"])), ip("10.9.9.9"));
    }

    #[test]
    fn a_malformed_list_names_the_entry() {
        assert!("".parse::<TrustedProxies>().unwrap().is_empty());
        assert_eq!(
            "10.0.0.0/8, 10.0.0.0/33".parse::<TrustedProxies>().unwrap_err().split('`').nth(1),
            Some("10.0.0.0/33")
        );
        assert!("10.0.0.0/8;192.168.0.0/16".parse::<TrustedProxies>().is_err());
        assert!("localhost".parse::<TrustedProxies>().is_err());
    }
}
