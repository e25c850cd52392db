//! Outbound-address guard (SSRF protection) for engines that fetch URLs chosen
//! by strangers.
//!
//! A provider node runs on someone's home or cloud network, so a request like
//! "scrape http://192.168.1.1/admin" or "http://169.254.169.254/latest/meta-data"
//! must never reach that network. The guard works in three layers, because
//! each one alone has a gap:
//!
//! 1. [`check_url`] before a request: scheme allow-list and literal hosts
//!    (IP literals never reach a DNS resolver, so layer 2 would miss them).
//! 2. [`GuardedResolver`]: every DNS answer is filtered *at connect time*, so a
//!    name that resolves (or re-resolves, DNS rebinding) to a private address
//!    is refused, and the connection goes only to the addresses we vetted.
//! 3. [`redirect_policy`]: every redirect hop goes through layer 1 again.
//!
//! [`client_builder`] wires all three into a `reqwest::ClientBuilder` and also
//! disables proxies: with a proxy, the resolver would only ever see the proxy's
//! name and the target host would never be checked.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::{redirect, Url};

/// Redirect hops followed before giving up.
pub const MAX_REDIRECTS: usize = 5;

/// Which otherwise-forbidden destinations are allowed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    /// Allow 127.0.0.0/8, ::1 and `localhost`. Only for tests and local
    /// development: everything else private stays forbidden.
    pub allow_loopback: bool,
}

impl AddressPolicy {
    /// Whether a connection to `ip` is allowed.
    pub fn permits(&self, ip: IpAddr) -> bool {
        !is_forbidden_ip(ip) || (self.allow_loopback && ip.to_canonical().is_loopback())
    }
}

/// Why a destination was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    #[error("refused: {0} resolves to a private/loopback/link-local address")]
    Forbidden(String),
    #[error("refused: {0} is a numeric address in a non-standard form")]
    NonCanonical(String),
    #[error("refused: scheme \"{0}\" is not allowed (only http and https)")]
    Scheme(String),
    #[error("refused: invalid host {0:?}")]
    InvalidHost(String),
    #[error("refused: more than {MAX_REDIRECTS} redirects")]
    TooManyRedirects,
    #[error("could not resolve {host}: {reason}")]
    Resolve { host: String, reason: String },
}

/// True for every address a provider must never connect to on behalf of a
/// stranger: anything that is not globally routable unicast.
pub fn is_forbidden_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_forbidden_v4(v4),
        IpAddr::V6(v6) => is_forbidden_v6(v6),
    }
}

fn is_forbidden_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    a == 0 // "this network", incl. 0.0.0.0 (which Linux routes to localhost)
        || a == 10
        || a == 127
        || a >= 224 // multicast 224/4, reserved 240/4, broadcast
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64/10
        || (a == 169 && b == 254) // link-local, incl. cloud metadata
        || (a == 172 && (16..32).contains(&b))
        || (a == 192 && b == 168)
        || (a == 192 && b == 0 && (c == 0 || c == 2)) // IETF assignments, TEST-NET-1
        || (a == 192 && b == 88 && c == 99) // 6to4 relay anycast
        || (a == 198 && (b == 18 || b == 19)) // benchmarking 198.18/15
        || (a == 198 && b == 51 && c == 100) // TEST-NET-2
        || (a == 203 && b == 0 && c == 113) // TEST-NET-3
}

