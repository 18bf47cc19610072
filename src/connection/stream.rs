//! The socket under one connection, with its read and write buffers.
//!
//! Reads are large: the buffer asks the socket for everything it has (at least 64 KiB of room)
//! instead of one message at a time, because a reader that wakes for every 8 KiB packet makes
//! the server pay a wake-up per packet (measured: it made a client that only counted rows
//! slower than one that decoded them). Writes are batched: callers encode a whole pipeline into
//! `write_buf` and [`MessageStream::flush`] sends it with one `write_all`.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::socket::ReadWatchedSocket;
use crate::error::{Error, Result};
use crate::protocol::{self, BackendMessage, DataRow};

/// How much free room the read buffer has before each read.
const READ_CHUNK: usize = 64 * 1024;
/// The most a single read reserves for a long message; the rest is reserved as it arrives, so a
/// length prefix alone (up to the configured limit) never makes us allocate.
const MAX_RESERVE: usize = 1 << 20;

/// Any byte stream a connection can run over, besides TCP and Unix sockets (an in-memory
/// pipe in tests and fuzzing, a tunnel).
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Transport for T {}

/// A TCP or Unix-domain socket, or another transport.
pub(crate) enum Socket {
    Tcp(ReadWatchedSocket<std::net::TcpStream>),
    Unix(ReadWatchedSocket<std::os::unix::net::UnixStream>),
    /// TLS over TCP (boxed: the session state is large, and plain sockets should stay small).
    Tls(Box<tokio_rustls::client::TlsStream<Socket>>),
    Other(Box<dyn Transport>),
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Socket::Tcp(s) => s.fmt(f),
            Socket::Unix(s) => s.fmt(f),
            Socket::Tls(s) => s.get_ref().0.fmt(f),
            Socket::Other(_) => f.write_str("Transport"),
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Tls(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Other(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Tls(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Other(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
            Socket::Tls(s) => Pin::new(s).poll_flush(cx),
            Socket::Other(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Tls(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Other(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A socket that reads and writes whole protocol messages.
#[derive(Debug)]
pub(crate) struct MessageStream {
    socket: Socket,
    read_buf: BytesMut,
    /// Messages waiting to be sent by the next [`MessageStream::flush`].
    pub(crate) write_buf: BytesMut,
    max_message_len: usize,
}

impl MessageStream {
    pub(crate) fn new(socket: Socket, max_message_len: usize) -> MessageStream {
        MessageStream {
            socket,
            read_buf: BytesMut::with_capacity(READ_CHUNK),
            write_buf: BytesMut::with_capacity(8 * 1024),
            max_message_len,
        }
    }

    /// Sends everything in `write_buf`.
    pub(crate) async fn flush(&mut self) -> Result<()> {
        if self.write_buf.is_empty() {
            return Ok(());
        }
        let mut r = self.socket.write_all(&self.write_buf).await;
        if r.is_ok() && matches!(self.socket, Socket::Tls(_)) {
            // TLS may keep the last record in its own buffer until flushed.
            r = self.socket.flush().await;
        }
        self.write_buf.clear();
        r.map_err(|e| Error::io("could not send data to the server", e))
    }

    /// Reads the next message, waiting for the socket as needed.
    pub(crate) async fn read_message(&mut self) -> Result<BackendMessage> {
        poll_fn(|cx| self.poll_message(cx)).await
    }

    /// Polls for the next message: decodes one from the buffer if it is all there, otherwise
    /// reads more. Cancel-safe: bytes already read stay in the buffer.
    pub(crate) fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Result<BackendMessage>> {
        loop {
            if let Some(msg) = protocol::read_message(&mut self.read_buf, self.max_message_len)? {
                return Poll::Ready(Ok(msg));
            }
            ready!(self.poll_fill(cx))?;
        }
    }

    /// Takes the next message if it is a DataRow that is whole in the buffer already. The rows
    /// of a result arrive back to back, and taking them here spares each one the general read
    /// path, which must look out for notices, status reports and ReadyForQuery.
    pub(crate) fn take_data_row(&mut self) -> Result<Option<DataRow>> {
        if self.read_buf.first() != Some(&b'D') {
            return Ok(None);
        }
        match protocol::split_frame(&mut self.read_buf, self.max_message_len)? {
            Some((_, body)) => DataRow::decode(body).map(Some),
            None => Ok(None),
        }
    }

    /// Reads one byte outside the message framing: the server's answer to SSLRequest.
    #[allow(dead_code)]
    pub(crate) async fn read_byte(&mut self) -> Result<u8> {
        if self.read_buf.is_empty() {
            poll_fn(|cx| self.poll_fill(cx)).await?;
        }
        let b = self.read_buf[0];
        let _ = self.read_buf.split_to(1);
        Ok(b)
    }

    /// Reads more bytes from the socket into the read buffer.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        // If a long message is partly here, make room for (a bounded part of) the rest of it.
        let want = match protocol::frame_len(&self.read_buf, self.max_message_len)? {
            Some(len) => (1 + len)
                .saturating_sub(self.read_buf.len())
                .min(MAX_RESERVE),
            None => 0,
        };
        self.read_buf.reserve(want.max(READ_CHUNK));
        let dst = self.read_buf.chunk_mut();
        // SAFETY: `chunk_mut` is the buffer's spare capacity; ReadBuf only hands it to the
        // socket to write into and tracks how much was initialised and filled.
        let dst = unsafe { dst.as_uninit_slice_mut() };
        let mut rb = ReadBuf::uninit(dst);
        ready!(Pin::new(&mut self.socket).poll_read(cx, &mut rb))
            .map_err(|e| Error::io("could not read from the server", e))?;
        let n = rb.filled().len();
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
