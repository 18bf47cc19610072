//! [`PostgresEngine`]: the object an application creates once and shares. It holds the
//! connection settings, the list of extensions the database needs, query logging switches,
//! named engines for read replicas (`extra_nodes`), and — once started — its own connection
//! pool. It mirrors Piccolo ORM's `PostgresEngine`: without a running pool a query opens a
//! fresh connection, as Piccolo does; with one, it borrows a pooled connection.
//!
//! ```no_run
//! # async fn demo() -> pgengine::Result<()> {
//! use pgengine::{PostgresEngine, pool::PoolOptions};
//!
//! let engine = PostgresEngine::builder("postgres://app@localhost/appdb".parse()?)
//!     .extensions(["uuid-ossp"])
//!     .log_queries(true)
//!     .build();
//! engine.prep_database().await?;
//! engine.start_connection_pool(PoolOptions::default().max_size(8)).await?;
//! let n: i64 = engine.query_one("SELECT count(*) FROM pg_class").await?.get(0);
//! engine.close_connection_pool().await?;
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::connection::{Connection, Lease, RowStream, TransactionStatus};
use crate::error::{Error, Result, TransactionError};
use crate::freshness::{Freshness, Node, NodeLink, Writes};
use crate::listen::{ListenOptions, Listener};
use crate::pool::{ConnectionManager, Manager, Pipeline, Pool, PoolOptions, PoolStats, Pooled};
use crate::query::ToQuery;
use crate::row::{Row, SimpleQueryResult};
use crate::sql::Control;
use crate::transaction::{PostgresTransaction, TransactionBuilder};

/// How long an engine without a pool waits for a fresh connection when it has no query
/// timeout of its own: as long as a pool waits for one by default
/// ([`PoolOptions::acquire_timeout`]).
pub const FRESH_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `close_connection_pool` waits for checked-out connections to come back.
const CLOSE_WAIT: Duration = Duration::from_secs(30);

pub use crate::connection::ServerVersion;

/// What an engine is built with, besides its connection settings and nodes.
#[derive(Debug, Clone, Default)]
struct Options {
    extensions: Vec<String>,
    log_queries: bool,
    log_responses: bool,
    statement_cache_capacity: Option<usize>,
    query_timeout: Option<Duration>,
    drain_timeout: Option<Duration>,
    busy_poll: Option<Duration>,
    keep_abandoned: bool,
    keep_session: bool,
    after_connect: Option<crate::pool::AfterConnect>,
}

struct Inner {
    config: Config,
    options: Options,
    nodes: BTreeMap<String, Arc<Node>>,
    /// Some node reads its primary's writes ([`Freshness::read_your_writes`]): commits ask
    /// their WAL position, and other writes are counted (see [`crate::freshness`]).
    tracks_writes: bool,
    writes: Arc<Writes>,
    /// The running pool and its pipeline, if any. Read on every query; written only by
    /// start/close.
    pool: RwLock<Option<RunningPool>>,
    /// Set once a connection of this engine found a transaction-mode pooler in front of the
    /// server: every connection of the engine then uses unnamed statements.
    pooler_seen: Arc<std::sync::atomic::AtomicBool>,
}

/// A started pool, with the pipeline that carries queries over it when pipelining is on.
type RunningPool = (Pool<ConnectionManager>, Option<Arc<Pipeline>>);

/// The engine: settings, extensions, logging, read-replica nodes and its own connection pool.
/// Cheap to clone; clones share everything, including the pool.
///
/// ```no_run
/// # async fn demo() -> pgengine::Result<()> {
/// use pgengine::PostgresEngine;
/// use pgengine::pool::PoolOptions;
///
/// let engine = PostgresEngine::from_url("postgres://app@localhost/appdb")?;
/// // Without a pool, each query opens a connection of its own.
/// engine.start_connection_pool(PoolOptions::default()).await?;
/// let tables: i64 = engine.query_one("SELECT count(*) FROM pg_tables").await?.get(0);
/// engine.close_connection_pool().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresEngine {
    inner: Arc<Inner>,
    /// On a handle from [`PostgresEngine::node`] whose node has a freshness rule: the rule,
    /// and the primary.
    link: Option<Arc<NodeLink>>,
}

