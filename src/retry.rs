//! Retrying transactions: [`RetryPolicy`], and [`TransactionBuilder::retry`] which runs a
//! transaction's closure again when it failed in a way a new attempt can fix.
//!
//! A new attempt is made after:
//!
//! - a serialization failure (SQLSTATE 40001) or a deadlock (40P01): the server rolled the
//!   transaction back, and running it again is what the server asks for;
//! - a connection lost (or a server that went away, or refused the connection) before the
//!   COMMIT was sent: the server rolls back what a lost session had not committed;
//! - a COMMIT whose answer was lost, when the server says the transaction was aborted (see
//!   [`TransactionBuilder::track_commit`], which retry turns on);
//! - a failure where nothing reached the server ([`Error::safe_to_retry`]: no connection
//!   could be had, …);
//! - a read-only error (25006) under `target_session_attrs=read-write` or `primary`: the node
//!   is no longer the primary (a failover); the next attempt connects afresh.
//!
//! Never after a failure of the caller's own making (a constraint violation, a syntax error, an
//! application error), and never after a COMMIT whose outcome is unknown
//! ([`TransactionError::OutcomeUnknown`]): that error is returned, so that a write is never
//! applied twice. Attempts are bounded in number and in total time, spaced by exponential
//! backoff with full jitter; each begins on whichever connection the engine gives it (a broken
//! one is never given twice). The last error is returned, saying how many attempts were made.
//!
//! ```no_run
//! # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
//! use pgengine::RetryPolicy;
//!
//! let total: i64 = engine
//!     .transaction()
//!     .isolation_level(pgengine::IsolationLevel::Serializable)
//!     .retry(RetryPolicy::default())
//!     .run(|tx| async move {
//!         tx.execute("UPDATE account SET balance = balance - 10 WHERE id = 1").await?;
//!         tx.execute("UPDATE account SET balance = balance + 10 WHERE id = 2").await?;
//!         Ok::<_, pgengine::Error>(tx.query_one("SELECT sum(balance) FROM account").await?.get(0))
//!     })
//!     .await?;
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::time::{Duration, Instant};

use crate::config::TargetSessionAttrs;
use crate::engine::{PostgresEngine, Route};
use crate::error::{Error, Result, SqlState, TransactionError};
use crate::transaction::{PostgresTransaction, TransactionBuilder};

/// How often and how long a transaction is tried ([`TransactionBuilder::retry`]).
///
/// The default: at most 5 attempts within 30 s, waiting a random time up to 10 ms before the
/// second, up to 20 ms before the third, and so on, up to 1 s.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    max_attempts: u32,
    max_elapsed: Duration,
    first_backoff: Duration,
    max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            max_elapsed: Duration::from_secs(30),
            first_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    /// The most attempts, the first included (at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// No new attempt starts once this much time has passed since the first began (or
    /// would, after its backoff).
    pub fn max_elapsed(mut self, limit: Duration) -> Self {
        self.max_elapsed = limit;
        self
    }

    /// The backoff before attempt `n + 1` is a random time up to `first * 2^(n-1)`, at most
    /// `max`.
    pub fn backoff(mut self, first: Duration, max: Duration) -> Self {
        self.first_backoff = first;
        self.max_backoff = max.max(first);
        self
    }

    /// The wait after attempt `attempt` failed: full jitter over the exponential bound.
    fn wait_after(&self, attempt: u32) -> Duration {
        let bound = self
            .first_backoff
            .saturating_mul(1u32 << (attempt - 1).min(20))
            .min(self.max_backoff);
        bound.mul_f64(rand::random::<f64>())
    }
}

/// An error type a retrying transaction's closure may return: one that can carry a
/// [`pgengine::Error`](Error), which the policy reads to decide whether to try again (an error
/// without one — the application's own — is never retried).
///
/// ```
/// use pgengine::RetryError;
///
/// #[derive(Debug)]
/// enum AppError {
///     SoldOut,
///     Db(pgengine::Error),
/// }
///
/// impl From<pgengine::Error> for AppError {
///     fn from(e: pgengine::Error) -> AppError {
///         AppError::Db(e)
///     }
/// }
///
/// impl RetryError for AppError {
///     fn pgengine_error(&self) -> Option<&pgengine::Error> {
///         match self {
///             AppError::Db(e) => Some(e),
///             AppError::SoldOut => None,
///         }
///     }
///     fn pgengine_error_mut(&mut self) -> Option<&mut pgengine::Error> {
///         match self {
///             AppError::Db(e) => Some(e),
///             AppError::SoldOut => None,
///         }
///     }
/// }
/// ```
pub trait RetryError: From<Error> {
    /// The pgengine error this one carries, if any.
    fn pgengine_error(&self) -> Option<&Error>;
    /// The same, to note the number of attempts on it.
    fn pgengine_error_mut(&mut self) -> Option<&mut Error>;
}

impl RetryError for Error {
    fn pgengine_error(&self) -> Option<&Error> {
        Some(self)
    }
    fn pgengine_error_mut(&mut self) -> Option<&mut Error> {
        Some(self)
    }
}

impl RetryError for Box<dyn std::error::Error + Send + Sync> {
    fn pgengine_error(&self) -> Option<&Error> {
        self.downcast_ref()
    }
    fn pgengine_error_mut(&mut self) -> Option<&mut Error> {
        self.downcast_mut()
    }
}

