//! [`AsyncBatch`]: a large result fetched in batches through a native portal, in bounded
//! memory (PostgreSQL docs §55.2.3: Execute with a row limit, PortalSuspended).
//!
//! The query is bound to a portal once; each batch is one `Execute(portal, batch_size)`. To
//! keep the server busy while the caller works on a batch, two Executes are always in flight
//! ahead of the caller: while batch n is in the caller's hands, batches n+1 and n+2 are being
//! produced and sent. Memory stays a few batches, however large the result.
//!
//! Outside a transaction the batch runs in one of its own (`BEGIN` … `COMMIT`) on its own
//! connection, since a portal lives only as long as its transaction; inside a transaction on
//! the task it uses the transaction's connection. Errors in the middle are delivered, never
//! swallowed. Dropping the batch early leaves the connection clean: the rest of what is in
//! flight is read away and the portal's transaction rolled back before the connection is
//! used again.

use std::future::IntoFuture;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use futures::future::BoxFuture;

use crate::connection::{Lease, TransactionStatus};
use crate::engine::PostgresEngine;
use crate::error::{Error, Result};
use crate::query::ToQuery;
use crate::row::{Column, Row};

/// How many Executes stay in flight ahead of the caller.
const PREFETCH: usize = 2;

/// Options of a batch fetch, from [`PostgresEngine::batch`]. Await it (or call `start`) to
/// get the [`AsyncBatch`].
pub struct BatchBuilder<'q> {
    engine: PostgresEngine,
    query: Box<dyn ToQuery + Send + 'q>,
    batch_size: usize,
    node: Option<String>,
}

impl std::fmt::Debug for BatchBuilder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchBuilder")
            .field("sql", &self.query.sql())
            .field("batch_size", &self.batch_size)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl<'q> BatchBuilder<'q> {
    pub(crate) fn new(
        engine: PostgresEngine,
        query: impl ToQuery + Send + 'q,
        batch_size: usize,
    ) -> BatchBuilder<'q> {
        BatchBuilder {
            engine,
            query: Box::new(query),
            batch_size,
            node: None,
        }
    }

    /// Runs the batch on an extra node (a read replica) instead.
    pub fn node(mut self, name: impl Into<String>) -> Self {
        self.node = Some(name.into());
        self
    }

    /// Binds the query to a portal and asks for the first batches.
    pub async fn start(self) -> Result<AsyncBatch<'static>> {
        let batch_size = check_batch(&*self.query, self.batch_size)?;
        let engine = match &self.node {
            Some(name) => self.engine.node(name)?,
            None => self.engine.clone(),
        };
        AsyncBatch::start(engine.lease().await?, &*self.query, batch_size).await
    }
}

impl<'q> IntoFuture for BatchBuilder<'q> {
    type Output = Result<AsyncBatch<'static>>;
    type IntoFuture = BoxFuture<'q, Result<AsyncBatch<'static>>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.start())
    }
}

/// Checks what can be checked before anything is sent: the batch size as the protocol takes
/// it, and that the query does not end the transaction its portal lives in.
pub(crate) fn check_batch(query: &dyn ToQuery, batch_size: usize) -> Result<i32> {
    if batch_size == 0 {
        return Err(Error::config("batch_size must be at least 1").retry_safe());
    }
    let batch_size = i32::try_from(batch_size)
        .map_err(|_| Error::config("batch_size must be at most 2147483647").retry_safe())?;
    if let Some(control) = crate::sql::statement_effects(query.sql()).control {
        // The portal lives in the batch's transaction block: ending it ends the portal.
        return Err(Error::transaction(
            crate::error::TransactionError::ControlStatement,
            format!(
                "{} cannot be fetched in batches (nothing was sent): a batch's portal \
                 lives in a transaction that this would end",
                control.keyword()
            ),
        ));
    }
    Ok(batch_size)
}