fn is_forbidden_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    let low_v4 = Ipv4Addr::from(((s[6] as u32) << 16) | s[7] as u32);
    // Forms that embed an IPv4 address are judged by that address, so
    // ::ffff:127.0.0.1 is as forbidden as 127.0.0.1.
    if s[..5] == [0; 5] && (s[5] == 0 || s[5] == 0xffff) {
        // ::/96 (IPv4-compatible, incl. :: and ::1) and ::ffff:0:0/96 (mapped)
        return is_forbidden_v4(low_v4);
    }
    if s[..4] == [0; 4] && s[4] == 0xffff && s[5] == 0 {
        return is_forbidden_v4(low_v4); // ::ffff:0:a.b.c.d (SIIT)
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return is_forbidden_v4(low_v4); // NAT64 well-known prefix
    }
    if s[0] == 0x2002 {
        // 6to4: the v4 address sits in bits 16..48.
        return is_forbidden_v4(Ipv4Addr::from(((s[1] as u32) << 16) | s[2] as u32));
    }
    // Everything else must be global unicast (2000::/3). That single rule
    // excludes ::/8 leftovers, fc00::/7, fe80::/10, fec0::/10, ff00::/8,
    // 100::/64 and 64:ff9b:1::/48.
    (s[0] & 0xe000) != 0x2000
        || s[0] == 0x2001 && s[1] < 0x0200 // 2001::/23 IETF: Teredo, ORCHID, benchmarking
        || s[0] == 0x2001 && s[1] == 0x0db8 // documentation
        || (s[0] & 0xfff0) == 0x3ff0 // 3fff::/20 documentation
}

/// Parse an IPv4 host the way URL parsers and `inet_aton` do: one to four
/// dot-separated parts, each decimal, octal (leading 0) or hex (0x), the last
/// part filling the remaining bytes ("2130706433", "0x7f.1", "017700000001").
/// Returns `None` if `host` does not end in a number (i.e. is a name), and
/// `Some(None)` if it looks numeric but is not a valid address.
fn hex_digits(part: &str) -> Option<&str> {
    part.strip_prefix("0x").or_else(|| part.strip_prefix("0X"))
}

fn parse_legacy_ipv4(host: &str) -> Option<Option<Ipv4Addr>> {
    let parts: Vec<&str> = host.split('.').collect();
    let last = parts.last()?;
    let numeric_last = (!last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()))
        || hex_digits(last).is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
    if !numeric_last {
        return None;
    }
    if parts.len() > 4 {
        return Some(None);
    }
    let mut nums = Vec::with_capacity(parts.len());
    for p in &parts {
        let n = if let Some(h) = hex_digits(p) {
            if h.is_empty() {
                Ok(0)
            } else {
                u64::from_str_radix(h, 16)
            }
        } else if p.len() > 1 && p.starts_with('0') {
            u64::from_str_radix(&p[1..], 8)
        } else {
            p.parse::<u64>()
        };
        match n {
            Ok(n) => nums.push(n),
            Err(_) => return Some(None),
        }
    }
    let (last, init) = nums.split_last()?;
    if init.iter().any(|&n| n > 255) || *last >= 1u64 << (8 * (5 - nums.len())) {
        return Some(None);
    }
    let value = init
        .iter()
        .enumerate()
        .fold(*last, |acc, (i, &n)| acc | n << (8 * (3 - i)));
    Some(u32::try_from(value).ok().map(Ipv4Addr::from))
}

fn check_ip(ip: IpAddr, shown: &str, policy: AddressPolicy) -> Result<(), GuardError> {
    if policy.permits(ip) {
        Ok(())
    } else {
        Err(GuardError::Forbidden(shown.to_owned()))
    }
}

