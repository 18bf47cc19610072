//! The socket under one connection, with its read and write buffers.
//!
//! Reads are large: the buffer asks the socket for everything it has (with at least 64 KiB of
//! room while the server sends more than the last read could take) instead of one message at
//! a time, because a reader that wakes for every 8 KiB packet makes the server pay a wake-up
//! per packet (measured: it made a client that only counted rows slower than one that
//! decoded them). Writes are batched: callers encode a whole pipeline into
//! `write_buf` and [`MessageStream::flush`] sends it with one `write_all`.
//!
//! How bytes move between the buffers and the socket — the readability-only registration and
//! the short wait for more rows before sleeping — is `socket.rs`'s business, measured there.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use std::sync::Arc;

use super::response::Completion;
use super::socket::{AskAgain, STREAM_SPIN, Socket};
use crate::error::{Error, Result};
use crate::protocol::{self, BackendMessage, DataRow, RowLayout, TransactionStatus};
use crate::row::{Block, Column, Row, RowPlace, column_count_mismatch};

/// How much free room the read buffer has before a read that follows a read which filled
/// all the room it had (the server is sending a lot).
const READ_CHUNK: usize = 64 * 1024;
/// How much free room is enough after a read that emptied the socket: rows handed out share
/// the buffer, so asking for a full chunk of room after every small answer would allocate a
/// new buffer per read.
const MIN_READ_ROOM: usize = 8 * 1024;
/// The most a single read reserves for a long message; the rest is reserved as it arrives, so a
/// length prefix alone (up to the configured limit) never makes us allocate.
const MAX_RESERVE: usize = 1 << 20;
/// The most rows [`MessageStream::take_data_rows`] takes at once: enough to make a block's
/// own cost small against its rows', few enough that noting their places takes little memory.
const BLOCK_ROWS: usize = 128;
/// What the write buffer starts with, and the most it keeps between requests: a request that
/// needed more (a large parameter) gives the rest back once it is sent or refused.
const WRITE_KEEP: usize = 8 * 1024;

/// A socket that reads and writes whole protocol messages.
#[derive(Debug)]
pub(crate) struct MessageStream {
    socket: Socket,
    read_buf: BytesMut,
    /// Messages waiting to be sent by the next [`MessageStream::flush`].
    pub(crate) write_buf: BytesMut,
    max_message_len: usize,
    /// The last message read was a DataRow: the server is most likely sending more rows.
    streaming: bool,
    /// Whether a wait for rows (or, with `busy_poll`, for any answer) asks the socket again
    /// before sleeping.
    ask_again: AskAgain,
    /// How long a wait for an answer asks the socket again before sleeping, when the caller
    /// chose to ([`Connection::set_busy_poll`](super::Connection::set_busy_poll)).
    busy_poll: Option<std::time::Duration>,
    /// The last read filled all the room it was given: the next gets a full chunk.
    last_read_full: bool,
    /// Something that outlives its transaction in the session (a setting, a channel, a
    /// cursor, …) has been changed since [`MessageStream::clear_session_changed`]: a statement
    /// that does so was sent, or a command tag or a ParameterStatus showed it.
    session_changed: bool,
    /// A SQL `PREPARE` has completed since [`MessageStream::clear_session_changed`].
    sql_prepared: bool,
    /// `DISCARD ALL` or `DEALLOCATE ALL` completed: the statement cache's statements are gone.
    statements_dropped: bool,
    /// The read buffer grew past [`READ_CHUNK`] for a long message or a backlog: it is
    /// replaced by a fresh one once it is empty (see [`MessageStream::release_memory`]).
    read_buf_grown: bool,
    /// Where [`MessageStream::take_data_rows`] notes the rows it found.
    row_places: Vec<RowPlace>,
}

/// Whether a command with this tag changes the session for whoever uses the connection next:
/// a setting (`SET`; `SET LOCAL` has the same tag and is harmless to undo), a channel, a
/// cursor (which may be held past its transaction), a SQL prepared statement, a loaded
/// library. The statement's text was read before it was sent (`crate::sql::effects`); the
/// tag catches what that missed.
fn changes_session(tag: &[u8]) -> bool {
    // Most tags (INSERT, UPDATE, COMMIT, …) are told apart by their first letter.
    if !matches!(tag.first(), Some(b'S' | b'R' | b'L' | b'U' | b'D' | b'P')) {
        return false;
    }
    matches!(
        tag,
        b"SET"
            | b"RESET"
            | b"LISTEN"
            | b"UNLISTEN"
            | b"DECLARE CURSOR"
            | b"PREPARE"
            | b"DEALLOCATE"
            | b"DEALLOCATE ALL"
            | b"LOAD"
    ) || tag.starts_with(b"DISCARD")
}

