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

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::error::{Error, Result};

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

/// Whether and how strictly to use TLS (`sslmode`, §34.19.1 "Protection Provided in Different
/// Modes").
///
/// ```
/// use pgengine::config::{Config, SslMode};
///
/// assert_eq!(Config::new().get_ssl_mode(), SslMode::Prefer);
/// let config = Config::parse("sslmode=verify-full")?;
/// assert_eq!(config.get_ssl_mode(), SslMode::VerifyFull);
/// # Ok::<(), pgengine::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Never use TLS.
    Disable,
    /// Try without TLS first; use TLS only if the server insists.
    Allow,
    /// Try TLS first; fall back to plain text if the server does not offer it.
    #[default]
    Prefer,
    /// Use TLS, without verifying the server's certificate.
    Require,
    /// Use TLS and verify that the certificate was signed by a trusted authority.
    VerifyCa,
    /// Use TLS, verify the certificate and that it names the host we asked for.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Option<SslMode> {
        Some(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// The mode as libpq spells it (`"verify-full"`).
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// libpq calls every mode that may end up in plain text "weak".
    fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }
}

/// What kind of server a connection must reach before it is accepted
/// (`target_session_attrs`); with several hosts, the others are tried in turn.
///
/// ```
/// use pgengine::config::{Config, TargetSessionAttrs};
///
/// let config = Config::parse("host=a,b target_session_attrs=read-write")?;
/// assert_eq!(config.get_target_session_attrs(), TargetSessionAttrs::ReadWrite);
/// # Ok::<(), pgengine::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetSessionAttrs {
    /// Any server will do.
    #[default]
    Any,
    /// The session must accept writes (`default_transaction_read_only` is off, not a standby).
    ReadWrite,
    /// The session must not accept writes.
    ReadOnly,
    /// The server must not be in hot standby.
    Primary,
    /// The server must be in hot standby.
    Standby,
    /// Try the standbys first; fall back to any server.
    PreferStandby,
}

impl TargetSessionAttrs {
    fn parse(value: &str) -> Option<TargetSessionAttrs> {
        Some(match value {
            "any" => TargetSessionAttrs::Any,
            "read-write" => TargetSessionAttrs::ReadWrite,
            "read-only" => TargetSessionAttrs::ReadOnly,
            "primary" => TargetSessionAttrs::Primary,
            "standby" => TargetSessionAttrs::Standby,
            "prefer-standby" => TargetSessionAttrs::PreferStandby,
            _ => return None,
        })
    }
}

/// Whether SCRAM must bind the authentication to the TLS channel (`channel_binding`).
///
/// ```
/// use pgengine::config::{ChannelBinding, Config};
///
/// assert_eq!(Config::new().get_channel_binding(), ChannelBinding::Prefer);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChannelBinding {
    /// Never use channel binding.
    Disable,
    /// Use it when both TLS and the server support it.
    #[default]
    Prefer,
    /// Fail unless the server authenticates with channel binding.
    Require,
}

impl ChannelBinding {
    fn parse(value: &str) -> Option<ChannelBinding> {
        Some(match value {
            "disable" => ChannelBinding::Disable,
            "prefer" => ChannelBinding::Prefer,
            "require" => ChannelBinding::Require,
            _ => return None,
        })
    }
}

/// The order in which several hosts are tried (`load_balance_hosts`).
///
/// ```
/// use pgengine::config::{Config, LoadBalanceHosts};
///
/// let config = Config::parse("host=a,b,c load_balance_hosts=random")?;
/// assert_eq!(config.get_load_balance_hosts(), LoadBalanceHosts::Random);
/// # Ok::<(), pgengine::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadBalanceHosts {
    /// In the order given.
    #[default]
    Disable,
    /// In a random order, chosen afresh for every connection. The connection layer shuffles;
    /// this setting only records the wish.
    Random,
}

impl LoadBalanceHosts {
    fn parse(value: &str) -> Option<LoadBalanceHosts> {
        Some(match value {
            "disable" => LoadBalanceHosts::Disable,
            "random" => LoadBalanceHosts::Random,
            _ => return None,
        })
    }
}

/// How TLS is started (`sslnegotiation`, PostgreSQL 17+).
///
/// ```
/// use pgengine::config::{Config, SslNegotiation};
///
/// let config = Config::parse("sslmode=require sslnegotiation=direct")?;
/// assert_eq!(config.get_ssl_negotiation(), SslNegotiation::Direct);
/// # Ok::<(), pgengine::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslNegotiation {
    /// Send an `SSLRequest` first and start TLS only if the server answers `S`.
    #[default]
    Postgres,
    /// Start the TLS handshake at once (ALPN `postgresql`); needs `sslmode=require` or stricter.
    Direct,
}

impl SslNegotiation {
    fn parse(value: &str) -> Option<SslNegotiation> {
        Some(match value {
            "postgres" => SslNegotiation::Postgres,
            "direct" => SslNegotiation::Direct,
            _ => return None,
        })
    }
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

impl FromStr for Config {
    type Err = Error;

