//! The address a request came from, as far as this service can tell.
//!
//! It is the TCP peer, unless the peer is one of `PAYMENTS_TRUSTED_PROXIES`.
//! Then `X-Forwarded-For` is read from the right, trusted hops are skipped,
//! and the first untrusted address is the client. An untrusted peer's
//! `X-Forwarded-For` is never read, so a forged header changes nothing.
//!
//! The result is the request extension [`ClientIp`], which the webhook source
//! allowlist, the rate limiters and the forensic records use.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use axum::{
    extract::{ConnectInfo, FromRequestParts, Request, State},
    http::{Extensions, HeaderMap, request::Parts},
    middleware::Next,
    response::Response,
};
use ipnet::IpNet;

use crate::{
    config::{ConfigError, Source, malformed, value},
    error::ApiError,
};

/// A proxy chain longer than this is refused as malformed.
const MAX_FORWARDED_HOPS: usize = 32;

/// The resolved client address of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

impl ClientIp {
    /// The resolved address, else the TCP peer (a router served without the
    /// resolving layer), else nothing.
    pub fn from_extensions(extensions: &Extensions) -> Option<Self> {
        if let Some(resolved) = extensions.get::<ClientIp>() {
            return Some(*resolved);
        }
        extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|info| ClientIp(info.0.ip().to_canonical()))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        Self::from_extensions(&parts.extensions).ok_or_else(|| {
            ApiError::Internal(anyhow::anyhow!("the request carries no peer address"))
        })
    }
}

/// A list of networks. Single addresses are networks of one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpNets(Vec<IpNet>);

impl IpNets {
    /// Parses addresses and CIDRs separated by commas, spaces or newlines;
    /// `#` starts a comment that runs to the end of the line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let entries = text
            .lines()
            .map(|line| line.split('#').next().unwrap_or_default())
            .flat_map(|line| line.split([',', ' ', '\t']))
            .filter(|entry| !entry.is_empty());
        let mut nets = Vec::new();
        for (position, entry) in entries.enumerate() {
            let net = entry
                .parse::<IpNet>()
                .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    let shown: String = entry.chars().take(60).collect();
                    format!(
                        "entry {} ({shown}) is not an IP address or CIDR",
                        position + 1
                    )
                })?;
            nets.push(net.trunc());
        }
        Ok(Self(nets))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// The proxies whose `X-Forwarded-For` is believed.
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies(IpNets);

impl TrustedProxies {
    /// `PAYMENTS_TRUSTED_PROXIES`: addresses or CIDRs; none by default.
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        const NAME: &str = "PAYMENTS_TRUSTED_PROXIES";
        let raw = value(src, NAME)?.unwrap_or_default();
        let nets = IpNets::parse(&raw).map_err(|reason| malformed(NAME, reason))?;
        Ok(Self(nets))
    }

    pub fn new(nets: IpNets) -> Self {
        Self(nets)
    }

    /// The client address of a request from `peer` with these headers.
    pub fn resolve(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.0.contains(peer) {
            return peer;
        }
        match self.first_untrusted_hop(headers) {
            Ok(Some(client)) => client,
            Ok(None) => peer,
            Err(()) => {
                tracing::warn!(%peer, "malformed X-Forwarded-For from a trusted proxy; using the peer");
                peer
            }
        }
    }

    /// Walks the forwarded chain from the right. All hops trusted: the
    /// leftmost one. No header: `None`. Any unreadable hop on the way: `Err`.
    fn first_untrusted_hop(&self, headers: &HeaderMap) -> Result<Option<IpAddr>, ()> {
        let mut hops = Vec::new();
        for header in headers.get_all("x-forwarded-for") {
            let text = header.to_str().map_err(|_| ())?;
            hops.extend(text.split(',').map(str::trim));
        }
        if hops.len() > MAX_FORWARDED_HOPS {
            return Err(());
        }
        let mut leftmost = None;
        for hop in hops.iter().rev() {
            let ip = parse_hop(hop).ok_or(())?;
            if !self.0.contains(ip) {
                return Ok(Some(ip));
            }
            leftmost = Some(ip);
        }
        Ok(leftmost)
    }
}