impl fmt::Debug for PostgresEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresEngine")
            .field("config", &self.inner.config)
            .field("extensions", &self.inner.options.extensions)
            .field("nodes", &self.inner.nodes.keys().collect::<Vec<_>>())
            .field("pool", &self.pool_stats())
            .finish()
    }
}

/// Builds a [`PostgresEngine`].
///
/// ```no_run
/// # fn demo(config: pgengine::Config, replica: pgengine::Config) {
/// use std::time::Duration;
/// use pgengine::PostgresEngine;
///
/// let engine = PostgresEngine::builder(config)
///     .extensions(["uuid-ossp"])
///     .query_timeout(Duration::from_secs(5))
///     .extra_node("read_1", PostgresEngine::new(replica))
///     .build();
/// # }
/// ```
#[derive(Debug)]
pub struct EngineBuilder {
    config: Config,
    options: Options,
    nodes: BTreeMap<String, Arc<Node>>,
}

impl EngineBuilder {
    /// Extensions that [`PostgresEngine::prep_database`] creates if missing.
    pub fn extensions<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.options.extensions = names.into_iter().map(Into::into).collect();
        self
    }

    /// Logs every query of the engine's connections (target `pgengine::query`, info level),
    /// whatever sends it — the engine, a transaction, a savepoint, an `Atomic`'s statements, a
    /// batch, the pipelined pool, COPY: an id and the SQL when it goes out, then the duration
    /// and the row count, or the SQLSTATE and the error without the server's message.
    /// Parameter values are never logged. (Every query is also a `tracing` span, logged or
    /// not: see the crate's observability notes in the README.)
    pub fn log_queries(mut self, on: bool) -> Self {
        self.options.log_queries = on;
        self
    }

    /// Also logs each query's rows at debug level (target `pgengine::query`).
    pub fn log_responses(mut self, on: bool) -> Self {
        self.options.log_responses = on;
        self
    }

    /// Sets the prepared-statement cache capacity of every connection (0: the unnamed
    /// statement only). Behind a pooler in transaction or statement mode there is no need: the
    /// engine notices the first missing statement of its own and switches to unnamed
    /// statements by itself, running that query again; 0 does so from the start.
    pub fn statement_cache_capacity(mut self, capacity: usize) -> Self {
        self.options.statement_cache_capacity = Some(capacity);
        self
    }

    /// Limits how long each query may take; past it the statement is cancelled on the server
    /// and the query fails with a timeout error (see [`Connection::set_query_timeout`]).
    pub fn query_timeout(mut self, timeout: Duration) -> Self {
        self.options.query_timeout = Some(timeout);
        self
    }

    /// Sets how long a connection whose query was abandoned (its future dropped, or timed
    /// out) may take to bring the rest of the answer before it is closed instead of reused
    /// (default [`DEFAULT_DRAIN_TIMEOUT`](crate::connection::DEFAULT_DRAIN_TIMEOUT)).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.options.drain_timeout = Some(timeout);
        self
    }

    /// Makes every connection ask the socket for the server's answer again for up to `limit`
    /// before it sleeps (default: it sleeps at once). Trades a busy core and a runtime worker
    /// held for up to `limit` per answer for round trips about 3× as fast when client and
    /// server are on different cores; see [`Connection::set_busy_poll`] for when it pays and
    /// how it stops itself where it does not. 20–50 µs covers a point query's answer.
    pub fn busy_poll(mut self, limit: Duration) -> Self {
        self.options.busy_poll = Some(limit);
        self
    }

    /// Sets whether a query whose future is dropped before it finished is cancelled on the
    /// server (the default: `true`) or left to run to its end before the connection is
    /// reused. Either way the connection is drained to its ReadyForQuery before anyone else
    /// gets it.
    pub fn cancel_on_drop(mut self, cancel: bool) -> Self {
        self.options.keep_abandoned = !cancel;
        self
    }

    /// Sets whether a pooled connection on which a command changed the session (`SET`,
    /// `LISTEN`, `DECLARE`) is put back as it began before the next user gets it (the
    /// default: `true`, one more round trip only after such a command; see
    /// [`Connection::reset_session`]) or handed on as it is. Settings meant for every
    /// connection belong in the configuration (`options=-c …`), which a reset keeps.
    pub fn reset_session(mut self, reset: bool) -> Self {
        self.options.keep_session = !reset;
        self
    }

    /// Runs `hook` on every new connection of the engine (pooled, or fresh without a pool)
    /// before its first use: set a `search_path`, look up types, prepare statements. Its
    /// failure closes the connection, and the acquire that opened it fails with the hook's
    /// error. What it changes in the session is where the session begins: when the pool puts
    /// a session back as it began (after a `SET`, say, see
    /// [`reset_session`](Self::reset_session)), the hook runs again.
    ///
    /// ```no_run
    /// # async fn demo(config: pgengine::Config) -> pgengine::Result<()> {
    /// let engine = pgengine::PostgresEngine::builder(config)
    ///     .after_connect(|conn| {
    ///         Box::pin(async move {
    ///             conn.simple_query("SET search_path TO app, public").await?;
    ///             Ok(())
    ///         })
    ///     })
    ///     .build();
    /// # Ok(())
    /// # }
    /// ```
    pub fn after_connect<F>(mut self, hook: F) -> Self
    where
        F: for<'c> Fn(&'c mut Connection) -> futures::future::BoxFuture<'c, Result<()>>
            + Send
            + Sync
            + 'static,
    {
        self.options.after_connect = Some(crate::pool::AfterConnect::new(hook));
        self
    }

    /// Adds a named engine, typically for a read replica: `engine.node(name)` returns it.
    /// Reads through it go to it however far behind its primary it is; see
    /// [`extra_node_with`](Self::extra_node_with) for a freshness rule.
    pub fn extra_node(self, name: impl Into<String>, engine: PostgresEngine) -> Self {
        self.extra_node_with(name, engine, Freshness::any())
    }

    /// Adds a named engine for a read replica, with a rule for how fresh its reads must be
    /// (read your writes, or bounded lag; see [`crate::freshness`]). The rule applies to
    /// statements run through `engine.node(name)` outside a transaction (queries, streams,
    /// batches, DDL); a transaction on the node runs there as it is.
    pub fn extra_node_with(
        mut self,
        name: impl Into<String>,
        engine: PostgresEngine,
        freshness: Freshness,
    ) -> Self {
        self.nodes
            .insert(name.into(), Arc::new(Node::new(engine, freshness)));
        self
    }

    /// The engine.
    pub fn build(self) -> PostgresEngine {
        let tracks_writes = self
            .nodes
            .values()
            .any(|n| n.freshness().wants_commit_positions());
        PostgresEngine {
            link: None,
            inner: Arc::new(Inner {
                config: self.config,
                options: self.options,
                nodes: self.nodes,
                tracks_writes,
                writes: Default::default(),
                pool: RwLock::new(None),
                pooler_seen: Default::default(),
            }),
        }
    }
}

