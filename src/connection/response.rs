//! The one reader of a request's response: what each backend message means for the request
//! in flight, which error wins, and when the request is over. Pure — messages in, steps out;
//! no I/O, no clock — so that the fuzz target and a proptest can drive it.
//!
//! Every request the connection sends ends with exactly one ReadyForQuery per Sync (or per
//! simple Query), and is read through a [`Response`] of the request's [`Shape`]:
//!
//! - [`Shape::Extended`]: extended-protocol statements up to one Sync (a query, an `Atomic`'s
//!   pipeline, a portal's Execute): per statement CloseComplete, ParseComplete,
//!   ParameterDescription, RowDescription or NoData, BindComplete, rows, and a completion
//!   (CommandComplete, EmptyQueryResponse, PortalSuspended); after an error the server skips
//!   to the Sync (§55.2.3).
//! - [`Shape::Describe`]: Parse, Describe and Sync: a statement's description, no execution.
//! - [`Shape::Simple`]: a simple Query (§55.2.2): any number of statements, each with a
//!   RowDescription, rows and CommandComplete, an EmptyQueryResponse, an error, or a COPY's
//!   messages.
//! - [`Shape::Command`]: a simple Query of commands that return no rows (`BEGIN`,
//!   `SAVEPOINT`, `COMMIT`, …; one, or deferred savepoints and then one), read as
//!   [`Shape::Simple`] is, except that tags are read in place and not kept: only a row count
//!   and whether it says `ROLLBACK` are.
//! - [`Shape::Drain`]: the rest of a request nobody waits for any more: anything up to its
//!   ReadyForQuery is skipped.
//!
//! The rules, decided here and nowhere else:
//!
//! - **The first error wins.** The first ErrorResponse is the request's error; later ones
//!   (a statement after the failed one in a simple Query) are dropped. If the connection then
//!   fails before ReadyForQuery — PgBouncer in statement mode drops a client whose block
//!   failed — the server's error for the request is still the one reported.
//! - **The request is over at ReadyForQuery**, which may only come once the request has
//!   answered (a completion or an error, or a description for [`Shape::Describe`]): a
//!   ReadyForQuery before that is not ours.
//! - **Anything the shape does not allow** (a BindComplete in a simple Query, COPY data in an
//!   extended one, a second RowDescription where none can be) is a protocol error: the
//!   connection's byte stream can no longer be trusted.
//!
//! Notices, parameter changes and notifications can arrive at any time (§55.2.7) and never
//! reach a `Response`: the connection deals with them on the way.

use bytes::Bytes;

use crate::error::Error;
use crate::protocol::{BackendMessage, DataRow};

/// What a request sent, and so what its response may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    Extended,
    Describe,
    Simple,
    Command,
    Drain,
}

impl Shape {
    /// What the request is, for a protocol error's message.
    pub(crate) fn during(self) -> &'static str {
        match self {
            Shape::Extended => "an extended-protocol request",
            Shape::Describe => "Describe",
            Shape::Simple => "a simple query",
            Shape::Command => "a command",
            Shape::Drain => "the rest of an abandoned request",
        }
    }
}

/// What a message meant for the request.
#[derive(Debug)]
pub(crate) enum Step {
    /// A row of the current statement's result.
    Row(DataRow),
    /// A statement finished (CommandComplete).
    Complete(Completion),
    /// Any other message the shape allows (descriptions, BindComplete, EmptyQueryResponse,
    /// PortalSuspended, COPY messages), for the caller to read.
    Message(BackendMessage),
    /// The server refused a statement; the request's error is [`Response::error`] (the first
    /// one). The server goes on to the Sync (extended) or the next statement (simple).
    Failed,
    /// ReadyForQuery: the request is over ([`Response::finish`] gives its outcome).
    Over,
}

/// What a CommandComplete said: what matters of a tag read in place from the buffer, or the
/// tag itself (the simple protocol's results keep it).
#[derive(Debug)]
pub(crate) enum Completion {
    Counted { rows: u64, rolled_back: bool },
    Tag(Bytes),
}

impl Completion {
    /// What matters of `tag`, without keeping it.
    #[inline]
    pub(crate) fn counted(tag: &[u8]) -> Completion {
        Completion::Counted {
            rows: crate::row::rows_affected(tag),
            // The first letter first: most tags are not ROLLBACK, and `SELECT 1` is as long.
            rolled_back: tag.first() == Some(&b'R') && tag == b"ROLLBACK",
        }
    }

