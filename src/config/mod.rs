//! Connection settings, read the way libpq reads them.
//!
//! A [`Config`] says where to connect and how: hosts and ports, user, database, password,
//! TLS and authentication requirements, timeouts. It can be filled from four places, and this
//! module follows libpq (PostgreSQL docs §34.1 "Database Connection Control Functions") for
//! each of them so that a string that works with `psql` works here too:
//!
//! - a connection string, either `key=value` pairs (§34.1.1.1) or a URL
//!   `postgresql://user:secret@host:5432/db?sslmode=require` (§34.1.1.2): [`Config::parse`];
//! - the builder methods ([`Config::host`], [`Config::user`], ...);
//! - the `PG*` environment variables (§34.15): [`Config::from_env`], and
//!   [`Config::with_env_defaults`], which fills only what the string left unset, giving libpq's
//!   precedence "connection string, then environment, then built-in default";
//! - the password file `~/.pgpass` (§34.16), consulted at connect time by
//!   [`Config::password_for`] when no password was given.
//!
//! Every setting remembers whether it was set at all, because "not set" and "set to the default"
//! differ: only an unset setting is filled from the environment. Defaults (port 5432, the OS user
//! name, the default socket directory) are applied by the `effective_*` and `get_*` methods, not
//! stored.
//!
//! Nothing here touches the network. The only I/O is reading `/etc/passwd`, `/proc/self/status`
//! (to find the OS user name) and the password file, and checking whether the default socket
//! directory exists. Passwords are kept in a type whose `Debug` prints `<redacted>`, and no error
//! message ever contains one.
//!
//! The files here follow those sources. `conninfo.rs` reads connection strings and `env.rs` the
//! environment; both hand each `key=value` to `keywords.rs`, the one place a keyword becomes a
//! setting, so the two sources cannot disagree on what a value means. `setters.rs` and
//! `getters.rs` are the builder and its accessors, `defaults.rs` decides what a connection uses
//! for what was left unset, and `pgpass.rs` reads the password file. The small enums are in
//! `modes.rs`, numeric `hostaddr` parsing in `hostaddr.rs`.
//!
//! ```
//! use pgengine::config::{Config, Host, SslMode};
//!
//! let config = Config::parse("postgresql://app@db1:5433,db2/appdb?sslmode=require")?;
//! assert_eq!(config.get_user(), Some("app"));
//! assert_eq!(config.get_ssl_mode(), SslMode::Require);
//! assert_eq!(
//!     config.effective_hosts(),
//!     vec![(Host::Tcp("db1".into()), 5433), (Host::Tcp("db2".into()), 5432)]
//! );
//! # Ok::<(), pgengine::Error>(())
//! ```

mod conninfo;
mod defaults;
mod env;
mod getters;
mod hostaddr;
mod keywords;
mod modes;
mod pgpass;
mod setters;

pub use hostaddr::HostAddr;
pub use modes::{ChannelBinding, LoadBalanceHosts, SslMode, SslNegotiation, TargetSessionAttrs};
pub use pgpass::pgpass_lookup;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use keywords::{protocol_version_rank, tls_version_rank};

/// The port PostgreSQL listens on unless told otherwise.
const DEFAULT_PORT: u16 = 5432;

/// Where the server's Unix socket lives on Debian-family systems; used when no host is given and
/// the directory exists, else we fall back to TCP on `localhost`.
const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";

/// libpq's `DefaultHost`: the name used for TCP and for `.pgpass` matching of local sockets.
const LOCALHOST: &str = "localhost";

/// Where to reach a server.
///
/// ```
/// use pgengine::config::{Config, Host};
///
/// let mut config = Config::new();
/// config.host("db.example.com").host("/tmp");
/// assert_eq!(
///     config.get_hosts(),
///     &[Host::Tcp("db.example.com".into()), Host::Unix("/tmp".into())]
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Host {
    /// A host name or IP address reached over TCP. An empty name (from an empty entry in a host
    /// list such as `host=a,,b`) means "the default host", as in libpq; [`Config::effective_hosts`]
    /// resolves it.
    Tcp(String),
    /// The directory holding the server's Unix-domain socket (`.s.PGSQL.<port>` inside it). A path
    /// starting with `@` names a socket in Linux's abstract namespace.
    Unix(PathBuf),
}

impl Host {
    /// Reads a host as libpq does: a value starting with `/` or `@` is a socket directory
    /// (libpq's `is_unixsock_path`), anything else a host name or address.
    fn from_value(value: &str) -> Host {
        if is_unix_socket_path(value) {
            Host::Unix(PathBuf::from(value))
        } else {
            Host::Tcp(value.to_owned())
        }
    }

