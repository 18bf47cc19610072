//! COPY (PostgreSQL docs §55.2.6 "COPY Operations"): bulk data into a table with
//! `COPY … FROM STDIN` and out of one with `COPY … TO STDOUT`, without a round trip per row.
//!
//! The statement goes out as a simple Query. The server answers CopyInResponse and then waits
//! for CopyData messages until CopyDone (commit the data) or CopyFail (fail the statement);
//! or it answers CopyOutResponse and sends CopyData messages, then CopyDone. Either way
//! CommandComplete (`COPY n`) and ReadyForQuery end the request, like any other statement.
//!
//! While a COPY FROM STDIN is open the server reads nothing but copy messages, so a
//! [`CopyInSink`] dropped half way would leave it waiting for data that never comes. The
//! connection remembers the open COPY (`copy_in`) and its next request first sends CopyFail,
//! then reads the failed statement's end like any abandoned request's. A [`CopyOutStream`]
//! dropped half way needs nothing of its own: the rest of its data is an abandoned response,
//! cancelled and read away by the next request.
//!
//! [`BinaryCopyInWriter`] writes rows in the binary COPY file format (the COPY command's
//! documentation, "Binary Format"), each value encoded by `postgres-types`, so nothing is
//! formatted as text and parsed back on the server.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{BufMut, Bytes, BytesMut};
use futures::Stream;
use postgres_types::{IsNull, ToSql, Type};

use super::Connection;
use super::instrument::Traced;
use super::response::{Response, Shape, Step};
use crate::error::{DbError, Error, Result};
use crate::protocol::{BackendMessage, CopyFormat, frontend};

/// Buffered COPY data goes out as one CopyData message once it passes this size: few enough
/// writes that a million short rows are not a million system calls, small enough that memory
/// stays flat however much is copied.
const FLUSH_AT: usize = 64 * 1024;

/// The CopyFail message for a sink dropped without `finish` or `abort`.
const ABANDONED: &str = "the CopyInSink was dropped before finish: nothing is copied";

/// The CopyFail message for a COPY FROM STDIN that a call other than `copy_in` ran into.
const NOT_COPY_IN: &str = "pgengine sends COPY data only through Connection::copy_in";

/// The binary COPY file header: the signature `PGCOPY\n\377\r\n\0`, flags (no OIDs), and the
/// length of the header extension area (none).
const BINARY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// The binary COPY file trailer: a field count of -1.
const BINARY_TRAILER: &[u8] = &[0xff, 0xff];

