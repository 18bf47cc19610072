//! How bytes move between a connection and its socket: every I/O trick of the crate lives here,
//! with its reasoning and its measurement, and nothing else depends on them — a connection
//! over any other stream (`Socket::Other`: a tokio socket, TLS, an in-memory pipe) runs the
//! same code without them.
//!
//! **Readability-only registration.** tokio's own `TcpStream` and `UnixStream` register every
//! socket for reading *and* writing, edge-triggered. For a database client that costs a
//! wake-up per request: when the server reads our request, room opens in the socket's send
//! buffer, the kernel reports the socket writable, and the thread sleeping in `epoll_wait`
//! wakes up for nothing, only to sleep again until the answer comes. With client and server
//! on one core that wake-up also preempts the server in the middle of the query (measured:
//! two context switches per round trip instead of libpq's one, which polls for input alone).
//! So a TCP or Unix socket is registered for readability only, and a write is tried directly:
//! a non-blocking write into a socket buffer with room never needs the runtime. Only when the
//! buffer is full (a large COPY, a server that stopped reading) is a duplicate of the
//! descriptor registered for writability, for as long as the write waits, and deregistered as
//! soon as it goes through.
//!
//! **Asking again before sleeping.** While a result's rows stream in, an empty socket is asked
//! again for up to [`STREAM_SPIN`] (yielding the CPU between tries) before the reader sleeps:
//! waking a sleeping reader for each 8 KiB packet costs the server more than the rows did when
//! client and server run on two cores. It never holds a runtime worker for longer than that,
//! and stops itself where it does not pay ([`AskAgain`]). Any other answer is asked for again
//! only when the caller chose to (`Connection::set_busy_poll`), for as long as it chose: on two
//! cores that makes a point query's round trip 1.6–3× as fast (the wake-up of the idle core
//! is most of it), at the cost of a busy core and a runtime worker held while it asks.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// What a [`ReadWatchedSocket`] can be built on: std's `TcpStream` and `UnixStream`, whose
/// shared references read and write.
pub(crate) trait StdSocket: AsFd + AsRawFd + Send + Sync + Unpin + 'static
where
    for<'a> &'a Self: Read + Write,
{
    fn shutdown_write(&self) -> io::Result<()>;
}

impl StdSocket for std::net::TcpStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

impl StdSocket for std::os::unix::net::UnixStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

/// A non-blocking socket registered with the runtime for readability only (see the module
/// documentation).
pub(crate) struct ReadWatchedSocket<S: StdSocket>
where
    for<'a> &'a S: Read + Write,
{
    socket: AsyncFd<S>,
    /// A duplicate of the descriptor, registered for writability while a write waits for room.
    writable: Option<AsyncFd<OwnedFd>>,
}

