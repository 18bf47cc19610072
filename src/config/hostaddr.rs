//! Numeric server addresses (`hostaddr`).
//!
//! libpq hands `hostaddr` to `getaddrinfo` with `AI_NUMERICHOST`, which accepts more than Rust's
//! `IpAddr` parser: the old `inet_aton` forms of IPv4 (`127.1`, `0x7f.1`) and IPv6 addresses
//! with a zone (`fe80::1%eth0`). A string that works with `psql` must work here too, so this file
//! reads those forms without calling into libc.

use std::fmt;
use std::net::IpAddr;

/// A numeric server address (`hostaddr`), read as `getaddrinfo` with `AI_NUMERICHOST` reads it
/// for libpq: IPv4 in any `inet_aton` form (`127.0.0.1`, `127.1`, `0x7f.1`), IPv6, and IPv6
/// with a zone (`fe80::1%eth0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAddr {
    ip: IpAddr,
    scope_id: u32,
    text: String,
}

impl HostAddr {
    /// Reads a numeric address, or `None` if `text` is not one.
    ///
    /// ```
    /// use pgengine::config::HostAddr;
    /// assert_eq!(HostAddr::parse("127.1").unwrap().ip().to_string(), "127.0.0.1");
    /// assert!(HostAddr::parse("db.example.com").is_none());
    /// ```
    pub fn parse(text: &str) -> Option<HostAddr> {
        let (ip, scope_id) = if let Ok(ip) = text.parse::<IpAddr>() {
            (ip, 0)
        } else if let Some((addr, zone)) = text.split_once('%') {
            let ip: std::net::Ipv6Addr = addr.parse().ok()?;
            (IpAddr::V6(ip), zone_index(zone)?)
        } else {
            (IpAddr::V4(inet_aton(text)?), 0)
        };
        Some(HostAddr {
            ip,
            scope_id,
            text: text.to_owned(),
        })
    }

    /// The address.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// The socket address to connect to on `port` (with the IPv6 zone, if any).
    pub fn socket_addr(&self, port: u16) -> std::net::SocketAddr {
        match self.ip {
            IpAddr::V4(v4) => std::net::SocketAddr::from((v4, port)),
            IpAddr::V6(v6) => std::net::SocketAddrV6::new(v6, port, 0, self.scope_id).into(),
        }
    }
}

impl From<IpAddr> for HostAddr {
    fn from(ip: IpAddr) -> HostAddr {
        HostAddr {
            ip,
            scope_id: 0,
            text: ip.to_string(),
        }
    }
}

impl fmt::Display for HostAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// IPv4 in the forms `inet_aton` accepts: one to four parts, each decimal, octal (leading 0)
/// or hex (0x); the last part fills the remaining bytes.
fn inet_aton(text: &str) -> Option<std::net::Ipv4Addr> {
    let parts: Vec<u32> = text.split('.').map(c_number).collect::<Option<_>>()?;
    let (last, head) = parts.split_last()?;
    if head.len() > 3 || head.iter().any(|&p| p > 255) {
        return None;
    }
    let last_bits = 8 * (4 - head.len() as u32);
    if last_bits < 32 && u64::from(*last) >= 1u64 << last_bits {
        return None;
    }
    let mut value = *last;
    for (i, p) in head.iter().enumerate() {
        value |= p << (24 - 8 * i as u32);
    }
    Some(std::net::Ipv4Addr::from(value))
}

fn c_number(part: &str) -> Option<u32> {
    if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
        u32::from_str_radix(hex, 16).ok()
    } else if part.len() > 1 && part.starts_with('0') {
        u32::from_str_radix(&part[1..], 8).ok()
    } else if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
        part.parse().ok()
    } else {
        None
    }
}

/// An IPv6 zone: a number, or an interface name looked up in /sys (Linux).
fn zone_index(zone: &str) -> Option<u32> {
    if let Ok(n) = zone.parse() {
        return Some(n);
    }
    if zone.is_empty() || zone.contains('/') || zone.contains("..") {
        return None;
    }
    std::fs::read_to_string(format!("/sys/class/net/{zone}/ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()
}
