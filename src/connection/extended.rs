//! The extended query protocol (PostgreSQL docs §55.2.3) with the statement cache.
//!
//! Every query is one write and one round trip:
//!
//! ```text
//! cached:    Bind(stmt) Execute Sync
//! uncached:  [Close(evicted)…] Parse(stmt, types) Describe(stmt) Bind(stmt) Execute Sync
//! ```
//!
//! An uncached statement can go out in one write because the parameter types in Parse are
//! chosen here, from the Rust values: each value is encoded as the first built-in type it
//! accepts ([`CANDIDATE_TYPES`]), so there is nothing to wait for before Bind. A value that
//! accepts no built-in type (a user-defined enum or composite), or a placeholder count we are
//! unsure of, falls back to asking the server first (Parse, Describe, Sync), then binds with
//! the types the server gave. A cached statement binds with the types the server described.
//!
//! When a cached plan is invalidated by DDL in a way the server cannot absorb ("cached plan
//! must not change result type", SQLSTATE 0A000), or the statement was dropped behind our back
//! (26000), the statement is prepared again and the query retried once — only outside a
//! transaction, where the failed attempt cannot have changed anything.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use futures::Stream;
use postgres_types::{Format, IsNull, ToSql, Type, WrongType};

use super::cache::Statement;
use super::instrument::{Traced, Waited};
use super::response::{Response, Shape, Step};
use super::{Connection, Lease};
use crate::error::{Error, Result};
use crate::protocol::{BackendMessage, Target, TransactionStatus, frontend};
use crate::query::{CANDIDATE_TYPES, Params, ToQuery, count_placeholders};
use crate::row::{Column, Row, type_from_oid};

/// Why a parameter could not be encoded as a given type.
enum EncodeError {
    /// The value does not accept the type: try another.
    WrongType,
    /// The value accepts the type but failed to encode.
    Failed(Error),
}

impl From<Error> for EncodeError {
    fn from(e: Error) -> EncodeError {
        EncodeError::Failed(e)
    }
}

fn encode_param(
    value: &(dyn ToSql + Sync),
    ty: &Type,
    i: usize,
    buf: &mut BytesMut,
) -> std::result::Result<bool, EncodeError> {
    match value.to_sql_checked(ty, buf) {
        Ok(IsNull::Yes) => Ok(true),
        Ok(IsNull::No) => Ok(false),
        Err(e) if e.is::<WrongType>() => Err(EncodeError::WrongType),
        Err(e) => Err(EncodeError::Failed(
            Error::to_sql(format_args!("parameter ${}", i + 1), e).retry_safe(),
        )),
    }
}

fn format_code(f: Format) -> i16 {
    match f {
        Format::Text => 0,
        Format::Binary => 1,
    }
}

/// What one query written into a pipeline will answer, so the responses can be checked in
/// order.
pub(super) struct Plan {
    kind: PlanKind,
    /// The Closes written in front of the query, confirmed one by one by CloseComplete.
    closes: Vec<Arc<str>>,
}

enum PlanKind {
    /// Bind of a cached statement.
    Cached { statement: Statement },
    /// Bind of a statement parsed earlier in the same pipeline (before one Sync), whose
    /// description is read, and cached, before this query's answer.
    Pending { name: Arc<str> },
    /// Parse + Describe + Bind of a new statement, with the types chosen for it.
    New {
        name: Arc<str>,
        param_types: Vec<Type>,
    },
}

/// The outcome of writing one query.
enum Written {
    Plan(Plan),
    /// The types cannot be chosen from the values: ask the server first.
    NeedsDescribe,
}