    /// The row count of the tag (`INSERT 0 5` → 5; 0 for a command without one).
    #[inline]
    pub(crate) fn rows(&self) -> u64 {
        match self {
            Completion::Counted { rows, .. } => *rows,
            Completion::Tag(tag) => crate::row::rows_affected(tag),
        }
    }

    /// Whether the tag is `ROLLBACK`: the server's answer to a COMMIT of a failed block.
    pub(crate) fn rolled_back(&self) -> bool {
        match self {
            Completion::Counted { rolled_back, .. } => *rolled_back,
            Completion::Tag(tag) => tag == "ROLLBACK",
        }
    }

    /// The tag, if it was kept.
    pub(crate) fn into_tag(self) -> Option<Bytes> {
        match self {
            Completion::Counted { .. } => None,
            Completion::Tag(tag) => Some(tag),
        }
    }
}

/// The state of one request's response: its shape, its first error, and whether it has
/// answered yet.
#[derive(Debug)]
pub(crate) struct Response {
    shape: Shape,
    error: Option<Error>,
    answered: bool,
}

impl Response {
    #[inline]
    pub(crate) fn new(shape: Shape) -> Response {
        Response {
            shape,
            error: None,
            answered: shape == Shape::Drain,
        }
    }

    /// The shape this response was opened with.
    #[inline]
    pub(crate) fn shape(&self) -> Shape {
        self.shape
    }

    /// Whether a DataRow may be taken in place (the shape has rows).
    #[inline]
    pub(crate) fn takes_rows(&self) -> bool {
        self.shape != Shape::Describe
    }

    /// The request's error so far: the first the server sent.
    #[inline]
    pub(crate) fn error(&self) -> Option<&Error> {
        self.error.as_ref()
    }

    /// Rewrites the request's error (to add what it means, e.g. a pooler's missing statement).
    pub(crate) fn map_error(&mut self, f: impl FnOnce(Error) -> Error) {
        self.error = self.error.take().map(f);
    }

    /// Records an error of the caller's for the request (a value that could not be decoded),
    /// unless the server's came first; the rest of the response is read, and it is the
    /// request's outcome.
    #[cold]
    pub(crate) fn fail_with(&mut self, error: Error) {
        self.error.get_or_insert(error);
        self.answered = true;
    }

    /// Takes a message of the response. `Err` gives back a message the shape does not allow.
    #[inline]
    pub(crate) fn accept(
        &mut self,
        msg: BackendMessage,
    ) -> std::result::Result<Step, BackendMessage> {
        use BackendMessage as M;
        let extended = matches!(self.shape, Shape::Extended | Shape::Describe);
        let step = match msg {
            M::ReadyForQuery(_) if self.accepts_ready() => return Ok(Step::Over),
            M::ErrorResponse(db) => {
                self.error.get_or_insert_with(|| Error::db(db));
                self.answered = true;
                Step::Failed
            }
            _ if self.shape == Shape::Drain => Step::Message(msg),
            M::DataRow(row) if self.shape != Shape::Describe => Step::Row(row),
            M::CommandComplete(tag) if self.shape != Shape::Describe => {
                self.answered = true;
                Step::Complete(Completion::Tag(tag))
            }
            M::EmptyQueryResponse if self.shape != Shape::Describe => {
                self.answered = true;
                Step::Message(msg)
            }
            M::PortalSuspended if self.shape == Shape::Extended => {
                self.answered = true;
                Step::Message(msg)
            }
            M::RowDescription(_) | M::NoData if self.shape == Shape::Describe => {
                self.answered = true;
                Step::Message(msg)
            }
            M::RowDescription(_) if self.shape != Shape::Describe => Step::Message(msg),
            M::ParseComplete
            | M::BindComplete
            | M::CloseComplete
            | M::ParameterDescription(_)
            | M::NoData
                if extended =>
            {
                Step::Message(msg)
            }
            M::CopyInResponse(_) | M::CopyOutResponse(_) | M::CopyData(_) | M::CopyDone
                if matches!(self.shape, Shape::Simple | Shape::Command) =>
            {
                Step::Message(msg)
            }
            other => return Err(other),
        };
        Ok(step)
    }

    /// Whether a ReadyForQuery is this request's: it is once the request has answered. (The
    /// fast path for what `accept` makes of one: `Step::Over` if so, else not ours.)
    #[inline]
    pub(crate) fn accepts_ready(&self) -> bool {
        self.answered
    }

