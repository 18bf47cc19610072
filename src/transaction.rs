//! [`PostgresTransaction`]: a transaction on one connection, as a state machine driven by the
//! server's ReadyForQuery status after every reply.
//!
//! ```text
//!            query ok (status T)                 commit / rollback
//!   Active ───────────────────▶ Active ───────────────────────────▶ Finished
//!     │  query fails (status E)    ▲                                    ▲
//!     ▼                            │ rollback_to(savepoint)             │ rollback
//!   Failed ────────────────────────┘────────────────────────────────────┘
//! ```
//!
//! In `Failed`, every query but a rollback is refused without a round trip, and `commit`
//! returns an error saying nothing was saved — never a silent commit of a failed block. A
//! statement that timed out, or whose future was dropped before its answer came, also moves
//! the transaction to `Failed`, even if the server finished it after all: its caller was
//! told it did not happen, so the block must not commit it behind their back.
//! Dropping a transaction that was neither committed nor rolled back rolls it back: the
//! connection goes back to the pool, which rolls back before anyone else gets it (or closes
//! it). For what the transaction's methods do not offer, COPY above all,
//! [`PostgresTransaction::connection`] lends its connection; the state follows what happened
//! on it.
//!
//! Two ways to use it:
//!
//! ```no_run
//! # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
//! // Scoped: commits when the closure returns Ok, rolls back on Err (or panic). Queries made
//! // through `engine` on this task inside the closure run in the transaction too.
//! let same = engine.clone();
//! engine.transaction().run(|tx| async move {
//!     tx.execute(("INSERT INTO band (name) VALUES ($1)", ("Pythonistas",))).await?;
//!     assert!(same.transaction_exists());
//!     same.execute("INSERT INTO band (name) VALUES ('also in the transaction')").await?;
//!     Ok(())
//! }).await?;
//!
//! // Explicit.
//! let tx = engine.begin().await?;
//! tx.execute("DELETE FROM band").await?;
//! tx.rollback().await?;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use tokio::sync::{Mutex, MutexGuard, OwnedMutexGuard};

use crate::batch::{AsyncBatch, check_batch};
use crate::connection::{CommitAsk, CommitReply, Lease, RowStream, TransactionStatus};
use crate::engine::{EngineConnection, PostgresEngine};
use crate::error::{Error, Result, TransactionError};
use crate::freshness::POSITION_QUERY;
use crate::outcome::{COMMIT_ID_QUERY, CommitId, resolve_lost_commit};
use crate::query::ToQuery;
use crate::row::{Row, SimpleQueryResult};
use crate::savepoint::{Savepoint, SavepointName, check_savepoint_name, savepoint_command};

tokio::task_local! {
    /// The transaction of the current task, set by [`TransactionBuilder::run`]
    /// (Piccolo keeps it in a contextvar).
    static CURRENT: PostgresTransaction;
}

/// The transaction running in the current task's scope for `engine`, if any.
pub(crate) fn current(engine: &PostgresEngine) -> Option<PostgresTransaction> {
    CURRENT
        .try_with(|tx| tx.engine().same_as(engine).then(|| tx.clone()))
        .ok()
        .flatten()
        .filter(|tx| !tx.is_finished())
}

/// The state of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TxState {
    /// Open, and every query so far succeeded.
    Active,
    /// A query failed; only a rollback (or rollback to a savepoint) can follow.
    Failed,
    /// Committed.
    Committed,
    /// Rolled back.
    RolledBack,
    /// Ended by SQL the transaction did not issue itself (`COMMIT` in a query string).
    Ended,
}

impl TxState {
    /// The state after a reply whose ReadyForQuery said `status`.
    fn after_reply(self, status: TransactionStatus) -> TxState {
        match status {
            TransactionStatus::InTransaction => TxState::Active,
            TransactionStatus::Failed => TxState::Failed,
            TransactionStatus::Idle => match self {
                TxState::Committed | TxState::RolledBack => self,
                _ => TxState::Ended,
            },
        }
    }

    fn is_finished(self) -> bool {
        matches!(
            self,
            TxState::Committed | TxState::RolledBack | TxState::Ended
        )
    }
}

/// The isolation level of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IsolationLevel {
    /// `READ UNCOMMITTED` (PostgreSQL treats it as READ COMMITTED).
    ReadUncommitted,
    /// `READ COMMITTED`, the default.
    ReadCommitted,
    /// `REPEATABLE READ`.
    RepeatableRead,
    /// `SERIALIZABLE`.
    Serializable,
}

impl IsolationLevel {
    fn sql(self) -> &'static str {
        match self {
            IsolationLevel::ReadUncommitted => "READ UNCOMMITTED",
            IsolationLevel::ReadCommitted => "READ COMMITTED",
            IsolationLevel::RepeatableRead => "REPEATABLE READ",
            IsolationLevel::Serializable => "SERIALIZABLE",
        }
    }
}

