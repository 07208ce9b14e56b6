//! Where Stripe may send a shopper back to: `https` URLs on the shop's own
//! hosts only, so the service cannot be used as an open redirect.

use crate::config::{ConfigError, Source, malformed, required};

/// `PAYMENTS_REDIRECT_HOSTS`: host names, exact (`shop.example`) or every
/// subdomain of one (`*.shop.example`, which does not match `shop.example`
/// itself). Required: without it any host would do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedirectHosts(Vec<HostPattern>);

#[derive(Clone, Debug, PartialEq, Eq)]
enum HostPattern {
    Exact(String),
    SubdomainsOf(String),
}

impl RedirectHosts {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        const NAME: &str = "PAYMENTS_REDIRECT_HOSTS";
        let raw = required(src, NAME)?;
        let mut patterns = Vec::new();
        for (position, entry) in raw.split(',').map(str::trim).enumerate() {
            let pattern = HostPattern::parse(entry).ok_or_else(|| {
                malformed(
                    NAME,
                    format!(
                        "entry {} is not a host name like shop.example or *.shop.example",
                        position + 1
                    ),
                )
            })?;
            patterns.push(pattern);
        }
        Ok(Self(patterns))
    }

    /// Whether `url` is an `https` URL, without credentials, on an allowed host.
    pub fn allows(&self, url: &url::Url) -> bool {
        let Some(host) = url.host_str() else {
            return false;
        };
        url.scheme() == "https"
            && url.username().is_empty()
            && url.password().is_none()
            && self.0.iter().any(|pattern| pattern.matches(host))
    }
}

impl HostPattern {
    fn parse(entry: &str) -> Option<Self> {
        match entry.strip_prefix("*.") {
            // A wildcard under a bare top-level name would allow whole registries.
            Some(parent) => normalized_domain(parent)
                .filter(|name| name.contains('.'))
                .map(Self::SubdomainsOf),
            None => normalized_domain(entry).map(Self::Exact),
        }
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(name) => host == name,
            Self::SubdomainsOf(parent) => host
                .strip_suffix(parent.as_str())
                .and_then(|sub| sub.strip_suffix('.'))
                .is_some_and(|sub| !sub.is_empty()),
        }
    }
}

/// The host as the URL parser writes it (lowercase, punycode), if `entry`
/// is a bare host name: no scheme, port, path or wildcard.
fn normalized_domain(entry: &str) -> Option<String> {
    if entry.is_empty() || entry.contains(['*', '/', ':', '@', '?', '#']) {
        return None;
    }
    match url::Host::parse(entry).ok()? {
        url::Host::Domain(name) => Some(name),
        url::Host::Ipv4(_) | url::Host::Ipv6(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn hosts(list: &str) -> Result<RedirectHosts, ConfigError> {
        let env: HashMap<String, String> =
            [("PAYMENTS_REDIRECT_HOSTS".to_owned(), list.to_owned())].into();
        RedirectHosts::from_source(&env)
    }

    fn allows(hosts: &RedirectHosts, url: &str) -> bool {
        hosts.allows(&url::Url::parse(url).unwrap())
    }

    #[test]
    fn exact_hosts_on_https_only() {
        let h = hosts("shop.example").unwrap();
        assert!(allows(&h, "https://shop.example/thanks"));
        assert!(allows(
            &h,
            "https://SHOP.example:8443/x?session={CHECKOUT_SESSION_ID}"
        ));
        assert!(!allows(&h, "http://shop.example/thanks"));
        assert!(!allows(&h, "https://evil.example/"));
        assert!(!allows(&h, "https://shop.example.evil.example/"));
        assert!(!allows(&h, "https://www.shop.example/"));
        assert!(!allows(&h, "https://user:pw@shop.example/"));
        assert!(!allows(&h, "https://evil.example/@shop.example"));
    }

    #[test]
    fn a_wildcard_allows_subdomains_only() {
        let h = hosts("*.shop.example, pay.example").unwrap();
        assert!(allows(&h, "https://www.shop.example/"));
        assert!(allows(&h, "https://a.b.shop.example/"));
        assert!(!allows(&h, "https://shop.example/"));
        assert!(!allows(&h, "https://evilshop.example/"));
        assert!(allows(&h, "https://pay.example/"));
    }

    #[test]
    fn the_setting_is_required_and_checked() {
        let err = RedirectHosts::from_source(&HashMap::<String, String>::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("PAYMENTS_REDIRECT_HOSTS"), "{err}");
        for bad in [
            "https://shop.example",
            "shop.example:443",
            "*",
            "*.",
            "a.*.example",
            "*.example",
            "shop.example,",
            "10.0.0.1",
        ] {
            assert!(hosts(bad).is_err(), "{bad}");
        }
    }
}