/// The length field and the tag of the CommandComplete at the front of `buf`, if it is whole
/// and well formed (anything else is left for the general read path and its errors).
#[inline(always)]
fn command_complete(buf: &[u8], max_message_len: usize) -> Option<(usize, &[u8])> {
    if buf.first() != Some(&b'C') {
        return None;
    }
    let len = protocol::frame_len(buf, max_message_len).ok()??;
    Some((len, protocol::command_tag(buf.get(5..1 + len)?)?))
}

/// Whether a command with this tag changed the session ([`changes_session`]), noting in
/// `sql_prepared` a SQL `PREPARE` and in `statements_dropped` a `DISCARD ALL` or
/// `DEALLOCATE ALL`.
#[inline(always)]
fn note_session_change(tag: &[u8], sql_prepared: &mut bool, statements_dropped: &mut bool) -> bool {
    if !changes_session(tag) {
        return false;
    }
    *sql_prepared |= tag == b"PREPARE";
    *statements_dropped |= matches!(tag, b"DISCARD ALL" | b"DEALLOCATE ALL");
    true
}

/// Whether the poll is a wait: someone will be woken when more comes. The connection's looks
/// at what has already arrived — an idle connection's check before the pool hands it out, a
/// COPY's check for the server's error between two writes, the rest of an abandoned request —
/// poll with a waker that wakes nobody, and must not wait by asking the socket again (nor
/// count as a wait that asking did not pay for).
fn someone_waits(cx: &Context<'_>) -> bool {
    !cx.waker().will_wake(futures::task::noop_waker_ref())
}

impl MessageStream {
    pub(crate) fn new(socket: Socket, max_message_len: usize) -> MessageStream {
        MessageStream {
            socket,
            read_buf: BytesMut::with_capacity(READ_CHUNK),
            write_buf: BytesMut::with_capacity(WRITE_KEEP),
            max_message_len,
            streaming: false,
            ask_again: AskAgain::default(),
            busy_poll: None,
            last_read_full: true,
            row_places: Vec::new(),
            session_changed: false,
            sql_prepared: false,
            statements_dropped: false,
            read_buf_grown: false,
        }
    }

    /// How long a wait for an answer asks the socket again before it sleeps; `None` (the
    /// default) sleeps at once, as every wait but one for streamed rows does.
    pub(crate) fn set_busy_poll(&mut self, limit: Option<std::time::Duration>) {
        self.busy_poll = limit.filter(|limit| !limit.is_zero());
    }

    /// Gives back what a large request made the buffers take: a read buffer that grew is
    /// replaced once it is empty (rows handed out keep their own part of the old one alive
    /// only as long as they live), and an empty write buffer past [`WRITE_KEEP`] is too. Called
    /// when a request ends and when one is refused before sending, so an idle connection holds
    /// [`READ_CHUNK`] + [`WRITE_KEEP`] at most.
    #[inline]
    pub(crate) fn release_memory(&mut self) {
        if self.read_buf_grown || self.write_buf.capacity() > WRITE_KEEP {
            self.release_grown_buffers();
        }
    }

    #[cold]
    fn release_grown_buffers(&mut self) {
        if self.read_buf_grown && self.read_buf.is_empty() {
            self.read_buf = BytesMut::with_capacity(READ_CHUNK);
            self.read_buf_grown = false;
        }
        if self.write_buf.is_empty() && self.write_buf.capacity() > WRITE_KEEP {
            self.write_buf = BytesMut::with_capacity(WRITE_KEEP);
        }
    }

    /// Puts `messages` in front of what `write_buf` holds, to go out in the same write.
    pub(crate) fn prepend_write(&mut self, messages: &[u8]) {
        let held = self.write_buf.len();
        self.write_buf.extend_from_slice(messages);
        self.write_buf.copy_within(..held, messages.len());
        self.write_buf[..messages.len()].copy_from_slice(messages);
    }

    /// Takes back what was written into `write_buf` from `mark` on (a message that could not
    /// be finished, a value that was refused).
    pub(crate) fn undo_write(&mut self, mark: usize) {
        self.write_buf.truncate(mark);
        self.release_memory();
    }

    /// The capacities of the read and write buffers, in bytes (what a connection holds besides
    /// the rows it handed out).
    pub(crate) fn buffer_capacity(&self) -> (usize, usize) {
        (self.read_buf.capacity(), self.write_buf.capacity())
    }

