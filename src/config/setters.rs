//! The builder: setters in the style of tokio-postgres, each returning `&mut Config` so calls
//! chain.
//!
//! A setter marks its setting as given, just as the same keyword in a connection string would,
//! so the environment no longer fills it. Setters that take a list (`host`, `hostaddr`, `port`)
//! add one entry per call. The few that take free text which libpq would validate
//! (`require_auth`, the protocol versions) check it with the same rules as the parser and
//! return a `Result`.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use super::keywords::{check_require_auth, parse_protocol_version};
use super::{
    ChannelBinding, Config, Host, LoadBalanceHosts, Secret, SslMode, SslNegotiation,
    TargetSessionAttrs,
};
use crate::error::{Error, Result};

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
