//! The pool's seam to PostgreSQL: how to open a [`Connection`], and whether one that comes back
//! can be handed to someone else. The connection's own state decides: the transaction status
//! of its last ReadyForQuery, and whether it still owes responses.

use super::{Disposition, Manager};
use crate::config::Config;
use crate::connection::{Connection, TransactionStatus};
use crate::error::{Result, SqlState};

/// Opens connections with one [`Config`] for a [`super::Pool`].
#[derive(Debug, Clone)]
pub struct ConnectionManager {
    config: Config,
    statement_cache_capacity: Option<usize>,
    query_timeout: Option<std::time::Duration>,
    drain_timeout: std::time::Duration,
    cancel_abandoned: bool,
    busy_poll: Option<std::time::Duration>,
    reset_session: bool,
    /// Set once a connection found a transaction-mode pooler in front of the server; shared
    /// by every connection this manager (and its clones) opens.
    pooler_seen: std::sync::Arc<std::sync::atomic::AtomicBool>,
    after_connect: Option<AfterConnect>,
    log_queries: bool,
}

/// A hook run on every new connection before its first use, and again after the pool put
/// its session back as it began (see
/// [`EngineBuilder::after_connect`](crate::engine::EngineBuilder::after_connect)).
#[derive(Clone)]
pub struct AfterConnect(std::sync::Arc<HookFn>);

/// The hook's signature: it borrows the connection for as long as its future runs.
type HookFn =
    dyn for<'c> Fn(&'c mut Connection) -> futures::future::BoxFuture<'c, Result<()>> + Send + Sync;

impl AfterConnect {
    /// Wraps `hook`.
    pub fn new<F>(hook: F) -> AfterConnect
    where
        F: for<'c> Fn(&'c mut Connection) -> futures::future::BoxFuture<'c, Result<()>>
            + Send
            + Sync
            + 'static,
    {
        AfterConnect(std::sync::Arc::new(hook))
    }

    /// Runs the hook on `conn`; what it changed in the session is where the session begins.
    async fn run(&self, conn: &mut Connection) -> Result<()> {
        (self.0)(conn)
            .await
            .map_err(|e| e.context("the after_connect hook failed"))?;
        conn.settle_session();
        Ok(())
    }
}

impl std::fmt::Debug for AfterConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AfterConnect")
    }
}

impl ConnectionManager {
    /// A manager that opens connections with `config`.
    pub fn new(config: Config) -> ConnectionManager {
        ConnectionManager {
            config,
            statement_cache_capacity: None,
            query_timeout: None,
            drain_timeout: crate::connection::DEFAULT_DRAIN_TIMEOUT,
            cancel_abandoned: true,
            busy_poll: None,
            reset_session: true,
            pooler_seen: Default::default(),
            after_connect: None,
            log_queries: false,
        }
    }

    /// True for a connection whose server no longer meets `target_session_attrs=read-write`
    /// or `primary`: its server says (PostgreSQL 14+ reports both) that it is in hot standby
    /// now, or that sessions are read-only — a failover demoted it. Closed rather than given
    /// out again: a retry must reach the new primary.
    fn no_longer_qualifies(&self, conn: &Connection) -> bool {
        use crate::config::TargetSessionAttrs::{Primary, ReadWrite};
        // Runs on every return to the pool: the parameters are looked up only when asked.
        let standby = || conn.parameter("in_hot_standby") == Some("on");
        match self.config.get_target_session_attrs() {
            Primary => standby(),
            ReadWrite => standby() || conn.parameter("default_transaction_read_only") == Some("on"),
            _ => false,
        }
    }

    /// Logs every request of the connections it opens (an engine's `log_queries`).
    pub fn log_queries(mut self, on: bool) -> ConnectionManager {
        self.log_queries = on;
        self
    }

    /// Runs `hook` on every connection it opens, before its first use (see
    /// [`EngineBuilder::after_connect`](crate::engine::EngineBuilder::after_connect)).
    pub fn after_connect(mut self, hook: Option<AfterConnect>) -> ConnectionManager {
        self.after_connect = hook;
        self
    }

