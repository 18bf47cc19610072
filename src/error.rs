//! The one error type of pgengine.
//!
//! Every fallible operation returns [`Error`]. It is opaque on purpose: a caller matches on
//! [`Error::kind`] and asks the predicates ([`Error::code`], [`Error::as_db_error`],
//! [`Error::is_closed`], [`Error::safe_to_retry`]) instead of depending on a layout that would
//! have to stay fixed forever.
//!
//! An error the server sent (an `ErrorResponse`, PostgreSQL docs §55.8 "Error and Notice
//! Message Fields") keeps every field in a [`DbError`]. Messages never contain a password: the
//! constructors take text written by this crate, never the user's connection string.

use std::error::Error as StdError;
use std::fmt;

use bytes::Bytes;

/// What went wrong, broadly. Match on this to decide what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The server answered a query with an `ErrorResponse`; see [`Error::as_db_error`].
    Db,
    /// The socket failed: connection refused, reset, or closed by the server.
    Io,
    /// The server sent bytes that break the protocol. The connection is discarded.
    Protocol,
    /// Authentication failed or could not be attempted (wrong password, unsupported method).
    Auth,
    /// A connection setting is unknown or malformed.
    Config,
    /// TLS could not be set up: the server refused it where it is required, the handshake
    /// failed, or the server's certificate was rejected (wrong CA, wrong host name).
    Tls,
    /// An operation did not finish within its time limit.
    Timeout,
    /// The connection (or the pool) is closed or broken and cannot be used.
    Closed,
    /// A transaction was used in a way its state does not allow.
    Transaction,
    /// The connection pool refused or could not serve a request.
    Pool,
    /// A Rust value could not be encoded as a parameter, or a column decoded into a Rust type.
    Conversion,
    /// A query returned a different number of rows than the call expects (`query_one`).
    RowCount,
    /// The connection is not free for the operation: it still owes responses to an earlier
    /// request whose future was dropped, or (for waiting on notifications) a transaction is
    /// open. Nothing was sent; finish or [`reset`](crate::Connection::reset) it first.
    Busy,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Db => "database error",
            ErrorKind::Io => "I/O error",
            ErrorKind::Protocol => "protocol error",
            ErrorKind::Auth => "authentication error",
            ErrorKind::Config => "configuration error",
            ErrorKind::Tls => "TLS error",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Closed => "connection closed",
            ErrorKind::Transaction => "transaction error",
            ErrorKind::Pool => "pool error",
            ErrorKind::Conversion => "conversion error",
            ErrorKind::RowCount => "unexpected number of rows",
            ErrorKind::Busy => "connection busy",
        })
    }
}

/// Why a transaction refused an operation (with [`ErrorKind::Transaction`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransactionError {
    /// A transaction is already active on this task and nesting was not allowed.
    Nested,
    /// An earlier query failed: only a rollback (or `rollback_to` a savepoint) is possible.
    Failed,
    /// The transaction was already committed or rolled back.
    Finished,
    /// A savepoint name that is not a valid SQL identifier.
    InvalidSavepointName,
    /// A savepoint that was released or rolled back past.
    SavepointGone,
    /// The transaction could not commit; nothing was saved.
    NotCommitted,
    /// `run_sync` was called where it would block an async runtime.
    BlockingInRuntime,
    /// A transaction-control statement (`BEGIN`, `COMMIT`, `ROLLBACK`, `SAVEPOINT`, …) was
    /// refused where it could not do what it says: through the engine outside a transaction
    /// scope (each statement runs on whichever connection is free, so a `BEGIN` would open a
    /// block no later statement is sure to join, and a `ROLLBACK` would undo nothing), or
    /// among an [`Atomic`](crate::atomic::Atomic)'s queries. Nothing was sent. Use
    /// [`PostgresEngine::transaction`](crate::PostgresEngine::transaction) or
    /// [`begin`](crate::PostgresEngine::begin), and savepoints through the transaction.
    ControlStatement,
    /// The work may or may not have been committed: a statement ended a transaction block
    /// that the work ran in, and what it ended it with is not known. Check before retrying.
    OutcomeUnknown,
}

