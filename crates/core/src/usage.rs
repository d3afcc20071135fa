//! Usage events without personal data (DESIGN.md §2 Usage event, §4.2).
//!
//! The raw client IP never leaves this module's callers' stack frames: it is truncated
//! (IPv4 to /24, IPv6 to /48) before anything else happens, and the visitor id is a
//! keyed hash (HMAC-SHA256, 128 bits kept) of a random daily salt, the server, the
//! truncated address and the user agent. Salts rotate at UTC midnight and are deleted
//! after 48 hours, after which no visitor id can be linked to anything.

use std::net::IpAddr;

use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use sha2::Sha256;

pub const DAY_MS: i64 = 86_400_000;

/// What a visitor did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UsageKind {
    View,
    Install,
    Test,
    CopyConfig,
    RepoClick,
}

impl UsageKind {
    pub const ALL: [UsageKind; 5] = [
        UsageKind::View,
        UsageKind::Install,
        UsageKind::Test,
        UsageKind::CopyConfig,
        UsageKind::RepoClick,
    ];

    pub fn parse(s: &str) -> Option<UsageKind> {
        UsageKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            UsageKind::View => "view",
            UsageKind::Install => "install",
            UsageKind::Test => "test",
            UsageKind::CopyConfig => "copy_config",
            UsageKind::RepoClick => "repo_click",
        }
    }

    /// Index in per-kind arrays and bit in per-visitor flags.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether public figures count this event at most once per visitor, server and
    /// day. Views count every (rate-limited) page view.
    pub fn once_per_visitor_day(self) -> bool {
        self != UsageKind::View
    }
}

/// The beacon body, JSON sent as `application/json` or as `text/plain` by
/// `navigator.sendBeacon`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageBody {
    pub server_id: String,
    pub event: String,
    #[serde(default)]
    pub client: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UsageError {
    #[error("the body must be JSON like {{\"server_id\":\"...\",\"event\":\"view\"}}: {0}")]
    Body(String),
    #[error("event must be view, install, test, copy_config or repo_click")]
    Event,
    #[error("client must be at most 64 characters of letters, digits, '.', '_' or '-'")]
    Client,
}

/// Parses and checks a beacon body.
pub fn decode(body: &[u8]) -> Result<(String, UsageKind, Option<String>), UsageError> {
    let parsed: UsageBody = serde_json::from_slice(body).map_err(|e| UsageError::Body(e.to_string()))?;
    let kind = UsageKind::parse(&parsed.event).ok_or(UsageError::Event)?;
    if let Some(c) = &parsed.client
        && (c.is_empty()
            || c.len() > 64
            || !c
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')))
    {
        return Err(UsageError::Client);
    }
    Ok((parsed.server_id, kind, parsed.client.map(|c| c.to_ascii_lowercase())))
}

/// The address with its host part removed: IPv4 /24, IPv6 /48.
pub fn truncate_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            IpAddr::from([a, b, c, 0])
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return truncate_ip(IpAddr::V4(v4));
            }
            let s = v6.segments();
            IpAddr::from([s[0], s[1], s[2], 0, 0, 0, 0, 0])
        }
    }
}

/// A CIDR block such as `10.0.0.0/8` or `::1/128` (a bare address is a single host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Option<Cidr> {
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, p.parse::<u8>().ok()?),
            None => {
                let a = text.trim().parse::<IpAddr>().ok()?;
                (a, if a.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr { network: addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.prefix)
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.prefix)
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Whether `ip` is in one of the trusted proxy networks.
pub fn is_trusted(ip: IpAddr, trusted: &[Cidr]) -> bool {
    trusted.iter().any(|c| c.contains(ip))
}

/// The client address: the peer, unless the peer is a trusted proxy, in which case the
/// right-most `X-Forwarded-For` entry that is not itself a trusted proxy.
pub fn client_ip(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[Cidr]) -> IpAddr {
    let is_trusted = |ip: IpAddr| is_trusted(ip, trusted);
    if !is_trusted(peer) {
        return peer;
    }
    let Some(header) = forwarded_for else { return peer };
    for hop in header.rsplit(',') {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) if is_trusted(ip) => continue,
            Ok(ip) => return ip,
            Err(_) => return peer,
        }
    }
    peer
}

