//! A throwaway PostgreSQL cluster for tests, examples and benchmarks.
//!
//! [`TempCluster`] runs `initdb` into a fresh directory under the system temp dir, starts a
//! server that listens on a free TCP port of 127.0.0.1 and on a private Unix socket directory,
//! and creates one role per password authentication method, so the driver can be tested against
//! every `pg_hba.conf` method it must speak:
//!
//! | role                          | `pg_hba.conf` method | password stored as |
//! |-------------------------------|----------------------|--------------------|
//! | [`TempCluster::SUPERUSER`]     | `trust`              | (none)             |
//! | [`TempCluster::PASSWORD_USER`] | `password`           | SCRAM-SHA-256      |
//! | [`TempCluster::MD5_USER`]      | `md5`                | MD5                |
//! | [`TempCluster::SCRAM_USER`]    | `scram-sha-256`      | SCRAM-SHA-256      |
//!
//! All three password roles share [`TempCluster::PASSWORD`], which is not ASCII on purpose:
//! SCRAM runs it through SASLprep and MD5 hashes its UTF-8 bytes, and both must agree with the
//! server. The server is tuned for speed, not durability (`fsync=off`, `full_page_writes=off`),
//! and is ready for streaming replication (`wal_level=replica`) so standbys can be made from it.
//!
//! # Who runs the server
//!
//! `initdb` and `postgres` refuse to run as root. When the tests run as root (containers, CI),
//! the server-side programs run as the OS user `postgres` through `runuser` (or `su`), and the
//! cluster's directory is handed to that user with `chown`. Otherwise they run as ourselves.
//! Clients (`psql`, the driver under test) always run as the current user.
//!
//! # Where the binaries come from
//!
//! The directory named by the environment variable `PGENGINE_PG_BIN`; else the directory of a
//! `pg_ctl` or `initdb` found on `PATH` (after resolving symlinks) if `initdb`, `pg_ctl` and
//! `postgres` all live there, which skips Debian's `pg_wrapper` scripts; else the highest
//! version under `/usr/lib/postgresql/*/bin`.
//!
//! # Cleaning up
//!
//! Dropping a [`TempCluster`] stops the server (`immediate` mode) and removes its directory.
//! [`TempCluster::shared`] lives in a static, and statics are never dropped, so every cluster
//! also gets a watchdog: a small detached `sh` process that waits for the test process to end
//! and then stops the server and removes the directory. It notices the end through a pipe the
//! test process holds and never writes to: the kernel closes it however the process ends, even
//! by `SIGKILL`, and at once — unlike polling `kill -0`, which still sees a killed process
//! alive until its parent reaps it. The watchdog of a dropped cluster is killed by the drop.
//!
//! This module is Unix only: it relies on `sh`, `id`, `chown` and Unix sockets.

use std::env;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

/// The OS user that runs the server when the tests run as root.
const SERVER_OS_USER: &str = "postgres";

/// The address the server listens on; IPv4 only, so `localhost` resolution never matters.
const HOST: &str = "127.0.0.1";

/// How many times a start is retried with a new port when another process took the one we
/// picked between probing it and the server binding it.
const PORT_ATTEMPTS: u32 = 5;

/// How long `pg_ctl` waits for the server to start or stop, in seconds.
const PG_CTL_TIMEOUT_SECS: &str = "60";

/// A running, throwaway PostgreSQL cluster.
///
/// Start a private one with [`TempCluster::start`] (or [`TempCluster::builder`] for options),
/// or share one per test process with [`TempCluster::shared`]. Tests that stop or restart the
/// server should use a private cluster, so they do not disturb tests running in parallel.
///
/// ```no_run
/// use pgengine::testing::TempCluster;
///
/// let cluster = TempCluster::start()?;
/// assert_eq!(cluster.psql("SELECT 1")?, "1");
/// let url = cluster.url_with_password(TempCluster::SCRAM_USER, TempCluster::PASSWORD);
/// assert!(url.starts_with("postgres://user_scram:"));
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct TempCluster {
    /// The unique directory holding everything below; removed on drop.
    root: PathBuf,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_file: PathBuf,
    bin_dir: PathBuf,
    port: u16,
    run_as: RunAs,
    /// The process that cleans up if we end without dropping the cluster; holds our end of
    /// the pipe it waits on.
    watchdog: Option<Child>,
    /// Held by `stop`, `restart` and `start_again`, so two threads cannot interleave two
    /// `pg_ctl` runs on the same data directory.
    lifecycle: Mutex<()>,
}

/// Options for a [`TempCluster`], made by [`TempCluster::builder`].
///
/// ```no_run
/// use pgengine::testing::TempCluster;
///
/// let cluster = TempCluster::builder()
///     .setting("work_mem", "8MB")
///     .hba_line("host all blocked 127.0.0.1/32 reject")
///     .start()?;
/// assert_eq!(cluster.psql("SHOW work_mem")?, "8MB");
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct TempClusterBuilder {
    port: Option<u16>,
    settings: Vec<(String, String)>,
    hba_lines: Vec<String>,
    bin_dir: Option<PathBuf>,
    tls: bool,
}