    /// The same as [`Config::parse`].
    fn from_str(s: &str) -> Result<Config> {
        Config::parse(s)
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

/// Why a single `key=value` could not be applied.
enum OptionError {
    /// libpq does not know the key.
    Unknown,
    /// The key is known but the value is not acceptable; the message is ready for the user.
    Invalid(String),
}

type OptionResult = std::result::Result<(), OptionError>;

impl From<String> for OptionError {
    fn from(message: String) -> OptionError {
        OptionError::Invalid(message)
    }
}

// ----------------------------------------------------------------------------------------------
// Construction: connection strings and the environment.
// ----------------------------------------------------------------------------------------------

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

    /// Reads the `PG*` environment variables of this process (§34.15) and nothing else.
    /// A malformed value is an error naming the variable.
    ///
    /// ```no_run
    /// use pgengine::Config;
    ///
    /// // With PGHOST=db and PGUSER=app in the environment:
    /// let config = Config::from_env()?;
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn from_env() -> Result<Config> {
        Config::from_env_vars(pg_environment()?)
    }

    /// Reads settings from `(name, value)` pairs as if they were the environment: the testable
    /// core of [`Config::from_env`]. Names that are not libpq variables are ignored, and so is
    /// `PGSERVICE` (service files are not supported).
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// let vars = [("PGHOST", "db"), ("PGPORT", "6432"), ("HOME", "/root")];
    /// let config = Config::from_env_vars(vars.map(|(k, v)| (k.to_owned(), v.to_owned())))?;
    /// assert_eq!(config.get_ports(), &[6432]);
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn from_env_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Config> {
        let mut config = Config::new();
        let mut require_ssl = false;
        for (name, value) in vars {
            if name == "PGREQUIRESSL" {
                // Deprecated, but libpq still honours it: a value starting with "1" means
                // sslmode=require unless PGSSLMODE says otherwise.
                require_ssl = value.starts_with('1');
                continue;
            }
            let Some(&(_, key)) = ENV_VARS.iter().find(|(var, _)| *var == name) else {
                continue;
            };
            config
                .set_option(key, &value)
                .map_err(|e| env_error(&name, e))?;
        }
        if require_ssl && config.ssl_mode.is_none() {
            config.ssl_mode = Some(SslMode::Require);
        }
        config.check(Check::AsGiven).map_err(Error::config)?;
        Ok(config)
    }

    /// Fills every setting that is not set yet from the `PG*` environment variables, giving
    /// libpq's precedence: connection string (or setter) first, then environment, then default.
    ///
    /// ```no_run
    /// use pgengine::Config;
    ///
    /// let config = Config::parse("dbname=app")?.with_env_defaults()?;
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn with_env_defaults(self) -> Result<Config> {
        self.with_env_var_defaults(pg_environment()?)
    }

    /// [`Config::with_env_defaults`] with the variables given as `(name, value)` pairs.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// let vars = [("PGDATABASE", "fromenv"), ("PGUSER", "envuser")];
    /// let config = Config::parse("dbname=fromstring")?
    ///     .with_env_var_defaults(vars.map(|(k, v)| (k.to_owned(), v.to_owned())))?;
    /// assert_eq!(config.get_dbname(), Some("fromstring"));
    /// assert_eq!(config.get_user(), Some("envuser"));
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn with_env_var_defaults(
        mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config> {
        let mut env = Config::from_env_vars(vars)?;
        macro_rules! fill {
            ($($field:ident),*) => {$(
                if self.$field.is_none() {
                    self.$field = env.$field.take();
                }
            )*};
        }
        for_each_setting!(fill);
        self.check(Check::AsGiven).map_err(Error::config)?;
        Ok(self)
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
        if let (Some(h), Some(a)) = (hosts, addrs) {
            if h > 0 && a > 0 && h != a {
                return Err(format!(
                    "could not match {h} host names to {a} hostaddr values"
                ));
            }
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
            if let Some(ssl_mode) = mode_in_force {
                if !ssl_mode.requires_tls() {
                    return Err(format!(
                        "weak sslmode \"{}\" may not be used with sslnegotiation=direct \
                         (use \"require\", \"verify-ca\", or \"verify-full\")",
                        ssl_mode.as_str()
                    ));
                }
            }
        }

        // The system trust store contains every public CA, so only a check of the host name
        // makes it meaningful (libpq's rule since PostgreSQL 16).
        if self.ssl_root_cert_is_system() {
            if let Some(ssl_mode) = self.ssl_mode {
                if ssl_mode != SslMode::VerifyFull {
                    return Err(format!(
                        "weak sslmode \"{}\" may not be used with sslrootcert=system \
                         (use \"verify-full\")",
                        ssl_mode.as_str()
                    ));
                }
            }
        }

        if let (Some(min), Some(max)) = (
            self.ssl_min_protocol_version
                .as_deref()
                .and_then(tls_version_rank),
            self.ssl_max_protocol_version
                .as_deref()
                .and_then(tls_version_rank),
        ) {
            if min > max {
                return Err("invalid SSL protocol version range".to_owned());
            }
        }

        if let (Some(min), Some(max)) = (&self.min_protocol_version, &self.max_protocol_version) {
            if protocol_version_rank(min) > protocol_version_rank(max) {
                return Err(format!(
                    "min_protocol_version \"{min}\" is greater than max_protocol_version \"{max}\""
                ));
            }
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

    /// Applies one `key=value`, with libpq's keywords (§34.1.2 "Parameter Key Words").
    fn set_option(&mut self, key: &str, value: &str) -> OptionResult {
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
                parse_enum(key, value, |v| {
                    matches!(v, "disable" | "allow" | "require").then_some(())
                })?;
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

/// The environment variables of §34.15 and the keyword each one stands for.
const ENV_VARS: &[(&str, &str)] = &[
    ("PGHOST", "host"),
    ("PGHOSTADDR", "hostaddr"),
    ("PGPORT", "port"),
    ("PGDATABASE", "dbname"),
    ("PGUSER", "user"),
    ("PGPASSWORD", "password"),
    ("PGPASSFILE", "passfile"),
    ("PGCHANNELBINDING", "channel_binding"),
    ("PGOPTIONS", "options"),
    ("PGAPPNAME", "application_name"),
    ("PGSSLMODE", "sslmode"),
    ("PGSSLNEGOTIATION", "sslnegotiation"),
    ("PGSSLCOMPRESSION", "sslcompression"),
    ("PGSSLCERT", "sslcert"),
    ("PGSSLKEY", "sslkey"),
    ("PGSSLCERTMODE", "sslcertmode"),
    ("PGSSLROOTCERT", "sslrootcert"),
    ("PGSSLCRL", "sslcrl"),
    ("PGSSLCRLDIR", "sslcrldir"),
    ("PGSSLSNI", "sslsni"),
    ("PGREQUIREPEER", "requirepeer"),
    ("PGREQUIREAUTH", "require_auth"),
    ("PGSSLMINPROTOCOLVERSION", "ssl_min_protocol_version"),
    ("PGSSLMAXPROTOCOLVERSION", "ssl_max_protocol_version"),
    ("PGGSSENCMODE", "gssencmode"),
    ("PGKRBSRVNAME", "krbsrvname"),
    ("PGGSSLIB", "gsslib"),
    ("PGGSSDELEGATION", "gssdelegation"),
    ("PGCONNECT_TIMEOUT", "connect_timeout"),
    ("PGCLIENTENCODING", "client_encoding"),
    ("PGTARGETSESSIONATTRS", "target_session_attrs"),
    ("PGLOADBALANCEHOSTS", "load_balance_hosts"),
    ("PGMAXPROTOCOLVERSION", "max_protocol_version"),
    ("PGMINPROTOCOLVERSION", "min_protocol_version"),
];

/// The process's `PG*` variables. `std::env::vars` would panic on a name or value that is not
/// UTF-8; we skip foreign names and report a libpq variable whose value is not text.
fn pg_environment() -> Result<Vec<(String, String)>> {
    let mut vars = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Some(name) = name.to_str().filter(|n| n.starts_with("PG")) else {
            continue;
        };
        let known = name == "PGREQUIRESSL" || ENV_VARS.iter().any(|(var, _)| *var == name);
        if !known {
            continue;
        }
        let value = value.into_string().map_err(|_| {
            Error::config(format!(
                "environment variable {name} is not valid UTF-8; pgengine needs text"
            ))
        })?;
        vars.push((name.to_owned(), value));
    }
    Ok(vars)
}

fn env_error(var: &str, error: OptionError) -> Error {
    match error {
        // The value of PGPASSWORD is a secret: name the variable only.
        _ if var == "PGPASSWORD" => {
            Error::config("invalid value in environment variable PGPASSWORD")
        }
        OptionError::Invalid(message) => {
            Error::config(format!("{message} (from environment variable {var})"))
        }
        OptionError::Unknown => Error::config(format!("unsupported environment variable {var}")),
    }
}

// ----------------------------------------------------------------------------------------------
// The key=value syntax (§34.1.1.1).
// ----------------------------------------------------------------------------------------------

/// C's `isspace` in the "C" locale, which is what libpq's parser uses.
fn is_c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

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
            if let Some(c) = rest[p..].chars().next() {
                if !matches!(c, ':' | '/' | '?' | ',') {
                    return Err(format!(
                        "unexpected character \"{c}\" at position {} in URI (expected \":\" or \"/\")",
                        prefix_len + rest_offset + p + 1
                    ));
                }
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

// ----------------------------------------------------------------------------------------------
// Values.
// ----------------------------------------------------------------------------------------------

/// The elements of a comma-separated list; an empty string is an empty list (the setting is
/// "given but empty", which means "default"), and empty elements are kept.
fn split_list(value: &str) -> impl Iterator<Item = &str> {
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

fn tls_version_rank(value: &str) -> Option<u8> {
    ["tlsv1", "tlsv1.1", "tlsv1.2", "tlsv1.3"]
        .iter()
        .position(|v| v.eq_ignore_ascii_case(value))
        .and_then(|i| u8::try_from(i).ok())
}

fn parse_protocol_version(key: &str, value: &str) -> std::result::Result<String, String> {
    match value {
        "3.0" | "3.2" | "latest" => Ok(value.to_owned()),
        _ => Err(format!("invalid {key} value: \"{value}\"")),
    }
}

/// Orders protocol versions; `latest` is the newest this driver knows, 3.2.
fn protocol_version_rank(value: &str) -> u8 {
    match value {
        "3.0" => 0,
        _ => 1,
    }
}

/// The methods `require_auth` may name (libpq 16).
const AUTH_METHODS: &[&str] = &["password", "md5", "gss", "sspi", "scram-sha-256", "none"];

/// Validates a `require_auth` list the way libpq 16 does: known methods only, each at most once,
/// and either all negated (`!md5,!password`: "anything but these") or none ("one of these").
fn check_require_auth(value: &str) -> std::result::Result<(), String> {
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

// ----------------------------------------------------------------------------------------------
// Setters: the builder, in the style of tokio-postgres.
// ----------------------------------------------------------------------------------------------

impl Config {
    /// Adds a host to try. A value starting with `/` or `@` is a Unix-socket directory, anything
    /// else a host name or IP address. Call it once per host for several.
    ///
    /// ```
    /// use pgengine::config::{Config, Host};
    ///
    /// let mut config = Config::new();
    /// config.host("/var/run/postgresql").host("replica");
    /// assert_eq!(config.get_hosts()[0], Host::Unix("/var/run/postgresql".into()));
    /// ```
    pub fn host(&mut self, host: &str) -> &mut Config {
        self.hosts
            .get_or_insert_with(Vec::new)
            .push(Host::from_value(host));
        self
    }

    /// Adds a Unix-socket directory to try, whatever its first character.
    ///
    /// ```
    /// use pgengine::config::{Config, Host};
    ///
    /// let mut config = Config::new();
    /// config.host_path("/tmp");
    /// assert_eq!(config.get_hosts(), &[Host::Unix("/tmp".into())]);
    /// ```
    pub fn host_path(&mut self, path: impl AsRef<Path>) -> &mut Config {
        self.hosts
            .get_or_insert_with(Vec::new)
            .push(Host::Unix(path.as_ref().to_path_buf()));
        self
    }

    /// Adds a numeric address for the host at the same position (`hostaddr`): the connection
    /// goes there without a DNS lookup, while the host name is still used for TLS and
    /// `.pgpass`. Without host names, the addresses alone are the hosts.
    ///
    /// ```
    /// use std::net::{IpAddr, Ipv4Addr};
    /// use pgengine::Config;
    ///
    /// let mut config = Config::new();
    /// config.host("db.internal").hostaddr(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)));
    /// assert_eq!(config.get_hostaddrs().len(), 1);
    /// ```
    pub fn hostaddr(&mut self, addr: IpAddr) -> &mut Config {
        self.hostaddrs
            .get_or_insert_with(Vec::new)
            .push(Some(addr.into()));
        self
    }

    /// Adds a port. One port applies to every host; otherwise give one per host, in order.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// let mut config = Config::new();
    /// config.host("a").host("b").port(6432);
    /// assert_eq!(config.effective_hosts().iter().map(|h| h.1).collect::<Vec<_>>(), [6432, 6432]);
    /// ```
    pub fn port(&mut self, port: u16) -> &mut Config {
        self.ports.get_or_insert_with(Vec::new).push(port);
        self
    }

    /// Sets the role to log in as (default: the OS user name).
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// assert_eq!(Config::new().user("app").get_user(), Some("app"));
    /// ```
    pub fn user(&mut self, user: &str) -> &mut Config {
        self.user = Some(user.to_owned());
        self
    }

    /// Sets the password. It is never logged, printed or put in an error message.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// let mut config = Config::new();
    /// config.password("hunter2");
    /// assert_eq!(config.get_password(), Some(&b"hunter2"[..]));
    /// ```
    pub fn password(&mut self, password: impl AsRef<[u8]>) -> &mut Config {
        self.password = Some(Secret(password.as_ref().to_vec()));
        self
    }

    /// Sets the database to connect to (default: the user name).
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// assert_eq!(Config::new().dbname("shop").get_dbname(), Some("shop"));
    /// ```
    pub fn dbname(&mut self, dbname: &str) -> &mut Config {
        self.dbname = Some(dbname.to_owned());
        self
    }

    /// Sets `application_name`, shown in `pg_stat_activity` and the server log.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// assert_eq!(Config::new().application_name("worker").get_application_name(), Some("worker"));
    /// ```
    pub fn application_name(&mut self, name: &str) -> &mut Config {
        self.application_name = Some(name.to_owned());
        self
    }

    /// Sets the application name used when `application_name` is not set anywhere (libpq's
    /// `fallback_application_name`, meant for libraries and tools).
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// let mut config = Config::new();
    /// config.fallback_application_name("pgengine");
    /// assert_eq!(config.effective_application_name(), Some("pgengine"));
    /// ```
    pub fn fallback_application_name(&mut self, name: &str) -> &mut Config {
        self.fallback_application_name = Some(name.to_owned());
        self
    }

    /// Sets command-line options for the server process, e.g. `-c search_path=app`.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// let mut config = Config::new();
    /// config.options("-c statement_timeout=5s");
    /// assert_eq!(config.get_options(), Some("-c statement_timeout=5s"));
    /// ```
    pub fn options(&mut self, options: &str) -> &mut Config {
        self.options = Some(options.to_owned());
        self
    }

    /// Sets how long to wait for each connection attempt; zero means forever.
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgengine::Config;
    ///
    /// let mut config = Config::new();
    /// config.connect_timeout(Duration::from_secs(3));
    /// assert_eq!(config.get_connect_timeout(), Some(Duration::from_secs(3)));
    /// ```
    pub fn connect_timeout(&mut self, timeout: Duration) -> &mut Config {
        self.connect_timeout = Some(timeout);
        self
    }

    /// Turns TCP keepalives on or off (default on).
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// assert!(!Config::new().keepalives(false).get_keepalives());
    /// ```
    pub fn keepalives(&mut self, on: bool) -> &mut Config {
        self.keepalives = Some(on);
        self
    }

    /// Sets the idle time before the first TCP keepalive probe.
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgengine::Config;
    ///
    /// let mut config = Config::new();
    /// config.keepalives_idle(Duration::from_secs(60));
    /// assert_eq!(config.get_keepalives_idle(), Some(Duration::from_secs(60)));
    /// ```
    pub fn keepalives_idle(&mut self, idle: Duration) -> &mut Config {
        self.keepalives_idle = Some(idle);
        self
    }

    /// Sets the time between unanswered TCP keepalive probes.
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgengine::Config;
    ///
    /// let mut config = Config::new();
    /// config.keepalives_interval(Duration::from_secs(10));
    /// assert_eq!(config.get_keepalives_interval(), Some(Duration::from_secs(10)));
    /// ```
    pub fn keepalives_interval(&mut self, interval: Duration) -> &mut Config {
        self.keepalives_interval = Some(interval);
        self
    }

    /// Sets how many unanswered keepalive probes mean the connection is dead.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// assert_eq!(Config::new().keepalives_count(3).get_keepalives_count(), Some(3));
    /// ```
    pub fn keepalives_count(&mut self, count: u32) -> &mut Config {
        self.keepalives_count = Some(count);
        self
    }

    /// Sets `TCP_USER_TIMEOUT`: how long sent data may stay unacknowledged.
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgengine::Config;
    ///
    /// let mut config = Config::new();
    /// config.tcp_user_timeout(Duration::from_millis(9000));
    /// assert_eq!(config.get_tcp_user_timeout(), Some(Duration::from_millis(9000)));
    /// ```
    pub fn tcp_user_timeout(&mut self, timeout: Duration) -> &mut Config {
        self.tcp_user_timeout = Some(timeout);
        self
    }

    /// Sets whether and how strictly to use TLS.
    ///
    /// ```
    /// use pgengine::config::{Config, SslMode};
    ///
    /// assert_eq!(Config::new().ssl_mode(SslMode::Disable).get_ssl_mode(), SslMode::Disable);
    /// ```
    pub fn ssl_mode(&mut self, mode: SslMode) -> &mut Config {
        self.ssl_mode = Some(mode);
        self
    }

    /// Sets how TLS is started.
    ///
    /// ```
    /// use pgengine::config::{Config, SslNegotiation};
    ///
    /// let mut config = Config::new();
    /// config.ssl_negotiation(SslNegotiation::Direct);
    /// assert_eq!(config.get_ssl_negotiation(), SslNegotiation::Direct);
    /// ```
    pub fn ssl_negotiation(&mut self, negotiation: SslNegotiation) -> &mut Config {
        self.ssl_negotiation = Some(negotiation);
        self
    }

    /// Sets the file with the trusted certificate authorities; the special value `system`
    /// means the system's trust store and makes `verify-full` the default mode.
    ///
    /// ```
    /// use pgengine::config::{Config, SslMode};
    ///
    /// let mut config = Config::new();
    /// config.ssl_root_cert("system");
    /// assert_eq!(config.get_ssl_mode(), SslMode::VerifyFull);
    /// ```
    pub fn ssl_root_cert(&mut self, path: impl AsRef<Path>) -> &mut Config {
        self.ssl_root_cert = Some(path.as_ref().to_path_buf());
        self
    }

    /// Sets the client certificate file.
    ///
    /// ```
    /// use std::path::Path;
    /// use pgengine::Config;
    ///
    /// let mut config = Config::new();
    /// config.ssl_cert("/etc/app/client.crt");
    /// assert_eq!(config.get_ssl_cert(), Some(Path::new("/etc/app/client.crt")));
    /// ```
    pub fn ssl_cert(&mut self, path: impl AsRef<Path>) -> &mut Config {
        self.ssl_cert = Some(path.as_ref().to_path_buf());
        self
    }

    /// Sets the client private-key file.
    ///
    /// ```
    /// use std::path::Path;
    /// use pgengine::Config;
    ///
    /// let mut config = Config::new();
    /// config.ssl_key("/etc/app/client.key");
    /// assert_eq!(config.get_ssl_key(), Some(Path::new("/etc/app/client.key")));
    /// ```
    pub fn ssl_key(&mut self, path: impl AsRef<Path>) -> &mut Config {
        self.ssl_key = Some(path.as_ref().to_path_buf());
        self
    }

    /// Sets whether SCRAM must use channel binding.
    ///
    /// ```
    /// use pgengine::config::{ChannelBinding, Config};
    ///
    /// let mut config = Config::new();
    /// config.channel_binding(ChannelBinding::Require);
    /// assert_eq!(config.get_channel_binding(), ChannelBinding::Require);
    /// ```
    pub fn channel_binding(&mut self, binding: ChannelBinding) -> &mut Config {
        self.channel_binding = Some(binding);
        self
    }

    /// Restricts the authentication methods the server may ask for: a comma-separated list of
    /// `password`, `md5`, `gss`, `sspi`, `scram-sha-256` and `none`, either all plain ("one of
    /// these") or all prefixed with `!` ("anything but these"). Fails, leaving the setting
    /// unchanged, on an unknown or repeated method or a mixed list.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// let mut config = Config::new();
    /// config.require_auth("scram-sha-256")?;
    /// assert!(config.require_auth_allows("scram-sha-256"));
    /// assert!(!config.require_auth_allows("md5"));
    /// assert!(config.require_auth("md5,!password").is_err());
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn require_auth(&mut self, methods: &str) -> Result<&mut Config> {
        check_require_auth(methods).map_err(Error::config)?;
        self.require_auth = Some(methods.to_owned());
        Ok(self)
    }

    /// Sets which server to accept when several hosts are given.
    ///
    /// ```
    /// use pgengine::config::{Config, TargetSessionAttrs};
    ///
    /// let mut config = Config::new();
    /// config.target_session_attrs(TargetSessionAttrs::Primary);
    /// assert_eq!(config.get_target_session_attrs(), TargetSessionAttrs::Primary);
    /// ```
    pub fn target_session_attrs(&mut self, attrs: TargetSessionAttrs) -> &mut Config {
        self.target_session_attrs = Some(attrs);
        self
    }

    /// Sets the order in which hosts are tried.
    ///
    /// ```
    /// use pgengine::config::{Config, LoadBalanceHosts};
    ///
    /// let mut config = Config::new();
    /// config.load_balance_hosts(LoadBalanceHosts::Random);
    /// assert_eq!(config.get_load_balance_hosts(), LoadBalanceHosts::Random);
    /// ```
    pub fn load_balance_hosts(&mut self, order: LoadBalanceHosts) -> &mut Config {
        self.load_balance_hosts = Some(order);
        self
    }

    /// Sets the newest protocol version to ask for: `"3.0"`, `"3.2"` or `"latest"`.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// let mut config = Config::new();
    /// config.max_protocol_version("3.0")?;
    /// assert_eq!(config.get_max_protocol_version(), Some("3.0"));
    /// assert!(config.max_protocol_version("4.0").is_err());
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn max_protocol_version(&mut self, version: &str) -> Result<&mut Config> {
        let version =
            parse_protocol_version("max_protocol_version", version).map_err(Error::config)?;
        self.max_protocol_version = Some(version);
        Ok(self)
    }

    /// Sets the oldest protocol version to accept: `"3.0"`, `"3.2"` or `"latest"`.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// let mut config = Config::new();
    /// config.min_protocol_version("3.2")?;
    /// assert_eq!(config.get_min_protocol_version(), Some("3.2"));
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn min_protocol_version(&mut self, version: &str) -> Result<&mut Config> {
        let version =
            parse_protocol_version("min_protocol_version", version).map_err(Error::config)?;
        self.min_protocol_version = Some(version);
        Ok(self)
    }

    /// Sets the password file to use instead of `~/.pgpass`.
    ///
    /// ```
    /// use std::path::Path;
    /// use pgengine::Config;
    ///
    /// let mut config = Config::new();
    /// config.passfile("/run/secrets/pgpass");
    /// assert_eq!(config.get_passfile(), Some(Path::new("/run/secrets/pgpass")));
    /// ```
    pub fn passfile(&mut self, path: impl AsRef<Path>) -> &mut Config {
        self.passfile = Some(path.as_ref().to_path_buf());
        self
    }
}

// ----------------------------------------------------------------------------------------------
// Getters. Settings with a built-in default return it when unset.
// ----------------------------------------------------------------------------------------------

impl Config {
    /// The hosts as given, in order; empty when none was given (see [`Config::effective_hosts`]).
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// assert_eq!(Config::parse("host=a,b")?.get_hosts().len(), 2);
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_hosts(&self) -> &[Host] {
        self.hosts.as_deref().unwrap_or(&[])
    }

    /// The `hostaddr` values as given; entry `i` belongs to host `i`.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// let config = Config::parse("host=db hostaddr=192.0.2.7")?;
    /// assert_eq!(config.get_hostaddrs()[0].as_ref().unwrap().to_string(), "192.0.2.7");
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_hostaddrs(&self) -> &[Option<HostAddr>] {
        self.hostaddrs.as_deref().unwrap_or(&[])
    }

    /// The ports as given (an empty entry in a list already reads as 5432).
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// assert_eq!(Config::parse("host=a,b port=6000,")?.get_ports(), &[6000, 5432]);
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_ports(&self) -> &[u16] {
        self.ports.as_deref().unwrap_or(&[])
    }

    /// The user name, if set (see [`Config::effective_user`]).
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// assert_eq!(Config::parse("user=ann")?.get_user(), Some("ann"));
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The password, if one was given explicitly (see [`Config::password_for`] for `.pgpass`).
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// assert_eq!(Config::parse("password=x")?.get_password(), Some(&b"x"[..]));
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_password(&self) -> Option<&[u8]> {
        self.password.as_ref().map(|s| s.0.as_slice())
    }

    /// The database name, if set (see [`Config::effective_dbname`]).
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// assert_eq!(Config::parse("postgresql:///shop")?.get_dbname(), Some("shop"));
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_dbname(&self) -> Option<&str> {
        self.dbname.as_deref()
    }

    /// The server command-line options, if set.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// let config = Config::parse("options='-c geqo=off'")?;
    /// assert_eq!(config.get_options(), Some("-c geqo=off"));
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_options(&self) -> Option<&str> {
        self.options.as_deref()
    }

    /// `application_name`, if set.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// assert_eq!(Config::parse("application_name=etl")?.get_application_name(), Some("etl"));
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_application_name(&self) -> Option<&str> {
        self.application_name.as_deref()
    }

    /// `fallback_application_name`, if set.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// let config = Config::parse("fallback_application_name=tool")?;
    /// assert_eq!(config.get_fallback_application_name(), Some("tool"));
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_fallback_application_name(&self) -> Option<&str> {
        self.fallback_application_name.as_deref()
    }

    /// The application name to send at startup: `application_name`, else
    /// `fallback_application_name`.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// let config = Config::parse("application_name=a fallback_application_name=b")?;
    /// assert_eq!(config.effective_application_name(), Some("a"));
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn effective_application_name(&self) -> Option<&str> {
        self.application_name
            .as_deref()
            .or(self.fallback_application_name.as_deref())
    }

    /// How long each connection attempt may take; `None` means no limit (unset, or zero).
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgengine::Config;
    ///
    /// let short = Config::parse("connect_timeout=1")?;
    /// assert_eq!(short.get_connect_timeout(), Some(Duration::from_secs(2)));
    /// assert_eq!(Config::parse("connect_timeout=0")?.get_connect_timeout(), None);
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_connect_timeout(&self) -> Option<Duration> {
        self.connect_timeout.filter(|t| !t.is_zero())
    }

    /// Whether TCP keepalives are on (default: on).
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// assert!(Config::new().get_keepalives());
    /// assert!(!Config::parse("keepalives=0")?.get_keepalives());
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_keepalives(&self) -> bool {
        self.keepalives.unwrap_or(true)
    }

    /// Idle time before the first keepalive probe; `None` leaves the OS default.
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgengine::Config;
    ///
    /// let config = Config::parse("keepalives_idle=30")?;
    /// assert_eq!(config.get_keepalives_idle(), Some(Duration::from_secs(30)));
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_keepalives_idle(&self) -> Option<Duration> {
        self.keepalives_idle
    }

    /// Time between keepalive probes; `None` leaves the OS default.
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgengine::Config;
    ///
    /// let config = Config::parse("keepalives_interval=5")?;
    /// assert_eq!(config.get_keepalives_interval(), Some(Duration::from_secs(5)));
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_keepalives_interval(&self) -> Option<Duration> {
        self.keepalives_interval
    }

    /// Unanswered probes before the connection counts as dead; `None` leaves the OS default.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// assert_eq!(Config::parse("keepalives_count=4")?.get_keepalives_count(), Some(4));
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_keepalives_count(&self) -> Option<u32> {
        self.keepalives_count
    }

    /// `TCP_USER_TIMEOUT`; `None` leaves the OS default.
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgengine::Config;
    ///
    /// let config = Config::parse("tcp_user_timeout=1500")?;
    /// assert_eq!(config.get_tcp_user_timeout(), Some(Duration::from_millis(1500)));
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_tcp_user_timeout(&self) -> Option<Duration> {
        self.tcp_user_timeout
    }

    /// The TLS mode: as set, else `verify-full` with `sslrootcert=system`, else `prefer`.
    ///
    /// ```
    /// use pgengine::config::{Config, SslMode};
    ///
    /// assert_eq!(Config::parse("sslmode=disable")?.get_ssl_mode(), SslMode::Disable);
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_ssl_mode(&self) -> SslMode {
        match self.ssl_mode {
            Some(mode) => mode,
            None if self.ssl_root_cert_is_system() => SslMode::VerifyFull,
            None => SslMode::Prefer,
        }
    }

    fn ssl_root_cert_is_system(&self) -> bool {
        self.ssl_root_cert.as_deref() == Some(Path::new("system"))
    }

    /// How TLS is started (default: `postgres`).
    ///
    /// ```
    /// use pgengine::config::{Config, SslNegotiation};
    ///
    /// assert_eq!(Config::new().get_ssl_negotiation(), SslNegotiation::Postgres);
    /// ```
    pub fn get_ssl_negotiation(&self) -> SslNegotiation {
        self.ssl_negotiation.unwrap_or_default()
    }

    /// The client certificate file, if set.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// assert!(Config::parse("sslcert=/c.pem")?.get_ssl_cert().is_some());
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_ssl_cert(&self) -> Option<&Path> {
        self.ssl_cert.as_deref()
    }

    /// The client key file, if set.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// assert!(Config::parse("sslkey=/k.pem")?.get_ssl_key().is_some());
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_ssl_key(&self) -> Option<&Path> {
        self.ssl_key.as_deref()
    }

    /// The passphrase of the client key (`sslpassword`), if set.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// assert_eq!(Config::parse("sslpassword=pp")?.get_ssl_password(), Some(&b"pp"[..]));
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_ssl_password(&self) -> Option<&[u8]> {
        self.ssl_password.as_ref().map(|s| s.0.as_slice())
    }

    /// The trusted-CA file (or `system`), if set.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// assert!(Config::parse("sslrootcert=/ca.pem")?.get_ssl_root_cert().is_some());
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_ssl_root_cert(&self) -> Option<&Path> {
        self.ssl_root_cert.as_deref()
    }

    /// The certificate revocation list file, if set.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// assert!(Config::parse("sslcrl=/crl.pem")?.get_ssl_crl().is_some());
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_ssl_crl(&self) -> Option<&Path> {
        self.ssl_crl.as_deref()
    }

    /// The certificate revocation list directory, if set.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// assert!(Config::parse("sslcrldir=/crl")?.get_ssl_crl_dir().is_some());
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_ssl_crl_dir(&self) -> Option<&Path> {
        self.ssl_crl_dir.as_deref()
    }

    /// Whether to send the host name in TLS SNI (default: yes).
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// assert!(!Config::parse("sslsni=0")?.get_ssl_sni());
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_ssl_sni(&self) -> bool {
        self.ssl_sni.unwrap_or(true)
    }

    /// The oldest TLS version to accept (`TLSv1` .. `TLSv1.3`), if set and not empty.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// let config = Config::parse("ssl_min_protocol_version=TLSv1.3")?;
    /// assert_eq!(config.get_ssl_min_protocol_version(), Some("TLSv1.3"));
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_ssl_min_protocol_version(&self) -> Option<&str> {
        self.ssl_min_protocol_version
            .as_deref()
            .filter(|v| !v.is_empty())
    }

    /// The newest TLS version to use, if set and not empty.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// let config = Config::parse("ssl_max_protocol_version=TLSv1.2")?;
    /// assert_eq!(config.get_ssl_max_protocol_version(), Some("TLSv1.2"));
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_ssl_max_protocol_version(&self) -> Option<&str> {
        self.ssl_max_protocol_version
            .as_deref()
            .filter(|v| !v.is_empty())
    }

    /// Whether SCRAM must use channel binding (default: `prefer`).
    ///
    /// ```
    /// use pgengine::config::{ChannelBinding, Config};
    ///
    /// let config = Config::parse("channel_binding=disable")?;
    /// assert_eq!(config.get_channel_binding(), ChannelBinding::Disable);
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_channel_binding(&self) -> ChannelBinding {
        self.channel_binding.unwrap_or_default()
    }

    /// The `require_auth` list as given, if set.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// let config = Config::parse("require_auth=!password,!md5")?;
    /// assert_eq!(config.get_require_auth(), Some("!password,!md5"));
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_require_auth(&self) -> Option<&str> {
        self.require_auth.as_deref()
    }

    /// Whether `require_auth` lets the server use `method`, one of `password`, `md5`, `gss`,
    /// `sspi`, `scram-sha-256`, or `none` (the server asks for no authentication at all).
    /// Everything is allowed when `require_auth` is unset or empty.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// let config = Config::parse("require_auth=!password,!md5")?;
    /// assert!(config.require_auth_allows("scram-sha-256"));
    /// assert!(config.require_auth_allows("none"));
    /// assert!(!config.require_auth_allows("password"));
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn require_auth_allows(&self, method: &str) -> bool {
        let Some(list) = self.require_auth.as_deref().filter(|l| !l.is_empty()) else {
            return true;
        };
        // The list was validated when it was set: all entries negated, or none.
        let negated = list.starts_with('!');
        let listed = split_list(list).any(|m| m.trim_start_matches('!') == method);
        listed != negated
    }

    /// The required peer user of a Unix-socket server (`requirepeer`), if set.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// assert_eq!(Config::parse("requirepeer=postgres")?.get_requirepeer(), Some("postgres"));
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_requirepeer(&self) -> Option<&str> {
        self.requirepeer.as_deref()
    }

    /// Which server to accept (default: any).
    ///
    /// ```
    /// use pgengine::config::{Config, TargetSessionAttrs};
    ///
    /// assert_eq!(Config::new().get_target_session_attrs(), TargetSessionAttrs::Any);
    /// ```
    pub fn get_target_session_attrs(&self) -> TargetSessionAttrs {
        self.target_session_attrs.unwrap_or_default()
    }

    /// The order in which hosts are tried (default: as given).
    ///
    /// ```
    /// use pgengine::config::{Config, LoadBalanceHosts};
    ///
    /// assert_eq!(Config::new().get_load_balance_hosts(), LoadBalanceHosts::Disable);
    /// ```
    pub fn get_load_balance_hosts(&self) -> LoadBalanceHosts {
        self.load_balance_hosts.unwrap_or_default()
    }

    /// The newest protocol version to ask for, if set.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// let config = Config::parse("max_protocol_version=latest")?;
    /// assert_eq!(config.get_max_protocol_version(), Some("latest"));
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_max_protocol_version(&self) -> Option<&str> {
        self.max_protocol_version.as_deref()
    }

    /// The oldest protocol version to accept, if set.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// let config = Config::parse("min_protocol_version=3.0")?;
    /// assert_eq!(config.get_min_protocol_version(), Some("3.0"));
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_min_protocol_version(&self) -> Option<&str> {
        self.min_protocol_version.as_deref()
    }

    /// The password file, if set (`passfile` or `PGPASSFILE`).
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// assert!(Config::parse("passfile=/p")?.get_passfile().is_some());
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_passfile(&self) -> Option<&Path> {
        self.passfile.as_deref()
    }
}

// ----------------------------------------------------------------------------------------------
// Resolution at connect time: defaults, the OS user, the password file.
// ----------------------------------------------------------------------------------------------

impl Config {
    /// The servers to try, in order, each with its port, as libpq pairs them: one port applies
    /// to every host, otherwise port `i` goes with host `i` (run [`Config::validate`] first to
    /// reject a mismatch; here extra ports are ignored and missing ones read as 5432). With no
    /// host, the default is the socket directory `/var/run/postgresql` if it exists, else
    /// `localhost` over TCP. With `hostaddr` values, entry `i` should be reached at
    /// `get_hostaddrs()[i]`; a slot without a host name is named by its address.
    ///
    /// ```
    /// use pgengine::config::{Config, Host};
    ///
    /// let config = Config::parse("host=a,/tmp port=1,2")?;
    /// assert_eq!(
    ///     config.effective_hosts(),
    ///     vec![(Host::Tcp("a".into()), 1), (Host::Unix("/tmp".into()), 2)]
    /// );
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn effective_hosts(&self) -> Vec<(Host, u16)> {
        self.effective_targets()
            .into_iter()
            .map(|(host, _, port)| (host, port))
            .collect()
    }

    /// Like [`Config::effective_hosts`], with each slot's numeric `hostaddr` when one was
    /// given: the connection dials that address instead of looking the host name up, and keeps
    /// the name for TLS and `.pgpass`.
    pub fn effective_targets(&self) -> Vec<(Host, Option<HostAddr>, u16)> {
        let hosts = self.get_hosts();
        let addrs = self.get_hostaddrs();
        let ports = self.get_ports();
        (0..self.host_slot_count())
            .map(|i| {
                let addr = addrs.get(i).cloned().flatten();
                let host = match (hosts.get(i), &addr) {
                    (Some(Host::Tcp(name)), Some(addr)) if name.is_empty() => {
                        Host::Tcp(addr.to_string())
                    }
                    (Some(Host::Tcp(name)), None) if name.is_empty() => default_host(),
                    (Some(host), _) => host.clone(),
                    (None, Some(addr)) => Host::Tcp(addr.to_string()),
                    (None, None) => default_host(),
                };
                let port = match ports {
                    [] => DEFAULT_PORT,
                    [only] => *only,
                    many => many.get(i).copied().unwrap_or(DEFAULT_PORT),
                };
                (host, addr, port)
            })
            .collect()
    }

    /// The user to log in as: `user` if set and not empty, else the OS user name (`$USER`,
    /// `$LOGNAME`, or the `/etc/passwd` entry of this process's uid).
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// assert_eq!(Config::parse("user=ann")?.effective_user()?, "ann");
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn effective_user(&self) -> Result<String> {
        if let Some(user) = self.user.as_deref().filter(|u| !u.is_empty()) {
            return Ok(user.to_owned());
        }
        os_user_name().ok_or_else(|| {
            Error::config(
                "no user name given and the OS user name could not be found; \
                 set user= in the connection string or PGUSER",
            )
        })
    }

    /// The database to connect to: `dbname` if set and not empty, else the effective user.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// assert_eq!(Config::parse("user=ann")?.effective_dbname()?, "ann");
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn effective_dbname(&self) -> Result<String> {
        match self.dbname.as_deref().filter(|d| !d.is_empty()) {
            Some(dbname) => Ok(dbname.to_owned()),
            None => self.effective_user(),
        }
    }

    /// The password to offer `host`:`port`: the explicit one if given and not empty, else the
    /// first matching line of the password file (`passfile`, else `~/.pgpass`; §34.16). A
    /// password file that group or others can access is ignored with a warning, as libpq does.
    /// Nothing about the password is ever logged.
    ///
    /// ```
    /// use pgengine::config::{Config, Host};
    ///
    /// let config = Config::parse("password=x passfile=/nonexistent")?;
    /// assert_eq!(config.password_for(&Host::Tcp("db".into()), 5432), Some(b"x".to_vec()));
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn password_for(&self, host: &Host, port: u16) -> Option<Vec<u8>> {
        if let Some(password) = self.password.as_ref().filter(|p| !p.0.is_empty()) {
            return Some(password.0.clone());
        }
        let path = self.pgpass_path()?;
        let contents = read_pgpass_file(&path)?;
        let user = self.effective_user().ok()?;
        let dbname = self.effective_dbname().ok()?;
        pgpass_lookup(&contents, &host.pgpass_key(), port, &dbname, &user).map(String::into_bytes)
    }

    fn pgpass_path(&self) -> Option<PathBuf> {
        match self.passfile.as_deref() {
            Some(path) if !path.as_os_str().is_empty() => Some(path.to_path_buf()),
            _ => std::env::var_os("HOME")
                .filter(|home| !home.is_empty())
                .map(|home| Path::new(&home).join(".pgpass")),
        }
    }
}

fn default_host() -> Host {
    if Path::new(DEFAULT_SOCKET_DIR).is_dir() {
        Host::Unix(PathBuf::from(DEFAULT_SOCKET_DIR))
    } else {
        Host::Tcp(LOCALHOST.to_owned())
    }
}

/// The OS user name without libc: `$USER`, then `$LOGNAME`, then the `/etc/passwd` entry whose
/// uid is this process's effective uid (read from `/proc/self/status`).
fn os_user_name() -> Option<String> {
    let from_env = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
    from_env("USER")
        .or_else(|| from_env("LOGNAME"))
        .or_else(|| {
            let status = std::fs::read_to_string("/proc/self/status").ok()?;
            let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
            user_from_passwd(&status, &passwd)
        })
}

/// Finds the name of the effective uid (second field of `Uid:` in `/proc/self/status`) in
/// `/etc/passwd` (`name:password:uid:...`).
fn user_from_passwd(status: &str, passwd: &str) -> Option<String> {
    let uid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let _password = fields.next()?;
        (fields.next()? == uid && !name.is_empty()).then(|| name.to_owned())
    })
}

/// Reads the password file if libpq would: a missing file is silently skipped; one that is not
/// a plain file, or that group or others may access, is skipped with a warning naming the path
/// (a world-readable file of passwords is a leak the user should hear about).
fn read_pgpass_file(path: &Path) -> Option<String> {
    let mut file = File::open(path).ok()?;
    let metadata = file.metadata().ok()?;
    if !metadata.is_file() {
        tracing::warn!(path = %path.display(), "password file is not a plain file; ignoring it");
        return None;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if metadata.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                "password file has group or world access; permissions should be u=rw (0600) \
                 or less; ignoring it"
            );
            return None;
        }
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// Finds the password for a connection in the contents of a password file (§34.16), as libpq's
/// `passwordFromFile` does. Each line is `hostname:port:database:username:password`; each of
/// the first four fields is `*` (anything) or a literal in which `\` takes the next character
/// literally (so `\:` and `\\`); lines starting with `#` and empty lines are skipped; the first
/// matching line wins, and its password ends at the next unescaped `:`.
///
/// An empty `host` means `localhost`. A socket directory (a host starting with `/` or `@`)
/// matches its own path and also `localhost`, the name the docs give local socket connections.
pub fn pgpass_lookup(
    contents: &str,
    host: &str,
    port: u16,
    dbname: &str,
    user: &str,
) -> Option<String> {
    if dbname.is_empty() || user.is_empty() {
        return None;
    }
    let host = if host.is_empty() { LOCALHOST } else { host };
    let local_socket = is_unix_socket_path(host);
    let port = port.to_string();
    contents.split('\n').find_map(|line| {
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let rest = match_pgpass_field(line, host).or_else(|| {
            local_socket
                .then(|| match_pgpass_field(line, LOCALHOST))
                .flatten()
        })?;
        let rest = match_pgpass_field(rest, &port)?;
        let rest = match_pgpass_field(rest, dbname)?;
        let rest = match_pgpass_field(rest, user)?;
        Some(unescape_pgpass_password(rest))
    })
}

/// If the first field of `line` matches `token`, returns what follows its `:`.
fn match_pgpass_field<'a>(line: &'a str, token: &str) -> Option<&'a str> {
    if let Some(rest) = line.strip_prefix("*:") {
        return Some(rest);
    }
    let mut chars = line.char_indices();
    let mut expected = token.chars();
    loop {
        let (i, c) = chars.next()?;
        let (c, escaped) = if c == '\\' {
            (chars.next()?.1, true)
        } else {
            (c, false)
        };
        if c == ':' && !escaped {
            return expected.next().is_none().then(|| &line[i + 1..]);
        }
        if expected.next() != Some(c) {
            return None;
        }
    }
}

fn unescape_pgpass_password(field: &str) -> String {
    let mut password = String::new();
    let mut chars = field.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ':' => break,
            // A backslash at the very end stays, as in libpq.
            '\\' => password.push(chars.next().unwrap_or('\\')),
            c => password.push(c),
        }
    }
    password
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// One setting of a parsed config, rendered as text so that the cases below read as a table.
    fn setting(config: &Config, name: &str) -> String {
        let join = |items: Vec<String>| items.join(",");
        match name {
            "hosts" => join(
                config
                    .get_hosts()
                    .iter()
                    .map(|h| match h {
                        Host::Tcp(name) => format!("tcp:{name}"),
                        Host::Unix(path) => format!("unix:{}", path.display()),
                    })
                    .collect(),
            ),
            "hostaddrs" => join(
                config
                    .get_hostaddrs()
                    .iter()
                    .map(|a| a.as_ref().map(ToString::to_string).unwrap_or_default())
                    .collect(),
            ),
            "ports" => join(config.get_ports().iter().map(|p| p.to_string()).collect()),
            "user" => config.get_user().unwrap_or("-").to_owned(),
            "password" => config
                .get_password()
                .map_or("-".to_owned(), |p| String::from_utf8_lossy(p).into_owned()),
            "dbname" => config.get_dbname().unwrap_or("-").to_owned(),
            "options" => config.get_options().unwrap_or("-").to_owned(),
            "application_name" => config.get_application_name().unwrap_or("-").to_owned(),
            "effective_application_name" => config
                .effective_application_name()
                .unwrap_or("-")
                .to_owned(),
            "connect_timeout" => config
                .get_connect_timeout()
                .map_or("-".to_owned(), |t| t.as_secs().to_string()),
            "sslmode" => config.get_ssl_mode().as_str().to_owned(),
            "sslnegotiation" => format!("{:?}", config.get_ssl_negotiation()),
            "keepalives" => config.get_keepalives().to_string(),
            "keepalives_idle" => format!("{:?}", config.get_keepalives_idle()),
            "keepalives_count" => format!("{:?}", config.get_keepalives_count()),
            "tcp_user_timeout" => format!("{:?}", config.get_tcp_user_timeout()),
            "target_session_attrs" => format!("{:?}", config.get_target_session_attrs()),
            "load_balance_hosts" => format!("{:?}", config.get_load_balance_hosts()),
            "channel_binding" => format!("{:?}", config.get_channel_binding()),
            "require_auth" => config.get_require_auth().unwrap_or("-").to_owned(),
            "passfile" => config
                .get_passfile()
                .map_or("-".to_owned(), |p| p.display().to_string()),
            "max_protocol_version" => config.get_max_protocol_version().unwrap_or("-").to_owned(),
            "ssl_sni" => config.get_ssl_sni().to_string(),
            other => panic!("test asks for unknown setting {other}"),
        }
    }

    type Case = (
        &'static str,
        std::result::Result<&'static [(&'static str, &'static str)], &'static str>,
    );

    /// What libpq accepts, and what it rejects, with the message (or part of it) we expect.
    /// Kept one case per line so that it reads as a table.
    #[rustfmt::skip]
    const CASES: &[Case] = &[
        // --- URLs ---
        ("postgresql://alice:secret@db.example.com:6432/shop?application_name=web&sslmode=require",
            Ok(&[("user", "alice"), ("password", "secret"), ("hosts", "tcp:db.example.com"), ("ports", "6432"),
                 ("dbname", "shop"), ("application_name", "web"), ("sslmode", "require")])),
        ("postgres://h", Ok(&[("hosts", "tcp:h"), ("ports", ""), ("dbname", "-")])),
        ("postgresql://", Ok(&[("hosts", ""), ("user", "-"), ("dbname", "-")])),
        ("postgresql://localhost/", Ok(&[("hosts", "tcp:localhost"), ("dbname", "-")])),
        ("postgresql://u@h", Ok(&[("user", "u"), ("password", "-"), ("hosts", "tcp:h")])),
        ("postgresql://u:@h", Ok(&[("user", "u"), ("password", "-")])),
        ("postgresql://:pw@h", Ok(&[("user", "-"), ("password", "pw")])),
        ("postgresql://u:p:q@h", Ok(&[("user", "u"), ("password", "p:q")])),
        ("postgresql://us%65r:p%40ss%2Fw%3Ard@h/d%62?options=-c%20geqo%3Doff",
            Ok(&[("user", "user"), ("password", "p@ss/w:rd"), ("dbname", "db"), ("options", "-c geqo=off")])),
        ("postgresql://h/caf%C3%A9", Ok(&[("dbname", "café")])),
        ("postgresql://[::1]:5433/db", Ok(&[("hosts", "tcp:::1"), ("ports", "5433")])),
        ("postgresql://[2001:db8::1]/db", Ok(&[("hosts", "tcp:2001:db8::1"), ("ports", "")])),
        ("postgresql://[::1],[fe80::2]:7/db", Ok(&[("hosts", "tcp:::1,tcp:fe80::2"), ("ports", "5432,7")])),
        ("postgresql://%2Fvar%2Frun%2Fpostgresql/db", Ok(&[("hosts", "unix:/var/run/postgresql"), ("dbname", "db")])),
        ("postgresql:///db?host=/tmp", Ok(&[("hosts", "unix:/tmp"), ("dbname", "db")])),
        ("postgresql:///db?host=%2Ftmp&port=5433", Ok(&[("hosts", "unix:/tmp"), ("ports", "5433")])),
        ("postgresql://h1:1,h2:2,h3:3/db", Ok(&[("hosts", "tcp:h1,tcp:h2,tcp:h3"), ("ports", "1,2,3")])),
        ("postgresql://h1,h2:2/db", Ok(&[("hosts", "tcp:h1,tcp:h2"), ("ports", "5432,2")])),
        ("postgresql://h1,h2/db", Ok(&[("hosts", "tcp:h1,tcp:h2"), ("ports", "5432,5432")])),
        ("postgresql://h?ssl=true", Ok(&[("sslmode", "require")])),
        ("postgresql://h?", Ok(&[("hosts", "tcp:h")])),
        ("postgresql://h?sslmode=disable&", Ok(&[("sslmode", "disable")])),
        ("postgresql://h?connect_timeout=10", Ok(&[("connect_timeout", "10")])),
        ("postgresql://h/db?user=other", Ok(&[("user", "other")])),
        ("postgresql://u@h/db?password=%41b", Ok(&[("password", "Ab")])),
        ("postgresql://h?application_name=%20spaced%20", Ok(&[("application_name", " spaced ")])),
        ("postgresql://h?application_name= trimmed ", Ok(&[("application_name", "trimmed")])),
        ("postgresql://h:/db", Ok(&[("hosts", "tcp:h"), ("ports", "")])),
        ("postgresql://h:99999/db", Err("invalid port number: \"99999\"")),
        ("postgresql://h:x1/db", Err("invalid port number: \"x1\"")),
        ("postgresql://h:0/db", Err("invalid port number: \"0\"")),
        ("postgresql://h/%ZZ", Err("invalid percent-encoded token: \"%ZZ\"")),
        ("postgresql://h/db%4", Err("invalid percent-encoded token: \"db%4\"")),
        ("postgresql://h/a%00b", Err("forbidden value %00 in percent-encoded value")),
        ("postgresql://h/%FF", Err("invalid UTF-8")),
        ("postgresql://h/a b", Err("unexpected spaces found in \"a b\"")),
        ("postgresql://[::1/db", Err("looking for matching \"]\"")),
        ("postgresql://[]/db", Err("IPv6 host address may not be empty")),
        ("postgresql://[::1]x/db", Err("unexpected character \"x\" at position 19")),
        ("postgresql://h?foo=1", Err("invalid URI query parameter: \"foo\"")),
        ("postgresql://h?ssl=false", Err("invalid URI query parameter: \"ssl\"")),
        ("postgresql://h?sslmode", Err("missing key/value separator \"=\" in URI query parameter: \"sslmode\"")),
        ("postgresql://h?a=1=2", Err("extra key/value separator \"=\" in URI query parameter: \"a\"")),
        ("postgresql://h?sslmode=maybe", Err("invalid sslmode value: \"maybe\"")),
        ("postgresql://h1,h2:2,h3:3/db?port=1,2", Err("could not match 2 port numbers to 3 hosts")),
        ("postgresql://h?service=x", Err("service files are not supported")),
        // --- key=value ---
        ("host=localhost port=5432 dbname=mydb user=me password=pw connect_timeout=10",
            Ok(&[("hosts", "tcp:localhost"), ("ports", "5432"), ("dbname", "mydb"), ("user", "me"),
                 ("password", "pw"), ("connect_timeout", "10")])),
        ("", Ok(&[("hosts", ""), ("user", "-")])),
        ("   \t\n ", Ok(&[("hosts", "")])),
        ("host = db   user =  me", Ok(&[("hosts", "tcp:db"), ("user", "me")])),
        ("dbname='my db' user='o\\'brien'", Ok(&[("dbname", "my db"), ("user", "o'brien")])),
        ("application_name='back\\\\slash'", Ok(&[("application_name", "back\\slash")])),
        ("application_name=a\\ b\\'c", Ok(&[("application_name", "a b'c")])),
        ("dbname='' user=x", Ok(&[("dbname", ""), ("user", "x")])),
        ("dbname=", Ok(&[("dbname", "")])),
        // libpq: a quoted value ends at its closing quote, and what follows starts a new key.
        ("dbname='a''b'", Err("missing \"=\" after \"'b'\"")),
        // libpq skips blanks after '=', so the next pair becomes the value.
        ("host= port=5432", Ok(&[("hosts", "tcp:port=5432"), ("ports", "")])),
        ("user=a user=b", Ok(&[("user", "b")])),
        ("host=/tmp", Ok(&[("hosts", "unix:/tmp")])),
        ("host=@abstract", Ok(&[("hosts", "unix:@abstract")])),
        ("host=a,b port=5432,5433", Ok(&[("hosts", "tcp:a,tcp:b"), ("ports", "5432,5433")])),
        ("host=a,b,c port=6000", Ok(&[("hosts", "tcp:a,tcp:b,tcp:c"), ("ports", "6000")])),
        ("host=a,,/s", Ok(&[("hosts", "tcp:a,tcp:,unix:/s")])),
        ("host=a,b port=,7", Ok(&[("ports", "5432,7")])),
        ("port=' 42 '", Ok(&[("ports", "42")])),
        ("hostaddr=127.0.0.1,::1 host=a,b", Ok(&[("hostaddrs", "127.0.0.1,::1")])),
        ("connect_timeout=0", Ok(&[("connect_timeout", "-")])),
        ("connect_timeout=-5", Ok(&[("connect_timeout", "-")])),
        ("connect_timeout=1", Ok(&[("connect_timeout", "2")])),
        ("keepalives=0 keepalives_idle=30 keepalives_count=-1",
            Ok(&[("keepalives", "false"), ("keepalives_idle", "Some(30s)"), ("keepalives_count", "Some(0)")])),
        ("keepalives=1", Ok(&[("keepalives", "true")])),
        ("tcp_user_timeout=250", Ok(&[("tcp_user_timeout", "Some(250ms)")])),
        ("sslmode=verify-ca", Ok(&[("sslmode", "verify-ca")])),
        ("requiressl=1", Ok(&[("sslmode", "require")])),
        ("sslrootcert=system", Ok(&[("sslmode", "verify-full")])),
        ("sslmode=require sslnegotiation=direct", Ok(&[("sslnegotiation", "Direct")])),
        ("sslcompression=1 gssencmode=disable krbsrvname=pg sslsni=0", Ok(&[("ssl_sni", "false")])),
        ("client_encoding=UTF8", Ok(&[])),
        ("client_encoding=utf-8", Ok(&[])),
        ("client_encoding=auto", Ok(&[])),
        ("target_session_attrs=prefer-standby", Ok(&[("target_session_attrs", "PreferStandby")])),
        ("load_balance_hosts=random", Ok(&[("load_balance_hosts", "Random")])),
        ("channel_binding=require", Ok(&[("channel_binding", "Require")])),
        ("require_auth=scram-sha-256,none", Ok(&[("require_auth", "scram-sha-256,none")])),
        ("require_auth=!password,!md5", Ok(&[("require_auth", "!password,!md5")])),
        ("max_protocol_version=latest min_protocol_version=3.0", Ok(&[("max_protocol_version", "latest")])),
        ("passfile=/run/pgpass", Ok(&[("passfile", "/run/pgpass")])),
        ("fallback_application_name=tool", Ok(&[("application_name", "-"), ("effective_application_name", "tool")])),
        ("foo=bar", Err("invalid connection option \"foo\"")),
        ("=bar", Err("invalid connection option \"\"")),
        ("port=abc", Err("invalid port number: \"abc\"")),
        ("port=70000", Err("invalid port number: \"70000\"")),
        ("host=a port=5432,x", Err("invalid port number: \"x\"")),
        ("sslmode=bogus", Err("invalid sslmode value: \"bogus\"")),
        ("sslnegotiation=tls", Err("invalid sslnegotiation value: \"tls\"")),
        ("target_session_attrs=master", Err("invalid target_session_attrs value: \"master\"")),
        ("load_balance_hosts=yes", Err("invalid load_balance_hosts value: \"yes\"")),
        ("channel_binding=on", Err("invalid channel_binding value: \"on\"")),
        ("connect_timeout=ten", Err("invalid integer value \"ten\" for connection option \"connect_timeout\"")),
        ("connect_timeout=99999999999", Err("invalid integer value \"99999999999\"")),
        ("keepalives=yes", Err("invalid integer value \"yes\" for connection option \"keepalives\"")),
        ("hostaddr=not-an-ip", Err("could not parse network address \"not-an-ip\"")),
        ("host=a,b hostaddr=127.0.0.1", Err("could not match 2 host names to 1 hostaddr values")),
        ("dbname='unterminated", Err("unterminated quoted string in connection info string")),
        ("dbname='ends in escape\\", Err("unterminated quoted string")),
        ("host", Err("missing \"=\" after \"host\" in connection info string")),
        ("host=a dbname", Err("missing \"=\" after \"dbname\"")),
        ("host x=1", Err("missing \"=\" after \"host\"")),
        ("host=a,b port=1,2,3", Err("could not match 3 port numbers to 2 hosts")),
        ("client_encoding=LATIN1", Err("client_encoding \"LATIN1\" is not supported")),
        ("gssencmode=require", Err("gssencmode value \"require\" invalid when GSSAPI support is not compiled in")),
        ("gssencmode=allow", Err("invalid gssencmode value: \"allow\"")),
        ("service=prod", Err("service files are not supported")),
        ("replication=database", Err("replication connections are not supported")),
        ("require_auth=md5,!password", Err("negative require_auth method \"!password\" cannot be mixed with non-negative methods")),
        ("require_auth=!md5,password", Err("require_auth method \"password\" cannot be mixed with negative methods")),
        ("require_auth=kerberos", Err("invalid require_auth value: \"kerberos\"")),
        ("require_auth=md5,md5", Err("require_auth method \"md5\" is specified more than once")),
        ("require_auth=md5,", Err("invalid require_auth value: \"\"")),
        ("max_protocol_version=3.1", Err("invalid max_protocol_version value: \"3.1\"")),
        ("min_protocol_version=3.2 max_protocol_version=3.0", Err("min_protocol_version \"3.2\" is greater than max_protocol_version \"3.0\"")),
        ("ssl_min_protocol_version=TLSv1.4", Err("invalid \"ssl_min_protocol_version\" value: \"TLSv1.4\"")),
        ("ssl_min_protocol_version=TLSv1.3 ssl_max_protocol_version=TLSv1.2", Err("invalid SSL protocol version range")),
        ("sslmode=prefer sslnegotiation=direct", Err("weak sslmode \"prefer\" may not be used with sslnegotiation=direct")),
        ("sslrootcert=system sslmode=require", Err("weak sslmode \"require\" may not be used with sslrootcert=system")),
        ("user='a\u{0}b'", Err("connection option \"user\" contains a NUL character")),
        ("POSTGRESQL://u:hunter2@h/db", Err("looks like a URL")),
    ];

    #[test]
    fn connection_strings_parse_as_libpq_does() {
        for (input, expected) in CASES {
            match (Config::parse(input), expected) {
                (Ok(config), Ok(settings)) => {
                    for (name, value) in *settings {
                        assert_eq!(setting(&config, name), *value, "{name} of {input:?}");
                    }
                }
                (Err(err), Err(fragment)) => {
                    let message = err.to_string();
                    assert!(
                        message.contains(fragment),
                        "error for {input:?} was {message:?}, expected it to contain {fragment:?}"
                    );
                    assert_eq!(err.kind(), crate::error::ErrorKind::Config);
                }
                (Ok(config), Err(fragment)) => {
                    panic!("{input:?} parsed as {config:?}, expected an error with {fragment:?}")
                }
                (Err(err), Ok(_)) => panic!("{input:?} failed: {err}"),
            }
        }
    }

    #[test]
    fn errors_never_show_a_password() {
        let cases = [
            "postgresql://u:hunter2%ZZ@h/db",
            "postgresql://u:hunter2%00@h/db",
            "postgresql://u:hunter2%FF@h/db", // not UTF-8 is fine for a password: must parse
            "postgresql://u@h/db?password=hunter2%ZZ",
            "postgresql://u@h/db?password=hunter2 x",
            "postgresql://u@h/db?sslpassword=hunter2%G0",
            "postgresql://u:hunter2/x@h/db",
            "postgresql://u:hun/ter2@h:5432/db",
            "POSTGRES://u:hunter2@h/db",
            "password='hunter2",
        ];
        for input in cases {
            if let Err(err) = Config::parse(input) {
                let shown = format!("{err} {err:?}");
                assert!(!shown.contains("hunter2"), "{input:?} leaked: {shown}");
                assert!(!shown.contains("hun"), "{input:?} leaked: {shown}");
            }
        }
        let err = Config::parse("postgresql://u:hunter2%ZZ@h/db").unwrap_err();
        assert!(
            err.to_string()
                .contains("invalid percent-encoding in password")
        );
        let config = Config::parse("postgresql://u:hunter2%FF@h/db").unwrap();
        assert_eq!(config.get_password(), Some(&b"hunter2\xff"[..]));
    }

    #[test]
    fn debug_hides_secrets() {
        let config =
            Config::parse("postgresql://u:topsecret@h/db?sslpassword=keysecret&sslmode=require")
                .unwrap();
        let shown = format!("{config:?} {config:#?}");
        assert!(!shown.contains("topsecret"), "{shown}");
        assert!(!shown.contains("keysecret"), "{shown}");
        assert!(shown.contains("<redacted>"));
        assert!(shown.contains("Require"));
        let mut built = Config::new();
        built.password(b"bytes-secret");
        assert!(!format!("{built:?}").contains("bytes-secret"));
    }

    #[test]
    fn builder_and_from_str_agree_with_parse() {
        let parsed: Config = "host=a,/tmp port=1,2 user=u dbname=d".parse().unwrap();
        let mut built = Config::new();
        built
            .host("a")
            .host_path("/tmp")
            .port(1)
            .port(2)
            .user("u")
            .dbname("d");
        assert_eq!(parsed.effective_hosts(), built.effective_hosts());
        assert_eq!(parsed.get_user(), built.get_user());
        assert_eq!(parsed.get_dbname(), built.get_dbname());
        assert!(built.validate().is_ok());
        assert!(built.require_auth("gss,oops").is_err());
        assert_eq!(
            built.get_require_auth(),
            None,
            "a rejected list must not be stored"
        );
    }

    #[test]
    fn effective_hosts_pairs_ports_like_libpq() {
        let one_port = Config::parse("host=a,b port=7").unwrap();
        assert_eq!(
            one_port.effective_hosts(),
            vec![(Host::Tcp("a".into()), 7), (Host::Tcp("b".into()), 7)]
        );
        let no_port = Config::parse("host=a").unwrap();
        assert_eq!(
            no_port.effective_hosts(),
            vec![(Host::Tcp("a".into()), 5432)]
        );

        // No host at all: exactly one default slot, socket or localhost depending on the box.
        let default = Config::new().effective_hosts();
        assert_eq!(default.len(), 1);
        assert_eq!(default[0].1, 5432);
        assert!(
            matches!(&default[0].0, Host::Tcp(n) if n == "localhost")
                || default[0].0 == Host::Unix(DEFAULT_SOCKET_DIR.into())
        );

        // An empty entry in a list is the default host too.
        let with_gap = Config::parse("host=a,,b").unwrap().effective_hosts();
        assert_eq!(with_gap.len(), 3);
        assert_eq!(with_gap[1].0, default_host());

        // hostaddr alone names the slots; with host names, the names stay.
        let addrs = Config::parse("hostaddr=10.0.0.1,10.0.0.2 port=1,2").unwrap();
        assert_eq!(
            addrs.effective_hosts(),
            vec![
                (Host::Tcp("10.0.0.1".into()), 1),
                (Host::Tcp("10.0.0.2".into()), 2)
            ]
        );
        let named = Config::parse("host=db hostaddr=10.0.0.1").unwrap();
        assert_eq!(
            named.effective_hosts(),
            vec![(Host::Tcp("db".into()), 5432)]
        );
    }

    #[test]
    fn validate_applies_defaults_that_parse_may_not_assume() {
        // Two ports and no host: PGHOST may still supply two hosts, so parse accepts it...
        let config = Config::parse("port=1,2").unwrap();
        // ...but with the default single host, it cannot connect.
        let err = config.validate().unwrap_err();
        assert!(
            err.to_string()
                .contains("could not match 2 port numbers to 1 hosts")
        );

        let direct = Config::parse("sslnegotiation=direct").unwrap();
        assert!(
            direct
                .validate()
                .unwrap_err()
                .to_string()
                .contains("weak sslmode \"prefer\"")
        );
        let fixed = direct
            .with_env_var_defaults(vars(&[("PGSSLMODE", "verify-full")]))
            .unwrap();
        assert!(fixed.validate().is_ok());
    }

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn environment_variables_map_to_settings() {
        let config = Config::from_env_vars(vars(&[
            ("PGHOST", "envhost,/tmp"),
            ("PGPORT", "6000,6001"),
            ("PGUSER", "envuser"),
            ("PGPASSWORD", "envpw"),
            ("PGDATABASE", "envdb"),
            ("PGAPPNAME", "envapp"),
            ("PGCONNECT_TIMEOUT", "7"),
            ("PGPASSFILE", "/env/pgpass"),
            ("PGSSLMODE", "disable"),
            ("PGTARGETSESSIONATTRS", "standby"),
            ("PGREQUIREAUTH", "scram-sha-256"),
            ("PGSERVICE", "ignored"),
            ("PGDATA", "/not/ours"),
            ("PATH", "/bin"),
        ]))
        .unwrap();
        for (name, value) in [
            ("hosts", "tcp:envhost,unix:/tmp"),
            ("ports", "6000,6001"),
            ("user", "envuser"),
            ("password", "envpw"),
            ("dbname", "envdb"),
            ("application_name", "envapp"),
            ("connect_timeout", "7"),
            ("passfile", "/env/pgpass"),
            ("sslmode", "disable"),
            ("target_session_attrs", "Standby"),
            ("require_auth", "scram-sha-256"),
        ] {
            assert_eq!(setting(&config, name), value, "{name}");
        }

        let legacy = Config::from_env_vars(vars(&[("PGREQUIRESSL", "1")])).unwrap();
        assert_eq!(legacy.get_ssl_mode(), SslMode::Require);
        let both =
            Config::from_env_vars(vars(&[("PGREQUIRESSL", "1"), ("PGSSLMODE", "allow")])).unwrap();
        assert_eq!(both.get_ssl_mode(), SslMode::Allow);
    }

    #[test]
    fn malformed_environment_names_the_variable() {
        for (var, value, fragment) in [
            (
                "PGPORT",
                "eighty",
                "invalid port number: \"eighty\" (from environment variable PGPORT)",
            ),
            ("PGSSLMODE", "sure", "(from environment variable PGSSLMODE)"),
            ("PGCONNECT_TIMEOUT", "soon", "PGCONNECT_TIMEOUT"),
            ("PGCLIENTENCODING", "SJIS", "PGCLIENTENCODING"),
            ("PGREQUIREAUTH", "md5,!md5", "PGREQUIREAUTH"),
            (
                "PGPASSWORD",
                "with\0nul-hunter2",
                "invalid value in environment variable PGPASSWORD",
            ),
        ] {
            let err = Config::from_env_vars(vars(&[(var, value)])).unwrap_err();
            let message = err.to_string();
            assert!(message.contains(fragment), "{var}: {message}");
            assert!(!message.contains("hunter2"), "{var}: {message}");
        }
    }

    #[test]
    fn connection_string_wins_over_environment() {
        let env = vars(&[
            ("PGHOST", "envhost"),
            ("PGPORT", "6000"),
            ("PGUSER", "envuser"),
            ("PGPASSWORD", "envpw"),
            ("PGDATABASE", "envdb"),
            ("PGAPPNAME", "envapp"),
            ("PGCONNECT_TIMEOUT", "7"),
            ("PGSSLMODE", "require"),
        ]);
        let config = Config::parse("postgresql://strhost/strdb?connect_timeout=0&sslmode=disable")
            .unwrap()
            .with_env_var_defaults(env.clone())
            .unwrap();
        for (name, value) in [
            ("hosts", "tcp:strhost"),
            ("dbname", "strdb"),
            ("ports", "6000"),
            ("user", "envuser"),
            ("password", "envpw"),
            ("application_name", "envapp"),
            // Explicit zero ("forever") is a setting too: it blocks PGCONNECT_TIMEOUT.
            ("connect_timeout", "-"),
            ("sslmode", "disable"),
        ] {
            assert_eq!(setting(&config, name), value, "{name}");
        }

        // An explicitly empty value also counts as given, as in libpq.
        let empty_host = Config::parse("host=''")
            .unwrap()
            .with_env_var_defaults(env.clone())
            .unwrap();
        assert_eq!(setting(&empty_host, "hosts"), "");

        // Setters count as given too.
        let mut built = Config::new();
        built.user("builder");
        let built = built.with_env_var_defaults(env).unwrap();
        assert_eq!(built.get_user(), Some("builder"));
        assert_eq!(built.get_dbname(), Some("envdb"));
    }

    #[test]
    fn effective_user_and_dbname() {
        let config = Config::parse("user=ann").unwrap();
        assert_eq!(config.effective_user().unwrap(), "ann");
        assert_eq!(config.effective_dbname().unwrap(), "ann");
        let config = Config::parse("user=ann dbname=shop").unwrap();
        assert_eq!(config.effective_dbname().unwrap(), "shop");
        let status = "Name:\tcat\nUid:\t1000\t1001\t1001\t1001\nGid:\t1\n";
        let passwd =
            "root:x:0:0::/root:/bin/sh\nann:x:1000:1000::/h:/bin/sh\nbob:x:1001:1::/h:/bin/sh\n";
        assert_eq!(user_from_passwd(status, passwd).as_deref(), Some("bob"));
        assert_eq!(user_from_passwd("Uid:\t5\t5\t5\t5\n", passwd), None);
        assert_eq!(user_from_passwd("", passwd), None);
    }

    const PGPASS: &str = "\
# hostname:port:database:username:password
db.example.com:5432:shop:alice:first
db.example.com:5432:shop:alice:second-never-used
*:5433:*:alice:any-host-on-5433
localhost:5432:*:bob:local-bob
/tmp:5432:*:carol:socket-carol
we\\:ird\\\\host:5432:*:dave:esc\\:aped\\\\pw:ignored-after-colon
db.example.com:5432:*:*:fallback

   # indented lines are not comments in libpq, but this one matches nothing
trailing:5432:d:u:ends-with-backslash\\
";

    #[test]
    fn pgpass_matching() {
        let lookup = |host, port, db, user| pgpass_lookup(PGPASS, host, port, db, user);
        assert_eq!(
            lookup("db.example.com", 5432, "shop", "alice").as_deref(),
            Some("first")
        );
        assert_eq!(
            lookup("elsewhere", 5433, "x", "alice").as_deref(),
            Some("any-host-on-5433")
        );
        assert_eq!(
            lookup("db.example.com", 5432, "other", "zed").as_deref(),
            Some("fallback")
        );
        assert_eq!(lookup("elsewhere", 5432, "x", "alice"), None);
        assert_eq!(lookup("db.example.com", 5431, "shop", "alice"), None);
        // Escapes: "\:" and "\\" in fields and in the password; the password ends at ':'.
        assert_eq!(
            lookup("we:ird\\host", 5432, "x", "dave").as_deref(),
            Some("esc:aped\\pw")
        );
        assert_eq!(
            lookup("trailing", 5432, "d", "u").as_deref(),
            Some("ends-with-backslash\\")
        );
        // Unix sockets: matched by their path, and also by "localhost".
        assert_eq!(
            lookup("/tmp", 5432, "x", "carol").as_deref(),
            Some("socket-carol")
        );
        assert_eq!(
            lookup("/var/run/postgresql", 5432, "x", "bob").as_deref(),
            Some("local-bob")
        );
        assert_eq!(lookup("", 5432, "x", "bob").as_deref(), Some("local-bob"));
        assert_eq!(
            lookup("localhost", 5432, "x", "bob").as_deref(),
            Some("local-bob")
        );
        assert_eq!(
            lookup("/tmp", 5432, "x", "bob").as_deref(),
            Some("local-bob")
        );
        // Comment lines never match, even ones that look like entries.
        assert_eq!(pgpass_lookup("#h:1:d:u:pw\n", "#h", 1, "d", "u"), None);
        // A line with too few fields never matches; nor do empty user or database names.
        assert_eq!(pgpass_lookup("h:1:d:u\n", "h", 1, "d", "u"), None);
        assert_eq!(pgpass_lookup("*:*:*:*:pw\n", "h", 1, "", "u"), None);
        assert_eq!(
            pgpass_lookup("*:*:*:*:pw\r\n", "h", 1, "d", "u").as_deref(),
            Some("pw")
        );
        // "*" is a wildcard only as a whole field.
        assert_eq!(pgpass_lookup("h*:1:d:u:pw\n", "hx", 1, "d", "u"), None);
        assert_eq!(
            pgpass_lookup("\\*:1:d:u:pw\n", "*", 1, "d", "u").as_deref(),
            Some("pw")
        );
    }

    /// A directory of its own under the system temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            use std::sync::atomic::{AtomicU32, Ordering};
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "pgengine-config-{tag}-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[cfg(unix)]
    #[test]
    fn pgpass_file_is_used_only_when_private() {
        use std::os::unix::fs::PermissionsExt;

        let dir = TempDir::new("pgpass");
        let path = dir.0.join("pgpass");
        std::fs::write(&path, "db:5432:shop:alice:from-file\n").unwrap();
        let mut config = Config::new();
        config.user("alice").dbname("shop").passfile(&path);
        let host = Host::Tcp("db".into());

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            config.password_for(&host, 5432),
            None,
            "0644 must be ignored"
        );

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            config.password_for(&host, 5432),
            Some(b"from-file".to_vec())
        );
        assert_eq!(config.password_for(&host, 5433), None);

        // An explicit password wins; an empty one does not count (libpq).
        config.password("explicit");
        assert_eq!(config.password_for(&host, 5432), Some(b"explicit".to_vec()));
        config.password("");
        assert_eq!(
            config.password_for(&host, 5432),
            Some(b"from-file".to_vec())
        );

        // Unix-socket connections find "localhost" entries.
        std::fs::write(&path, "localhost:5432:*:alice:via-socket\n").unwrap();
        assert_eq!(
            config.password_for(&Host::Unix("/some/dir".into()), 5432),
            Some(b"via-socket".to_vec())
        );

        // A missing file or a directory is no password, not an error.
        config.passfile(dir.0.join("missing"));
        assert_eq!(config.password_for(&host, 5432), None);
        config.passfile(&dir.0);
        assert_eq!(config.password_for(&host, 5432), None);
    }