/// A connection borrowed by the engine for one use ([`PostgresEngine::acquire`]): from the
/// pool when it runs, otherwise a fresh one that is closed when dropped. It dereferences to
/// the [`Connection`].
pub struct EngineConnection {
    source: Source,
    /// Does its work when dropped.
    _note: WriteNote,
}

/// Counts a write of unknown position when a connection handed out by
/// [`PostgresEngine::acquire`] comes back, for read-your-writes nodes: whatever it did was
/// acknowledged by then.
struct WriteNote(Option<Arc<Writes>>);

impl Drop for WriteNote {
    fn drop(&mut self) {
        if let Some(writes) = self.0.take() {
            writes.wrote_somewhere();
        }
    }
}

/// Where an [`EngineConnection`] came from.
enum Source {
    /// From the engine's pool; goes back to it when dropped.
    Pooled(Pooled<ConnectionManager>),
    /// Opened for this use alone.
    Fresh(Box<Connection>),
}

impl EngineConnection {
    /// True for a connection from the engine's pool (it goes back there when dropped, made
    /// clean first if it needs to be); false for one opened for this use alone (closed when
    /// dropped).
    pub fn is_pooled(&self) -> bool {
        matches!(self.source, Source::Pooled(_))
    }

    /// Closes the connection instead of giving it back to the pool, as when its session holds
    /// something nobody else should inherit.
    pub fn discard(self) {
        if let Source::Pooled(pooled) = self.source {
            pooled.discard();
        }
    }
}

impl Deref for EngineConnection {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        match &self.source {
            Source::Pooled(p) => p,
            Source::Fresh(c) => c,
        }
    }
}

impl DerefMut for EngineConnection {
    fn deref_mut(&mut self) -> &mut Connection {
        match &mut self.source {
            Source::Pooled(p) => p,
            Source::Fresh(c) => c,
        }
    }
}