impl TempClusterBuilder {
    /// Listens on this TCP port instead of a free one picked at start.
    ///
    /// A picked port is retried if it turns out to be taken; a port given here is not.
    ///
    /// ```no_run
    /// # use pgengine::testing::TempCluster;
    /// let cluster = TempCluster::builder().port(54329).start()?;
    /// assert_eq!(cluster.port(), 54329);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Adds `name = 'value'` to `postgresql.conf`, after the cluster's own settings so it wins.
    ///
    /// The value is quoted for you; pass it as you would to `SET`.
    ///
    /// ```no_run
    /// # use pgengine::testing::TempCluster;
    /// let cluster = TempCluster::builder().setting("statement_timeout", "5s").start()?;
    /// assert_eq!(cluster.psql("SHOW statement_timeout")?, "5s");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// Turns TLS on: the harness makes a certificate authority and a server certificate for
    /// `localhost` and `127.0.0.1` signed by it (with `openssl`), and sets `ssl = on`, with the
    /// CA also trusted for client certificates. See [`TempCluster::ca_cert`] and
    /// [`TempCluster::issue_client_cert`].
    ///
    /// ```no_run
    /// # use pgengine::testing::TempCluster;
    /// let cluster = TempCluster::builder().tls().start()?;
    /// assert_eq!(cluster.psql("SHOW ssl")?, "on");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Adds a line to `pg_hba.conf`, before the cluster's own lines.
    ///
    /// The server uses the first line that matches a connection, so these lines override the
    /// defaults described in the [module documentation](self).
    ///
    /// ```no_run
    /// # use pgengine::testing::TempCluster;
    /// let cluster = TempCluster::builder()
    ///     .hba_line("host all postgres_test 127.0.0.1/32 reject")
    ///     .start()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn hba_line(mut self, line: impl Into<String>) -> Self {
        self.hba_lines.push(line.into());
        self
    }

    /// Takes `initdb`, `pg_ctl`, `postgres` (and `psql` if present) from this directory instead
    /// of searching for them.
    ///
    /// ```no_run
    /// # use pgengine::testing::TempCluster;
    /// let cluster = TempCluster::builder().bin_dir("/usr/lib/postgresql/15/bin").start()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn bin_dir(mut self, path: impl Into<PathBuf>) -> Self {
        self.bin_dir = Some(path.into());
        self
    }

    /// Creates, configures and starts the cluster, and creates its roles.
    ///
    /// Fails if no PostgreSQL binaries are found, if `initdb` or the server fail (the error
    /// carries their output and the tail of the server log), or, when running as root, if there
    /// is no `postgres` OS user to run the server as. Whatever was created is removed again.
    ///
    /// ```no_run
    /// # use pgengine::testing::TempCluster;
    /// let cluster = TempCluster::builder().start()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn start(self) -> io::Result<TempCluster> {
        let bin_dir = match &self.bin_dir {
            Some(dir) => checked_bin_dir(dir)?,
            None => find_bin_dir()?,
        };
        let run_as = RunAs::detect()?;
        let root = create_unique_dir()?;
        let port = match self.port {
            Some(port) => port,
            None => free_port()?,
        };
        // From here on, dropping `cluster` on an error stops whatever runs and removes `root`.
        let mut cluster = TempCluster {
            data_dir: root.join("data"),
            socket_dir: root.join("sock"),
            log_file: root.join("server.log"),
            root,
            bin_dir,
            port,
            run_as,
            watchdog: None,
            lifecycle: Mutex::new(()),
        };
        // First, so that even a test process killed during initdb leaves nothing behind.
        cluster.watchdog = Some(cluster.spawn_watchdog()?);
        let mut settings = self.settings.clone();
        if self.tls {
            // Before create_dirs, which hands the whole tree (the server's key too) to the
            // server's OS user.
            let dir = cluster.root.join("tls");
            make_server_certificates(&dir)?;
            let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
            let tls_settings = [
                ("ssl", "on".to_owned()),
                ("ssl_cert_file", path("server.crt")),
                ("ssl_key_file", path("server.key")),
                ("ssl_ca_file", path("ca.crt")),
            ];
            // The builder's own settings still come last and win.
            settings.splice(0..0, tls_settings.map(|(k, v)| (k.to_owned(), v)));
        }
        cluster.create_dirs()?;
        cluster.init_db()?;
        let base_conf = fs::read_to_string(cluster.data_dir.join("postgresql.conf"))?;
        fs::write(
            cluster.data_dir.join("pg_hba.conf"),
            hba_conf(&self.hba_lines),
        )?;

        let mut attempt = 1;
        loop {
            let conf = format!(
                "{base_conf}\n{}",
                cluster_conf(&cluster.socket_dir, cluster.port, &settings)
            );
            fs::write(cluster.data_dir.join("postgresql.conf"), conf)?;
            match cluster.start_server() {
                Ok(()) => break,
                Err(StartError::PortInUse(_)) if self.port.is_none() && attempt < PORT_ATTEMPTS => {
                    attempt += 1;
                    cluster.port = free_port()?;
                }
                Err(StartError::PortInUse(error) | StartError::Other(error)) => return Err(error),
            }
        }
        cluster.create_roles()?;
        Ok(cluster)
    }
}

impl TempCluster {
    /// The superuser made by `initdb`; `trust` authentication on every connection type,
    /// replication included.
    pub const SUPERUSER: &'static str = "postgres_test";
    /// A role that must log in with `password` authentication (the password in clear text).
    pub const PASSWORD_USER: &'static str = "user_password";
    /// A role that must log in with `md5` authentication; its password is stored as an MD5
    /// hash, as `md5` requires.
    pub const MD5_USER: &'static str = "user_md5";
    /// A role that must log in with `scram-sha-256` authentication.
    pub const SCRAM_USER: &'static str = "user_scram";
    /// The password of [`PASSWORD_USER`](Self::PASSWORD_USER), [`MD5_USER`](Self::MD5_USER)
    /// and [`SCRAM_USER`](Self::SCRAM_USER). It holds a space and a non-ASCII letter on
    /// purpose, to test URL encoding, SASLprep and byte-exact MD5 hashing.
    pub const PASSWORD: &'static str = "pgengine-secret ü";

