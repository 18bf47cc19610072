//! Pipelined queries: many tasks' queries share a few pooled connections, each connection
//! carrying many queries at once instead of one round trip at a time.
//!
//! A query outside a transaction is encoded by its own task (values with the types a new
//! statement would choose for them — no connection state needed), then handed to one of a few
//! driver tasks. A driver borrows a connection from the pool, takes every request waiting in
//! its queue, writes them all — each with a Sync of its own, so one query's error touches no
//! other — in one write, and replies to each task as its answer is read. Between two answers
//! it sends whatever has arrived meanwhile, so the server always has work while the client
//! reads and replies. When its queue is empty and nothing is in flight it gives the
//! connection back to the pool, so transactions and batches, which keep a connection to
//! themselves, are never starved.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{mpsc, oneshot};

use super::{ConnectionManager, Pool};
use crate::connection::SentQuery;
use crate::error::{Error, Result};
use crate::query::{EncodedParam, ToQuery};
use crate::row::Row;

/// The most requests one write carries.
const MAX_BATCH: usize = 128;

/// One query handed to a driver.
struct Request {
    sql: Arc<str>,
    params: Vec<EncodedParam>,
    reply: Reply,
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

/// The most queries a driver keeps in flight on its connection.
const MAX_IN_FLIGHT: usize = 256;

type Reply = oneshot::Sender<Result<(Vec<Row>, u64)>>;

/// A query sent and not yet answered: the query (kept for reading its answer, and holding
/// where the answer goes) and what reading it needs.
struct InFlight {
    request: Request,
    sent: SentQuery,
}

/// A driver: borrows a connection while there is work. Between two answers it sends, in one
/// write, every query that has arrived meanwhile, so the server finds the next queries waiting
/// as it finishes one and never sits idle while the client reads and replies.
async fn drive(pool: Pool<ConnectionManager>, mut queue: mpsc::UnboundedReceiver<Request>) {
    while let Some(first) = queue.recv().await {
        let mut conn = match pool.acquire().await {
            Ok(conn) => conn,
            Err(e) => {
                reply(first, Err(e.context("could not get a connection")));
                continue;
            }
        };
        if let Err(e) = conn.finish_pending().await {
            reply(first, Err(e));
            continue;
        }
        let mut inflight: VecDeque<InFlight> = VecDeque::new();
        let mut first = Some(first);
        let failure = loop {
            // Send what has arrived, while there is room in flight.
            let mut requests: Vec<Request> = first.take().into_iter().collect();
            while requests.len() < MAX_BATCH && inflight.len() + requests.len() < MAX_IN_FLIGHT {
                match queue.try_recv() {
                    Ok(r) => requests.push(r),
                    Err(_) => break,
                }
            }
            // A request whose task gave up before it was sent need not run at all.
            requests.retain(|r| !r.reply.is_closed());
            if !requests.is_empty() {
                let queries: Vec<&dyn ToQuery> =
                    requests.iter().map(|r| r as &dyn ToQuery).collect();
                let sent = conn.send_each(&queries).await;
                drop(queries);
                match sent {
                    Ok(sent) => {
                        for (request, sent) in requests.into_iter().zip(sent) {
                            inflight.push_back(InFlight { request, sent });
                        }
                    }
                    Err(e) => {
                        fail_all(requests.into_iter().map(|r| r.reply), &e);
                        break Some(e);
                    }
                }
            }
            // Read the oldest answer and hand it over.
            let Some(InFlight { request, sent }) = inflight.pop_front() else {
                break None;
            };
            match conn.read_answer(&request, sent).await {
                Ok(result) => reply(request, result),
                Err(e) => {
                    fail_all([request.reply], &e);
                    break Some(e);
                }
            }
        };
        if let Some(e) = failure {
            // The connection broke: every request still in flight learns it (the pool
            // discards the connection when it comes back).
            fail_all(inflight.drain(..).map(|q| q.request.reply), &e);
        }
        drop(conn);
    }
}

fn reply(request: Request, result: Result<(Vec<Row>, u64)>) {
    // A task that gave up no longer listens; nothing to do.
    let _ = request.reply.send(result);
}

/// Tells every request still waiting that the connection failed with `e`.
fn fail_all(replies: impl IntoIterator<Item = Reply>, e: &Error) {
    for tx in replies {
        let _ = tx.send(Err(Error::closed(format!(
            "the pipelined connection failed: {e}"
        ))));
    }
}
