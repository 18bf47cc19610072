//! One connection to a PostgreSQL server: startup and authentication, then queries over the
//! simple and the extended protocol, one at a time.
//!
//! The connection keeps three pieces of state, changed only in [`Connection::send`] and
//! [`Connection::read`]:
//!
//! - `status`: the transaction status of the last ReadyForQuery — the server's word on whether
//!   a transaction is open or failed, never our guess.
//! - `pending`: how many ReadyForQuery messages are still owed for requests already sent. A
//!   query whose future was dropped half way leaves it above zero; the next request first reads
//!   and discards the rest of those responses, so it can never mistake them for its own.
//! - `broken`: set when the byte stream can no longer be trusted (an I/O or protocol error, or
//!   a write cut off half way). A broken connection refuses every request.

mod startup;
mod stream;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use postgres_types::{ToSql, Type};

use crate::config::Config;
use crate::error::{DbError, Error, Result};
use crate::protocol::{BackendMessage, frontend};
use crate::row::{Column, Row, SimpleQueryResult, SimpleRow, type_from_oid};
use stream::MessageStream;

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
    host: crate::config::Host,
    port: u16,
    process_id: i32,
    secret_key: Bytes,
}

impl fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret key is what authorises a cancel: keep it out of logs.
        f.debug_struct("CancelToken")
            .field("host", &self.host)
            .field("port", &self.port)
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
        let socket = startup::open_socket(&self.host, self.port).await?;
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
}

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
        let mut conn = Connection {
            stream: s.stream,
            status: s.status,
            pending: 0,
            writing: false,
            broken: None,
            parameters: s.parameters.into_iter().collect(),
            cancel: CancelToken {
                host: s.host,
                port: s.port,
                process_id: s.process_id,
                secret_key: s.secret_key,
            },
            notice_handler: Box::new(log_notice),
            notifications: VecDeque::new(),
        };
        for notice in &s.notices {
            (conn.notice_handler)(notice);
        }
        Ok(conn)
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

    /// Notifications received so far (they can arrive during any query), oldest first.
    pub fn take_notifications(&mut self) -> Vec<Notification> {
        self.notifications.drain(..).collect()
    }

    /// Runs one or more SQL statements with the simple query protocol and returns one result
    /// per statement that produced one (an empty query string gives none). Values come back
    /// in the text format.
    ///
    /// If a statement fails, the server skips the rest of the string; the error is returned
    /// and the connection is ready for the next query.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<SimpleQueryResult>> {
        self.prepare_request().await?;
        frontend::query(&mut self.stream.write_buf, sql)?;
        self.send(1).await?;

        let mut results = Vec::new();
        let mut columns: Option<Arc<[Column]>> = None;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.read().await? {
                BackendMessage::RowDescription(fields) => {
                    columns = Some(fields.iter().map(Column::from_field).collect());
                }
                BackendMessage::DataRow(data) => {
                    let cols = columns
                        .clone()
                        .ok_or_else(|| self.protocol_error("DataRow before RowDescription"))?;
                    rows.push(SimpleRow::new(cols, data).map_err(|e| self.fail(e))?);
                }
                BackendMessage::CommandComplete(tag) => {
                    results.push(SimpleQueryResult {
                        columns: columns.take().unwrap_or_else(|| Arc::from([])),
                        rows: std::mem::take(&mut rows),
                        tag,
                    });
                }
                BackendMessage::EmptyQueryResponse => {}
                BackendMessage::ErrorResponse(db) => error = Some(Error::db(db)),
                BackendMessage::CopyInResponse(_) => {
                    // The server waits for data we do not have: refuse, and it answers with an
                    // ErrorResponse and ReadyForQuery as usual.
                    frontend::copy_fail(
                        &mut self.stream.write_buf,
                        "COPY FROM STDIN is not supported by simple_query",
                    )?;
                    self.flush().await?;
                }
                BackendMessage::CopyOutResponse(_) => {
                    error = Some(Error::conversion(
                        "COPY TO STDOUT is not supported by simple_query; its data was discarded",
                    ));
                }
                BackendMessage::CopyData(_) | BackendMessage::CopyDone => {}
                BackendMessage::ReadyForQuery(_) => break,
                other => return Err(self.unexpected(&other, "a simple query")),
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(results),
        }
    }

    /// Runs `sql` with the extended protocol, binding `params` in the binary format, and
    /// returns its rows (binary format, decoded on demand by [`Row::get`]).
    ///
    /// ```no_run
    /// # async fn demo(conn: &mut pgengine::Connection) -> pgengine::Result<()> {
    /// let rows = conn.query("SELECT $1::int4 + 1 AS n", &[&41i32]).await?;
    /// assert_eq!(rows[0].get::<_, i32>("n"), 42);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let (rows, _) = self.run_extended(sql, params).await?;
        Ok(rows)
    }

    /// Runs `sql` with the extended protocol and returns the number of rows it affected.
    pub async fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        let (_, affected) = self.run_extended(sql, params).await?;
        Ok(affected)
    }

    /// Prepares `sql` as the unnamed statement and learns its parameter and result types
    /// (Parse, Describe, Sync: one round trip).
    async fn describe_unnamed(&mut self, sql: &str) -> Result<(Vec<Type>, Arc<[Column]>)> {
        self.prepare_request().await?;
        frontend::parse(&mut self.stream.write_buf, "", sql, &[])?;
        frontend::describe(&mut self.stream.write_buf, frontend::Target::Statement, "")?;
        frontend::sync(&mut self.stream.write_buf);
        self.send(1).await?;

        let mut param_types = Vec::new();
        let mut columns: Arc<[Column]> = Arc::from([]);
        let mut error = None;
        loop {
            match self.read().await? {
                BackendMessage::ParseComplete | BackendMessage::NoData => {}
                BackendMessage::ParameterDescription(oids) => {
                    param_types = oids.into_iter().map(type_from_oid).collect();
                }
                BackendMessage::RowDescription(fields) => {
                    columns = fields.iter().map(Column::from_field).collect();
                }
                BackendMessage::ErrorResponse(db) => error = Some(Error::db(db)),
                BackendMessage::ReadyForQuery(_) => break,
                other => return Err(self.unexpected(&other, "Describe")),
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok((param_types, columns)),
        }
    }

    async fn run_extended(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<(Vec<Row>, u64)> {
        let (param_types, columns) = self.describe_unnamed(sql).await?;
        if param_types.len() != params.len() {
            return Err(Error::conversion(format!(
                "the statement has {} parameters but {} values were given",
                param_types.len(),
                params.len()
            ))
            .retry_safe());
        }
        // Encode every value before anything is sent: a value of the wrong type must not leave
        // half a pipeline on the wire.
        let buf = &mut self.stream.write_buf;
        let result = frontend::bind(
            buf,
            "",
            "",
            &[1],
            params.len(),
            |i, buf| {
                params[i]
                    .to_sql_checked(&param_types[i], buf)
                    .map(|n| matches!(n, postgres_types::IsNull::Yes))
                    .map_err(|e| {
                        Error::conversion(format!("parameter ${}: {e}", i + 1)).retry_safe()
                    })
            },
            &[1],
        );
        if let Err(e) = result {
            buf.clear();
            return Err(e);
        }
        frontend::execute(buf, "", 0)?;
        frontend::sync(buf);
        self.send(1).await?;

        let mut rows = Vec::new();
        let mut affected = 0;
        let mut error = None;
        loop {
            match self.read().await? {
                BackendMessage::BindComplete | BackendMessage::EmptyQueryResponse => {}
                BackendMessage::DataRow(data) => {
                    rows.push(Row::new(columns.clone(), data).map_err(|e| self.fail(e))?);
                }
                BackendMessage::CommandComplete(tag) => affected = crate::row::rows_affected(&tag),
                BackendMessage::ErrorResponse(db) => error = Some(Error::db(db)),
                BackendMessage::ReadyForQuery(_) => break,
                other => return Err(self.unexpected(&other, "Execute")),
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok((rows, affected)),
        }
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
            self.broken = Some("a request was interrupted while being sent".to_owned());
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
        self.pending += syncs;
        self.flush().await
    }

    async fn flush(&mut self) -> Result<()> {
        self.writing = true;
        let r = self.stream.flush().await;
        self.writing = false;
        r.map_err(|e| self.fail(e))
    }

    /// Reads the next message that belongs to the request in flight. Notices, parameter
    /// changes and notifications can arrive at any time (§55.2.7 "Asynchronous Operations")
    /// and are dealt with here.
    async fn read(&mut self) -> Result<BackendMessage> {
        loop {
            let msg = match self.stream.read_message().await {
                Ok(m) => m,
                Err(e) => return Err(self.fail(e)),
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
                        return Err(self.protocol_error("ReadyForQuery that no request asked for"));
                    }
                    self.pending -= 1;
                    self.status = status;
                    return Ok(msg);
                }
                BackendMessage::ErrorResponse(ref db) if db.severity() == "FATAL" => {
                    // The server closes the session after a FATAL error (e.g. an administrator
                    // terminated the backend).
                    self.broken = Some(format!("the server ended the session: {}", db.message()));
                    return Err(Error::db(db.clone()));
                }
                other => return Ok(other),
            }
        }
    }

    /// Marks the connection broken because of `e`, and returns `e`.
    fn fail(&mut self, e: Error) -> Error {
        if self.broken.is_none() {
            self.broken = Some(e.to_string());
        }
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