    /// Options for a new cluster.
    ///
    /// ```no_run
    /// # use pgengine::testing::TempCluster;
    /// let cluster = TempCluster::builder().setting("max_connections", "50").start()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn builder() -> TempClusterBuilder {
        TempClusterBuilder::default()
    }

    /// Starts a private cluster with the default options; see [`TempClusterBuilder::start`].
    ///
    /// ```no_run
    /// # use pgengine::testing::TempCluster;
    /// let cluster = TempCluster::start()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn start() -> io::Result<TempCluster> {
        Self::builder().start()
    }

    /// The cluster shared by every test of this process, started on first use.
    ///
    /// It is never dropped; its watchdog stops it and removes its directory after the process
    /// exits. Do not stop or restart it: tests run in parallel and share it.
    ///
    /// # Panics
    ///
    /// Panics, with the reason, if the cluster cannot be started — on the first call and every
    /// later one. This is test setup code: a test cannot run without its server, and a panic is
    /// the clearest way to say why.
    ///
    /// ```no_run
    /// # use pgengine::testing::TempCluster;
    /// let url = TempCluster::shared().url(TempCluster::SUPERUSER);
    /// ```
    pub fn shared() -> &'static TempCluster {
        static SHARED: OnceLock<Result<TempCluster, String>> = OnceLock::new();
        match SHARED.get_or_init(|| Self::start().map_err(|error| error.to_string())) {
            Ok(cluster) => cluster,
            Err(reason) => panic!("could not start the shared test cluster: {reason}"),
        }
    }

    /// The certificate authority that signed the server's certificate (PEM), for
    /// `sslrootcert`. Only for a cluster built with [`TempClusterBuilder::tls`].
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("tls").join("ca.crt")
    }

    /// Makes a client certificate for the role `user` (its common name), signed by the
    /// cluster's CA, and returns the paths of the certificate and its key (for `sslcert`
    /// and `sslkey`). Only for a cluster built with [`TempClusterBuilder::tls`].
    ///
    /// ```no_run
    /// # use pgengine::testing::TempCluster;
    /// let cluster = TempCluster::builder().tls().start()?;
    /// let (cert, key) = cluster.issue_client_cert("app")?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn issue_client_cert(&self, user: &str) -> io::Result<(PathBuf, PathBuf)> {
        let dir = self.root.join("tls");
        let stem = format!(
            "client-{}",
            user.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        );
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        sign_certificate(&dir, &format!("/CN={user}"), "client_ext", &cert, &key)?;
        Ok((cert, key))
    }

    /// The TCP port the server listens on (on [`host`](Self::host)), and the number in the name
    /// of its Unix socket.
    ///
    /// ```no_run
    /// # use pgengine::testing::TempCluster;
    /// let addr = (TempCluster::shared().host(), TempCluster::shared().port());
    /// ```
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the server's Unix socket, `.s.PGSQL.<port>`.
    ///
    /// ```no_run
    /// # use pgengine::testing::TempCluster;
    /// let cluster = TempCluster::shared();
    /// let socket = cluster.socket_dir().join(format!(".s.PGSQL.{}", cluster.port()));
    /// ```
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The cluster's data directory (`PGDATA`).
    ///
    /// ```no_run
    /// # use pgengine::testing::TempCluster;
    /// let conf = TempCluster::shared().data_dir().join("postgresql.conf");
    /// ```
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The TCP address the server listens on: `"127.0.0.1"`.
    ///
    /// ```no_run
    /// # use pgengine::testing::TempCluster;
    /// assert_eq!(TempCluster::shared().host(), "127.0.0.1");
    /// ```
    pub fn host(&self) -> &str {
        HOST
    }

    /// The directory the PostgreSQL programs were taken from, for tools such as
    /// `pg_basebackup` and `pgbench`.
    ///
    /// ```no_run
    /// # use pgengine::testing::TempCluster;
    /// let pgbench = TempCluster::shared().bin_dir().join("pgbench");
    /// ```
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// A TCP URL for `user` without a password, for the `postgres` database:
    /// `postgres://USER@127.0.0.1:PORT/postgres`.
    ///
    /// ```no_run
    /// # use pgengine::testing::TempCluster;
    /// let url = TempCluster::shared().url(TempCluster::SUPERUSER);
    /// assert!(url.starts_with("postgres://postgres_test@127.0.0.1:"));
    /// ```
    pub fn url(&self, user: &str) -> String {
        tcp_url(HOST, self.port, user, None)
    }

    /// A TCP URL for `user` with `password`, both percent-encoded:
    /// `postgres://USER:PASSWORD@127.0.0.1:PORT/postgres`.
    ///
    /// ```no_run
    /// # use pgengine::testing::TempCluster;
    /// let url = TempCluster::shared().url_with_password("user_md5", TempCluster::PASSWORD);
    /// assert!(url.starts_with("postgres://user_md5:pgengine-secret%20%C3%BC@"));
    /// ```
    pub fn url_with_password(&self, user: &str, password: &str) -> String {
        tcp_url(HOST, self.port, user, Some(password))
    }

    /// A `key=value` connection string for `user` over the Unix socket:
    /// `host=SOCKETDIR port=PORT user=USER dbname=postgres`.
    ///
    /// ```no_run
    /// # use pgengine::testing::TempCluster;
    /// let conninfo = TempCluster::shared().socket_conninfo(TempCluster::SUPERUSER);
    /// assert!(conninfo.ends_with("user=postgres_test dbname=postgres"));
    /// ```
    pub fn socket_conninfo(&self, user: &str) -> String {
        socket_conninfo(&self.socket_dir.to_string_lossy(), self.port, user)
    }

    /// Runs `sql` with `psql` as [`SUPERUSER`](Self::SUPERUSER) over the Unix socket, stopping
    /// at the first error, and returns what it printed: unaligned, tuples only, one row per
    /// line, without the final newline.
    ///
    /// This is the test's independent view of the server, so it deliberately does not use the
    /// driver under test.
    ///
    /// ```no_run
    /// # use pgengine::testing::TempCluster;
    /// let count = TempCluster::shared().psql("SELECT count(*) FROM pg_stat_activity")?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn psql(&self, sql: &str) -> io::Result<String> {
        let mut psql = self.psql_command(self.socket_dir.as_os_str(), Self::SUPERUSER);
        psql.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql]);
        let output = psql.stdin(Stdio::null()).output()?;
        if !output.status.success() {
            return Err(io::Error::other(format!(
                "psql failed ({}) running {sql:?}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim_end()
            )));
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        Ok(stdout.strip_suffix('\n').unwrap_or(&stdout).to_owned())
    }

    /// Makes a streaming-replication standby of this cluster and starts it: a new cluster
    /// directory filled by `pg_basebackup -R` (which writes `primary_conninfo` and
    /// `standby.signal`), its own port and socket, the primary's roles and data. It stays a
    /// hot standby (read-only queries only) until [`promote`](Self::promote)d.
    ///
    /// ```no_run
    /// # use pgengine::testing::TempCluster;
    /// let primary = TempCluster::start()?;
    /// let standby = primary.standby()?;
    /// assert_eq!(standby.psql("SELECT pg_is_in_recovery()")?, "t");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn standby(&self) -> io::Result<TempCluster> {
        let root = create_unique_dir()?;
        let mut standby = TempCluster {
            data_dir: root.join("data"),
            socket_dir: root.join("sock"),
            log_file: root.join("server.log"),
            root,
            bin_dir: self.bin_dir.clone(),
            port: free_port()?,
            run_as: self.run_as.clone(),
            watchdog: None,
            lifecycle: Mutex::new(()),
        };
        standby.watchdog = Some(standby.spawn_watchdog()?);
        fs::create_dir(&standby.socket_dir)?;
        if let Some(owner) = standby.run_as.server_user() {
            run(
                "chown",
                Command::new("chown")
                    .arg("-R")
                    .arg(owner)
                    .arg(&standby.root),
            )?;
        }
        let basebackup = self.bin_dir.join("pg_basebackup");
        let port = self.port.to_string();
        let args: [&OsStr; 11] = [
            "-D".as_ref(),
            standby.data_dir.as_os_str(),
            "-R".as_ref(),
            "-X".as_ref(),
            "stream".as_ref(),
            "-h".as_ref(),
            HOST.as_ref(),
            "-p".as_ref(),
            port.as_ref(),
            "-U".as_ref(),
            Self::SUPERUSER.as_ref(),
        ];
        run(
            "pg_basebackup",
            &mut standby.server_command(&basebackup, &args),
        )?;
        // The copied postgresql.conf names the primary's port and socket; ours come last.
        let conf_path = standby.data_dir.join("postgresql.conf");
        let mut conf = fs::read_to_string(&conf_path)?;
        conf.push_str(&cluster_conf(&standby.socket_dir, standby.port, &[]));
        fs::write(&conf_path, conf)?;
        standby.start_server().map_err(StartError::into_io)?;
        Ok(standby)
    }

    /// Promotes a standby to a primary (`pg_ctl promote`, waiting until it accepts writes).
    ///
    /// ```no_run
    /// # use pgengine::testing::TempCluster;
    /// let primary = TempCluster::start()?;
    /// let standby = primary.standby()?;
    /// primary.stop()?;
    /// standby.promote()?;
    /// assert_eq!(standby.psql("SELECT pg_is_in_recovery()")?, "f");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn promote(&self) -> io::Result<()> {
        let _lifecycle = self
            .lifecycle
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.pg_ctl("promote", &[]).map(drop)
    }

    /// Stops the server, waiting until it is gone (`pg_ctl stop -m fast`): clients are
    /// disconnected and open transactions rolled back. Does nothing if it is not running.
    ///
    /// ```no_run
    /// # use pgengine::testing::TempCluster;
    /// let cluster = TempCluster::start()?;
    /// cluster.stop()?;
    /// cluster.start_again()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn stop(&self) -> io::Result<()> {
        let _lifecycle = self
            .lifecycle
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !self.is_running()? {
            return Ok(());
        }
        self.pg_ctl("stop", &["-m".as_ref(), "fast".as_ref()])
            .map(drop)
    }

    /// Restarts the server on the same port (`pg_ctl restart -m fast`): every connection is
    /// closed by the server, as a failover or crash would, then the server accepts new ones.
    ///
    /// ```no_run
    /// # use pgengine::testing::TempCluster;
    /// let cluster = TempCluster::start()?;
    /// cluster.restart()?;
    /// assert_eq!(cluster.psql("SELECT 1")?, "1");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn restart(&self) -> io::Result<()> {
        let _lifecycle = self
            .lifecycle
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let options = self.server_options();
        let log_file = self.log_file.as_os_str();
        self.pg_ctl(
            "restart",
            &[
                "-m".as_ref(),
                "fast".as_ref(),
                "-l".as_ref(),
                log_file,
                "-o".as_ref(),
                &options,
            ],
        )
        .map(drop)
    }

    /// Starts the server again after [`stop`](Self::stop), on the same port. Does nothing if
    /// it is running.
    ///
    /// ```no_run
    /// # use pgengine::testing::TempCluster;
    /// let cluster = TempCluster::start()?;
    /// cluster.stop()?;
    /// cluster.start_again()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn start_again(&self) -> io::Result<()> {
        let _lifecycle = self
            .lifecycle
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.is_running()? {
            return Ok(());
        }
        self.start_server().map_err(StartError::into_io)
    }

    /// Makes the data and socket directories and hands the whole tree to the server user:
    /// the server needs to own its data directory (mode 0700, or it refuses to start), to
    /// create its socket and lock file, and to write the log next to them.
    fn create_dirs(&self) -> io::Result<()> {
        fs::create_dir(&self.data_dir)?;
        fs::set_permissions(&self.data_dir, fs::Permissions::from_mode(0o700))?;
        fs::create_dir(&self.socket_dir)?;
        if let Some(owner) = self.run_as.server_user() {
            run(
                "chown",
                Command::new("chown").arg("-R").arg(owner).arg(&self.root),
            )?;
        }
        Ok(())
    }

    fn init_db(&self) -> io::Result<()> {
        let initdb = self.bin_dir.join("initdb");
        let args: [&OsStr; 9] = [
            "-D".as_ref(),
            self.data_dir.as_os_str(),
            "-U".as_ref(),
            Self::SUPERUSER.as_ref(),
            "-A".as_ref(),
            "trust".as_ref(),
            "--encoding=UTF8".as_ref(),
            "--locale=C".as_ref(),
            // Nothing here must survive a power cut; skipping fsync saves seconds per cluster.
            "--no-sync".as_ref(),
        ];
        run("initdb", &mut self.server_command(&initdb, &args)).map(drop)
    }

    /// Starts the server once, on `self.port`, and tells a taken port apart from other
    /// failures so the first start can retry with another port.
    fn start_server(&self) -> Result<(), StartError> {
        // The log accumulates over restarts; only what this attempt wrote explains its failure.
        let log_offset = fs::metadata(&self.log_file).map_or(0, |meta| meta.len());
        let options = self.server_options();
        let log_file = self.log_file.as_os_str();
        match self.pg_ctl("start", &["-l".as_ref(), log_file, "-o".as_ref(), &options]) {
            Ok(_) => Ok(()),
            Err(error) => {
                let log = log_since(&self.log_file, log_offset);
                let error = io::Error::new(
                    error.kind(),
                    format!("{error}\nend of the server log:\n{log}"),
                );
                // The server's "could not bind IPv4 address ...: Address already in use".
                // initdb's --locale=C also set lc_messages, so the wording is not translated.
                if log.contains("could not bind") || log.contains("Address already in use") {
                    Err(StartError::PortInUse(error))
                } else {
                    Err(StartError::Other(error))
                }
            }
        }
    }

    /// Creates the three password roles. `password_encryption` decides how a password given
    /// to `CREATE ROLE` is stored, and `md5` authentication only works with an MD5-stored
    /// password, so it is switched to `md5` for that one role.
    fn create_roles(&self) -> io::Result<()> {
        let password = sql_literal(Self::PASSWORD);
        self.psql(&format!(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE {password_user} LOGIN PASSWORD {password};
             CREATE ROLE {scram_user} LOGIN PASSWORD {password};
             SET password_encryption = 'md5';
             CREATE ROLE {md5_user} LOGIN PASSWORD {password};",
            password_user = Self::PASSWORD_USER,
            scram_user = Self::SCRAM_USER,
            md5_user = Self::MD5_USER,
        ))
        .map(drop)
    }

    /// Asks `pg_ctl status`, which also notices a server that died and left its pid file.
    fn is_running(&self) -> io::Result<bool> {
        let pg_ctl = self.bin_dir.join("pg_ctl");
        let args: [&OsStr; 3] = ["status".as_ref(), "-D".as_ref(), self.data_dir.as_os_str()];
        let output = self
            .server_command(&pg_ctl, &args)
            .stdin(Stdio::null())
            .output()?;
        // pg_ctl's documented exit codes: 0 running, 3 not running (4 is no data directory).
        match output.status.code() {
            Some(0) => Ok(true),
            Some(3) => Ok(false),
            _ => Err(io::Error::other(format!(
                "pg_ctl status failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim_end()
            ))),
        }
    }

    /// Runs `pg_ctl ACTION -D DATA -w -t 60 EXTRA...` as the server user.
    fn pg_ctl(&self, action: &str, extra: &[&OsStr]) -> io::Result<String> {
        let pg_ctl = self.bin_dir.join("pg_ctl");
        let mut args: Vec<&OsStr> = vec![
            action.as_ref(),
            "-D".as_ref(),
            self.data_dir.as_os_str(),
            "-w".as_ref(),
            "-t".as_ref(),
            PG_CTL_TIMEOUT_SECS.as_ref(),
        ];
        args.extend_from_slice(extra);
        run(
            &format!("pg_ctl {action}"),
            &mut self.server_command(&pg_ctl, &args),
        )
    }

    /// The server's command-line options for `pg_ctl -o`. They repeat `postgresql.conf` so a
    /// restart keeps the port and socket even if someone edits the file. pg_ctl hands them to
    /// `sh`, hence the quoting.
    fn server_options(&self) -> OsString {
        let mut options = OsString::from("-k ");
        options.push(shell_quote(self.socket_dir.as_os_str()));
        options.push(format!(" -p {}", self.port));
        options
    }

    /// A command that runs `program` as the user that owns the server.
    fn server_command(&self, program: &Path, args: &[&OsStr]) -> Command {
        let (program, args) = self.run_as.wrap(program, args);
        let mut command = Command::new(program);
        command.args(args).current_dir(&self.root);
        scrub_pg_env(&mut command);
        command
    }

    /// `psql` connecting as `user` to `host` (the socket directory or the TCP address), from
    /// the cluster's binaries if they include it.
    fn psql_command(&self, host: &OsStr, user: &str) -> Command {
        let bundled = self.bin_dir.join("psql");
        let program = if bundled.is_file() {
            bundled
        } else {
            find_program("psql").unwrap_or_else(|| PathBuf::from("psql"))
        };
        let mut command = Command::new(program);
        scrub_pg_env(&mut command);
        command
            .arg("-h")
            .arg(host)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", user, "-d", "postgres"])
            // The password and SQL are UTF-8 whatever the test process's locale says.
            .env("PGCLIENTENCODING", "UTF8")
            .env("PGCONNECT_TIMEOUT", "10");
        command
    }

    /// Spawns the watchdog described in the module documentation. It runs in its own process
    /// group, so a Ctrl-C aimed at the test run does not kill it before it has cleaned up, and
    /// with its output on /dev/null, so it does not hold the test's output pipes open (cargo
    /// waits for those to close). Its stdin is the pipe it waits on; our end is in the `Child`.
    fn spawn_watchdog(&self) -> io::Result<Child> {
        let pg_ctl = self.bin_dir.join("pg_ctl");
        let stop_args: [&OsStr; 7] = [
            "stop".as_ref(),
            "-D".as_ref(),
            self.data_dir.as_os_str(),
            "-m".as_ref(),
            "immediate".as_ref(),
            "-t".as_ref(),
            PG_CTL_TIMEOUT_SECS.as_ref(),
        ];
        let (program, args) = self.run_as.wrap(&pg_ctl, &stop_args);
        let mut stop = shell_quote(&program);
        for arg in &args {
            stop.push(" ");
            stop.push(shell_quote(arg));
        }
        let root = shell_quote(self.root.as_os_str());
        let pid_file = shell_quote(self.data_dir.join("postmaster.pid").as_os_str());

        // `read` returns at end of file, when our end of the pipe is closed.
        let mut script = OsString::from("read -r _\nif [ -d ");
        script.push(&root);
        script.push(" ]; then\n  if [ -f ");
        script.push(&pid_file);
        script.push(" ]; then ");
        script.push(&stop);
        script.push("; fi\n  rm -rf ");
        script.push(&root);
        script.push("\nfi\n");
        spawn_watchdog_script(script)
    }
}

