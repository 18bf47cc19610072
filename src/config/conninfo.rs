//! Connection strings: `key = value` pairs (§34.1.1.1) and `postgresql://` URLs (§34.1.1.2).
//!
//! Both syntaxes are read the way libpq's `conninfo_parse` and `conninfo_uri_parse_options` read
//! them, quirks included, so that a string that works with `psql` means the same here. Each
//! piece found is handed to `Config::set_option` (keywords.rs), which knows what the keywords
//! mean; this file only knows the syntax.
//!
//! A URL carries its password inline, so the URL code takes care that no error message quotes
//! a password, or a piece of text that might be one.

use std::str::FromStr;

use super::keywords::{OptionError, OptionResult, is_c_space};
use super::{Check, Config, Secret};
use crate::error::{Error, Result};

impl Config {
    /// Parses a libpq connection string: a URL starting with `postgresql://` or `postgres://`
    /// (§34.1.1.2), or whitespace-separated `key = value` pairs (§34.1.1.1). Unknown keys and
    /// malformed values are errors naming them (never a password). The environment is not read;
    /// see [`Config::with_env_defaults`].
    ///
    /// ```
    /// use pgengine::config::{Config, Host};
    ///
    /// let url = Config::parse("postgres://bob:pa%40ss@[::1]:6432/inventory")?;
    /// assert_eq!(url.get_password(), Some(&b"pa@ss"[..]));
    /// assert_eq!(url.get_hosts(), &[Host::Tcp("::1".into())]);
    ///
    /// let kv = Config::parse("host=/tmp dbname='my db' application_name=it\\'s")?;
    /// assert_eq!(kv.get_hosts(), &[Host::Unix("/tmp".into())]);
    /// assert_eq!(kv.get_dbname(), Some("my db"));
    /// assert_eq!(kv.get_application_name(), Some("it's"));
    ///
    /// let err = Config::parse("hots=db").unwrap_err();
    /// assert!(err.to_string().contains(r#"invalid connection option "hots""#));
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn parse(s: &str) -> Result<Config> {
        let mut config = Config::new();
        match strip_uri_prefix(s) {
            Some((prefix_len, rest)) => parse_uri(&mut config, prefix_len, rest),
            None => parse_keyword_value(&mut config, s),
        }
        .map_err(Error::config)?;
        config.check(Check::AsGiven).map_err(Error::config)?;
        Ok(config)
    }
}

impl FromStr for Config {
    type Err = Error;

    /// The same as [`Config::parse`].
    fn from_str(s: &str) -> Result<Config> {
        Config::parse(s)
    }
}

// ----------------------------------------------------------------------------------------------
// The key=value syntax (§34.1.1.1).
// ----------------------------------------------------------------------------------------------

/// `key = value` pairs separated by whitespace. A value is either bare (ends at whitespace) or
/// single-quoted; in both, a backslash takes the next character literally. This is libpq's
/// `conninfo_parse`, including its quirks: `host= port=1` sets host to `port=1`.
fn parse_keyword_value(config: &mut Config, s: &str) -> std::result::Result<(), String> {
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|&c| is_c_space(c)).is_some() {}
        if chars.peek().is_none() {
            return Ok(());
        }

        let mut key = String::new();
        while let Some(c) = chars.next_if(|&c| c != '=' && !is_c_space(c)) {
            key.push(c);
        }
        while chars.next_if(|&c| is_c_space(c)).is_some() {}
        if chars.next_if_eq(&'=').is_none() {
            // A URL with a scheme we do not accept would otherwise be echoed, password and all.
            if key.contains("://") {
                return Err(
                    "missing \"=\" after a word that looks like a URL: only URLs \
                            starting with \"postgresql://\" or \"postgres://\" are accepted"
                        .to_owned(),
                );
            }
            return Err(format!(
                "missing \"=\" after \"{key}\" in connection info string"
            ));
        }
        while chars.next_if(|&c| is_c_space(c)).is_some() {}

        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => {
                        return Err(
                            "unterminated quoted string in connection info string".to_owned()
                        );
                    }
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|&c| !is_c_space(c)) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }

        config.set_option(&key, &value).map_err(|e| match e {
            OptionError::Unknown => format!("invalid connection option \"{key}\""),
            OptionError::Invalid(message) => message,
        })?;
    }
}