    /// Forgets the commands that changed the session (once it has been put back).
    pub(crate) fn clear_session_changed(&mut self) {
        self.session_changed = false;
        self.sql_prepared = false;
    }

    /// Records that the session was changed (a statement that changes it is being sent, or
    /// the server reported a new parameter value).
    pub(crate) fn note_session_change(&mut self) {
        self.session_changed = true;
    }

    /// Whether a SQL `PREPARE` completed since [`MessageStream::clear_session_changed`].
    pub(crate) fn sql_prepared(&self) -> bool {
        self.sql_prepared
    }

    /// Whether `DISCARD ALL` or `DEALLOCATE ALL` completed since the last call.
    pub(crate) fn take_statements_dropped(&mut self) -> bool {
        std::mem::take(&mut self.statements_dropped)
    }

    fn note_tag(&mut self, tag: &[u8]) {
        self.session_changed |=
            note_session_change(tag, &mut self.sql_prepared, &mut self.statements_dropped);
    }

    /// Whether a command that changes the session has completed since
    /// [`MessageStream::clear_session_changed`] was last called.
    pub(crate) fn session_changed(&self) -> bool {
        self.session_changed
    }

    /// Sends everything in `write_buf`, reading nothing meanwhile: for exchanges where the
    /// server answers only once it has read everything (startup, a CancelRequest, Terminate).
    /// A request's messages go through `Connection::flush`, which reads while it waits.
    pub(crate) async fn flush(&mut self) -> Result<()> {
        poll_fn(|cx| self.poll_send(cx)).await
    }

    /// Writes as much of `write_buf` as the socket takes now; ready once all of it has gone
    /// (TLS records included). On an error the rest is dropped: the stream is broken anyway.
    pub(crate) fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let sent = loop {
            if self.write_buf.is_empty() {
                if matches!(self.socket, Socket::Tls(_)) {
                    // TLS may keep the last record in its own buffer until flushed.
                    break ready!(Pin::new(&mut self.socket).poll_flush(cx));
                }
                break Ok(());
            }
            match ready!(Pin::new(&mut self.socket).poll_write(cx, &self.write_buf)) {
                Ok(0) => break Err(io::Error::from(io::ErrorKind::WriteZero)),
                // All of it in one go, as a request that fits the socket's buffer goes.
                Ok(n) if n == self.write_buf.len() => self.write_buf.clear(),
                Ok(n) => self.write_buf.advance(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.write_buf.clear();
        self.release_memory();
        Poll::Ready(sent.map_err(|e| Error::io("could not send data to the server", e)))
    }

    /// Reads what the socket has into the read buffer, without decoding: for a writer the
    /// server waits on (see `Connection::flush`).
    pub(crate) fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.poll_fill(cx, false)
    }

    /// The first byte in the read buffer: the tag of the next message, whole or not.
    #[inline]
    pub(crate) fn next_tag(&self) -> Option<u8> {
        self.read_buf.first().copied()
    }

    /// The tag of the next message, if it is whole in the read buffer.
    pub(crate) fn next_whole_tag(&self) -> Option<u8> {
        if self.has_whole_message() {
            self.read_buf.first().copied()
        } else {
            None
        }
    }

    /// Reads the next message, waiting for the socket as needed.
    pub(crate) async fn read_message(&mut self) -> Result<BackendMessage> {
        poll_fn(|cx| self.poll_message(cx)).await
    }

    /// Polls for the next message: decodes one from the buffer if it is all there, otherwise
    /// reads more. Cancel-safe: bytes already read stay in the buffer.
    #[inline]
    pub(crate) fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Result<BackendMessage>> {
        loop {
            if let Some(msg) = self.take_message()? {
                return Poll::Ready(Ok(msg));
            }
            ready!(self.poll_fill(cx, true))?;
        }
    }

    /// Decodes the next message if it is whole in the buffer; no I/O.
    #[inline]
    pub(crate) fn take_message(&mut self) -> Result<Option<BackendMessage>> {
        let Some(msg) = protocol::read_message(&mut self.read_buf, self.max_message_len)? else {
            return Ok(None);
        };
        self.streaming = matches!(msg, BackendMessage::DataRow(_));
        if let BackendMessage::CommandComplete(tag) = &msg {
            self.note_tag(tag);
        }
        Ok(Some(msg))
    }

    /// Reads more of the response from the socket into the read buffer (a reader in the middle
    /// of a result's rows may ask an empty socket again before it sleeps).
    #[inline]
    pub(crate) fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.poll_fill(cx, true)
    }

