//! Pipelined queries: many tasks' queries share a few pooled connections, each connection
//! carrying many queries at once instead of one round trip at a time.
//!
//! A query outside a transaction is encoded by its own task (values with the types a new
//! statement would choose for them — no connection state needed), then handed to a driver
//! task: the first one carrying fewer than the pipeline's depth of queries (waiting or in
//! flight), else the least loaded. Work is concentrated on as few connections as keep up:
//! a server process finds queries waiting whenever it finishes one, and sleeps (to be woken
//! at a cost greater than a point query's) once per many queries instead of once per query,
//! as it did when every query went to the least loaded of all the connections. A
//! driver borrows a connection from the pool, takes every request waiting in its queue,
//! writes them all — each with a Sync of its own, so one query's error touches no other — in
//! one write, and replies to each task as its answer is read. Between two answers
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
    /// Counts the query in its driver's load until it is answered or dropped.
    _load: LoadTicket,
}

/// One query's share of its driver's load: counted when the query is handed over, given back
/// when it is dropped — answered, failed, or abandoned on any path.
struct LoadTicket(Arc<AtomicUsize>);

impl LoadTicket {
    fn take(load: &Arc<AtomicUsize>) -> LoadTicket {
        load.fetch_add(1, Ordering::Relaxed);
        LoadTicket(Arc::clone(load))
    }
}

impl Drop for LoadTicket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ToQuery for Request {
    fn sql(&self) -> &str {
        &self.sql
    }
    fn params(&self) -> &dyn crate::query::Params {
        &self.params
    }
}

/// Hands each query to the least loaded driver.
pub(crate) struct Pipeline {
    drivers: Vec<Driver>,
    /// Where the search for the least loaded driver starts: drivers equally loaded take turns.
    next: AtomicUsize,
    /// How many queries a driver carries before the next one is brought in
    /// ([`PoolOptions::pipeline_depth`](super::PoolOptions::pipeline_depth)).
    depth: usize,
}

/// A driver task, seen from the pipeline.
struct Driver {
    queue: mpsc::UnboundedSender<Request>,
    /// How many queries it has waiting or in flight.
    load: Arc<AtomicUsize>,
}