impl Connection {
    /// Starts `COPY … FROM STDIN` and returns a sink for its data.
    ///
    /// `sql` is sent as a simple Query; results of other statements before the COPY in the
    /// same string are discarded. If the statement fails (no such table, a syntax error) its
    /// error is returned and the connection is ready for the next request. A statement that
    /// is not a `COPY … FROM STDIN` gives an [`ErrorKind::Conversion`] error after it has run.
    ///
    /// The data is in the format the statement names: text (tab-separated columns, one line
    /// per row, `\N` for NULL), CSV, or binary (see [`BinaryCopyInWriter`]). Nothing is
    /// committed until [`CopyInSink::finish`]; [`CopyInSink::abort`] or dropping the sink
    /// fails the statement instead (inside a transaction block, that fails the transaction).
    ///
    /// A [query timeout](Self::set_query_timeout) covers the whole COPY, from the statement to
    /// the end of `finish`, including the time the caller takes to produce the data; when it
    /// passes, the next write that sends fails the COPY and returns a timeout error.
    ///
    /// ```no_run
    /// # async fn demo(conn: &mut pgengine::Connection) -> pgengine::Result<()> {
    /// let mut sink = conn.copy_in("COPY people (id, name) FROM STDIN").await?;
    /// for (id, name) in [(1, "Ada"), (2, "Grace")] {
    ///     sink.write(format!("{id}\t{name}\n").as_bytes()).await?;
    /// }
    /// let copied = sink.finish().await?;
    /// assert_eq!(copied, 2);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// [`ErrorKind::Conversion`]: crate::ErrorKind::Conversion
    pub async fn copy_in(&mut self, sql: &str) -> Result<CopyInSink<'_>> {
        let (format, response, traced) = self.start_copy(sql, Direction::In).await?;
        Ok(CopyInSink {
            conn: self,
            format,
            response,
            traced: Some(traced),
            buf: BytesMut::with_capacity(FLUSH_AT + 1024),
            ended: None,
        })
    }

    /// Starts `COPY … TO STDOUT` and returns a stream of its data, one CopyData message per
    /// item: in the text and CSV formats the server sends one row per message. The items are
    /// slices of the connection's read buffer, not copies.
    ///
    /// `sql` is sent as a simple Query; results of other statements in the same string are
    /// discarded. If the statement fails its error is returned and the connection is ready for
    /// the next request; an error after the data began (a failing function in `COPY (SELECT
    /// …) TO STDOUT`) is the stream's last item. A statement that is not a `COPY … TO STDOUT`
    /// gives an [`ErrorKind::Conversion`] error after it has run (a `COPY … FROM STDIN` is
    /// refused with CopyFail, so it copies nothing).
    ///
    /// Dropping the stream early is safe: the statement is cancelled and the rest of its data
    /// read away before the connection's next request.
    ///
    /// ```no_run
    /// # async fn demo(conn: &mut pgengine::Connection) -> pgengine::Result<()> {
    /// use futures::TryStreamExt;
    /// let mut out = conn.copy_out("COPY (SELECT id, name FROM people) TO STDOUT").await?;
    /// let mut text = Vec::new();
    /// while let Some(chunk) = out.try_next().await? {
    ///     text.extend_from_slice(&chunk);
    /// }
    /// println!("{} rows", out.rows_affected().unwrap_or(0));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// [`ErrorKind::Conversion`]: crate::ErrorKind::Conversion
    pub async fn copy_out(&mut self, sql: &str) -> Result<CopyOutStream<'_>> {
        let (format, response, traced) = self.start_copy(sql, Direction::Out).await?;
        Ok(CopyOutStream {
            conn: self,
            format,
            response,
            traced: Some(traced),
            state: OutState::Data,
            rows_affected: None,
        })
    }

    /// Sends `sql` and reads up to the copy response in the `wanted` direction; the rest of the
    /// response is read through the returned one. Anything else that ends the request (an
    /// error, a COPY the other way, no COPY at all) is read through to ReadyForQuery and
    /// returned as an error, leaving the connection ready.
    async fn start_copy(
        &mut self,
        sql: &str,
        wanted: Direction,
    ) -> Result<(CopyFormat, Response, Traced)> {
        self.prepare_request().await?;
        let traced = self.trace(sql);
        match self.send_copy(sql, wanted).await {
            Ok((format, response)) => Ok((format, response, traced)),
            Err(e) => {
                traced.failed(&e);
                Err(e)
            }
        }
    }

    async fn send_copy(&mut self, sql: &str, wanted: Direction) -> Result<(CopyFormat, Response)> {
        frontend::query(&mut self.stream.write_buf, sql)?;
        self.send(1).await?;
        let mut response = Response::new(Shape::Simple);
        loop {
            match self.next_step(&mut response).await? {
                Step::Message(BackendMessage::CopyInResponse(format))
                    if wanted == Direction::In =>
                {
                    self.copy_in = true;
                    return Ok((format, response));
                }
                Step::Message(BackendMessage::CopyOutResponse(format))
                    if wanted == Direction::Out =>
                {
                    return Ok((format, response));
                }
                Step::Message(BackendMessage::CopyInResponse(_)) => {
                    self.refuse_copy_in(NOT_COPY_IN).await?;
                    response.fail_with(Error::conversion(
                        "copy_out needs a COPY … TO STDOUT statement; this one reads data \
                         (COPY … FROM STDIN): use copy_in. It was cancelled and copied nothing",
                    ));
                    return Err(self.end_copy(response).await);
                }
                Step::Message(BackendMessage::CopyOutResponse(_)) => {
                    response.fail_with(Error::conversion(
                        "copy_in needs a COPY … FROM STDIN statement; this one sends data \
                         (COPY … TO STDOUT): use copy_out. Its data was discarded",
                    ));
                    return Err(self.end_copy(response).await);
                }
                Step::Failed => return Err(self.end_copy(response).await),
                Step::Over => {
                    return Err(Error::conversion(format!(
                        "{} needs a COPY … {} statement; the statements sent ran, but none \
                         of them was one",
                        wanted.method(),
                        wanted.clause()
                    )));
                }
                // Statements before the COPY in the same string: their results are not asked
                // for.
                Step::Row(_)
                | Step::Complete(_)
                | Step::Message(BackendMessage::RowDescription(_))
                | Step::Message(BackendMessage::EmptyQueryResponse) => {}
                other => return Err(self.unexpected_step(other, "the start of a COPY")),
            }
        }
    }

    /// Ends the open COPY FROM STDIN with CopyFail: the server fails the statement with
    /// SQLSTATE 57014 and answers ErrorResponse and ReadyForQuery (§55.2.6).
    pub(super) async fn refuse_copy_in(&mut self, reason: &str) -> Result<()> {
        self.stream.write_buf.clear();
        frontend::copy_fail(&mut self.stream.write_buf, reason)?;
        self.copy_in = false;
        self.flush().await
    }

    /// Ends the COPY FROM STDIN of a sink that was dropped without `finish` or `abort`, for
    /// `prepare_request`, which then reads the statement's end as an abandoned request's.
    pub(super) async fn abandon_copy_in(&mut self) -> Result<()> {
        self.refuse_copy_in(ABANDONED).await?;
        // The CopyFail is the statement's cancel: a CancelRequest on top would cost a new
        // connection to the server and could only hit the statement's end.
        self.watch.cancelled = true;
        Ok(())
    }

    /// Reads the rest of a simple Query's response up to its ReadyForQuery, and returns the
    /// first error on the way. Results are dropped, COPY TO STDOUT data too, and a COPY FROM
    /// STDIN (a later statement in the same string) is refused with CopyFail.
    async fn read_to_ready(&mut self, mut response: Response) -> Result<Option<Error>> {
        loop {
            match self.next_step(&mut response).await? {
                Step::Over => return Ok(response.take_error()),
                Step::Message(BackendMessage::CopyInResponse(_)) => {
                    self.refuse_copy_in(NOT_COPY_IN).await?;
                }
                _ => {}
            }
        }
    }

    /// Reads the rest of a COPY request that failed and returns its error (the first: the
    /// server's, or ours put in `response`), unless the connection itself failed meanwhile.
    async fn end_copy(&mut self, response: Response) -> Error {
        match self.read_to_ready(response).await {
            Ok(Some(e)) | Err(e) => e,
            Ok(None) => self.protocol_error("a COPY failed without an error"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    In,
    Out,
}

impl Direction {
    fn method(self) -> &'static str {
        match self {
            Direction::In => "copy_in",
            Direction::Out => "copy_out",
        }
    }

    fn clause(self) -> &'static str {
        match self {
            Direction::In => "FROM STDIN",
            Direction::Out => "TO STDOUT",
        }
    }
}

