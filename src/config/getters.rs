//! Reading a config back.
//!
//! `get_*` returns a setting as it was given, or `None` when it was not set, because "not set"
//! and "set to the default" differ (only the first is filled from the environment). Settings
//! with a built-in default that does not depend on the machine (`sslmode`, `keepalives`, ...)
//! return that default instead. Defaults that do (the OS user name, the default socket
//! directory) are resolved by the `effective_*` methods in defaults.rs.

use std::path::Path;
use std::time::Duration;

use super::keywords::split_list;
use super::{
    ChannelBinding, Config, Host, HostAddr, LoadBalanceHosts, SslMode, SslNegotiation,
    TargetSessionAttrs,
};

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

    pub(super) fn ssl_root_cert_is_system(&self) -> bool {
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

    /// Whether to send a client certificate (`sslcertmode`): `disable`, `allow` (the
    /// default: send one if there is one) or `require`.
    ///
    /// ```
    /// use pgengine::Config;
    ///
    /// assert_eq!(Config::new().get_ssl_cert_mode(), "allow");
    /// assert_eq!(Config::parse("sslcertmode=disable")?.get_ssl_cert_mode(), "disable");
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn get_ssl_cert_mode(&self) -> &'static str {
        self.ssl_cert_mode.unwrap_or("allow")
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