/// Options of a transaction, from [`PostgresEngine::transaction`].
#[derive(Debug, Clone)]
pub struct TransactionBuilder {
    engine: PostgresEngine,
    allow_nested: bool,
    isolation: Option<IsolationLevel>,
    read_only: bool,
    deferrable: bool,
    track_commit: bool,
}

impl TransactionBuilder {
    pub(crate) fn new(engine: PostgresEngine) -> TransactionBuilder {
        TransactionBuilder {
            engine,
            allow_nested: true,
            isolation: None,
            read_only: false,
            deferrable: false,
            track_commit: false,
        }
    }

    /// Whether a transaction started while the task already has one joins it (the default)
    /// or is refused with [`TransactionError::Nested`].
    pub fn allow_nested(mut self, allow: bool) -> Self {
        self.allow_nested = allow;
        self
    }

    /// The isolation level.
    pub fn isolation_level(mut self, level: IsolationLevel) -> Self {
        self.isolation = Some(level);
        self
    }

    /// A read-only transaction.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// A deferrable transaction (meaningful with SERIALIZABLE READ ONLY).
    pub fn deferrable(mut self, deferrable: bool) -> Self {
        self.deferrable = deferrable;
        self
    }

    /// Whether [`commit`](PostgresTransaction::commit) finds out, when the connection is lost
    /// before COMMIT's answer arrives, whether the transaction committed (on by default with
    /// [`retry`](Self::retry), which needs it; PostgreSQL 13+).
    ///
    /// The transaction learns its id in the round trip of the COMMIT itself: a query sent in
    /// the same write just before it, whose answer the server sends before it starts the
    /// COMMIT (`pg_current_xact_id_if_assigned()`: a transaction that wrote nothing has none,
    /// and a lost COMMIT of it changes nothing). After a loss, a new connection asks
    /// `pg_xact_status` of that id: committed is success; aborted is
    /// [`TransactionError::NotCommitted`] (nothing was saved); still in progress after a few
    /// seconds, or anything that cannot be told for sure, is
    /// [`TransactionError::OutcomeUnknown`]. The server's answer is trusted only if it comes
    /// from the same server process tree the transaction ran on, with no crash restart in
    /// between: a crash can lose a COMMIT and hand its id to a later transaction, and after a
    /// failover the id means something else. Then the outcome is reported unknown.
    ///
    /// Without it, a COMMIT whose answer was lost is also reported as
    /// [`TransactionError::OutcomeUnknown`] — never as "nothing was saved".
    pub fn track_commit(mut self, track: bool) -> Self {
        self.track_commit = track;
        self
    }

    /// Tries the transaction again, by `policy`, when it fails in a way a new attempt can fix
    /// (a serialization failure, a deadlock, a connection lost before the COMMIT, …; see
    /// [`retry`](crate::retry)). Turns on [`track_commit`](Self::track_commit).
    pub fn retry(self, policy: crate::retry::RetryPolicy) -> crate::retry::RetryingTransaction {
        crate::retry::RetryingTransaction::new(self, policy)
    }

    /// The engine the transaction will run on.
    pub(crate) fn engine(&self) -> &PostgresEngine {
        &self.engine
    }

    /// The `BEGIN` statement for these options.
    fn begin_sql(&self) -> String {
        let mut sql = String::from("BEGIN");
        if let Some(level) = self.isolation {
            sql.push_str(" ISOLATION LEVEL ");
            sql.push_str(level.sql());
        }
        if self.read_only {
            sql.push_str(" READ ONLY");
        }
        if self.deferrable {
            sql.push_str(" DEFERRABLE");
        }
        sql
    }

    /// Begins the transaction and returns it (explicit use: `commit` or `rollback` it; dropping
    /// it rolls back). On a task already in a transaction of this engine, returns a handle
    /// joined to that one, or [`TransactionError::Nested`] with `allow_nested(false)`.
    pub async fn begin(self) -> Result<PostgresTransaction> {
        if let crate::engine::Route::Transaction(outer) = self.engine.route() {
            if !self.allow_nested {
                return Err(Error::transaction(
                    TransactionError::Nested,
                    "a transaction is already active on this task",
                ));
            }
            return Ok(PostgresTransaction {
                shared: outer.shared,
                nested: true,
            });
        }
        let span = tracing::info_span!(
            target: "pgengine::transaction",
            "transaction",
            otel.name = "transaction",
            db.system.name = "postgresql",
            pgengine.outcome = tracing::field::Empty,
        );
        let mut conn = self.engine.acquire().await?;
        // The transaction's statements are traced as its children while it holds the
        // connection (see `TxConn`'s Drop).
        conn.set_trace_parent(Some(span.clone()));
        conn.command(&[&self.begin_sql()]).await?;
        let state = TxState::Active.after_reply(conn.transaction_status());
        Ok(PostgresTransaction {
            shared: Arc::new(Shared {
                span,
                engine: self.engine,
                cancel: conn.cancel_token(),
                conn: Arc::new(Mutex::new(TxConn {
                    held: Some(conn),
                    stats_at_end: Default::default(),
                    state,
                    savepoints: Vec::new(),
                })),
                next_savepoint: AtomicU32::new(1),
                lent: AtomicBool::new(false),
                track_commit: self.track_commit,
            }),
            nested: false,
        })
    }

