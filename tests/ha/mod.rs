//! A real high-availability cluster on this machine, for the failover tests: one etcd, and two
//! Patroni nodes that each manage a PostgreSQL 15 server (Debian's `patroni`, `etcd-server` and
//! `postgresql-15` packages). Patroni bootstraps the first server with `initdb`, makes the
//! second a streaming replica of it with `pg_basebackup`, and decides who is the primary
//! through a leader key in etcd that the primary's Patroni renews every loop.
//!
//! Everything lives in one temporary directory and listens on 127.0.0.1 ports picked free at
//! start. Replication is synchronous (Patroni's `synchronous_mode`): a commit is acknowledged
//! only once the replica has it, so after any failover every acknowledged write must be on the
//! new primary. Without it, a crash could lose acknowledged writes by design of asynchronous
//! replication, and the tests could not tell that from a driver bug.
//!
//! # Who runs what
//!
//! `initdb` and `postgres` refuse to run as root, and Patroni starts them itself, so when the
//! tests run as root (CI) Patroni runs as the OS user `postgres` and the directory is handed to
//! that user — as `pgengine::testing::TempCluster` does for its servers. Patroni and etcd are
//! spawned directly with that user's uid and gid rather than through `runuser`, so the process
//! we hold is Patroni itself and can be killed by its pid; `patronictl` and etcd need no
//! particular user and run as ourselves.
//!
//! # Cleaning up
//!
//! Dropping a [`PatroniCluster`] — at the end of a test or while a panic unwinds — kills the
//! Patroni processes first (so none of them restarts its server), stops each server in
//! `immediate` mode, removes the shared memory a crashed server leaves behind, stops etcd and
//! removes the directory. A process killed outright drops nothing, so a watchdog (a small `sh`
//! in its own process group, waiting for end of file on a pipe only we hold) does the same when
//! the test process ends any other way.
//!
//! Every wait has a deadline: a cluster that does not come up is an error carrying the tail of
//! the logs, never a hang.

use std::env;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Debian 12's PostgreSQL, the version its Patroni package is built and tested with.
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The OS user that runs Patroni and PostgreSQL when the tests run as root.
const SERVER_OS_USER: &str = "postgres";

/// The database superuser; also used for replication (trusted, on loopback only).
pub const SUPERUSER: &str = "postgres";

/// Seconds the leader key lives in etcd without renewal: after a node dies, the replica takes
/// over at most this long later. Patroni wants `loop_wait + 2 * retry_timeout <= ttl`, so a
/// leader that cannot reach etcd demotes itself before its key can expire.
const TTL_SECS: u64 = 10;
/// Seconds between two runs of each Patroni's loop (renewing the key, checking its server).
const LOOP_WAIT_SECS: u64 = 1;
/// Seconds Patroni keeps retrying etcd (and its own server) before giving up on an operation.
const RETRY_TIMEOUT_SECS: u64 = 3;

/// How long a new cluster may take to have a primary and a synchronous streaming replica:
/// `initdb`, a base backup and two server starts, on a busy machine.
const START_DEADLINE: Duration = Duration::from_secs(120);

/// The two Patroni nodes' names.
const NODE_NAMES: [&str; 2] = ["node1", "node2"];

/// What the harness needs installed: found by [`Tools::find`].
#[derive(Debug, Clone)]
pub struct Tools {
    etcd: PathBuf,
    patroni: PathBuf,
    patronictl: PathBuf,
    pg_bin: PathBuf,
}

impl Tools {
    /// Finds etcd, Patroni, `patronictl` and PostgreSQL 15's server programs, or says what is
    /// missing and which packages bring it.
    pub fn find() -> Result<Tools, String> {
        let mut missing = Vec::new();
        let mut program = |name: &str, package: &str| {
            let found = find_program(name);
            if found.is_none() {
                missing.push(format!("{name} (package {package})"));
            }
            found.unwrap_or_default()
        };
        let etcd = program("etcd", "etcd-server");
        let patroni = program("patroni", "patroni");
        let patronictl = program("patronictl", "patroni");
        let pg_bin = PathBuf::from(PG_BIN);
        for name in ["initdb", "pg_ctl", "postgres", "pg_basebackup", "pg_rewind"] {
            if !pg_bin.join(name).is_file() {
                missing.push(format!("{PG_BIN}/{name} (package postgresql-15)"));
            }
        }
        if missing.is_empty() {
            Ok(Tools {
                etcd,
                patroni,
                patronictl,
                pg_bin,
            })
        } else {
            Err(format!("not installed: {}", missing.join(", ")))
        }
    }
}