// ----------------------------------------------------------------------------------------------
// The URL syntax (§34.1.1.2):
// postgresql://[userspec@][hostspec][/dbname][?paramspec]
// ----------------------------------------------------------------------------------------------

/// libpq accepts exactly these two designators, case-sensitively.
fn strip_uri_prefix(s: &str) -> Option<(usize, &str)> {
    ["postgresql://", "postgres://"]
        .into_iter()
        .find_map(|prefix| s.strip_prefix(prefix).map(|rest| (prefix.len(), rest)))
}

/// Parses what follows the scheme, as libpq's `conninfo_uri_parse_options` does: every part is
/// percent-decoded, hosts and ports are gathered into comma-separated lists and then applied
/// exactly like `host=` and `port=` in a `key=value` string.
fn parse_uri(config: &mut Config, prefix_len: usize, uri: &str) -> std::result::Result<(), String> {
    // "user[:password]@" is present when an '@' comes before the first '/'.
    let (userinfo, rest, rest_offset) = match uri.find(['@', '/']) {
        Some(at) if uri.as_bytes()[at] == b'@' => (Some(&uri[..at]), &uri[at + 1..], at + 1),
        _ => (None, uri, 0),
    };
    if let Some(userinfo) = userinfo {
        let (user, password) = match userinfo.split_once(':') {
            Some((user, password)) => (user, Some(password)),
            None => (userinfo, None),
        };
        if !user.is_empty() {
            apply_uri_part(config, "user", user).map_err(|e| uri_error("user", e))?;
        }
        if let Some(password) = password.filter(|p| !p.is_empty()) {
            apply_uri_part(config, "password", password).map_err(|e| uri_error("password", e))?;
        }
    }

    // Without userinfo, an '@' later in the URL most likely ends a password that contains an
    // unencoded '/'; then the "host" and "port" we read may be pieces of that password, and
    // must not be echoed in an error.
    let path_end = rest.find('?').unwrap_or(rest.len());
    let may_hold_password = userinfo.is_none() && rest[..path_end].contains('@');

    let bytes = rest.as_bytes();
    let mut hosts = String::new();
    let mut ports = String::new();
    let mut p = 0;
    let mut terminator = loop {
        if bytes.get(p) == Some(&b'[') {
            let start = p + 1;
            let end = rest[start..].find(']').map(|i| start + i).ok_or(
                "end of string reached when looking for matching \"]\" in IPv6 host address in URI",
            )?;
            if end == start {
                return Err("IPv6 host address may not be empty in URI".to_owned());
            }
            hosts.push_str(&rest[start..end]);
            p = end + 1;
            if let Some(c) = rest[p..].chars().next()
                && !matches!(c, ':' | '/' | '?' | ',')
            {
                return Err(format!(
                    "unexpected character \"{c}\" at position {} in URI (expected \":\" or \"/\")",
                    prefix_len + rest_offset + p + 1
                ));
            }
        } else {
            let end = rest[p..]
                .find([':', '/', '?', ','])
                .map_or(rest.len(), |i| p + i);
            hosts.push_str(&rest[p..end]);
            p = end;
        }
        if bytes.get(p) == Some(&b':') {
            let start = p + 1;
            let end = rest[start..]
                .find(['/', '?', ','])
                .map_or(rest.len(), |i| start + i);
            ports.push_str(&rest[start..end]);
            p = end;
        }
        if bytes.get(p) != Some(&b',') {
            break bytes.get(p).copied();
        }
        p += 1;
        hosts.push(',');
        ports.push(',');
    };
    if !hosts.is_empty() {
        apply_uri_part(config, "host", &hosts)
            .map_err(|e| redact_if(may_hold_password, uri_error("host", e)))?;
    }
    if !ports.is_empty() {
        apply_uri_part(config, "port", &ports)
            .map_err(|e| redact_if(may_hold_password, uri_error("port", e)))?;
    }

    if terminator == Some(b'/') {
        let start = p + 1;
        let end = rest[start..].find('?').map_or(rest.len(), |i| start + i);
        // An empty dbname is left unset so that PGDATABASE can still supply it.
        if end > start {
            apply_uri_part(config, "dbname", &rest[start..end])
                .map_err(|e| uri_error("dbname", e))?;
        }
        p = end;
        terminator = bytes.get(p).copied();
    }
    if terminator == Some(b'?') {
        parse_uri_params(config, &rest[p + 1..])?;
    }
    Ok(())
}