    /// Shares the "a pooler was found" flag of another manager (an engine's pooled and fresh
    /// connections share one).
    pub(crate) fn pooler_flag(
        mut self,
        flag: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> ConnectionManager {
        self.pooler_seen = flag;
        self
    }

    /// Sets whether a returned connection on which a command changed the session (`SET`,
    /// `LISTEN`, `DECLARE`) is put back as it began before it is reused (the default; see
    /// [`Connection::reset_session`]) or reused as it is.
    pub fn reset_session(mut self, reset: bool) -> ConnectionManager {
        self.reset_session = reset;
        self
    }

    /// Sets how long a returned connection with an abandoned request may take to become clean
    /// (see [`Connection::set_drain_timeout`]); after that it is closed instead.
    pub fn drain_timeout(mut self, timeout: std::time::Duration) -> ConnectionManager {
        self.drain_timeout = timeout;
        self
    }

    /// Sets whether a request abandoned by its caller (a dropped future) is cancelled on the
    /// server (see [`Connection::set_cancel_abandoned`]).
    pub fn cancel_abandoned(mut self, cancel: bool) -> ConnectionManager {
        self.cancel_abandoned = cancel;
        self
    }

    /// Sets how long every connection it opens asks the socket again for an answer before it
    /// sleeps (see [`Connection::set_busy_poll`]).
    pub fn busy_poll(mut self, limit: Option<std::time::Duration>) -> ConnectionManager {
        self.busy_poll = limit;
        self
    }

    /// Sets the query timeout of every connection it opens (see
    /// [`Connection::set_query_timeout`]).
    pub fn query_timeout(mut self, timeout: Option<std::time::Duration>) -> ConnectionManager {
        self.query_timeout = timeout;
        self
    }

    /// Sets the statement cache capacity of every connection it opens (0 for PgBouncer in
    /// transaction pooling mode).
    pub fn statement_cache_capacity(mut self, capacity: usize) -> ConnectionManager {
        self.statement_cache_capacity = Some(capacity);
        self
    }
}

impl Manager for ConnectionManager {
    /// Boxed: a checkout moves the resource several times (idle list, handoff, guard), and a
    /// connection is several hundred bytes; a box is one word.
    type Resource = Box<Connection>;

    async fn connect(&self) -> Result<Self::Resource> {
        let mut conn = Connection::connect(&self.config).await?;
        if let Some(capacity) = self.statement_cache_capacity {
            conn.set_statement_cache_capacity(capacity);
        }
        conn.set_query_timeout(self.query_timeout);
        conn.set_drain_timeout(self.drain_timeout);
        conn.set_cancel_abandoned(self.cancel_abandoned);
        conn.set_busy_poll(self.busy_poll);
        conn.share_pooler_flag(self.pooler_seen.clone());
        conn.set_log_queries(self.log_queries);
        if let Some(hook) = &self.after_connect {
            // A failure drops (closes) the connection: nobody gets one the hook did not set up.
            hook.run(&mut conn).await?;
        }
        Ok(Box::new(conn))
    }

    fn disposition(&self, conn: &Self::Resource) -> Disposition {
        if conn.is_broken() || self.no_longer_qualifies(conn) {
            Disposition::Discard
        } else if conn.is_busy()
            || conn.transaction_status() != TransactionStatus::Idle
            || (self.reset_session && conn.session_changed())
        {
            // A query's future was dropped half way (cancel it and read its end), a
            // transaction was left open or failed (roll it back), or the session was changed
            // (SET, LISTEN: put it back): clean it before reuse. A connection that cannot be
            // cleaned in time is discarded by `recycle`'s error.
            Disposition::Recycle
        } else {
            Disposition::Reuse
        }
    }

    async fn recycle(&self, conn: &mut Self::Resource) -> Result<()> {
        if !self.reset_session {
            return conn.reset().await;
        }
        let reset = conn.session_changed();
        conn.reset_session().await?;
        if reset && let Some(hook) = &self.after_connect {
            // The reset undid what the hook set up too: set it up again.
            hook.run(conn).await?;
        }
        Ok(())
    }

    async fn health_check(&self, conn: &mut Self::Resource) -> Result<()> {
        // An empty query: the cheapest full round trip (EmptyQueryResponse, ReadyForQuery).
        conn.simple_query("").await.map(|_| ())
    }

    fn is_alive(&self, conn: &mut Self::Resource) -> bool {
        conn.check_alive()
    }

    /// The server is out of connection slots (53300 too_many_connections, as when
    /// `max_connections` is reached) or of resources for another backend (53000).
    fn is_full(&self, error: &crate::Error) -> bool {
        matches!(
            error.code(),
            Some(&SqlState::TOO_MANY_CONNECTIONS | &SqlState::INSUFFICIENT_RESOURCES)
        )
    }

    async fn close(&self, conn: Self::Resource) {
        let _ = conn.close().await;
    }
}