impl Drop for TempCluster {
    /// Stops the server in `immediate` mode (nothing here needs a clean shutdown) and removes
    /// the cluster's directory. Failures are printed, not raised: drop cannot return them.
    fn drop(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            // Killed first, so it cannot race us removing the directory. It is ours, by pid.
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        if self.data_dir.join("postmaster.pid").exists()
            && let Err(error) = self.pg_ctl("stop", &["-m".as_ref(), "immediate".as_ref()])
        {
            eprintln!("TempCluster: could not stop the server: {error}");
        }
        if let Err(error) = fs::remove_dir_all(&self.root)
            && error.kind() != io::ErrorKind::NotFound
        {
            eprintln!(
                "TempCluster: could not remove {}: {error}",
                self.root.display()
            );
        }
    }
}

/// A PgBouncer in front of a [`TempCluster`], made by [`TempCluster::pgbouncer`]: its own
/// directory, a free port on 127.0.0.1, `auth_type = trust` for the cluster's superuser, and
/// the pool mode asked for. Dropping it stops it (as does the end of the test process, through
/// a watchdog like the cluster's) and removes its directory.
#[derive(Debug)]
pub struct PgBouncer {
    root: PathBuf,
    port: u16,
    watchdog: Option<Child>,
}

impl PgBouncer {
    /// The port PgBouncer listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A `key=value` connection string for `user` through PgBouncer, to the cluster's
    /// `postgres` database.
    pub fn conninfo(&self, user: &str) -> String {
        format!("host={HOST} port={} user={user} dbname=postgres", self.port)
    }