struct Inner<'a> {
    conn: Lease<'a>,
    columns: Arc<[Column]>,
    batch_size: i32,
    /// True while the batch's own transaction block is open (and it must end it).
    own: bool,
    /// Executes sent whose answers have not been read.
    in_flight: usize,
    /// The portal said CommandComplete: no more rows.
    exhausted: bool,
    /// A batch read ahead (to learn its column types) and not yet handed out.
    first: Option<Vec<Row>>,
    /// The query's trace: ended with the rows counted once the portal is done, with the
    /// error if one ends it (dropped early: abandoned).
    traced: Option<crate::connection::Traced>,
    /// Rows read so far.
    rows: u64,
}

impl Inner<'_> {
    fn conn(&mut self) -> &mut crate::Connection {
        &mut self.conn
    }

    /// Keeps PREFETCH Executes in flight while the portal may have more.
    async fn top_up(&mut self) -> Result<()> {
        while !self.exhausted && self.in_flight < PREFETCH {
            let batch_size = self.batch_size;
            self.conn().send_execute(batch_size).await?;
            self.in_flight += 1;
        }
        Ok(())
    }

    /// Reads the answer to the oldest Execute in flight: its rows (`None` if it had none).
    async fn next_answer(&mut self) -> Result<Option<Vec<Row>>> {
        let (columns, capacity) = (self.columns.clone(), self.batch_size as usize);
        let read = self.conn().read_portal_batch(&columns, capacity).await;
        self.in_flight -= 1;
        match read {
            Ok((rows, more)) => {
                self.rows += rows.len() as u64;
                if !more {
                    self.exhausted = true;
                    if let Some(traced) = self.traced.take() {
                        traced.succeeded(self.rows);
                    }
                }
                Ok((!rows.is_empty()).then_some(rows))
            }
            Err(e) => {
                if let Some(traced) = self.traced.take() {
                    traced.failed(&e);
                }
                self.abort().await;
                Err(e)
            }
        }
    }

    async fn next_batch(&mut self) -> Result<Option<Vec<Row>>> {
        if let Some(rows) = self.first.take() {
            return Ok(Some(rows));
        }
        while self.in_flight > 0 {
            let rows = self.next_answer().await?;
            // Ask for the next batch before handing this one out, so the server works while
            // the caller does.
            self.top_up().await?;
            if self.exhausted && self.in_flight == 0 {
                self.finish().await?;
            }
            if rows.is_some() {
                return Ok(rows);
            }
        }
        Ok(None)
    }

    /// Ends the batch's own transaction once every answer has been read.
    async fn finish(&mut self) -> Result<()> {
        if self.own {
            self.own = false;
            self.conn().command(&["COMMIT"]).await?;
        }
        Ok(())
    }

    /// After an error: leaves the connection clean (rolls back the batch's own transaction).
    async fn abort(&mut self) {
        self.exhausted = true;
        self.in_flight = 0;
        if self.own && !self.conn().is_broken() {
            self.own = false;
            let _ = self.conn().finish_pending().await;
            let _ = self.conn().command(&["ROLLBACK"]).await;
        }
    }
}

/// A batch being read: gives the batch's state back with the outcome.
type NextBatch<'a> = BoxFuture<'a, (Inner<'a>, Result<Option<Vec<Row>>>)>;

/// A large result, fetched in batches through a portal. Use [`AsyncBatch::next_batch`] or the
/// `Stream` of batches.
///
/// ```no_run
/// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
/// use futures::TryStreamExt;
///
/// let mut batches = engine.batch("SELECT * FROM band", 100).await?;
/// while let Some(rows) = batches.try_next().await? {
///     println!("{} rows", rows.len());
/// }
/// # Ok(())
/// # }
/// ```
pub struct AsyncBatch<'a> {
    /// Present between polls; lent to `pending` while a batch is being read.
    inner: Option<Inner<'a>>,
    pending: Option<NextBatch<'a>>,
}