/// The data of a `COPY … FROM STDIN`, from [`Connection::copy_in`].
///
/// Writes are buffered and go out in CopyData messages of about 64 KiB. Nothing is committed
/// until [`finish`](Self::finish). If the sink is dropped without `finish` or
/// [`abort`](Self::abort), the COPY is failed (CopyFail) before the connection's next request,
/// and a pool cleans the connection before reusing it.
///
/// The server can fail the COPY while data is still going out (a malformed value, a
/// constraint violation): it then ignores the rest of the data. The next `write` that sends a
/// buffer, or `finish`, returns that error; the connection is ready for its next request.
///
/// Dropping a `write` or `finish` future half way, while it sends, breaks the connection:
/// the server may hold half a message.
pub struct CopyInSink<'a> {
    conn: &'a mut Connection,
    format: CopyFormat,
    /// The COPY's response, read at its end (and glanced at while data goes out).
    response: Response,
    /// The COPY's trace, ended by `finish` (dropped otherwise: abandoned).
    traced: Option<Traced>,
    /// Data not sent yet, less than [`FLUSH_AT`] between calls.
    buf: BytesMut,
    /// Set when the COPY ended before `finish` or `abort`; every later call reports it.
    ended: Option<Ended>,
}

/// How a COPY FROM STDIN ended early.
enum Ended {
    /// The server failed it and has said ReadyForQuery since.
    Server(Box<DbError>),
    /// It ran out of time and was failed with CopyFail; the connection reads its end before
    /// the next request.
    TimedOut,
}