/// A member of the cluster as Patroni reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Patroni's name for the node (`node1`, `node2`).
    pub name: String,
    /// The port its PostgreSQL server listens on, on 127.0.0.1.
    pub port: u16,
}

/// One Patroni node: its directory, ports and process.
#[derive(Debug)]
struct Node {
    name: &'static str,
    dir: PathBuf,
    pg_port: u16,
    api_port: u16,
    /// Patroni itself; `None` once killed.
    patroni: Option<Child>,
    /// Killed by [`PatroniCluster::crash_leader`] (which also leaves a file `crashed` in its
    /// directory, for the watchdog): at cleanup its server gets no signal, since its pid may
    /// be another process's by then; only its shared memory is removed.
    crashed: bool,
}

impl Node {
    fn config_file(&self) -> PathBuf {
        self.dir.join("patroni.yml")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.join("patroni.log")
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("patroni.pid")
    }
}

/// A running etcd and two Patroni nodes, one primary and one synchronous streaming replica.
/// See the [module documentation](self).
#[derive(Debug)]
pub struct PatroniCluster {
    root: PathBuf,
    tools: Tools,
    /// The uid and gid to run Patroni as, when we are root.
    server_user: Option<(u32, u32)>,
    etcd: Option<Child>,
    etcd_port: u16,
    /// Behind a lock because `crash_leader` takes a node's process while others read ports.
    nodes: Mutex<Vec<Node>>,
    /// Holds our end of the pipe the watchdog waits on.
    watchdog: Option<(Child, ChildStdin)>,
}

impl PatroniCluster {
    /// Starts etcd and both nodes and waits until one node is the primary and the other a
    /// synchronous replica streaming from it. Blocks, for up to two minutes.
    pub fn start(tools: Tools) -> io::Result<PatroniCluster> {
        let root = create_unique_dir()?;
        let server_user = server_user()?;
        let [etcd_port, etcd_peer_port, pg1, pg2, api1, api2] = free_ports()?;
        let node = |name, pg_port, api_port| Node {
            name,
            dir: root.join(name),
            pg_port,
            api_port,
            patroni: None,
            crashed: false,
        };
        // From here on, dropping `cluster` on an error stops whatever runs and removes `root`.
        let mut cluster = PatroniCluster {
            nodes: Mutex::new(vec![
                node(NODE_NAMES[0], pg1, api1),
                node(NODE_NAMES[1], pg2, api2),
            ]),
            root,
            tools,
            server_user,
            etcd: None,
            etcd_port,
            watchdog: None,
        };
        cluster.watchdog = Some(cluster.spawn_watchdog()?);
        cluster.start_etcd(etcd_peer_port)?;
        {
            let mut nodes = cluster.lock_nodes();
            for node in nodes.iter() {
                fs::create_dir(&node.dir)?;
                fs::write(node.config_file(), cluster.patroni_config(node))?;
            }
            if let Some((uid, gid)) = cluster.server_user {
                for node in nodes.iter() {
                    chown_tree(&node.dir, uid, gid)?;
                }
            }
            // Both at once: the first to take etcd's initialize key runs initdb, the other
            // waits for it and makes itself a replica with a base backup.
            for node in nodes.iter_mut() {
                node.patroni = Some(cluster.spawn_patroni(node)?);
            }
        }
        cluster.wait_until_replicating(START_DEADLINE)?;
        Ok(cluster)
    }

    /// The PostgreSQL ports of both nodes, in node order.
    pub fn pg_ports(&self) -> Vec<u16> {
        self.lock_nodes().iter().map(|node| node.pg_port).collect()
    }