/// Check a literal host (a name, an IP literal, or an IPv6 literal in
/// brackets) before any DNS lookup.
pub fn check_host(host: &str, policy: AddressPolicy) -> Result<(), GuardError> {
    let h = host.trim().trim_end_matches('.').to_ascii_lowercase();
    if h.is_empty() {
        return Err(GuardError::InvalidHost(host.to_owned()));
    }
    if let Some(inner) = h.strip_prefix('[') {
        // Zone ids ("fe80::1%eth0") fail to parse and are refused, as intended.
        let ip: Ipv6Addr = inner
            .strip_suffix(']')
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| GuardError::InvalidHost(host.to_owned()))?;
        return check_ip(IpAddr::V6(ip), host, policy);
    }
    if let Ok(ip) = h.parse::<IpAddr>() {
        return check_ip(ip, host, policy);
    }
    match parse_legacy_ipv4(&h) {
        Some(Some(ip)) => {
            check_ip(IpAddr::V4(ip), host, policy)?;
            return Err(GuardError::NonCanonical(host.to_owned()));
        }
        Some(None) => return Err(GuardError::InvalidHost(host.to_owned())),
        None => {}
    }
    if h == "localhost" || h.ends_with(".localhost") {
        return if policy.allow_loopback {
            Ok(())
        } else {
            Err(GuardError::Forbidden(host.to_owned()))
        };
    }
    // Names that only mean something inside a private network: single-label
    // names (resolved through search domains: "metadata", "instance-data",
    // "router"), cloud metadata names, and private-use TLDs.
    let private_suffix = [".internal", ".local", ".localdomain", ".home.arpa", ".lan"];
    if !h.contains('.') || h == "metadata.goog" || private_suffix.iter().any(|s| h.ends_with(s)) {
        return Err(GuardError::Forbidden(host.to_owned()));
    }
    Ok(())
}

/// Check a URL before requesting it: http(s) only, and its host must pass
/// [`check_host`]. `Url` has already normalised "http://2130706433/" to
/// 127.0.0.1, so such hosts are checked as the address they mean.
pub fn check_url(url: &Url, policy: AddressPolicy) -> Result<(), GuardError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(GuardError::Scheme(url.scheme().to_owned()));
    }
    // host_str() gives IPv6 in brackets and IPv4 already in dotted-quad
    // form, both of which check_host understands.
    match url.host_str() {
        None => Err(GuardError::InvalidHost(String::new())),
        Some(host) => check_host(host, policy),
    }
}

/// The decision for one redirect hop; `hops_so_far` counts the URLs already
/// requested in the chain (the initial one included).
pub fn redirect_verdict(next: &Url, hops_so_far: usize, policy: AddressPolicy) -> Result<(), GuardError> {
    if hops_so_far > MAX_REDIRECTS {
        return Err(GuardError::TooManyRedirects);
    }
    check_url(next, policy)
}

/// A redirect policy that re-checks every hop and stops after
/// [`MAX_REDIRECTS`].
pub fn redirect_policy(policy: AddressPolicy) -> redirect::Policy {
    redirect::Policy::custom(
        move |attempt| match redirect_verdict(attempt.url(), attempt.previous().len(), policy) {
            Ok(()) => attempt.follow(),
            Err(e) => attempt.error(e),
        },
    )
}

/// Keep only permitted addresses; refuse the host if none remain.
pub fn filter_addrs(
    host: &str,
    addrs: impl IntoIterator<Item = SocketAddr>,
    policy: AddressPolicy,
) -> Result<Vec<SocketAddr>, GuardError> {
    let allowed: Vec<SocketAddr> = addrs.into_iter().filter(|a| policy.permits(a.ip())).collect();
    if allowed.is_empty() {
        Err(GuardError::Forbidden(host.to_owned()))
    } else {
        Ok(allowed)
    }
}

/// DNS resolver for reqwest that drops forbidden addresses from every answer.
/// reqwest connects only to what this returns, so the check cannot be raced
/// by a second, different DNS answer (rebinding).
#[derive(Debug, Clone, Copy, Default)]
pub struct GuardedResolver {
    policy: AddressPolicy,
}

impl GuardedResolver {
    pub fn new(policy: AddressPolicy) -> Self {
        Self { policy }
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            check_host(&host, policy)?;
            let found = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| GuardError::Resolve {
                    host: host.clone(),
                    reason: e.to_string(),
                })?;
            let allowed = filter_addrs(&host, found, policy)?;
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// A `reqwest::ClientBuilder` with the guard installed: filtered DNS, checked
/// redirects, no proxies. Callers must still [`check_url`] each request URL.
pub fn client_builder(policy: AddressPolicy) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .no_proxy()
        .dns_resolver(Arc::new(GuardedResolver::new(policy)))
        .redirect(redirect_policy(policy))
}