impl CopyInSink<'_> {
    /// Whether the statement asked for the binary format (`FORMAT binary`), per the server's
    /// CopyInResponse.
    pub fn is_binary(&self) -> bool {
        self.format.format == 1
    }

    /// The number of columns the COPY fills.
    pub fn columns(&self) -> usize {
        self.format.column_formats.len()
    }

    /// Adds `data` to the COPY. Rows may be split across calls anywhere: the server sees one
    /// stream of bytes. Data goes out once about 64 KiB are buffered; the rest waits for the
    /// next `write` or for `finish`.
    ///
    /// ```no_run
    /// # async fn demo(conn: &mut pgengine::Connection) -> pgengine::Result<()> {
    /// let mut sink = conn.copy_in("COPY t (a, b) FROM STDIN (FORMAT csv)").await?;
    /// sink.write(b"1,one\n2,").await?;
    /// sink.write(b"two\n").await?;
    /// sink.finish().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn write(&mut self, mut data: &[u8]) -> Result<()> {
        self.check_open()?;
        while !data.is_empty() {
            if self.buf.is_empty() && data.len() >= FLUSH_AT {
                // A large write goes out straight from the caller's slice, without a stop in
                // the buffer.
                let (now, rest) = data.split_at(FLUSH_AT);
                self.send(now).await?;
                data = rest;
                continue;
            }
            let n = (FLUSH_AT - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            self.send_if_full().await?;
        }
        Ok(())
    }

    /// Sends the rest of the data and CopyDone, and returns the number of rows copied (from
    /// the `COPY n` CommandComplete). A server error — a malformed value (`22P02`), a unique
    /// violation (`23505`), … — is returned with its SQLSTATE, and nothing is copied.
    pub async fn finish(mut self) -> Result<u64> {
        let traced = self.traced.take();
        let result = self.finish_copy().await;
        if let Some(traced) = traced {
            match &result {
                Ok(rows) => traced.succeeded(*rows),
                Err(e) => traced.failed(e),
            }
        }
        result
    }

    async fn finish_copy(self) -> Result<u64> {
        self.check_open()?;
        let conn = &mut *self.conn;
        if !self.buf.is_empty() {
            frontend::copy_data(&mut conn.stream.write_buf, &self.buf)?;
        }
        frontend::copy_done(&mut conn.stream.write_buf);
        conn.copy_in = false;
        conn.flush().await?;

        let mut response = self.response;
        let copied = match conn.next_step(&mut response).await? {
            Step::Complete(done) => done.rows(),
            Step::Failed => return Err(conn.end_copy(response).await),
            other => return Err(conn.unexpected_step(other, "the end of a COPY FROM STDIN")),
        };
        match conn.read_to_ready(response).await? {
            // A statement after the COPY in the same string failed; in the one implicit
            // transaction of a simple Query that undoes the COPY too.
            Some(e) => Err(e),
            None => Ok(copied),
        }
    }

    /// Fails the COPY with CopyFail: nothing is copied, and the server reports the statement
    /// failed with `reason` (SQLSTATE 57014), which inside a transaction block fails the
    /// transaction. Returns once the connection is ready for its next request — also when the
    /// server had already failed the COPY on its own.
    ///
    /// ```no_run
    /// # async fn demo(conn: &mut pgengine::Connection) -> pgengine::Result<()> {
    /// let mut sink = conn.copy_in("COPY t FROM STDIN").await?;
    /// sink.write(b"1\n").await?;
    /// sink.abort("changed my mind").await?;
    /// assert!(conn.is_idle());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn abort(self, reason: &str) -> Result<()> {
        match &self.ended {
            Some(Ended::Server(_)) => return Ok(()),
            Some(Ended::TimedOut) => return self.conn.prepare_request().await,
            None => self.check_open()?,
        }
        // A reason the server cannot take (a NUL byte in it) must not keep the COPY open.
        let reason = if reason.contains('\0') {
            "aborted by the client"
        } else {
            reason
        };
        self.conn.refuse_copy_in(reason).await?;
        // The ErrorResponse that answers CopyFail is the outcome asked for, not a failure.
        self.conn.read_to_ready(self.response).await.map(|_| ())
    }

    /// Fails unless the server still waits for data.
    fn check_open(&self) -> Result<()> {
        if let Some(reason) = &self.conn.broken {
            return Err(Error::closed(format!("the connection is broken: {reason}")));
        }
        match &self.ended {
            None => Ok(()),
            Some(Ended::Server(db)) => Err(Error::db(db.clone())),
            Some(Ended::TimedOut) => Err(Error::timeout(
                "the COPY ran out of time earlier and was failed: nothing is copied",
            )),
        }
    }

    /// Sends the buffer once it has reached [`FLUSH_AT`].
    async fn send_if_full(&mut self) -> Result<()> {
        if self.buf.len() >= FLUSH_AT {
            let buf = std::mem::take(&mut self.buf);
            let r = self.send(&buf).await;
            self.buf = buf;
            self.buf.clear();
            r?;
        }
        Ok(())
    }

    /// Sends `data` as one CopyData message, after a look at what the server sent meanwhile.
    async fn send(&mut self, data: &[u8]) -> Result<()> {
        self.check_server().await?;
        let conn = &mut *self.conn;
        frontend::copy_data(&mut conn.stream.write_buf, data)?;
        conn.flush().await
    }

    /// Reads, without waiting, what the server sent during the COPY. Notices are handled by
    /// `poll_read` on the way (reading them also keeps a noisy server from blocking on a full
    /// socket while we write). An ErrorResponse means the server failed the COPY and ignores
    /// any further data (§55.2.6): it is read through to ReadyForQuery and returned.
    async fn check_server(&mut self) -> Result<()> {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        match self.conn.poll_step(&mut self.response, &mut cx) {
            Poll::Pending => Ok(()),
            Poll::Ready(Ok(Step::Failed)) => {
                self.conn.copy_in = false;
                let response = std::mem::replace(&mut self.response, Response::new(Shape::Drain));
                let error = self.conn.end_copy(response).await;
                if let Some(db) = error.as_db_error() {
                    self.ended = Some(Ended::Server(Box::new(db.clone())));
                }
                Err(error)
            }
            Poll::Ready(Ok(other)) => Err(self.conn.unexpected_step(other, "a COPY FROM STDIN")),
            Poll::Ready(Err(e)) if self.conn.broken.is_some() => Err(e),
            Poll::Ready(Err(e)) => {
                // The request's time limit passed (poll_read has sent a CancelRequest, which
                // the server only heeds once more data arrives): fail the COPY now, and leave
                // its end to the next request's drain.
                self.ended = Some(Ended::TimedOut);
                self.conn.refuse_copy_in(&e.to_string()).await?;
                Err(e)
            }
        }
    }
}