impl Connection {
    /// Runs a query and returns all its rows.
    ///
    /// ```no_run
    /// # async fn demo(conn: &mut pgengine::Connection) -> pgengine::Result<()> {
    /// let rows = conn.query(("SELECT $1::int4 + 1 AS n", (41i32,))).await?;
    /// assert_eq!(rows[0].get::<_, i32>("n"), 42);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn query(&mut self, query: impl ToQuery) -> Result<Vec<Row>> {
        self.query_counted(query).await.map(|(rows, _)| rows)
    }

    /// Runs a query and returns all its rows and the row count from CommandComplete (which
    /// differs from the number of rows for `INSERT … RETURNING` and the like).
    pub(crate) async fn query_counted(&mut self, query: impl ToQuery) -> Result<(Vec<Row>, u64)> {
        let mut rows = Vec::new();
        let read = self
            .run_extended(&query, Some(&mut |row| rows.push(row)))
            .await?;
        Ok((rows, read.rows_affected.unwrap_or(0)))
    }

    /// Runs a query that must return exactly one row.
    pub async fn query_one(&mut self, query: impl ToQuery) -> Result<Row> {
        match self.query_opt_counted(query).await? {
            (Some(row), 1) => Ok(row),
            (_, n) => Err(Error::row_count(format!(
                "the query returned {n} rows, not exactly one"
            ))),
        }
    }

    /// Runs a query that must return at most one row.
    pub async fn query_opt(&mut self, query: impl ToQuery) -> Result<Option<Row>> {
        match self.query_opt_counted(query).await? {
            (row, 0 | 1) => Ok(row),
            (_, n) => Err(Error::row_count(format!(
                "the query returned {n} rows, not at most one"
            ))),
        }
    }

    /// The first row (if any) and how many rows there were, without collecting them.
    async fn query_opt_counted(&mut self, query: impl ToQuery) -> Result<(Option<Row>, u64)> {
        let mut first = None;
        let mut count = 0;
        self.run_extended(
            &query,
            Some(&mut |row| {
                if first.is_none() {
                    first = Some(row);
                }
                count += 1;
            }),
        )
        .await?;
        Ok((first, count))
    }

    /// Runs a statement and returns the number of rows it affected (or returned).
    pub async fn execute(&mut self, query: impl ToQuery) -> Result<u64> {
        let read = self.run_extended(&query, Some(&mut drop)).await?;
        Ok(read.rows_affected.unwrap_or(0))
    }

    /// Runs a query and returns a stream of its rows, read from the socket as the stream is
    /// polled: memory stays bounded however many rows there are.
    ///
    /// Dropping the stream early is safe: the rest of the result is read and discarded before
    /// the connection's next request.
    ///
    /// ```no_run
    /// # async fn demo(conn: &mut pgengine::Connection) -> pgengine::Result<()> {
    /// use futures::TryStreamExt;
    /// let mut rows = conn.query_stream("SELECT generate_series(1, 1000000)").await?;
    /// let mut sum = 0i64;
    /// while let Some(row) = rows.try_next().await? {
    ///     sum += i64::from(row.get::<_, i32>(0));
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn query_stream(&mut self, query: impl ToQuery) -> Result<RowStream<'_>> {
        RowStream::start(Lease::Borrowed(self), &query).await
    }

    /// Sends `query` and reads its answer: up to its first row, what a [`RowStream`] reads on
    /// from; or, given `each`, all of its rows, each handed to `each` as it is read (the
    /// reader is then over, with the row count). Retries once after a cached statement turned
    /// out to be stale.
    ///
    /// The usual answer of a cached statement (BindComplete, the rows, CommandComplete), when
    /// all the rows are wanted, is read whole by the row reader, from BindComplete on, in one
    /// future: the wait for the server resumes there, not through a reader of the answer's
    /// start nested under a reader of its rows (callgrind, client instructions: a prepared
    /// point query 5,340 → 5,067, a pooled one 8,603 → 8,357).
    async fn run_extended(
        &mut self,
        query: &dyn ToQuery,
        mut each: Option<&mut (dyn FnMut(Row) + Send)>,
    ) -> Result<RowReader> {
        let sql = query.sql();
        self.prepare_request().await?;
        // Ended here, unless the reader takes it.
        let mut traced = Some(self.trace(sql));
        let mut retried = false;
        let error = loop {
            let plan = match self.write_query_or_describe(sql, query.params(), 0).await {
                Ok(plan) => plan,
                Err(e) => break e,
            };
            frontend::sync(&mut self.stream.write_buf);
            self.limit_next_request(query.time_limit());
            if let Err(e) = self.send(1).await {
                break e;
            }
            let mut response = Response::new(Shape::Extended);
            // The attempt's error, and whether it was a refusal of a stale statement before it
            // ran, which is tried once more.
            let (error, stale) = 'attempt: {
                // The statement of an answer read whole from its start.
                let mut whole = None;
                let mut reader = match each.is_some().then(|| self.bound_columns(&plan)) {
                    Some(Some(columns)) => {
                        whole = Some(plan.kind);
                        RowReader::new(columns, response, None, false)
                    }
                    _ => {
                        let columns = match self.read_query_start(&mut response, sql, plan).await {
                            Ok(Ok(columns)) => columns,
                            Ok(Err(stale)) => {
                                break 'attempt (self.fail_request(response).await, stale);
                            }
                            Err(e) => break 'attempt (e, false),
                        };
                        let mut reader = RowReader::new(columns, response, traced.take(), true);
                        if Connection::needs_lookup(&reader.columns) {
                            match self.known_columns(&reader.columns) {
                                // Looked up since the statement was described.
                                Some(columns) => {
                                    self.remember_columns(sql, &columns);
                                    reader.columns = columns;
                                }
                                None => reader = self.read_for_lookup(sql, reader).await?,
                            }
                        }
                        reader
                    }
                };
                let Some(each) = each.as_mut() else {
                    return Ok(reader);
                };
                match (poll_fn(|cx| reader.poll_rows(self, cx, each)).await, whole) {
                    (Ok(_), _) => {
                        if let Some(traced) = traced {
                            traced.succeeded(reader.rows_affected.unwrap_or(0));
                        }
                        return Ok(reader);
                    }
                    (Err(e), Some(kind)) if !reader.bound && !self.is_broken() => {
                        let stale = self.refused(sql, &kind, &e);
                        break 'attempt (explain_pooler(e), stale);
                    }
                    (Err(e), _) => break 'attempt (e, false),
                }
            };
            if stale && !retried && self.status == TransactionStatus::Idle {
                retried = true;
                continue;
            }
            break error;
        };
        if let Some(traced) = traced {
            traced.failed(&error);
        }
        Err(error)
    }

    /// The result columns of a query whose answer starts with BindComplete, with types all
    /// known: one the row reader can read from its start. That is a cached statement's Bind
    /// with nothing in front of it: no Closes, and no Parse (an unnamed statement described
    /// first is parsed again in front of its Bind, see `write_query_or_describe`).
    fn bound_columns(&self, plan: &Plan) -> Option<Arc<[Column]>> {
        match &plan.kind {
            PlanKind::Cached { statement }
                if plan.closes.is_empty()
                    && !statement.name.is_empty()
                    && !Connection::needs_lookup(&statement.columns) =>
            {
                Some(statement.columns.clone())
            }
            _ => None,
        }
    }

    /// Reads the rest of a result whose columns have types the server defined at run time
    /// (an enum, a composite, …) that this connection has not looked up yet: rows cannot be
    /// decoded without them, and the lookup needs the connection, so this one result is read
    /// whole first. Later runs of the statement find the types known.
    async fn read_for_lookup(&mut self, sql: &str, reader: RowReader) -> Result<RowReader> {
        let RowReader {
            columns,
            mut response,
            traced,
            ..
        } = reader;
        let traced = traced.unwrap_or_else(Traced::none);
        let mut rows = std::collections::VecDeque::new();
        let mut rows_affected = None;
        loop {
            let step = match self.next_step(&mut response).await {
                Ok(step) => step,
                Err(e) => {
                    traced.failed(&e);
                    return Err(e);
                }
            };
            match step {
                Step::Row(data) => rows.push_back(data),
                Step::Complete(done) => rows_affected = Some(done.rows()),
                Step::Message(
                    BackendMessage::EmptyQueryResponse | BackendMessage::PortalSuspended,
                )
                | Step::Failed => {}
                Step::Over => break,
                other => return Err(self.unexpected_step(other, "a row stream")),
            }
        }
        let error = response.take_error();
        match &error {
            Some(e) => traced.failed(e),
            None => traced.succeeded(rows_affected.unwrap_or(rows.len() as u64)),
        }
        let columns = self.resolve_columns(sql, &columns).await?;
        Ok(RowReader {
            columns,
            response: Response::new(Shape::Drain),
            traced: None,
            state: StreamState::Buffered { rows, error },
            rows_affected,
            bound: true,
        })
    }

    /// Writes one query's messages (without Sync), first asking the server for the
    /// statement's types if they cannot be chosen from the values. On error nothing of the
    /// query stays in the write buffer.
    pub(super) async fn write_query_or_describe(
        &mut self,
        sql: &str,
        params: &dyn Params,
        max_rows: i32,
    ) -> Result<Plan> {
        let mark = self.stream.write_buf.len();
        match self.write_query(sql, params, max_rows) {
            Ok(Written::Plan(plan)) => Ok(plan),
            Ok(Written::NeedsDescribe) => {
                if mark > 0 {
                    // The describe round trip would send the queries written before this
                    // one without their Sync: refuse rather than reorder them.
                    return Err(Error::conversion(
                        "a query whose parameter types only the server knows cannot be \
                         pipelined behind other queries with the statement cache off",
                    ));
                }
                let statement = self.describe_statement(sql).await?;
                if statement.param_types.len() != params.len() {
                    return Err(param_count_error(statement.param_types.len(), params.len()));
                }
                let closes = self.write_closes()?;
                if statement.name.is_empty() {
                    // Without a cache the described statement is the unnamed one, and the
                    // Sync that ended the describe round trip may have handed the server
                    // connection to someone else (PgBouncer in transaction pooling mode):
                    // parse it again, with the types the server gave, in this request.
                    let oids: Vec<u32> = statement.param_types.iter().map(Type::oid).collect();
                    if let Err(e) = frontend::parse(&mut self.stream.write_buf, "", sql, &oids) {
                        self.stream.undo_write(mark);
                        self.restore_closes(closes);
                        return Err(e);
                    }
                    self.stats.parses += 1;
                }
                if let Err(i) = self.write_cached_bind(&statement, params, max_rows)? {
                    self.stream.undo_write(mark);
                    self.restore_closes(closes);
                    return Err(Error::conversion(format!(
                        "parameter ${}: the value cannot be sent as the server's type {}",
                        i + 1,
                        statement.param_types[i]
                    ))
                    .retry_safe());
                }
                Ok(Plan {
                    kind: PlanKind::Cached { statement },
                    closes,
                })
            }
            Err(e) => {
                self.stream.undo_write(mark);
                Err(e)
            }
        }
    }

    /// Gives back Closes that did not go out (or were not confirmed): they are due again.
    pub(super) fn restore_closes(&mut self, closes: Vec<Arc<str>>) {
        self.closes_due.extend(closes);
    }

    /// Writes Close for every statement whose Close the server has not confirmed.
    fn write_closes(&mut self) -> Result<Vec<Arc<str>>> {
        if self.closes_due.is_empty() {
            return Ok(Vec::new());
        }
        let closes = std::mem::take(&mut self.closes_due);
        for name in &closes {
            if let Err(e) = frontend::close(&mut self.stream.write_buf, Target::Statement, name) {
                self.closes_due = closes;
                return Err(e);
            }
            self.stats.closes += 1;
        }
        Ok(closes)
    }

    /// Writes one query's messages, without Sync: a cached statement's Bind and Execute, or a
    /// new statement's Parse, Describe, Bind and Execute, each preceded by the Closes that are
    /// due. Writes nothing and says so when the statement needs describing first.
    fn write_query(&mut self, sql: &str, params: &dyn Params, max_rows: i32) -> Result<Written> {
        let mark = self.stream.write_buf.len();
        if let Some(statement) = self.statements.get(sql).cloned() {
            if statement.changes_session {
                self.stream.note_session_change();
            }
            if statement.param_types.len() != params.len() {
                return Err(param_count_error(statement.param_types.len(), params.len()));
            }
            let closes = self.write_closes()?;
            // The types were chosen for earlier values (or by the server); a value of another
            // Rust type may not fit them, and then the statement is prepared again for it.
            match self.write_cached_bind(&statement, params, max_rows) {
                Ok(Ok(())) => {
                    self.stats.cache_hits += 1;
                    return Ok(Written::Plan(Plan {
                        kind: PlanKind::Cached { statement },
                        closes,
                    }));
                }
                Ok(Err(_)) => {
                    self.stream.undo_write(mark);
                    self.restore_closes(closes);
                    self.statements.remove(sql);
                    self.closes_due.push(statement.name.clone());
                }
                Err(e) => {
                    self.stream.undo_write(mark);
                    self.restore_closes(closes);
                    return Err(e);
                }
            }
        }
        if count_placeholders(sql) != params.len() {
            // Our count could be wrong for unusual SQL; the server's never is.
            return Ok(Written::NeedsDescribe);
        }
        if crate::sql::statement_effects(sql).session {
            // Counted from the moment it is sent: even a failed SET may have run a part.
            self.stream.note_session_change();
        }
        self.stats.cache_misses += 1;
        let evicted = self.statements.make_room();
        self.closes_due.extend(evicted);
        let closes = self.write_closes()?;
        let name = self.statements.next_name();
        match self.write_new_statement(&name, sql, params, max_rows) {
            Ok(Some(param_types)) => Ok(Written::Plan(Plan {
                kind: PlanKind::New { name, param_types },
                closes,
            })),
            Ok(None) => {
                self.stream.undo_write(mark);
                self.restore_closes(closes);
                Ok(Written::NeedsDescribe)
            }
            Err(e) => {
                self.stream.undo_write(mark);
                self.restore_closes(closes);
                Err(e)
            }
        }
    }

    /// Writes Bind and Execute for `name`, a statement parsed earlier in the same pipeline
    /// with `types`; if the values do not fit those types, the query is written as a new
    /// statement of its own.
    fn write_pending_bind(
        &mut self,
        sql: &str,
        name: &Arc<str>,
        types: &Arc<[Type]>,
        params: &dyn Params,
    ) -> Result<Written> {
        if types.len() != params.len() {
            return Err(param_count_error(types.len(), params.len()));
        }
        // Only bound here: the copy parsed first was read for its effects when written.
        let statement = Statement::new(name.clone(), types.clone(), Arc::from([]), false);
        match self.write_cached_bind(&statement, params, 0)? {
            Ok(()) => {
                self.stats.cache_hits += 1;
                Ok(Written::Plan(Plan {
                    kind: PlanKind::Pending { name: name.clone() },
                    closes: Vec::new(),
                }))
            }
            Err(_) => self.write_query(sql, params, 0),
        }
    }

    /// Writes Bind and Execute for a prepared statement. Returns `Ok(Err(i))` (having
    /// written nothing) if value `i` does not accept its parameter's type.
    fn write_cached_bind(
        &mut self,
        statement: &Statement,
        params: &dyn Params,
        max_rows: i32,
    ) -> Result<std::result::Result<(), usize>> {
        let types = &statement.param_types;
        if let Some(written) = self.write_binary_bind(statement, params, max_rows)? {
            return Ok(written);
        }
        // One format code for all parameters in the usual case: no allocation per query.
        let formats: std::borrow::Cow<'static, [i16]> = if (0..params.len())
            .all(|i| matches!(params.get(i).encode_format(&types[i]), Format::Binary))
        {
            std::borrow::Cow::Borrowed(&[1])
        } else {
            (0..params.len())
                .map(|i| format_code(params.get(i).encode_format(&types[i])))
                .collect::<Vec<_>>()
                .into()
        };
        let buf = &mut self.stream.write_buf;
        let start = buf.len();
        let mut wrong = None;
        let r = frontend::bind::<Error, _>(
            buf,
            "",
            &statement.name,
            &formats,
            params.len(),
            |i, buf| match encode_param(params.get(i), &types[i], i, buf) {
                Ok(null) => Ok(null),
                Err(EncodeError::WrongType) => {
                    wrong = Some(i);
                    Err(Error::conversion("wrong type"))
                }
                Err(EncodeError::Failed(e)) => Err(e),
            },
            &[1],
        );
        match (r, wrong) {
            (Ok(()), _) => {}
            (Err(_), Some(i)) => {
                buf.truncate(start);
                return Ok(Err(i));
            }
            (Err(e), None) => return Err(e),
        }
        frontend::execute(buf, "", max_rows)?;
        self.stats.binds += 1;
        Ok(Ok(()))
    }

    /// The usual case of [`Connection::write_cached_bind`], written byte by byte: every value
    /// in binary, unnamed portal, binary results, and Execute without a row limit. Returns
    /// `None` (having written nothing) when the query is not that case.
    ///
    /// ```text
    /// 'B' len '\0' name '\0' 1 1 n (len value)… 1 1 | 'E' 9 '\0' 0
    /// ```
    fn write_binary_bind(
        &mut self,
        statement: &Statement,
        params: &dyn Params,
        max_rows: i32,
    ) -> Result<Option<std::result::Result<(), usize>>> {
        /// Execute of the unnamed portal without a row limit.
        const EXECUTE_ALL: [u8; 10] = [b'E', 0, 0, 0, 9, 0, 0, 0, 0, 0];
        let types = &statement.param_types;
        let n = params.len();
        let Ok(count) = i16::try_from(n) else {
            return Ok(None);
        };
        if max_rows != 0 {
            return Ok(None);
        }
        let buf = &mut self.stream.write_buf;
        let start = buf.len();
        // Statement names are ours (`pge_<n>` or empty): no NUL can hide in one.
        let name = statement.name.as_bytes();
        buf.reserve(17 + name.len() + 8 * n + EXECUTE_ALL.len());
        buf.extend_from_slice(&[b'B', 0, 0, 0, 0, 0]);
        buf.extend_from_slice(name);
        buf.extend_from_slice(&[0, 0, 1, 0, 1]);
        buf.extend_from_slice(&count.to_be_bytes());
        for i in 0..n {
            let value = params.get(i);
            if !matches!(value.encode_format(&types[i]), Format::Binary) {
                // Not the usual case after all: nothing of it stays written.
                buf.truncate(start);
                return Ok(None);
            }
            let written = frontend::put_param(buf, i, |buf| encode_param(value, &types[i], i, buf));
            match written {
                Ok(()) => {}
                Err(EncodeError::WrongType) => {
                    buf.truncate(start);
                    return Ok(Some(Err(i)));
                }
                Err(EncodeError::Failed(e)) => {
                    buf.truncate(start);
                    return Err(e);
                }
            }
        }
        buf.extend_from_slice(&[0, 1, 0, 1]);
        let Ok(len) = i32::try_from(buf.len() - start - 1) else {
            buf.truncate(start);
            return Err(Error::protocol("a Bind message too large to send"));
        };
        buf[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(&EXECUTE_ALL);
        self.stats.binds += 1;
        Ok(Some(Ok(())))
    }

    /// Writes Parse, Describe, Bind and Execute for a statement not prepared yet,
    /// choosing each parameter's type from its value. Returns the chosen types, or `None`
    /// (having written nothing useful) if some value accepts no built-in type.
    fn write_new_statement(
        &mut self,
        name: &str,
        sql: &str,
        params: &dyn Params,
        max_rows: i32,
    ) -> Result<Option<Vec<Type>>> {
        let n = params.len();
        let buf = &mut self.stream.write_buf;
        let start = buf.len();
        // Parse with placeholder OIDs, filled in once the values have chosen their types.
        frontend::parse(buf, name, sql, &vec![0; n])?;
        let oids_at = buf.len() - 4 * n;
        frontend::describe(buf, Target::Statement, name)?;
        let bind_at = buf.len();
        let mut types: Vec<Type> = Vec::with_capacity(n);
        let mut unknown = false;
        // One format code per parameter, rewritten below if a type wants text.
        let formats = vec![1i16; n];
        let r = frontend::bind::<Error, _>(
            buf,
            "",
            name,
            &formats,
            n,
            |i, buf| {
                let value = params.get(i);
                let mark = buf.len();
                for ty in CANDIDATE_TYPES {
                    if params.accepts(i, ty) == Some(false) {
                        continue;
                    }
                    match encode_param(value, ty, i, buf) {
                        Ok(null) => {
                            types.push(ty.clone());
                            return Ok(null);
                        }
                        Err(EncodeError::WrongType) => buf.truncate(mark),
                        Err(EncodeError::Failed(e)) => return Err(e),
                    }
                }
                unknown = true;
                Err(Error::conversion("no built-in type"))
            },
            &[1],
        );
        if unknown {
            buf.truncate(start);
            return Ok(None);
        }
        if let Err(e) = r {
            buf.truncate(start);
            return Err(e);
        }
        for (i, ty) in types.iter().enumerate() {
            let at = oids_at + 4 * i;
            buf[at..at + 4].copy_from_slice(&ty.oid().to_be_bytes());
            let code = format_code(params.get(i).encode_format(ty));
            if code != 1 {
                // 'B', length, portal "" + NUL, statement name + NUL, format count, formats…
                let at = bind_at + 1 + 4 + 1 + name.len() + 1 + 2 + 2 * i;
                buf[at..at + 2].copy_from_slice(&code.to_be_bytes());
            }
        }
        frontend::execute(buf, "", max_rows)?;
        self.stats.parses += 1;
        self.stats.binds += 1;
        Ok(Some(types))
    }

    /// Prepares `sql` by asking the server for its parameter and result types (Parse,
    /// Describe, Sync), and caches it — for values whose types we cannot choose ourselves.
    async fn describe_statement(&mut self, sql: &str) -> Result<Statement> {
        self.stats.cache_misses += 1;
        let evicted = self.statements.make_room();
        self.closes_due.extend(evicted);
        let closes = self.write_closes()?;
        let name = self.statements.next_name();
        let buf = &mut self.stream.write_buf;
        frontend::parse(buf, &name, sql, &[])?;
        frontend::describe(buf, Target::Statement, &name)?;
        frontend::sync(buf);
        self.stats.parses += 1;
        self.send(1).await?;

        let mut confirmed = 0;
        let mut param_types: Option<Arc<[Type]>> = None;
        let mut statement = None;
        let mut response = Response::new(Shape::Describe);
        loop {
            match self.next_step(&mut response).await? {
                Step::Message(BackendMessage::CloseComplete) => confirmed += 1,
                Step::Message(BackendMessage::ParseComplete) | Step::Failed => {}
                Step::Message(BackendMessage::ParameterDescription(oids)) => {
                    param_types = Some(oids.into_iter().map(type_from_oid).collect());
                }
                Step::Message(BackendMessage::RowDescription(fields)) => {
                    let columns = fields.iter().map(|f| self.column(f)).collect();
                    statement = Some((param_types.take(), columns));
                }
                Step::Message(BackendMessage::NoData) => {
                    statement = Some((param_types.take(), Arc::from([])));
                }
                Step::Over => break,
                other => return Err(self.unexpected_step(other, "Describe")),
            }
        }
        self.closes_due.extend(closes.into_iter().skip(confirmed));
        response.finish()?;
        let Some(described) = statement else {
            return Err(self.protocol_error("Describe answered without a description"));
        };
        let (param_types, columns): (Option<Arc<[Type]>>, Arc<[Column]>) = described;
        // Types the server defined at run time are looked up before they are needed: the
        // parameters' to encode the values, the columns' to decode the rows.
        let mut types = Vec::new();
        for ty in param_types.iter().flat_map(|t| t.iter()) {
            types.push(self.resolve_type(ty.oid()).await?);
        }
        let columns = self.resolve_columns(sql, &columns).await?;
        Ok(self.remember(sql, &name, Some(types.into()), columns))
    }

    /// Caches a statement the server has described (a no-op when caching is off) and returns
    /// it.
    fn remember(
        &mut self,
        sql: &str,
        name: &Arc<str>,
        param_types: Option<Arc<[Type]>>,
        columns: Arc<[Column]>,
    ) -> Statement {
        let statement = Statement::new(
            name.clone(),
            param_types.unwrap_or_else(|| Arc::from([])),
            columns,
            crate::sql::statement_effects(sql).session,
        );
        if let Some(replaced) = self.statements.insert(sql, statement.clone()) {
            // The same SQL was prepared twice in one pipeline (the pool's pipelined queries,
            // each with its own Sync; or a later copy whose values needed other types): keep
            // one.
            self.closes_due.push(replaced);
        }
        statement
    }

    /// Reads the responses to one query of a pipeline up to BindComplete and returns the result
    /// columns. If the query failed (the server refused it, or its time limit passed; the
    /// error is then in `response`), says whether the statement was stale, so that the query
    /// may be retried; it does not read on to ReadyForQuery. The outer error is the
    /// connection's, broken.
    pub(super) async fn read_query_start(
        &mut self,
        response: &mut Response,
        sql: &str,
        plan: Plan,
    ) -> Result<std::result::Result<Arc<[Column]>, bool>> {
        let Plan { kind, closes } = plan;
        // The usual answer of a cached statement, whole in the buffer already: BindComplete
        // alone, taken in place (it answers nothing, so the response's state stays as it is).
        if let PlanKind::Cached { statement } = &kind
            && closes.is_empty()
            && response.takes_bind_complete()
            && self.stream.take_bind_complete()
        {
            return Ok(Ok(statement.columns.clone()));
        }
        let mut confirmed = 0;
        let mut parsed = false;
        let mut param_types: Option<Arc<[Type]>> = None;
        let mut columns: Option<Arc<[Column]>> = None;
        let bound = loop {
            let step = match self.next_step(response).await {
                Ok(step) => step,
                Err(e) if !self.is_broken() => {
                    // Our own error (the time limit passed, the statement was cancelled): the
                    // query failed, and the rest of its response is read like a refusal's.
                    response.fail_with(e);
                    return Ok(Err(false));
                }
                Err(e) => return Err(e),
            };
            match step {
                Step::Message(BackendMessage::CloseComplete) => confirmed += 1,
                Step::Message(BackendMessage::ParseComplete) => parsed = true,
                Step::Message(BackendMessage::ParameterDescription(oids)) => {
                    param_types = Some(oids.into_iter().map(type_from_oid).collect());
                }
                Step::Message(BackendMessage::RowDescription(fields)) => {
                    columns = Some(fields.iter().map(|f| self.column(f)).collect());
                }
                Step::Message(BackendMessage::NoData) => columns = Some(Arc::from([])),
                Step::Message(BackendMessage::BindComplete) => break true,
                Step::Failed => break false,
                other => return Err(self.unexpected_step(other, "Bind")),
            }
        };
        if confirmed < closes.len() {
            self.restore_closes(closes.into_iter().skip(confirmed).collect());
        }

        // A new statement that the server parsed and described is worth keeping, even if its
        // Bind failed (a bad value does not make the statement bad).
        if let PlanKind::New {
            name,
            param_types: chosen,
        } = &kind
            && parsed
            && let Some(cols) = &columns
        {
            let types = param_types.clone().unwrap_or_else(|| chosen.clone().into());
            self.remember(sql, name, Some(types), cols.clone());
        }
        if bound {
            return Ok(Ok(match kind {
                PlanKind::Cached { statement } => statement.columns.clone(),
                PlanKind::Pending { name } => self.pending_columns(sql, &name)?,
                PlanKind::New { .. } => columns.ok_or_else(|| {
                    self.protocol_error("BindComplete before the statement's description")
                })?,
            }));
        }
        let stale = response
            .error()
            .is_some_and(|e| self.refused(sql, &kind, e));
        response.map_error(explain_pooler);
        Ok(Err(stale))
    }

    /// The server refused a query before it ran with `error`: whether its statement was
    /// stale, so that the query may run again. A statement whose plan no longer fits the
    /// tables is dropped; our statements missing from the server session mean a
    /// transaction-mode pooler, and from now on unnamed statements.
    #[cold]
    fn refused(&mut self, sql: &str, kind: &PlanKind, error: &Error) -> bool {
        if is_ours_elsewhere(error) {
            // A transaction-mode pooler: nothing ran, and unnamed statements will work.
            self.note_pooler();
            return true;
        }
        match (kind, error.code()) {
            // The plan no longer fits the tables: drop this statement.
            (PlanKind::Cached { statement }, Some(&crate::SqlState::FEATURE_NOT_SUPPORTED)) => {
                self.statements.remove(sql);
                self.closes_due.push(statement.name.clone());
                true
            }
            _ => false,
        }
    }
}

