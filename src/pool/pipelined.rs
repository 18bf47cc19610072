//! Pipelined queries: many tasks' queries share a few pooled connections, each connection
//! carrying many queries at once instead of one round trip at a time.
//!
//! A query outside a transaction is encoded by its own task (values with the types a new
//! statement would choose for them — no connection state needed), then handed to one of a few
//! driver tasks. A driver borrows a connection from the pool, takes every request waiting in
//! its queue, writes them all — each with a Sync of its own, so one query's error touches no
//! other — in one write, reads the answers in order and replies to each task. While it reads,
//! new requests queue up for its next write. When its queue is empty it gives the connection
//! back to the pool, so transactions and batches, which keep a connection to themselves,
//! are never starved.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{mpsc, oneshot};

use super::{ConnectionManager, Pool};
use crate::error::{Error, Result};
use crate::query::{EncodedParam, ToQuery};
use crate::row::Row;

/// The most requests one write carries.
const MAX_BATCH: usize = 128;

/// One query handed to a driver.
struct Request {
    sql: Arc<str>,
    params: Vec<EncodedParam>,
    reply: oneshot::Sender<Result<(Vec<Row>, u64)>>,
}

impl ToQuery for Request {
    fn sql(&self) -> &str {
        &self.sql
    }
    fn params(&self) -> &dyn crate::query::Params {
        &self.params
    }
}

/// Hands queries to the drivers, round robin.
pub(crate) struct Pipeline {
    drivers: Vec<mpsc::UnboundedSender<Request>>,
    next: AtomicUsize,
}

impl Pipeline {
    /// Starts `drivers` driver tasks over `pool` (needs a tokio runtime). They end when the
    /// pipeline is dropped.
    pub(crate) fn start(pool: Pool<ConnectionManager>, drivers: usize) -> Pipeline {
        let drivers = (0..drivers.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(drive(pool.clone(), rx));
                tx
            })
            .collect();
        Pipeline {
            drivers,
            next: AtomicUsize::new(0),
        }
    }

    /// Runs `query` through a driver, or returns `Ok(None)` if it cannot be pipelined (a value
    /// only the server can type, or SQL whose placeholders we cannot count for sure): the
    /// caller then runs it on a connection of its own.
    pub(crate) async fn run(&self, query: &dyn ToQuery) -> Result<Option<(Vec<Row>, u64)>> {
        // No `$n` count here: a query whose count looks off comes back from the driver as
        // "run it on its own", which costs nothing on the common path.
        if query.time_limit().is_some() {
            // A query with its own time limit is cancelled alone, not with a batch.
            return Ok(None);
        }
        let Some(params) = crate::query::encode_params(query.params())? else {
            return Ok(None);
        };
        let (reply, answer) = oneshot::channel();
        let request = Request {
            sql: Arc::from(query.sql()),
            params,
            reply,
        };
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.drivers.len();
        self.drivers[i]
            .send(request)
            .map_err(|_| Error::pool("the connection pool is closed").retry_safe())?;
        match answer.await {
            Ok(Err(e)) if e.is_needs_own_run() => Ok(None),
            Ok(result) => result.map(Some),
            Err(_) => Err(Error::closed(
                "the pipelined connection failed before answering",
            )),
        }
    }
}

/// A driver: borrows a connection while there is work and sends its queue in batches.
async fn drive(pool: Pool<ConnectionManager>, mut queue: mpsc::UnboundedReceiver<Request>) {
    while let Some(first) = queue.recv().await {
        let mut conn = match pool.acquire().await {
            Ok(conn) => conn,
            Err(e) => {
                let _ = first
                    .reply
                    .send(Err(e.context("could not get a connection")));
                continue;
            }
        };
        let mut batch = vec![first];
        loop {
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            // A request whose task gave up before it was sent need not run at all.
            batch.retain(|r| !r.reply.is_closed());
            if batch.is_empty() {
                break;
            }
            let queries: Vec<&dyn ToQuery> = batch.iter().map(|r| r as &dyn ToQuery).collect();
            let outcome = conn.pipeline_each(&queries).await;
            drop(queries);
            match outcome {
                Ok(results) => {
                    for (request, result) in batch.drain(..).zip(results) {
                        let _ = request.reply.send(result);
                    }
                }
                Err(e) => {
                    // The connection broke: every request of the batch learns it (the pool
                    // discards the connection when it comes back).
                    for request in batch.drain(..) {
                        let _ = request.reply.send(Err(Error::closed(format!(
                            "the pipelined connection failed: {e}"
                        ))));
                    }
                    break;
                }
            }
            if queue.is_empty() {
                break;
            }
        }
        drop(conn);
    }
}