impl std::fmt::Debug for CopyInSink<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyInSink")
            .field("format", &self.format)
            .field("buffered", &self.buf.len())
            .finish_non_exhaustive()
    }
}

/// Rows for a `COPY … FROM STDIN (FORMAT binary)`, each value encoded by its
/// [`ToSql`] implementation for its column's type, in the binary COPY
/// file format: the header first, then per row a field count and each field as a length (-1
/// for NULL) and bytes, and a trailer at [`finish`](Self::finish).
///
/// ```no_run
/// # async fn demo(conn: &mut pgengine::Connection) -> pgengine::Result<()> {
/// use pgengine::connection::BinaryCopyInWriter;
/// use pgengine::Type;
///
/// let sink = conn.copy_in("COPY t (id, name) FROM STDIN (FORMAT binary)").await?;
/// let mut writer = BinaryCopyInWriter::new(sink, &[Type::INT8, Type::TEXT])?;
/// writer.write_row(&[&1i64, &"one"]).await?;
/// writer.write_row(&[&2i64, &None::<&str>]).await?;
/// assert_eq!(writer.finish().await?, 2);
/// # Ok(())
/// # }
/// ```
pub struct BinaryCopyInWriter<'a> {
    sink: CopyInSink<'a>,
    types: Vec<Type>,
}