    fn stop(&self) {
        let pid_file = self.root.join("pgbouncer.pid");
        if let Ok(pid) = fs::read_to_string(&pid_file) {
            let _ = Command::new("kill")
                .arg("-INT")
                .arg(pid.trim())
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        self.stop();
        let _ = fs::remove_dir_all(&self.root);
    }
}

impl TempCluster {
    /// Starts PgBouncer (found on `PATH`, or in `/usr/sbin`) in front of this cluster, in
    /// `pool_mode` (`session`, `transaction` or `statement`), with at most `pool_size` server
    /// connections. As root it runs as the server's OS user: PgBouncer refuses to run as root.
    ///
    /// ```no_run
    /// # use pgengine::testing::TempCluster;
    /// let cluster = TempCluster::shared();
    /// let bouncer = cluster.pgbouncer("transaction", 4)?;
    /// let conninfo = bouncer.conninfo(TempCluster::SUPERUSER);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn pgbouncer(&self, pool_mode: &str, pool_size: usize) -> io::Result<PgBouncer> {
        let program = find_program("pgbouncer")
            .or_else(|| Some(PathBuf::from("/usr/sbin/pgbouncer")).filter(|p| p.exists()))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    "pgbouncer is not installed (Debian: apt-get install pgbouncer)",
                )
            })?;
        let root = create_unique_dir()?;
        let port = free_port()?;
        let mut bouncer = PgBouncer {
            root: root.clone(),
            port,
            watchdog: None,
        };
        let path = |name: &str| root.join(name).to_string_lossy().into_owned();
        fs::write(
            root.join("userlist.txt"),
            format!("\"{}\" \"\"\n", Self::SUPERUSER),
        )?;
        let ini = format!(
            "[databases]\n* = host={HOST} port={}\n\n[pgbouncer]\nlisten_addr = {HOST}\n\
             listen_port = {port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {}\n\
             pool_mode = {pool_mode}\ndefault_pool_size = {pool_size}\nmax_client_conn = 500\n\
             logfile = {}\npidfile = {}\nadmin_users = {}\n",
            self.port,
            path("userlist.txt"),
            path("pgbouncer.log"),
            path("pgbouncer.pid"),
            Self::SUPERUSER,
        );
        fs::write(root.join("pgbouncer.ini"), ini)?;
        if let Some(owner) = self.run_as.server_user() {
            run(
                "chown",
                Command::new("chown").arg("-R").arg(owner).arg(&root),
            )?;
        }
        bouncer.watchdog = Some(spawn_pgbouncer_watchdog(&root)?);
        let ini_path = root.join("pgbouncer.ini");
        let args: [&OsStr; 2] = ["-d".as_ref(), ini_path.as_os_str()];
        let (program, args) = self.run_as.wrap(&program, &args);
        let mut command = Command::new(program);
        command.args(args).current_dir(&root);
        scrub_pg_env(&mut command);
        run("pgbouncer", &mut command)?;
        // -d returns once it has forked; wait until it listens.
        for _ in 0..200 {
            if std::net::TcpStream::connect((HOST, port)).is_ok() {
                return Ok(bouncer);
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        Err(io::Error::other(format!(
            "pgbouncer did not start listening on {port}: {}",
            fs::read_to_string(root.join("pgbouncer.log")).unwrap_or_default()
        )))
    }
}

