//! Pipelined queries: many tasks' queries share a few pooled connections, each connection
//! carrying many queries at once instead of one round trip at a time.
//!
//! A query outside a transaction is encoded by its own task (values with the types a new
//! statement would choose for them — no connection state needed), then handed to a driver
//! task. Work is concentrated on as few connections as keep up: a server process that finds
//! queries waiting whenever it finishes one sleeps (to be woken at a cost greater than a
//! point query's) once per many queries, where spreading every query to the least loaded of
//! all the connections woke one per query. So a query goes to the first driver that has
//! fewer than the pipeline's depth of queries waiting or in flight — unless those would keep
//! it waiting past a budget of 50 ms, judged from how long the driver's answers have lately
//! taken and how long its oldest query has been out, so that quick queries are not queued
//! behind a slow one while another connection could run them. When every driver is full, the
//! least loaded takes it.
//!
//! A driver borrows a connection from the pool, takes every request waiting in its queue,
//! writes them all — each with a Sync of its own, so one query's error touches no other — in
//! one write, and reads the answers in order. The answers read before it has to wait for more
//! are handed over as a relay, each task waking the next ([`Relay`]), so that a multi-threaded
//! runtime is not made to wake another worker thread to share them. Whenever it has read every
//! answer received so far, it sends whatever has arrived meanwhile, so the server always has
//! work while the client reads and replies. When its queue is empty and nothing
//! is in flight it gives the connection back to the pool, so transactions and batches, which
//! keep a connection to themselves, are never starved.
//!
//! Only statements that neither control the transaction nor change the session reach a
//! driver (the engine reads each statement's text first, `crate::sql::effects`). What the
//! text cannot show is caught from what the server says, after every query:
//!
//! - **ReadyForQuery's status is the safety net.** Every pipelined query ends with a Sync of
//!   its own, so the status after it must be Idle. If it is not, the query opened a
//!   transaction block and the queries sent behind it ran inside that block: the driver sends
//!   nothing more on the connection, reads what is in flight, rolls the block back, and
//!   answers every query of the block with an error saying that nothing of it was committed
//!   (never Ok). Should a later query end the block instead, what it ended it with is unknown,
//!   and the queries of the block are told that their outcome is unknown.
//! - **A session change takes the connection out.** A parameter the server reports with a
//!   new value (a `set_config` inside a function), or a command tag that changes the session,
//!   means the session is no longer the one every task expects: the driver sends nothing more
//!   on the connection and gives it back once what is in flight is read, and the pool puts the
//!   session back as it began before anyone uses it again. Queries already sent behind it
//!   have run; the docs of [`PoolOptions::pipeline`](super::PoolOptions::pipeline) say what
//!   remains the caller's to avoid.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::{ConnectionManager, Pool};
use crate::connection::{Connection, PipelinedAnswer, QueryOrigin, SentQuery, TransactionStatus};
use crate::error::{Error, Result, TransactionError};
use crate::query::{EncodedParam, ToQuery};
use crate::row::Row;

/// The most requests one write carries.
const MAX_BATCH: usize = 128;

/// The most queries waiting in one driver's queue: beyond it a task waits for room (within
/// its acquire deadline) instead of the queue growing without bound.
const QUEUE_LIMIT: usize = 1024;

/// One query handed to a driver.
struct Request {
    sql: Arc<str>,
    params: Vec<EncodedParam>,
    /// When the query stops waiting for a connection: `acquire_timeout` after it was queued,
    /// counted once, however many acquires are tried for the queries ahead of it.
    deadline: tokio::time::Instant,
    /// When it was queued, and the span of the task that queued it: its trace belongs there,
    /// though the driver's task sends it. Taken only when a subscriber wants the queries'
    /// traces.
    queued_at: Option<Instant>,
    span: tracing::Span,
    reply: Reply,
    /// Counts the query in its driver's load until it is answered or dropped.
    _load: LoadTicket,
}

/// One query's share of its driver's load: counted when the query is handed over, given back
/// when it is dropped — answered, failed, or abandoned on any path.
struct LoadTicket(Arc<Gauge>);

impl LoadTicket {
    fn take(gauge: &Arc<Gauge>) -> LoadTicket {
        gauge.load.fetch_add(1, Ordering::Relaxed);
        LoadTicket(Arc::clone(gauge))
    }
}

