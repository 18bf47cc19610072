//! The simple query protocol (PostgreSQL docs §55.2.2): one Query message with any number of
//! statements, results in the text format, one ReadyForQuery at the end.

use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Poll, ready};

use super::Connection;
use super::response::{Completion, Response, Shape, Step};
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
    /// Returns what its tag said (read in place, not kept); the server's error, if it sent
    /// one, is returned once the connection is ready again.
    pub(crate) async fn command(&mut self, parts: &[&str]) -> Result<Option<Completion>> {
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

    /// Defers a command (`SAVEPOINT "s"`) whose text is `parts` one after the other: it goes
    /// out in front of the next request, in the same write, and its answer is read before
    /// that request's (as Npgsql sends a savepoint). Commands deferred together go as one
    /// Query message (`SAVEPOINT "a"; SAVEPOINT "b"`), and before another command they join
    /// its own Query: the server then answers them all with one ReadyForQuery. A savepoint
    /// costs no round trip of its own. If the server refuses one, the rest of the block is
    /// refused too (it has failed), and the error is the carrying request's to report
    /// ([`take_deferred_error`](Self::take_deferred_error)).
    ///
    /// `false` when [`MAX_DEFERRED`] are waiting already: nothing was deferred, and the
    /// caller sends the ones waiting first ([`send_deferred`](Self::send_deferred)).
    pub(crate) fn defer_command(&mut self, parts: &[&str]) -> bool {
        if self.deferred.count >= MAX_DEFERRED {
            return false;
        }
        // The callers' texts are a savepoint's checked name and fixed words: no NUL (which
        // would make the carrying request's encoding fail).
        debug_assert!(!parts.iter().any(|part| part.contains('\0')));
        if self.deferred.count > 0 {
            self.deferred.sql.push_str("; ");
        }
        for part in parts {
            self.deferred.sql.push_str(part);
        }
        self.deferred.count += 1;
        true
    }

    /// Sends the deferred commands on their own, now, and reads their answer; `Ok` even if
    /// one failed (see [`take_deferred_error`](Self::take_deferred_error)).
    pub(crate) async fn send_deferred(&mut self) -> Result<()> {
        if self.deferred.count == 0 {
            return Ok(());
        }
        self.prepare_request().await?;
        self.send(0).await
    }

    /// Forgets the deferred commands (a transaction ends, and its savepoints with it).
    pub(crate) fn drop_deferred(&mut self) {
        self.deferred.sql.clear();
        self.deferred.count = 0;
    }

    /// The error of a deferred command that the last request carried, if the server refused
    /// it.
    pub(crate) fn take_deferred_error(&mut self) -> Option<Error> {
        self.deferred.failed.take()
    }

    /// Reads the answer to the deferred commands that [`send`](Self::send) put in front of a
    /// request. A server error is kept for the request's caller; any other (the connection
    /// lost, a time limit) is returned.
    pub(super) async fn read_deferred(&mut self) -> Result<()> {
        let mut sql = std::mem::take(&mut self.deferred.sql);
        self.deferred.count = 0;
        let traced = self.trace(&sql);
        // The buffer is kept for the next ones.
        sql.clear();
        self.deferred.sql = sql;
        match self.read_commands_reply().await {
            Ok(_) => {
                traced.succeeded(0);
                Ok(())
            }
            Err((e, server)) => {
                traced.failed(&e);
                if server.is_none() {
                    return Err(e);
                }
                self.deferred.failed = Some(e);
                Ok(())
            }
        }
    }

    /// A command with the deferred commands in front of it, all in one Query message (see
    /// [`defer_command`](Self::defer_command)): one ReadyForQuery for all. An error before
    /// the command's own completion is a deferred command's.
    async fn run_command_after_deferred(&mut self, parts: &[&str]) -> Result<Option<Completion>> {
        let deferred = std::mem::take(&mut self.deferred.count);
        let mut sql = std::mem::take(&mut self.deferred.sql);
        let prelude = sql.len();
        sql.push_str("; ");
        for part in parts {
            sql.push_str(part);
        }
        let written = frontend::query(&mut self.stream.write_buf, &sql);
        sql.truncate(prelude);
        if let Err(e) = written {
            // Not sent: they wait for the next request.
            self.deferred.sql = sql;
            self.deferred.count = deferred;
            return Err(e);
        }
        let traced = self.trace(&sql);
        sql.clear();
        self.deferred.sql = sql;
        self.send(1).await?;
        match self.read_commands_reply().await {
            Ok(tag) => {
                traced.succeeded(0);
                Ok(tag)
            }
            Err((e, Some(completed))) if completed < deferred => {
                traced.failed(&e);
                self.deferred.failed = Some(e.duplicate());
                Err(e)
            }
            Err((e, Some(_))) => {
                // The savepoints were made: the command's error is its own.
                traced.succeeded(0);
                Err(e)
            }
            Err((e, None)) => {
                // The connection's (lost, a time limit): the request's own error, as for any.
                traced.failed(&e);
                Err(e)
            }
        }
    }

    pub(super) async fn run_command(&mut self, parts: &[&str]) -> Result<Option<Completion>> {
        if self.deferred.count > 0 && self.pending == 0 {
            return self.run_command_after_deferred(parts).await;
        }
        frontend::query_parts(&mut self.stream.write_buf, parts)?;
        self.send(1).await?;
        self.read_command_reply().await
    }

    /// COMMIT, with a question asked just before it and one just after, all in one write and
    /// one round trip. Each goes as a Query message of its own, so the server sends the answer
    /// to `before` (with its ReadyForQuery) before it starts the COMMIT: if the connection is
    /// lost during the COMMIT, that answer has most likely arrived. `before` and `after` are
    /// statements that return one value.
    pub(crate) async fn commit_between(&mut self, ask: CommitAsk<'_>) -> CommitReply {
        if let Err(e) = self.prepare_request().await {
            return CommitReply::of(Err(e));
        }
        let sent = match self.write_commit(ask) {
            Ok(requests) => self.send(requests).await,
            Err(e) => Err(e),
        };
        match sent {
            Ok(()) => self.read_commit(ask).await,
            Err(e) => CommitReply::of(Err(e)),
        }
    }

    /// Writes the messages of [`commit_between`](Self::commit_between) (after whatever is
    /// already in the write buffer) and returns how many requests they are.
    pub(crate) fn write_commit(&mut self, ask: CommitAsk<'_>) -> Result<usize> {
        let buf = &mut self.stream.write_buf;
        if let Some(sql) = ask.before {
            frontend::query(buf, sql)?;
        }
        frontend::query(buf, "COMMIT")?;
        if let Some(sql) = ask.after {
            frontend::query(buf, sql)?;
        }
        Ok(1 + usize::from(ask.before.is_some()) + usize::from(ask.after.is_some()))
    }

    /// Reads the replies to what [`write_commit`](Self::write_commit) wrote.
    pub(crate) async fn read_commit(&mut self, ask: CommitAsk<'_>) -> CommitReply {
        let traced = self.trace("COMMIT");
        let before = match ask.before {
            Some(_) => Some(self.read_one_value().await),
            None => None,
        };
        let commit = self.read_command_reply().await;
        let after = match ask.after {
            Some(_) if !self.is_broken() => Some(self.read_one_value().await),
            _ => None,
        };
        match &commit {
            Ok(_) => traced.succeeded(0),
            Err(e) => traced.failed(e),
        }
        CommitReply {
            before,
            commit,
            after,
        }
    }

    /// Reads the reply to a statement that returns (at most) one value, as text.
    async fn read_one_value(&mut self) -> Result<Option<String>> {
        let mut value = None;
        let mut response = Response::new(Shape::Simple);
        loop {
            match self.next_step(&mut response).await? {
                Step::Row(data) => {
                    if let Some(raw) = data.value(0) {
                        value = Some(String::from_utf8_lossy(raw).into_owned());
                    }
                }
                Step::Message(
                    BackendMessage::RowDescription(_) | BackendMessage::EmptyQueryResponse,
                )
                | Step::Complete(_)
                | Step::Failed => {}
                Step::Over => break,
                other => return Err(self.unexpected_step(other, "a one-value query")),
            }
        }
        response.finish().map(|()| value)
    }

    /// Reads the reply to a command: what its tag said, or the server's error once the
    /// connection is ready again.
    async fn read_command_reply(&mut self) -> Result<Option<Completion>> {
        self.read_commands_reply().await.map_err(|(e, _)| e)
    }

    /// Reads the reply to a Query of one or more commands: what the last tag said, or the
    /// first error once the connection is ready again, with how many commands had completed
    /// before it if the server sent it (`None` for the connection's own errors).
    async fn read_commands_reply(
        &mut self,
    ) -> std::result::Result<Option<Completion>, (Error, Option<usize>)> {
        let mut response = Response::new(Shape::Command);
        let mut tag = None;
        let mut completed = 0;
        let mut failed_at = None;
        // One future for the whole reply, not one per message: this is every savepoint's
        // and transaction command's wait.
        poll_fn(|cx| {
            loop {
                match ready!(self.poll_step(&mut response, cx))? {
                    Step::Complete(done) => {
                        completed += 1;
                        tag = Some(done);
                    }
                    Step::Failed => {
                        failed_at.get_or_insert(completed);
                    }
                    Step::Message(BackendMessage::EmptyQueryResponse) => {}
                    Step::Over => return Poll::Ready(Ok(())),
                    other => return Poll::Ready(Err(self.unexpected_step(other, "a command"))),
                }
            }
        })
        .await
        .map_err(|e| (e, None))?;
        response.finish().map(|()| tag).map_err(|e| (e, failed_at))
    }
}

