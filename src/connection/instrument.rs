//! One instrumentation point: every request a connection sends is traced here — whatever
//! called it: an engine, a transaction or its savepoints, an `Atomic` (one record per
//! statement), a batch's portal, the pipelined pool, COPY, a LISTEN — and, when the engine
//! logs queries (`log_queries`), logged here too. A path that sends SQL cannot miss it: the
//! connection's request methods start a [`Traced`] as they send, and the reader ends it.
//!
//! Each record is a `tracing` span named `query` (target `pgengine::query`) with the
//! OpenTelemetry database semantic conventions' fields, so `tracing-opentelemetry` exports it
//! as it is: `db.system.name`, `db.namespace`, `db.operation.name`, `db.query.text` (the SQL
//! with its `$n` placeholders: parameter values are never recorded), `server.address`,
//! `server.port`, `db.response.status_code` (the SQLSTATE), `db.response.returned_rows`,
//! `error.type`. The time a query waited for a connection (`pgengine.acquire_wait_us`) and in
//! a pipeline's queue (`pgengine.pipeline_wait_us`) is told apart from the time from sending
//! it to its answer (`pgengine.server_us`). A failure is recorded by its SQLSTATE and kind;
//! the server's message never is (it can quote a value: see `Error::redacted`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::field::Empty;

use crate::error::{Error, SqlState};

/// Numbers every query of the process, for log lines that belong together.
static NEXT_QUERY_ID: AtomicU64 = AtomicU64::new(1);

/// What a connection records about its requests: where it is connected, and whether its
/// engine logs queries.
#[derive(Debug, Clone)]
pub(crate) struct Instrument {
    log_queries: bool,
    namespace: Arc<str>,
    address: Arc<str>,
    port: u16,
}

/// What a query waited for before it was sent.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Waited {
    /// For a connection (the pool's acquire, or opening one).
    pub(crate) connection: Option<Duration>,
    /// In a pipelined connection's queue.
    pub(crate) pipeline: Option<Duration>,
}

/// Whether anyone records what a request would tell: the query log (`log_queries`), or a
/// subscriber that wants the query spans.
#[inline]
pub(crate) fn watching(log_queries: bool) -> bool {
    log_queries || tracing::span_enabled!(target: "pgengine::query", tracing::Level::INFO)
}

impl Instrument {
    pub(crate) fn new(namespace: &str, address: &str, port: u16) -> Instrument {
        Instrument {
            log_queries: false,
            namespace: Arc::from(namespace),
            address: Arc::from(address),
            port,
        }
    }

    pub(crate) fn set_log_queries(&mut self, on: bool) {
        self.log_queries = on;
    }

    /// Whether anyone records what a request would tell: the query log, or a subscriber
    /// that wants the query spans.
    #[inline]
    pub(crate) fn watching(&self) -> bool {
        watching(self.log_queries)
    }

    /// Starts the record of a request sent now: one statement, or a simple query's text.
    /// `parent` is the span it belongs to when it is sent from another task than its caller's
    /// (the pipelined pool's driver); otherwise the caller's current span.
    #[inline]
    pub(crate) fn start(
        &self,
        sql: &str,
        parent: Option<&tracing::Span>,
        waited: Waited,
    ) -> Traced {
        if !self.watching() {
            // Nobody records anything: a request pays one check of the subscriber's interest.
            return Traced::none();
        }
        Traced(Some(Box::new(self.start_watched(sql, parent, waited))))
    }