    /// A URL naming both servers, for libpq-style multi-host connection settings; `params`
    /// goes after the `?`.
    pub fn url(&self, params: &str) -> String {
        let hosts: Vec<String> = self
            .pg_ports()
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        format!(
            "postgres://{SUPERUSER}@{}/postgres?{params}",
            hosts.join(",")
        )
    }

    /// A URL for one server.
    pub fn url_of(&self, member: &Member) -> String {
        format!(
            "postgres://{SUPERUSER}@127.0.0.1:{}/postgres?connect_timeout=5",
            member.port
        )
    }

    /// The node that holds the leader key now, as any live node's Patroni reports it.
    pub fn leader(&self) -> io::Result<Member> {
        let members = self.members()?;
        members
            .iter()
            .find(|m| m.role == "leader" && m.state == "running")
            .map(|m| m.member.clone())
            .ok_or_else(|| other(format!("no running leader: {members:?}")))
    }

    /// Waits until a node other than `previous` is the leader and its server accepts writes
    /// (Patroni's `GET /primary` says 200 only then), and returns it.
    pub fn wait_for_new_leader(&self, previous: &Member, limit: Duration) -> io::Result<Member> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(leader) = self.leader()
                && leader != *previous
                && matches!(self.api_get(&leader, "/primary"), Ok((200, _)))
            {
                return Ok(leader);
            }
            self.check_deadline(deadline, "a new leader")?;
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A planned switchover to the replica, as an operator does it: `patronictl switchover`.
    /// Patroni stops the primary cleanly (its last WAL reaches the replica), promotes the
    /// replica and restarts the old primary as a replica of it. Returns the old leader once
    /// `patronictl` reports success; the new one may take a moment longer to accept writes
    /// (see [`wait_for_new_leader`](Self::wait_for_new_leader)).
    pub fn switchover(&self) -> io::Result<Member> {
        let leader = self.leader()?;
        let (config, candidate) = {
            let nodes = self.lock_nodes();
            let candidate = nodes
                .iter()
                .find(|node| node.name != leader.name)
                .ok_or_else(|| other("no node to switch over to".into()))?;
            (candidate.config_file(), candidate.name)
        };
        let output = self.root.join("patronictl-switchover.log");
        let mut command = Command::new(&self.tools.patronictl);
        command
            .arg("-c")
            .arg(config)
            .args(["switchover", "--leader", &leader.name])
            .args(["--candidate", candidate, "--force"]);
        let status = run_with_deadline(command, &output, Duration::from_secs(60))?;
        let text = fs::read_to_string(&output).unwrap_or_default();
        if !status.success() || !text.contains("Successfully switched over") {
            return Err(other(format!(
                "patronictl switchover failed ({status}):\n{text}"
            )));
        }
        Ok(leader)
    }

    /// Crashes the leader's node: kills its Patroni and its server's postmaster with SIGKILL, in
    /// that order and at once, and leaves both dead. Returns the crashed leader.
    ///
    /// The whole node goes, not just the server: if only the postmaster died, the Patroni
    /// beside it would restart it in place (crash recovery on the same node, not a failover)
    /// or, told to prefer failing over, hand the leader key over itself. With both gone
    /// nobody releases the key: the replica must see it expire in etcd (up to [`TTL_SECS`])
    /// and promote itself, as when a machine dies. The postmaster's children exit when they
    /// notice it gone, which closes their client sockets; a machine that lost power would
    /// leave them open instead, which a single machine cannot reproduce.
    pub fn crash_leader(&self) -> io::Result<Member> {
        let leader = self.leader()?;
        let mut nodes = self.lock_nodes();
        let node = nodes
            .iter_mut()
            .find(|node| node.name == leader.name)
            .ok_or_else(|| other(format!("the leader {} is not ours", leader.name)))?;
        // Read first, so the two kills follow each other with nothing in between.
        let postmaster = postmaster_pid(&node.data_dir())?;
        let mut patroni = node
            .patroni
            .take()
            .ok_or_else(|| other(format!("{} has no Patroni running", node.name)))?;
        node.crashed = true;
        patroni.kill()?;
        kill(postmaster, libc::SIGKILL)?;
        patroni.wait()?;
        // The watchdog must not signal whatever processes take those pids next.
        let _ = fs::remove_file(node.pid_file());
        fs::write(node.dir.join("crashed"), "")?;
        Ok(leader)
    }

