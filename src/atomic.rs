//! [`Atomic`]: queries added one by one, then run as one all-or-nothing transaction.
//!
//! The whole run is one pipeline and one round trip: `BEGIN`, then Parse/Bind/Execute of every
//! query (only Bind/Execute for cached statements, and for later copies of a query already
//! parsed in the same run), `COMMIT`, and a single Sync. If any query fails, the server skips
//! the rest, `COMMIT` included; the transaction is rolled back and the error names the failing
//! query and carries its SQLSTATE. Inside a transaction already
//! open on the task, the queries join it instead (no BEGIN, no COMMIT).
//!
//! An Atomic is one transaction, so transaction control among its queries (`COMMIT`,
//! `ROLLBACK`, `BEGIN`, `SAVEPOINT`, …) would commit part of it, or split it, behind the
//! all-or-nothing promise: such a query is refused before anything is sent.

use std::future::{Future, IntoFuture};
use std::pin::Pin;

use crate::connection::CommitAsk;
use crate::connection::TransactionStatus;
use crate::engine::{PostgresEngine, Route};
use crate::error::{Error, Result, SqlState, TransactionError};
use crate::freshness::POSITION_QUERY;
use crate::outcome::{COMMIT_ID_QUERY, CommitId, resolve_lost_commit};
use crate::query::{Query, ToQuery};
use crate::retry::{RetryPolicy, connection_lost};
use crate::row::Row;

/// Queries to run together, all or nothing. Awaiting it runs it.
///
/// ```no_run
/// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
/// use pgengine::Query;
///
/// let mut atomic = engine.atomic();
/// atomic.add(Query::new("CREATE TABLE band (id serial, name text)"));
/// atomic.add(Query::new("INSERT INTO band (name) VALUES ($1)").bind("Pythonistas"));
/// let results = atomic.await?; // or .run().await, or .run_sync() outside a runtime
/// # Ok(())
/// # }
/// ```
pub struct Atomic<'q> {
    engine: PostgresEngine,
    queries: Vec<Entry<'q>>,
    retry: Option<RetryPolicy>,
}

impl std::fmt::Debug for Atomic<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The SQL only: values may be secrets.
        let sql: Vec<&str> = self.queries.iter().map(|q| q.query().sql()).collect();
        f.debug_struct("Atomic").field("queries", &sql).finish()
    }
}

/// A query of an [`Atomic`]: an owned [`Query`] as it is (building one allocates nothing, and
/// neither does keeping it), any other form boxed.
enum Entry<'q> {
    Owned(Query),
    Other(Box<dyn ToQuery + Send + 'q>),
}

impl Entry<'_> {
    fn query(&self) -> &dyn ToQuery {
        match self {
            Entry::Owned(query) => query,
            Entry::Other(query) => &**query,
        }
    }
}

/// The rows and row count of each query of an [`Atomic`], in the order they were added.
pub type AtomicResults = Vec<(Vec<Row>, u64)>;

