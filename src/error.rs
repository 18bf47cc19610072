//! The one error type of pgengine.
//!
//! Every fallible operation returns [`Error`]. It is opaque on purpose: a caller matches on
//! [`Error::kind`] and asks the predicates ([`Error::code`], [`Error::as_db_error`],
//! [`Error::is_closed`], [`Error::safe_to_retry`]) instead of depending on a layout that would
//! have to stay fixed forever.
//!
//! An error the server sent (an `ErrorResponse`, PostgreSQL docs §55.8 "Error and Notice
//! Message Fields") keeps every field in a [`DbError`], its SQLSTATE as a [`SqlState`] and its
//! severity, never localised, as a [`Severity`]. An error that a lower one caused (a socket's
//! `io::Error`, a TLS failure, a `FromSql` or `ToSql` implementation's error) keeps it as its
//! [`source`](std::error::Error::source). Messages never contain a password: the constructors
//! take text written by this crate, never the user's connection string.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

mod sqlstate;

pub use sqlstate::SqlState;

/// What went wrong, broadly. Match on this to decide what to do next.
///
/// ```
/// use pgengine::ErrorKind;
///
/// fn worth_another_try(kind: ErrorKind) -> bool {
///     matches!(kind, ErrorKind::Io | ErrorKind::Closed | ErrorKind::Timeout | ErrorKind::Pool)
/// }
/// assert!(!worth_another_try(ErrorKind::Config));
/// ```
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
///
/// ```no_run
/// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
/// use pgengine::{ErrorKind, SqlState};
///
/// match engine.execute("INSERT INTO band (id) VALUES (1)").await {
///     Ok(_) => {}
///     Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => println!("already there"),
///     Err(e) if e.kind() == ErrorKind::Timeout => println!("too slow: {e}"),
///     Err(e) => return Err(e),
/// }
/// # Ok(())
/// # }
/// ```
pub struct Error(Box<Inner>);

/// A lower error that caused an [`Error`]. Shared, so that the copies of one error handed to
/// every query a broken pipelined connection carried ([`Error::duplicate`]) all keep it.
type Source = Arc<dyn StdError + Send + Sync>;

struct Inner {
    kind: ErrorKind,
    message: String,
    db: Option<Box<DbError>>,
    source: Option<Source>,
    /// True when nothing of the failed operation reached the server, so running it again
    /// cannot apply it twice (jackc/pgx's `SafeToRetry`).
    safe_to_retry: bool,
    transaction: Option<TransactionError>,
    /// How many attempts a retrying transaction made before giving up with this error
    /// (0: not from one).
    attempts: u32,
}