impl Connection {
    /// The result columns of `name`, parsed earlier in this pipeline: its description was read
    /// (and cached) with that earlier query's answer.
    fn pending_columns(&mut self, sql: &str, name: &str) -> Result<Arc<[Column]>> {
        match self.statements.get(sql) {
            Some(statement) if &*statement.name == name => Ok(statement.columns.clone()),
            _ => Err(self.protocol_error("BindComplete for a statement never described")),
        }
    }
}

/// Whether `error` says that one of our named statements is missing on the server session
/// (26000) or already there (42P05): the statements of this connection live on some other
/// server session.
fn is_ours_elsewhere(error: &Error) -> bool {
    error.as_db_error().is_some_and(|db| {
        matches!(
            *db.code(),
            crate::SqlState::UNDEFINED_PSTATEMENT | crate::SqlState::DUPLICATE_PSTATEMENT
        ) && db.message().contains("\"pge_")
    })
}

/// Says what a missing statement of ours means, and that running the work again will work
/// (the connection has switched to unnamed statements, see `Connection::note_pooler`).
fn explain_pooler(error: Error) -> Error {
    if !is_ours_elsewhere(&error) {
        return error;
    }
    error.context(
        "a prepared statement of this connection is missing on the server session: a pooler in \
         transaction or statement mode (PgBouncer) gives each transaction its own server \
         session. This engine uses unnamed statements from now on, so running the transaction \
         again will work (statement_cache_capacity(0) sets that from the start)",
    )
}

