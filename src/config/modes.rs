//! The settings that pick one of a few fixed behaviours: `sslmode`, `target_session_attrs`,
//! `channel_binding`, `load_balance_hosts`, `sslnegotiation`.
//!
//! Each is an enum rather than a string so that a connection matches on it and the compiler
//! checks that every mode is handled. Each reads libpq's spelling of its values (and only that
//! spelling: libpq compares them case-sensitively); the default is the variant marked
//! `#[default]`, the one libpq uses when the setting is absent.

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
#[non_exhaustive]
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
    pub(super) fn parse(value: &str) -> Option<SslMode> {
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
    pub(super) fn requires_tls(self) -> bool {
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
#[non_exhaustive]
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
    pub(super) fn parse(value: &str) -> Option<TargetSessionAttrs> {
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

    /// The value as libpq spells it (`"read-write"`).
    pub fn as_str(self) -> &'static str {
        match self {
            TargetSessionAttrs::Any => "any",
            TargetSessionAttrs::ReadWrite => "read-write",
            TargetSessionAttrs::ReadOnly => "read-only",
            TargetSessionAttrs::Primary => "primary",
            TargetSessionAttrs::Standby => "standby",
            TargetSessionAttrs::PreferStandby => "prefer-standby",
        }
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
#[non_exhaustive]
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
    pub(super) fn parse(value: &str) -> Option<ChannelBinding> {
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
#[non_exhaustive]
pub enum LoadBalanceHosts {
    /// In the order given.
    #[default]
    Disable,
    /// In a random order, chosen afresh for every connection. The connection layer shuffles;
    /// this setting only records the wish.
    Random,
}

impl LoadBalanceHosts {
    pub(super) fn parse(value: &str) -> Option<LoadBalanceHosts> {
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
#[non_exhaustive]
pub enum SslNegotiation {
    /// Send an `SSLRequest` first and start TLS only if the server answers `S`.
    #[default]
    Postgres,
    /// Start the TLS handshake at once (ALPN `postgresql`); needs `sslmode=require` or stricter.
    Direct,
}

impl SslNegotiation {
    pub(super) fn parse(value: &str) -> Option<SslNegotiation> {
        Some(match value {
            "postgres" => SslNegotiation::Postgres,
            "direct" => SslNegotiation::Direct,
            _ => return None,
        })
    }
}
