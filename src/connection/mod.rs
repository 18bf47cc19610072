//! One connection to a PostgreSQL server: startup and authentication, then queries over the
//! simple and the extended protocol, one at a time.
//!
//! The connection keeps four pieces of state:
//!
//! - `status`: the transaction status of the last ReadyForQuery — the server's word on whether
//!   a transaction is open or failed, never our guess. Set only in `Connection::poll_read`.
//! - `pending`: how many ReadyForQuery messages are still owed for requests already sent. A
//!   query whose future was dropped half way leaves it above zero; the next request first reads
//!   and discards the rest of those responses, so it can never mistake them for its own.
//!   Raised only in `Connection::send`, lowered only in `Connection::poll_read`.
//! - `copy_in`: a COPY FROM STDIN is open and the server reads nothing but copy messages. A
//!   sink dropped half way leaves it set; the next request first ends the COPY with CopyFail.
//! - `broken`: set only in `Connection::mark_broken` (and never cleared) when the byte stream can no
//!   longer be trusted: an I/O or protocol error, a write cut off half way, a FATAL error, a
//!   request whose end did not arrive even after it was cancelled. A broken connection
//!   refuses every request.
//!
//! A request that times out, or whose future is dropped, is cancelled on the server (a
//! CancelRequest on a socket of its own, over TLS when the connection uses it) and left owing
//! responses; the next request, or a pool's `reset`, reads them away within the drain timeout
//! and waits for the cancel to be delivered, so that it cannot hit the statement after.

mod cache;
mod copy;
mod extended;
mod instrument;
mod lease;
mod notify;
mod response;
mod simple;
mod socket;
mod startup;
mod stream;
mod tls;
mod types;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::poll_fn;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;

use crate::config::Config;
use crate::error::{DbError, Error, Result};
use crate::protocol::{BackendMessage, frontend};
use cache::StatementCache;
use response::{Response, Shape, Step};
use stream::MessageStream;

pub use copy::{BinaryCopyInWriter, CopyInSink, CopyOutStream};
pub use extended::RowStream;
pub(crate) use extended::{PipelinedAnswer, QueryOrigin, SentQuery};
pub(crate) use instrument::{Traced, watching};
pub(crate) use lease::Lease;
pub(crate) use simple::{CommitAsk, CommitReply};
pub use socket::Transport;

pub use crate::protocol::TransactionStatus;

/// Called with each NoticeResponse (warnings, `RAISE NOTICE`, …).
pub type NoticeHandler = Box<dyn FnMut(&DbError) + Send>;

/// A notification from `NOTIFY` on a channel this connection listens to.
///
/// ```no_run
/// # async fn demo(conn: &mut pgengine::Connection) -> pgengine::Result<()> {
/// conn.simple_query("LISTEN orders").await?;
/// conn.simple_query("NOTIFY orders, 'order 42'").await?;
/// for n in conn.take_notifications() {
///     println!("{} from process {}: {}", n.channel, n.process_id, n.payload);
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Notification {
    /// The notifying backend's process id.
    pub process_id: i32,
    /// The channel name.
    pub channel: String,
    /// The payload.
    pub payload: String,
}

/// Cancels the query running on a connection (PostgreSQL docs §55.2.8 "Canceling Requests in
/// Progress"): a CancelRequest with the connection's process id and secret key, sent on a new
/// socket to the same server. The server gives no answer; if the query was still running it
/// fails with SQLSTATE 57014 (query_canceled).
#[derive(Clone)]
pub struct CancelToken {
    /// `None` for a connection over a caller-provided stream: no address to send a cancel to.
    target: Option<startup::Target>,
    /// Set when the connection runs over TLS: the CancelRequest goes over TLS as well.
    tls: Option<tls::TlsConnector>,
    process_id: i32,
    secret_key: Bytes,
}

impl fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret key is what authorises a cancel: keep it out of logs.
        f.debug_struct("CancelToken")
            .field("target", &self.target)
            .field("process_id", &self.process_id)
            .finish_non_exhaustive()
    }
}

impl CancelToken {
    /// Asks the server to cancel whatever the connection is running now. Returns once the
    /// request has been delivered; a connection that is idle by then is not affected.
    pub async fn cancel_query(&self) -> Result<()> {
        if self.secret_key.is_empty() {
            return Err(Error::closed(
                "the server sent no cancel key for this connection (a pooler or proxy?)",
            ));
        }
        let Some(target) = &self.target else {
            return Err(Error::closed(
                "the connection runs over a caller-provided stream: no address to cancel through",
            ));
        };
        let mut socket = startup::open_socket(target, None).await?;
        if let Some(tls) = &self.tls {
            socket = match startup::start_tls(socket, tls, target).await? {
                startup::Negotiated::Tls(handshake) => handshake.socket,
                startup::Negotiated::Refused(_) => {
                    return Err(Error::tls(
                        "the server refused TLS for the CancelRequest of a TLS connection",
                    ));
                }
            };
        }
        let mut stream = MessageStream::new(socket, crate::protocol::DEFAULT_MAX_MESSAGE_LEN);
        frontend::cancel_request(&mut stream.write_buf, self.process_id, &self.secret_key);
        stream.flush().await?;
        // The server closes the socket once it has read the request; waiting for that makes
        // sure the request was received before we report success.
        match stream.read_message().await {
            Err(e) if e.kind() == crate::ErrorKind::Closed => Ok(()),
            Err(e) => Err(e),
            Ok(_) => Err(Error::protocol("the server answered a CancelRequest")),
        }
    }
}