impl Connection {
    /// Runs several queries in one pipeline: every query's messages in one write, one Sync,
    /// one round trip. The server runs them in order and, after an error, skips the rest; the
    /// result is each query's rows and row count, or the index of the query that failed and
    /// its error. (Outside a transaction block they run in one implicit transaction.)
    pub(crate) async fn pipeline(
        &mut self,
        queries: &[&dyn ToQuery],
    ) -> std::result::Result<Vec<(Vec<Row>, u64)>, (Option<usize>, Error)> {
        self.pipeline_then(queries, None).await
    }

    /// [`pipeline`](Self::pipeline), and in the same write after its Sync, a COMMIT with
    /// what `commit` asks around it (see [`Connection::commit_between`]). The COMMIT's replies
    /// are left for [`read_commit`](Self::read_commit) — owed (the connection is busy) if and
    /// only if they were sent.
    pub(crate) async fn pipeline_then(
        &mut self,
        queries: &[&dyn ToQuery],
        commit: Option<super::CommitAsk<'_>>,
    ) -> std::result::Result<Vec<(Vec<Row>, u64)>, (Option<usize>, Error)> {
        self.prepare_request().await.map_err(|e| (None, e))?;
        let plans = self
            .write_pipeline(queries)
            .await
            .map_err(|(i, e)| (Some(i), e))?;
        frontend::sync(&mut self.stream.write_buf);
        let mut requests = 1;
        if let Some(ask) = commit {
            match self.write_commit(ask) {
                Ok(n) => requests += n,
                Err(e) => {
                    self.abandon(plans);
                    return Err((None, e));
                }
            }
        }
        // One trace per statement, when someone watches; the wait for the connection is the
        // first one's.
        let mut traces: Vec<Option<Traced>> = if self.instrument.watching() {
            queries.iter().map(|q| Some(self.trace(q.sql()))).collect()
        } else {
            Vec::new()
        };
        self.send(requests).await.map_err(|e| (None, e))?;

        let mut results = Vec::with_capacity(queries.len());
        let mut response = Response::new(Shape::Extended);
        let mut failed = None;
        for (i, plan) in plans.into_iter().enumerate() {
            if failed.is_some() {
                // Skipped by the server: its Closes were never run.
                self.restore_closes(plan.closes);
                continue;
            }
            let sql = queries[i].sql();
            let started = self
                .read_query_start(&mut response, sql, plan)
                .await
                .map_err(|e| (Some(i), e))?;
            let rows = match started {
                Ok(columns) => self
                    .read_rows(&mut response, columns)
                    .await
                    .map_err(|e| (Some(i), e))?,
                Err(_) => None,
            };
            match rows {
                Some(r) => {
                    if let Some(traced) = traces.get_mut(i).and_then(Option::take) {
                        traced.succeeded(r.1);
                    }
                    results.push(r);
                }
                None => failed = Some(i),
            }
        }
        match (self.finish(response).await, failed) {
            (Err(e), failed) => {
                // The failed statement's trace says why; those after it did not run, and
                // the ones before it were rolled back with it inside a transaction block.
                if let Some(traced) = failed.and_then(|i| traces.get_mut(i)?.take()) {
                    traced.failed(&e);
                }
                for traced in traces.into_iter().flatten() {
                    traced.skipped();
                }
                return Err((failed, e));
            }
            (Ok(()), Some(i)) => {
                return Err((
                    Some(i),
                    self.protocol_error("a query failed without an error"),
                ));
            }
            (Ok(()), None) => {}
        }
        // Result types the server defined at run time are looked up now that the connection
        // is free (see query_stream).
        for (query, (rows, _)) in queries.iter().zip(&mut results) {
            let Some(first) = rows.first() else { continue };
            if Connection::needs_lookup(first.columns()) {
                let columns = self
                    .resolve_columns(query.sql(), first.columns())
                    .await
                    .map_err(|e| (None, e))?;
                *rows = std::mem::take(rows)
                    .into_iter()
                    .map(|r| r.retyped(columns.clone()))
                    .collect();
            }
        }
        Ok(results)
    }