impl fmt::Debug for EngineConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (**self).fmt(f)
    }
}

impl PostgresEngine {
    /// An engine with default options.
    pub fn new(config: Config) -> PostgresEngine {
        PostgresEngine::builder(config).build()
    }

    /// An engine from a libpq URL or `key=value` string; `PG*` environment variables fill in
    /// what it leaves out.
    pub fn from_url(url: &str) -> Result<PostgresEngine> {
        Ok(PostgresEngine::new(
            Config::parse(url)?.with_env_defaults()?,
        ))
    }

    /// Starts building an engine.
    pub fn builder(config: Config) -> EngineBuilder {
        EngineBuilder {
            config,
            options: Options::default(),
            nodes: BTreeMap::new(),
        }
    }

    /// The connection settings.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The extensions [`PostgresEngine::prep_database`] creates.
    pub fn extensions(&self) -> &[String] {
        &self.inner.options.extensions
    }

    /// The engine of an extra node (a read replica) by name.
    pub fn node(&self, name: &str) -> Result<PostgresEngine> {
        if let Some(node) = self.inner.nodes.get(name) {
            let mut engine = node.engine.clone();
            if node.has_rule() {
                engine.link = Some(Arc::new(NodeLink {
                    name: name.into(),
                    node: node.clone(),
                    primary: PostgresEngine {
                        inner: self.inner.clone(),
                        link: None,
                    },
                }));
            }
            return Ok(engine);
        }
        Err({
            let known: Vec<&str> = self.inner.nodes.keys().map(String::as_str).collect();
            Error::config(format!(
                "no extra node named {name:?} (known nodes: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ))
        })
    }

    /// The names of the extra nodes.
    pub fn node_names(&self) -> impl Iterator<Item = &str> {
        self.inner.nodes.keys().map(String::as_str)
    }

    /// Borrows a connection: from the pool if one runs (within its `acquire_timeout`), else a
    /// fresh one, opened within the engine's query timeout, or [`FRESH_CONNECT_TIMEOUT`]
    /// without one (a server that accepts and never answers cannot hold a query forever).
    pub async fn acquire(&self) -> Result<EngineConnection> {
        self.checkout(true).await
    }

    /// [`acquire`](Self::acquire) for the engine's own use; `writes`: what the connection
    /// does may write, and is counted as a write when it comes back (for read-your-writes
    /// nodes; see [`crate::freshness`]).
    pub(crate) async fn checkout(&self, writes: bool) -> Result<EngineConnection> {
        let note =
            WriteNote((writes && self.inner.tracks_writes).then(|| self.inner.writes.clone()));
        let pool = self.current_pool();
        match pool {
            Some(pool) => {
                // The wait is told only in a query's trace: timed only for someone watching.
                let watching = crate::connection::watching(self.inner.options.log_queries);
                let started = watching.then(Instant::now);
                let mut pooled = pool.acquire().await?;
                if let Some(started) = started {
                    pooled.note_acquire_wait(started.elapsed());
                }
                Ok(EngineConnection {
                    source: Source::Pooled(pooled),
                    _note: note,
                })
            }
            None => {
                let limit = self
                    .inner
                    .options
                    .query_timeout
                    .unwrap_or(FRESH_CONNECT_TIMEOUT);
                let started = Instant::now();
                let mut conn = tokio::time::timeout(limit, self.manager().connect())
                    .await
                    .map_err(|_| {
                        Error::timeout(format!("opening a connection took longer than {limit:?}"))
                    })??;
                conn.note_acquire_wait(started.elapsed());
                Ok(EngineConnection {
                    source: Source::Fresh(conn),
                    _note: note,
                })
            }
        }
    }

    /// Listens to `channel` (`LISTEN`) on a connection of its own, never one of the pool's,
    /// opened with the engine's settings; the [`Listener`] is a stream of notifications that
    /// reconnects and re-LISTENs after a connection loss, with [`ListenOptions::default`].
    ///
    /// ```no_run
    /// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
    /// use futures::StreamExt;
    /// let mut listener = engine.listen("orders").await?;
    /// engine.execute(("SELECT pg_notify('orders', $1)", ("42",))).await?;
    /// let event = listener.next().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn listen(&self, channel: &str) -> Result<Listener> {
        self.listen_with(channel, ListenOptions::default()).await
    }

    /// [`listen`](Self::listen) with its own reconnect options.
    ///
    /// ```no_run
    /// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
    /// use std::time::Duration;
    /// let options = pgengine::ListenOptions::default().max_backoff(Duration::from_secs(1));
    /// let listener = engine.listen_with("orders", options).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn listen_with(&self, channel: &str, options: ListenOptions) -> Result<Listener> {
        Listener::open(self.manager(), channel, options).await
    }