/// One connection to a PostgreSQL server. Its methods take `&mut self`, so one task uses it at a
/// time; a [`PostgresEngine`](crate::PostgresEngine) shares a pool of them between tasks.
///
/// ```no_run
/// # async fn demo() -> pgengine::Result<()> {
/// use pgengine::{Config, Connection};
///
/// let config: Config = "host=localhost user=app dbname=appdb".parse()?;
/// let mut conn = Connection::connect(&config).await?;
/// let row = conn.query_one(("SELECT $1::text || '!' AS shout", ("hey",))).await?;
/// assert_eq!(row.get::<_, &str>("shout"), "hey!");
/// conn.close().await?;
/// # Ok(())
/// # }
/// ```
pub struct Connection {
    stream: MessageStream,
    status: TransactionStatus,
    pending: usize,
    /// True from the moment a request starts going out until it is fully written.
    writing: bool,
    /// A transaction block this connection's user did not open was left open by a batch
    /// dropped half way: it is rolled back before the next request.
    rollback_owed: bool,
    /// A COPY FROM STDIN is open: the server reads nothing but copy messages until CopyDone
    /// or CopyFail. Set and cleared in `copy.rs`; still set at the next request when a sink
    /// was dropped half way.
    copy_in: bool,
    broken: Option<String>,
    parameters: HashMap<String, String>,
    cancel: CancelToken,
    notice_handler: NoticeHandler,
    notifications: VecDeque<Notification>,
    statements: StatementCache,
    /// Statements evicted from the cache whose Close has not been confirmed by the server yet;
    /// they go out in front of the next request.
    closes_due: Vec<std::sync::Arc<str>>,
    /// Commands that go out in front of the next request, in its write (a transaction's
    /// `SAVEPOINT`: see [`Connection::defer_command`]).
    deferred: simple::Deferred,
    stats: ConnectionStats,
    /// Types looked up in the catalogs (enums, composites, …), by OID.
    types: HashMap<u32, postgres_types::Type>,
    /// Time limits and cancellation of the request in flight.
    watch: Watch,
    /// The protocol's minor version: 0 for 3.0, 2 for 3.2.
    protocol_minor: u16,
    /// Traces (and with `log_queries`, logs) every request sent.
    instrument: instrument::Instrument,
    /// How long the caller waited for this connection before its next request (the pool's
    /// acquire), for that request's trace.
    waited_for_connection: Option<Duration>,
    /// The span the requests' traces belong to while a transaction holds the connection.
    trace_parent: Option<tracing::Span>,
    /// Shared by the connections of one engine: set once one of them found a pooler in
    /// transaction or statement mode in front of the server (see `Connection::note_pooler`),
    /// after which every one of them uses the unnamed statement only.
    pooler_seen: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// The default for [`Connection::set_drain_timeout`].
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What [`Connection::reset_session`] runs after a command changed the session: the session's
/// user and every setting back to where the connection began (`RESET ALL` keeps what the
/// startup packet set), no channels, no cursors, no session advisory locks, no temporary
/// tables, no sequence state (`currval`). Not `DISCARD ALL`, which would also drop the
/// prepared statements the connection's cache holds. Every part is allowed on a standby.
const SESSION_RESET: &str = "SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *; \
    CLOSE ALL; SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES";

/// Run by [`Connection::reset_session`] after a SQL `PREPARE`: deallocates the statements SQL
/// prepared, and only those (`DEALLOCATE ALL` would drop the cache's own too).
const SQL_PREPARED_RESET: &str = "DO $pge$ DECLARE n text; BEGIN \
    FOR n IN SELECT name FROM pg_prepared_statements WHERE from_sql LOOP \
    EXECUTE format('DEALLOCATE %I', n); END LOOP; END $pge$";

/// Time limits on requests, and what happens to one that is abandoned.
///
/// A request's clock starts when it is sent. When its limit passes, a CancelRequest goes to
/// the server (in a task of its own: the server may not answer it), the caller gets a timeout
/// error, and the connection gets `drain_timeout` more to bring the rest of the response — the
/// statement's 57014 error and ReadyForQuery — after which it is clean again; if that does not
/// come, the connection is broken. A request whose caller went away (a dropped future) is
/// cancelled the same way when the connection is next used, unless `cancel_abandoned` is off,
/// in which case it is left to finish (within `drain_timeout`).
struct Watch {
    query_timeout: Option<Duration>,
    drain_timeout: Duration,
    cancel_abandoned: bool,
    /// A limit for the next request only (a query's own timeout), taken by `send`.
    next_timeout: Option<Duration>,
    /// The limit of the request in flight, for messages.
    limit: Option<Duration>,
    /// Whether `deadline` applies to the request in flight.
    armed: bool,
    /// The request in flight was cancelled: a second deadline means the server is gone.
    cancelled: bool,
    /// The CancelRequest in flight; the next request waits for it, so that a cancel cannot
    /// land on the statement after the one it was meant for.
    cancel_task: Option<tokio::task::JoinHandle<()>>,
    /// Allocated once, reset by each send.
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

/// Counts of what this connection sent, for tests and monitoring: they show, for example,
/// that a cached statement is not parsed again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionStats {
    /// Parse messages (statements prepared).
    pub parses: u64,
    /// Bind messages.
    pub binds: u64,
    /// Close messages for statements evicted from the cache.
    pub closes: u64,
    /// Requests sent that the server answers with ReadyForQuery (Sync or simple Query): the
    /// number of round trips.
    pub round_trips: u64,
    /// Statement cache hits.
    pub cache_hits: u64,
    /// Statement cache misses.
    pub cache_misses: u64,
}

/// The default number of prepared statements a connection keeps.
pub const DEFAULT_STATEMENT_CACHE_CAPACITY: usize = 256;

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret key is left out: it lets anyone cancel this connection's queries.
        f.debug_struct("Connection")
            .field("process_id", &self.cancel.process_id)
            .field("status", &self.status)
            .field("pending", &self.pending)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

/// The default notice handler: the notice's severity and SQLSTATE, and its message as
/// [`DbError`]'s `Display` shows it (a `RAISE NOTICE` that formats a value is the caller's to
/// log: a handler of their own sees every field).
fn log_notice(notice: &DbError) {
    tracing::info!(
        target: "pgengine::notice",
        severity = notice.severity(),
        code = notice.code().as_str(),
        "{notice}"
    );
}

impl Connection {
    /// Opens a connection: tries each configured host in turn, authenticates, and waits until
    /// the server is ready for queries.
    ///
    /// ```no_run
    /// # async fn demo() -> pgengine::Result<()> {
    /// let config = pgengine::Config::parse("host=/var/run/postgresql user=postgres")?;
    /// let conn = pgengine::Connection::connect(&config).await?;
    /// println!("server {}", conn.parameter("server_version").unwrap_or("?"));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(config: &Config) -> Result<Connection> {
        let s = startup::connect(config).await?;
        Ok(Connection::from_startup(s, config))
    }