/// The error type of every pgengine operation.
pub struct Error(Box<Inner>);

struct Inner {
    kind: ErrorKind,
    message: String,
    db: Option<Box<DbError>>,
    source: Option<Box<dyn StdError + Send + Sync>>,
    /// True when nothing of the failed operation reached the server, so running it again
    /// cannot apply it twice (jackc/pgx's `SafeToRetry`).
    safe_to_retry: bool,
    transaction: Option<TransactionError>,
    needs_own_run: bool,
}

impl Error {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error(Box::new(Inner {
            kind,
            message: message.into(),
            db: None,
            source: None,
            safe_to_retry: false,
            transaction: None,
            needs_own_run: false,
        }))
    }

    /// A malformed or unknown connection setting.
    pub(crate) fn config(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Config, message)
    }

    /// The peer broke the wire protocol.
    pub(crate) fn protocol(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Protocol, message)
    }

    /// Authentication could not proceed.
    pub(crate) fn auth(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Auth, message)
    }

    /// An operation ran out of time.
    pub(crate) fn tls(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Tls, message)
    }

    pub(crate) fn timeout(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Timeout, message)
    }

    /// The connection cannot be used any more.
    pub(crate) fn closed(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Closed, message)
    }

    /// A transaction state rule was broken.
    pub(crate) fn transaction(why: TransactionError, message: impl Into<String>) -> Error {
        let mut e = Error::new(ErrorKind::Transaction, message);
        e.0.transaction = Some(why);
        e
    }

    /// This error as the reason a wait ran out: kind [`ErrorKind::Timeout`], `message` in
    /// front, the SQLSTATE and every server field kept.
    pub(crate) fn timed_out(mut self, message: impl std::fmt::Display) -> Error {
        self.0.kind = ErrorKind::Timeout;
        self.context(message)
    }

    /// The same error for another caller that it also ended (the queries in flight on a
    /// pipelined connection that broke): kind, message, server fields and flags; the source
    /// is kept as text.
    pub(crate) fn duplicate(&self) -> Error {
        let mut message = self.0.message.clone();
        if let Some(source) = &self.0.source
            && message.is_empty()
        {
            message = source.to_string();
        }
        Error(Box::new(Inner {
            kind: self.0.kind,
            message,
            db: self.0.db.clone(),
            source: None,
            safe_to_retry: self.0.safe_to_retry,
            transaction: self.0.transaction,
            needs_own_run: false,
        }))
    }

    /// Prefixes the message with what was being done (the kind, SQLSTATE and fields stay).
    pub(crate) fn context(mut self, context: impl std::fmt::Display) -> Error {
        self.0.message = if self.0.message.is_empty() {
            context.to_string()
        } else {
            format!("{context}: {}", self.0.message)
        };
        self
    }

    /// Says how many attempts a retrying transaction made before giving up with this error.
    pub(crate) fn note_attempts(&mut self, attempts: u32) {
        let noted = format!("the transaction was attempted {attempts} time(s)");
        self.0.message = if self.0.message.is_empty() {
            noted
        } else {
            format!("{}; {noted}", self.0.message)
        };
    }

    /// Why a transaction refused an operation, for [`ErrorKind::Transaction`] errors.
    pub fn transaction_error(&self) -> Option<TransactionError> {
        self.0.transaction
    }

    /// The pool could not serve a request.
    #[allow(dead_code)]
    pub(crate) fn pool(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Pool, message)
    }

    /// A value could not be converted between Rust and PostgreSQL.
    #[allow(dead_code)]
    pub(crate) fn conversion(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Conversion, message)
    }

    /// A pipelined query that must run on a connection of its own (its statement has to be
    /// described by the server first); the engine retries it so, the user never sees this.
    pub(crate) fn needs_own_run() -> Error {
        let mut e = Error::new(ErrorKind::Conversion, "this query cannot be pipelined");
        e.0.needs_own_run = true;
        e
    }

    /// True for [`Error::needs_own_run`].
    pub(crate) fn is_needs_own_run(&self) -> bool {
        self.0.needs_own_run
    }

    /// The connection is not in a state that allows the operation; nothing was sent.
    pub(crate) fn busy(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Busy, message).retry_safe()
    }

    /// A query returned the wrong number of rows.
    pub(crate) fn row_count(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::RowCount, message)
    }

    /// A socket error, with what we were doing when it happened.
    pub(crate) fn io(context: &str, err: std::io::Error) -> Error {
        let mut e = Error::new(ErrorKind::Io, format!("{context}: {err}"));
        e.0.source = Some(Box::new(err));
        e
    }

    /// An `ErrorResponse` from the server.
    pub(crate) fn db(db: impl Into<Box<DbError>>) -> Error {
        Error::with_db(ErrorKind::Db, db)
    }

    /// An `ErrorResponse` that belongs to another kind (e.g. a failed login is `Auth`).
    pub(crate) fn with_db(kind: ErrorKind, db: impl Into<Box<DbError>>) -> Error {
        let mut e = Error::new(kind, String::new());
        e.0.db = Some(db.into());
        e
    }

    /// Attaches the underlying cause.
    #[allow(dead_code)]
    pub(crate) fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Error {
        self.0.source = Some(Box::new(source));
        self
    }

    /// Marks that nothing of the failed operation reached the server.
    pub(crate) fn retry_safe(mut self) -> Error {
        self.0.safe_to_retry = true;
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }

    /// The SQLSTATE code the server sent (e.g. `"23505"` for a unique violation), if any.
    pub fn code(&self) -> Option<&str> {
        self.0.db.as_ref().map(|db| db.code())
    }

    /// Every field of the server's `ErrorResponse`, if the server sent one.
    pub fn as_db_error(&self) -> Option<&DbError> {
        self.0.db.as_deref()
    }

    /// True when the connection is closed or broken.
    pub fn is_closed(&self) -> bool {
        matches!(self.0.kind, ErrorKind::Closed | ErrorKind::Io)
    }

    /// True when nothing of the failed operation reached the server: retrying it cannot make it
    /// happen twice.
    pub fn safe_to_retry(&self) -> bool {
        self.0.safe_to_retry
    }

    /// This error as it may be logged: its kind, what pgengine was doing, and for a server
    /// error the SQLSTATE, severity and the schema, table, column, data type and constraint it
    /// names — never the server's message, detail, hint or where-context, which can quote a
    /// value (`invalid input syntax for type integer: "…"`, a unique violation's `Key (…)=(…)`).
    /// Every log line of pgengine's that reports an error uses it; `Display` keeps everything,
    /// for the caller.
    ///
    /// ```
    /// # fn demo(e: pgengine::Error) {
    /// tracing::warn!(error = %e.redacted(), "the import failed");
    /// # }
    /// ```
    pub fn redacted(&self) -> Redacted<'_> {
        Redacted(self)
    }
}