impl std::fmt::Debug for AsyncBatch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncBatch").finish_non_exhaustive()
    }
}

impl<'a> AsyncBatch<'a> {
    /// Binds `query` to a portal on `conn` and asks for the first batches (`batch_size` from
    /// [`check_batch`], called before the connection was taken). On a connection
    /// outside a transaction block the batch runs in one of its own (a portal lives only as
    /// long as its transaction), `BEGIN READ ONLY` … `COMMIT`; inside one it joins it.
    pub(crate) async fn start(
        mut conn: Lease<'a>,
        query: &dyn ToQuery,
        batch_size: i32,
    ) -> Result<AsyncBatch<'a>> {
        // What the connection still owes (an abandoned request) may change its status.
        conn.prepare_request().await?;
        let own = conn.transaction_status() == TransactionStatus::Idle;
        if own {
            conn.command(&["BEGIN READ ONLY"]).await?;
        }
        let started = conn
            .start_portal(query.sql(), query.params(), batch_size)
            .await;
        let (columns, traced) = match started {
            Ok(started) => started,
            Err(e) => {
                if own && !conn.is_broken() {
                    let _ = conn.command(&["ROLLBACK"]).await;
                }
                return Err(e);
            }
        };
        let mut inner = Inner {
            conn,
            columns,
            batch_size,
            own,
            in_flight: 1,
            exhausted: false,
            first: None,
            traced: Some(traced),
            rows: 0,
        };
        let columns = inner.columns.clone();
        if crate::Connection::needs_lookup(&columns) {
            // Types the server defined at run time: look them up while the connection is free,
            // after the first batch and before any other Execute goes out (through a portal
            // of their own: see `Connection::resolve_type`).
            let first = inner.next_answer().await?;
            inner.columns = inner.conn().resolve_columns(query.sql(), &columns).await?;
            let columns = inner.columns.clone();
            inner.first = first.map(|rows| {
                rows.into_iter()
                    .map(|r| r.retyped(columns.clone()))
                    .collect()
            });
        }
        inner.top_up().await?;
        Ok(AsyncBatch {
            inner: Some(inner),
            pending: None,
        })
    }

    /// The next batch of at most `batch_size` rows, or `None` at the end.
    pub async fn next_batch(&mut self) -> Result<Option<Vec<Row>>> {
        std::future::poll_fn(|cx| self.poll_batch(cx))
            .await
            .transpose()
    }

    /// The result's columns.
    pub fn columns(&self) -> Option<&[Column]> {
        self.inner.as_ref().map(|i| &i.columns[..])
    }

    fn poll_batch(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Vec<Row>>>> {
        if self.pending.is_none() {
            let Some(mut inner) = self.inner.take() else {
                return Poll::Ready(None);
            };
            self.pending = Some(Box::pin(async move {
                let r = inner.next_batch().await;
                (inner, r)
            }));
        }
        let fut = self.pending.as_mut().expect("set above");
        match fut.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready((inner, result)) => {
                self.pending = None;
                match result {
                    Ok(Some(rows)) => {
                        self.inner = Some(inner);
                        Poll::Ready(Some(Ok(rows)))
                    }
                    // The end, or an error: either way the batch is over (inner dropped).
                    Ok(None) => Poll::Ready(None),
                    Err(e) => Poll::Ready(Some(Err(e))),
                }
            }
        }
    }
}

impl Stream for AsyncBatch<'_> {
    type Item = Result<Vec<Row>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_batch(cx)
    }
}

impl Drop for Inner<'_> {
    fn drop(&mut self) {
        // Dropped early with its own transaction block open: the connection rolls it back
        // (after reading away what is in flight) before its next request — a pooled one
        // before it goes back to the pool. Inside a transaction the batch did not open, its
        // next query reads away what is in flight.
        if self.own && !self.conn.is_broken() {
            self.conn.owe_rollback();
        }
    }
}