/// Stops PgBouncer (by its pid file) and removes its directory when the test process ends.
fn spawn_pgbouncer_watchdog(root: &Path) -> io::Result<Child> {
    let root_q = shell_quote(root.as_os_str());
    let pid_file = shell_quote(root.join("pgbouncer.pid").as_os_str());
    let mut script = OsString::from(
        "read -r _
if [ -f ",
    );
    script.push(&pid_file);
    script.push(" ]; then kill -INT \"$(cat ");
    script.push(&pid_file);
    script.push(
        ")\"; fi
rm -rf ",
    );
    script.push(&root_q);
    script.push("\n");
    spawn_watchdog_script(script)
}

/// Runs `script` with `sh` in a process group of its own, its stdin a pipe we hold and never
/// write to: the script's first `read` returns when our end closes, however we end.
fn spawn_watchdog_script(script: OsString) -> io::Result<Child> {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(script)
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    scrub_pg_env(&mut command);
    command
        .spawn()
        .map_err(|error| io::Error::new(error.kind(), format!("could not run sh: {error}")))
}

/// Why a server start failed: a taken port is worth another try with a new one.
enum StartError {
    PortInUse(io::Error),
    Other(io::Error),
}

impl StartError {
    fn into_io(self) -> io::Error {
        match self {
            StartError::PortInUse(error) | StartError::Other(error) => error,
        }
    }
}

/// How the server-side programs (`initdb`, `pg_ctl`) are run.
#[derive(Debug, Clone)]
enum RunAs {
    /// We are not root: run them directly, as ourselves.
    CurrentUser,
    /// We are root: `runuser -u postgres -- PROGRAM ARGS`.
    Runuser(PathBuf),
    /// We are root and there is no `runuser`: `su postgres -s /bin/sh -c 'PROGRAM ARGS'`.
    Su(PathBuf),
}

impl RunAs {
    fn detect() -> io::Result<RunAs> {
        let uid = run("id -u", Command::new("id").arg("-u"))?;
        if uid.trim() != "0" {
            return Ok(RunAs::CurrentUser);
        }
        let server_user_exists = Command::new("id")
            .arg("-u")
            .arg(SERVER_OS_USER)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?
            .success();
        if !server_user_exists {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "running as root, but initdb and postgres refuse to run as root and there \
                     is no OS user `{SERVER_OS_USER}` to run them as; create that user or run \
                     the tests as a non-root user"
                ),
            ));
        }
        if let Some(runuser) = find_program("runuser") {
            Ok(RunAs::Runuser(runuser))
        } else if let Some(su) = find_program("su") {
            Ok(RunAs::Su(su))
        } else {
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "running as root, but found neither runuser nor su to run the server as \
                     `{SERVER_OS_USER}`"
                ),
            ))
        }
    }

    /// The OS user that must own the cluster's files, when it is not us.
    fn server_user(&self) -> Option<&'static str> {
        match self {
            RunAs::CurrentUser => None,
            RunAs::Runuser(_) | RunAs::Su(_) => Some(SERVER_OS_USER),
        }
    }

    /// The program and arguments that run `program args` as the server user.
    fn wrap(&self, program: &Path, args: &[&OsStr]) -> (OsString, Vec<OsString>) {
        let args = args.iter().map(|&arg| arg.to_owned());
        match self {
            RunAs::CurrentUser => (program.as_os_str().to_owned(), args.collect()),
            RunAs::Runuser(runuser) => {
                let mut wrapped: Vec<OsString> =
                    vec!["-u".into(), SERVER_OS_USER.into(), "--".into()];
                wrapped.push(program.as_os_str().to_owned());
                wrapped.extend(args);
                (runuser.as_os_str().to_owned(), wrapped)
            }
            RunAs::Su(su) => {
                let mut line = shell_quote(program.as_os_str());
                for arg in args {
                    line.push(" ");
                    line.push(shell_quote(&arg));
                }
                let wrapped = vec![
                    SERVER_OS_USER.into(),
                    "-s".into(),
                    "/bin/sh".into(),
                    "-c".into(),
                    line,
                ];
                (su.as_os_str().to_owned(), wrapped)
            }
        }
    }
}

/// Runs `command` to completion and returns its stdout. On failure the error names `what` and
/// carries everything the program printed, because that is where initdb and pg_ctl explain.
fn run(what: &str, command: &mut Command) -> io::Result<String> {
    let output = command.stdin(Stdio::null()).output().map_err(|error| {
        io::Error::new(
            error.kind(),
            format!("{what}: could not run {:?}: {error}", command.get_program()),
        )
    })?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        return Ok(stdout);
    }
    Err(io::Error::other(format!(
        "{what} failed ({}):\n{}\n{}",
        output.status,
        stdout.trim_end(),
        String::from_utf8_lossy(&output.stderr).trim_end()
    )))
}

/// Removes the `PG*` variables of the test's environment (`PGHOST`, `PGDATA`, `PGOPTIONS`, ...)
/// from a child's, so the cluster is configured only by what this module passes.
fn scrub_pg_env(command: &mut Command) {
    for (name, _) in env::vars_os() {
        if name.as_bytes().starts_with(b"PG") {
            command.env_remove(name);
        }
    }
}

/// The last lines the server wrote to `log` after `offset`, for error messages.
fn log_since(log: &Path, offset: u64) -> String {
    const TAIL_LINES: usize = 30;
    let Ok(bytes) = fs::read(log) else {
        return String::from("(no server log)");
    };
    let start = usize::try_from(offset).unwrap_or(0).min(bytes.len());
    let text = String::from_utf8_lossy(&bytes[start..]);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

/// A port that was free a moment ago: the OS picks it for a listener we close at once. Another
/// process may take it before the server binds it, which the start retries.
fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind((HOST, 0))?.local_addr()?.port())
}

/// Creates `pgengine-cluster-<pid>-<counter>-<nanos>` under the temp dir. `create_dir`, not
/// `create_dir_all`, so an existing directory is an error rather than silently shared.
fn create_unique_dir() -> io::Result<PathBuf> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let mut last_error = None;
    for _ in 0..10 {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.subsec_nanos());
        let name = format!(
            "pgengine-cluster-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = env::temp_dir().join(name);
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => last_error = Some(error),
            Err(error) => return Err(error),
        }
    }
    Err(last_error.unwrap_or_else(|| io::Error::other("could not create a unique directory")))
}

/// The server programs every cluster needs.
const SERVER_PROGRAMS: [&str; 3] = ["initdb", "pg_ctl", "postgres"];

fn has_server_programs(dir: &Path) -> bool {
    SERVER_PROGRAMS
        .iter()
        .all(|program| dir.join(program).is_file())
}

/// Checks a directory given by the user, rather than silently searching elsewhere.
fn checked_bin_dir(dir: &Path) -> io::Result<PathBuf> {
    if has_server_programs(dir) {
        Ok(dir.to_owned())
    } else {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{} does not contain all of {}",
                dir.display(),
                SERVER_PROGRAMS.join(", ")
            ),
        ))
    }
}

