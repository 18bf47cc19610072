//! One `key=value`, applied with libpq's meaning (§34.1.2 "Parameter Key Words").
//!
//! Connection strings, URLs and the `PG*` environment variables all end here, in
//! `Config::set_option`, so a value means the same whichever way it arrives. The helpers below
//! read values as libpq's C code does (`strtol` integers, comma-separated lists with empty
//! entries, `require_auth` rules), because a string that works with `psql` must work here and
//! one that libpq refuses should be refused too.
//!
//! Errors are plain messages ready for the user; the caller adds where the value came from
//! (which URL part, which environment variable) and makes sure no password is quoted.

use std::path::PathBuf;
use std::time::Duration;

use super::{
    ChannelBinding, Config, DEFAULT_PORT, Host, HostAddr, LoadBalanceHosts, Secret, SslMode,
    SslNegotiation, TargetSessionAttrs,
};

/// Why a single `key=value` could not be applied.
pub(super) enum OptionError {
    /// libpq does not know the key.
    Unknown,
    /// The key is known but the value is not acceptable; the message is ready for the user.
    Invalid(String),
}

pub(super) type OptionResult = std::result::Result<(), OptionError>;

impl From<String> for OptionError {
    fn from(message: String) -> OptionError {
        OptionError::Invalid(message)
    }
}

impl Config {
    /// Applies one `key=value`, with libpq's keywords (§34.1.2 "Parameter Key Words").
    pub(super) fn set_option(&mut self, key: &str, value: &str) -> OptionResult {
        // The server reads NUL-terminated strings: a NUL would cut the value short or shift
        // every later field of the startup packet.
        if value.contains('\0') {
            return Err(OptionError::Invalid(format!(
                "connection option \"{key}\" contains a NUL character"
            )));
        }
        match key {
            "host" => self.hosts = Some(split_list(value).map(Host::from_value).collect()),
            "hostaddr" => self.hostaddrs = Some(parse_hostaddrs(value)?),
            "port" => self.ports = Some(parse_ports(value)?),
            "dbname" => self.dbname = Some(value.to_owned()),
            "user" => self.user = Some(value.to_owned()),
            "password" => self.password = Some(Secret(value.as_bytes().to_vec())),
            "passfile" => self.passfile = Some(PathBuf::from(value)),
            "options" => self.options = Some(value.to_owned()),
            "application_name" => self.application_name = Some(value.to_owned()),
            "fallback_application_name" => self.fallback_application_name = Some(value.to_owned()),
            "connect_timeout" => {
                // libpq: zero or negative waits forever, and one second is raised to two
                // because the timer's granularity would make it fire almost at once.
                let seconds = parse_int(key, value)?;
                self.connect_timeout = Some(Duration::from_secs(match seconds {
                    ..=0 => 0,
                    1 => 2,
                    n => n.unsigned_abs().into(),
                }));
            }
            "client_encoding" => check_client_encoding(value)?,
            "keepalives" => self.keepalives = Some(parse_int(key, value)? != 0),
            "keepalives_idle" => self.keepalives_idle = Some(parse_seconds(key, value)?),
            "keepalives_interval" => self.keepalives_interval = Some(parse_seconds(key, value)?),
            "keepalives_count" => {
                self.keepalives_count = Some(parse_int(key, value)?.max(0).unsigned_abs())
            }
            "tcp_user_timeout" => {
                let ms = parse_int(key, value)?.max(0).unsigned_abs();
                self.tcp_user_timeout = Some(Duration::from_millis(ms.into()));
            }
            "sslmode" => self.ssl_mode = Some(parse_enum(key, value, SslMode::parse)?),
            // requiressl is sslmode's predecessor; libpq still maps it (conninfo_storeval).
            "requiressl" => {
                self.ssl_mode = Some(if value.starts_with('1') {
                    SslMode::Require
                } else {
                    SslMode::Prefer
                })
            }
            "sslnegotiation" => {
                self.ssl_negotiation = Some(parse_enum(key, value, SslNegotiation::parse)?)
            }
            // Compression was removed from TLS; libpq ignores the setting too.
            "sslcompression" => {}
            "sslcert" => self.ssl_cert = Some(PathBuf::from(value)),
            "sslkey" => self.ssl_key = Some(PathBuf::from(value)),
            "sslpassword" => self.ssl_password = Some(Secret(value.as_bytes().to_vec())),
            "sslrootcert" => self.ssl_root_cert = Some(PathBuf::from(value)),
            "sslcrl" => self.ssl_crl = Some(PathBuf::from(value)),
            "sslcrldir" => self.ssl_crl_dir = Some(PathBuf::from(value)),
            // libpq turns SNI on only for a value starting with "1", and never complains.
            "sslsni" => self.ssl_sni = Some(value.starts_with('1')),
            "sslcertmode" => {
                self.ssl_cert_mode = Some(parse_enum(key, value, |v| match v {
                    "disable" => Some("disable"),
                    "allow" => Some("allow"),
                    "require" => Some("require"),
                    _ => None,
                })?);
            }
            "ssl_min_protocol_version" => {
                self.ssl_min_protocol_version = Some(parse_tls_version(key, value)?)
            }
            "ssl_max_protocol_version" => {
                self.ssl_max_protocol_version = Some(parse_tls_version(key, value)?)
            }
            "requirepeer" => self.requirepeer = Some(value.to_owned()),
            "require_auth" => {
                check_require_auth(value)?;
                self.require_auth = Some(value.to_owned());
            }
            "channel_binding" => {
                self.channel_binding = Some(parse_enum(key, value, ChannelBinding::parse)?)
            }
            // pgengine has no GSSAPI: asking for GSS encryption cannot be honoured, the other
            // modes mean "plain connection" here.
            "gssencmode" => match value {
                "disable" | "prefer" => {}
                "require" => {
                    return Err(OptionError::Invalid(format!(
                        "gssencmode value \"{value}\" invalid when GSSAPI support is not \
                         compiled in"
                    )));
                }
                _ => return Err(invalid_value(key, value)),
            },
            "krbsrvname" | "gsslib" | "gssdelegation" => {}
            "target_session_attrs" => {
                self.target_session_attrs = Some(parse_enum(key, value, TargetSessionAttrs::parse)?)
            }
            "load_balance_hosts" => {
                self.load_balance_hosts = Some(parse_enum(key, value, LoadBalanceHosts::parse)?)
            }
            "max_protocol_version" => {
                self.max_protocol_version = Some(parse_protocol_version(key, value)?)
            }
            "min_protocol_version" => {
                self.min_protocol_version = Some(parse_protocol_version(key, value)?)
            }
            "service" => {
                return Err(OptionError::Invalid(
                    "service files are not supported (service=...); give the settings \
                     directly"
                        .to_owned(),
                ));
            }
            "replication" => {
                return Err(OptionError::Invalid(
                    "replication connections are not supported".to_owned(),
                ));
            }
            _ => return Err(OptionError::Unknown),
        }
        Ok(())
    }
}