    /// What the cluster's logs say at the end, for a failure message.
    pub fn log_tails(&self) -> String {
        let mut text = format!(
            "--- etcd\n{}",
            tail(&self.root.join("etcd").join("etcd.log"), 20)
        );
        for node in self.lock_nodes().iter() {
            text.push_str(&format!(
                "\n--- {} (Patroni and PostgreSQL)\n{}",
                node.name,
                tail(&node.log_file(), 40)
            ));
        }
        text
    }

    /// Waits until a leader runs and the other node is its synchronous standby, streaming.
    fn wait_until_replicating(&self, limit: Duration) -> io::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if self.is_replicating() {
                return Ok(());
            }
            self.check_deadline(deadline, "a leader with a streaming synchronous replica")?;
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn is_replicating(&self) -> bool {
        let Ok(members) = self.members() else {
            return false;
        };
        let sync_standby = members
            .iter()
            .any(|m| m.role == "sync_standby" && m.state == "running");
        let Some(leader) = members.iter().find(|m| m.role == "leader") else {
            return false;
        };
        // The leader's own view of its walsenders (pg_stat_replication).
        let Ok((200, body)) = self.api_get(&leader.member, "/patroni") else {
            return false;
        };
        let streaming = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|status| status.get("replication")?.as_array().cloned())
            .is_some_and(|senders| {
                senders.iter().any(|s| {
                    s.get("state").and_then(|v| v.as_str()) == Some("streaming")
                        && s.get("sync_state").and_then(|v| v.as_str()) == Some("sync")
                })
            });
        sync_standby && streaming
    }

    /// The members as the first live node's Patroni reports them (`GET /cluster`).
    fn members(&self) -> io::Result<Vec<MemberStatus>> {
        let api_ports: Vec<u16> = self
            .lock_nodes()
            .iter()
            .filter(|node| node.patroni.is_some())
            .map(|node| node.api_port)
            .collect();
        let mut last_error = other("no Patroni node is running".into());
        for port in api_ports {
            match http_get(port, "/cluster") {
                Ok((200, body)) => return parse_members(&body),
                Ok((status, body)) => {
                    last_error = other(format!("GET /cluster answered {status}: {body}"))
                }
                Err(error) => last_error = error,
            }
        }
        Err(last_error)
    }

    /// `GET path` on the REST API of `member`'s Patroni.
    fn api_get(&self, member: &Member, path: &str) -> io::Result<(u16, String)> {
        let port = self
            .lock_nodes()
            .iter()
            .find(|node| node.name == member.name)
            .map(|node| node.api_port)
            .ok_or_else(|| other(format!("no node {}", member.name)))?;
        http_get(port, path)
    }

    /// An error with the logs' tails once `deadline` passed, or if a process we started ended.
    fn check_deadline(&self, deadline: Instant, what: &str) -> io::Result<()> {
        let mut ended = Vec::new();
        for node in self.lock_nodes().iter_mut() {
            if let Some(Some(status)) = node.patroni.as_mut().map(Child::try_wait).transpose()? {
                ended.push(format!("Patroni of {} exited ({status})", node.name));
            }
        }
        if Instant::now() < deadline && ended.is_empty() {
            return Ok(());
        }
        let why = if ended.is_empty() {
            "timed out".to_owned()
        } else {
            ended.join(", ")
        };
        Err(other(format!(
            "waiting for {what}: {why}\n{}",
            self.log_tails()
        )))
    }

    fn lock_nodes(&self) -> std::sync::MutexGuard<'_, Vec<Node>> {
        // A panic while holding the lock leaves the nodes as they were: still worth cleaning up.
        self.nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn start_etcd(&mut self, peer_port: u16) -> io::Result<()> {
        let dir = self.root.join("etcd");
        fs::create_dir(&dir)?;
        let client_url = format!("http://127.0.0.1:{}", self.etcd_port);
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut command = Command::new(&self.tools.etcd);
        command
            .args(["--name", "pgengine"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("pgengine={peer_url}")]);
        let etcd = spawn_logged(command, &dir.join("etcd.log"), &dir)?;
        fs::write(self.root.join("etcd.pid"), etcd.id().to_string())?;
        self.etcd = Some(etcd);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, body)) = http_get(self.etcd_port, "/health")
                && body.contains("true")
            {
                return Ok(());
            }
            if let Some(status) = self
                .etcd
                .as_mut()
                .map(Child::try_wait)
                .transpose()?
                .flatten()
            {
                return Err(other(format!(
                    "etcd exited ({status}):\n{}",
                    tail(&dir.join("etcd.log"), 20)
                )));
            }
            if Instant::now() > deadline {
                return Err(other(format!(
                    "etcd not healthy after 30 s:\n{}",
                    tail(&dir.join("etcd.log"), 20)
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn spawn_patroni(&self, node: &Node) -> io::Result<Child> {
        let mut command = Command::new(&self.tools.patroni);
        command.arg(node.config_file());
        if let Some((uid, gid)) = self.server_user {
            command.uid(uid).gid(gid);
        }
        let child = spawn_logged(command, &node.log_file(), &node.dir)?;
        fs::write(node.pid_file(), child.id().to_string())?;
        Ok(child)
    }

    /// A node's Patroni configuration (YAML; every value is a plain number, word or path).
    fn patroni_config(&self, node: &Node) -> String {
        let etcd_port = self.etcd_port;
        let (name, pg_port, api_port) = (node.name, node.pg_port, node.api_port);
        let dir = node.dir.display();
        let pg_bin = self.tools.pg_bin.display();
        // `fsync: off` because the crash here kills processes, not the kernel: what the
        // server wrote is in the page cache and survives, so syncing it only slows the
        // machine shared with other tests. `full_page_writes` stays on, as pg_rewind needs.
        format!(
            "\
scope: pgengine-ha
namespace: /pgengine/
name: {name}
log:
  level: INFO
restapi:
  listen: 127.0.0.1:{api_port}
  connect_address: 127.0.0.1:{api_port}
etcd3:
  hosts: 127.0.0.1:{etcd_port}
bootstrap:
  dcs:
    ttl: {TTL_SECS}
    loop_wait: {LOOP_WAIT_SECS}
    retry_timeout: {RETRY_TIMEOUT_SECS}
    synchronous_mode: true
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        wal_level: replica
        hot_standby: 'on'
        wal_log_hints: 'on'
        max_wal_senders: 10
        max_replication_slots: 10
        fsync: 'off'
  initdb:
  - encoding: UTF8
  - auth: trust
  pg_hba:
  - local all all trust
  - host all all 127.0.0.1/32 trust
  - host replication all 127.0.0.1/32 trust
postgresql:
  listen: 127.0.0.1:{pg_port}
  connect_address: 127.0.0.1:{pg_port}
  data_dir: {dir}/data
  bin_dir: {pg_bin}
  pgpass: {dir}/pgpass
  authentication:
    superuser:
      username: {SUPERUSER}
    replication:
      username: {SUPERUSER}
  parameters:
    unix_socket_directories: {dir}
  basebackup:
  - checkpoint: fast
watchdog:
  mode: 'off'
"
        )
    }

    /// A `sh` that waits for end of file on its stdin — when our process ends, however it
    /// ends — and then does what `Drop` does. Killed by `Drop` first.
    fn spawn_watchdog(&self) -> io::Result<(Child, ChildStdin)> {
        let root = shell_quote(&self.root);
        let pg_ctl = shell_quote(&self.tools.pg_bin.join("pg_ctl"));
        let as_server_user = if self.server_user.is_some() {
            format!("runuser -u {SERVER_OS_USER} -- ")
        } else {
            String::new()
        };
        // A crashed node's postmaster is gone: its pid may be anyone's by now, so it gets no
        // signal, only its shared memory removed (see `remove_shared_memory`).
        let script = format!(
            "read -r _\n\
             for f in {root}/etcd.pid {root}/*/patroni.pid; do\n  \
               [ -f \"$f\" ] && kill -9 \"$(cat \"$f\")\"\n\
             done\n\
             for d in {root}/*/data; do\n  \
               if [ -f \"$d/../crashed\" ]; then\n    \
                 ipcrm -m \"$(sed -n 7p \"$d/postmaster.pid\" | awk '{{print $2}}')\"\n  \
               elif [ -f \"$d/postmaster.pid\" ]; then\n    \
                 {as_server_user}{pg_ctl} stop -D \"$d\" -m immediate -t 30\n  \
               fi\n\
             done\n\
             rm -rf {root}\n"
        );
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own group, so a Ctrl-C meant for the tests does not end it first.
            .process_group(0)
            .spawn()?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| other("the watchdog has no stdin".into()))?;
        Ok((child, stdin))
    }
}

impl Drop for PatroniCluster {
    /// Stops everything and removes the directory. Failures are printed: drop cannot return
    /// them, and a failed cleanup must not hide the test's own result.
    fn drop(&mut self) {
        if let Some((mut watchdog, stdin)) = self.watchdog.take() {
            // Killed before its stdin closes, so it cannot race us.
            let _ = watchdog.kill();
            let _ = watchdog.wait();
            drop(stdin);
        }
        let pg_ctl = self.tools.pg_bin.join("pg_ctl");
        let server_user = self.server_user;
        for node in self.lock_nodes().iter_mut() {
            // Patroni first: it would restart a server stopped under it.
            if let Some(mut patroni) = node.patroni.take() {
                let _ = patroni.kill();
                let _ = patroni.wait();
            }
            let data_dir = node.data_dir();
            if node.crashed {
                // Its postmaster's pid may be anyone's by now: no signal, no pg_ctl.
                remove_shared_memory(&data_dir);
            } else if data_dir.join("postmaster.pid").exists() {
                let mut command = Command::new(&pg_ctl);
                command
                    .arg("stop")
                    .arg("-D")
                    .arg(&data_dir)
                    .args(["-m", "immediate", "-t", "30"]);
                if let Some((uid, gid)) = server_user {
                    command.uid(uid).gid(gid);
                }
                let log = node.dir.join("pg_ctl-stop.log");
                match run_with_deadline(command, &log, Duration::from_secs(40)) {
                    Ok(status) if status.success() => {}
                    Ok(status) => eprintln!(
                        "PatroniCluster: pg_ctl stop of {} failed ({status}): {}",
                        node.name,
                        tail(&log, 5)
                    ),
                    Err(error) => eprintln!(
                        "PatroniCluster: could not stop the server of {}: {error}",
                        node.name
                    ),
                }
            }
        }
        if let Some(mut etcd) = self.etcd.take() {
            let _ = etcd.kill();
            let _ = etcd.wait();
        }
        if let Err(error) = fs::remove_dir_all(&self.root)
            && error.kind() != io::ErrorKind::NotFound
        {
            eprintln!(
                "PatroniCluster: could not remove {}: {error}",
                self.root.display()
            );
        }
    }
}

/// A member's line of `GET /cluster`.
#[derive(Debug)]
struct MemberStatus {
    member: Member,
    /// `leader`, `sync_standby` or `replica`.
    role: String,
    /// `running`, `starting`, `stopped`, `crashed`, …
    state: String,
}

fn parse_members(body: &str) -> io::Result<Vec<MemberStatus>> {
    let cluster: serde_json::Value = serde_json::from_str(body)
        .map_err(|error| other(format!("GET /cluster: {error}: {body}")))?;
    let text = |m: &serde_json::Value, key: &str| {
        m.get(key)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    Ok(cluster
        .get("members")
        .and_then(|m| m.as_array())
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|m| {
            Some(MemberStatus {
                member: Member {
                    name: text(m, "name"),
                    port: u16::try_from(m.get("port")?.as_u64()?).ok()?,
                },
                role: text(m, "role"),
                state: text(m, "state"),
            })
        })
        .collect())
}

/// `GET path` over HTTP/1.0 on 127.0.0.1 (so the answer is never chunked and ends with the
/// connection): Patroni's and etcd's APIs need nothing more.
fn http_get(port: u16, path: &str) -> io::Result<(u16, String)> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| other(format!("GET {path}: no end of headers in {response:?}")))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| other(format!("GET {path}: no status in {head:?}")))?;
    Ok((status, body.to_owned()))
}