/// Finds the PostgreSQL binaries as the module documentation describes.
fn find_bin_dir() -> io::Result<PathBuf> {
    if let Some(dir) = env::var_os("PGENGINE_PG_BIN") {
        return checked_bin_dir(Path::new(&dir))
            .map_err(|error| io::Error::new(error.kind(), format!("PGENGINE_PG_BIN: {error}")));
    }
    let mut looked = vec![String::from("PGENGINE_PG_BIN (not set)")];

    for program in ["pg_ctl", "initdb"] {
        let Some(found) = find_program(program) else {
            looked.push(format!("{program} on PATH (not found)"));
            continue;
        };
        // Resolving symlinks turns /usr/local/bin/pg_ctl -> .../15/bin/pg_ctl into the real
        // directory, which also holds psql, pgbench and pg_basebackup.
        let real = fs::canonicalize(&found).unwrap_or(found);
        match real.parent() {
            Some(dir) if has_server_programs(dir) => return Ok(dir.to_owned()),
            _ => looked.push(format!(
                "{} (found on PATH, but not beside initdb and postgres)",
                real.display()
            )),
        }
    }

    let versions_dir = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(Vec<u32>, PathBuf)> = fs::read_dir(versions_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let version: Result<Vec<u32>, _> = name.to_str()?.split('.').map(str::parse).collect();
            Some((version.ok()?, entry.path().join("bin")))
        })
        .filter(|(_, bin)| has_server_programs(bin))
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    looked.push(format!("{}/*/bin (none complete)", versions_dir.display()));

    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "no PostgreSQL binaries ({}) found; looked at: {}. Set PGENGINE_PG_BIN to the \
             directory that holds them.",
            SERVER_PROGRAMS.join(", "),
            looked.join("; ")
        ),
    ))
}

/// The first `name` in `PATH`, then in the sbin directories root's `PATH` may lack
/// (`runuser` lives in /usr/sbin).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The `openssl` configuration for the test certificates: a CA, a server certificate valid
/// for `localhost` and `127.0.0.1`, and client certificates. rustls (webpki) insists on
/// version 3 certificates with the right basic constraints and a subjectAltName.
const OPENSSL_CONF: &str = "[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca_ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
authorityKeyIdentifier = keyid
[client_ext]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
";

/// Makes a self-signed certificate authority (`ca.crt`, `ca.key`) in `dir`, creating it.
/// Tests use a second one as the "wrong" CA a client must reject.
///
/// ```no_run
/// let dir = std::env::temp_dir().join("other-ca");
/// let ca = pgengine::testing::make_certificate_authority(&dir, "some other CA")?;
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn make_certificate_authority(dir: &Path, name: &str) -> io::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let conf = dir.join("openssl.cnf");
    fs::write(&conf, OPENSSL_CONF)?;
    let cert = dir.join("ca.crt");
    run(
        "openssl req (CA)",
        Command::new("openssl")
            .args(["req", "-x509", "-config"])
            .arg(&conf)
            .args(["-extensions", "ca_ext", "-newkey", "ec", "-pkeyopt"])
            .args([
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "3650",
                "-keyout",
            ])
            .arg(dir.join("ca.key"))
            .arg("-out")
            .arg(&cert)
            .arg("-subj")
            .arg(format!("/CN={name}")),
    )?;
    Ok(cert)
}

/// Makes the CA and the server's certificate and key in `dir`.
fn make_server_certificates(dir: &Path) -> io::Result<()> {
    make_certificate_authority(dir, "pgengine test CA")?;
    let key = dir.join("server.key");
    sign_certificate(
        dir,
        "/CN=localhost",
        "server_ext",
        &dir.join("server.crt"),
        &key,
    )?;
    // The server refuses a key that others can read.
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600))
}

/// Makes a key and a certificate for `subject` signed by the CA in `dir`.
fn sign_certificate(
    dir: &Path,
    subject: &str,
    extensions: &str,
    cert: &Path,
    key: &Path,
) -> io::Result<()> {
    let csr = cert.with_extension("csr");
    run(
        "openssl req",
        Command::new("openssl")
            .args(["req", "-new", "-config"])
            .arg(dir.join("openssl.cnf"))
            .args([
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
            ])
            .arg("-keyout")
            .arg(key)
            .arg("-out")
            .arg(&csr)
            .args(["-subj", subject]),
    )?;
    let serial = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64 | 1);
    run(
        "openssl x509",
        Command::new("openssl")
            .args(["x509", "-req", "-days", "3650", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(dir.join("ca.crt"))
            .arg("-CAkey")
            .arg(dir.join("ca.key"))
            .args(["-set_serial", &serial.to_string(), "-extfile"])
            .arg(dir.join("openssl.cnf"))
            .args(["-extensions", extensions, "-out"])
            .arg(cert),
    )?;
    fs::set_permissions(key, fs::Permissions::from_mode(0o600))
}

/// The lines added to `postgresql.conf`. Later lines win, so the builder's settings come last.
fn cluster_conf(socket_dir: &Path, port: u16, extra: &[(String, String)]) -> String {
    let socket_dir = socket_dir.to_string_lossy();
    let settings: [(&str, &str); 14] = [
        ("listen_addresses", HOST),
        ("port", &port.to_string()),
        ("unix_socket_directories", &socket_dir),
        // Speed over durability: the cluster is thrown away.
        ("fsync", "off"),
        ("synchronous_commit", "off"),
        ("full_page_writes", "off"),
        // Parallel tests each open their own connections and pools.
        ("max_connections", "200"),
        ("shared_buffers", "128MB"),
        ("log_min_messages", "warning"),
        ("logging_collector", "off"),
        // So standbys can be made with pg_basebackup.
        ("wal_level", "replica"),
        ("max_wal_senders", "10"),
        ("hot_standby", "on"),
        ("password_encryption", "scram-sha-256"),
    ];
    let mut conf = String::from("\n# Added by pgengine's TempCluster.\n");
    let extra = extra
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()));
    for (name, value) in settings.into_iter().chain(extra) {
        conf.push_str(&format!("{name} = {}\n", conf_quote(value)));
    }
    conf
}

/// The whole `pg_hba.conf`: the builder's lines first, because the first matching line wins.
fn hba_conf(extra: &[String]) -> String {
    let mut hba = String::from("# Written by pgengine's TempCluster.\n");
    for line in extra {
        hba.push_str(line);
        hba.push('\n');
    }
    hba.push_str(
        "local all         postgres_test              trust
host  all         postgres_test 127.0.0.1/32 trust
local all         user_password              password
host  all         user_password 127.0.0.1/32 password
local all         user_md5                   md5
host  all         user_md5      127.0.0.1/32 md5
local all         user_scram                 scram-sha-256
host  all         user_scram    127.0.0.1/32 scram-sha-256
local replication postgres_test              trust
host  replication postgres_test 127.0.0.1/32 trust
local all         all                        trust
host  all         all           127.0.0.1/32 trust
",
    );
    hba
}

fn tcp_url(host: &str, port: u16, user: &str, password: Option<&str>) -> String {
    let user = percent_encode(user);
    match password {
        Some(password) => format!(
            "postgres://{user}:{}@{host}:{port}/postgres",
            percent_encode(password)
        ),
        None => format!("postgres://{user}@{host}:{port}/postgres"),
    }
}

fn socket_conninfo(socket_dir: &str, port: u16, user: &str) -> String {
    format!(
        "host={} port={port} user={} dbname=postgres",
        conninfo_quote(socket_dir),
        conninfo_quote(user)
    )
}

/// Percent-encodes every byte but RFC 3986's unreserved characters, which is always safe in
/// the user and password parts of a URL.
fn percent_encode(text: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut encoded = String::with_capacity(text.len());
    for &byte in text.as_bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push('%');
            encoded.push(char::from(HEX[usize::from(byte >> 4)]));
            encoded.push(char::from(HEX[usize::from(byte & 0xF)]));
        }
    }
    encoded
}