fn redact_if(redact: bool, message: String) -> String {
    if redact {
        "invalid host or port in URI (not shown: it may contain part of a password; \
         percent-encode \"/\" in a password as %2F)"
            .to_owned()
    } else {
        message
    }
}

/// `key=value` pairs joined by `&`; both sides percent-decoded. `ssl=true` is the JDBC spelling
/// of `sslmode=require`, which libpq accepts too.
fn parse_uri_params(config: &mut Config, query: &str) -> std::result::Result<(), String> {
    let mut rest = query;
    while !rest.is_empty() {
        let (param, next) = rest.split_once('&').unwrap_or((rest, ""));
        rest = next;
        let Some((raw_key, raw_value)) = param.split_once('=') else {
            return Err(format!(
                "missing key/value separator \"=\" in URI query parameter: \"{param}\""
            ));
        };
        if raw_value.contains('=') {
            return Err(format!(
                "extra key/value separator \"=\" in URI query parameter: \"{raw_key}\""
            ));
        }
        let key = decode_text(raw_key, "URI query parameter name", false)?;
        let result = if key == "ssl" && decode_text(raw_value, "ssl", false)? == "true" {
            config.set_option("sslmode", "require")
        } else {
            apply_uri_part(config, &key, raw_value)
        };
        result.map_err(|e| uri_error(&key, e))?;
    }
    Ok(())
}

/// Percent-decodes one part of a URL and applies it as the setting `key`. A password is kept as
/// bytes (it need not be UTF-8) and never appears in an error.
fn apply_uri_part(config: &mut Config, key: &str, raw: &str) -> OptionResult {
    if key == "password" {
        config.password = Some(Secret(decode(raw, key, true)?));
        return Ok(());
    }
    let value = decode_text(raw, key, key == "sslpassword")?;
    config.set_option(key, &value)
}

/// Words an [`OptionError`] from a URL; only query parameters can have unknown names.
fn uri_error(key: &str, error: OptionError) -> String {
    match error {
        OptionError::Unknown => format!("invalid URI query parameter: \"{key}\""),
        OptionError::Invalid(message) => message,
    }
}

fn decode_text(raw: &str, what: &str, secret: bool) -> std::result::Result<String, String> {
    String::from_utf8(decode(raw, what, secret)?).map_err(|_| {
        if secret {
            format!("invalid UTF-8 in percent-encoded {what}")
        } else {
            format!("invalid UTF-8 in percent-encoded value: \"{raw}\"")
        }
    })
}

/// libpq's `conninfo_uri_decode`: `%XX` becomes the byte 0xXX; `%00` is refused (a NUL would
/// truncate the value on the wire); spaces around a part are dropped, spaces inside it refused.
/// With `secret`, messages name the part (`what`) instead of quoting its text.
fn decode(raw: &str, what: &str, secret: bool) -> std::result::Result<Vec<u8>, String> {
    let shown = |problem: &str| {
        if secret {
            format!("{problem} in {what}")
        } else {
            format!("{problem}: \"{raw}\"")
        }
    };
    let trimmed = raw.trim_matches(' ');
    if trimmed.contains(' ') {
        return Err(if secret {
            format!("unexpected spaces found in {what}, use percent-encoded spaces (%20) instead")
        } else {
            format!(
                "unexpected spaces found in \"{raw}\", use percent-encoded spaces (%20) instead"
            )
        });
    }
    let bytes = trimmed.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let hi = bytes.get(i + 1).and_then(|&b| hex_digit(b));
        let lo = bytes.get(i + 2).and_then(|&b| hex_digit(b));
        let (Some(hi), Some(lo)) = (hi, lo) else {
            return Err(shown(if secret {
                "invalid percent-encoding"
            } else {
                "invalid percent-encoded token"
            }));
        };
        let byte = (hi << 4) | lo;
        if byte == 0 {
            return Err(shown("forbidden value %00 in percent-encoded value"));
        }
        out.push(byte);
        i += 3;
    }
    Ok(out)
}

fn hex_digit(b: u8) -> Option<u8> {
    (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
}