impl Pipeline {
    /// Starts `drivers` driver tasks over `pool` (needs a tokio runtime), each carrying up to
    /// `depth` queries before the next is used. They end when the pipeline is dropped.
    pub(crate) fn start(pool: Pool<ConnectionManager>, drivers: usize, depth: usize) -> Pipeline {
        let drivers = (0..drivers.max(1))
            .map(|_| {
                let (queue, rx) = mpsc::unbounded_channel();
                tokio::spawn(drive(pool.clone(), rx));
                Driver {
                    queue,
                    load: Arc::default(),
                }
            })
            .collect();
        Pipeline {
            drivers,
            next: AtomicUsize::new(0),
            depth,
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
        let driver = self.driver_for_next();
        let request = Request {
            sql: Arc::from(query.sql()),
            params,
            reply,
            _load: LoadTicket::take(&driver.load),
        };
        driver
            .queue
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

    /// The driver that takes the next query: the first carrying fewer than `depth` queries
    /// (waiting or in flight), else the one with the fewest, equally loaded ones taking turns.
    fn driver_for_next(&self) -> &Driver {
        if let Some(d) = self
            .drivers
            .iter()
            .find(|d| d.load.load(Ordering::Relaxed) < self.depth)
        {
            return d;
        }
        let n = self.drivers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| &self.drivers[(start + k) % n])
            .min_by_key(|d| d.load.load(Ordering::Relaxed))
            .expect("a pipeline has at least one driver")
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
    let Request {
        reply, _load: load, ..
    } = request;
    // The driver's load drops before the task learns its answer, so that the task's next
    // query already sees it.
    drop(load);
    // A task that gave up no longer listens; nothing to do.
    let _ = reply.send(result);
}

/// Tells every request still waiting that the connection failed with `e`.
fn fail_all(replies: impl IntoIterator<Item = Reply>, e: &Error) {
    for tx in replies {
        let _ = tx.send(Err(Error::closed(format!(
            "the pipelined connection failed: {e}"
        ))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pipeline whose drivers are bare queues (no driver tasks): enough to watch the choice.
    fn pipeline(drivers: usize, depth: usize) -> (Pipeline, Vec<mpsc::UnboundedReceiver<Request>>) {
        let (drivers, queues) = (0..drivers)
            .map(|_| {
                let (queue, rx) = mpsc::unbounded_channel();
                let driver = Driver {
                    queue,
                    load: Arc::default(),
                };
                (driver, rx)
            })
            .unzip();
        let pipeline = Pipeline {
            drivers,
            next: AtomicUsize::new(0),
            depth,
        };
        (pipeline, queues)
    }

    fn index(p: &Pipeline, d: &Driver) -> usize {
        p.drivers.iter().position(|x| std::ptr::eq(x, d)).unwrap()
    }

    #[test]
    fn with_depth_one_queries_go_to_an_idle_driver_else_the_least_loaded_in_turns() {
        let (p, _queues) = pipeline(3, 1);
        // All idle: the first.
        let picks: Vec<usize> = (0..3).map(|_| index(&p, p.driver_for_next())).collect();
        assert_eq!(picks, [0, 0, 0]);
        // Driver 0 carries two queries, driver 1 one: driver 2 is the idle one.
        let held = [
            LoadTicket::take(&p.drivers[0].load),
            LoadTicket::take(&p.drivers[0].load),
            LoadTicket::take(&p.drivers[1].load),
        ];
        for _ in 0..3 {
            assert_eq!(index(&p, p.driver_for_next()), 2);
        }
        let third = LoadTicket::take(&p.drivers[2].load);
        // Now 2, 1, 1: never driver 0.
        let picks: Vec<usize> = (0..4).map(|_| index(&p, p.driver_for_next())).collect();
        assert!(picks.iter().all(|&i| i != 0), "{picks:?}");
        assert!(picks.contains(&1) && picks.contains(&2), "{picks:?}");
        // Answered queries give their share back.
        drop(held);
        drop(third);
        assert!(
            p.drivers
                .iter()
                .all(|d| d.load.load(Ordering::Relaxed) == 0)
        );
    }

    #[test]
    fn queries_fill_one_driver_to_the_depth_before_the_next_is_used() {
        let (p, _queues) = pipeline(3, 2);
        let mut held = Vec::new();
        let mut take = |p: &Pipeline| {
            let i = index(p, p.driver_for_next());
            held.push(LoadTicket::take(&p.drivers[i].load));
            i
        };
        let picks: Vec<usize> = (0..6).map(|_| take(&p)).collect();
        assert_eq!(picks, [0, 0, 1, 1, 2, 2]);
        // All full: the least loaded, in turns; never past an even share.
        let picks: Vec<usize> = (0..3).map(|_| take(&p)).collect();
        let mut sorted = picks.clone();
        sorted.sort();
        assert_eq!(sorted, [0, 1, 2], "{picks:?}");
        // The first driver's queries are answered: it is the first to take more again.
        held.retain(|t| !Arc::ptr_eq(&t.0, &p.drivers[0].load));
        assert_eq!(index(&p, p.driver_for_next()), 0);
    }

    #[test]
    fn a_request_gives_its_share_back_however_it_ends() {
        let (p, mut queues) = pipeline(1, 16);
        let load = &p.drivers[0].load;
        let request = |reply| Request {
            sql: Arc::from("SELECT 1"),
            params: Vec::new(),
            reply,
            _load: LoadTicket::take(load),
        };
        let (tx, rx) = oneshot::channel();
        reply(request(tx), Ok((Vec::new(), 0)));
        assert!(matches!(rx.blocking_recv(), Ok(Ok(_))));
        let (tx, _rx) = oneshot::channel();
        fail_all(
            [request(tx)].into_iter().map(|r| r.reply),
            &Error::closed("gone"),
        );
        let (tx, _rx) = oneshot::channel();
        p.drivers[0].queue.send(request(tx)).ok().unwrap();
        assert_eq!(load.load(Ordering::Relaxed), 1, "queued, not answered");
        drop(queues.pop());
        assert_eq!(load.load(Ordering::Relaxed), 0, "dropped with its queue");
    }
}