    /// Writes every query of a pipeline. If one needs its statement described by the server
    /// first, everything written is taken back, that statement is described (and cached),
    /// and writing starts over.
    async fn write_pipeline(
        &mut self,
        queries: &[&dyn ToQuery],
    ) -> std::result::Result<Vec<Plan>, (usize, Error)> {
        let mut restarts = 0;
        'again: loop {
            let mut plans: Vec<Plan> = Vec::with_capacity(queries.len());
            // Statements this pipeline parses: a later copy of the same SQL binds the first
            // one's statement instead of parsing its own. (One Sync ends the pipeline: if that
            // Parse fails, the server runs nothing after it anyway.)
            let mut parsing: Parsing<'_> = HashMap::default();
            for (i, q) in queries.iter().enumerate() {
                let sql = q.sql();
                let written = match parsing.get(sql) {
                    Some((name, types)) => self.write_pending_bind(sql, name, types, q.params()),
                    None => self.write_query(sql, q.params(), 0),
                };
                match written {
                    Ok(Written::Plan(plan)) => {
                        if let PlanKind::New { name, param_types } = &plan.kind
                            && self.statements.capacity() > 0
                        {
                            parsing.insert(sql, (name.clone(), param_types.clone().into()));
                        }
                        plans.push(plan);
                    }
                    Ok(Written::NeedsDescribe) => {
                        self.abandon(plans);
                        // Describing caches the statement, so the next pass binds it like any
                        // other; without a cache that cannot work.
                        if self.statements.capacity() == 0 || restarts > queries.len() {
                            let e = Error::conversion(
                                "a query whose parameter types only the server knows cannot \
                                 be pipelined with the statement cache off",
                            );
                            return Err((i, e));
                        }
                        self.describe_statement(q.sql()).await.map_err(|e| (i, e))?;
                        restarts += 1;
                        continue 'again;
                    }
                    Err(e) => {
                        self.abandon(plans);
                        return Err((i, e));
                    }
                }
            }
            return Ok(plans);
        }
    }

    /// Takes back a pipeline that was being written: nothing of it goes out, and the Closes
    /// it carried are due again.
    fn abandon(&mut self, plans: Vec<Plan>) {
        self.stream.write_buf.clear();
        for plan in plans {
            self.restore_closes(plan.closes);
        }
    }

    /// Hands to `each` every DataRow already whole in the read buffer (see
    /// [`MessageStream::take_data_rows`](super::stream::MessageStream::take_data_rows)); a
    /// malformed one breaks the connection, as on the general read path.
    pub(super) fn take_buffered_rows(
        &mut self,
        columns: &Arc<[Column]>,
        mut each: impl FnMut(Row),
    ) -> Result<()> {
        while self.take_row_block(columns, &mut each)? {}
        Ok(())
    }

    /// Like [`take_buffered_rows`](Self::take_buffered_rows), but one block of them at most:
    /// false if there was none.
    fn take_row_block(&mut self, columns: &Arc<[Column]>, each: impl FnMut(Row)) -> Result<bool> {
        self.stream
            .take_data_rows(columns, each)
            .map_err(|e| self.fail(e))
    }

    /// Reads one query's rows up to its CommandComplete (or EmptyQueryResponse). `None` if the
    /// server refused it (its error is then in `response`); it does not read on.
    pub(super) async fn read_rows(
        &mut self,
        response: &mut Response,
        columns: Arc<[Column]>,
    ) -> Result<Option<(Vec<Row>, u64)>> {
        let mut rows = Vec::new();
        loop {
            self.take_buffered_rows(&columns, |row| rows.push(row))?;
            // The usual end, whole in the buffer already, taken in place.
            if response.takes_counts()
                && let Some(done) = self.stream.take_command_complete()
            {
                let n = done.rows();
                let _ = response.accept_count(done);
                return Ok(Some((rows, n)));
            }
            let step = match self.next_step(response).await {
                Ok(step) => step,
                Err(e) if !self.is_broken() => {
                    // As in `read_query_start`: the query failed, its rest is read.
                    response.fail_with(e);
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            match step {
                Step::Row(data) => {
                    rows.push(Row::new(columns.clone(), data).map_err(|e| self.fail(e))?);
                }
                Step::Complete(done) => return Ok(Some((rows, done.rows()))),
                Step::Message(BackendMessage::EmptyQueryResponse) => return Ok(Some((rows, 0))),
                Step::Failed => return Ok(None),
                other => return Err(self.unexpected_step(other, "a pipelined query")),
            }
        }
    }
}

/// The statements a pipeline parses, by SQL text (hashed as the statement cache does): their
/// names and parameter types.
type Parsing<'a> = HashMap<
    &'a str,
    (Arc<str>, Arc<[Type]>),
    std::hash::BuildHasherDefault<super::cache::FxHasher>,
>;

fn param_count_error(expected: usize, given: usize) -> Error {
    Error::conversion(format!(
        "the statement has {expected} parameters but {given} values were given"
    ))
    .retry_safe()
}

enum StreamState {
    /// Rows are arriving.
    Rows,
    /// The whole result was read already (see [`Connection::query_stream`]).
    Buffered {
        rows: std::collections::VecDeque<crate::protocol::DataRow>,
        error: Option<Error>,
    },
    /// ReadyForQuery has been read.
    Done,
}

/// The rows of a query, read from the socket as they are polled.
///
/// Implements `futures::Stream<Item = Result<Row>>`. An error reported by the server in the
/// middle of the rows is returned as the stream's last item, after the connection has read
/// on to ReadyForQuery, so it is ready for the next request.
///
/// A stream from [`Connection::query_stream`] borrows the connection; one from the engine or
/// a transaction (through [`Client::query_stream`](crate::Client::query_stream)) holds a
/// connection until it is dropped.
///
/// ```no_run
/// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
/// use futures::TryStreamExt;
///
/// let mut rows = engine.query_stream("SELECT id FROM big ORDER BY id").await?;
/// while let Some(row) = rows.try_next().await? {
///     let id: i64 = row.get(0);
///     # let _ = id;
/// }
/// println!("{:?} rows", rows.rows_affected());
/// # Ok(())
/// # }
/// ```
pub struct RowStream<'a> {
    conn: Lease<'a>,
    reader: RowReader,
    /// The rows that were whole in the read buffer behind the last one handed out, taken
    /// together (one block at most) and handed out next.
    queued: VecDeque<Row>,
}