impl<'a> BinaryCopyInWriter<'a> {
    /// Wraps the sink of a binary COPY whose columns have `types`, in order. Fails (and drops
    /// the sink, which fails the COPY) unless the statement asked for the binary format and
    /// the number of types is the number of columns.
    pub fn new(mut sink: CopyInSink<'a>, types: &[Type]) -> Result<BinaryCopyInWriter<'a>> {
        if !sink.is_binary() {
            return Err(Error::conversion(
                "BinaryCopyInWriter needs a COPY … FROM STDIN (FORMAT binary) statement",
            ));
        }
        if sink.columns() != types.len() {
            return Err(Error::conversion(format!(
                "the COPY has {} columns but BinaryCopyInWriter was given {} types",
                sink.columns(),
                types.len()
            )));
        }
        sink.buf.extend_from_slice(BINARY_HEADER);
        Ok(BinaryCopyInWriter {
            sink,
            types: types.to_vec(),
        })
    }

    /// Adds one row: a value per column, in the column order of the statement. A value that
    /// cannot be encoded as its column's type is an [`ErrorKind::Conversion`] error, and
    /// nothing of that row is sent; the COPY stays open.
    ///
    /// [`ErrorKind::Conversion`]: crate::ErrorKind::Conversion
    pub async fn write_row(&mut self, values: &[&(dyn ToSql + Sync)]) -> Result<()> {
        self.sink.check_open()?;
        if values.len() != self.types.len() {
            return Err(Error::conversion(format!(
                "a row of {} values for a COPY of {} columns",
                values.len(),
                self.types.len()
            )));
        }
        let buf = &mut self.sink.buf;
        let start = buf.len();
        if let Err(e) = encode_row(buf, values, &self.types) {
            buf.truncate(start);
            return Err(e);
        }
        self.sink.send_if_full().await
    }

    /// Writes the trailer, ends the COPY, and returns the number of rows copied; see
    /// [`CopyInSink::finish`].
    pub async fn finish(mut self) -> Result<u64> {
        self.sink.buf.extend_from_slice(BINARY_TRAILER);
        self.sink.finish().await
    }

    /// Fails the COPY; see [`CopyInSink::abort`].
    pub async fn abort(self, reason: &str) -> Result<()> {
        self.sink.abort(reason).await
    }
}

impl std::fmt::Debug for BinaryCopyInWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BinaryCopyInWriter")
            .field("types", &self.types)
            .field("sink", &self.sink)
            .finish()
    }
}