    /// How this engine opens connections, pooled or fresh: one place for the settings.
    fn manager(&self) -> ConnectionManager {
        let options = &self.inner.options;
        let mut manager = ConnectionManager::new(self.inner.config.clone())
            .query_timeout(options.query_timeout)
            .pooler_flag(self.inner.pooler_seen.clone());
        if let Some(capacity) = options.statement_cache_capacity {
            manager = manager.statement_cache_capacity(capacity);
        }
        if let Some(limit) = options.drain_timeout {
            manager = manager.drain_timeout(limit);
        }
        manager = manager.busy_poll(options.busy_poll);
        manager
            .log_queries(options.log_queries)
            .cancel_abandoned(!options.keep_abandoned)
            .reset_session(!options.keep_session)
            .after_connect(options.after_connect.clone())
    }

    fn current_pool(&self) -> Option<Pool<ConnectionManager>> {
        let slot = self.inner.pool.read().unwrap_or_else(|p| p.into_inner());
        slot.as_ref().map(|(pool, _)| pool.clone())
    }

    fn current_pipeline(&self) -> Option<Arc<Pipeline>> {
        let slot = self.inner.pool.read().unwrap_or_else(|p| p.into_inner());
        slot.as_ref().and_then(|(_, pipeline)| pipeline.clone())
    }

    /// Runs a query outside any transaction: pipelined when the pool pipelines and the query
    /// can be, otherwise on a connection of its own.
    ///
    /// Transaction control is refused (each statement runs on whichever connection is free,
    /// so it cannot do what it says), and a statement that changes the session never shares
    /// a pipelined connection: it runs on one of its own, which the pool puts back as it
    /// began before anyone else uses it.
    async fn run_outside(&self, query: &dyn ToQuery) -> Result<(Vec<Row>, u64)> {
        let effects = crate::sql::statement_effects(query.sql());
        if let Some(control) = effects.control {
            return Err(control_outside_scope(control));
        }
        if let Some(primary) = self.fresh_enough().await? {
            return Box::pin(primary.run_outside(query)).await;
        }
        if self.inner.tracks_writes && !crate::freshness::reads_only(query.sql()) {
            // Counted once acknowledged (or failed: a lost answer may have committed).
            let result = self.run_outside_here(query, effects).await;
            self.inner.writes.wrote_somewhere();
            return result;
        }
        self.run_outside_here(query, effects).await
    }

    async fn run_outside_here(
        &self,
        query: &dyn ToQuery,
        effects: crate::sql::StatementEffects,
    ) -> Result<(Vec<Row>, u64)> {
        if effects.is_plain()
            && let Some(pipeline) = self.current_pipeline()
            && let Some(result) = pipeline.run(query).await?
        {
            return Ok(result);
        }
        self.checkout(false).await?.query_counted(query).await
    }

    /// Runs SQL with the simple protocol outside any transaction, on a connection of its
    /// own. Several statements may open and close a transaction block of their own
    /// (`BEGIN; …; COMMIT`) — they share the connection —, but text that would end a block it
    /// did not open, or leave one open, is refused before anything is sent. If a block is
    /// open when the text has run all the same, it is rolled back and the error says so.
    async fn run_simple_outside(&self, sql: &str) -> Result<Vec<SimpleQueryResult>> {
        if let Some(control) = crate::sql::effects(sql).unbalanced() {
            return Err(control_outside_scope(control));
        }
        if let Some(primary) = self.fresh_enough().await? {
            return Box::pin(primary.run_simple_outside(sql)).await;
        }
        let mut conn = self.checkout(true).await?;
        let results = conn.simple_query(sql).await?;
        if conn.transaction_status() != TransactionStatus::Idle {
            let undone = conn.reset().await;
            return Err(Error::transaction(
                TransactionError::NotCommitted,
                format!(
                    "the SQL left a transaction block open; it was {}: nothing of it was \
                     committed. Use engine.transaction() for a transaction",
                    if undone.is_ok() {
                        "rolled back"
                    } else {
                        "ended with the connection"
                    }
                ),
            ));
        }
        Ok(results)
    }