impl Error {
    #[cold]
    fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error(Box::new(Inner {
            kind,
            message: message.into(),
            db: None,
            source: None,
            safe_to_retry: false,
            transaction: None,
            attempts: 0,
        }))
    }

    /// A malformed or unknown connection setting.
    #[cold]
    pub(crate) fn config(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Config, message)
    }

    /// The peer broke the wire protocol.
    #[cold]
    pub(crate) fn protocol(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Protocol, message)
    }

    /// Authentication could not proceed.
    #[cold]
    pub(crate) fn auth(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Auth, message)
    }

    /// TLS could not be set up.
    #[cold]
    pub(crate) fn tls(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Tls, message)
    }

    /// An operation ran out of time.
    #[cold]
    pub(crate) fn timeout(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Timeout, message)
    }

    /// The connection cannot be used any more.
    #[cold]
    pub(crate) fn closed(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Closed, message)
    }

    /// A transaction state rule was broken.
    #[cold]
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
    /// pipelined connection that broke): kind, message, server fields, source and flags.
    pub(crate) fn duplicate(&self) -> Error {
        Error(Box::new(Inner {
            kind: self.0.kind,
            message: self.0.message.clone(),
            db: self.0.db.clone(),
            source: self.0.source.clone(),
            safe_to_retry: self.0.safe_to_retry,
            transaction: self.0.transaction,
            attempts: self.0.attempts,
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
        self.0.attempts = attempts;
        let noted = format!("the transaction was attempted {attempts} time(s)");
        self.0.message = if self.0.message.is_empty() {
            noted
        } else {
            format!("{}; {noted}", self.0.message)
        };
    }

    /// How many attempts a retrying transaction or Atomic
    /// ([`RetryPolicy`](crate::RetryPolicy)) made before giving up with this error; `None`
    /// for an error that did not end one.
    pub fn attempts(&self) -> Option<u32> {
        (self.0.attempts > 0).then_some(self.0.attempts)
    }

    /// Why a transaction refused an operation, for [`ErrorKind::Transaction`] errors.
    pub fn transaction_error(&self) -> Option<TransactionError> {
        self.0.transaction
    }

    /// The pool could not serve a request.
    #[allow(dead_code)]
    #[cold]
    pub(crate) fn pool(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Pool, message)
    }

    /// A value could not be converted between Rust and PostgreSQL.
    #[cold]
    pub(crate) fn conversion(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Conversion, message)
    }

    /// A column could not be decoded: `cause` is the `FromSql` implementation's error (or
    /// postgres-types' `WrongType`, `WasNull`), kept as the source.
    #[cold]
    pub(crate) fn from_sql(column: &str, cause: Box<dyn StdError + Send + Sync>) -> Error {
        Error::conversion(format!("could not decode column {column:?}: {cause}")).with_source(cause)
    }

    /// A value could not be encoded: `cause` is the `ToSql` implementation's error, kept as
    /// the source. `what` names the value (`parameter $2`, `COPY column 3 (int4)`).
    #[cold]
    pub(crate) fn to_sql(what: impl fmt::Display, cause: Box<dyn StdError + Send + Sync>) -> Error {
        Error::conversion(format!("{what}: {cause}")).with_source(cause)
    }

    /// The connection is not in a state that allows the operation; nothing was sent.
    #[cold]
    pub(crate) fn busy(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Busy, message).retry_safe()
    }

    /// A query returned the wrong number of rows.
    #[cold]
    pub(crate) fn row_count(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::RowCount, message)
    }

    /// A socket error, with what we were doing when it happened.
    #[cold]
    pub(crate) fn io(context: &str, err: std::io::Error) -> Error {
        Error::new(ErrorKind::Io, format!("{context}: {err}")).with_source(err)
    }

    /// An `ErrorResponse` from the server.
    #[cold]
    pub(crate) fn db(db: impl Into<Box<DbError>>) -> Error {
        Error::with_db(ErrorKind::Db, db)
    }

    /// An `ErrorResponse` that belongs to another kind (e.g. a failed login is `Auth`).
    #[cold]
    pub(crate) fn with_db(kind: ErrorKind, db: impl Into<Box<DbError>>) -> Error {
        let mut e = Error::new(kind, String::new());
        e.0.db = Some(db.into());
        e
    }

    /// Attaches the lower error that caused this one, for [`source`](StdError::source).
    pub(crate) fn with_source(
        mut self,
        cause: impl Into<Box<dyn StdError + Send + Sync>>,
    ) -> Error {
        self.0.source = Some(Source::from(cause.into()));
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

    /// The SQLSTATE code the server sent, if the error came from the server.
    ///
    /// ```
    /// use pgengine::{Error, SqlState};
    ///
    /// fn already_there(e: &Error) -> bool {
    ///     e.code() == Some(&SqlState::UNIQUE_VIOLATION)
    /// }
    /// ```
    pub fn code(&self) -> Option<&SqlState> {
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

/// The source is the lower error that caused this one when there is one (an `io::Error`, a
/// TLS error, a `FromSql`/`ToSql` implementation's error, or the pgengine error it followed
/// from), else the server's [`DbError`].
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

/// How serious a server error or notice is: the `V` field of an `ErrorResponse` or
/// `NoticeResponse`, which the server never translates (§55.8). See
/// [`DbError::severity_level`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Severity {
    /// `PANIC`: the server stops every session and restarts.
    Panic,
    /// `FATAL`: the server ends this session.
    Fatal,
    /// `ERROR`: the statement failed (and with it the transaction block it ran in).
    Error,
    /// `WARNING`, in a notice.
    Warning,
    /// `NOTICE`, in a notice.
    Notice,
    /// `DEBUG`, in a notice (`client_min_messages` set to a `debug` level).
    Debug,
    /// `INFO`, in a notice.
    Info,
    /// `LOG`, in a notice (`client_min_messages = log`).
    Log,
}

impl Severity {
    /// The word as the protocol spells it, e.g. `"FATAL"`.
    ///
    /// ```
    /// assert_eq!(pgengine::error::Severity::Fatal.as_str(), "FATAL");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Panic => "PANIC",
            Severity::Fatal => "FATAL",
            Severity::Error => "ERROR",
            Severity::Warning => "WARNING",
            Severity::Notice => "NOTICE",
            Severity::Debug => "DEBUG",
            Severity::Info => "INFO",
            Severity::Log => "LOG",
        }
    }

    /// True for FATAL and PANIC: after such an error the server closes the connection.
    ///
    /// ```
    /// use pgengine::error::Severity;
    /// assert!(Severity::Fatal.ends_session());
    /// assert!(!Severity::Error.ends_session());
    /// ```
    pub fn ends_session(self) -> bool {
        matches!(self, Severity::Fatal | Severity::Panic)
    }

    fn parse(word: &str) -> Option<Severity> {
        Some(match word {
            "PANIC" => Severity::Panic,
            "FATAL" => Severity::Fatal,
            "ERROR" => Severity::Error,
            "WARNING" => Severity::Warning,
            "NOTICE" => Severity::Notice,
            "DEBUG" => Severity::Debug,
            "INFO" => Severity::Info,
            "LOG" => Severity::Log,
            _ => return None,
        })
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error or notice sent by the server, with every field of the `ErrorResponse` /
/// `NoticeResponse` message (PostgreSQL docs §55.8).
#[derive(Clone, PartialEq, Eq)]
pub struct DbError {
    pub(crate) severity: String,
    pub(crate) severity_nonlocalized: Option<String>,
    pub(crate) code: SqlState,
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
#[non_exhaustive]
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
            code: SqlState::INTERNAL_ERROR,
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
                b'C' => code = Some(SqlState::from(value)),
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
        db.code = code.unwrap_or(SqlState::INTERNAL_ERROR);
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

    /// Severity as the server localised it (`lc_messages`): `ERROR`, `FATAL`, `PANIC`, or
    /// for notices `WARNING`, `NOTICE`, `DEBUG`, `INFO`, `LOG` — or their translation
    /// (`FEHLER`, `ВАЖНО`). To decide anything, use [`severity_level`](Self::severity_level).
    pub fn severity(&self) -> &str {
        &self.severity
    }

    /// Severity never localised, as the server sent it (PostgreSQL 9.6+).
    pub fn severity_nonlocalized(&self) -> Option<&str> {
        self.severity_nonlocalized.as_deref()
    }

    /// The severity as a type: read from the never-localised field when the server sent it
    /// (PostgreSQL 9.6+), else from the localised one, which an older server sends in English
    /// unless `lc_messages` names another language. `None` when neither says a severity
    /// PostgreSQL defines.
    ///
    /// ```
    /// use pgengine::error::Severity;
    ///
    /// fn ends_the_session(e: &pgengine::DbError) -> bool {
    ///     e.severity_level().is_some_and(Severity::ends_session)
    /// }
    /// ```
    pub fn severity_level(&self) -> Option<Severity> {
        match &self.severity_nonlocalized {
            Some(v) => Severity::parse(v),
            None => Severity::parse(&self.severity),
        }
    }

    /// True when the server ends the session after this error (FATAL or PANIC).
    pub(crate) fn ends_session(&self) -> bool {
        self.severity_level().is_some_and(Severity::ends_session)
    }

    /// The SQLSTATE code.
    ///
    /// ```
    /// # fn demo(db: &pgengine::DbError) {
    /// use pgengine::SqlState;
    /// if *db.code() == SqlState::SYNTAX_ERROR {
    ///     eprintln!("check the SQL: {}", db.message());
    /// }
    /// # }
    /// ```
    pub fn code(&self) -> &SqlState {
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
        if self.code.class() != SqlState::DATA_EXCEPTION || !self.message.contains('"') {
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
            (b'C', SqlState::UNIQUE_VIOLATION.as_str()),
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
        assert_eq!(*db.code(), SqlState::UNIQUE_VIOLATION);
        assert_eq!(db.severity_level(), Some(Severity::Error));
        assert_eq!(db.message(), "duplicate key");
        assert_eq!(db.detail(), Some("Key (id)=(1) already exists."));
        assert_eq!(db.position(), Some(&ErrorPosition::Original(12)));
        assert_eq!(db.constraint(), Some("t_pkey"));
        assert_eq!(db.line(), Some(664));
        assert_eq!(db.routine(), Some("_bt_check_unique"));
        let e = Error::db(db);
        assert_eq!(e.code(), Some(&SqlState::UNIQUE_VIOLATION));
        assert_eq!(e.kind(), ErrorKind::Db);
        assert!(e.to_string().contains("duplicate key"));
    }

    /// Whether the server ends the session is read from the `V` field, which it never
    /// translates: with `lc_messages = 'ru_RU.UTF-8'` the `S` field of a FATAL error is
    /// "ВАЖНО" (PostgreSQL's own Russian catalogue), and of a PANIC "ПАНИКА".
    #[test]
    fn a_session_ends_by_the_unlocalized_severity() {
        let error = |pairs: &[(u8, &str)]| DbError::parse(&fields(pairs)).unwrap();
        let terminated = error(&[
            (b'S', "ВАЖНО"),
            (b'V', "FATAL"),
            (b'C', SqlState::ADMIN_SHUTDOWN.as_str()),
            (b'M', "завершение подключения по команде администратора"),
        ]);
        assert_eq!(terminated.severity(), "ВАЖНО");
        assert_eq!(terminated.severity_level(), Some(Severity::Fatal));
        assert!(terminated.ends_session());
        let panic = error(&[(b'S', "ПАНИКА"), (b'V', "PANIC"), (b'M', "m")]);
        assert!(panic.ends_session());
        // An ERROR in German; and a FATAL whose localized word happens to be "FATAL" too.
        let failed = error(&[(b'S', "FEHLER"), (b'V', "ERROR"), (b'M', "m")]);
        assert_eq!(failed.severity_level(), Some(Severity::Error));
        assert!(!failed.ends_session());
        let lookalike = error(&[(b'S', "FATAL"), (b'V', "ERROR"), (b'M', "m")]);
        assert!(!lookalike.ends_session(), "V decides, not S");
        // A server older than 9.6 sends S only, in English unless lc_messages says otherwise.
        let old = error(&[(b'S', "FATAL"), (b'M', "m")]);
        assert_eq!(old.severity_level(), Some(Severity::Fatal));
        assert!(old.ends_session());
        let unknown = error(&[(b'S', "ВАЖНО"), (b'M', "m")]);
        assert_eq!(unknown.severity_level(), None);
        // A missing code is the generic internal error.
        assert_eq!(*unknown.code(), SqlState::INTERNAL_ERROR);
    }

    #[test]
    fn duplicates_share_the_source() {
        #[derive(Debug)]
        struct Cause;
        impl fmt::Display for Cause {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("the cause")
            }
        }
        impl StdError for Cause {}
        let e = Error::closed("it broke").with_source(Cause).retry_safe();
        let copy = e.duplicate();
        assert_eq!(copy.to_string(), e.to_string());
        assert!(copy.safe_to_retry());
        assert!(copy.source().is_some_and(|s| s.is::<Cause>()));
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