    /// Runs startup and authentication over a stream the caller opened (a tunnel, an
    /// in-memory pipe), with the settings in `config` (user, database, password, …; hosts and
    /// TLS settings are not used). Cancel requests cannot reach a server over such a stream.
    ///
    /// ```no_run
    /// # async fn demo() -> pgengine::Result<()> {
    /// let socket = tokio::net::TcpStream::connect("127.0.0.1:5432").await.unwrap();
    /// let config = pgengine::Config::parse("user=postgres")?;
    /// let conn = pgengine::Connection::connect_stream(socket, &config).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_stream(stream: impl Transport, config: &Config) -> Result<Connection> {
        let socket = socket::Socket::Other(Box::new(stream));
        let s = startup::start_on(socket, config, None).await?;
        Ok(Connection::from_startup(s, config))
    }

    fn from_startup(s: startup::Startup, config: &Config) -> Connection {
        let (address, port) = match &s.target {
            Some(target) => (target.host.to_string(), target.port),
            None => ("stream".to_owned(), 0),
        };
        let namespace = config
            .get_dbname()
            .or(config.get_user())
            .unwrap_or_default()
            .to_owned();
        let mut conn = Connection {
            stream: s.stream,
            status: s.status,
            pending: 0,
            writing: false,
            rollback_owed: false,
            copy_in: false,
            broken: None,
            parameters: s.parameters.into_iter().collect(),
            cancel: CancelToken {
                target: s.target,
                tls: s.tls,
                process_id: s.process_id,
                secret_key: s.secret_key,
            },
            notice_handler: Box::new(log_notice),
            notifications: VecDeque::new(),
            statements: StatementCache::new(DEFAULT_STATEMENT_CACHE_CAPACITY, rand::random()),
            pooler_seen: None,
            instrument: instrument::Instrument::new(&namespace, &address, port),
            waited_for_connection: None,
            trace_parent: None,
            closes_due: Vec::new(),
            deferred: simple::Deferred::default(),
            types: HashMap::new(),
            watch: Watch {
                query_timeout: None,
                drain_timeout: DEFAULT_DRAIN_TIMEOUT,
                cancel_abandoned: true,
                next_timeout: None,
                limit: None,
                armed: false,
                cancelled: false,
                cancel_task: None,
                deadline: None,
            },
            stats: ConnectionStats::default(),
            protocol_minor: s.protocol_minor,
        };
        for notice in &s.notices {
            (conn.notice_handler)(notice);
        }
        conn
    }

    /// Replaces the handler for server notices. The default logs them with `tracing` at info
    /// level, target `pgengine::notice`.
    pub fn set_notice_handler(&mut self, handler: impl FnMut(&DbError) + Send + 'static) {
        self.notice_handler = Box::new(handler);
    }

    /// The transaction status from the server's last ReadyForQuery.
    pub fn transaction_status(&self) -> TransactionStatus {
        self.status
    }

    /// The server's version as a number, `major * 10000 + minor` (150004 for 15.4, as the
    /// server's `server_version_num`), from the `server_version` it reported; 0 if unreadable.
    pub(crate) fn server_version_num(&self) -> u32 {
        self.parameter("server_version")
            .and_then(ServerVersion::parse)
            .map_or(0, |v| v.major * 10_000 + v.minor)
    }

    /// The current value of a run-time parameter the server reports (`server_version`,
    /// `TimeZone`, `client_encoding`, `integer_datetimes`, …).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.get(name).map(String::as_str)
    }

    /// The protocol version in use, as (major, minor): (3, 0), or (3, 2) when
    /// `max_protocol_version=3.2` (or `latest`) was asked for and the server speaks it
    /// (PostgreSQL 18+).
    pub fn protocol_version(&self) -> (u16, u16) {
        (3, self.protocol_minor)
    }

    /// True when the connection runs over TLS.
    pub fn uses_tls(&self) -> bool {
        self.cancel.tls.is_some()
    }

    /// The server's process id for this connection (`pg_backend_pid()`).
    pub fn process_id(&self) -> i32 {
        self.cancel.process_id
    }

    /// A token that can cancel the query this connection is running, from any task.
    pub fn cancel_token(&self) -> CancelToken {
        self.cancel.clone()
    }

    /// True once the connection can no longer be used (I/O or protocol error, or a request cut
    /// off while being written).
    pub fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    /// True when the connection is usable, outside any transaction, and owes no responses: the
    /// only state in which it is safe to hand to another user.
    pub fn is_idle(&self) -> bool {
        self.broken.is_none()
            && !self.writing
            && self.pending == 0
            && self.status == TransactionStatus::Idle
    }

    /// True when responses to an earlier request are still owed (its future was dropped half
    /// way) or a request was cut off while being written: the connection's state is not known
    /// until it has read them away, so a pool must not hand it to anyone else.
    pub fn is_busy(&self) -> bool {
        self.pending > 0 || self.writing || self.copy_in
    }

    /// Whether the next answer is already whole in the read buffer.
    pub(crate) fn has_buffered_message(&self) -> bool {
        self.stream.has_whole_message()
    }

    /// Whether the rest of the oldest pipelined request's answer, to its ReadyForQuery, has
    /// arrived: reading it will not wait.
    pub(crate) fn has_buffered_answer(&self) -> bool {
        self.stream.has_whole_answer()
    }

    /// Checks, without waiting, that an idle connection has not been closed by the server
    /// (restart, `pg_terminate_backend`, idle timeout): reads whatever already arrived — a
    /// notification is kept, a FATAL error or end of stream marks the connection broken.
    /// Returns whether the connection is still usable. One non-blocking read; no round trip.
    pub fn check_alive(&mut self) -> bool {
        if self.broken.is_some() || self.is_busy() {
            return self.broken.is_none();
        }
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        // Anything but Pending here is either handled inside poll_read (notices,
        // notifications, parameter changes: it loops) or breaks the connection.
        if let Poll::Ready(Ok(msg)) = self.poll_read(&mut cx) {
            let _ = self.unexpected(&msg, "idle");
        }
        self.broken.is_none()
    }

    /// Notifications received so far (they can arrive during any query), oldest first. To
    /// wait for the next one while the connection is idle, see
    /// [`next_notification`](Self::next_notification).
    pub fn take_notifications(&mut self) -> Vec<Notification> {
        self.notifications.drain(..).collect()
    }

    /// Sets how many prepared statements this connection keeps (least recently used ones are
    /// closed on the server). 0 turns caching off: every query uses the unnamed statement, which
    /// is what PgBouncer in transaction pooling mode needs.
    pub fn set_statement_cache_capacity(&mut self, capacity: usize) {
        // Statements that no longer fit are closed in front of the next request.
        let evicted = self.statements.set_capacity(capacity);
        self.closes_due.extend(evicted);
    }

    /// Logs every request this connection sends (`log_queries` of its engine): an event when
    /// it goes out, and one when it ends.
    pub(crate) fn set_log_queries(&mut self, on: bool) {
        self.instrument.set_log_queries(on);
    }

    /// Traces this connection's requests as children of `span` (a transaction's), or of the
    /// caller's current span again with `None`.
    pub(crate) fn set_trace_parent(&mut self, span: Option<tracing::Span>) {
        self.trace_parent = span;
    }

    /// The caller waited `d` for this connection: recorded on the next request's trace.
    pub(crate) fn note_acquire_wait(&mut self, d: Duration) {
        self.waited_for_connection = Some(d);
    }

    /// No trace for a request sent now, nobody watching (the caller asked
    /// [`watching`](instrument::Instrument::watching)); the wait for the connection is spent.
    fn untraced(&mut self) -> instrument::Traced {
        self.waited_for_connection = None;
        instrument::Traced::none()
    }

    /// Starts the trace of a request sent now (see [`instrument`]).
    fn trace(&mut self, sql: &str) -> instrument::Traced {
        let waited = instrument::Waited {
            connection: self.waited_for_connection.take(),
            pipeline: None,
        };
        self.instrument
            .start(sql, self.trace_parent.as_ref(), waited)
    }

    /// Shares `flag` with the other connections of an engine: when one of them finds a
    /// transaction-mode pooler in front of the server, all of them switch to unnamed
    /// statements (see [`note_pooler`](Self::note_pooler)).
    pub(crate) fn share_pooler_flag(
        &mut self,
        flag: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) {
        if flag.load(std::sync::atomic::Ordering::Relaxed) {
            self.use_unnamed_statements();
        }
        self.pooler_seen = Some(flag);
    }

    /// Our prepared statement is missing on the server session (26000) — or one we prepare
    /// is already there (42P05) —, though this connection prepared it and nobody here
    /// dropped it: a pooler in transaction or statement mode (PgBouncer) gives each
    /// transaction whichever server session is free. From now on this connection, and every
    /// connection of its engine, uses only the unnamed statement, which never outlives its
    /// transaction. (Statement names carry a random part of the connection's own, so on a
    /// wrong session a name is missing, never another client's statement.) A pooler that
    /// carries named statements across sessions (PgBouncer 1.21+ with
    /// `max_prepared_statements`) never gets here, and keeps the cache.
    fn note_pooler(&mut self) {
        if self.statements.capacity() > 0 {
            tracing::warn!(
                target: "pgengine::connection",
                "prepared statements do not survive between transactions here (a pooler in \
                 transaction or statement mode?): switching to unnamed statements"
            );
        }
        self.use_unnamed_statements();
        if let Some(flag) = &self.pooler_seen {
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Forgets every prepared statement (they live on server sessions we no longer reach)
    /// and caches none from now on.
    fn use_unnamed_statements(&mut self) {
        self.statements.clear();
        let _ = self.statements.set_capacity(0);
    }

    /// Sets how long a request may take, from being sent until the server says it is ready
    /// again (a row stream's rows included); a query's own [`Query::timeout`] overrides it.
    /// When the time is up, the running statement is cancelled on the server and the request
    /// fails with [`ErrorKind::Timeout`]. The connection stays usable: its next request first
    /// reads the cancelled statement's end (within the [drain
    /// timeout](Self::set_drain_timeout), or the connection is given up). Inside a transaction
    /// the cancelled statement fails the transaction, so it cannot be committed by mistake.
    ///
    /// [`ErrorKind::Timeout`]: crate::ErrorKind::Timeout
    /// [`Query::timeout`]: crate::Query::timeout
    pub fn set_query_timeout(&mut self, timeout: Option<Duration>) {
        self.watch.query_timeout = timeout;
    }

    /// The query timeout set by [`set_query_timeout`](Self::set_query_timeout).
    pub fn query_timeout(&self) -> Option<Duration> {
        self.watch.query_timeout
    }

    /// Sets how long the rest of an abandoned or timed-out request may take to arrive before
    /// the connection is given up (default [`DEFAULT_DRAIN_TIMEOUT`]).
    pub fn set_drain_timeout(&mut self, timeout: Duration) {
        self.watch.drain_timeout = timeout;
    }

    /// Sets how long a wait for the server's answer keeps asking the socket before it sleeps
    /// (`None`, the default: it sleeps at once and the runtime wakes it when the answer
    /// comes).
    ///
    /// When client and server run on different cores, most of a short round trip is the time
    /// it takes to wake the sleeping client: on a 2-core VM, a point query answered in
    /// ≈ 15 µs took ≈ 55 µs with the wake-up. Asking again for a few tens of microseconds
    /// (yielding the CPU between two tries) skips that: about 3× the round trips per second
    /// there. The cost: the connection's runtime worker runs nothing else for up to `limit`
    /// per answer, and the core stays busy while it waits. A wait that finds asking does not
    /// pay — the answer comes later than `limit`, or the server runs on our own core and gets
    /// it only while we yield — stops asking for the next thousand waits by itself. Worth it
    /// for a latency-bound service with a core to spare per busy connection; not for many
    /// connections sharing few runtime workers. TLS and custom transports always sleep.
    ///
    /// A limit of zero is the same as `None`.
    pub fn set_busy_poll(&mut self, limit: Option<Duration>) {
        self.stream.set_busy_poll(limit);
    }

    /// Sets whether a request whose future was dropped before it finished is cancelled on the
    /// server (the default) or left to run to its end, when the connection is next used.
    pub fn set_cancel_abandoned(&mut self, cancel: bool) {
        self.watch.cancel_abandoned = cancel;
    }

    /// Brings the connection back to a clean, idle state: reads the rest of any abandoned
    /// request (cancelling it first, if so configured) and rolls back an open or failed
    /// transaction. A pool calls this before handing a returned connection to someone else.
    /// If the rest does not arrive within the drain timeout the connection is broken.
    pub async fn reset(&mut self) -> Result<()> {
        // A savepoint of a transaction that is being rolled back is moot.
        self.drop_deferred();
        self.prepare_request().await?;
        if self.status != TransactionStatus::Idle {
            self.command(&["ROLLBACK"]).await?;
        }
        Ok(())
    }

    /// [`reset`](Self::reset), and then, if the session may have changed (see
    /// [`session_changed`](Self::session_changed)), puts it back as it began: the session user
    /// and every setting as the connection started (what the startup packet set is kept), no
    /// channels listened to (and no notifications kept from them), no cursors, no session
    /// advisory locks, no temporary tables, no sequence state, and no statements prepared with
    /// SQL `PREPARE` (the statement cache's own are kept). A pool of the engine's does this
    /// before handing a returned connection to someone else, unless told not to.
    ///
    /// What it cannot see is not undone: a setting changed inside a function whose parameter
    /// the server does not report (`set_config` called from PL/pgSQL), or a temporary object
    /// created by one.
    pub async fn reset_session(&mut self) -> Result<()> {
        self.reset().await?;
        if self.session_changed() {
            if self.stream.sql_prepared() {
                self.simple_query(SQL_PREPARED_RESET).await?;
            }
            self.simple_query(SESSION_RESET).await?;
            // The reset's own SET counts too: forget it with the rest.
            self.stream.clear_session_changed();
            self.notifications.clear();
        }
        Ok(())
    }

    /// Takes the session as it is now as where it begins: what an `after_connect` hook set up
    /// is not a change to undo.
    pub(crate) fn settle_session(&mut self) {
        self.stream.clear_session_changed();
    }

    /// Whether the session may have been changed since the connection opened or was last
    /// [reset](Self::reset_session): a statement that changes it was sent (`SET`, `RESET`,
    /// `LISTEN`, `DECLARE`, `PREPARE`, `DISCARD`, `LOAD`, `DO`, a temporary table, a call of
    /// `set_config` or of a session advisory lock function), its command tag came back, or the
    /// server reported a parameter's new value.
    pub fn session_changed(&self) -> bool {
        self.stream.session_changed()
    }

    /// The most prepared statements this connection keeps.
    pub fn statement_cache_capacity(&self) -> usize {
        self.statements.capacity()
    }

    /// The number of statements in the cache.
    pub fn cached_statements(&self) -> usize {
        self.statements.len()
    }

    /// What this connection has sent so far.
    pub fn stats(&self) -> ConnectionStats {
        self.stats
    }

    /// The bytes this connection's read and write buffers hold, besides the rows it handed
    /// out. A request that needed more (a large value, a long row, answers that arrived while
    /// a large pipeline was being sent) gives it back when it ends: an idle connection holds
    /// at most 64 KiB + 8 KiB (and a message the server has begun to send).
    pub fn buffer_capacity(&self) -> usize {
        let (read, write) = self.stream.buffer_capacity();
        read + write
    }

    /// Rolls back the open transaction block before the next request: a portal batch that
    /// began its own block was dropped before it ended it.
    pub(crate) fn owe_rollback(&mut self) {
        self.rollback_owed = true;
    }

    /// Says goodbye to the server (Terminate) and closes the socket.
    pub async fn close(mut self) -> Result<()> {
        if self.broken.is_some() || self.writing {
            return Ok(());
        }
        frontend::terminate(&mut self.stream.write_buf);
        self.stream.flush().await?;
        self.stream.shutdown().await
    }

    /// Makes the connection ready for a new request: refuses if it is broken, and reads away
    /// the responses still owed to requests whose futures were dropped.
    pub(crate) async fn prepare_request(&mut self) -> Result<()> {
        if self.writing {
            // A write was cut off: the server may hold half a message. Nothing can fix that.
            self.mark_broken("a request was interrupted while being sent".to_owned());
        }
        if let Some(reason) = &self.broken {
            return Err(Error::closed(format!("the connection is broken: {reason}")).retry_safe());
        }
        // A deferred command's error belongs to the request that carried it, and to no later.
        self.deferred.failed = None;
        if self.copy_in {
            // A CopyInSink was dropped half way: the server still waits for its data.
            self.abandon_copy_in().await?;
        }
        if self.pending > 0 {
            self.drain_abandoned().await?;
        }
        if std::mem::take(&mut self.rollback_owed) && self.status != TransactionStatus::Idle {
            self.run_command(&["ROLLBACK"]).await?;
        }
        if let Some(task) = self.watch.cancel_task.take() {
            // The cancel of an earlier request must land before the next request is sent:
            // the server applies it to whatever runs when it arrives.
            let _ = task.await;
        }
        if self.stream.take_statements_dropped() {
            // DISCARD ALL or DEALLOCATE ALL ran: the server has none of our statements.
            self.statements.clear();
        }
        if self.statements.capacity() > 0
            && let Some(flag) = &self.pooler_seen
            && flag.load(std::sync::atomic::Ordering::Relaxed)
        {
            self.use_unnamed_statements();
        }
        self.stream.undo_write(0);
        Ok(())
    }

    /// Reads away the responses still owed to a request nobody waits for any more (its
    /// future was dropped, or it timed out). Its errors are not ours to report.
    async fn drain_abandoned(&mut self) -> Result<()> {
        // What already arrived needs no cancel: read it without waiting.
        self.drain_ready()?;
        if self.pending == 0 {
            return Ok(());
        }
        if self.watch.cancel_abandoned && !self.watch.cancelled {
            self.start_cancel();
        }
        let limit = self.watch.drain_timeout;
        let drained = tokio::time::timeout(limit, async {
            let mut rest = Response::new(Shape::Drain);
            while self.pending > 0 {
                match self.next_step(&mut rest).await {
                    Ok(_) => {}
                    Err(e) if self.broken.is_some() => return Err(e),
                    // A timeout of the abandoned request itself: its cancel just went out.
                    Err(_) => {}
                }
            }
            Ok(())
        })
        .await;
        match drained {
            Ok(result) => result,
            Err(_) => {
                let e = Error::timeout(format!(
                    "the rest of an abandoned request did not arrive within {limit:?}: the \
                     connection was closed"
                ));
                Err(self.fail(e))
            }
        }
    }

    /// Reads what has already arrived of an abandoned request, without waiting.
    fn drain_ready(&mut self) -> Result<()> {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut rest = Response::new(Shape::Drain);
        while self.pending > 0 {
            match self.poll_step(&mut rest, &mut cx) {
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) if self.broken.is_some() => return Err(e),
                Poll::Ready(Err(_)) => {}
                Poll::Pending => break,
            }
        }
        Ok(())
    }

    /// Sends a CancelRequest for the request in flight, in a task of its own (it needs a new
    /// connection to the server, which may hang); the next request waits for it.
    fn start_cancel(&mut self) {
        self.watch.cancelled = true;
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let token = self.cancel.clone();
        let limit = self.watch.drain_timeout;
        self.watch.cancel_task = Some(handle.spawn(async move {
            if let Err(e) = tokio::time::timeout(limit, token.cancel_query())
                .await
                .unwrap_or_else(|_| {
                    Err(Error::timeout(
                        "the cancel request was not delivered in time",
                    ))
                })
            {
                tracing::debug!(
                    target: "pgengine::cancel",
                    "cancel request failed: {}",
                    e.redacted()
                );
            }
        }));
    }

    /// Sets a time limit for the next request only (a query's own timeout).
    pub(crate) fn limit_next_request(&mut self, timeout: Option<Duration>) {
        self.watch.next_timeout = timeout;
    }

    /// Sends what is in the write buffer; `syncs` is how many ReadyForQuery it will earn.
    /// Deferred commands go first, in the same write, when nothing else is owed; their
    /// answers, which come first, are read before this returns (see
    /// [`defer_command`](Self::defer_command)).
    async fn send(&mut self, syncs: usize) -> Result<()> {
        let limit = self.watch.next_timeout.take().or(self.watch.query_timeout);
        if let Some(limit) = limit {
            self.arm_deadline(limit);
        }
        self.watch.limit = limit;
        let carried = self.deferred.count > 0 && self.pending == 0;
        if carried {
            let message = &mut self.deferred.message;
            message.clear();
            frontend::query(message, &self.deferred.sql)?;
            self.stream.prepend_write(message);
        }
        self.pending += syncs + usize::from(carried);
        self.stats.round_trips += syncs as u64;
        self.flush().await?;
        if carried {
            self.read_deferred().await?;
        }
        Ok(())
    }

    fn arm_deadline(&mut self, limit: Duration) {
        let at = tokio::time::Instant::now() + limit;
        match &mut self.watch.deadline {
            Some(sleep) => sleep.as_mut().reset(at),
            None => self.watch.deadline = Some(Box::pin(tokio::time::sleep_until(at))),
        }
        self.watch.armed = true;
    }

    /// The request in flight took too long. The first time, cancel it on the server and give
    /// the rest of its response the drain timeout to arrive; the second time (the server
    /// answers neither the statement nor the cancel), give the connection up.
    #[cold]
    fn time_out(&mut self) -> Error {
        let limit = self.watch.limit.unwrap_or_default();
        if self.watch.cancelled {
            self.watch.armed = false;
            return self.fail(Error::timeout(format!(
                "the server did not finish a request within {limit:?} nor answer its cancel \
                 within {:?}: the connection was closed",
                self.watch.drain_timeout
            )));
        }
        self.start_cancel();
        self.arm_deadline(self.watch.drain_timeout);
        Error::timeout(format!(
            "the query did not finish within {limit:?}: it was cancelled on the server"
        ))
    }

    /// Sends what is in the write buffer, reading whatever arrives while the socket takes no
    /// more.
    ///
    /// A server answers a pipeline while it is still being sent; once its send buffer is full
    /// it waits for us to read, and stops reading what we send. A writer that only waited for
    /// room would then wait forever (an Atomic of 10,000 statements did). So, as libpq's
    /// pipeline mode does, whenever the socket will take no more, what has arrived is read
    /// into the read buffer for the request's reader; notices, parameter changes and
    /// notifications at its front are dealt with at once (a trigger's NOTICE per COPY row
    /// must not pile up). The request's time limit covers the write: a server that stops
    /// reading gets the same Timeout as one that stops answering, and since half a request
    /// may have gone out, the connection is given up.
    async fn flush(&mut self) -> Result<()> {
        self.writing = true;
        let r = poll_fn(|cx| self.poll_flush(cx)).await;
        self.writing = false;
        r.map_err(|e| {
            let e = self.reason_for_loss(e);
            self.fail(e)
        })
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        loop {
            if let Poll::Ready(sent) = self.stream.poll_send(cx) {
                return Poll::Ready(sent);
            }
            match self.stream.poll_receive(cx) {
                Poll::Ready(Ok(())) => {
                    self.take_async_messages()?;
                    continue;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
            if self.watch.armed
                && let Some(deadline) = self.watch.deadline.as_mut()
                && deadline.as_mut().poll(cx).is_ready()
            {
                self.watch.armed = false;
                return Poll::Ready(Err(Error::timeout(format!(
                    "the server did not take the request within {:?}: the connection was closed",
                    self.watch.limit.unwrap_or_default()
                ))));
            }
            return Poll::Pending;
        }
    }

    /// Deals with the messages at the front of the read buffer that can arrive at any time
    /// (notices, parameter changes, notifications), leaving anything else for the reader.
    fn take_async_messages(&mut self) -> Result<()> {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        while matches!(self.stream.next_whole_tag(), Some(b'N' | b'S' | b'A')) {
            match self.stream.poll_message(&mut cx) {
                Poll::Ready(Ok(msg)) => self.take_async(msg),
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => break,
            }
        }
        Ok(())
    }

    /// The connection failed with `e` while sending. If the server said why before it went
    /// — a FATAL such as 57P01 when an administrator ended the session — that is the error
    /// worth reporting, with its SQLSTATE; it may still be in the socket or the read buffer.
    #[cold]
    fn reason_for_loss(&mut self, e: Error) -> Error {
        if !matches!(e.kind(), crate::ErrorKind::Io | crate::ErrorKind::Closed) {
            return e;
        }
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        loop {
            match self.stream.poll_message(&mut cx) {
                Poll::Ready(Ok(BackendMessage::ErrorResponse(db))) => return Error::db(db),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(_)) | Poll::Pending => return e,
            }
        }
    }

    /// Polls for the next message that belongs to the request in flight. Notices, parameter
    /// changes and notifications can arrive at any time (§55.2.7 "Asynchronous Operations") and
    /// are dealt with here; ReadyForQuery updates the transaction status.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<BackendMessage>> {
        loop {
            let msg = match self.stream.take_message() {
                Ok(Some(m)) => m,
                Ok(None) => {
                    ready!(self.poll_more(cx))?;
                    continue;
                }
                Err(e) => return Poll::Ready(Err(self.fail(e))),
            };
            match msg {
                BackendMessage::NoticeResponse(_)
                | BackendMessage::ParameterStatus { .. }
                | BackendMessage::NotificationResponse { .. } => self.take_async(msg),
                BackendMessage::ReadyForQuery(status) => {
                    return Poll::Ready(self.ready_for_query(status).map(|()| msg));
                }
                BackendMessage::ErrorResponse(ref db) if db.ends_session() => {
                    // The server closes the session after a FATAL (or PANIC) error, e.g. an
                    // administrator terminated the backend. Read from the never-localised
                    // severity: with lc_messages in Russian the localised word is "ВАЖНО".
                    self.mark_broken(format!("the server ended the session: {}", db.message()));
                    return Poll::Ready(Err(Error::db(db.clone())));
                }
                other => return Poll::Ready(Ok(other)),
            }
        }
    }

    /// Reads more of the response in flight into the read buffer, within the request's time
    /// limit.
    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        match self.stream.poll_more(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(self.fail(e))),
            Poll::Pending => {
                if self.pending > 0
                    && self.watch.armed
                    && let Some(deadline) = self.watch.deadline.as_mut()
                    && deadline.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Err(self.time_out()));
                }
                Poll::Pending
            }
        }
    }

    /// A ReadyForQuery came with `status`: one request fewer is owed, and when none is, the
    /// request's clock, its cancel state and whatever memory it made the buffers take go.
    #[inline]
    fn ready_for_query(&mut self, status: TransactionStatus) -> Result<()> {
        if self.pending == 0 {
            return Err(self.protocol_error("ReadyForQuery that no request asked for"));
        }
        self.pending -= 1;
        self.status = status;
        if self.pending == 0 {
            self.watch.armed = false;
            self.watch.cancelled = false;
            self.stream.release_memory();
        }
        Ok(())
    }

    /// Deals with a message that can arrive at any time (§55.2.7 "Asynchronous Operations"):
    /// a notice goes to the handler, a parameter's new value is kept, a notification is
    /// queued. Any other message is dropped (the callers pass only these three).
    #[cold]
    fn take_async(&mut self, msg: BackendMessage) {
        match msg {
            BackendMessage::NoticeResponse(notice) => (self.notice_handler)(&notice),
            BackendMessage::ParameterStatus { name, value } => {
                // A new value after startup: a statement changed the session (a set_config
                // hidden in a function, say), or the server's role did.
                if self.parameters.get(&name) != Some(&value) {
                    self.stream.note_session_change();
                }
                self.parameters.insert(name, value);
            }
            BackendMessage::NotificationResponse {
                process_id,
                channel,
                payload,
            } => {
                self.notifications.push_back(Notification {
                    process_id,
                    channel,
                    payload,
                });
            }
            other => debug_assert!(false, "not an asynchronous message: {:?}", other.tag()),
        }
    }

    /// Polls for the next step of the request read through `r`: the one read path of every
    /// request (see [`response`]). Rows, BindComplete, CommandComplete and ReadyForQuery that
    /// are whole in the buffer are taken in place — a response's messages arrive back to back,
    /// and the general path must decode each and look out for notices, status reports and
    /// FATAL errors — and everything else goes through [`poll_read`](Self::poll_read); every
    /// one of them through `r`'s rules.
    #[inline(always)]
    pub(super) fn poll_step(
        &mut self,
        r: &mut Response,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Step>> {
        // A result's rows, the bulk of what arrives, take this much and no more.
        if self.stream.next_tag() == Some(b'D') && r.takes_rows() && self.broken.is_none() {
            match self.stream.take_data_row() {
                Ok(Some(row)) => return Poll::Ready(Ok(r.accept_row(row))),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Err(self.fail(e))),
            }
        }
        self.poll_step_general(r, cx)
    }

    /// [`poll_step`](Self::poll_step) for everything but a row whole in the buffer.
    fn poll_step_general(&mut self, r: &mut Response, cx: &mut Context<'_>) -> Poll<Result<Step>> {
        if let Some(reason) = &self.broken {
            // Nothing more can be read: never wait on a stream that cannot be trusted.
            let e = Error::closed(format!("the connection is broken: {reason}"));
            return Poll::Ready(Err(r.lost(e)));
        }
        // The usual messages, whole in the buffer, are taken in place; the buffer is filled
        // until the next message is whole, so that the first message after a wait is taken
        // in place too.
        loop {
            match self.stream.next_tag() {
                Some(b'D') if r.takes_rows() => match self.stream.take_data_row() {
                    Ok(Some(row)) => return Poll::Ready(Ok(r.accept_row(row))),
                    Ok(None) => {}
                    Err(e) => return Poll::Ready(Err(self.fail(e))),
                },
                Some(b'2') if r.takes_bind_complete() && self.stream.take_bind_complete() => {
                    return Poll::Ready(Ok(Step::Message(BackendMessage::BindComplete)));
                }
                Some(b'C') if r.takes_counts() => {
                    if let Some(done) = self.stream.take_command_complete() {
                        return Poll::Ready(Ok(r.accept_count(done)));
                    }
                }
                Some(b'C') => {
                    if let Some(tag) = self.stream.take_command_tag() {
                        let msg = BackendMessage::CommandComplete(tag);
                        return Poll::Ready(self.accept(r, msg));
                    }
                }
                Some(b'Z') if self.pending > 0 => {
                    if let Some(status) = self.stream.take_ready_for_query() {
                        // `pending > 0`: this cannot fail.
                        let _ = self.ready_for_query(status);
                        return Poll::Ready(if r.accepts_ready() {
                            Ok(Step::Over)
                        } else {
                            let msg = BackendMessage::ReadyForQuery(status);
                            Err(self.unexpected(&msg, r.shape().during()))
                        });
                    }
                }
                _ => {}
            }
            if self.stream.has_whole_message() {
                break;
            }
            if let Err(e) = ready!(self.poll_more(cx)) {
                return Poll::Ready(Err(r.lost(e)));
            }
        }
        // Anything else, through the general path and its rules.
        let msg = match ready!(self.poll_read(cx)) {
            Ok(msg) => msg,
            Err(e) => return Poll::Ready(Err(r.lost(e))),
        };
        Poll::Ready(self.accept(r, msg))
    }

    /// What `msg` means for the request read through `r`; a message the request's shape does
    /// not allow breaks the connection.
    #[inline]
    fn accept(&mut self, r: &mut Response, msg: BackendMessage) -> Result<Step> {
        match r.accept(msg) {
            Ok(step) => Ok(step),
            Err(other) => Err(self.unexpected(&other, r.shape().during())),
        }
    }

    /// The next step of the request read through `r`.
    pub(super) async fn next_step(&mut self, r: &mut Response) -> Result<Step> {
        poll_fn(|cx| self.poll_step(r, cx)).await
    }

    /// Reads the rest of the request read through `r`, up to its ReadyForQuery, and returns
    /// its outcome: its first error, if any.
    pub(super) async fn finish(&mut self, mut r: Response) -> Result<()> {
        loop {
            if let Step::Over = self.next_step(&mut r).await? {
                return r.finish();
            }
        }
    }

    /// Reads the rest of a request that failed (its error is in `r`) and returns the error.
    pub(super) async fn fail_request(&mut self, r: Response) -> Error {
        match self.finish(r).await {
            Err(e) => e,
            Ok(()) => self.protocol_error("a request failed without an error"),
        }
    }

    /// A step that has no place where it came: the byte stream cannot be trusted.
    #[cold]
    pub(super) fn unexpected_step(&mut self, step: Step, during: &str) -> Error {
        let tag = match step {
            Step::Row(_) => 'D',
            Step::Complete(_) => 'C',
            Step::Message(msg) => msg.tag() as char,
            Step::Failed => 'E',
            Step::Over => 'Z',
        };
        self.protocol_error(&format!("unexpected message {tag:?} during {during}"))
    }

    /// The one place `broken` is set: the first reason is kept, and it is never cleared.
    #[cold]
    fn mark_broken(&mut self, reason: String) {
        if self.broken.is_none() {
            self.broken = Some(reason);
        }
    }

    /// Marks the connection broken because of `e`, and returns `e`.
    #[cold]
    fn fail(&mut self, e: Error) -> Error {
        self.mark_broken(e.to_string());
        e
    }

    #[cold]
    fn protocol_error(&mut self, what: &str) -> Error {
        self.fail(Error::protocol(what.to_owned()))
    }

    #[cold]
    fn unexpected(&mut self, msg: &BackendMessage, during: &str) -> Error {
        self.protocol_error(&format!(
            "unexpected message {:?} during {during}",
            msg.tag() as char
        ))
    }
}