    /// Quotes a value for a `key=value` string the way libpq's docs say: single quotes, with
    /// backslash before `'` and `\`.
    fn quote(value: &str) -> String {
        format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC*") {
            let _ = Config::parse(&s);
        }

        #[test]
        fn parse_never_panics_on_urls(s in "(postgres|postgresql)://[a-z:@%/?=&,\\[\\]0-9 .\\PC]*") {
            let _ = Config::parse(&s);
        }

        #[test]
        fn pgpass_lookup_never_panics(
            contents in "[a-z*:\\\\#\n\r\u{e9}]*",
            host in "[a-z/:\\\\]*",
            port in any::<u16>(),
        ) {
            let _ = pgpass_lookup(&contents, &host, port, "d", "u");
        }

        #[test]
        fn quoted_values_round_trip(
            user in "[^\\x00]{1,20}",
            dbname in "[^\\x00]{0,20}",
            host in "[^\\x00,/@][^\\x00,]{0,20}",
            port in 1u16..,
            application_name in "[^\\x00]{0,30}",
            password in "[^\\x00]{0,20}",
        ) {
            let conninfo = format!(
                "user={} dbname = {}\thost={} port={port} application_name={} password={}",
                quote(&user), quote(&dbname), quote(&host), quote(&application_name), quote(&password),
            );
            let config = Config::parse(&conninfo).unwrap();
            prop_assert_eq!(config.get_user(), Some(user.as_str()));
            prop_assert_eq!(config.get_dbname(), Some(dbname.as_str()));
            prop_assert_eq!(config.get_hosts(), &[Host::Tcp(host.clone())]);
            prop_assert_eq!(config.get_ports(), &[port]);
            prop_assert_eq!(config.get_application_name(), Some(application_name.as_str()));
            prop_assert_eq!(config.get_password(), Some(password.as_bytes()));
        }

        #[test]
        fn percent_encoded_urls_round_trip(
            user in "[^\\x00]{1,20}",
            password in "[^\\x00]{1,20}",
            dbname in "[^\\x00]{1,20}",
            port in 1u16..,
        ) {
            let enc = |s: &str| s.bytes().map(|b| format!("%{b:02X}")).collect::<String>();
            let url = format!("postgresql://{}:{}@h:{port}/{}", enc(&user), enc(&password), enc(&dbname));
            let config = Config::parse(&url).unwrap();
            prop_assert_eq!(config.get_user(), Some(user.as_str()));
            prop_assert_eq!(config.get_password(), Some(password.as_bytes()));
            prop_assert_eq!(config.get_dbname(), Some(dbname.as_str()));
            prop_assert_eq!(config.get_ports(), &[port]);
        }
    }
}