impl<S: StdSocket> ReadWatchedSocket<S>
where
    for<'a> &'a S: Read + Write,
{
    /// Registers `socket` (already non-blocking) with the current runtime.
    pub(crate) fn new(socket: S) -> io::Result<ReadWatchedSocket<S>> {
        Ok(ReadWatchedSocket {
            socket: register(socket, Interest::READABLE)?,
            writable: None,
        })
    }

    /// Reads what the socket holds now, without the runtime: `Ok(false)` if it holds nothing
    /// yet (see [`MessageStream`](super::stream::MessageStream)'s wait for streamed rows).
    pub(crate) fn read_now(&self, buf: &mut ReadBuf<'_>) -> io::Result<bool> {
        match read_into(self.socket.get_ref(), buf) {
            Ok(_) => Ok(true),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Waits until the socket may take more bytes, registering the duplicate descriptor first
    /// if it is not registered yet (registration reports a socket that is writable already,
    /// so no edge is missed).
    fn poll_writable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let watcher = match &mut self.writable {
            Some(w) => w,
            None => {
                let dup = self.socket.get_ref().as_fd().try_clone_to_owned()?;
                self.writable.insert(register(dup, Interest::WRITABLE)?)
            }
        };
        let mut guard = ready!(watcher.poll_write_ready(cx))?;
        // The next write finds out whether there is room; until it fails, assume there is.
        guard.clear_ready();
        Poll::Ready(Ok(()))
    }
}

/// Reads from `socket` into the unfilled part of `buf`; returns how many bytes came.
fn read_into<S>(mut socket: &S, buf: &mut ReadBuf<'_>) -> io::Result<usize>
where
    for<'a> &'a S: Read,
{
    // SAFETY: `read` only writes into the slice it is given; the bytes it reports are marked
    // initialised and filled below, and no others.
    let unfilled = unsafe { &mut *(buf.unfilled_mut() as *mut [_] as *mut [u8]) };
    let n = socket.read(unfilled)?;
    // SAFETY: the socket wrote `n` bytes into the unfilled part.
    unsafe { buf.assume_init(n) };
    buf.advance(n);
    Ok(n)
}

/// Registers a descriptor that `fd` owns with the current runtime.
fn register<T: AsRawFd>(fd: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: `fd` owns its descriptor (a std socket or an `OwnedFd`), so the descriptor stays
    // open, and the same, until the `AsyncFd` that takes `fd` is dropped.
    Ok(unsafe { AsyncFd::register_with_interest(fd, interest) }?)
}

impl<S: StdSocket + std::fmt::Debug> std::fmt::Debug for ReadWatchedSocket<S>
where
    for<'a> &'a S: Read + Write,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.socket.get_ref().fmt(f)
    }
}

impl<S: StdSocket> AsyncRead for ReadWatchedSocket<S>
where
    for<'a> &'a S: Read + Write,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let mut guard = ready!(this.socket.poll_read_ready(cx))?;
            let room = buf.remaining();
            match guard.try_io(|socket| read_into(socket.get_ref(), buf)) {
                Ok(Ok(n)) => {
                    if n > 0 && n < room {
                        // A short read emptied the socket (epoll is edge-triggered, and bytes
                        // arriving after this read raise a new edge): wait for that edge
                        // instead of asking the socket again only to hear "would block".
                        guard.clear_ready();
                    }
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Not readable after all: the readiness was cleared; wait for the next edge.
                Err(_would_block) => continue,
            }
        }
    }
}

impl<S: StdSocket> AsyncWrite for ReadWatchedSocket<S>
where
    for<'a> &'a S: Read + Write,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            match this.socket.get_ref().write(buf) {
                Ok(n) => {
                    // Room again: stop watching for it (no wake-up per answer from now on).
                    this.writable = None;
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(this.poll_writable(cx))?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Writes go straight to the kernel.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.socket.get_ref().shutdown_write())
    }
}

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