/// An [`Error`] rendered without anything that can hold a value (see [`Error::redacted`]).
pub struct Redacted<'a>(&'a Error);

impl fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = &self.0.0;
        write!(f, "{}", e.kind)?;
        if !e.message.is_empty() && e.db.is_none() {
            // Our own words: they never quote a value.
            write!(f, ": {}", e.message)?;
        } else if !e.message.is_empty() {
            // Context added to a server error is ours too.
            write!(f, ": {}", e.message)?;
        }
        if let Some(db) = &e.db {
            write!(
                f,
                ": SQLSTATE {} ({})",
                db.code,
                db.severity_nonlocalized.as_deref().unwrap_or(&db.severity)
            )?;
            for (what, name) in [
                ("schema", &db.schema),
                ("table", &db.table),
                ("column", &db.column),
                ("data type", &db.datatype),
                ("constraint", &db.constraint),
            ] {
                if let Some(name) = name {
                    write!(f, ", {what} {name}")?;
                }
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.0.kind);
        if !self.0.message.is_empty() {
            d.field("message", &self.0.message);
        }
        if let Some(db) = &self.0.db {
            d.field("db", db);
        }
        if let Some(source) = &self.0.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.kind)?;
        if !self.0.message.is_empty() {
            write!(f, ": {}", self.0.message)?;
        }
        if let Some(db) = &self.0.db {
            write!(f, ": {db}")?;
        }
        Ok(())
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match &self.0.source {
            Some(s) => Some(&**s as &(dyn StdError + 'static)),
            None => self
                .0
                .db
                .as_deref()
                .map(|db| db as &(dyn StdError + 'static)),
        }
    }
}

/// An error or notice sent by the server, with every field of the `ErrorResponse` /
/// `NoticeResponse` message (PostgreSQL docs §55.8).
#[derive(Clone, PartialEq, Eq)]
pub struct DbError {
    pub(crate) severity: String,
    pub(crate) severity_nonlocalized: Option<String>,
    pub(crate) code: String,
    pub(crate) message: String,
    pub(crate) detail: Option<String>,
    pub(crate) hint: Option<String>,
    pub(crate) position: Option<ErrorPosition>,
    pub(crate) where_: Option<String>,
    pub(crate) schema: Option<String>,
    pub(crate) table: Option<String>,
    pub(crate) column: Option<String>,
    pub(crate) datatype: Option<String>,
    pub(crate) constraint: Option<String>,
    pub(crate) file: Option<String>,
    pub(crate) line: Option<u32>,
    pub(crate) routine: Option<String>,
}

/// Where in a query the server found the error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorPosition {
    /// A 1-based character offset into the query the client sent.
    Original(u32),
    /// A position inside an internally generated query (e.g. in a PL/pgSQL function).
    Internal {
        /// 1-based character offset into `query`.
        position: u32,
        /// The text of the internally generated query.
        query: String,
    },
}

impl DbError {
    /// Parses the fields of an `ErrorResponse` or `NoticeResponse` body: a list of
    /// `(type byte, NUL-terminated string)` pairs ended by a zero byte.
    pub(crate) fn parse(fields: &Bytes) -> Result<DbError, Error> {
        let mut severity = None;
        let mut db = DbError {
            severity: String::new(),
            severity_nonlocalized: None,
            code: String::new(),
            message: String::new(),
            detail: None,
            hint: None,
            position: None,
            where_: None,
            schema: None,
            table: None,
            column: None,
            datatype: None,
            constraint: None,
            file: None,
            line: None,
            routine: None,
        };
        let mut code = None;
        let mut message = None;
        let mut position = None;
        let mut internal_position = None;
        let mut internal_query = None;
        let mut rest = &fields[..];
        loop {
            let (&ty, tail) = rest
                .split_first()
                .ok_or_else(|| Error::protocol("error fields are not terminated"))?;
            if ty == 0 {
                if !tail.is_empty() {
                    return Err(Error::protocol("bytes after the end of error fields"));
                }
                break;
            }
            let nul = tail
                .iter()
                .position(|&b| b == 0)
                .ok_or_else(|| Error::protocol("error field is not NUL-terminated"))?;
            // The server sends text in client_encoding, which we always set to UTF8; lossy
            // conversion keeps a misbehaving server's message readable instead of failing.
            let value = String::from_utf8_lossy(&tail[..nul]).into_owned();
            rest = &tail[nul + 1..];
            match ty {
                b'S' => severity = Some(value),
                b'V' => db.severity_nonlocalized = Some(value),
                b'C' => code = Some(value),
                b'M' => message = Some(value),
                b'D' => db.detail = Some(value),
                b'H' => db.hint = Some(value),
                b'P' => position = Some(parse_position(&value)?),
                b'p' => internal_position = Some(parse_position(&value)?),
                b'q' => internal_query = Some(value),
                b'W' => db.where_ = Some(value),
                b's' => db.schema = Some(value),
                b't' => db.table = Some(value),
                b'c' => db.column = Some(value),
                b'd' => db.datatype = Some(value),
                b'n' => db.constraint = Some(value),
                b'F' => db.file = Some(value),
                b'L' => db.line = value.parse().ok(),
                b'R' => db.routine = Some(value),
                // "Frontends should silently ignore fields of unrecognized type" (§55.8).
                _ => {}
            }
        }
        // Severity, code and message are "always present" per §55.8; a server that omits them
        // is broken, but the rest of what it said is still worth reporting.
        db.severity = severity
            .or_else(|| db.severity_nonlocalized.clone())
            .unwrap_or_else(|| "ERROR".to_owned());
        db.code = code.unwrap_or_else(|| "XX000".to_owned());
        db.message = message.unwrap_or_default();
        db.position = match (position, internal_position, internal_query) {
            (Some(p), _, _) => Some(ErrorPosition::Original(p)),
            (None, Some(p), Some(q)) => Some(ErrorPosition::Internal {
                position: p,
                query: q,
            }),
            _ => None,
        };
        Ok(db)
    }

    /// Severity as the server localised it: `ERROR`, `FATAL`, `PANIC`, or for notices
    /// `WARNING`, `NOTICE`, `DEBUG`, `INFO`, `LOG`.
    pub fn severity(&self) -> &str {
        &self.severity
    }

    /// Severity never localised (PostgreSQL 9.6+).
    pub fn severity_nonlocalized(&self) -> Option<&str> {
        self.severity_nonlocalized.as_deref()
    }

    /// The SQLSTATE code, e.g. `"42601"` for a syntax error.
    pub fn code(&self) -> &str {
        &self.code
    }

    /// The primary human-readable message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// An optional secondary message with more detail.
    pub fn detail(&self) -> Option<&str> {
        self.detail.as_deref()
    }

    /// An optional suggestion of what to do about the problem.
    pub fn hint(&self) -> Option<&str> {
        self.hint.as_deref()
    }

    /// Where in the query the error was found.
    pub fn position(&self) -> Option<&ErrorPosition> {
        self.position.as_ref()
    }

    /// The call stack context in which the error occurred.
    pub fn where_(&self) -> Option<&str> {
        self.where_.as_deref()
    }

    /// The schema of the object the error is about.
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// The table the error is about.
    pub fn table(&self) -> Option<&str> {
        self.table.as_deref()
    }

    /// The column the error is about.
    pub fn column(&self) -> Option<&str> {
        self.column.as_deref()
    }

    /// The data type the error is about.
    pub fn datatype(&self) -> Option<&str> {
        self.datatype.as_deref()
    }

    /// The constraint the error is about.
    pub fn constraint(&self) -> Option<&str> {
        self.constraint.as_deref()
    }

    /// The server source file that reported the error.
    pub fn file(&self) -> Option<&str> {
        self.file.as_deref()
    }

    /// The line in the server source file.
    pub fn line(&self) -> Option<u32> {
        self.line
    }

    /// The server source routine that reported the error.
    pub fn routine(&self) -> Option<&str> {
        self.routine.as_deref()
    }
}

fn parse_position(value: &str) -> Result<u32, Error> {
    value
        .parse()
        .map_err(|_| Error::protocol("error position is not a number"))
}

impl DbError {
    /// The message as `Display` and `Debug` show it: for a data exception (SQLSTATE class
    /// 22), whose message quotes the input it refused (`invalid input syntax for type
    /// integer: "…"`), every double-quoted part is masked; other messages are kept whole.
    /// [`message`](Self::message) has the server's text as it came.
    fn shown_message(&self) -> std::borrow::Cow<'_, str> {
        if !self.code.starts_with("22") || !self.message.contains('"') {
            return std::borrow::Cow::Borrowed(&self.message);
        }
        let mut shown = String::with_capacity(self.message.len());
        for (i, part) in self.message.split('"').enumerate() {
            if i > 0 {
                shown.push('"');
            }
            // Odd parts were between quotes.
            shown.push_str(if i % 2 == 1 { "…" } else { part });
        }
        std::borrow::Cow::Owned(shown)
    }
}