impl Drop for LoadTicket {
    fn drop(&mut self) {
        self.0.load.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The most work, by the time it is expected to take, that queues on one pipelined connection
/// before the next connection is brought in: a query should not wait behind others for much
/// longer than this while another connection could run it. Generous, because a busy server
/// makes quick queries wait too: at 5 ms, on a 2-core server saturated by the benchmark, the
/// waits of quick queries spread them to idle connections often enough to cost 3–5%.
const QUEUE_BUDGET_NS: u64 = 50_000_000;

/// What the pipeline knows of one driver's work, kept up to date by the driver.
struct Gauge {
    /// Queries waiting or in flight.
    load: AtomicUsize,
    /// How long each answer has lately taken to come after the one before it (a moving
    /// average, in nanoseconds): the server's time per query on this connection, as seen from
    /// here. Until answers have been timed it is the whole budget, so that a burst of queries
    /// of unknown cost is spread, not queued on one connection.
    per_answer: AtomicU64,
    /// When the oldest query in flight was sent ([`Clock::now`]), 0 when none is.
    oldest_sent: AtomicU64,
}

impl Gauge {
    fn new() -> Gauge {
        Gauge {
            load: AtomicUsize::new(0),
            per_answer: AtomicU64::new(QUEUE_BUDGET_NS),
            oldest_sent: AtomicU64::new(0),
        }
    }

    /// Whether the driver should take the next query: it is idle, or it carries fewer than
    /// `depth` queries, all of them expected within the budget, and its oldest one has not
    /// been waiting longer than that (a slow query holds the connection).
    fn takes_more(&self, now: u64, depth: usize) -> bool {
        let load = self.load.load(Ordering::Relaxed);
        if load == 0 {
            return true;
        }
        if load >= depth {
            return false;
        }
        let expected = (load as u64).saturating_mul(self.per_answer.load(Ordering::Relaxed));
        let oldest = self.oldest_sent.load(Ordering::Relaxed);
        let waited = if oldest == 0 {
            0
        } else {
            now.saturating_sub(oldest)
        };
        expected < QUEUE_BUDGET_NS && waited < QUEUE_BUDGET_NS
    }

    /// Takes one answer's time into the moving average (each new one counts for a quarter).
    fn record_answer(&self, took: u64) {
        let old = self.per_answer.load(Ordering::Relaxed);
        let new = (old - old / 4).saturating_add(took / 4);
        self.per_answer.store(new, Ordering::Relaxed);
    }
}

/// Nanoseconds since the pipeline started, never 0 (0 stands for "no time"), on the runtime's
/// clock (which a test may have paused), as the deadlines are.
#[derive(Clone, Copy)]
struct Clock(tokio::time::Instant);

impl Clock {
    fn now(&self) -> u64 {
        self.at(tokio::time::Instant::now())
    }

    /// `instant` on this clock.
    fn at(&self, instant: tokio::time::Instant) -> u64 {
        u64::try_from(instant.saturating_duration_since(self.0).as_nanos()).unwrap_or(u64::MAX) | 1
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
    clock: Clock,
    /// How long a query may wait for a connection (the pool's `acquire_timeout`).
    acquire_timeout: std::time::Duration,
}

/// A driver task, seen from the pipeline.
struct Driver {
    queue: mpsc::Sender<Request>,
    gauge: Arc<Gauge>,
}

impl Pipeline {
    /// Starts `drivers` driver tasks over `pool` (needs a tokio runtime), each carrying up to
    /// `depth` queries before the next is used. They end when the pipeline is dropped.
    pub(crate) fn start(pool: Pool<ConnectionManager>, drivers: usize, depth: usize) -> Pipeline {
        let clock = Clock(tokio::time::Instant::now());
        let acquire_timeout = pool.options().acquire_timeout;
        let drivers = (0..drivers.max(1))
            .map(|_| {
                let (queue, rx) = mpsc::channel(QUEUE_LIMIT);
                let gauge = Arc::new(Gauge::new());
                tokio::spawn(drive(pool.clone(), rx, gauge.clone(), clock));
                Driver { queue, gauge }
            })
            .collect();
        Pipeline {
            drivers,
            next: AtomicUsize::new(0),
            depth,
            clock,
            acquire_timeout,
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
        let watched = tracing::span_enabled!(target: "pgengine::query", tracing::Level::INFO);
        // One clock reading for the choice of driver and the deadline (the runtime's clock,
        // which a test may have paused).
        let queued = tokio::time::Instant::now();
        let driver = self.driver_for_next(self.clock.at(queued));
        let deadline = queued + self.acquire_timeout;
        let request = Request {
            sql: Arc::from(query.sql()),
            params,
            deadline,
            queued_at: watched.then(Instant::now),
            span: if watched {
                tracing::Span::current()
            } else {
                tracing::Span::none()
            },
            reply,
            _load: LoadTicket::take(&driver.gauge),
        };
        let closed = || Error::pool("the connection pool is closed").retry_safe();
        match driver.queue.try_send(request) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(closed()),
            Err(mpsc::error::TrySendError::Full(request)) => {
                // Back-pressure: wait for room, as a waiter for a connection would.
                match tokio::time::timeout_at(deadline, driver.queue.send(request)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Err(closed()),
                    Err(_) => {
                        return Err(Error::timeout(format!(
                            "the pipeline's queue stayed full for {:?} (acquire_timeout): the \
                             server does not keep up with the queries",
                            self.acquire_timeout
                        ))
                        .retry_safe());
                    }
                }
            }
        }
        match answer.await {
            Ok(Delivery { answer, rest }) => {
                rest.pass();
                answer
            }
            Err(_) => Err(Error::closed(
                "the pipelined connection failed before answering",
            )),
        }
    }

    /// The driver that takes the next query: the first that [takes more](Gauge::takes_more),
    /// else the one with the fewest queries waiting or in flight, equally loaded ones taking
    /// turns.
    fn driver_for_next(&self, now: u64) -> &Driver {
        if let Some(d) = self
            .drivers
            .iter()
            .find(|d| d.gauge.takes_more(now, self.depth))
        {
            return d;
        }
        let n = self.drivers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| &self.drivers[(start + k) % n])
            .min_by_key(|d| d.gauge.load.load(Ordering::Relaxed))
            .expect("a pipeline has at least one driver")
    }
}

/// The most queries a driver keeps in flight on its connection.
const MAX_IN_FLIGHT: usize = 256;

/// How many queries' room a driver keeps in its buffers while its connection is given back.
const KEEP: usize = 64;

type Reply = oneshot::Sender<Delivery>;

/// What a task receives: its answer, and the answers read with it that are still to be
/// handed over, which the task passes on as soon as it has its own.
struct Delivery {
    answer: PipelinedAnswer,
    rest: Relay,
}

/// Answers read together, handed over one task at a time: the driver wakes the first task,
/// which wakes the next as it takes its answer, and so on. Waking them all at once would
/// make several tasks runnable together, and a multi-threaded tokio runtime then wakes an
/// idle worker thread to share them — a futex and two context switches for a few
/// microseconds of work (measured: one per read of two answers or more). One task runnable
/// at a time stays with the worker that read the answers. A relay carries at most
/// [`RELAY_LEN`] answers, so that no task waits for more than a few others' turns (a turn
/// lasts until the task next waits, however much work it does meanwhile) and a large read
/// is still shared out between the workers.
///
/// No answer is lost on any path: a task that gave up is passed over, and a relay dropped
/// before it was passed on (a task's future dropped with its answer unread, a driver's task
/// ended) hands its answers over as it goes.
#[derive(Default)]
struct Relay(VecDeque<(Reply, PipelinedAnswer)>);

impl Relay {
    /// Hands the first answer whose task still listens to that task, the rest riding with it.
    fn pass(mut self) {
        while let Some((tx, answer)) = self.0.pop_front() {
            let rest = Relay(std::mem::take(&mut self.0));
            match tx.send(Delivery { answer, rest }) {
                Ok(()) => return,
                // Gone: the next one takes its place.
                Err(mut undelivered) => self.0 = std::mem::take(&mut undelivered.rest.0),
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            Relay(std::mem::take(&mut self.0)).pass();
        }
    }
}

/// A query sent and not yet answered: the query (kept for reading its answer, and holding
/// where the answer goes) and what reading it needs.
struct InFlight {
    request: Request,
    sent: SentQuery,
    /// When it was written ([`Clock::now`]).
    sent_at: u64,
}

/// A driver: borrows a connection while there is work. Each time it has read the answers
/// received so far it sends, in one write, every query that has arrived meanwhile, so
/// the server finds the next queries waiting as it finishes one and never sits idle while the
/// client reads and replies.
async fn drive(
    pool: Pool<ConnectionManager>,
    mut queue: mpsc::Receiver<Request>,
    gauge: Arc<Gauge>,
    clock: Clock,
) {
    // Queries taken from the queue but not sent yet (their turn comes after a failed
    // acquire, or after a connection that left the pipeline).
    let mut backlog: VecDeque<Request> = VecDeque::new();
    // The queries of one write, what reading their answers needs, and the queries sent and
    // not yet answered: kept from one write and one connection to the next (within
    // `KEEP`), not allocated anew each time.
    let mut batch: Vec<Request> = Vec::new();
    let mut sent: Vec<SentQuery> = Vec::new();
    let mut inflight: VecDeque<InFlight> = VecDeque::new();
    loop {
        let first = match backlog.pop_front() {
            Some(r) => r,
            None => match queue.recv().await {
                Some(r) => r,
                None => break,
            },
        };
        let mut conn = match pool.acquire_by(first.deadline).await {
            Ok(conn) => conn,
            Err(e) => {
                // Every query whose own wait is over by now fails with it; the others keep
                // waiting, each until its own deadline (not one acquire_timeout each).
                let now = tokio::time::Instant::now();
                let e = e.context("could not get a connection");
                while let Ok(r) = queue.try_recv() {
                    backlog.push_back(r);
                }
                let (expired, waiting): (Vec<_>, Vec<_>) =
                    backlog.drain(..).partition(|r| r.deadline <= now);
                backlog.extend(waiting);
                for r in expired {
                    reply(r, Err(e.duplicate()));
                }
                reply(first, Err(e));
                continue;
            }
        };
        if let Err(e) = conn.finish_pending().await {
            reply(first, Err(e));
            continue;
        }
        let mut first = Some(first);
        // When the last answer on this connection came (0: none yet).
        let mut last_answer = 0;
        // The queries that ran inside a transaction block one of them opened, once one did.
        let mut block: Option<Vec<Request>> = None;
        // The connection takes no more queries: it goes back to the pool to be cleaned once
        // what is in flight has been read.
        let mut leaving = false;
        // Answers read and not handed over yet: they go, as a relay, whenever the driver
        // would wait.
        let mut ready = Relay::default();
        let failure = loop {
            // Send what has arrived, while there is room in flight — once the answers already
            // received have been read: one write for all that arrived meanwhile, not
            // one per answer (measured: 2% more queries per second on one core and on two).
            batch.extend(first.take());
            let answers_waiting = !inflight.is_empty() && conn.has_buffered_message();
            while !answers_waiting
                && !leaving
                && batch.len() < MAX_BATCH
                && inflight.len() + batch.len() < MAX_IN_FLIGHT
            {
                match backlog
                    .pop_front()
                    .map(Ok)
                    .unwrap_or_else(|| queue.try_recv())
                {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            // A request whose task gave up before it was sent need not run at all.
            batch.retain(|r| !r.reply.is_closed());
            if !batch.is_empty() {
                let queries = batch.iter().map(|r| {
                    let origin = QueryOrigin {
                        span: &r.span,
                        queued: r.queued_at.map_or(Default::default(), |t| t.elapsed()),
                    };
                    (r as &dyn ToQuery, origin)
                });
                // Sending may wait for the socket: the answers read go first.
                std::mem::take(&mut ready).pass();
                match conn.send_each(queries, &mut sent).await {
                    Ok(()) => {
                        let sent_at = clock.now();
                        if inflight.is_empty() {
                            gauge.oldest_sent.store(sent_at, Ordering::Relaxed);
                        }
                        for (request, sent) in batch.drain(..).zip(sent.drain(..)) {
                            inflight.push_back(InFlight {
                                request,
                                sent,
                                sent_at,
                            });
                        }
                    }
                    Err(e) => {
                        sent.clear();
                        fail_all(batch.drain(..).map(|r| r.reply), &e);
                        break Some(e);
                    }
                }
            }
            // Read the oldest answer and hand it over.
            let Some(InFlight {
                request,
                sent,
                sent_at,
            }) = inflight.pop_front()
            else {
                if let Some(run) = block.take() {
                    std::mem::take(&mut ready).pass();
                    roll_back_block(&mut conn, run).await;
                }
                break None;
            };
            let buffered = conn.has_buffered_answer();
            if !buffered {
                // Reading it will wait for the socket: the answers read go first.
                std::mem::take(&mut ready).pass();
            }
            let answer = conn.read_answer(&request, sent).await;
            // An answer that was whole in the buffer came with the one before it.
            let now = if buffered && last_answer != 0 {
                last_answer
            } else {
                clock.now()
            };
            if sent_at <= last_answer {
                // Queued while the previous answer was coming: the time between the two is
                // what the server took for this one. (An answer to a query sent to an idle
                // connection also holds the wake-up of its server process, and the wait for
                // a CPU on a busy server: it says nothing of the query.)
                gauge.record_answer(now.saturating_sub(last_answer));
            }
            last_answer = now;
            let oldest = inflight.front().map_or(0, |q| q.sent_at);
            gauge.oldest_sent.store(oldest, Ordering::Relaxed);
            let answer = match answer {
                Ok(answer) => answer,
                Err(e) => {
                    fail_all([request.reply], &e);
                    break Some(e);
                }
            };
            let idle = conn.transaction_status() == TransactionStatus::Idle;
            match &mut block {
                None if idle => {
                    reply_later(&mut ready, request, answer);
                    if conn.session_changed() {
                        leaving = true;
                    }
                }
                None => {
                    // Its Sync left a block open: it and everything behind it ran inside.
                    tracing::warn!(
                        target: "pgengine::pool",
                        "a pipelined statement left a transaction block open; the queries \
                         behind it are rolled back with it"
                    );
                    block = Some(vec![request]);
                    leaving = true;
                }
                Some(run) => {
                    run.push(request);
                    if idle {
                        // Something ended the block: with COMMIT or ROLLBACK, we cannot tell.
                        for request in block.take().into_iter().flatten() {
                            reply(request, Err(outcome_unknown()));
                        }
                    }
                }
            }
        };
        ready.pass();
        if let Some(e) = failure {
            // The connection broke: every request still in flight learns it (the pool
            // discards the connection when it comes back). A block still open ends with the
            // session, rolled back by the server.
            for request in block.take().into_iter().flatten() {
                reply(request, Err(not_committed("the connection was lost")));
            }
            fail_all(inflight.drain(..).map(|q| q.request.reply), &e);
            gauge.oldest_sent.store(0, Ordering::Relaxed);
        }
        debug_assert!(batch.is_empty() && sent.is_empty() && inflight.is_empty());
        batch.shrink_to(KEEP);
        sent.shrink_to(KEEP);
        inflight.shrink_to(KEEP);
        drop(conn);
    }
}

impl Request {
    /// Where its answer goes, its share of the driver's load given back: the load drops
    /// before the task learns its answer, so that the task's next query already sees it.
    #[inline(always)]
    fn into_reply(self) -> Reply {
        let Request {
            reply, _load: load, ..
        } = self;
        drop(load);
        reply
    }
}

impl Delivery {
    /// An answer handed over on its own.
    fn alone(answer: PipelinedAnswer) -> Delivery {
        Delivery {
            answer,
            rest: Relay::default(),
        }
    }
}

fn reply(request: Request, result: PipelinedAnswer) {
    // A task that gave up no longer listens; nothing to do.
    let _ = request.into_reply().send(Delivery::alone(result));
}

/// Adds `request`'s answer to the ones read since the driver last waited, to be handed over
/// together ([`Relay`]).
fn reply_later(ready: &mut Relay, request: Request, answer: PipelinedAnswer) {
    if ready.0.len() == RELAY_LEN {
        std::mem::take(ready).pass();
    }
    ready.0.push_back((request.into_reply(), answer));
}

/// The most answers one [`Relay`] carries: the longer a relay, the longer its last task waits
/// for its turn, and after 3 tasks in a row have woken one another tokio wakes another worker
/// all the same. Measured (client CPU and context switches per pooled query, 2 workers): 3
/// answers 6.7–6.9 µs and 0.58–0.59, as reads of 4 answers were split; 4 answers 5.5–6.2 µs
/// and 0.38–0.39. Unpinned, the pool's rate against pgbench's pipeline mode, 3 rounds each:
/// 4 answers 0.92–0.99×, no limit 0.84–0.99×, before the relay 0.85–0.89×.
const RELAY_LEN: usize = 4;

/// Rolls back the transaction block that the queries of `run` ran in (the first of them
/// opened it), and tells each that nothing of it was committed. If the rollback fails, the
/// connection is broken and the server rolls the block back as the session ends.
async fn roll_back_block(conn: &mut Connection, run: Vec<Request>) {
    let how = match conn.reset().await {
        Ok(()) => "it was rolled back",
        Err(_) => "the connection was closed with the block open",
    };
    for request in run {
        reply(request, Err(not_committed(how)));
    }
}

/// The answer of a query that ran inside a transaction block that a statement on its shared
/// connection left open.
fn not_committed(how: &str) -> Error {
    Error::transaction(
        TransactionError::NotCommitted,
        format!(
            "this query ran on a pipelined connection inside a transaction block that a \
             statement sent through the pipeline left open, and {how}: nothing of it was \
             committed. Run transactions through engine.transaction()"
        ),
    )
}

/// The answer of a query that ran inside a transaction block which a later query on the same
/// pipelined connection ended, with COMMIT or ROLLBACK: we cannot tell.
fn outcome_unknown() -> Error {
    Error::transaction(
        TransactionError::OutcomeUnknown,
        "this query ran on a pipelined connection inside a transaction block that statements \
         sent through the pipeline opened and ended: whether it was committed is unknown, check \
         before retrying",
    )
}

/// Tells every request still waiting that the connection failed with `e` (its kind and
/// SQLSTATE kept: a backend ended by `pg_terminate_backend` is 57P01 for each of them).
fn fail_all(replies: impl IntoIterator<Item = Reply>, e: &Error) {
    for tx in replies {
        let _ = tx.send(Delivery::alone(Err(e
            .duplicate()
            .context("the pipelined connection failed"))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Answers this fast leave the depth as the only limit.
    const FAST: u64 = 1_000;

    /// A pipeline whose drivers are bare queues (no driver tasks): enough to watch the choice.
    /// Its clock started `age` ago; each driver's answers have lately taken `per_answer`.
    fn pipeline_aged(
        drivers: usize,
        depth: usize,
        per_answer: u64,
        age: Duration,
    ) -> (Pipeline, Vec<mpsc::Receiver<Request>>) {
        let (drivers, queues) = (0..drivers)
            .map(|_| {
                let (queue, rx) = mpsc::channel(QUEUE_LIMIT);
                let gauge = Arc::new(Gauge::new());
                gauge.per_answer.store(per_answer, Ordering::Relaxed);
                (Driver { queue, gauge }, rx)
            })
            .unzip();
        let started = tokio::time::Instant::now().checked_sub(age).unwrap();
        let pipeline = Pipeline {
            drivers,
            next: AtomicUsize::new(0),
            depth,
            clock: Clock(started),
            acquire_timeout: Duration::from_secs(30),
        };
        (pipeline, queues)
    }

    fn pipeline(
        drivers: usize,
        depth: usize,
        per_answer: u64,
    ) -> (Pipeline, Vec<mpsc::Receiver<Request>>) {
        pipeline_aged(drivers, depth, per_answer, Duration::ZERO)
    }

    fn index(p: &Pipeline, d: &Driver) -> usize {
        p.drivers.iter().position(|x| std::ptr::eq(x, d)).unwrap()
    }

    /// Picks a driver and counts a query on it, as `run` does.
    fn take(p: &Pipeline, held: &mut Vec<LoadTicket>) -> usize {
        let i = index(p, p.driver_for_next(p.clock.now()));
        held.push(LoadTicket::take(&p.drivers[i].gauge));
        i
    }

    #[test]
    fn with_depth_one_queries_go_to_an_idle_driver_else_the_least_loaded_in_turns() {
        let (p, _queues) = pipeline(3, 1, FAST);
        // All idle: the first.
        let picks: Vec<usize> = (0..3)
            .map(|_| index(&p, p.driver_for_next(p.clock.now())))
            .collect();
        assert_eq!(picks, [0, 0, 0]);
        // Driver 0 carries two queries, driver 1 one: driver 2 is the idle one.
        let held = [
            LoadTicket::take(&p.drivers[0].gauge),
            LoadTicket::take(&p.drivers[0].gauge),
            LoadTicket::take(&p.drivers[1].gauge),
        ];
        for _ in 0..3 {
            assert_eq!(index(&p, p.driver_for_next(p.clock.now())), 2);
        }
        let third = LoadTicket::take(&p.drivers[2].gauge);
        // Now 2, 1, 1: never driver 0.
        let picks: Vec<usize> = (0..4)
            .map(|_| index(&p, p.driver_for_next(p.clock.now())))
            .collect();
        assert!(picks.iter().all(|&i| i != 0), "{picks:?}");
        assert!(picks.contains(&1) && picks.contains(&2), "{picks:?}");
        // Answered queries give their share back.
        drop(held);
        drop(third);
        assert!(
            p.drivers
                .iter()
                .all(|d| d.gauge.load.load(Ordering::Relaxed) == 0)
        );
    }

    #[test]
    fn fast_queries_fill_one_driver_to_the_depth_before_the_next_is_used() {
        let (p, _queues) = pipeline(3, 2, FAST);
        let mut held = Vec::new();
        let picks: Vec<usize> = (0..6).map(|_| take(&p, &mut held)).collect();
        assert_eq!(picks, [0, 0, 1, 1, 2, 2]);
        // All full: the least loaded, in turns; never past an even share.
        let mut picks: Vec<usize> = (0..3).map(|_| take(&p, &mut held)).collect();
        picks.sort();
        assert_eq!(picks, [0, 1, 2]);
        // The first driver's queries are answered: it is the first to take more again.
        held.retain(|t| !Arc::ptr_eq(&t.0, &p.drivers[0].gauge));
        assert_eq!(index(&p, p.driver_for_next(p.clock.now())), 0);
    }

    #[test]
    fn queries_of_unknown_or_slow_cost_are_spread_until_answers_show_them_fast() {
        // Nothing timed yet: one query per driver, then the least loaded.
        let (p, _queues) = pipeline(3, 16, QUEUE_BUDGET_NS);
        let mut held = Vec::new();
        let picks: Vec<usize> = (0..3).map(|_| take(&p, &mut held)).collect();
        assert_eq!(picks, [0, 1, 2]);
        // Driver 0's answers come in 10 µs: it takes queries up to the depth.
        for _ in 0..40 {
            p.drivers[0].gauge.record_answer(10_000);
        }
        let per_answer = p.drivers[0].gauge.per_answer.load(Ordering::Relaxed);
        assert!((10_000..20_000).contains(&per_answer), "{per_answer}");
        let picks: Vec<usize> = (0..15).map(|_| take(&p, &mut held)).collect();
        assert_eq!(picks, [0; 15]);
        // Queries of 15 ms: a driver takes four (the last expected to wait 45 ms, under the
        // 50 ms budget), then the next driver is brought in.
        let (p, _queues) = pipeline(2, 16, 15_000_000);
        let mut held = Vec::new();
        let picks: Vec<usize> = (0..8).map(|_| take(&p, &mut held)).collect();
        assert_eq!(picks, [0, 0, 0, 0, 1, 1, 1, 1]);
    }

    #[test]
    fn a_driver_whose_oldest_query_waits_past_the_budget_is_passed_over() {
        let (p, _queues) = pipeline_aged(2, 16, FAST, Duration::from_millis(200));
        let mut held = vec![LoadTicket::take(&p.drivers[0].gauge)];
        // Its one query was sent 200 ms ago, at the clock's start: driver 1 takes the next.
        p.drivers[0].gauge.oldest_sent.store(1, Ordering::Relaxed);
        assert_eq!(take(&p, &mut held), 1);
        // Sent just now: driver 0 takes it again.
        let now = p.clock.now();
        p.drivers[0].gauge.oldest_sent.store(now, Ordering::Relaxed);
        assert_eq!(take(&p, &mut held), 0);
    }

    /// A relay of answers numbered by their row counts, to channels `0..n`.
    fn numbered(n: u64) -> (Relay, Vec<oneshot::Receiver<Delivery>>) {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| oneshot::channel()).unzip();
        let relay = Relay(
            txs.into_iter()
                .zip(0..)
                .map(|(tx, i)| (tx, Ok(Some((Vec::new(), i)))))
                .collect(),
        );
        (relay, rxs)
    }

    fn number(answer: &PipelinedAnswer) -> u64 {
        match answer {
            Ok(Some((_, n))) => *n,
            other => panic!("not a numbered answer: {other:?}"),
        }
    }

    #[test]
    fn a_relay_wakes_one_task_at_a_time_and_passes_over_those_that_gave_up() {
        let (relay, mut rxs) = numbered(4);
        drop(rxs.remove(2)); // task 2 gave up
        relay.pass();
        // Only task 0 has its answer; the others ride with it.
        for rx in &mut rxs[1..] {
            assert!(rx.try_recv().is_err(), "woken before its turn");
        }
        let first = rxs[0].try_recv().unwrap();
        assert_eq!(number(&first.answer), 0);
        assert_eq!(first.rest.0.len(), 3);
        first.rest.pass();
        let second = rxs[1].try_recv().unwrap();
        assert_eq!(number(&second.answer), 1);
        assert!(rxs[2].try_recv().is_err());
        second.rest.pass();
        // Task 2 is passed over: task 3 has its answer, and nothing rides with it.
        let last = rxs[2].try_recv().unwrap();
        assert_eq!(number(&last.answer), 3);
        assert!(last.rest.0.is_empty());
    }

    #[test]
    fn answers_riding_with_one_nobody_reads_are_handed_over_all_the_same() {
        // A task's future dropped with its answer unread: the rest go on.
        let (relay, mut rxs) = numbered(3);
        relay.pass();
        drop(rxs.remove(0));
        let next = rxs[0].try_recv().unwrap();
        assert_eq!(number(&next.answer), 1);
        // A task that has its answer and drops the rest without passing it on.
        drop(next);
        assert_eq!(number(&rxs[1].try_recv().unwrap().answer), 2);
        // A relay never passed (its driver's task ended): its first task is answered.
        let (relay, mut rxs) = numbered(2);
        drop(relay);
        let first = rxs[0].try_recv().unwrap();
        assert_eq!(number(&first.answer), 0);
        assert!(rxs[1].try_recv().is_err(), "rides with the first");
        drop(first);
        assert_eq!(number(&rxs[1].try_recv().unwrap().answer), 1);
    }

    /// A query of `SELECT 1` counted on `gauge`, answered through `reply`.
    fn request(gauge: &Arc<Gauge>, reply: Reply) -> Request {
        Request {
            sql: Arc::from("SELECT 1"),
            params: Vec::new(),
            deadline: tokio::time::Instant::now(),
            queued_at: None,
            span: tracing::Span::none(),
            reply,
            _load: LoadTicket::take(gauge),
        }
    }

    #[test]
    fn answers_read_together_go_in_relays_of_at_most_relay_len() {
        let (p, _queues) = pipeline(1, 16, FAST);
        let gauge = &p.drivers[0].gauge;
        let mut ready = Relay::default();
        let mut rxs = Vec::new();
        for i in 0..RELAY_LEN as u64 + 2 {
            let (reply, rx) = oneshot::channel();
            rxs.push(rx);
            reply_later(&mut ready, request(gauge, reply), Ok(Some((Vec::new(), i))));
        }
        // Every answer's share of the load is given back as it is read.
        assert_eq!(gauge.load.load(Ordering::Relaxed), 0);
        // The first relay went when it was full: its first task has its answer.
        let first = rxs[0].try_recv().unwrap();
        assert_eq!(first.rest.0.len(), RELAY_LEN - 1);
        assert!(
            rxs[RELAY_LEN].try_recv().is_err(),
            "held for the next relay"
        );
        ready.pass();
        let next = rxs[RELAY_LEN].try_recv().unwrap();
        assert_eq!(number(&next.answer), RELAY_LEN as u64);
        assert_eq!(next.rest.0.len(), 1);
    }

    #[test]
    fn a_request_gives_its_share_back_however_it_ends() {
        let (p, mut queues) = pipeline(1, 16, FAST);
        let gauge = &p.drivers[0].gauge;
        let request = |reply| request(gauge, reply);
        let (tx, rx) = oneshot::channel();
        reply(request(tx), Ok(Some((Vec::new(), 0))));
        assert!(matches!(
            rx.blocking_recv(),
            Ok(Delivery {
                answer: Ok(Some(_)),
                ..
            })
        ));
        let (tx, _rx) = oneshot::channel();
        fail_all(
            [request(tx)].into_iter().map(|r| r.reply),
            &Error::closed("gone"),
        );
        let (tx, _rx) = oneshot::channel();
        p.drivers[0].queue.try_send(request(tx)).ok().unwrap();
        let load = || gauge.load.load(Ordering::Relaxed);
        assert_eq!(load(), 1, "queued, not answered");
        drop(queues.pop());
        assert_eq!(load(), 0, "dropped with its queue");
    }
}
