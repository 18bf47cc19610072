//! The `PG*` environment variables (§34.15).
//!
//! Each variable stands for one connection keyword and is applied exactly as that keyword in a
//! connection string would be (through `Config::set_option`). libpq's precedence is
//! "connection string, then environment, then built-in default", so besides reading the
//! environment on its own ([`Config::from_env`]), a config can take from it only what it left
//! unset ([`Config::with_env_defaults`]). Both have a variant that takes the variables as pairs,
//! so tests need not change the process's environment.

use super::keywords::OptionError;
use super::{Check, Config, SslMode, for_each_setting};
use crate::error::{Error, Result};

impl Config {
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
