//! One connection to a PostgreSQL server: startup and authentication, then queries over the
//! simple and the extended protocol, one at a time.
//!
//! The connection keeps three pieces of state:
//!
//! - `status`: the transaction status of the last ReadyForQuery — the server's word on whether
//!   a transaction is open or failed, never our guess. Set only in `Connection::poll_read`.
//! - `pending`: how many ReadyForQuery messages are still owed for requests already sent. A
//!   query whose future was dropped half way leaves it above zero; the next request first reads
//!   and discards the rest of those responses, so it can never mistake them for its own.
//!   Raised only in `Connection::send`, lowered only in `Connection::poll_read`.
//! - `broken`: set only in `Connection::mark_broken` (and never cleared) when the byte stream can no
//!   longer be trusted: an I/O or protocol error, a write cut off half way, a FATAL error, a
//!   query timeout. A broken connection refuses every request.

mod cache;
mod extended;
mod simple;
mod startup;
mod stream;
mod tls;
mod types;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::poll_fn;
use std::task::{Context, Poll};

use bytes::Bytes;

use crate::config::Config;
use crate::error::{DbError, Error, Result};
use crate::protocol::{BackendMessage, frontend};
use cache::StatementCache;
use stream::MessageStream;

pub use extended::RowStream;
pub use stream::Transport;

pub use crate::protocol::TransactionStatus;

/// Called with each NoticeResponse (warnings, `RAISE NOTICE`, …).
pub type NoticeHandler = Box<dyn FnMut(&DbError) + Send>;

