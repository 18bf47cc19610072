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

use crate::connection::TransactionStatus;
use crate::engine::{PostgresEngine, Route};
use crate::error::{Error, Result, TransactionError};
use crate::query::{Query, ToQuery};
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
    queries: Vec<Box<dyn ToQuery + Send + 'q>>,
}

impl std::fmt::Debug for Atomic<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The SQL only: values may be secrets.
        let sql: Vec<&str> = self.queries.iter().map(|q| q.sql()).collect();
        f.debug_struct("Atomic").field("queries", &sql).finish()
    }
}

/// The rows and row count of each query of an [`Atomic`], in the order they were added.
pub type AtomicResults = Vec<(Vec<Row>, u64)>;

impl<'q> Atomic<'q> {
    pub(crate) fn new(engine: PostgresEngine) -> Atomic<'q> {
        Atomic {
            engine,
            queries: Vec::new(),
        }
    }

    /// Adds a query, in any form the engine takes ([`ToQuery`]): `&str`, a [`Query`], or
    /// `(sql, params)` whose values may be borrowed for as long as the Atomic lives.
    pub fn add(&mut self, query: impl ToQuery + Send + 'q) -> &mut Atomic<'q> {
        self.queries.push(Box::new(query));
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
        let queries: Vec<&dyn ToQuery> =
            self.queries.iter().map(|q| &**q as &dyn ToQuery).collect();
        if queries.is_empty() {
            return Ok(Vec::new());
        }
        for (i, q) in queries.iter().enumerate() {
            if let Some(control) = crate::sql::statement_effects(q.sql()).control {
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
            return tx
                .pipeline(&queries)
                .await
                .map_err(|(i, e)| name_failure(i, e, queries.len()));
        }

        let mut all: Vec<&dyn ToQuery> = Vec::with_capacity(queries.len() + 2);
        all.push(&"BEGIN");
        all.extend(queries.iter().copied());
        all.push(&"COMMIT");

        let mut conn = self.engine.acquire().await?;
        let mut retried = false;
        loop {
            match conn.pipeline(&all).await {
                Ok(mut results) => {
                    results.pop(); // COMMIT
                    results.remove(0); // BEGIN
                    return Ok(results);
                }
                Err((i, e)) => {
                    // The failure left the transaction block open and aborted: end it, so the
                    // connection is clean and nothing is committed. If that fails too (the
                    // connection was lost: PgBouncer in statement mode drops a client whose
                    // block stays open), the server rolls back with the session; the error
                    // worth reporting is still the query's, and the pool discards or cleans
                    // the connection.
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
                    // A cached statement invalidated by DDL: nothing was committed, so the
                    // whole run can go again once (the statement is prepared afresh).
                    // (A pooler took our prepared statements: the connection has switched to
                    // unnamed ones, and the run works again.)
                    let stale = matches!(
                        e.code(),
                        Some(
                            &crate::SqlState::FEATURE_NOT_SUPPORTED
                                | &crate::SqlState::UNDEFINED_PSTATEMENT
                                | &crate::SqlState::DUPLICATE_PSTATEMENT
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