    /// Runs `f` in the transaction: commits when it returns `Ok`, rolls back when it returns
    /// `Err` — the caller's own error type, any `E: From<pgengine::Error>`, returned unchanged
    /// — and rolls back when it panics, then lets the panic go on. While `f` runs, queries
    /// made through the engine on this task use the transaction. A nested transaction neither
    /// begins nor commits: the outermost one decides.
    ///
    /// ```no_run
    /// # async fn demo(engine: pgengine::PostgresEngine) {
    /// #[derive(Debug)]
    /// enum AppError {
    ///     Db(pgengine::Error),
    ///     OutOfStock,
    /// }
    /// impl From<pgengine::Error> for AppError {
    ///     fn from(e: pgengine::Error) -> Self {
    ///         AppError::Db(e)
    ///     }
    /// }
    ///
    /// let result: Result<(), AppError> = engine
    ///     .transaction()
    ///     .run(|tx| async move {
    ///         let left: i32 = tx.query_one("SELECT stock FROM item WHERE id = 1").await?.get(0);
    ///         if left == 0 {
    ///             return Err(AppError::OutOfStock); // rolled back, returned as it is
    ///         }
    ///         tx.execute("UPDATE item SET stock = stock - 1 WHERE id = 1").await?;
    ///         Ok(())
    ///     })
    ///     .await;
    /// # }
    /// ```
    pub async fn run<F, Fut, T, E>(self, f: F) -> std::result::Result<T, E>
    where
        F: FnOnce(PostgresTransaction) -> Fut,
        Fut: Future<Output = std::result::Result<T, E>>,
        E: From<Error>,
    {
        use futures::FutureExt;
        let tx = self.begin().await?;
        let outcome = std::panic::AssertUnwindSafe(CURRENT.scope(tx.clone(), f(tx.clone())))
            .catch_unwind()
            .await;
        if tx.nested {
            // The outermost transaction decides, and sees the panic go by.
            return outcome.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        }
        match outcome {
            Ok(Ok(value)) => match tx.state().await {
                TxState::Active => Ok(tx.commit().await.map(|()| value)?),
                TxState::Failed => Err(tx.rollback_failed().await.into()),
                // Committed or rolled back by hand inside the closure.
                _ => Ok(value),
            },
            Ok(Err(e)) => {
                tx.roll_back_after("an error").await;
                Err(e)
            }
            Err(panic) => {
                tx.roll_back_after("a panic").await;
                std::panic::resume_unwind(panic)
            }
        }
    }
}

/// A transaction's connection, borrowed from it with [`PostgresTransaction::connection`]; the
/// transaction's state follows what happened on it when it is dropped.
pub struct TxConnection<'a> {
    guard: MutexGuard<'a, TxConn>,
    lent: &'a AtomicBool,
}

impl std::ops::Deref for TxConnection<'_> {
    type Target = crate::Connection;

    fn deref(&self) -> &crate::Connection {
        self.guard.conn_ref()
    }
}

impl std::ops::DerefMut for TxConnection<'_> {
    fn deref_mut(&mut self) -> &mut crate::Connection {
        self.guard.conn()
    }
}

impl Drop for TxConnection<'_> {
    fn drop(&mut self) {
        self.guard.after_reply();
        self.lent.store(false, Ordering::Release);
    }
}

impl fmt::Debug for TxConnection<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TxConnection")
            .field("state", &self.guard.state)
            .field("conn", &**self)
            .finish()
    }
}

/// The transaction's connection, locked for a row stream or a batch. While it is held the
/// transaction's own methods refuse at once (as for a lent [`TxConnection`]): the task that
/// reads the stream would otherwise wait for itself. When it is given back the transaction
/// follows what happened on it (a statement left unfinished fails it).
struct TxLease {
    guard: OwnedMutexGuard<TxConn>,
    shared: Arc<Shared>,
}

impl std::ops::Deref for TxLease {
    type Target = crate::Connection;

    fn deref(&self) -> &crate::Connection {
        self.guard.conn_ref()
    }
}

impl std::ops::DerefMut for TxLease {
    fn deref_mut(&mut self) -> &mut crate::Connection {
        self.guard.conn()
    }
}

impl Drop for TxLease {
    fn drop(&mut self) {
        self.guard.after_reply();
        self.shared.lent.store(false, Ordering::Release);
    }
}