/// What a step of an answer means for its rows ([`RowReader::take_step`]).
enum Flow {
    Row(Row),
    /// Nothing for the caller: read on.
    Next,
    /// The rows are over, with the answer's error if it had one (the reader's trace ended).
    End(Option<Error>),
}

/// What a row stream knows besides its connection.
struct RowReader {
    columns: Arc<[Column]>,
    /// The query's response, read as the stream is polled.
    response: Response,
    /// The query's trace, ended with the stream (dropped early: abandoned).
    traced: Option<Traced>,
    state: StreamState,
    rows_affected: Option<u64>,
    /// Whether BindComplete has been read: false only while a cached statement's answer is
    /// read from its start (see [`Connection::run_extended`]).
    bound: bool,
}

impl<'a> RowStream<'a> {
    /// Sends `query` on `conn`, and reads its rows as the stream is polled.
    pub(crate) async fn start(mut conn: Lease<'a>, query: &dyn ToQuery) -> Result<RowStream<'a>> {
        let reader = conn.run_extended(query, None).await?;
        Ok(RowStream {
            conn,
            reader,
            queued: VecDeque::new(),
        })
    }

    /// The result's columns.
    pub fn columns(&self) -> &[Column] {
        &self.reader.columns
    }

    /// The row count from CommandComplete, once the stream has ended.
    pub fn rows_affected(&self) -> Option<u64> {
        self.reader.rows_affected
    }

    /// Polls for the next row.
    pub fn poll_next_row(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Row>>> {
        if let Some(row) = self.queued.pop_front() {
            return Poll::Ready(Some(Ok(row)));
        }
        let row = ready!(self.reader.poll_next_row(&mut self.conn, cx));
        if let Some(Ok(_)) = &row {
            self.reader
                .queue_buffered_rows(&mut self.conn, &mut self.queued);
        }
        Poll::Ready(row)
    }
}

impl RowReader {
    fn new(
        columns: Arc<[Column]>,
        response: Response,
        traced: Option<Traced>,
        bound: bool,
    ) -> RowReader {
        RowReader {
            columns,
            response,
            traced,
            state: StreamState::Rows,
            rows_affected: None,
            bound,
        }
    }

    fn poll_next_row(
        &mut self,
        conn: &mut Connection,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Row>>> {
        loop {
            match &mut self.state {
                StreamState::Done => return Poll::Ready(None),
                StreamState::Buffered { rows, error } => {
                    return Poll::Ready(match rows.pop_front() {
                        Some(data) => Some(Row::new(self.columns.clone(), data)),
                        None => {
                            let error = error.take();
                            self.state = StreamState::Done;
                            error.map(Err)
                        }
                    });
                }
                StreamState::Rows => {}
            }
            let step = ready!(conn.poll_step(&mut self.response, cx));
            match self.take_step(conn, step) {
                Flow::Row(row) => return Poll::Ready(Some(Ok(row))),
                Flow::Next => {}
                Flow::End(error) => return Poll::Ready(error.map(Err)),
            }
        }
    }

    /// Reads the rest of the rows, handing each to `each`: what a caller that wants them all
    /// polls, without a return from the reader per row.
    fn poll_rows(
        &mut self,
        conn: &mut Connection,
        cx: &mut Context<'_>,
        each: &mut (dyn FnMut(Row) + Send),
    ) -> Poll<Result<()>> {
        loop {
            if !matches!(self.state, StreamState::Rows) {
                // Read already (or over): one at a time.
                while let Some(row) = ready!(self.poll_next_row(conn, cx)) {
                    each(row?);
                }
                return Poll::Ready(Ok(()));
            }
            let step = ready!(conn.poll_step(&mut self.response, cx));
            match self.take_step(conn, step) {
                Flow::Row(row) => {
                    each(row);
                    // The rows behind it, already here, are taken together.
                    if conn.stream.next_tag() == Some(b'D')
                        && !conn.is_broken()
                        && let Err(e) = conn.take_buffered_rows(&self.columns, &mut *each)
                    {
                        return Poll::Ready(Err(self.end_with(e)));
                    }
                }
                Flow::Next => {}
                Flow::End(error) => return Poll::Ready(error.map_or(Ok(()), Err)),
            }
        }
    }

    /// After a row, queues the rows whole in the read buffer behind it (one block at most). A
    /// malformed one ends the rows: its error comes next.
    fn queue_buffered_rows(&mut self, conn: &mut Connection, queued: &mut VecDeque<Row>) {
        if !matches!(self.state, StreamState::Rows) || conn.is_broken() {
            return;
        }
        if let Err(e) = conn.take_row_block(&self.columns, |row| queued.push_back(row)) {
            let error = Some(self.end_with(e));
            self.state = StreamState::Buffered {
                rows: VecDeque::new(),
                error,
            };
        }
    }

    /// What one step read from the socket means for the rows. Always inlined into the two
    /// loops above: called, it cost 143 more instructions per point query and 34 more per
    /// streamed row (callgrind).
    #[inline(always)]
    fn take_step(&mut self, conn: &mut Connection, step: Result<Step>) -> Flow {
        let step = match step {
            Ok(step) => step,
            // Before BindComplete, our own error (the time limit passed) fails the query,
            // and the rest of its answer is read like a refusal's.
            Err(e) if !self.bound && !conn.is_broken() => {
                self.response.fail_with(e);
                return Flow::Next;
            }
            Err(e) => return Flow::End(Some(self.end_with(e))),
        };
        match step {
            Step::Message(BackendMessage::BindComplete) if !self.bound => self.bound = true,
            // Before BindComplete, only the server's refusal and ReadyForQuery.
            other @ (Step::Row(_) | Step::Complete(_) | Step::Message(_)) if !self.bound => {
                let e = conn.unexpected_step(other, "Bind");
                return Flow::End(Some(self.end_with(e)));
            }
            Step::Row(data) => {
                return match Row::new(self.columns.clone(), data) {
                    Ok(row) => Flow::Row(row),
                    Err(e) => {
                        let e = conn.fail(e);
                        Flow::End(Some(self.end_with(e)))
                    }
                };
            }
            Step::Complete(done) => self.rows_affected = Some(done.rows()),
            // An error: read on to ReadyForQuery, and end with it there.
            Step::Message(BackendMessage::EmptyQueryResponse | BackendMessage::PortalSuspended)
            | Step::Failed => {}
            Step::Over => {
                self.state = StreamState::Done;
                return Flow::End(match self.response.take_error() {
                    Some(e) => Some(self.end_with(e)),
                    None => {
                        if let Some(traced) = self.traced.take() {
                            traced.succeeded(self.rows_affected.unwrap_or(0));
                        }
                        None
                    }
                });
            }
            other => {
                let e = conn.unexpected_step(other, "a row stream");
                return Flow::End(Some(self.end_with(e)));
            }
        }
        Flow::Next
    }

    /// Ends the stream with `e`, and its trace.
    #[cold]
    fn end_with(&mut self, e: Error) -> Error {
        self.state = StreamState::Done;
        if let Some(traced) = self.traced.take() {
            traced.failed(&e);
        }
        e
    }
}

impl Stream for RowStream<'_> {
    type Item = Result<Row>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Row>>> {
        self.get_mut().poll_next_row(cx)
    }
}

impl std::fmt::Debug for RowStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowStream")
            .field("columns", &self.reader.columns)
            .finish_non_exhaustive()
    }
}