    /// The text `.pgpass` compares with its host field.
    fn pgpass_key(&self) -> String {
        match self {
            Host::Tcp(name) if name.is_empty() => LOCALHOST.to_owned(),
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.to_string_lossy().into_owned(),
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Tcp(name) => f.write_str(name),
            Host::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

fn is_unix_socket_path(value: &str) -> bool {
    value.starts_with('/') || value.starts_with('@')
}

/// A password or key passphrase. Its `Debug` never shows the bytes, so a `Config` can be logged.
#[derive(Clone, PartialEq, Eq)]
struct Secret(Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Connection settings: where to connect, as whom, and how.
///
/// Build one with [`Config::parse`] (or `str::parse`), with [`Config::new`] and the setters, or
/// from the environment with [`Config::from_env`]; [`Config::with_env_defaults`] fills what is
/// still unset from the `PG*` variables. Its `Debug` output shows every setting that is set,
/// except that passwords print as `<redacted>`.
///
/// ```
/// use std::time::Duration;
/// use pgengine::Config;
///
/// let mut config = Config::new();
/// config
///     .host("localhost")
///     .port(5433)
///     .user("app")
///     .password("s3cret")
///     .dbname("appdb")
///     .connect_timeout(Duration::from_secs(5));
/// assert_eq!(config.get_ports(), &[5433]);
/// assert!(!format!("{config:?}").contains("s3cret"));
/// ```
#[derive(Clone, Default)]
pub struct Config {
    hosts: Option<Vec<Host>>,
    hostaddrs: Option<Vec<Option<HostAddr>>>,
    ports: Option<Vec<u16>>,
    user: Option<String>,
    password: Option<Secret>,
    passfile: Option<PathBuf>,
    dbname: Option<String>,
    options: Option<String>,
    application_name: Option<String>,
    fallback_application_name: Option<String>,
    /// Zero means "wait forever", kept distinct from "unset" so that `connect_timeout=0` in a
    /// connection string still overrides `PGCONNECT_TIMEOUT`.
    connect_timeout: Option<Duration>,
    keepalives: Option<bool>,
    keepalives_idle: Option<Duration>,
    keepalives_interval: Option<Duration>,
    keepalives_count: Option<u32>,
    tcp_user_timeout: Option<Duration>,
    ssl_mode: Option<SslMode>,
    ssl_negotiation: Option<SslNegotiation>,
    ssl_cert: Option<PathBuf>,
    ssl_key: Option<PathBuf>,
    ssl_password: Option<Secret>,
    ssl_root_cert: Option<PathBuf>,
    ssl_crl: Option<PathBuf>,
    ssl_crl_dir: Option<PathBuf>,
    ssl_sni: Option<bool>,
    ssl_cert_mode: Option<&'static str>,
    ssl_min_protocol_version: Option<String>,
    ssl_max_protocol_version: Option<String>,
    channel_binding: Option<ChannelBinding>,
    /// The raw, already validated list (e.g. `"scram-sha-256,none"` or `"!password,!md5"`).
    require_auth: Option<String>,
    requirepeer: Option<String>,
    target_session_attrs: Option<TargetSessionAttrs>,
    load_balance_hosts: Option<LoadBalanceHosts>,
    max_protocol_version: Option<String>,
    min_protocol_version: Option<String>,
}

/// Applies `$m!(field)` to every setting, so that "fill what is unset" and `Debug` cannot forget
/// one when a setting is added.
macro_rules! for_each_setting {
    ($m:ident) => {
        $m!(
            hosts,
            hostaddrs,
            ports,
            user,
            password,
            passfile,
            dbname,
            options,
            application_name,
            fallback_application_name,
            connect_timeout,
            keepalives,
            keepalives_idle,
            keepalives_interval,
            keepalives_count,
            tcp_user_timeout,
            ssl_mode,
            ssl_negotiation,
            ssl_cert,
            ssl_key,
            ssl_password,
            ssl_root_cert,
            ssl_crl,
            ssl_crl_dir,
            ssl_sni,
            ssl_cert_mode,
            ssl_min_protocol_version,
            ssl_max_protocol_version,
            channel_binding,
            require_auth,
            requirepeer,
            target_session_attrs,
            load_balance_hosts,
            max_protocol_version,
            min_protocol_version
        )
    };
}

// Lets the other files of this module (env.rs fills unset settings with it) name the macro.
use for_each_setting;

impl fmt::Debug for Config {
    /// Lists only the settings that are set. Secrets are stored in a private type whose `Debug`
    /// prints `<redacted>`, so neither the password nor the TLS key passphrase can show.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Config");
        macro_rules! show {
            ($($field:ident),*) => {$(
                if let Some(value) = &self.$field {
                    d.field(stringify!($field), value);
                }
            )*};
        }
        for_each_setting!(show);
        d.finish()
    }
}

/// Whether a consistency check may assume built-in defaults for settings that are unset.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Only relations between settings that are all set: the rest may still come from the
    /// environment (libpq checks after merging it).
    AsGiven,
    /// Unset settings take their defaults: this is what a connection will use.
    WithDefaults,
}

impl Config {
    /// A configuration with nothing set: connecting with it uses every default (the default
    /// socket or `localhost`, port 5432, the OS user name as user and database).
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// let config = Config::new();
    /// assert!(config.get_hosts().is_empty());
    /// assert_eq!(config.get_user(), None);
    /// ```
    pub fn new() -> Config {
        Config::default()
    }

    /// Checks that the settings fit together as a connection will use them, defaults included:
    /// as many ports as hosts (or exactly one), as many host names as `hostaddr` values,
    /// `sslnegotiation=direct` only with an `sslmode` that requires TLS, `sslrootcert=system`
    /// only with `verify-full`, and ordered protocol version ranges.
    ///
    /// [`Config::parse`] already checks the settings it was given; call this after using the
    /// setters, or let the connection call it.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// let mut config = Config::new();
    /// config.host("a").host("b").port(1).port(2).port(3);
    /// let err = config.validate().unwrap_err();
    /// assert!(err.to_string().contains("could not match 3 port numbers to 2 hosts"));
    /// ```
    pub fn validate(&self) -> Result<()> {
        self.check(Check::WithDefaults).map_err(Error::config)
    }

    fn check(&self, mode: Check) -> std::result::Result<(), String> {
        let hosts = self.hosts.as_ref().map(Vec::len);
        let addrs = self.hostaddrs.as_ref().map(Vec::len);
        if let (Some(h), Some(a)) = (hosts, addrs)
            && h > 0
            && a > 0
            && h != a
        {
            return Err(format!(
                "could not match {h} host names to {a} hostaddr values"
            ));
        }

        // §34.1.2 "port": one port applies to every host, otherwise one port per host.
        if let Some(ports) = &self.ports {
            let hosts_known = hosts.is_some() || addrs.is_some();
            if ports.len() > 1 && (hosts_known || mode == Check::WithDefaults) {
                let slots = self.host_slot_count();
                if ports.len() != slots {
                    return Err(format!(
                        "could not match {} port numbers to {slots} hosts",
                        ports.len()
                    ));
                }
            }
        }

        // libpq refuses direct TLS with a mode that could fall back to plain text, so that a
        // pre-17 server cannot silently downgrade the connection.
        if self.ssl_negotiation == Some(SslNegotiation::Direct) {
            let mode_in_force = match mode {
                Check::AsGiven => self.ssl_mode,
                Check::WithDefaults => Some(self.get_ssl_mode()),
            };
            if let Some(ssl_mode) = mode_in_force
                && !ssl_mode.requires_tls()
            {
                return Err(format!(
                    "weak sslmode \"{}\" may not be used with sslnegotiation=direct \
                         (use \"require\", \"verify-ca\", or \"verify-full\")",
                    ssl_mode.as_str()
                ));
            }
        }

        // The system trust store contains every public CA, so only a check of the host name
        // makes it meaningful (libpq's rule since PostgreSQL 16).
        if self.ssl_root_cert_is_system()
            && let Some(ssl_mode) = self.ssl_mode
            && ssl_mode != SslMode::VerifyFull
        {
            return Err(format!(
                "weak sslmode \"{}\" may not be used with sslrootcert=system \
                         (use \"verify-full\")",
                ssl_mode.as_str()
            ));
        }

        if let (Some(min), Some(max)) = (
            self.ssl_min_protocol_version
                .as_deref()
                .and_then(tls_version_rank),
            self.ssl_max_protocol_version
                .as_deref()
                .and_then(tls_version_rank),
        ) && min > max
        {
            return Err("invalid SSL protocol version range".to_owned());
        }

        if let (Some(min), Some(max)) = (&self.min_protocol_version, &self.max_protocol_version)
            && protocol_version_rank(min) > protocol_version_rank(max)
        {
            return Err(format!(
                "min_protocol_version \"{min}\" is greater than max_protocol_version \"{max}\""
            ));
        }
        Ok(())
    }

    /// How many servers may be tried: one per `hostaddr` if given, else one per host, else one
    /// (libpq's `nconnhost`).
    fn host_slot_count(&self) -> usize {
        let addrs = self.get_hostaddrs().len();
        let hosts = self.get_hosts().len();
        if addrs > 0 { addrs } else { hosts.max(1) }
    }
}

#[cfg(test)]
mod tests;