/// The anonymous id of a visitor of `server_id` on the salt's day.
pub fn visitor_id(salt: &[u8; 32], server_id: &str, truncated_ip: IpAddr, user_agent: &str) -> [u8; 16] {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(salt).expect("any key length");
    mac.update(server_id.as_bytes());
    mac.update(&[0]);
    match truncated_ip {
        IpAddr::V4(v4) => mac.update(&v4.octets()),
        IpAddr::V6(v6) => mac.update(&v6.octets()),
    }
    mac.update(&[0]);
    mac.update(user_agent.as_bytes());
    let full = mac.finalize().into_bytes();
    let mut id = [0u8; 16];
    id.copy_from_slice(&full[..16]);
    id
}

/// The UTC day (days since the epoch) of an instant.
pub fn day_of(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS)
}

/// User agents of automation that the bot list may not know.
pub const HEADLESS_PATTERNS: [&str; 6] = [
    "HeadlessChrome",
    "PhantomJS",
    "Puppeteer",
    "Playwright",
    "Selenium",
    "Headless",
];

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn truncation() {
        assert_eq!(
            truncate_ip("203.0.113.77".parse().unwrap()),
            "203.0.113.0".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            truncate_ip("2001:db8:abcd:12::1".parse().unwrap()),
            "2001:db8:abcd::".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            truncate_ip("::ffff:198.51.100.9".parse().unwrap()),
            "198.51.100.0".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn cidrs_and_forwarding() {
        let trusted = [Cidr::parse("127.0.0.1").unwrap(), Cidr::parse("10.0.0.0/8").unwrap()];
        assert!(Cidr::parse("10.0.0.0/33").is_none() && Cidr::parse("nope").is_none());
        assert!(Cidr::parse("::1/128").unwrap().contains("::1".parse().unwrap()));
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        let outside: IpAddr = "198.51.100.9".parse().unwrap();
        // Untrusted peer: the header is ignored.
        assert_eq!(client_ip(outside, Some("203.0.113.5"), &trusted), outside);
        // Trusted peer: the right-most untrusted hop.
        assert_eq!(
            client_ip(peer, Some("203.0.113.5, 10.1.2.3"), &trusted),
            "203.0.113.5".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(peer, Some("garbage"), &trusted), peer);
        assert_eq!(client_ip(peer, None, &trusted), peer);
        assert_eq!(client_ip(peer, Some("203.0.113.5"), &[]), peer);
    }

    #[test]
    fn visitor_ids_depend_on_every_input() {
        let salt = [7u8; 32];
        let ip: IpAddr = "203.0.113.0".parse().unwrap();
        let base = visitor_id(&salt, "a", ip, "ua");
        assert_eq!(base, visitor_id(&salt, "a", ip, "ua"));
        assert_ne!(base, visitor_id(&[8u8; 32], "a", ip, "ua"));
        assert_ne!(base, visitor_id(&salt, "b", ip, "ua"));
        assert_ne!(base, visitor_id(&salt, "a", "203.0.114.0".parse().unwrap(), "ua"));
        assert_ne!(base, visitor_id(&salt, "a", ip, "ub"));
    }

    #[test]
    fn bodies() {
        assert_eq!(
            decode(br#"{"server_id":"a","event":"install","client":"Cursor"}"#).unwrap(),
            ("a".into(), UsageKind::Install, Some("cursor".into()))
        );
        assert_eq!(decode(br#"{"server_id":"a","event":"like"}"#), Err(UsageError::Event));
        assert_eq!(
            decode(br#"{"server_id":"a","event":"view","client":"x y"}"#),
            Err(UsageError::Client)
        );
        assert!(matches!(decode(b"nope"), Err(UsageError::Body(_))));
        assert_eq!(day_of(DAY_MS - 1), 0);
        assert_eq!(day_of(DAY_MS), 1);
    }

    proptest! {
        #[test]
        fn truncation_is_idempotent_and_hides_the_host(a in any::<[u8; 4]>(), s in any::<[u16; 8]>()) {
            let v4 = IpAddr::from(a);
            prop_assert_eq!(truncate_ip(truncate_ip(v4)), truncate_ip(v4));
            prop_assert_eq!(truncate_ip(v4), IpAddr::from([a[0], a[1], a[2], 0]));
            let v6 = IpAddr::from(s);
            if let IpAddr::V6(t) = truncate_ip(v6) {
                prop_assert!(t.segments()[3..].iter().all(|x| *x == 0) || t.to_ipv4_mapped().is_some());
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = decode(&bytes);
        }
    }
}
