//! What a connection uses for the settings that were left unset.
//!
//! These defaults depend on the machine, so they are worked out when connecting, never stored:
//! the default host is the socket directory `/var/run/postgresql` if it exists, else
//! `localhost`; the default user is the OS user name, found without libc from `$USER`,
//! `$LOGNAME` or `/etc/passwd`; the default database is the user. Hosts are paired with ports
//! and `hostaddr` values as libpq pairs them.

use std::path::{Path, PathBuf};

use super::{Config, DEFAULT_PORT, DEFAULT_SOCKET_DIR, Host, HostAddr, LOCALHOST};
use crate::error::{Error, Result};

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
}

pub(super) fn default_host() -> Host {
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
pub(super) fn user_from_passwd(status: &str, passwd: &str) -> Option<String> {
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