    /// Takes a row found whole in the read buffer (the fast path for what `accept` makes of a
    /// DataRow), for a shape that [takes rows](Self::takes_rows).
    #[inline]
    pub(crate) fn accept_row(&mut self, row: DataRow) -> Step {
        debug_assert!(self.takes_rows());
        Step::Row(row)
    }

    /// Takes a CommandComplete read in place (the fast path; only for shapes that do not keep
    /// the tag).
    #[inline]
    pub(crate) fn accept_count(&mut self, done: Completion) -> Step {
        debug_assert!(self.takes_counts());
        self.answered = true;
        Step::Complete(done)
    }

    /// Whether a CommandComplete may be read in place, without its tag.
    #[inline]
    pub(crate) fn takes_counts(&self) -> bool {
        matches!(self.shape, Shape::Extended | Shape::Command | Shape::Drain)
    }

    /// Whether a BindComplete may be taken in place.
    #[inline]
    pub(crate) fn takes_bind_complete(&self) -> bool {
        matches!(self.shape, Shape::Extended | Shape::Drain)
    }

    /// The connection failed with `e` before the request was over: the error to report. The
    /// server's own error for the request wins over the connection's (the server refused the
    /// request, then the session ended); an error of ours (a timeout) gives way to the
    /// connection's fuller story.
    #[cold]
    pub(crate) fn lost(&mut self, e: Error) -> Error {
        match self.error.take() {
            Some(first) if first.kind() == crate::ErrorKind::Db => first,
            _ => e,
        }
    }