    /// Takes the next message if it is a DataRow that is whole in the buffer already. The rows
    /// of a result arrive back to back, and taking them here spares each one the general read
    /// path, which must look out for notices, status reports and ReadyForQuery.
    #[inline]
    pub(crate) fn take_data_row(&mut self) -> Result<Option<DataRow>> {
        if self.read_buf.first() != Some(&b'D') {
            return Ok(None);
        }
        match protocol::split_frame(&mut self.read_buf, self.max_message_len)? {
            Some((_, body)) => {
                self.streaming = true;
                DataRow::decode(body).map(Some)
            }
            None => Ok(None),
        }
    }

    /// Takes every DataRow whole at the front of the buffer (up to [`BLOCK_ROWS`] of them),
    /// handing each row to `each` (see [`Block::rows`]). False if the next message is not a
    /// whole DataRow. Each row's layout is checked, and its column count
    /// against `columns`: a bad row fails the call that finds it first.
    pub(crate) fn take_data_rows(
        &mut self,
        columns: &Arc<[Column]>,
        each: impl FnMut(Row),
    ) -> Result<bool> {
        let buf = &self.read_buf[..];
        if buf.first() != Some(&b'D') {
            // Most calls: a statement without rows, or the rows' end.
            return Ok(false);
        }
        self.row_places.clear();
        let mut pos = 0;
        while buf.get(pos) == Some(&b'D') && self.row_places.len() < BLOCK_ROWS {
            // The rows before a bad one are handed out first, as one at a time they would be;
            // the next call finds it first, and fails.
            let len = match protocol::frame_len(&buf[pos..], self.max_message_len) {
                Ok(Some(len)) => len,
                Ok(None) => break,
                Err(_) if pos > 0 => break,
                Err(e) => return Err(e),
            };
            let end = pos + 1 + len;
            let Some(body) = buf.get(pos + 5..end) else {
                break;
            };
            let layout = match RowLayout::check(body) {
                Ok(layout) if layout.len() == columns.len() => layout,
                _ if pos > 0 => break,
                Ok(layout) => return Err(column_count_mismatch(layout.len(), columns.len())),
                Err(e) => return Err(e),
            };
            // The body's places are after the column count.
            self.row_places.push(RowPlace {
                start: pos + 7,
                end,
                layout,
            });
            pos = end;
        }
        if pos == 0 {
            return Ok(false);
        }
        self.streaming = true;
        let bytes = self.read_buf.split_to(pos).freeze();
        Block::rows(columns, bytes, &self.row_places, each);
        Ok(true)
    }

    /// Takes a BindComplete if it is next in the buffer (a cached statement's answer starts
    /// with one).
    pub(crate) fn take_bind_complete(&mut self) -> bool {
        if !self.read_buf.starts_with(&[b'2', 0, 0, 0, 4]) {
            return false;
        }
        self.read_buf.advance(5);
        self.streaming = false;
        true
    }

    /// Takes a ReadyForQuery if it is next in the buffer, whole and well formed, and returns
    /// its status. Anything unusual is left for the general read path and its errors.
    #[inline]
    pub(crate) fn take_ready_for_query(&mut self) -> Option<TransactionStatus> {
        let [b'Z', 0, 0, 0, 5, byte, ..] = self.read_buf[..] else {
            return None;
        };
        let status = TransactionStatus::from_byte(byte)?;
        self.read_buf.advance(6);
        self.streaming = false;
        Some(status)
    }

    /// Takes a CommandComplete if it is next in the buffer and well formed, and returns what
    /// matters of its tag. Anything unusual is left for the general read path and its errors.
    pub(crate) fn take_command_complete(&mut self) -> Option<Completion> {
        let (len, tag) = command_complete(&self.read_buf, self.max_message_len)?;
        let done = Completion::counted(tag);
        self.session_changed |=
            note_session_change(tag, &mut self.sql_prepared, &mut self.statements_dropped);
        self.read_buf.advance(1 + len);
        self.streaming = false;
        Some(done)
    }

    /// Takes a CommandComplete if it is next in the buffer and well formed, and returns its
    /// tag (for the simple protocol's results, which keep it). Anything unusual is left for
    /// the general read path and its errors.
    pub(crate) fn take_command_tag(&mut self) -> Option<bytes::Bytes> {
        let (len, tag) = command_complete(&self.read_buf, self.max_message_len)?;
        let tag_len = tag.len();
        self.session_changed |=
            note_session_change(tag, &mut self.sql_prepared, &mut self.statements_dropped);
        let frame = self.read_buf.split_to(1 + len).freeze();
        self.streaming = false;
        Some(frame.slice(5..5 + tag_len))
    }