/// Portal batches (for `AsyncBatch`): Bind once, then `Execute(portal, n)` again and again,
/// each answered by at most `n` rows and PortalSuspended, until CommandComplete.
impl Connection {
    /// Binds `sql` to the unnamed portal and sends its first `Execute(max_rows)` (with Sync);
    /// returns the result columns once BindComplete arrives — the first batch is then on its
    /// way. Needs an open transaction block for the portal to outlive the Sync.
    pub(crate) async fn start_portal(
        &mut self,
        sql: &str,
        params: &dyn Params,
        max_rows: i32,
    ) -> Result<(Arc<[Column]>, Traced)> {
        self.prepare_request().await?;
        let plan = self.write_query_or_describe(sql, params, max_rows).await?;
        frontend::sync(&mut self.stream.write_buf);
        let traced = self.trace(sql);
        let started = match self.send(1).await {
            Ok(()) => {
                let mut response = Response::new(Shape::Extended);
                match self.read_query_start(&mut response, sql, plan).await {
                    // The first batch's rows follow, read by `read_portal_batch`.
                    Ok(Ok(columns)) => Ok(columns),
                    Ok(Err(_)) => Err(self.fail_request(response).await),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        match started {
            Ok(columns) => Ok((columns, traced)),
            Err(e) => {
                traced.failed(&e);
                Err(e)
            }
        }
    }

    /// Sends one more `Execute(max_rows)` of the unnamed portal, with Sync.
    pub(crate) async fn send_execute(&mut self, max_rows: i32) -> Result<()> {
        frontend::execute(&mut self.stream.write_buf, "", max_rows)?;
        frontend::sync(&mut self.stream.write_buf);
        self.send(1).await
    }

    /// Reads the answer to one `Execute` of a portal: its rows, and whether the portal has
    /// more (PortalSuspended) or is done (CommandComplete); then its ReadyForQuery. A server
    /// error is returned after reading on to ReadyForQuery.
    pub(crate) async fn read_portal_batch(
        &mut self,
        columns: &Arc<[Column]>,
        capacity: usize,
    ) -> Result<(Vec<Row>, bool)> {
        let mut rows = Vec::with_capacity(capacity);
        let mut response = Response::new(Shape::Extended);
        let mut more = None;
        loop {
            self.take_buffered_rows(columns, |row| rows.push(row))?;
            match self.next_step(&mut response).await? {
                Step::Row(data) => {
                    rows.push(Row::new(columns.clone(), data).map_err(|e| self.fail(e))?);
                }
                Step::Message(BackendMessage::PortalSuspended) => more = Some(true),
                Step::Complete(_) | Step::Message(BackendMessage::EmptyQueryResponse) => {
                    more = Some(false);
                }
                Step::Failed => {}
                Step::Over => break,
                other => return Err(self.unexpected_step(other, "a portal batch")),
            }
        }
        response.finish()?;
        match more {
            Some(more) => Ok((rows, more)),
            None => Err(self.protocol_error("a portal batch ended without its end")),
        }
    }

    /// Reads away every response still owed (after a batch was dropped early, say).
    pub(crate) async fn finish_pending(&mut self) -> Result<()> {
        self.prepare_request().await
    }
}

/// One query written by [`Connection::send_each`]: what reading its answer needs (`None`:
/// it was not sent, it must run on a connection of its own), and its trace.
pub(crate) struct SentQuery(Result<Option<Plan>>, Option<Traced>);

/// A pipelined query's answer from [`Connection::read_answer`]: its rows and row count, or
/// `None` when the pipeline could not carry it and nothing of it took effect (it must run on a
/// connection of its own, as [`Pipeline::run`](crate::pool::Pipeline::run) says), or its error.
pub(crate) type PipelinedAnswer = Result<Option<(Vec<Row>, u64)>>;

/// Where a query handed to [`Connection::send_each`] came from: its caller's span (it is sent
/// from another task) and how long it waited in the pipeline's queue.
pub(crate) struct QueryOrigin<'a> {
    pub(crate) span: &'a tracing::Span,
    pub(crate) queued: std::time::Duration,
}

/// Many independent requests in one write (for the engine's pipelined mode).
impl Connection {
    /// Writes every query with a Sync of its own and sends them in one write, without reading:
    /// one query's error does not touch the others (each Sync ends its own implicit
    /// transaction). Several such sends may be in flight — the server answers them in order —
    /// and each query's answer must be read with [`read_answer`](Self::read_answer), oldest
    /// first. The caller makes the connection ready (`finish_pending`) before the first. A
    /// query the pipeline cannot carry (its statement must be described by the server first)
    /// is not sent; its answer is an error saying to run it on its own. What reading each
    /// answer needs is added to `sent`, in order.
    pub(crate) async fn send_each<'q>(
        &mut self,
        queries: impl Iterator<Item = (&'q dyn ToQuery, QueryOrigin<'q>)>,
        sent: &mut Vec<SentQuery>,
    ) -> Result<()> {
        let mut syncs = 0;
        let waited = self.waited_for_connection.take();
        for (q, origin) in queries {
            let mark = self.stream.write_buf.len();
            match self.write_query(q.sql(), q.params(), 0) {
                Ok(Written::Plan(plan)) => {
                    frontend::sync(&mut self.stream.write_buf);
                    syncs += 1;
                    let waited = Waited {
                        connection: waited,
                        pipeline: Some(origin.queued),
                    };
                    let traced = self.instrument.start(q.sql(), Some(origin.span), waited);
                    sent.push(SentQuery(Ok(Some(plan)), Some(traced)));
                }
                Ok(Written::NeedsDescribe) => {
                    self.stream.undo_write(mark);
                    sent.push(SentQuery(Ok(None), None));
                }
                Err(e) => {
                    self.stream.undo_write(mark);
                    sent.push(SentQuery(Err(e), None));
                }
            }
        }
        if syncs > 0 {
            self.send(syncs).await?;
        }
        Ok(())
    }

    /// Reads the answer to the oldest query of [`send_each`](Self::send_each) not read yet
    /// (given that query again). The outer error is the connection's: after it nothing more
    /// can be read.
    pub(crate) async fn read_answer(
        &mut self,
        query: &dyn ToQuery,
        sent: SentQuery,
    ) -> Result<PipelinedAnswer> {
        let SentQuery(plan, traced) = sent;
        let plan = match plan {
            Ok(Some(plan)) => plan,
            Ok(None) => return Ok(Ok(None)),
            Err(e) => return Ok(Err(e)),
        };
        let answer = self.read_traced_answer(query, plan).await;
        if let Some(traced) = traced {
            match &answer {
                Ok(Ok(Some((_, rows)))) => traced.succeeded(*rows),
                // It runs again on its own, with a trace of its own.
                Ok(Ok(None)) => traced.skipped(),
                Ok(Err(e)) | Err(e) => traced.failed(e),
            }
        }
        answer
    }

    async fn read_traced_answer(
        &mut self,
        query: &dyn ToQuery,
        plan: Plan,
    ) -> Result<PipelinedAnswer> {
        let mut response = Response::new(Shape::Extended);
        let mut stale = false;
        let started = self
            .read_query_start(&mut response, query.sql(), plan)
            .await?;
        let rows = match started {
            Ok(columns) => self.read_rows(&mut response, columns).await?,
            Err(s) => {
                stale = s;
                None
            }
        };
        // Read on to the query's ReadyForQuery. An error then is the query's, unless the
        // connection broke, after which nothing more can be read.
        match (self.finish(response).await, rows) {
            (Err(e), _) if self.is_broken() => Err(e),
            // Refused before it ran, in a way that a new attempt fixes (a pooler took our
            // statements, a plan went stale): the engine runs it again on its own.
            (Err(_), _) if stale && self.status == TransactionStatus::Idle => Ok(Ok(None)),
            (Err(e), _) => Ok(Err(e)),
            (Ok(()), Some(rows)) => Ok(Ok(Some(rows))),
            (Ok(()), None) => Err(self.protocol_error("a query failed without an error")),
        }
    }
}