pub(crate) struct TxConn {
    /// The connection until the transaction finishes; then it goes back to the pool at once
    /// (see [`TxConn::release`]), however long the handle lives.
    held: Option<EngineConnection>,
    /// Its counters when it was given back.
    stats_at_end: crate::connection::ConnectionStats,
    state: TxState,
    /// Live savepoints, oldest first.
    savepoints: Vec<SavepointName>,
}

impl Drop for TxConn {
    fn drop(&mut self) {
        self.release();
    }
}

struct Shared {
    engine: PostgresEngine,
    /// The transaction's trace (target `pgengine::transaction`): its statements' spans are
    /// its children, and its outcome is recorded when it ends.
    span: tracing::Span,
    /// Kept outside the mutex: a cancel is needed exactly while a query holds it.
    cancel: crate::connection::CancelToken,
    /// The connection and the state; one query at a time.
    conn: Arc<Mutex<TxConn>>,
    next_savepoint: AtomicU32,
    /// A [`TxConnection`] holds the connection: the transaction's own methods refuse at once
    /// instead of waiting (on the lender's own task, they would wait forever).
    lent: AtomicBool,
    /// Find out what became of a COMMIT whose answer was lost
    /// ([`TransactionBuilder::track_commit`]).
    track_commit: bool,
}

/// A transaction on one connection. Cheap to clone; clones are the same transaction.
///
/// ```no_run
/// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
/// let tx = engine.begin().await?;
/// tx.execute(("UPDATE account SET balance = balance - $1 WHERE id = 1", (10i64,))).await?;
/// if tx.query_one("SELECT balance FROM account WHERE id = 1").await?.get::<_, i64>(0) < 0 {
///     tx.rollback().await?; // nothing was saved
/// } else {
///     tx.commit().await?;
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresTransaction {
    shared: Arc<Shared>,
    /// A handle joined to an outer transaction: its commit is the outer one's business.
    nested: bool,
}

impl fmt::Debug for PostgresTransaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresTransaction")
            .field("nested", &self.nested)
            .finish_non_exhaustive()
    }
}

impl PostgresTransaction {
    /// The engine the transaction belongs to.
    pub fn engine(&self) -> &PostgresEngine {
        &self.shared.engine
    }

    /// A token that cancels the statement this transaction is running, from another task
    /// (see [`CancelToken`](crate::connection::CancelToken)). The cancelled statement fails
    /// with SQLSTATE 57014 and the transaction with it.
    pub fn cancel_token(&self) -> crate::connection::CancelToken {
        self.shared.cancel.clone()
    }

    /// True for a handle joined to an outer transaction.
    pub fn is_nested(&self) -> bool {
        self.nested
    }

    /// The transaction's state.
    pub async fn state(&self) -> TxState {
        self.shared.conn.lock().await.state
    }

    /// The counters of the transaction's connection (round trips, parses, …).
    pub async fn stats(&self) -> crate::connection::ConnectionStats {
        let c = self.shared.conn.lock().await;
        match &c.held {
            Some(conn) => conn.stats(),
            None => c.stats_at_end,
        }
    }

    fn is_finished(&self) -> bool {
        // try_lock: a transaction busy with a query is certainly not finished.
        self.shared
            .conn
            .try_lock()
            .map(|c| c.state.is_finished())
            .unwrap_or(false)
    }