/// Find a [`GuardError`] anywhere in an error's source chain (reqwest wraps
/// errors from the resolver and the redirect policy).
pub fn find_guard_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a GuardError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(g) = e.downcast_ref::<GuardError>() {
            return Some(g);
        }
        cur = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const DENY: AddressPolicy = AddressPolicy { allow_loopback: false };
    const LOOP: AddressPolicy = AddressPolicy { allow_loopback: true };

    #[rustfmt::skip]
    const FORBIDDEN_IPS: [&str; 45] = [
        "127.0.0.1", "127.255.255.254", "10.0.0.1", "172.16.0.1", "172.31.255.255", "192.168.1.1",
        "169.254.169.254", "0.0.0.0", "0.1.2.3", "255.255.255.255", "224.0.0.1", "240.0.0.1",
        "100.64.0.1", "100.127.255.255", "192.0.2.1", "198.51.100.7", "203.0.113.9", "198.18.0.1",
        "198.19.255.1", "192.0.0.8", "192.88.99.1",
        "::1", "::", "fc00::1", "fd12:3456::1", "fe80::1", "fec0::1", "ff02::1", "100::1",
        "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::127.0.0.1",
        "::ffff:0:10.0.0.1", "64:ff9b::a00:1", "64:ff9b:1::1", "2002:7f00:1::", "2002:a9fe:a9fe::",
        "2001:db8::1", "2001::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2", "2001:10::1", "3fff::1",
        "::ffff:0.0.0.0", "::ffff:224.0.0.1",
    ];
    #[rustfmt::skip]
    const ALLOWED_IPS: [&str; 11] = [
        "8.8.8.8", "1.1.1.1", "93.184.216.34", "172.32.0.1", "100.128.0.1", "198.20.0.1",
        "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:0808:0808::1", "2606:4700::1111",
        "2001:4860:4860::8888",
    ];

    #[test]
    fn ip_table() {
        for ip in FORBIDDEN_IPS {
            assert!(is_forbidden_ip(ip.parse().unwrap()), "{ip} should be forbidden");
        }
        for ip in ALLOWED_IPS {
            assert!(!is_forbidden_ip(ip.parse().unwrap()), "{ip} should be allowed");
        }
    }

    #[test]
    fn loopback_policy_only_opens_loopback() {
        for ip in ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(LOOP.permits(ip) && !DENY.permits(ip), "{ip}");
        }
        for ip in FORBIDDEN_IPS.iter().filter(|ip| !ip.contains("127.") && **ip != "::1") {
            assert!(!LOOP.permits(ip.parse().unwrap()), "{ip}");
        }
    }

    #[rustfmt::skip]
    const FORBIDDEN_HOSTS: [&str; 31] = [
        "localhost", "LOCALHOST.", "foo.localhost", "metadata.google.internal", "metadata",
        "instance-data", "metadata.goog", "printer.local", "router.lan", "127.0.0.1", "[::1]",
        "[::ffff:127.0.0.1]", "[::ffff:a00:1]", "[fe80::1%eth0]", "2130706433", "0x7f000001",
        "0x7f.1", "017700000001", "0177.0.0.1", "127.1", "10.1", "0", "0x", "1.2.3.4.5",
        "256.256.256.256", "4294967296", "08", "", "169.254.169.254", "[fd00::1]", "[::]",
    ];

    #[test]
    fn host_table() {
        for h in FORBIDDEN_HOSTS {
            assert!(check_host(h, DENY).is_err(), "{h:?} should be refused");
        }
        for h in [
            "example.com",
            "sub.example.co.uk",
            "8.8.8.8",
            "[2606:4700::1111]",
            "1x.example",
        ] {
            assert_eq!(check_host(h, DENY), Ok(()), "{h:?}");
        }
        // Loopback opt-in opens canonical loopback only, never other ranges or odd forms.
        for h in ["localhost", "127.0.0.1", "[::1]"] {
            assert_eq!(check_host(h, LOOP), Ok(()), "{h:?}");
        }
        for h in [
            "10.0.0.1",
            "2130706433",
            "metadata.google.internal",
            "[fe80::1]",
            "0.0.0.0",
        ] {
            assert!(check_host(h, LOOP).is_err(), "{h:?}");
        }
        let v4 = |a, b, c, d| Some(Some(Ipv4Addr::new(a, b, c, d)));
        assert_eq!(parse_legacy_ipv4("0x7f.1"), v4(127, 0, 0, 1));
        assert_eq!(parse_legacy_ipv4("3232235777"), v4(192, 168, 1, 1));
        assert_eq!(parse_legacy_ipv4("0300.0250.1.1"), v4(192, 168, 1, 1));
        assert_eq!(parse_legacy_ipv4("example.com"), None);
        assert_eq!(parse_legacy_ipv4("1.2.3.999"), Some(None));
    }

    #[test]
    fn urls_and_redirect_hops() {
        let u = |s: &str| Url::parse(s).unwrap();
        for s in [
            "http://2130706433/",
            "http://0x7f.1/",
            "http://[::ffff:127.0.0.1]/",
            "http://169.254.169.254/latest/meta-data/",
            "https://10.0.0.1:8443/",
            "http://metadata.google.internal/",
            "http://localhost:8080/",
        ] {
            assert!(matches!(check_url(&u(s), DENY), Err(GuardError::Forbidden(_))), "{s}");
        }
        for s in ["file:///etc/passwd", "ftp://example.com/", "gopher://example.com/"] {
            assert!(matches!(check_url(&u(s), LOOP), Err(GuardError::Scheme(_))), "{s}");
        }
        assert_eq!(check_url(&u("https://example.com/a?b"), DENY), Ok(()));
        let ok = u("https://example.com/");
        assert_eq!(redirect_verdict(&ok, MAX_REDIRECTS, DENY), Ok(()));
        assert_eq!(
            redirect_verdict(&ok, MAX_REDIRECTS + 1, DENY),
            Err(GuardError::TooManyRedirects)
        );
        assert!(redirect_verdict(&u("http://127.0.0.1/"), 1, DENY).is_err());
        assert!(redirect_verdict(&u("http://10.0.0.1/"), 1, LOOP).is_err());
    }

    #[tokio::test]
    async fn resolver_checks_names_and_answers() {
        // "localhost" resolves from the hosts file: no DNS traffic.
        let name = |s: &str| s.parse::<Name>().unwrap();
        let resolved = GuardedResolver::new(LOOP).resolve(name("localhost")).await.unwrap();
        let addrs: Vec<SocketAddr> = resolved.collect();
        assert!(
            !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback()),
            "{addrs:?}"
        );
        let err = GuardedResolver::new(DENY)
            .resolve(name("localhost"))
            .await
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "refused: localhost resolves to a private/loopback/link-local address"
        );
        let internal = GuardedResolver::new(LOOP)
            .resolve(name("metadata.google.internal"))
            .await;
        assert!(internal.is_err());
    }

    #[test]
    fn resolver_answers_are_filtered() {
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        let mixed = [sa("10.0.0.1:0"), sa("93.184.216.34:0"), sa("[::1]:0")];
        assert_eq!(filter_addrs("h", mixed, DENY), Ok(vec![sa("93.184.216.34:0")]));
        assert_eq!(
            filter_addrs("h", mixed, LOOP),
            Ok(vec![sa("93.184.216.34:0"), sa("[::1]:0")])
        );
        let err = filter_addrs("evil.example", [sa("169.254.169.254:0")], LOOP).unwrap_err();
        assert!(err.to_string().starts_with("refused: evil.example resolves to"));
    }
}