    /// Whether a whole message is waiting in the read buffer (reading it needs no socket).
    pub(crate) fn has_whole_message(&self) -> bool {
        protocol::whole_frame(&self.read_buf, self.max_message_len).is_some()
    }

    /// Whether the read buffer holds whole messages up to a ReadyForQuery, among its first 64:
    /// the rest of the oldest request's answer can be read without the socket. (A malformed
    /// header is left to the reader, which says what is wrong with it.)
    pub(crate) fn has_whole_answer(&self) -> bool {
        let mut rest = &self.read_buf[..];
        for _ in 0..64 {
            match protocol::whole_frame(rest, self.max_message_len) {
                Some((b'Z', _)) => return true,
                Some((_, len)) => rest = &rest[1 + len..],
                None => return false,
            }
        }
        false
    }

    /// Reads one byte outside the message framing: the server's answer to SSLRequest.
    #[allow(dead_code)]
    pub(crate) async fn read_byte(&mut self) -> Result<u8> {
        if self.read_buf.is_empty() {
            poll_fn(|cx| self.poll_fill(cx, false)).await?;
        }
        let b = self.read_buf[0];
        let _ = self.read_buf.split_to(1);
        Ok(b)
    }

    /// Reads more bytes from the socket into the read buffer; `may_ask_again` lets a reader in
    /// the middle of a result's rows ask an empty socket again before it sleeps.
    fn poll_fill(&mut self, cx: &mut Context<'_>, may_ask_again: bool) -> Poll<Result<()>> {
        // If a long message is partly here, make room for (a bounded part of) the rest of it.
        let want = match protocol::frame_len(&self.read_buf, self.max_message_len)? {
            Some(len) => (1 + len)
                .saturating_sub(self.read_buf.len())
                .min(MAX_RESERVE),
            None => 0,
        };
        if self.read_buf.is_empty() {
            // Nothing buffered: go back to the front of the buffer (unless rows handed out
            // still share it), so every read lands in the same memory, still in cache.
            let _ = self.read_buf.try_reclaim(self.read_buf.capacity() + 1);
        }
        let room = if self.last_read_full {
            READ_CHUNK
        } else {
            MIN_READ_ROOM
        };
        let reserve = want.max(room);
        if self.read_buf.capacity() - self.read_buf.len() < reserve
            && self.read_buf.len() + reserve > READ_CHUNK
        {
            // Past the usual size: a long message, or answers piling up while a request is
            // written. Given back once drained (release_memory).
            self.read_buf_grown = true;
        }
        self.read_buf.reserve(reserve);
        let dst = self.read_buf.chunk_mut();
        // SAFETY: `chunk_mut` is the buffer's spare capacity; ReadBuf only hands it to the
        // socket to write into and tracks how much was initialised and filled.
        let dst = unsafe { dst.as_uninit_slice_mut() };
        let mut rb = ReadBuf::uninit(dst);
        let mut polled = Pin::new(&mut self.socket).poll_read(cx, &mut rb);
        // Rows that stream in are asked for again (they come 8 KiB at a time); any other answer
        // only if the caller chose to busy-poll, and then for as long as it chose.
        let limit = if self.streaming {
            Some(self.busy_poll.unwrap_or_default().max(STREAM_SPIN))
        } else {
            self.busy_poll
        };
        if polled.is_pending()
            && may_ask_again
            && let Some(limit) = limit
            && someone_waits(cx)
            && self.ask_again.allowed()
        {
            // Still registered for the next readiness edge: if nothing comes in time, the
            // runtime wakes us as usual.
            let fruitless;
            (polled, fruitless) = self.socket.ask_again(&mut rb, limit);
            self.ask_again.record(fruitless);
        }
        ready!(polled).map_err(|e| Error::io("could not read from the server", e))?;
        let n = rb.filled().len();
        self.last_read_full = n == rb.capacity();
        if n == 0 {
            return Poll::Ready(Err(Error::closed(if self.read_buf.is_empty() {
                "the server closed the connection"
            } else {
                "the server closed the connection in the middle of a message"
            })));
        }
        // SAFETY: the socket initialised and filled the first `n` bytes of the spare capacity.
        unsafe { self.read_buf.advance_mut(n) };
        Poll::Ready(Ok(()))
    }