    /// Locks the connection for a query: refuses without a round trip when the transaction
    /// is finished, or failed (unless `allow_failed`).
    pub(crate) async fn lock(&self, allow_failed: bool) -> Result<MutexGuard<'_, TxConn>> {
        self.refuse_if_lent()?;
        // Uncontended is the rule (one task's statements one after another): no lock future.
        let mut guard = match self.shared.conn.try_lock() {
            Ok(guard) => guard,
            Err(_) => self.shared.conn.lock().await,
        };
        // A query whose future was dropped left its answer unread: as after a timeout.
        guard.after_abandoned();
        match guard.state {
            TxState::Active => Ok(guard),
            TxState::Failed if allow_failed => Ok(guard),
            TxState::Failed => Err(Error::transaction(
                TransactionError::Failed,
                "the transaction failed earlier: roll it back (or roll back to a savepoint)",
            )),
            state => Err(Error::transaction(
                TransactionError::Finished,
                format!("the transaction is already finished ({state:?})"),
            )),
        }
    }

    /// Runs a query in the transaction and returns its rows.
    pub async fn query(&self, query: impl ToQuery) -> Result<Vec<Row>> {
        let mut c = self.lock(false).await?;
        let result = c.conn().query(&query).await;
        c.settle(result)
    }

    /// Runs a query that must return exactly one row.
    pub async fn query_one(&self, query: impl ToQuery) -> Result<Row> {
        let mut c = self.lock(false).await?;
        let result = c.conn().query_one(&query).await;
        c.settle(result)
    }

    /// Runs a query that must return at most one row.
    pub async fn query_opt(&self, query: impl ToQuery) -> Result<Option<Row>> {
        let mut c = self.lock(false).await?;
        let result = c.conn().query_opt(&query).await;
        c.settle(result)
    }

    /// Runs a statement and returns the number of rows it affected.
    pub async fn execute(&self, query: impl ToQuery) -> Result<u64> {
        let mut c = self.lock(false).await?;
        let result = c.conn().execute(&query).await;
        c.settle(result)
    }

    /// The transaction's connection, for what its own methods do not offer: above all COPY
    /// ([`Connection::copy_in`](crate::Connection::copy_in), with
    /// [`BinaryCopyInWriter`](crate::connection::BinaryCopyInWriter), and
    /// [`Connection::copy_out`](crate::Connection::copy_out)), inside the transaction.
    ///
    /// While it is held, the transaction's other methods (and `engine.*` queries on its task,
    /// which go to the same connection) refuse with an [`ErrorKind::Busy`](crate::ErrorKind)
    /// error, and [`state`](Self::state) and [`stats`](Self::stats) wait for it: drop it
    /// before using them. When it is dropped the transaction follows what happened on it: a
    /// statement that failed fails the transaction, and so does one left unfinished (a COPY
    /// sink dropped before `finish`). Refused, without a round trip, when the transaction has
    /// failed or finished. Use the transaction's methods, not SQL sent through it, to commit,
    /// roll back and make savepoints.
    ///
    /// ```no_run
    /// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
    /// let tx = engine.begin().await?;
    /// {
    ///     let mut conn = tx.connection().await?;
    ///     let mut sink = conn.copy_in("COPY people (id, name) FROM STDIN").await?;
    ///     sink.write(b"1\tAda\n2\tGrace\n").await?;
    ///     sink.finish().await?;
    /// }
    /// tx.execute("UPDATE people SET name = upper(name)").await?;
    /// tx.commit().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connection(&self) -> Result<TxConnection<'_>> {
        let mut guard = self.lock(false).await?;
        // What it sends must come after the savepoints not sent yet.
        guard.send_deferred().await?;
        self.shared.lent.store(true, Ordering::Release);
        Ok(TxConnection {
            guard,
            lent: &self.shared.lent,
        })
    }

    /// Runs SQL without parameters (several statements allowed) with the simple protocol.
    pub async fn simple_query(&self, sql: &str) -> Result<Vec<SimpleQueryResult>> {
        let mut c = self.lock(false).await?;
        let result = c.conn().simple_query(sql).await;
        c.settle(result)
    }

    /// Commits. A failed transaction is rolled back instead and an error says nothing was
    /// saved; an error from COMMIT itself (a serialization failure, a deferred constraint)
    /// carries its SQLSTATE. A nested handle does nothing: the outer transaction commits.
    pub async fn commit(&self) -> Result<()> {
        if self.nested {
            return Ok(());
        }
        let mut c = self.lock(true).await?;
        if c.state == TxState::Failed {
            drop(c);
            return Err(self.rollback_failed().await);
        }
        // COMMIT releases every savepoint: one not sent yet need not be made first.
        c.conn().drop_deferred();
        let track = self.shared.track_commit && c.conn().server_version_num() >= 130_000;
        let engine = &self.shared.engine;
        let ask = CommitAsk {
            before: track.then_some(COMMIT_ID_QUERY),
            after: engine.tracks_writes().then_some(POSITION_QUERY),
        };
        let reply = if ask.before.is_some() || ask.after.is_some() {
            c.conn().commit_between(ask).await
        } else {
            CommitReply::of(c.conn().command(&["COMMIT"]).await)
        };
        if engine.tracks_writes() {
            // For read-your-writes nodes: where this commit is.
            engine.writes().after_commit(&reply);
        }
        let result = reply.commit;
        // No answer: the server may have committed or not. (A server error, by contrast,
        // came with ReadyForQuery on a connection still usable.)
        // (Nothing sent at all — the connection was already gone — is not a loss of the
        // answer: the server never saw the COMMIT.)
        let lost = result.as_ref().is_err_and(|e| !e.safe_to_retry())
            && (c.conn().is_broken() || c.conn().is_busy());
        c.after_reply();
        if lost {
            c.release();
            drop(c);
            let id = CommitId::learned(reply.before);
            let e = result.expect_err("lost");
            let outcome = resolve_lost_commit(&self.shared.engine, id, e).await;
            {
                let mut c = self.shared.conn.lock().await;
                c.state = match &outcome {
                    Ok(()) => TxState::Committed,
                    Err(e) if e.transaction_error() == Some(TransactionError::NotCommitted) => {
                        TxState::RolledBack
                    }
                    // Not known: finished either way, nothing more can be done with it.
                    Err(_) => TxState::Ended,
                };
            }
            self.shared.span.record(
                "pgengine.outcome",
                match &outcome {
                    Ok(()) => "committed",
                    Err(e) if e.transaction_error() == Some(TransactionError::NotCommitted) => {
                        "rolled back"
                    }
                    Err(_) => "unknown",
                },
            );
            return outcome;
        }
        let outcome = match (&result, c.state) {
            (Ok(Some(done)), _) if done.rolled_back() => "rolled back",
            (Ok(_), _) => "committed",
            (Err(_), TxState::RolledBack) => "rolled back",
            (Err(_), _) => "commit failed",
        };
        self.shared.span.record("pgengine.outcome", outcome);
        let outcome = match result {
            Ok(Some(done)) if done.rolled_back() => {
                // The server answers COMMIT with ROLLBACK when the block had failed.
                c.state = TxState::RolledBack;
                Err(Error::transaction(
                    TransactionError::NotCommitted,
                    "the server rolled the transaction back instead of committing: nothing was saved",
                ))
            }
            Ok(_) => {
                c.state = TxState::Committed;
                Ok(())
            }
            Err(e) => {
                // The server answered COMMIT with an error (a serialization failure, a
                // deferred constraint): the transaction is rolled back.
                if c.conn().transaction_status() == TransactionStatus::Idle {
                    c.state = TxState::RolledBack;
                }
                Err(e.context("COMMIT failed; nothing was saved"))
            }
        };
        if c.state.is_finished() {
            c.release();
        }
        outcome
    }

    /// Rolls back. On a nested handle this rolls back the whole (outer) transaction.
    pub async fn rollback(&self) -> Result<()> {
        let mut c = self.lock(true).await?;
        // Savepoints not sent yet would be rolled back with the rest.
        c.conn().drop_deferred();
        let result = c.conn().command(&["ROLLBACK"]).await;
        self.shared.span.record("pgengine.outcome", "rolled back");
        c.after_reply();
        if result.is_ok() {
            c.state = TxState::RolledBack;
            c.savepoints.clear();
        }
        if c.state.is_finished() {
            c.release();
        }
        result.map(|_| ())
    }

    /// Rolls back a failed transaction and returns the error that says nothing was saved.
    async fn rollback_failed(&self) -> Error {
        match self.rollback().await {
            Ok(()) => Error::transaction(
                TransactionError::NotCommitted,
                "the transaction failed earlier and was rolled back: nothing was saved",
            ),
            Err(e) => e.context("the transaction failed earlier and could not be rolled back"),
        }
    }

    /// The next automatic savepoint name: `savepoint_1`, `savepoint_2`, … per transaction.
    pub fn get_savepoint_id(&self) -> u32 {
        self.shared.next_savepoint.fetch_add(1, Ordering::Relaxed)
    }

    /// Creates a savepoint. Without a name it is called `savepoint_N`; a given name must be a
    /// valid SQL identifier (checked before anything is sent; it is always sent quoted).
    ///
    /// It costs no round trip of its own: the `SAVEPOINT` goes out in front of whatever the
    /// transaction sends next, in the same write (as Npgsql sends a savepoint). If the
    /// server refuses it (it can only for want of resources), that request returns the
    /// savepoint's error, with its SQLSTATE, and the transaction has failed. One made right
    /// before `commit` or `rollback` is not sent at all: the transaction's end ends it.
    pub async fn savepoint(&self, name: Option<&str>) -> Result<Savepoint> {
        let name = match name {
            Some(n) => SavepointName::given(n)?,
            None => SavepointName::automatic(self.get_savepoint_id()),
        };
        let mut c = self.lock(false).await?;
        let command = savepoint_command("SAVEPOINT", name.as_str());
        // It goes out with the next statement (see `Connection::defer_command`).
        if !c.conn().defer_command(&command) {
            c.send_deferred().await?;
            c.conn().defer_command(&command);
        }
        c.savepoints.push(name);
        Ok(Savepoint::new(self.clone(), name))
    }

    /// Rolls back to the savepoint called `name`: undoes what followed it, and takes a failed
    /// transaction back to active. The savepoint stays; later ones are gone.
    pub async fn rollback_to(&self, name: &str) -> Result<()> {
        check_savepoint_name(name)?;
        self.rollback_to_checked(name).await
    }

    /// [`rollback_to`](Self::rollback_to) a name already checked (a [`Savepoint`]'s).
    pub(crate) async fn rollback_to_checked(&self, name: &str) -> Result<()> {
        let mut c = self.lock(true).await?;
        let at = c.live_savepoint(name)?;
        let result = c
            .conn()
            .command(&savepoint_command("ROLLBACK TO SAVEPOINT", name))
            .await;
        c.settle(result)?;
        c.savepoints.truncate(at + 1);
        Ok(())
    }

    /// Releases the savepoint called `name` (and every later one), keeping their work.
    pub async fn release(&self, name: &str) -> Result<()> {
        check_savepoint_name(name)?;
        self.release_checked(name).await
    }

    /// [`release`](Self::release) of a name already checked (a [`Savepoint`]'s).
    pub(crate) async fn release_checked(&self, name: &str) -> Result<()> {
        let mut c = self.lock(false).await?;
        let at = c.live_savepoint(name)?;
        let result = c
            .conn()
            .command(&savepoint_command("RELEASE SAVEPOINT", name))
            .await;
        c.settle(result)?;
        c.savepoints.truncate(at);
        Ok(())
    }

    /// Runs `f` inside a new savepoint: releases it when `f` returns `Ok`, rolls back to it
    /// when `f` returns `Err` (the caller's own error type, returned unchanged; the
    /// transaction goes on) or panics (the panic goes on).
    pub async fn savepoint_scope<F, Fut, T, E>(&self, f: F) -> std::result::Result<T, E>
    where
        F: FnOnce(PostgresTransaction) -> Fut,
        Fut: Future<Output = std::result::Result<T, E>>,
        E: From<Error>,
    {
        use futures::FutureExt;
        let sp = self.savepoint(None).await?;
        match std::panic::AssertUnwindSafe(f(self.clone()))
            .catch_unwind()
            .await
        {
            Ok(Ok(v)) => {
                sp.release().await?;
                Ok(v)
            }
            Ok(Err(e)) => {
                sp.rollback_to().await?;
                Err(e)
            }
            Err(panic) => {
                // Undo the scope's work; the transaction goes on for whoever catches it.
                let _ = sp.rollback_to().await;
                std::panic::resume_unwind(panic)
            }
        }
    }

    /// Rolls back a transaction whose scope ended with `why` (an error, a panic), unless it
    /// finished by hand; a rollback that fails is logged (the connection is then closed, and
    /// the server rolls back with the session).
    async fn roll_back_after(&self, why: &str) {
        if self.state().await.is_finished() {
            return;
        }
        if let Err(e) = self.rollback().await {
            tracing::warn!(
                target: "pgengine::transaction",
                "rollback after {why} failed: {}",
                e.redacted()
            );
        }
    }

    /// Runs several queries as one pipeline on the transaction's connection (for Atomic).
    pub(crate) async fn pipeline(
        &self,
        queries: &[&dyn ToQuery],
    ) -> std::result::Result<Vec<(Vec<Row>, u64)>, (Option<usize>, Error)> {
        let mut c = self.lock(false).await.map_err(|e| (None, e))?;
        let result = c.conn().pipeline(queries).await;
        c.settle(Ok(())).map_err(|e| (None, e))?;
        result
    }

    /// Refuses while a [`TxConnection`], a row stream or a batch holds the connection,
    /// instead of waiting for it.
    fn refuse_if_lent(&self) -> Result<()> {
        if self.shared.lent.load(Ordering::Acquire) {
            return Err(Error::busy(
                "the transaction's connection is lent out (a TxConnection, row stream or \
                 batch is alive): drop it before using the transaction",
            ));
        }
        Ok(())
    }

    /// Runs a query in the transaction and returns a stream of its rows, read as it is
    /// polled. Until the stream is dropped the transaction's other methods refuse with an
    /// [`ErrorKind::Busy`](crate::ErrorKind) error (the connection is the stream's). Reading it to
    /// the end is what lets the transaction go on: dropped before its end, the statement
    /// counts as abandoned and the transaction fails (only a rollback may follow), as after a
    /// timeout — nobody saw how it ended.
    pub async fn query_stream(&self, query: impl ToQuery) -> Result<RowStream<'static>> {
        RowStream::start(self.lease().await?, &query).await
    }

    /// Fetches the rows of `query` in batches of at most `batch_size` through a portal, inside
    /// the transaction (see [`AsyncBatch`]). Until the batch is dropped the transaction's
    /// other methods refuse with an [`ErrorKind::Busy`](crate::ErrorKind) error; dropped
    /// before its end, the rest in flight is read away by the next query.
    pub async fn batch(
        &self,
        query: impl ToQuery,
        batch_size: usize,
    ) -> Result<AsyncBatch<'static>> {
        let batch_size = check_batch(&query, batch_size)?;
        AsyncBatch::start(self.lease().await?, &query, batch_size).await
    }

    /// The transaction's connection for a row stream or a batch, until it is dropped.
    pub(crate) async fn lease(&self) -> Result<Lease<'static>> {
        let guard = self.lock_owned().await?;
        self.shared.lent.store(true, Ordering::Release);
        Ok(Lease::Held(Box::new(TxLease {
            guard,
            shared: self.shared.clone(),
        })))
    }

    /// Locks the transaction's connection until the guard is dropped.
    async fn lock_owned(&self) -> Result<OwnedMutexGuard<TxConn>> {
        self.refuse_if_lent()?;
        let mut guard = self.shared.conn.clone().lock_owned().await;
        guard.after_abandoned();
        if guard.state == TxState::Active {
            // What borrows the connection sends requests of its own: savepoints go first.
            guard.send_deferred().await?;
        }
        match guard.state {
            TxState::Active => Ok(guard),
            TxState::Failed => Err(Error::transaction(
                TransactionError::Failed,
                "the transaction failed earlier: roll it back (or roll back to a savepoint)",
            )),
            state => Err(Error::transaction(
                TransactionError::Finished,
                format!("the transaction is already finished ({state:?})"),
            )),
        }
    }
}