/// A notification from `NOTIFY` on a channel this connection listens to.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// One connection to a PostgreSQL server.
pub struct Connection {
    stream: MessageStream,
    status: TransactionStatus,
    pending: usize,
    /// True from the moment a request starts going out until it is fully written.
    writing: bool,
    broken: Option<String>,
    parameters: HashMap<String, String>,
    cancel: CancelToken,
    notice_handler: NoticeHandler,
    notifications: VecDeque<Notification>,
    statements: StatementCache,
    /// Statements evicted from the cache whose Close has not been confirmed by the server yet;
    /// they go out in front of the next request.
    closes_due: Vec<std::sync::Arc<str>>,
    stats: ConnectionStats,
    /// Types looked up in the catalogs (enums, composites, …), by OID.
    types: HashMap<u32, postgres_types::Type>,
    /// How long a request may take from being sent to its ReadyForQuery.
    query_timeout: Option<std::time::Duration>,
    /// The current request's deadline, reset by each send (allocated once).
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

fn log_notice(notice: &DbError) {
    tracing::info!(
        target: "pgengine::notice",
        severity = notice.severity(),
        code = notice.code(),
        "{}",
        notice.message()
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
        Ok(Connection::from_startup(s))
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
        let socket = stream::Socket::Other(Box::new(stream));
        let s = startup::start_on(socket, config, None).await?;
        Ok(Connection::from_startup(s))
    }

    fn from_startup(s: startup::Startup) -> Connection {
        let mut conn = Connection {
            stream: s.stream,
            status: s.status,
            pending: 0,
            writing: false,
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
            statements: StatementCache::new(DEFAULT_STATEMENT_CACHE_CAPACITY),
            closes_due: Vec::new(),
            types: HashMap::new(),
            query_timeout: None,
            deadline: None,
            stats: ConnectionStats::default(),
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

    /// The current value of a run-time parameter the server reports (`server_version`,
    /// `TimeZone`, `client_encoding`, `integer_datetimes`, …).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.get(name).map(String::as_str)
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
        self.pending > 0 || self.writing
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

    /// Notifications received so far (they can arrive during any query), oldest first.
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

    /// Sets how long a request may take, from being sent until the server says it is ready
    /// again (a row stream's rows included). When the time is up, the running statement is
    /// cancelled on the server, the request fails with [`ErrorKind::Timeout`], and the
    /// connection — whose state is then unknown — is closed (a pool replaces it).
    ///
    /// [`ErrorKind::Timeout`]: crate::ErrorKind::Timeout
    pub fn set_query_timeout(&mut self, timeout: Option<std::time::Duration>) {
        self.query_timeout = timeout;
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
    async fn prepare_request(&mut self) -> Result<()> {
        if self.writing {
            // A write was cut off: the server may hold half a message. Nothing can fix that.
            self.mark_broken("a request was interrupted while being sent".to_owned());
        }
        if let Some(reason) = &self.broken {
            return Err(Error::closed(format!("the connection is broken: {reason}")).retry_safe());
        }
        while self.pending > 0 {
            // Errors in these responses belong to a request nobody waits for any more.
            self.read().await?;
        }
        self.stream.write_buf.clear();
        Ok(())
    }

    /// Sends what is in the write buffer; `syncs` is how many ReadyForQuery it will earn.
    async fn send(&mut self, syncs: usize) -> Result<()> {
        if let Some(limit) = self.query_timeout {
            let at = tokio::time::Instant::now() + limit;
            match &mut self.deadline {
                Some(sleep) => sleep.as_mut().reset(at),
                None => self.deadline = Some(Box::pin(tokio::time::sleep_until(at))),
            }
        }
        self.pending += syncs;
        self.stats.round_trips += syncs as u64;
        self.flush().await
    }

    /// The request in flight took too long: cancel it on the server (in the background: the
    /// caller should not wait on a server that may not answer) and give the connection up.
    fn time_out(&mut self) -> Error {
        let limit = self.query_timeout.unwrap_or_default();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let token = self.cancel.clone();
            handle.spawn(async move {
                let _ = tokio::time::timeout(
                    limit.max(std::time::Duration::from_secs(1)),
                    token.cancel_query(),
                )
                .await;
            });
        }
        self.fail(Error::timeout(format!(
            "the server did not answer within {limit:?}: the statement was cancelled and the \
             connection closed"
        )))
    }

    async fn flush(&mut self) -> Result<()> {
        self.writing = true;
        let r = self.stream.flush().await;
        self.writing = false;
        r.map_err(|e| self.fail(e))
    }

    /// Reads the next message that belongs to the request in flight.
    async fn read(&mut self) -> Result<BackendMessage> {
        poll_fn(|cx| self.poll_read(cx)).await
    }

    /// Polls for the next message that belongs to the request in flight. Notices, parameter
    /// changes and notifications can arrive at any time (§55.2.7 "Asynchronous Operations") and
    /// are dealt with here; ReadyForQuery updates the transaction status.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<BackendMessage>> {
        loop {
            let msg = match self.stream.poll_message(cx) {
                Poll::Ready(Ok(m)) => m,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(self.fail(e))),
                Poll::Pending => {
                    if self.pending > 0
                        && self.query_timeout.is_some()
                        && let Some(deadline) = self.deadline.as_mut()
                        && deadline.as_mut().poll(cx).is_ready()
                    {
                        return Poll::Ready(Err(self.time_out()));
                    }
                    return Poll::Pending;
                }
            };
            match msg {
                BackendMessage::NoticeResponse(notice) => (self.notice_handler)(&notice),
                BackendMessage::ParameterStatus { name, value } => {
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
                BackendMessage::ReadyForQuery(status) => {
                    if self.pending == 0 {
                        return Poll::Ready(Err(
                            self.protocol_error("ReadyForQuery that no request asked for")
                        ));
                    }
                    self.pending -= 1;
                    self.status = status;
                    return Poll::Ready(Ok(msg));
                }
                BackendMessage::ErrorResponse(ref db) if db.severity() == "FATAL" => {
                    // The server closes the session after a FATAL error (e.g. an administrator
                    // terminated the backend).
                    self.mark_broken(format!("the server ended the session: {}", db.message()));
                    return Poll::Ready(Err(Error::db(db.clone())));
                }
                other => return Poll::Ready(Ok(other)),
            }
        }
    }

    /// Reads until the ReadyForQuery that ends the current request, keeping the first server
    /// error seen on the way; anything else is a protocol error.
    async fn finish_request(&mut self, mut error: Option<Error>) -> Result<()> {
        loop {
            match self.read().await? {
                BackendMessage::ReadyForQuery(_) => break,
                BackendMessage::ErrorResponse(db) => {
                    error.get_or_insert(Error::db(db));
                }
                // What a request may still produce after the part its caller consumed.
                BackendMessage::DataRow(_)
                | BackendMessage::CommandComplete(_)
                | BackendMessage::EmptyQueryResponse
                | BackendMessage::PortalSuspended
                | BackendMessage::CloseComplete
                | BackendMessage::BindComplete
                | BackendMessage::ParseComplete
                | BackendMessage::NoData
                | BackendMessage::RowDescription(_)
                | BackendMessage::ParameterDescription(_) => {}
                other => return Err(self.unexpected(&other, "the end of a request")),
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The one place `broken` is set: the first reason is kept, and it is never cleared.
    fn mark_broken(&mut self, reason: String) {
        if self.broken.is_none() {
            self.broken = Some(reason);
        }
    }

    /// Marks the connection broken because of `e`, and returns `e`.
    fn fail(&mut self, e: Error) -> Error {
        self.mark_broken(e.to_string());
        e
    }

    fn protocol_error(&mut self, what: &str) -> Error {
        self.fail(Error::protocol(what.to_owned()))
    }

    fn unexpected(&mut self, msg: &BackendMessage, during: &str) -> Error {
        self.protocol_error(&format!(
            "unexpected message {:?} during {during}",
            msg.tag() as char
        ))
    }
}