    /// The server's version as the number `major.minor` (12.4, 9.4): Piccolo's `get_version`,
    /// kept for code written against it. As a number it cannot tell 15.20 from 15.2, nor
    /// order 15.10 after 15.9: compare [`server_version`](Self::server_version)'s fields
    /// instead.
    ///
    /// ```no_run
    /// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
    /// if engine.get_version().await? < 13.0 {
    ///     println!("no pg_current_xact_id() here");
    /// }
    /// let v = engine.server_version().await?;
    /// let has_merge = (v.major, v.minor) >= (15, 0);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn get_version(&self) -> Result<f64> {
        Ok(self.server_version().await?.as_f64())
    }

    /// The server's full version.
    pub async fn server_version(&self) -> Result<ServerVersion> {
        let conn = self.checkout(false).await?;
        let text = conn
            .parameter("server_version")
            .ok_or_else(|| Error::protocol("the server did not report server_version"))?;
        ServerVersion::parse(text)
            .ok_or_else(|| Error::protocol(format!("unreadable server_version {text:?}")))
    }

    /// Creates the engine's extensions if they are missing (`CREATE EXTENSION IF NOT EXISTS`,
    /// each name quoted as an identifier). A missing privilege is logged as a warning, as
    /// Piccolo does; any other error is returned.
    pub async fn prep_database(&self) -> Result<()> {
        let mut conn = self.checkout(true).await?;
        for name in &self.inner.options.extensions {
            let sql = format!(
                "CREATE EXTENSION IF NOT EXISTS {}",
                postgres_protocol::escape::escape_identifier(name)
            );
            match conn.simple_query(&sql).await {
                Ok(_) => {}
                Err(e) if e.code() == Some(&crate::SqlState::INSUFFICIENT_PRIVILEGE) => {
                    tracing::warn!(
                        target: "pgengine::engine",
                        extension = name.as_str(),
                        "could not create extension (insufficient privilege): {e}"
                    );
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Starts the engine's connection pool. Starting it while one runs only logs a warning.
    pub async fn start_connection_pool(&self, options: PoolOptions) -> Result<()> {
        let mut slot = self.inner.pool.write().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            tracing::warn!(target: "pgengine::engine", "a connection pool is already running");
            return Ok(());
        }
        let (pipelines, depth) = (options.pipeline, options.pipeline_depth);
        let pool = Pool::new(self.manager(), options);
        let pipeline =
            (pipelines > 0).then(|| Arc::new(Pipeline::start(pool.clone(), pipelines, depth)));
        *slot = Some((pool, pipeline));
        Ok(())
    }

    /// Closes the pool: new queries use fresh connections again, waiters fail, idle
    /// connections close, and checked-out ones are closed as they come back (waiting up to
    /// 30 seconds). Closing when no pool runs only logs a warning.
    pub async fn close_connection_pool(&self) -> Result<()> {
        let pool = self
            .inner
            .pool
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        // Dropping the pipeline ends its drivers once their queues are empty.
        match pool.map(|(pool, _)| pool) {
            None => {
                tracing::warn!(target: "pgengine::engine", "no connection pool is running");
                Ok(())
            }
            Some(pool) => {
                let left = pool.close(CLOSE_WAIT).await;
                if left > 0 {
                    tracing::warn!(
                        target: "pgengine::engine",
                        "{left} connections were still in use when the pool closed; \
                         they will be closed when returned"
                    );
                }
                Ok(())
            }
        }
    }

    /// The pool's statistics, if a pool runs.
    pub fn pool_stats(&self) -> Option<PoolStats> {
        self.current_pool().map(|p| p.stats())
    }

    /// An [`Atomic`](crate::atomic::Atomic): queries added one by one, run all or nothing.
    pub fn atomic<'q>(&self) -> crate::atomic::Atomic<'q> {
        crate::atomic::Atomic::new(self.clone())
    }

    /// Fetches a large result in batches of `batch_size` rows through a portal (see
    /// [`AsyncBatch`](crate::batch::AsyncBatch)); await the builder to start it. Inside a
    /// transaction scope on this task, it runs in that transaction.
    pub fn batch<'q>(
        &self,
        query: impl ToQuery + Send + 'q,
        batch_size: usize,
    ) -> crate::batch::BatchBuilder<'q> {
        crate::batch::BatchBuilder::new(self.clone(), query, batch_size)
    }

    /// Starts building a transaction (see [`TransactionBuilder`]).
    pub fn transaction(&self) -> TransactionBuilder {
        TransactionBuilder::new(self.clone())
    }

    /// Begins a transaction with default options (explicit use: commit or roll it back).
    pub async fn begin(&self) -> Result<PostgresTransaction> {
        self.transaction().begin().await
    }

    /// True while the current task runs inside [`TransactionBuilder::run`] for this engine.
    pub fn transaction_exists(&self) -> bool {
        matches!(self.route(), Route::Transaction(_))
    }

    /// The cancel token of the transaction this task is running on this engine, to hand to
    /// another task that may need to stop its statement; `None` outside a transaction (a
    /// pooled query's connection is only known while it runs: acquire one with
    /// [`acquire`](Self::acquire) and use its [`cancel_token`](Connection::cancel_token)).
    pub fn cancel_token(&self) -> Option<crate::connection::CancelToken> {
        match self.route() {
            Route::Transaction(tx) => Some(tx.cancel_token()),
            Route::Outside => None,
        }
    }

    /// True if `other` is this engine (or a clone of it).
    pub(crate) fn same_as(&self, other: &PostgresEngine) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Where a statement sent through this engine runs: the one place that decides it. Inside
    /// a transaction scope of this engine on the current task, in that transaction (Piccolo
    /// keeps the current transaction on the engine); otherwise outside any, on whichever
    /// connection the engine gives it.
    pub(crate) fn route(&self) -> Route {
        match crate::transaction::current(self) {
            Some(tx) => Route::Transaction(tx),
            None => Route::Outside,
        }
    }

    /// A connection for a row stream or a batch, by [`route`](Self::route): the
    /// transaction's, or one of its own.
    pub(crate) async fn lease(&self) -> Result<Lease<'static>> {
        match self.route() {
            Route::Transaction(tx) => tx.lease().await,
            Route::Outside => {
                if let Some(primary) = self.fresh_enough().await? {
                    return Box::pin(primary.lease()).await;
                }
                Ok(Lease::Held(Box::new(self.checkout(false).await?)))
            }
        }
    }

    /// For a node with a freshness rule: the primary to read from instead, if the node is
    /// not fresh enough (see [`crate::freshness`]).
    async fn fresh_enough(&self) -> Result<Option<PostgresEngine>> {
        match &self.link {
            Some(link) => link.choose().await,
            None => Ok(None),
        }
    }

    /// What this engine knows of its writes, for read-your-writes nodes.
    pub(crate) fn writes(&self) -> &Writes {
        &self.inner.writes
    }

    /// True when some node reads this engine's writes: commits then ask their WAL position.
    pub(crate) fn tracks_writes(&self) -> bool {
        self.inner.tracks_writes
    }

    /// The one value `sql` returns, asked on a connection of this engine within `limit`
    /// (connecting included: a server that does not answer fails it with a timeout, and the
    /// abandoned question is cancelled before the connection is used again).
    pub(crate) async fn ask_one(&self, sql: &str, limit: Duration) -> Result<Option<String>> {
        let ask = async {
            let mut conn = self.checkout(false).await?;
            let results = conn.simple_query(sql).await?;
            Ok(results
                .first()
                .and_then(|r| r.rows().first())
                .and_then(|row| row.get(0))
                .map(str::to_owned))
        };
        tokio::time::timeout(limit, ask)
            .await
            .map_err(|_| Error::timeout(format!("{sql:?} was not answered within {limit:?}")))?
    }

    /// Runs a query and returns a stream of its rows, read as it is polled: memory stays
    /// bounded however many rows there are. Outside a transaction the stream holds a
    /// connection of its own until it is dropped (a dropped stream's rest is read away before
    /// the connection is used again); inside a transaction scope on this task it runs in that
    /// transaction (see [`PostgresTransaction::query_stream`]).
    ///
    /// ```no_run
    /// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
    /// use futures::TryStreamExt;
    /// let mut rows = engine.query_stream("SELECT generate_series(1, 1000000)").await?;
    /// let mut sum = 0i64;
    /// while let Some(row) = rows.try_next().await? {
    ///     sum += i64::from(row.get::<_, i32>(0));
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn query_stream(&self, query: impl ToQuery) -> Result<RowStream<'static>> {
        match self.route() {
            Route::Transaction(tx) => tx.query_stream(query).await,
            Route::Outside => {
                if let Some(control) = crate::sql::statement_effects(query.sql()).control {
                    return Err(control_outside_scope(control));
                }
                if let Some(primary) = self.fresh_enough().await? {
                    return Box::pin(primary.query_stream(query)).await;
                }
                let writes = !crate::freshness::reads_only(query.sql());
                let conn = Lease::Held(Box::new(self.checkout(writes).await?));
                RowStream::start(conn, &query).await
            }
        }
    }

    /// Runs a query and returns its rows. Inside a transaction scope on this task, it runs in
    /// that transaction.
    pub async fn query(&self, query: impl ToQuery) -> Result<Vec<Row>> {
        let result = match self.route() {
            Route::Transaction(tx) => tx.query(&query).await,
            Route::Outside => self.run_outside(&query).await.map(|(rows, _)| rows),
        };
        if let (true, Ok(rows)) = (self.inner.options.log_responses, &result) {
            for row in rows {
                tracing::debug!(target: "pgengine::query", "{row:?}");
            }
        }
        result
    }

    /// Runs a query: Piccolo's name for [`query`](Self::query), kept for code written
    /// against it.
    pub async fn run_querystring(&self, query: impl ToQuery) -> Result<Vec<Row>> {
        self.query(query).await
    }

    /// Runs a query that must return exactly one row.
    pub async fn query_one(&self, query: impl ToQuery) -> Result<Row> {
        let mut rows = self.query(query).await?;
        match rows.len() {
            1 => Ok(rows.pop().expect("one row")),
            n => Err(Error::row_count(format!(
                "the query returned {n} rows, not exactly one"
            ))),
        }
    }

    /// Runs a query that must return at most one row.
    pub async fn query_opt(&self, query: impl ToQuery) -> Result<Option<Row>> {
        let mut rows = self.query(query).await?;
        match rows.len() {
            0 | 1 => Ok(rows.pop()),
            n => Err(Error::row_count(format!(
                "the query returned {n} rows, not at most one"
            ))),
        }
    }

    /// Runs a statement and returns the number of rows it affected.
    pub async fn execute(&self, query: impl ToQuery) -> Result<u64> {
        match self.route() {
            Route::Transaction(tx) => tx.execute(&query).await,
            Route::Outside => self.run_outside(&query).await.map(|(_, n)| n),
        }
    }

    /// Runs DDL (or any SQL without parameters), several statements allowed, with the simple
    /// query protocol.
    pub async fn run_ddl(&self, sql: &str) -> Result<Vec<SimpleQueryResult>> {
        match self.route() {
            Route::Transaction(tx) => tx.simple_query(sql).await,
            Route::Outside => self.run_simple_outside(sql).await,
        }
    }
}