impl<'q> Atomic<'q> {
    pub(crate) fn new(engine: PostgresEngine) -> Atomic<'q> {
        Atomic {
            engine,
            queries: Vec::new(),
            retry: None,
        }
    }

    /// Adds a query, in any form the engine takes ([`ToQuery`]): `&str`, a [`Query`], or
    /// `(sql, params)` whose values may be borrowed for as long as the Atomic lives.
    pub fn add(&mut self, query: impl ToQuery + Send + 'q) -> &mut Atomic<'q> {
        self.queries.push(match query.__into_query() {
            Ok(query) => Entry::Owned(query),
            Err(other) => Entry::Other(Box::new(other)),
        });
        self
    }

    /// Runs it again, by `policy`, when it fails in a way a new attempt can fix (see
    /// [`retry`](crate::retry)): a serialization failure or deadlock, a failure that reached
    /// nothing, a COMMIT lost on the wire that the server says it aborted. The run stays one
    /// round trip; its COMMIT goes after the queries' Sync in the same write, with the
    /// transaction's id asked just before it (PostgreSQL 13+), so a lost answer can be
    /// resolved. Refused with [`TransactionError::Nested`] inside a transaction.
    pub fn retry(&mut self, policy: RetryPolicy) -> &mut Atomic<'q> {
        self.retry = Some(policy);
        self
    }

    /// How many queries were added.
    pub fn len(&self) -> usize {
        self.queries.len()
    }

    /// True when no query was added.
    pub fn is_empty(&self) -> bool {
        self.queries.is_empty()
    }

    /// Runs every query in one transaction, in one round trip; returns each query's rows and
    /// row count. Nothing is committed if any query fails.
    pub async fn run(&self) -> Result<AtomicResults> {
        let queries: Vec<&dyn ToQuery> = self.queries.iter().map(Entry::query).collect();
        if queries.is_empty() {
            return Ok(Vec::new());
        }
        let mut previous: Option<&str> = None;
        for (i, q) in queries.iter().enumerate() {
            let sql = q.sql();
            // The same text as the statement before (an Atomic of one INSERT again and
            // again): already read.
            if previous.is_some_and(|p| std::ptr::eq(p, sql) || p == sql) {
                continue;
            }
            previous = Some(sql);
            if let Some(control) = crate::sql::statement_effects(sql).control {
                return Err(Error::transaction(
                    TransactionError::ControlStatement,
                    format!(
                        "query {} of {} is {}, refused (nothing was sent): an Atomic is one \
                         transaction of its own, all or nothing, and transaction control \
                         inside it would commit or split part of it",
                        i + 1,
                        queries.len(),
                        control.keyword()
                    ),
                ));
            }
        }
        if let Route::Transaction(tx) = self.engine.route() {
            if self.retry.is_some() {
                crate::retry::refuse_inside_transaction(&self.engine)?;
            }
            return tx
                .pipeline(&queries)
                .await
                .map_err(|(i, e)| name_failure(i, e, queries.len()));
        }
        match &self.retry {
            None => self.run_once(&queries, false).await,
            Some(policy) => {
                let queries = &queries[..];
                crate::retry::with_retry(&self.engine, policy, || self.run_once(queries, true))
                    .await
            }
        }
    }

    /// One run on a connection of its own: `BEGIN`, the queries and `COMMIT` in one write.
    /// With `track` (and PostgreSQL 13+), the COMMIT goes after the queries' Sync, with the
    /// transaction's id asked just before it, so that a lost answer can be resolved (see
    /// [`TransactionBuilder::track_commit`](crate::transaction::TransactionBuilder::track_commit)).
    async fn run_once(&self, queries: &[&dyn ToQuery], track: bool) -> Result<AtomicResults> {
        let mut conn = self.engine.acquire().await?;
        let track = track && conn.server_version_num() >= 130_000;
        let positions = self.engine.tracks_writes();
        let ask = (track || positions).then_some(CommitAsk {
            before: track.then_some(COMMIT_ID_QUERY),
            after: positions.then_some(POSITION_QUERY),
        });
        let mut all: Vec<&dyn ToQuery> = Vec::with_capacity(queries.len() + 2);
        all.push(&"BEGIN");
        all.extend(queries.iter().copied());
        if ask.is_none() {
            all.push(&"COMMIT");
        }
        let mut retried = false;
        loop {
            let result = conn.pipeline_then(&all, ask).await;
            // The COMMIT after the Sync, if it was sent: its replies are owed.
            let reply = match ask {
                Some(ask) if conn.is_busy() && !conn.is_broken() => {
                    Some(conn.read_commit(ask).await)
                }
                _ => None,
            };
            let failure = match result {
                Ok(mut results) => {
                    results.remove(0); // BEGIN
                    let Some(reply) = reply else {
                        if ask.is_none() {
                            results.pop(); // COMMIT
                            return Ok(results);
                        }
                        // Tracked, and the connection was lost before the COMMIT's replies.
                        let lost = Error::closed("the connection was lost during the COMMIT");
                        if positions {
                            self.engine.writes().wrote_somewhere();
                        }
                        return resolve_lost_commit(&self.engine, None, lost)
                            .await
                            .map(|()| results);
                    };
                    match reply.commit {
                        Ok(Some(done)) if done.rolled_back() => {
                            return Err(Error::transaction(
                                TransactionError::NotCommitted,
                                "the server rolled the Atomic back instead of committing: \
                                 nothing was committed",
                            ));
                        }
                        Ok(_) => {
                            if positions {
                                self.engine.writes().after_commit(&reply);
                            }
                            return Ok(results);
                        }
                        Err(e) if conn.is_broken() || conn.is_busy() => {
                            let id = CommitId::learned(reply.before);
                            if positions {
                                self.engine.writes().wrote_somewhere();
                            }
                            return resolve_lost_commit(&self.engine, id, e)
                                .await
                                .map(|()| results);
                        }
                        // The server refused the COMMIT (a deferred constraint, a
                        // serialization failure): rolled back.
                        Err(e) => (None, e),
                    }
                }
                Err((i, e)) => {
                    // The COMMIT's replies were read (the failed block made it a ROLLBACK),
                    // or never sent, or lost with the connection.
                    if conn.is_broken() && !e.safe_to_retry() && connection_lost(&e) {
                        if self.engine.tracks_writes() {
                            self.engine.writes().wrote_somewhere();
                        }
                        // Lost in the middle: the COMMIT went out in the same write and may
                        // have run.
                        return Err(Error::transaction(
                            TransactionError::OutcomeUnknown,
                            format!(
                                "the connection was lost while the Atomic ran ({}): its COMMIT \
                                 was sent with it, so it may or may not have committed",
                                e.redacted()
                            ),
                        )
                        .with_source(e));
                    }
                    (i, e)
                }
            };
            let (i, e) = failure;
            // The failure left the transaction block open and aborted: end it, so the
            // connection is clean and nothing is committed. If that fails too (the
            // connection was lost: PgBouncer in statement mode drops a client whose block
            // stays open), the server rolls back with the session; the error worth
            // reporting is still the query's, and the pool discards or cleans the
            // connection.
            let mut clean = !conn.is_broken();
            if clean
                && conn.transaction_status() != TransactionStatus::Idle
                && let Err(rollback) = conn.command(&["ROLLBACK"]).await
            {
                tracing::debug!(
                    target: "pgengine::query",
                    "rolling back a failed Atomic failed too: {}",
                    rollback.redacted()
                );
                clean = false;
            }
            // A cached statement invalidated by DDL: nothing was committed, so the whole
            // run can go again once (the statement is prepared afresh). (A pooler took our
            // prepared statements: the connection has switched to unnamed ones, and the
            // run works again.)
            let stale = matches!(
                e.code(),
                Some(
                    &SqlState::FEATURE_NOT_SUPPORTED
                        | &SqlState::UNDEFINED_PSTATEMENT
                        | &SqlState::DUPLICATE_PSTATEMENT
                )
            );
            if stale && clean && !retried {
                retried = true;
                continue;
            }
            let i = i
                .map(|i| i.saturating_sub(1))
                .filter(|i| *i < queries.len());
            return Err(name_failure(i, e, queries.len()));
        }
    }

    /// Runs it from blocking code (a thread without an async runtime), as Piccolo's
    /// `run_sync`. Inside a runtime this would block the runtime's thread, so it refuses
    /// with [`TransactionError::BlockingInRuntime`]: use `.await` there.
    pub fn run_sync(&self) -> Result<AtomicResults> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(Error::transaction(
                TransactionError::BlockingInRuntime,
                "Atomic::run_sync was called inside an async runtime; await the Atomic instead",
            ));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::io("could not start a runtime for run_sync", e))?;
        rt.block_on(self.run())
    }
}

/// Says which query failed: "query 2 of 3 failed".
fn name_failure(index: Option<usize>, e: Error, total: usize) -> Error {
    match index {
        Some(i) => e.context(format!(
            "query {} of {total} failed; nothing was committed",
            i + 1
        )),
        None => e.context("the atomic run failed; nothing was committed"),
    }
}

impl<'q> IntoFuture for Atomic<'q> {
    type Output = Result<AtomicResults>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'q>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move { self.run().await })
    }
}

/// Copies the text: a borrowed `&str` may not live as long as the query. (`Query::new` with a
/// `&'static str` does not copy.)
impl From<&str> for Query {
    fn from(sql: &str) -> Query {
        Query::new(sql.to_owned())
    }
}

impl From<String> for Query {
    fn from(sql: String) -> Query {
        Query::new(sql)
    }
}
