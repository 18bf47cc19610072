//! The simple query protocol (PostgreSQL docs §55.2.2): one Query message with any number of
//! statements, results in the text format, one ReadyForQuery at the end.

use std::sync::Arc;

use super::Connection;
use super::response::{Response, Shape, Step};
use crate::error::{Error, Result};
use crate::protocol::{BackendMessage, frontend};
use crate::row::{Column, SimpleQueryResult, SimpleRow};

impl Connection {
    /// Runs one or more SQL statements with the simple query protocol and returns one result
    /// per statement that produced one (an empty query string gives none). Values come back
    /// in the text format.
    ///
    /// If a statement fails, the server skips the rest of the string; the error is returned
    /// and the connection is ready for the next query.
    ///
    /// COPY data does not go through here: a `COPY … FROM STDIN` is failed (CopyFail) and a
    /// `COPY … TO STDOUT` runs with its data discarded, and either gives an
    /// [`ErrorKind::Conversion`](crate::ErrorKind::Conversion) error once the whole string has
    /// run. Use [`copy_in`](Self::copy_in) and [`copy_out`](Self::copy_out).
    ///
    /// ```no_run
    /// # async fn demo(conn: &mut pgengine::Connection) -> pgengine::Result<()> {
    /// let results = conn.simple_query("SELECT 1 AS one; SELECT 'two'").await?;
    /// assert_eq!(results[0].rows()[0].get("one"), Some("1"));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<SimpleQueryResult>> {
        self.prepare_request().await?;
        let traced = self.trace(sql);
        let result = self.run_simple_query(sql).await;
        match &result {
            Ok(results) => traced.succeeded(results.iter().map(|r| r.rows_affected()).sum()),
            Err(e) => traced.failed(e),
        }
        result
    }

    async fn run_simple_query(&mut self, sql: &str) -> Result<Vec<SimpleQueryResult>> {
        if crate::sql::effects(sql).session {
            self.stream.note_session_change();
        }
        frontend::query(&mut self.stream.write_buf, sql)?;
        self.send(1).await?;

        let mut results = Vec::new();
        let mut columns: Option<Arc<[Column]>> = None;
        let mut rows = Vec::new();
        let mut response = Response::new(Shape::Simple);
        loop {
            match self.next_step(&mut response).await? {
                Step::Message(BackendMessage::RowDescription(fields)) => {
                    columns = Some(fields.iter().map(Column::from_field).collect());
                }
                Step::Row(data) => {
                    let cols = columns
                        .clone()
                        .ok_or_else(|| self.protocol_error("DataRow before RowDescription"))?;
                    rows.push(SimpleRow::new(cols, data).map_err(|e| self.fail(e))?);
                }
                Step::Complete(done) => {
                    let tag = done.into_tag();
                    let tag = tag.unwrap_or_default();
                    results.push(SimpleQueryResult {
                        columns: columns.take().unwrap_or_else(|| Arc::from([])),
                        rows: std::mem::take(&mut rows),
                        // The server sends tags in the client encoding (UTF-8); lossy keeps a
                        // misbehaving server's tag readable.
                        tag: String::from_utf8_lossy(&tag).into_owned(),
                    });
                }
                Step::Message(BackendMessage::CopyInResponse(_)) => {
                    // The server waits for data we do not have: refuse, and it answers with an
                    // ErrorResponse and ReadyForQuery as usual.
                    self.refuse_copy_in("simple_query sends no COPY data: use Connection::copy_in")
                        .await?;
                    response.fail_with(Error::conversion(
                        "simple_query cannot send the data of a COPY … FROM STDIN: use \
                         Connection::copy_in (the COPY was failed and copied nothing)",
                    ));
                }
                Step::Message(BackendMessage::CopyOutResponse(_)) => {
                    response.fail_with(Error::conversion(
                        "simple_query does not return the data of a COPY … TO STDOUT: use \
                         Connection::copy_out (the COPY ran and its data was discarded)",
                    ));
                }
                Step::Message(
                    BackendMessage::EmptyQueryResponse
                    | BackendMessage::CopyData(_)
                    | BackendMessage::CopyDone,
                )
                | Step::Failed => {}
                Step::Over => break,
                other => return Err(self.unexpected_step(other, "a simple query")),
            }
        }
        // A DISCARD ALL or DEALLOCATE ALL dropped our prepared statements.
        if self.stream.take_statements_dropped() {
            self.statements.clear();
        }
        response.finish().map(|()| results)
    }

    /// Runs one statement that returns no rows (`BEGIN`, `SAVEPOINT "s"`, `COMMIT`, …) whose
    /// SQL text is `parts` one after the other, with the simple query protocol: the lean
    /// path of the transaction and savepoint commands, which builds no string and no result.
    /// Returns the command tag; the server's error, if it sent one, is returned once the
    /// connection is ready again.
    pub(crate) async fn command(&mut self, parts: &[&str]) -> Result<Option<bytes::Bytes>> {
        self.prepare_request().await?;
        // The text is put together only for someone watching: this is the savepoints' path.
        let traced = if self.instrument.watching() {
            self.trace(&parts.concat())
        } else {
            self.untraced()
        };
        let result = self.run_command(parts).await;
        match &result {
            Ok(_) => traced.succeeded(0),
            Err(e) => traced.failed(e),
        }
        result
    }

    pub(super) async fn run_command(&mut self, parts: &[&str]) -> Result<Option<bytes::Bytes>> {
        frontend::query_parts(&mut self.stream.write_buf, parts)?;
        self.send(1).await?;
        let mut response = Response::new(Shape::Simple);
        let mut tag = None;
        loop {
            match self.next_step(&mut response).await? {
                Step::Complete(done) => tag = done.into_tag(),
                Step::Message(BackendMessage::EmptyQueryResponse) | Step::Failed => {}
                Step::Over => break,
                other => return Err(self.unexpected_step(other, "a command")),
            }
        }
        response.finish().map(|()| tag)
    }
}