/// Appends one binary COPY tuple: field count, then per field its length and bytes.
fn encode_row(buf: &mut BytesMut, values: &[&(dyn ToSql + Sync)], types: &[Type]) -> Result<()> {
    let count = i16::try_from(values.len())
        .map_err(|_| Error::conversion("a COPY row has at most 32767 columns"))?;
    buf.put_i16(count);
    for (i, (value, ty)) in values.iter().zip(types).enumerate() {
        let len_at = buf.len();
        buf.put_i32(0);
        let is_null = value
            .to_sql_checked(ty, buf)
            .map_err(|e| Error::to_sql(format_args!("COPY column {} ({ty})", i + 1), e))?;
        let len = match is_null {
            IsNull::Yes => {
                buf.truncate(len_at + 4);
                -1
            }
            IsNull::No => i32::try_from(buf.len() - len_at - 4).map_err(|_| {
                Error::conversion(format!("COPY column {}: the value is over 2 GiB", i + 1))
            })?,
        };
        buf[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
    }
    Ok(())
}

/// The data of a `COPY … TO STDOUT`, from [`Connection::copy_out`]: one item per CopyData
/// message, ending after the statement's CommandComplete and ReadyForQuery.
///
/// ```no_run
/// # async fn demo(conn: &mut pgengine::Connection) -> pgengine::Result<()> {
/// use futures::TryStreamExt;
///
/// let mut out = conn.copy_out("COPY band TO STDOUT (FORMAT csv)").await?;
/// let mut csv = Vec::new();
/// while let Some(chunk) = out.try_next().await? {
///     csv.extend_from_slice(&chunk);
/// }
/// # Ok(())
/// # }
/// ```
pub struct CopyOutStream<'a> {
    conn: &'a mut Connection,
    format: CopyFormat,
    /// The COPY's response: its first error is returned once ReadyForQuery has arrived.
    response: Response,
    /// The COPY's trace, ended with the stream.
    traced: Option<Traced>,
    state: OutState,
    rows_affected: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutState {
    /// CopyData messages are the COPY's data.
    Data,
    /// After CopyDone or an error: the rest up to ReadyForQuery is read and dropped.
    Rest,
    /// ReadyForQuery came (or the connection failed): the stream has ended.
    Done,
}

impl CopyOutStream<'_> {
    /// Whether the statement asked for the binary format, per the server's CopyOutResponse.
    pub fn is_binary(&self) -> bool {
        self.format.format == 1
    }

    /// The number of columns the COPY sends.
    pub fn columns(&self) -> usize {
        self.format.column_formats.len()
    }

    /// The row count from the `COPY n` CommandComplete, once the stream has ended.
    pub fn rows_affected(&self) -> Option<u64> {
        self.rows_affected
    }

    /// Polls for the next CopyData payload.
    pub fn poll_next_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes>>> {
        loop {
            if self.state == OutState::Done {
                return Poll::Ready(None);
            }
            let step = match ready!(self.conn.poll_step(&mut self.response, cx)) {
                Ok(step) => step,
                Err(e) => {
                    self.state = OutState::Done;
                    if let Some(traced) = self.traced.take() {
                        traced.failed(&e);
                    }
                    return Poll::Ready(Some(Err(e)));
                }
            };
            match step {
                Step::Message(BackendMessage::CopyData(data)) if self.state == OutState::Data => {
                    return Poll::Ready(Some(Ok(data)));
                }
                Step::Message(BackendMessage::CopyDone) if self.state == OutState::Data => {
                    self.state = OutState::Rest;
                }
                Step::Complete(done) if self.rows_affected.is_none() => {
                    let rows = done.rows();
                    self.state = OutState::Rest;
                    self.rows_affected = Some(rows);
                }
                Step::Failed => self.state = OutState::Rest,
                Step::Over => {
                    self.state = OutState::Done;
                    let error = self.response.take_error();
                    if let Some(traced) = self.traced.take() {
                        match &error {
                            Some(e) => traced.failed(e),
                            None => traced.succeeded(self.rows_affected.unwrap_or(0)),
                        }
                    }
                    return Poll::Ready(error.map(Err));
                }
                Step::Message(BackendMessage::CopyInResponse(_)) => {
                    // A COPY FROM STDIN after ours in the same string waits for data, and
                    // the CopyFail that would end it cannot be sent from a poll: the
                    // connection is given up instead of left waiting.
                    self.state = OutState::Done;
                    return Poll::Ready(Some(Err(self.conn.fail(Error::conversion(
                        "a COPY … FROM STDIN followed the COPY … TO STDOUT of copy_out: the \
                         connection was closed; send it with copy_in",
                    )))));
                }
                // Later statements of the same string: their results are not asked for.
                _ if self.state == OutState::Rest => {}
                other => {
                    self.state = OutState::Done;
                    return Poll::Ready(Some(Err(self
                        .conn
                        .unexpected_step(other, "a COPY TO STDOUT"))));
                }
            }
        }
    }
}

impl Stream for CopyOutStream<'_> {
    type Item = Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes>>> {
        self.get_mut().poll_next_data(cx)
    }
}

impl std::fmt::Debug for CopyOutStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyOutStream")
            .field("format", &self.format)
            .field("state", &self.state)
            .field("rows_affected", &self.rows_affected)
            .finish_non_exhaustive()
    }
}