/// One `X-Forwarded-For` entry: an address, or an address with a port (some
/// proxies add one).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let ip = hop
        .parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))?;
    Some(ip.to_canonical())
}

/// Middleware: puts the resolved [`ClientIp`] into the request extensions.
pub async fn resolve(
    State(proxies): State<Arc<TrustedProxies>>,
    mut request: Request,
    next: Next,
) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip());
    if let Some(peer) = peer {
        let client = proxies.resolve(peer, request.headers());
        request.extensions_mut().insert(ClientIp(client));
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn forwarded(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        headers
    }

    fn proxies(list: &str) -> TrustedProxies {
        TrustedProxies::new(IpNets::parse(list).unwrap())
    }

    #[test]
    fn lists_take_addresses_cidrs_commas_newlines_and_comments() {
        let nets = IpNets::parse("# header\n3.18.12.63\n10.0.0.0/8, ::1/128 # local\n\n").unwrap();
        assert_eq!(nets.len(), 3);
        assert!(nets.contains(ip("3.18.12.63")));
        assert!(nets.contains(ip("10.200.1.2")));
        assert!(nets.contains(ip("::1")));
        assert!(!nets.contains(ip("3.18.12.64")));
        assert!(nets.contains(ip("::ffff:10.1.1.1")), "v4-mapped v6 is v4");
    }

    #[test]
    fn a_bad_entry_is_named_by_position() {
        let err = IpNets::parse("10.0.0.1, example.com").unwrap_err();
        assert!(err.contains("entry 2"), "{err}");
        assert!(IpNets::parse("10.0.0.1/33").is_err());
    }

    #[test]
    fn the_stripe_list_shipped_with_the_service_parses() {
        let nets = IpNets::parse(include_str!("../deploy/stripe-webhook-ips.txt")).unwrap();
        assert_eq!(nets.len(), 15);
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        let none = TrustedProxies::default();
        let headers = forwarded(&["3.18.12.63"]);
        assert_eq!(none.resolve(ip("203.0.113.9"), &headers), ip("203.0.113.9"));
        let some = proxies("10.0.0.0/8");
        assert_eq!(some.resolve(ip("203.0.113.9"), &headers), ip("203.0.113.9"));
    }

    #[test]
    fn a_trusted_proxy_chain_is_walked_from_the_right() {
        let trusted = proxies("10.0.0.0/8");
        let headers = forwarded(&["6.6.6.6, 198.51.100.7", "10.0.0.5"]);
        // The attacker may prepend anything; the first untrusted hop from the
        // right is what the outermost trusted proxy saw.
        assert_eq!(
            trusted.resolve(ip("10.0.0.1"), &headers),
            ip("198.51.100.7")
        );
        let all_trusted = forwarded(&["10.1.1.1, 10.2.2.2"]);
        assert_eq!(
            trusted.resolve(ip("10.0.0.1"), &all_trusted),
            ip("10.1.1.1")
        );
        assert_eq!(
            trusted.resolve(ip("10.0.0.1"), &HeaderMap::new()),
            ip("10.0.0.1")
        );
        let with_port = forwarded(&["198.51.100.7:4431", "[2001:db8::1]:80"]);
        assert_eq!(
            trusted.resolve(ip("10.0.0.1"), &with_port),
            ip("2001:db8::1")
        );
    }

    #[test]
    fn a_malformed_chain_from_a_trusted_proxy_falls_back_to_the_peer() {
        let trusted = proxies("10.0.0.0/8");
        for bad in ["not-an-ip", "198.51.100.7,,10.0.0.2", ""] {
            let headers = forwarded(&[bad]);
            assert_eq!(
                trusted.resolve(ip("10.0.0.1"), &headers),
                ip("10.0.0.1"),
                "{bad}"
            );
        }
        // Garbage left of the first untrusted hop is never looked at.
        let headers = forwarded(&["garbage, 198.51.100.7"]);
        assert_eq!(
            trusted.resolve(ip("10.0.0.1"), &headers),
            ip("198.51.100.7")
        );
        let long = vec!["10.0.0.9"; MAX_FORWARDED_HOPS + 1].join(",");
        assert_eq!(
            trusted.resolve(ip("10.0.0.1"), &forwarded(&[&long])),
            ip("10.0.0.1")
        );
    }
}