/// The elements of a comma-separated list; an empty string is an empty list (the setting is
/// "given but empty", which means "default"), and empty elements are kept.
pub(super) fn split_list(value: &str) -> impl Iterator<Item = &str> {
    (!value.is_empty())
        .then(|| value.split(','))
        .into_iter()
        .flatten()
}

/// `hostaddr` values: numeric addresses, one per host slot; an empty entry leaves that slot to
/// a name lookup of its host, as libpq does.
fn parse_hostaddrs(value: &str) -> std::result::Result<Vec<Option<HostAddr>>, String> {
    split_list(value)
        .map(|addr| {
            if addr.is_empty() {
                return Ok(None);
            }
            HostAddr::parse(addr)
                .map(Some)
                .ok_or_else(|| format!("could not parse network address \"{addr}\""))
        })
        .collect()
}

/// Ports as libpq reads them: an empty element means the default port; anything else must be
/// an integer from 1 to 65535.
fn parse_ports(value: &str) -> std::result::Result<Vec<u16>, String> {
    split_list(value)
        .map(|port| {
            if port.is_empty() {
                return Ok(DEFAULT_PORT);
            }
            parse_c_int(port)
                .and_then(|n| u16::try_from(n).ok())
                .filter(|&n| n != 0)
                .ok_or_else(|| format!("invalid port number: \"{port}\""))
        })
        .collect()
}

/// An integer the way libpq's `pqParseIntParam` reads one (`strtol` in base 10): leading and
/// trailing whitespace allowed, a sign allowed, and the value must fit in a C `int`.
fn parse_c_int(value: &str) -> Option<i32> {
    value.trim_matches(is_c_space).parse().ok()
}