    /// Shuts the socket down (after Terminate has been flushed).
    pub(crate) async fn shutdown(&mut self) -> Result<()> {
        self.socket
            .shutdown()
            .await
            .map_err(|e| Error::io("could not close the socket", e))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::Duration;

    use super::*;

    /// A DataRow with one int4 column holding `n`.
    fn data_row(n: i32) -> Vec<u8> {
        let mut m = vec![b'D', 0, 0, 0, 14, 0, 1, 0, 0, 0, 4];
        m.extend_from_slice(&n.to_be_bytes());
        m
    }

    /// Our end of a socket pair as a message stream, and the server's end.
    fn pair() -> (MessageStream, std::os::unix::net::UnixStream) {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let socket = Socket::Unix(super::super::socket::ReadWatchedSocket::new(ours).unwrap());
        (MessageStream::new(socket, 1 << 20), theirs)
    }

    /// One int4 column, as a RowDescription would give it.
    fn int4_column() -> Arc<[Column]> {
        let field = protocol::FieldDescription {
            name: "n".into(),
            table_oid: 0,
            column_id: 0,
            type_oid: 23,
            type_size: 4,
            type_modifier: -1,
            format: 1,
        };
        Arc::from([Column::from_field(&field)])
    }

    #[tokio::test]
    async fn rows_whole_in_the_buffer_are_taken_together_in_order_and_stay_whole() {
        let (mut stream, _theirs) = pair();
        let columns = int4_column();
        // 300 rows (more than a block takes), then half a row.
        for n in 0..300 {
            stream.read_buf.extend_from_slice(&data_row(n));
        }
        stream.read_buf.extend_from_slice(&data_row(300)[..9]);
        let mut rows = Vec::new();
        let mut calls = 0;
        while stream
            .take_data_rows(&columns, |row| rows.push(row))
            .unwrap()
        {
            calls += 1;
        }
        assert_eq!(calls, 300_usize.div_ceil(BLOCK_ROWS));
        assert_eq!(
            stream.read_buf.len(),
            9,
            "the half row is left for the next read"
        );
        // The buffer's memory is used again for what comes next; the rows keep their own.
        stream.read_buf.clear();
        stream.read_buf.extend_from_slice(&[0xee; 4096]);
        for (row, n) in rows.iter().zip(0..) {
            assert_eq!(row.get::<_, i32>(0), n);
            assert_eq!(row.clone().raw(0), Some(&n.to_be_bytes()[..]));
        }
        drop(stream);
        let late: Vec<_> = rows.split_off(150);
        let thread =
            std::thread::spawn(move || late.iter().map(|r| r.get::<_, i32>(0)).sum::<i32>());
        drop(rows);
        assert_eq!(thread.join().unwrap(), (150..300).sum::<i32>());
    }

    #[tokio::test]
    async fn rows_taken_together_stop_before_a_bad_one_which_fails_the_next_take() {
        let columns = int4_column();
        let two_columns = [&b"D\0\0\0\x0e\0\x02\0\0\0\0\xff\xff\xff\xff"[..]].concat();
        let truncated = b"D\0\0\0\x0c\0\x01\0\0\0\x09\x01\x02".to_vec();
        for (bad, expected) in [
            (
                two_columns,
                "DataRow has 2 columns but RowDescription has 1",
            ),
            (truncated, "truncated"),
        ] {
            let (mut stream, _theirs) = pair();
            for n in 0..3 {
                stream.read_buf.extend_from_slice(&data_row(n));
            }
            stream.read_buf.extend_from_slice(&bad);
            stream.read_buf.extend_from_slice(&data_row(3));
            let mut rows = Vec::new();
            assert!(
                stream
                    .take_data_rows(&columns, |row| rows.push(row))
                    .unwrap()
            );
            let values: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
            assert_eq!(values, [0, 1, 2]);
            let e = stream
                .take_data_rows(&columns, |_| panic!("no row"))
                .unwrap_err();
            assert!(e.to_string().contains(expected), "{e}");
        }
    }

    #[tokio::test]
    async fn a_whole_answer_is_whole_messages_up_to_a_ready_for_query() {
        let (mut stream, _theirs) = pair();
        let bind_complete = [b'2', 0, 0, 0, 4];
        let complete = [&b"C\0\0\0\x0dSELECT 1\0"[..], &b"Z\0\0\0\x05I"[..]].concat();
        let mut answer = [&bind_complete[..], &data_row(7)].concat();
        answer.extend_from_slice(&complete);
        let whole = |stream: &mut MessageStream, bytes: &[u8]| {
            stream.read_buf.clear();
            stream.read_buf.extend_from_slice(bytes);
            stream.has_whole_answer()
        };
        assert!(whole(&mut stream, &answer));
        // Cut anywhere before its last byte, it is not.
        for cut in 0..answer.len() {
            assert!(!whole(&mut stream, &answer[..cut]), "cut at {cut}");
        }
        // Rows past the first 64 messages: not known to be whole (the driver hands over what
        // it read, which is never wrong).
        let mut long: Vec<u8> = (0..64).flat_map(data_row).collect();
        long.extend_from_slice(&complete);
        assert!(!whole(&mut stream, &long));
        assert!(whole(&mut stream, &long[data_row(0).len() * 2..]));
        // A malformed length is the reader's to report.
        assert!(!whole(&mut stream, b"D\0\0\0\x02Z\0\0\0\x05I"));
    }

    async fn next(stream: &mut MessageStream) -> BackendMessage {
        tokio::time::timeout(Duration::from_secs(60), stream.read_message())
            .await
            .expect("the reader never woke up")
            .unwrap()
    }

    /// Reads the rows `data_row` made of each number in `numbers`, in order.
    async fn expect_rows(stream: &mut MessageStream, numbers: std::ops::Range<i32>) {
        for n in numbers {
            match next(stream).await {
                BackendMessage::DataRow(row) => {
                    assert_eq!(row.value(0), Some(&n.to_be_bytes()[..]));
                }
                other => panic!("expected row {n}, got {other:?}"),
            }
        }
    }

    fn put(stream: &mut MessageStream, bytes: &[u8]) {
        stream.read_buf.clear();
        stream.read_buf.extend_from_slice(bytes);
    }

    #[tokio::test]
    async fn a_message_is_buffered_only_when_whole() {
        let (mut stream, _server) = pair();
        assert!(!stream.has_whole_message(), "empty");
        let complete = [b'C', 0, 0, 0, 11, b'S', b'E', b'L', b'E', b'C', b'T', 0];
        for cut in 0..complete.len() {
            put(&mut stream, &complete[..cut]);
            assert!(!stream.has_whole_message(), "{cut} bytes");
        }
        put(&mut stream, &complete);
        assert!(stream.has_whole_message());
        // A bad length is not a message (reading it reports the error).
        put(&mut stream, &[b'C', 0, 0, 0, 1, 0]);
        assert!(!stream.has_whole_message());
    }

    #[tokio::test]
    async fn bind_and_command_complete_are_taken_in_place_only_when_well_formed() {
        let (mut stream, _server) = pair();
        put(&mut stream, b"2\0\0\0\x04C");
        assert!(stream.take_bind_complete());
        assert_eq!(&stream.read_buf[..], b"C", "only the BindComplete is taken");
        put(&mut stream, b"2\0\0\0\x05x");
        assert!(
            !stream.take_bind_complete(),
            "a BindComplete with a body is malformed"
        );

        put(&mut stream, b"C\0\0\0\x10INSERT 0 12\0Z");
        assert_eq!(stream.take_command_complete().map(|c| c.rows()), Some(12));
        assert_eq!(&stream.read_buf[..], b"Z");
        // A COMMIT of a failed block is answered ROLLBACK: that much of the tag is kept.
        for (tag, rolled_back) in [("ROLLBACK", true), ("COMMIT", false), ("ROLLBACKS", false)] {
            let mut msg = vec![b'C', 0, 0, 0, 5 + tag.len() as u8];
            msg.extend_from_slice(tag.as_bytes());
            msg.push(0);
            put(&mut stream, &msg);
            let done = stream.take_command_complete().unwrap();
            assert_eq!(done.rolled_back(), rolled_back, "{tag}");
            assert_eq!(done.rows(), 0);
        }
        for malformed in [
            &b"C\0\0\0\x10INSERT 0 12x"[..], // no NUL
            b"C\0\0\0\x10INSE\0T 0 12\0",    // a NUL inside
            b"C\0\0\0\x10INSERT 0",          // not all here yet
            b"C\0\0\0\x03",                  // a length shorter than itself
            b"C\x7f\0\0\0",                  // a length past the limit
        ] {
            put(&mut stream, malformed);
            assert!(stream.take_command_complete().is_none(), "{malformed:?}");
            assert_eq!(&stream.read_buf[..], malformed, "left for the general path");
        }
    }

    #[tokio::test]
    async fn rows_that_come_late_still_wake_the_reader() {
        let (mut stream, mut server) = pair();
        const ROWS: i32 = 20;
        let sender = std::thread::spawn(move || {
            for n in 0..ROWS {
                // Far longer than the reader asks again before it sleeps.
                std::thread::sleep(Duration::from_millis(2));
                server.write_all(&data_row(n)).unwrap();
            }
            server.write_all(b"C\0\0\0\x0eSELECT 20\0").unwrap();
            server
        });
        expect_rows(&mut stream, 0..ROWS).await;
        assert!(matches!(
            next(&mut stream).await,
            BackendMessage::CommandComplete(_)
        ));
        assert!(!stream.streaming, "a CommandComplete ends the rows");
        drop(sender.join().unwrap());
    }

    #[tokio::test]
    async fn rows_sent_while_the_reader_asks_are_read() {
        let (mut stream, mut server) = pair();
        server.write_all(&data_row(0)).unwrap();
        assert!(matches!(
            next(&mut stream).await,
            BackendMessage::DataRow(_)
        ));
        // The next rows follow at once, each in its own write, as a server sends its packets.
        let sender = std::thread::spawn(move || {
            for n in 1..200i32 {
                server.write_all(&data_row(n)).unwrap();
            }
            server
        });
        expect_rows(&mut stream, 1..200).await;
        drop(sender.join().unwrap());
    }

    /// The waker of a reader that waits (not the no-op waker of a look); what a wake does
    /// does not matter here.
    struct Waiter;

    impl futures::task::ArcWake for Waiter {
        fn wake_by_ref(_: &std::sync::Arc<Self>) {}
    }

    /// Polls `stream` for more bytes once, as a reader that waits would: `Pending` means the
    /// reader went to sleep.
    fn poll_more_once(stream: &mut MessageStream) -> Poll<Result<()>> {
        let waker = futures::task::waker(std::sync::Arc::new(Waiter));
        stream.poll_more(&mut Context::from_waker(&waker))
    }

    /// Polls `stream` once as the connection's looks at what already arrived do, with a waker
    /// that wakes nobody.
    fn look_once(stream: &mut MessageStream) -> Poll<Result<()>> {
        let waker = futures::task::noop_waker();
        stream.poll_more(&mut Context::from_waker(&waker))
    }

    #[tokio::test]
    async fn with_busy_poll_an_answer_that_comes_while_the_reader_asks_needs_no_wake_up() {
        let (mut stream, mut server) = pair();
        // Far longer than the answer takes, so that asking again certainly finds it.
        stream.set_busy_poll(Some(Duration::from_secs(30)));
        let answer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(2));
            server.write_all(b"Z\0\0\0\x05I").unwrap();
            server
        });
        assert!(
            matches!(poll_more_once(&mut stream), Poll::Ready(Ok(()))),
            "the reader slept instead of asking again"
        );
        assert_eq!(stream.take_ready_for_query(), Some(TransactionStatus::Idle));
        let _server = answer.join().unwrap();
    }

    #[tokio::test]
    async fn without_busy_poll_or_with_nothing_coming_the_reader_sleeps() {
        // The default: the reader sleeps at once, and the runtime wakes it.
        let (mut stream, mut server) = pair();
        assert!(poll_more_once(&mut stream).is_pending());
        server.write_all(b"Z\0\0\0\x05I").unwrap();
        assert!(matches!(
            next(&mut stream).await,
            BackendMessage::ReadyForQuery(_)
        ));
        // Asking again ends at its limit when nothing comes.
        let (mut stream, _server) = pair();
        stream.set_busy_poll(Some(Duration::from_millis(5)));
        assert!(poll_more_once(&mut stream).is_pending());
        // A zero limit is no busy-poll.
        stream.set_busy_poll(Some(Duration::ZERO));
        assert!(stream.busy_poll.is_none());
    }

    #[tokio::test]
    async fn a_look_at_what_arrived_never_asks_again() {
        // An idle connection's check, a COPY's check for an error: with busy-poll on, and rows
        // streaming, they still take only what is there.
        let (mut stream, mut server) = pair();
        stream.set_busy_poll(Some(Duration::from_secs(30)));
        server.write_all(&data_row(0)).unwrap();
        assert!(matches!(
            next(&mut stream).await,
            BackendMessage::DataRow(_)
        ));
        assert!(stream.streaming);
        let later = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            server.write_all(&data_row(1)).unwrap();
            server
        });
        assert!(
            look_once(&mut stream).is_pending(),
            "a look waited for what had not arrived"
        );
        let mut server = later.join().unwrap();
        expect_rows(&mut stream, 1..2).await;
        // Looks that found nothing are not waits in which asking did not pay: after many, a
        // real wait still asks again.
        for _ in 0..32 {
            assert!(look_once(&mut stream).is_pending());
        }
        let answer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(2));
            server.write_all(&data_row(2)).unwrap();
            server
        });
        assert!(
            matches!(poll_more_once(&mut stream), Poll::Ready(Ok(()))),
            "looks paused asking again"
        );
        expect_rows(&mut stream, 2..3).await;
        let _server = answer.join().unwrap();
    }
}