/// Quotes a `key=value` value if it needs it: libpq's rule is single quotes, with `\'` and
/// `\\` inside (PostgreSQL docs, "Keyword/Value Connection Strings").
fn conninfo_quote(value: &str) -> String {
    let plain = !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\');
    if plain {
        return value.to_owned();
    }
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// A `postgresql.conf` string value: single quotes, a quote doubled, and backslashes doubled
/// because the configuration file treats them as escapes.
fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// An SQL string literal; backslashes are plain characters under the default
/// `standard_conforming_strings = on`.
fn sql_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Quotes a word for `sh`: single quotes keep everything literal but a single quote, which is
/// written as `'\''`.
fn shell_quote(word: &OsStr) -> OsString {
    let mut quoted = vec![b'\''];
    for &byte in word.as_bytes() {
        if byte == b'\'' {
            quoted.extend_from_slice(b"'\\''");
        } else {
            quoted.push(byte);
        }
    }
    quoted.push(b'\'');
    OsString::from_vec(quoted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;

    #[test]
    fn url_with_password_percent_encodes_the_password() {
        let url = tcp_url(HOST, 5433, "user_md5", Some(TempCluster::PASSWORD));
        assert_eq!(
            url,
            "postgres://user_md5:pgengine-secret%20%C3%BC@127.0.0.1:5433/postgres"
        );
        assert_eq!(
            tcp_url(HOST, 1, "a b@c:d/é", Some("p%w'd")),
            "postgres://a%20b%40c%3Ad%2F%C3%A9:p%25w%27d@127.0.0.1:1/postgres"
        );
        assert_eq!(
            tcp_url(HOST, 5433, TempCluster::SUPERUSER, None),
            "postgres://postgres_test@127.0.0.1:5433/postgres"
        );
    }

    #[test]
    fn socket_conninfo_quotes_only_when_needed() {
        assert_eq!(
            socket_conninfo("/tmp/x/sock", 5433, "postgres_test"),
            "host=/tmp/x/sock port=5433 user=postgres_test dbname=postgres"
        );
        assert_eq!(
            socket_conninfo("/tmp/my dir/it's", 1, ""),
            r"host='/tmp/my dir/it\'s' port=1 user='' dbname=postgres"
        );
    }

    #[test]
    fn quoting_for_conf_sql_and_shell() {
        assert_eq!(conf_quote(r"a'b\c"), r"'a''b\\c'");
        assert_eq!(sql_literal(r"a'b\c"), r"'a''b\c'");
        assert_eq!(shell_quote(OsStr::new("it's")), OsStr::new(r"'it'\''s'"));
    }

    /// The shared cluster runs queries and has every role, each with its password stored
    /// the way its authentication method needs: MD5 as `md5` of password and user name.
    #[test]
    fn shared_cluster_has_the_auth_roles() {
        let cluster = TempCluster::shared();
        assert_eq!(cluster.psql("select 1").unwrap(), "1");
        let roles = cluster
            .psql(&format!(
                "select rolname, case
                   when rolpassword like 'SCRAM-SHA-256$%' then 'scram'
                   when rolpassword = 'md5' || md5(convert_to({} || rolname, 'UTF8')) then 'md5'
                   else rolpassword end
                 from pg_authid where rolname like 'user\\_%' order by rolname",
                sql_literal(TempCluster::PASSWORD)
            ))
            .unwrap();
        assert_eq!(roles, "user_md5|md5\nuser_password|scram\nuser_scram|scram");
    }

    /// Every password role logs in with the password, over TCP and the socket, and not
    /// without it.
    #[test]
    fn password_roles_log_in_with_the_password() {
        let cluster = TempCluster::shared();
        let users = [
            TempCluster::PASSWORD_USER,
            TempCluster::MD5_USER,
            TempCluster::SCRAM_USER,
        ];
        let hosts = [OsStr::new(HOST), cluster.socket_dir().as_os_str()];
        for user in users {
            for host in hosts {
                let login = |password: &str| {
                    let output = cluster
                        .psql_command(host, user)
                        .args(["-X", "-A", "-t", "-c", "select current_user"])
                        .env("PGPASSWORD", password)
                        .output()
                        .unwrap();
                    (
                        output.status.success(),
                        String::from_utf8_lossy(&output.stdout).into_owned(),
                    )
                };
                assert_eq!(
                    login(TempCluster::PASSWORD),
                    (true, format!("{user}\n")),
                    "{user} via {host:?}"
                );
                assert!(
                    !login("wrong").0,
                    "{user} via {host:?} with a wrong password"
                );
            }
        }
    }

    #[test]
    fn stop_start_again_and_restart_keep_the_port() {
        let cluster = TempCluster::start().unwrap();
        let port = cluster.port();
        let before = cluster.psql("select pg_postmaster_start_time()").unwrap();

        cluster.stop().unwrap();
        cluster.stop().unwrap();
        assert!(cluster.psql("select 1").is_err());
        assert!(TcpStream::connect((HOST, port)).is_err());

        cluster.start_again().unwrap();
        assert_eq!(cluster.psql("select 1").unwrap(), "1");

        cluster.restart().unwrap();
        let after = cluster.psql("select pg_postmaster_start_time()").unwrap();
        assert_ne!(before, after);
        assert_eq!(cluster.port(), port);
        TcpStream::connect((HOST, port)).unwrap();
    }

    #[test]
    fn builder_options_apply_and_drop_removes_everything() {
        let cluster = TempCluster::builder()
            .setting("cluster_name", "it's me")
            .hba_line("host all postgres_test 127.0.0.1/32 reject")
            .start()
            .unwrap();
        assert_eq!(cluster.psql("show cluster_name").unwrap(), "it's me");
        let rejected = cluster
            .psql_command(OsStr::new(HOST), TempCluster::SUPERUSER)
            .args(["-X", "-c", "select 1"])
            .output()
            .unwrap();
        assert!(!rejected.status.success());
        assert!(String::from_utf8_lossy(&rejected.stderr).contains("rejects connection"));

        let root = cluster.root.clone();
        let port = cluster.port();
        let pid_file = fs::read_to_string(cluster.data_dir().join("postmaster.pid")).unwrap();
        let pid = pid_file.lines().next().unwrap().to_owned();
        drop(cluster);

        assert!(!root.exists());
        assert!(TcpStream::connect((HOST, port)).is_err());
        assert!(!is_running_process(&pid), "postmaster {pid} still runs");
    }

    /// Whether `pid` runs, read from Linux's /proc. A zombie counts as gone: the postmaster's
    /// parent (pg_ctl) is long gone, so it waits for init to reap it.
    fn is_running_process(pid: &str) -> bool {
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => false,
            Ok(stat) => !stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z')),
        }
    }

    #[test]
    fn a_taken_port_given_explicitly_is_reported() {
        let listener = TcpListener::bind((HOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let error = TempCluster::builder().port(port).start().unwrap_err();
        assert!(error.to_string().contains("could not bind"), "{error}");
    }
}