/// C's `isspace` in the "C" locale, which is what libpq's parser uses.
pub(super) fn is_c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

fn parse_int(key: &str, value: &str) -> std::result::Result<i32, String> {
    parse_c_int(value)
        .ok_or_else(|| format!("invalid integer value \"{value}\" for connection option \"{key}\""))
}

/// Seconds for a keepalive timer; libpq treats negative values as zero ("system default").
fn parse_seconds(key: &str, value: &str) -> std::result::Result<Duration, String> {
    let seconds = parse_int(key, value)?.max(0).unsigned_abs();
    Ok(Duration::from_secs(seconds.into()))
}

fn invalid_value(key: &str, value: &str) -> OptionError {
    OptionError::Invalid(format!("invalid {key} value: \"{value}\""))
}

fn parse_enum<T>(
    key: &str,
    value: &str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> std::result::Result<T, OptionError> {
    parse(value).ok_or_else(|| invalid_value(key, value))
}

/// pgengine always sends `client_encoding=UTF8` and decodes every text as UTF-8, so any other
/// encoding would garble data. PostgreSQL ignores case and punctuation in encoding names
/// (`UTF-8`, `utf_8` and `Unicode` are all UTF8); `auto` means "from the locale", which we
/// take to be UTF-8.
fn check_client_encoding(value: &str) -> OptionResult {
    let cleaned: String = value
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    match cleaned.as_str() {
        "utf8" | "unicode" | "auto" => Ok(()),
        _ => Err(OptionError::Invalid(format!(
            "client_encoding \"{value}\" is not supported: pgengine always uses UTF8"
        ))),
    }
}

fn parse_tls_version(key: &str, value: &str) -> std::result::Result<String, OptionError> {
    // An empty value means "no bound", as in libpq.
    if value.is_empty() || tls_version_rank(value).is_some() {
        Ok(value.to_owned())
    } else {
        Err(OptionError::Invalid(format!(
            "invalid \"{key}\" value: \"{value}\""
        )))
    }
}

pub(super) fn tls_version_rank(value: &str) -> Option<u8> {
    ["tlsv1", "tlsv1.1", "tlsv1.2", "tlsv1.3"]
        .iter()
        .position(|v| v.eq_ignore_ascii_case(value))
        .and_then(|i| u8::try_from(i).ok())
}

pub(super) fn parse_protocol_version(
    key: &str,
    value: &str,
) -> std::result::Result<String, String> {
    match value {
        "3.0" | "3.2" | "latest" => Ok(value.to_owned()),
        _ => Err(format!("invalid {key} value: \"{value}\"")),
    }
}

/// Orders protocol versions; `latest` is the newest this driver knows, 3.2.
pub(super) fn protocol_version_rank(value: &str) -> u8 {
    match value {
        "3.0" => 0,
        _ => 1,
    }
}

/// The methods `require_auth` may name (libpq 16).
const AUTH_METHODS: &[&str] = &["password", "md5", "gss", "sspi", "scram-sha-256", "none"];

/// Validates a `require_auth` list the way libpq 16 does: known methods only, each at most once,
/// and either all negated (`!md5,!password`: "anything but these") or none ("one of these").
pub(super) fn check_require_auth(value: &str) -> std::result::Result<(), String> {
    let mut negated = None;
    let mut seen: Vec<&str> = Vec::new();
    for part in split_list(value) {
        let (is_negated, method) = match part.strip_prefix('!') {
            Some(method) => (true, method),
            None => (false, part),
        };
        match negated {
            Some(false) if is_negated => {
                return Err(format!(
                    "negative require_auth method \"{part}\" cannot be mixed with non-negative \
                     methods"
                ));
            }
            Some(true) if !is_negated => {
                return Err(format!(
                    "require_auth method \"{part}\" cannot be mixed with negative methods"
                ));
            }
            _ => negated = Some(is_negated),
        }
        if !AUTH_METHODS.contains(&method) {
            return Err(format!("invalid require_auth value: \"{method}\""));
        }
        // A repeated method is likely a typo in a setting where typos are dangerous.
        if seen.contains(&method) {
            return Err(format!(
                "require_auth method \"{part}\" is specified more than once"
            ));
        }
        seen.push(method);
    }
    Ok(())
}