impl TxConn {
    /// [`after_reply`](Self::after_reply), then the request's outcome: the error of a
    /// deferred SAVEPOINT it carried, if the server refused that, comes first (it is the
    /// cause; the server refuses the rest of the block after it).
    pub(crate) fn settle<T>(&mut self, result: Result<T>) -> Result<T> {
        self.after_reply();
        match self.held.as_mut().and_then(|c| c.take_deferred_error()) {
            Some(e) => Err(deferred_failed(e)),
            None => result,
        }
    }

    /// Sends the savepoints not sent yet on their own, now.
    async fn send_deferred(&mut self) -> Result<()> {
        let result = self.conn().send_deferred().await;
        self.settle(result)
    }

    /// Updates the state from the ReadyForQuery of the reply just read.
    pub(crate) fn after_reply(&mut self) {
        let Some(conn) = &self.held else { return };
        if conn.is_broken() {
            // The connection is gone, and with it the transaction (the server rolls back).
            self.state = TxState::RolledBack;
            return;
        }
        if conn.is_busy() {
            // A statement timed out (or its future was dropped): it was cancelled, or may
            // have finished anyway, and its caller was told it failed. Either way the block
            // must not commit: only a rollback may follow.
            if self.state == TxState::Active {
                self.state = TxState::Failed;
            }
            return;
        }
        self.state = self.state.after_reply(conn.transaction_status());
    }