impl Socket {
    /// Asks the socket for more bytes again and again, yielding the CPU between two tries, for
    /// at most `limit`; `Pending` if none came (or the transport is TLS or another stream,
    /// which only the runtime reads). Also says whether asking again did not pay: a yield gave
    /// our core away, or nothing came in time.
    pub(crate) fn ask_again(
        &self,
        buf: &mut ReadBuf<'_>,
        limit: Duration,
    ) -> (Poll<io::Result<()>>, bool) {
        let started = Instant::now();
        let mut shared = false;
        loop {
            let before = Instant::now();
            std::thread::yield_now();
            let after = Instant::now();
            // A yield that took long gave our core away: to the server itself, perhaps, which
            // then ran at the cost of a switch each way instead of a wake-up.
            shared |= after - before > CORE_SHARED;
            let read = match self {
                Socket::Tcp(s) => s.read_now(buf),
                Socket::Unix(s) => s.read_now(buf),
                Socket::Tls(_) | Socket::Other(_) => return (Poll::Pending, false),
            };
            return match read {
                Ok(true) => (Poll::Ready(Ok(())), shared),
                Ok(false) if after - started < limit => continue,
                Ok(false) => (Poll::Pending, true),
                Err(e) => (Poll::Ready(Err(e)), shared),
            };
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

/// How long a reader in the middle of a result's rows keeps looking for more before it sleeps.
///
/// The server sends rows 8 KiB at a time. A client that reads faster than that finds the socket
/// empty after each piece; if it then sleeps, every piece the server sends must wake it, and
/// waking a thread costs the server — on a virtual machine's idle core — more than the rows
/// did (measured: the fastest reader of the batch benchmark was its slowest on two cores). So
/// while rows stream, an empty socket is asked again for this long, handing the CPU to anyone
/// who wants it between two tries (the server itself, when it shares the core), before the
/// reader sleeps.
pub(crate) const STREAM_SPIN: Duration = Duration::from_micros(50);

/// A yield that took longer than this gave our core to another thread (a yield that finds
/// nobody else to run returns in about a microsecond here).
///
/// Asking again only pays while the server works on another core. When it shares ours, it
/// either runs during one of our yields (which then takes long: every yield is timed, not
/// only the first, since the server often gets the core only a few tries in) or cannot run
/// while we ask (and nothing comes in time); the same when rows come slowly. When
/// [`FRUITLESS_TO_PAUSE`] of the last 16 waits went one of these ways (so not a passing
/// neighbour), the reader sleeps at once for the next [`SPIN_PAUSE`] waits.
///
/// Measured with batch-1000 (1M rows, 10 runs each, medians): with client and server on one
/// core, timing only the first yield against 20 µs let the reader go on asking (28k reads
/// for 1M rows, 3.04M rows/s, 153 ms of client CPU); timing every yield against 5 µs
/// pauses it (6k reads, 3.32M rows/s, 130 ms, the same as never asking). Split over two
/// cores 5.78M → 5.84M rows/s, unpinned 5.53M → 5.92M: there it still asks.
const CORE_SHARED: Duration = Duration::from_micros(5);

/// How many waits for rows sleep at once after asking again was found not to pay.
const SPIN_PAUSE: u32 = 1024;

/// How many of the last 16 waits that asked again must have found it did not pay for the
/// reader to pause asking.
///
/// Measured with batch-1000 (1M rows): on two cores about 0.4% of the waits that ask are
/// fruitless; on one core 40–67% are (the scheduler often keeps the yielding reader on the
/// core, and a fruitless wait then spins its whole [`STREAM_SPIN`]). Twelve of 16 was seldom
/// reached on one core, so `query_stream` went on spinning there (10k yields per 1M rows).
const FRUITLESS_TO_PAUSE: u32 = 6;

/// Whether waits for rows ask the socket again: yes, unless [`FRUITLESS_TO_PAUSE`] of the last
/// 16 that did found it did not pay, and then not for the next [`SPIN_PAUSE`] waits.
#[derive(Debug, Default)]
pub(crate) struct AskAgain {
    /// Waits left that sleep at once.
    paused: u32,
    /// One bit per recent wait that asked: asking did not pay.
    fruitless: u16,
}

impl AskAgain {
    /// Whether this wait asks again (a paused one counts down the pause).
    pub(crate) fn allowed(&mut self) -> bool {
        if self.paused > 0 {
            self.paused -= 1;
            return false;
        }
        true
    }

    /// How a wait that asked went.
    pub(crate) fn record(&mut self, fruitless: bool) {
        self.fruitless = self.fruitless << 1 | u16::from(fruitless);
        if self.fruitless.count_ones() >= FRUITLESS_TO_PAUSE {
            self.paused = SPIN_PAUSE;
            self.fruitless = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn asking_again_pauses_when_enough_recent_waits_found_it_did_not_pay() {
        let mut ask = AskAgain::default();
        // One in eight in vain (far more than on two cores): never paused.
        for i in 0..100 {
            assert!(ask.allowed());
            ask.record(i % 8 == 0);
        }
        // FRUITLESS_TO_PAUSE in vain: the next SPIN_PAUSE waits sleep at once, then it asks
        // again.
        let mut ask = AskAgain::default();
        for _ in 0..FRUITLESS_TO_PAUSE - 1 {
            assert!(ask.allowed());
            ask.record(true);
        }
        assert!(ask.allowed());
        ask.record(true);
        for _ in 0..SPIN_PAUSE {
            assert!(!ask.allowed());
        }
        assert!(ask.allowed());
        ask.record(false);
        assert!(ask.allowed(), "the pause starts a fresh count");
    }

    /// One end of a socket pair, watched for readability only; the other end as a tokio stream.
    fn pair() -> (ReadWatchedSocket<UnixStream>, tokio::net::UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        theirs.set_nonblocking(true).unwrap();
        (
            ReadWatchedSocket::new(ours).unwrap(),
            tokio::net::UnixStream::from_std(theirs).unwrap(),
        )
    }

    /// Bytes that tell their position: a write that lost, doubled or reordered a chunk shows.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    /// Times out a test that would otherwise hang on a lost wake-up.
    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(std::time::Duration::from_secs(60), f)
            .await
            .expect("the socket never woke up")
    }

    /// This thread's count of voluntary context switches (the times it slept).
    fn sleeps() -> u64 {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn waiting_for_an_answer_sleeps_once_per_round_trip() {
        // The peer reads each request once we are asleep (which frees room in our send buffer:
        // the event that would wake a socket watched for writability) and answers 5 ms later.
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        const ROUND_TRIPS: u64 = 20;
        let server = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let mut request = [0; 4];
            for _ in 0..ROUND_TRIPS {
                std::thread::sleep(std::time::Duration::from_millis(5));
                theirs.read_exact(&mut request).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(5));
                theirs.write_all(b"pong").unwrap();
            }
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let slept = runtime.block_on(async {
            let mut ours = ReadWatchedSocket::new(ours).unwrap();
            let before = sleeps();
            for _ in 0..ROUND_TRIPS {
                ours.write_all(b"ping").await.unwrap();
                let mut answer = [0; 4];
                within(ours.read_exact(&mut answer)).await.unwrap();
                assert_eq!(&answer, b"pong");
            }
            sleeps() - before
        });
        server.join().unwrap();
        // One sleep per round trip, waiting for the answer; a socket watched for writability
        // too sleeps twice (it is woken when the peer reads the request).
        assert!(
            slept < ROUND_TRIPS + ROUND_TRIPS / 2,
            "{slept} sleeps for {ROUND_TRIPS} round trips"
        );
    }

    #[tokio::test]
    async fn a_write_larger_than_the_socket_buffer_waits_for_room_and_then_stops_watching() {
        let (mut ours, mut theirs) = pair();
        // Far more than a Unix socket buffers, so the write must wait for the reader.
        let sent = pattern(8 << 20);
        let expected = sent.clone();
        let reader = tokio::spawn(async move {
            // Let the writer fill the buffer and wait before anything is read.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let mut got = vec![0; expected.len()];
            theirs.read_exact(&mut got).await.unwrap();
            assert!(got == expected, "the bytes arrived changed");
            theirs
        });
        within(ours.write_all(&sent)).await.unwrap();
        let mut theirs = reader.await.unwrap();
        assert!(
            ours.writable.is_none(),
            "write readiness is still watched after the write went through"
        );
        // Still a working socket both ways.
        ours.write_all(b"ping").await.unwrap();
        let mut got = [0; 4];
        theirs.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        theirs.write_all(b"pong").await.unwrap();
        ours.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
    }

    #[tokio::test]
    async fn reads_wait_for_data_and_see_the_end_of_the_stream() {
        let (mut ours, mut theirs) = pair();
        let sent = pattern(300_000);
        let to_send = sent.clone();
        let writer = tokio::spawn(async move {
            // In pieces with pauses, so some reads find the socket empty and must wait.
            for piece in to_send.chunks(70_000) {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                theirs.write_all(piece).await.unwrap();
            }
        });
        let mut got = Vec::new();
        within(ours.read_to_end(&mut got)).await.unwrap();
        writer.await.unwrap();
        assert!(got == sent, "the bytes read differ from those sent");
    }

    #[tokio::test]
    async fn shutdown_ends_what_the_peer_reads() {
        let (mut ours, mut theirs) = pair();
        ours.write_all(b"last").await.unwrap();
        ours.shutdown().await.unwrap();
        let mut got = Vec::new();
        theirs.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last");
    }
}
