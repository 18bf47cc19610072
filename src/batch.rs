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
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use futures::future::BoxFuture;
use tokio::sync::OwnedMutexGuard;

use crate::connection::Connection;
use crate::engine::{EngineConnection, PostgresEngine};
use crate::error::{Error, Result};
use crate::query::{Query, ToQuery};
use crate::row::{Column, Row};
use crate::transaction::TxConn;

/// How many Executes stay in flight ahead of the caller.
const PREFETCH: usize = 2;

/// Options of a batch fetch, from [`PostgresEngine::batch`]. Await it (or call `start`) to
/// get the [`AsyncBatch`].
#[derive(Debug)]
pub struct BatchBuilder {
    engine: PostgresEngine,
    query: Query,
    batch_size: usize,
    node: Option<String>,
}

impl BatchBuilder {
    pub(crate) fn new(engine: PostgresEngine, query: Query, batch_size: usize) -> BatchBuilder {
        BatchBuilder {
            engine,
            query,
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
    pub async fn start(self) -> Result<AsyncBatch> {
        if self.batch_size == 0 {
            return Err(Error::config("batch_size must be at least 1").retry_safe());
        }
        let batch_size = i32::try_from(self.batch_size)
            .map_err(|_| Error::config("batch_size must be at most 2147483647"))?;
        if let Some(control) = crate::sql::statement_effects(self.query.sql()).control {
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
        let engine = match &self.node {
            Some(name) => self.engine.node(name)?,
            None => self.engine.clone(),
        };
        let (mut conn, own) = match crate::transaction::current(&engine) {
            Some(tx) => (BatchConn::Transaction(tx.lock_owned().await?), false),
            None => (BatchConn::Own(Box::new(engine.acquire().await?)), true),
        };
        if own {
            conn.command(&["BEGIN READ ONLY"]).await?;
        }
        let started = conn
            .start_portal(self.query.sql(), self.query.params(), batch_size)
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
            conn: Some(conn),
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
        if inner
            .conn()
            .needs_lookup(columns.iter().map(Column::type_oid))
        {
            // Types the server defined at run time: look them up while the connection is free,
            // after the first batch and before any other Execute goes out.
            let first = inner.next_answer().await?;
            inner.columns = inner.conn().resolve_columns(&columns).await?.into();
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
}

impl IntoFuture for BatchBuilder {
    type Output = Result<AsyncBatch>;
    type IntoFuture = BoxFuture<'static, Result<AsyncBatch>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.start())
    }
}

/// The connection a batch runs on: its own, or its transaction's (locked for the batch).
enum BatchConn {
    Own(Box<EngineConnection>),
    Transaction(OwnedMutexGuard<TxConn>),
}

impl Deref for BatchConn {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        match self {
            BatchConn::Own(c) => c,
            BatchConn::Transaction(t) => t.conn_ref(),
        }
    }
}

impl DerefMut for BatchConn {
    fn deref_mut(&mut self) -> &mut Connection {
        match self {
            BatchConn::Own(c) => c,
            BatchConn::Transaction(t) => t.conn(),
        }
    }
}

struct Inner {
    /// Always `Some` until dropped (taken by Drop's clean-up).
    conn: Option<BatchConn>,
    columns: Arc<[Column]>,
    batch_size: i32,
    /// True when the batch began its own transaction (and must end it).
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

impl Inner {
    fn conn(&mut self) -> &mut BatchConn {
        self.conn
            .as_mut()
            .expect("the connection is present until the batch is dropped")
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
type NextBatch = BoxFuture<'static, (Inner, Result<Option<Vec<Row>>>)>;

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
pub struct AsyncBatch {
    /// Present between polls; lent to `pending` while a batch is being read.
    inner: Option<Inner>,
    pending: Option<NextBatch>,
}

impl std::fmt::Debug for AsyncBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncBatch").finish_non_exhaustive()
    }
}

impl AsyncBatch {
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

impl Stream for AsyncBatch {
    type Item = Result<Vec<Row>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_batch(cx)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let Some(BatchConn::Own(mut conn)) = self.conn.take() else {
            // Inside a transaction, its next query reads away what is in flight.
            return;
        };
        if !self.own || conn.is_broken() {
            return;
        }
        // Dropped early with its own transaction open: read away what is in flight and roll
        // back before the connection goes back to the pool — in a task, since that is I/O. If
        // it does not finish in time, the connection is dropped still busy and the pool closes
        // it rather than reuse it.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let clean = async {
                    conn.finish_pending().await?;
                    conn.command(&["ROLLBACK"]).await
                };
                let _ = tokio::time::timeout(std::time::Duration::from_secs(5), clean).await;
                drop(conn);
            });
        }
    }
}