    /// The transaction's connection. Only a transaction that is not finished uses it, and
    /// until then it is held.
    pub(crate) fn conn(&mut self) -> &mut EngineConnection {
        self.held
            .as_mut()
            .expect("an unfinished transaction holds its connection")
    }

    pub(crate) fn conn_ref(&self) -> &EngineConnection {
        self.held
            .as_ref()
            .expect("an unfinished transaction holds its connection")
    }

    /// Gives the connection back to the pool once the transaction has finished: its next
    /// user may be waiting now, not when the handle goes away.
    fn release(&mut self) {
        if let Some(mut conn) = self.held.take() {
            self.stats_at_end = conn.stats();
            conn.drop_deferred();
            // Its next user's statements are not ours.
            conn.set_trace_parent(None);
        }
    }

    /// Fails an active transaction whose connection still owes the answer to an abandoned
    /// statement (see [`TxConn::after_reply`]).
    fn after_abandoned(&mut self) {
        if self.held.as_ref().is_some_and(|c| c.is_busy()) && self.state == TxState::Active {
            self.state = TxState::Failed;
        }
    }

    /// The position of the live savepoint `name` (the latest of that name).
    fn live_savepoint(&self, name: &str) -> Result<usize> {
        self.savepoints.iter().rposition(|s| s.is(name)).ok_or_else(|| {
            Error::transaction(
                TransactionError::SavepointGone,
                format!("no savepoint {name:?} is live in this transaction (released or rolled back past?)"),
            )
        })
    }
}

/// The error of a SAVEPOINT that went out in front of a later request.
fn deferred_failed(e: Error) -> Error {
    e.context("a savepoint made before this request could not be made (it went out with it)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_follows_ready_for_query() {
        use TransactionStatus::*;
        assert_eq!(TxState::Active.after_reply(InTransaction), TxState::Active);
        assert_eq!(TxState::Active.after_reply(Failed), TxState::Failed);
        assert_eq!(TxState::Failed.after_reply(InTransaction), TxState::Active);
        assert_eq!(TxState::Active.after_reply(Idle), TxState::Ended);
        assert_eq!(TxState::Committed.after_reply(Idle), TxState::Committed);
        assert!(TxState::Ended.is_finished() && !TxState::Failed.is_finished());
    }

    #[test]
    fn begin_statement() {
        let engine = PostgresEngine::new(crate::Config::new());
        let b = TransactionBuilder::new(engine)
            .isolation_level(IsolationLevel::Serializable)
            .read_only(true)
            .deferrable(true);
        assert_eq!(
            b.begin_sql(),
            "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE"
        );
    }
}