/// Where a statement sent through an engine runs (see [`PostgresEngine::route`]).
pub(crate) enum Route {
    /// In the transaction scope of the current task.
    Transaction(PostgresTransaction),
    /// Outside any transaction: pipelined, on a pooled connection, or on a fresh one.
    Outside,
}

/// Transaction control sent through the engine outside a transaction scope: each statement
/// runs on whichever connection is free (or a fresh one), so it cannot do what it says.
fn control_outside_scope(control: Control) -> Error {
    let keyword = control.keyword();
    let why = match control {
        Control::Begin => format!(
            "{keyword} would open a transaction block that the statements after it are not \
             sure to join (each runs on whichever connection is free), and that would be \
             rolled back unseen"
        ),
        Control::Commit | Control::Rollback | Control::PrepareTransaction => format!(
            "no transaction is open on this task, so {keyword} would end nothing (an earlier \
             BEGIN through the engine ran on a connection of its own)"
        ),
        Control::Savepoint | Control::Release | Control::RollbackTo => {
            format!("{keyword} belongs to a transaction, and none is open on this task")
        }
    };
    Error::transaction(
        TransactionError::ControlStatement,
        format!(
            "{keyword} through the engine outside a transaction was refused (nothing was \
             sent): {why}. Use engine.transaction().run(..) or engine.begin(), and the \
             transaction's savepoint methods"
        ),
    )
}