/// The server's version, from its `server_version` parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerVersion {
    /// The major version (15 for "15.4", 9 for "9.6.24").
    pub major: u32,
    /// The minor version (4 for "15.4", 6 for "9.6.24"; 0 for "16beta1").
    pub minor: u32,
    /// The text the server reported, e.g. "15.4 (Debian 15.4-1.pgdg120+1)".
    pub text: String,
}

impl ServerVersion {
    /// Reads a `server_version` string the way Piccolo's `get_version` does: the first word,
    /// its first two dot-separated numbers.
    ///
    /// ```
    /// use pgengine::engine::ServerVersion;
    /// let v = ServerVersion::parse("12.4 (Ubuntu 12.4-1.pgdg20.04+1)").unwrap();
    /// assert_eq!((v.major, v.minor, v.as_f64()), (12, 4, 12.4));
    /// assert_eq!(ServerVersion::parse("9.4.1").unwrap().as_f64(), 9.4);
    /// assert_eq!(ServerVersion::parse("16beta1").unwrap().as_f64(), 16.0);
    /// assert!(ServerVersion::parse("unknown").is_none());
    /// ```
    pub fn parse(text: &str) -> Option<ServerVersion> {
        let word = text.split_whitespace().next()?;
        let mut parts = word.split('.');
        let leading_number = |s: &str| -> Option<u32> {
            let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        };
        let major = leading_number(parts.next()?)?;
        let minor = parts.next().and_then(leading_number).unwrap_or(0);
        Some(ServerVersion {
            major,
            minor,
            text: text.to_owned(),
        })
    }

    /// `major.minor` as a number, as Piccolo's `get_version` returns it (12.4, 9.4).
    pub fn as_f64(&self) -> f64 {
        format!("{}.{}", self.major, self.minor)
            .parse()
            .unwrap_or(self.major as f64)
    }
}