/// The uid and gid of the server's OS user when we are root; `None` when we are not.
fn server_user() -> io::Result<Option<(u32, u32)>> {
    // SAFETY: getuid has no preconditions and cannot fail.
    if unsafe { libc::getuid() } != 0 {
        return Ok(None);
    }
    let id = |flag: &str| -> io::Result<u32> {
        let output = Command::new("id").arg(flag).arg(SERVER_OS_USER).output()?;
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .map_err(|_| {
                other(format!(
                    "running as root, but PostgreSQL refuses to run as root and there is no OS \
                     user `{SERVER_OS_USER}` to run it as (id {flag} {SERVER_OS_USER}: {})",
                    String::from_utf8_lossy(&output.stderr).trim()
                ))
            })
    };
    Ok(Some((id("-u")?, id("-g")?)))
}

/// Spawns `command` with stdout and stderr appended to `log`, in `dir`, with an environment of
/// its own: no `PG*` or `PATRONI_*` variable of ours can change what it does, and a UTF-8
/// locale keeps Python's command-line library content.
fn spawn_logged(mut command: Command, log: &Path, dir: &Path) -> io::Result<Child> {
    let log = fs::OpenOptions::new().create(true).append(true).open(log)?;
    command
        .current_dir(dir)
        .env_clear()
        .env(
            "PATH",
            env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
        )
        .env("HOME", dir)
        .env("LC_ALL", "C.UTF-8")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own group: a Ctrl-C meant for the tests leaves the cleanup to the watchdog.
        .process_group(0);
    command.spawn()
}