    /// The request's outcome once it is over: its first error, if any.
    pub(crate) fn finish(self) -> crate::Result<()> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Takes the request's error (for a caller that reports it itself).
    pub(crate) fn take_error(&mut self) -> Option<Error> {
        self.error.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::SqlState;
    use crate::protocol::TransactionStatus;
    use proptest::prelude::*;

    fn db(code: SqlState) -> BackendMessage {
        let mut body = Vec::new();
        for (t, v) in [
            (b'S', "ERROR"),
            (b'V', "ERROR"),
            (b'C', code.as_str()),
            (b'M', "m"),
        ] {
            body.push(t);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        BackendMessage::decode(b'E', Bytes::from(body)).unwrap()
    }

    fn ready() -> BackendMessage {
        BackendMessage::ReadyForQuery(TransactionStatus::Idle)
    }

    fn complete(tag: &'static str) -> BackendMessage {
        BackendMessage::CommandComplete(Bytes::from_static(tag.as_bytes()))
    }

    #[test]
    fn the_first_error_wins_and_the_request_ends_at_ready_for_query() {
        let mut r = Response::new(Shape::Simple);
        assert!(matches!(
            r.accept(db(SqlState::UNDEFINED_TABLE)),
            Ok(Step::Failed)
        ));
        assert!(matches!(
            r.accept(db(SqlState::DIVISION_BY_ZERO)),
            Ok(Step::Failed)
        ));
        assert!(matches!(r.accept(ready()), Ok(Step::Over)));
        assert_eq!(
            r.finish().unwrap_err().code(),
            Some(&SqlState::UNDEFINED_TABLE)
        );
    }

    #[test]
    fn ready_for_query_before_an_answer_is_not_ours() {
        for shape in [
            Shape::Extended,
            Shape::Simple,
            Shape::Command,
            Shape::Describe,
        ] {
            let mut r = Response::new(shape);
            assert!(r.accept(ready()).is_err(), "{shape:?}");
        }
        let mut r = Response::new(Shape::Drain);
        assert!(matches!(r.accept(ready()), Ok(Step::Over)));
        let mut r = Response::new(Shape::Extended);
        assert!(matches!(
            r.accept(BackendMessage::BindComplete),
            Ok(Step::Message(_))
        ));
        match r.accept(complete("SELECT 1")) {
            Ok(Step::Complete(c)) => assert_eq!(c.rows(), 1),
            other => panic!("{other:?}"),
        }
        assert!(matches!(r.accept(ready()), Ok(Step::Over)));
        assert!(r.finish().is_ok());
    }

    #[test]
    fn each_shape_refuses_what_its_request_cannot_bring() {
        let mut r = Response::new(Shape::Simple);
        assert!(r.accept(BackendMessage::BindComplete).is_err());
        let mut r = Response::new(Shape::Extended);
        assert!(r.accept(BackendMessage::CopyDone).is_err());
        let mut r = Response::new(Shape::Describe);
        assert!(r.accept(complete("SELECT 1")).is_err());
        let mut r = Response::new(Shape::Simple);
        match r.accept(complete("INSERT 0 3")) {
            Ok(Step::Complete(done)) => {
                assert_eq!(done.rows(), 3);
                assert_eq!(&done.into_tag().unwrap()[..], b"INSERT 0 3");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_command_reads_whether_its_tag_said_rollback_on_either_path() {
        for (tag, rolled_back) in [("ROLLBACK", true), ("COMMIT", false)] {
            // The general path (a tag not whole in the buffer) keeps the tag.
            let mut r = Response::new(Shape::Command);
            let Ok(Step::Complete(done)) = r.accept(complete(tag)) else {
                panic!("{tag}");
            };
            assert_eq!(done.rolled_back(), rolled_back, "{tag}");
            // The fast path reads it in place.
            let mut r = Response::new(Shape::Command);
            assert!(r.takes_counts());
            let Step::Complete(done) = r.accept_count(Completion::counted(tag.as_bytes())) else {
                panic!("{tag}");
            };
            assert_eq!(done.rolled_back(), rolled_back, "{tag}");
            assert!(matches!(r.accept(ready()), Ok(Step::Over)));
        }
        // Still a simple query's rules: no extended-protocol messages.
        let mut r = Response::new(Shape::Command);
        assert!(r.accept(BackendMessage::BindComplete).is_err());
        assert!(
            !Response::new(Shape::Simple).takes_counts(),
            "a simple query keeps its tags"
        );
    }

    #[test]
    fn a_lost_connection_keeps_the_servers_error_for_the_request() {
        let mut r = Response::new(Shape::Extended);
        let _ = r.accept(db(SqlState::IN_FAILED_SQL_TRANSACTION));
        let e = r.lost(Error::closed("gone"));
        assert_eq!(e.code(), Some(&SqlState::IN_FAILED_SQL_TRANSACTION));
        let mut r = Response::new(Shape::Extended);
        r.fail_with(Error::timeout("slow"));
        assert_eq!(
            r.lost(Error::closed("gone")).kind(),
            crate::ErrorKind::Closed
        );
    }

    fn any_message() -> impl Strategy<Value = BackendMessage> {
        prop_oneof![
            Just(ready()),
            Just(BackendMessage::BindComplete),
            Just(BackendMessage::ParseComplete),
            Just(BackendMessage::CloseComplete),
            Just(BackendMessage::NoData),
            Just(BackendMessage::EmptyQueryResponse),
            Just(BackendMessage::PortalSuspended),
            Just(BackendMessage::CopyDone),
            Just(complete("SELECT 2")),
            Just(db(SqlState::T_R_SERIALIZATION_FAILURE)),
            Just(db(SqlState::UNIQUE_VIOLATION)),
        ]
    }

    proptest! {
        /// Model check: for any message sequence, the request is over exactly at the first
        /// ReadyForQuery that follows an answer, and its error is the first one sent.
        #[test]
        fn any_sequence_ends_where_the_model_says(
            shape in prop::sample::select(vec![Shape::Extended, Shape::Simple, Shape::Command, Shape::Describe, Shape::Drain]),
            msgs in prop::collection::vec(any_message(), 0..24),
        ) {
            let mut r = Response::new(shape);
            let mut answered = shape == Shape::Drain;
            let mut first_error: Option<SqlState> = None;
            for msg in msgs {
                let is_ready = matches!(msg, BackendMessage::ReadyForQuery(_));
                let error = match &msg {
                    BackendMessage::ErrorResponse(db) => Some(db.code().clone()),
                    _ => None,
                };
                let completes = match &msg {
                    BackendMessage::CommandComplete(_) | BackendMessage::EmptyQueryResponse => {
                        shape != Shape::Describe
                    }
                    BackendMessage::PortalSuspended => shape == Shape::Extended,
                    BackendMessage::NoData => shape == Shape::Describe,
                    _ => false,
                };
                match r.accept(msg) {
                    Ok(Step::Over) => {
                        prop_assert!(is_ready && answered);
                        let got = r.finish().err().and_then(|e| e.code().cloned());
                        prop_assert_eq!(got, first_error);
                        return Ok(());
                    }
                    Ok(_) => {
                        prop_assert!(!is_ready);
                        if let Some(code) = error {
                            first_error.get_or_insert(code);
                            answered = true;
                        }
                        answered |= completes;
                    }
                    Err(_) => {
                        prop_assert!(shape != Shape::Drain);
                        prop_assert!(!is_ready || !answered);
                        return Ok(());
                    }
                }
            }
        }
    }
}