    #[cold]
    fn start_watched(&self, sql: &str, parent: Option<&tracing::Span>, waited: Waited) -> Watched {
        let make = |parent: Option<&tracing::Span>| {
            macro_rules! query_span {
                ($($parent:tt)*) => {
                    tracing::info_span!(
                        target: "pgengine::query",
                        $($parent)*
                        "query",
                        otel.name = Empty,
                        otel.kind = "client",
                        db.system.name = "postgresql",
                        db.namespace = %self.namespace,
                        db.operation.name = Empty,
                        db.query.text = sql,
                        server.address = %self.address,
                        server.port = self.port,
                        db.response.status_code = Empty,
                        db.response.returned_rows = Empty,
                        error.type = Empty,
                        pgengine.query_id = Empty,
                        pgengine.acquire_wait_us = Empty,
                        pgengine.pipeline_wait_us = Empty,
                        pgengine.server_us = Empty,
                    )
                };
            }
            match parent {
                Some(parent) => query_span!(parent: parent,),
                None => query_span!(),
            }
        };
        let span = make(parent);
        let id = NEXT_QUERY_ID.fetch_add(1, Ordering::Relaxed);
        if !span.is_disabled() {
            let operation = operation_name(sql);
            span.record("otel.name", operation.as_str());
            span.record("db.operation.name", operation.as_str());
            span.record("pgengine.query_id", id);
            if let Some(d) = waited.connection {
                span.record("pgengine.acquire_wait_us", micros(d));
            }
            if let Some(d) = waited.pipeline {
                span.record("pgengine.pipeline_wait_us", micros(d));
            }
        }
        if self.log_queries {
            tracing::info!(target: "pgengine::query", parent: &span, query_id = id, sql, "query");
        }
        Watched {
            span,
            started: Instant::now(),
            id,
            log: self.log_queries,
            ended: false,
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The statement's first keyword, upper-cased (`SELECT`, `INSERT`, `BEGIN`): the operation's
/// name, which a tracing backend groups by.
fn operation_name(sql: &str) -> String {
    crate::sql::first_keyword(sql)
        .map(str::to_ascii_uppercase)
        .unwrap_or_default()
}

/// The record of one request in flight, ended by what its answer said. Nothing (a null
/// pointer) when nobody watches.
#[derive(Debug)]
pub(crate) struct Traced(Option<Box<Watched>>);

#[derive(Debug)]
struct Watched {
    span: tracing::Span,
    /// When it was sent.
    started: Instant,
    id: u64,
    log: bool,
    ended: bool,
}

impl Traced {
    /// A record of nothing, for a request nobody watches.
    pub(crate) fn none() -> Traced {
        Traced(None)
    }

    /// The request succeeded with `rows` rows returned (or affected).
    #[inline]
    pub(crate) fn succeeded(self, rows: u64) {
        if let Some(watched) = self.0 {
            watched.succeeded(rows);
        }
    }

    /// The request failed with `e`: recorded by its SQLSTATE and kind, never its message.
    #[inline]
    pub(crate) fn failed(self, e: &Error) {
        if let Some(watched) = self.0 {
            watched.failed(e);
        }
    }

    /// A statement of a pipeline that did not run: one before it failed.
    #[inline]
    pub(crate) fn skipped(self) {
        if let Some(mut watched) = self.0 {
            watched.ended = true;
            watched.span.record("error.type", "skipped");
        }
    }
}

impl Watched {
    fn succeeded(mut self, rows: u64) {
        self.ended = true;
        let took = self.started.elapsed();
        self.span.record("db.response.returned_rows", rows);
        self.span.record("pgengine.server_us", micros(took));
        if self.log {
            tracing::info!(
                target: "pgengine::query",
                parent: &self.span,
                query_id = self.id,
                duration_ms = took.as_secs_f64() * 1000.0,
                rows,
                "done"
            );
        }
    }

    fn failed(mut self, e: &Error) {
        self.ended = true;
        let took = self.started.elapsed();
        let code = e.code().map(SqlState::as_str);
        if let Some(code) = code {
            self.span.record("db.response.status_code", code);
        }
        self.span
            .record("error.type", code.unwrap_or(error_type(e)));
        self.span.record("pgengine.server_us", micros(took));
        if self.log {
            tracing::info!(
                target: "pgengine::query",
                parent: &self.span,
                query_id = self.id,
                duration_ms = took.as_secs_f64() * 1000.0,
                code,
                error = %e.redacted(),
                "failed"
            );
        }
    }
}

/// `error.type` for an error without a SQLSTATE: its kind, as a low-cardinality name.
fn error_type(e: &Error) -> &'static str {
    use crate::ErrorKind as K;
    match e.kind() {
        K::Timeout => "timeout",
        K::Closed | K::Io => "connection",
        K::Protocol => "protocol",
        K::Conversion => "conversion",
        K::Transaction => "transaction",
        _ => "other",
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if !self.ended {
            // Its caller went away (a dropped future or stream), or a statement after a
            // failed one in the same pipeline did not run.
            self.span.record("error.type", "abandoned");
            if self.log {
                tracing::info!(target: "pgengine::query", parent: &self.span, query_id = self.id, "abandoned");
            }
        }
    }
}