/// Like `Display`, it leaves out what can quote a value the query carried: the detail (a
/// unique violation's `Key (…)=(…)`, a check violation's failing row), the where-context and
/// the quoted input of a data exception. Every field is still there through the accessors.
impl fmt::Debug for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("DbError");
        d.field("severity", &self.severity)
            .field("code", &self.code)
            .field("message", &self.shown_message());
        macro_rules! opt {
            ($($name:ident),*) => {$(
                if let Some(v) = &self.$name { d.field(stringify!($name), v); }
            )*};
        }
        opt!(hint, position, schema, table, column, datatype, constraint);
        opt!(file, line, routine);
        d.finish_non_exhaustive()
    }
}

/// `SEVERITY CODE: message`, and the hint. The detail and where-context are left out, and a
/// data exception's quoted input is masked: they can quote the values a query carried
/// (parameter values never appear in an error's `Display`); [`DbError::detail`],
/// [`DbError::message`] and the other accessors have everything the server sent.
impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.severity,
            self.code,
            self.shown_message()
        )?;
        if self.detail.is_some() {
            write!(f, " (detail left out: see DbError::detail)")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "\nHINT: {hint}")?;
        }
        Ok(())
    }
}

impl StdError for DbError {}

/// The result type of pgengine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(u8, &str)]) -> Bytes {
        let mut v = Vec::new();
        for (t, s) in pairs {
            v.push(*t);
            v.extend_from_slice(s.as_bytes());
            v.push(0);
        }
        v.push(0);
        Bytes::from(v)
    }

    #[test]
    fn parses_every_field() {
        let db = DbError::parse(&fields(&[
            (b'S', "ERROR"),
            (b'V', "ERROR"),
            (b'C', "23505"),
            (b'M', "duplicate key"),
            (b'D', "Key (id)=(1) already exists."),
            (b'H', "try another"),
            (b'P', "12"),
            (b'W', "here"),
            (b's', "public"),
            (b't', "t"),
            (b'c', "id"),
            (b'd', "int4"),
            (b'n', "t_pkey"),
            (b'F', "nbtinsert.c"),
            (b'L', "664"),
            (b'R', "_bt_check_unique"),
            (b'Z', "unknown field is ignored"),
        ]))
        .unwrap();
        assert_eq!(db.code(), "23505");
        assert_eq!(db.message(), "duplicate key");
        assert_eq!(db.detail(), Some("Key (id)=(1) already exists."));
        assert_eq!(db.position(), Some(&ErrorPosition::Original(12)));
        assert_eq!(db.constraint(), Some("t_pkey"));
        assert_eq!(db.line(), Some(664));
        assert_eq!(db.routine(), Some("_bt_check_unique"));
        let e = Error::db(db);
        assert_eq!(e.code(), Some("23505"));
        assert_eq!(e.kind(), ErrorKind::Db);
        assert!(e.to_string().contains("duplicate key"));
    }

    #[test]
    fn rejects_unterminated_fields() {
        assert!(DbError::parse(&Bytes::from_static(b"SERROR")).is_err());
        assert!(DbError::parse(&Bytes::from_static(b"SERROR\0")).is_err());
        assert!(DbError::parse(&Bytes::from_static(b"")).is_err());
        assert!(DbError::parse(&Bytes::from_static(b"\0extra")).is_err());
        assert!(DbError::parse(&Bytes::from_static(b"Pnot-a-number\0\0")).is_err());
    }
}