/// Commands deferred to go out in front of the next request, and their error once read (see
/// [`Connection::defer_command`]).
#[derive(Default)]
pub(super) struct Deferred {
    /// Their SQL texts, joined by `; `.
    pub(super) sql: String,
    pub(super) count: usize,
    /// The Query message that carries them, written by `send` (a buffer kept for reuse).
    pub(super) message: bytes::BytesMut,
    pub(super) failed: Option<Error>,
}

/// The most commands deferred at once: past it, [`Connection::defer_command`] says to send
/// them on their own first.
const MAX_DEFERRED: usize = 64;

/// What [`Connection::commit_between`] asks around a COMMIT.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CommitAsk<'a> {
    pub(crate) before: Option<&'a str>,
    pub(crate) after: Option<&'a str>,
}

/// What came back from [`Connection::commit_between`]: `before` and `after` are `None` when
/// not asked or not read (the connection was lost first).
pub(crate) struct CommitReply {
    pub(crate) before: Option<Result<Option<String>>>,
    pub(crate) commit: Result<Option<Completion>>,
    pub(crate) after: Option<Result<Option<String>>>,
}

impl CommitReply {
    /// The reply of a plain COMMIT.
    pub(crate) fn of(commit: Result<Option<Completion>>) -> CommitReply {
        CommitReply {
            before: None,
            commit,
            after: None,
        }
    }
}