/// Runs `command` to its end with its output in `log`, killing it after `limit`.
fn run_with_deadline(command: Command, log: &Path, limit: Duration) -> io::Result<ExitStatus> {
    let dir = log.parent().unwrap_or(Path::new("/"));
    let mut child = spawn_logged(command, log, dir)?;
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("still running after {limit:?}: {}", tail(log, 20)),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The postmaster's pid: the first line of `postmaster.pid`.
fn postmaster_pid(data_dir: &Path) -> io::Result<i32> {
    let text = fs::read_to_string(data_dir.join("postmaster.pid"))?;
    text.lines()
        .next()
        .and_then(|line| line.trim().parse().ok())
        .ok_or_else(|| other(format!("no pid in {}/postmaster.pid", data_dir.display())))
}

/// Removes the System V shared memory segment of a server killed with SIGKILL, which never
/// removes it itself: `postmaster.pid` names it on its seventh line ("key id", the layout in
/// PostgreSQL's `miscadmin.h`).
fn remove_shared_memory(data_dir: &Path) {
    let Ok(text) = fs::read_to_string(data_dir.join("postmaster.pid")) else {
        return;
    };
    let id = text
        .lines()
        .nth(6)
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|id| id.parse::<i32>().ok());
    if let Some(id) = id {
        // SAFETY: IPC_RMID takes no buffer; an id that is already gone just fails.
        unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
    }
}

fn kill(pid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: kill has no memory preconditions; the pid is one we started or read from a pid
    // file of our own cluster.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Six distinct free ports on 127.0.0.1: all bound at once so they differ, then released for
/// the servers. Another process may take one in between; unlikely, and it fails the start
/// loudly rather than silently.
fn free_ports() -> io::Result<[u16; 6]> {
    let listeners = (0..6)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<io::Result<Vec<_>>>()?;
    let mut ports = [0; 6];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

/// `pgengine-ha-<pid>-<nanos>` under the temp dir; `create_dir` so it is never shared.
fn create_unique_dir() -> io::Result<PathBuf> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.subsec_nanos());
    let dir = env::temp_dir().join(format!("pgengine-ha-{}-{nanos}", std::process::id()));
    fs::create_dir(&dir)?;
    Ok(dir)
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    if path.is_dir() {
        for entry in fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/bin", "/usr/sbin", "/bin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

/// The last `lines` lines of a log file, or why it cannot be read.
fn tail(path: &Path, lines: usize) -> String {
    match fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(error) => format!("({}: {error})", path.display()),
    }
}

fn other(message: String) -> io::Error {
    io::Error::other(message)
}