/// A transaction that is tried again when it fails in a way a new attempt can fix: from
/// [`TransactionBuilder::retry`]. See the [module](self) docs.
#[derive(Debug, Clone)]
pub struct RetryingTransaction {
    builder: TransactionBuilder,
    policy: RetryPolicy,
}

impl RetryingTransaction {
    pub(crate) fn new(builder: TransactionBuilder, policy: RetryPolicy) -> RetryingTransaction {
        RetryingTransaction { builder, policy }
    }

    /// Runs `f` in a transaction as [`TransactionBuilder::run`] does, and again, in a new
    /// transaction, while it fails in a way a new attempt can fix and the policy allows. The
    /// closure must be safe to run more than once: only what it does through the transaction
    /// is undone between attempts.
    ///
    /// Refused with [`TransactionError::Nested`] on a task already inside a transaction of
    /// this engine: a retry cannot undo the outer transaction's work.
    pub async fn run<F, Fut, T, E>(self, f: F) -> std::result::Result<T, E>
    where
        F: FnMut(PostgresTransaction) -> Fut,
        Fut: Future<Output = std::result::Result<T, E>>,
        E: RetryError,
    {
        let engine = self.builder.engine().clone();
        refuse_inside_transaction(&engine)?;
        // Each attempt calls `f` once; the lock is held only while it makes its future.
        let f = std::sync::Mutex::new(f);
        let call = |tx| (f.lock().unwrap_or_else(|p| p.into_inner()))(tx);
        let builder = &self.builder;
        with_retry(&engine, &self.policy, || {
            builder.clone().track_commit(true).run(call)
        })
        .await
    }
}

/// Refuses a retrying run on a task already inside a transaction of `engine`.
pub(crate) fn refuse_inside_transaction(engine: &PostgresEngine) -> Result<()> {
    if let Route::Transaction(_) = engine.route() {
        return Err(Error::transaction(
            TransactionError::Nested,
            "a retrying run cannot join the transaction already open on this task (a new \
             attempt could not undo the outer one's work); retry the outer one",
        ));
    }
    Ok(())
}

/// Runs `attempt` again while it fails in a way a new attempt can fix and `policy` allows;
/// the last error says how many attempts were made.
pub(crate) async fn with_retry<T, E, Fut>(
    engine: &PostgresEngine,
    policy: &RetryPolicy,
    mut attempt_once: impl FnMut() -> Fut,
) -> std::result::Result<T, E>
where
    E: RetryError,
    Fut: Future<Output = std::result::Result<T, E>>,
{
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut e = match attempt_once().await {
            Ok(value) => return Ok(value),
            Err(e) => e,
        };
        let reason = e.pgengine_error().and_then(|pe| retry_reason(pe, engine));
        let wait = policy.wait_after(attempt);
        let spent = started.elapsed() + wait;
        let Some(reason) =
            reason.filter(|_| attempt < policy.max_attempts && spent < policy.max_elapsed)
        else {
            if let Some(pe) = e.pgengine_error_mut() {
                pe.note_attempts(attempt);
            }
            return Err(e);
        };
        tracing::debug!(
            target: "pgengine::transaction",
            attempt,
            reason,
            wait_ms = wait.as_millis() as u64,
            "transaction failed; trying again"
        );
        tokio::time::sleep(wait).await;
    }
}

/// Why a transaction that failed with `e` may be tried again, or `None`.
fn retry_reason(e: &Error, engine: &PostgresEngine) -> Option<&'static str> {
    match e.code() {
        Some(&SqlState::T_R_SERIALIZATION_FAILURE) => return Some("serialization failure"),
        Some(&SqlState::T_R_DEADLOCK_DETECTED) => return Some("deadlock"),
        Some(&SqlState::READ_ONLY_SQL_TRANSACTION)
            if matches!(
                engine.config().get_target_session_attrs(),
                TargetSessionAttrs::ReadWrite | TargetSessionAttrs::Primary
            ) =>
        {
            return Some("the node is no longer the primary");
        }
        _ => {}
    }
    match e.transaction_error() {
        // Never: the work may have been saved.
        Some(TransactionError::OutcomeUnknown) => return None,
        // The server said so after a lost COMMIT (the loss is the error's source); a block
        // that failed by the caller's own statement is not retried.
        Some(TransactionError::NotCommitted) if lost_connection_behind(e) => {
            return Some("the COMMIT's connection was lost, and the server aborted it");
        }
        _ => {}
    }
    if e.safe_to_retry() {
        return Some("nothing reached the server");
    }
    // A connection lost inside the transaction, before its COMMIT: the server rolls back.
    if connection_lost(e) {
        return Some("the connection was lost before COMMIT");
    }
    None
}

/// True if `e` says the connection was lost: closed, failed, or ended by the server (57P01
/// and its kin come as a FATAL error; class 08 is the connection exception class).
pub(crate) fn connection_lost(e: &Error) -> bool {
    e.is_closed()
        || e.code().is_some_and(|code| {
            code.as_str().starts_with("57P") || code.class() == SqlState::CONNECTION_EXCEPTION
        })
}

/// True if a lost connection is among the causes of `e`.
fn lost_connection_behind(e: &Error) -> bool {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if c.downcast_ref::<Error>().is_some_and(connection_lost) {
            return true;
        }
        cause = c.source();
    }
    false
}
