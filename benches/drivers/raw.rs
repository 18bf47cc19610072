//! The raw client: the least a client can do and still be correct, as the lower bound every
//! async driver is measured against: a bound for clients on tokio. Its socket is registered for
//! readability only, as pgengine's is (see `src/connection/socket.rs`): registered for
//! writability too, as tokio's own streams are, it woke once more per round trip, and with
//! client and server on one core it made 0.75× libpq's pings, against 1.02–1.15× now.
//!
//! It logs in (trust authentication only), and then only frames messages: the caller writes
//! pre-encoded requests and looks at the bodies of the messages it cares about (the batch
//! workload's `raw` only counts DataRows; its `raw-decoded` splits them with
//! [`data_row_values`] and decodes the values as every other contender does). There is no
//! statement cache, no state machine, no decoding beyond what the caller does; reads ask the
//! socket for everything it has (64 KiB of room), as pgengine's reader does. On a server error
//! it gives up: a benchmark has nothing to recover.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use bytes::{Buf, BytesMut};
use pgengine::config::Host;
use pgengine::protocol::frontend;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::BenchResult;

/// Free room in the read buffer before each read.
const READ_CHUNK: usize = 64 * 1024;

/// Where the server listens.
pub enum Endpoint {
    /// The socket file itself, `<dir>/.s.PGSQL.<port>`.
    Unix(PathBuf),
    Tcp(String, u16),
}

impl Endpoint {
    /// The first host of a pgengine config.
    pub fn from_config(config: &pgengine::Config) -> BenchResult<Endpoint> {
        let hosts = config.effective_hosts();
        let Some((host, port)) = hosts.first() else {
            return Err("the connection settings name no host".into());
        };
        Ok(match host {
            Host::Unix(dir) => Endpoint::Unix(dir.join(format!(".s.PGSQL.{port}"))),
            Host::Tcp(name) => Endpoint::Tcp(name.clone(), *port),
            other => return Err(format!("the raw client cannot reach {other:?}").into()),
        })
    }
}

/// A Unix or TCP socket, registered with the runtime for readability only, as pgengine
/// registers its own: a socket also registered for writability wakes its reader each time the
/// server takes a request (room opens in the send buffer), a wake-up no client needs.
enum Stream {
    Unix(AsyncFd<std::os::unix::net::UnixStream>),
    Tcp(AsyncFd<std::net::TcpStream>),
}

impl Stream {
    fn watch<S: AsRawFd + 'static>(socket: S) -> BenchResult<AsyncFd<S>> {
        // SAFETY: `socket` (a std socket) owns its descriptor, which stays open and the same
        // until the `AsyncFd` that takes it is dropped.
        Ok(unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }?)
    }

    /// Reads what the socket has into the free room of `buf`, waiting for it if need be.
    async fn read_buf(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => read_into(s, buf).await,
            Stream::Tcp(s) => read_into(s, buf).await,
        }
    }

    /// Writes all of `bytes`: straight into the socket, which has room for the small requests
    /// of the workloads; when it has none, tries again after a yield.
    async fn write_all(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let written = match self {
                Stream::Unix(s) => s.get_ref().write(bytes),
                Stream::Tcp(s) => s.get_ref().write(bytes),
            };
            match written {
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    tokio::task::yield_now().await
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn shutdown(&self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.get_ref().shutdown(std::net::Shutdown::Write),
            Stream::Tcp(s) => s.get_ref().shutdown(std::net::Shutdown::Write),
        }
    }
}

async fn read_into<S>(socket: &AsyncFd<S>, buf: &mut BytesMut) -> std::io::Result<usize>
where
    S: AsRawFd,
    for<'a> &'a S: Read,
{
    let room = buf.capacity() - buf.len();
    loop {
        let mut guard = socket.readable().await?;
        let read = guard.try_io(|s| {
            let spare = buf.spare_capacity_mut();
            // SAFETY: `read` only writes into the slice; the bytes it reports are then
            // initialised, and only those are added to the buffer below.
            let spare = unsafe { &mut *(spare as *mut [_] as *mut [u8]) };
            let n = s.get_ref().read(spare)?;
            // SAFETY: as above.
            unsafe { buf.set_len(buf.len() + n) };
            Ok(n)
        });
        match read {
            Ok(Ok(n)) => {
                if n > 0 && n < room {
                    // A short read emptied the socket: wait for the next edge instead of
                    // asking again only to hear "would block" (as tokio's own streams do).
                    guard.clear_ready();
                }
                return Ok(n);
            }
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}

/// A logged-in connection that frames messages and nothing more.
pub struct Client {
    stream: Stream,
    read_buf: BytesMut,
}

impl Client {
    /// Connects and logs in as the config's user to its database; the server must trust us.
    pub async fn connect(config: &pgengine::Config) -> BenchResult<Client> {
        // Connecting to a local server does not wait long enough to need the runtime.
        let stream = match Endpoint::from_config(config)? {
            Endpoint::Unix(path) => {
                let socket = std::os::unix::net::UnixStream::connect(&path)
                    .map_err(|e| format!("raw: could not connect to {}: {e}", path.display()))?;
                socket.set_nonblocking(true)?;
                Stream::Unix(Stream::watch(socket)?)
            }
            Endpoint::Tcp(host, port) => {
                let socket = std::net::TcpStream::connect((host.as_str(), port))
                    .map_err(|e| format!("raw: could not connect to {host}:{port}: {e}"))?;
                // As libpq does: a request must not wait for an ACK of the previous one.
                socket.set_nodelay(true)?;
                socket.set_nonblocking(true)?;
                Stream::Tcp(Stream::watch(socket)?)
            }
        };
        let mut client = Client {
            stream,
            read_buf: BytesMut::with_capacity(READ_CHUNK),
        };
        let user = config.effective_user()?;
        let dbname = config.effective_dbname()?;
        let mut startup = BytesMut::new();
        frontend::startup(
            &mut startup,
            frontend::PROTOCOL_3_0,
            &[("user", &user), ("database", &dbname)],
        )?;
        client.send(&startup).await?;
        client
            .read_until_ready(|tag, body| match tag {
                // AuthenticationOk; any other request needs a password we do not speak.
                b'R' if body == [0, 0, 0, 0] => Ok(()),
                b'R' => Err(format!(
                    "raw: the server asks for authentication {:?}; the raw client only \
                     speaks trust",
                    body.get(..4)
                )
                .into()),
                // BackendKeyData.
                b'K' => Ok(()),
                other => {
                    Err(format!("raw: unexpected message {:?} at startup", other as char).into())
                }
            })
            .await?;
        Ok(client)
    }

    /// Parses a named statement with the given parameter types, in its own round trip.
    pub async fn prepare(&mut self, name: &str, sql: &str, param_types: &[u32]) -> BenchResult<()> {
        let mut buf = BytesMut::new();
        frontend::parse(&mut buf, name, sql, param_types)?;
        frontend::sync(&mut buf);
        self.send(&buf).await?;
        self.read_until_ready(|tag, _| match tag {
            b'1' => Ok(()),
            other => Err(format!("raw: unexpected message {:?} after Parse", other as char).into()),
        })
        .await
    }

    /// Writes pre-encoded messages.
    pub async fn send(&mut self, bytes: &[u8]) -> BenchResult<()> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    /// Reads up to and including the next ReadyForQuery, handing every other message's tag
    /// and body to `on_message` — except the asynchronous ones (NoticeResponse,
    /// ParameterStatus, NotificationResponse; §55.2.7), which may come at any time and are
    /// skipped. An ErrorResponse ends it with the server's message.
    pub async fn read_until_ready(
        &mut self,
        mut on_message: impl FnMut(u8, &[u8]) -> BenchResult<()>,
    ) -> BenchResult<()> {
        loop {
            let mut at = 0;
            let mut ready = false;
            while let Some((tag, body)) = frame(&self.read_buf[at..])? {
                at += 5 + body.len();
                match tag {
                    b'Z' => {
                        ready = true;
                        break;
                    }
                    b'E' => return Err(format!("raw: server error: {}", error_text(body)).into()),
                    b'N' | b'S' | b'A' => {}
                    _ => on_message(tag, body)?,
                }
            }
            self.read_buf.advance(at);
            if ready {
                return Ok(());
            }
            self.read_buf.reserve(READ_CHUNK);
            if self.stream.read_buf(&mut self.read_buf).await? == 0 {
                return Err("raw: the server closed the connection".into());
            }
        }
    }

    /// Terminate, and close the socket.
    pub async fn close(mut self) -> BenchResult<()> {
        let mut buf = BytesMut::new();
        frontend::terminate(&mut buf);
        self.send(&buf).await?;
        self.stream.shutdown()?;
        Ok(())
    }
}

/// Bind a prepared statement without parameters to the unnamed portal, with every result
/// column in binary; Execute it to the end; Sync. One request, one round trip.
pub fn bind_execute_sync(statement: &str) -> BenchResult<BytesMut> {
    let mut request = BytesMut::new();
    frontend::bind::<pgengine::Error, _>(
        &mut request,
        "",
        statement,
        &[],
        0,
        |_, _| Ok(false),
        &[1],
    )?;
    frontend::execute(&mut request, "", 0)?;
    frontend::sync(&mut request);
    Ok(request)
}

/// The values of a DataRow body (§55.7: a column count, then each value's length, -1 for
/// NULL, and its bytes) into `values`, `None` for NULL; fails unless the row has exactly
/// `values.len()` columns and its lengths fit the body.
pub fn data_row_values<'a>(mut body: &'a [u8], values: &mut [Option<&'a [u8]>]) -> BenchResult<()> {
    let count = take::<2>(&mut body).map(i16::from_be_bytes);
    if count.and_then(|c| usize::try_from(c).ok()) != Some(values.len()) {
        return Err(format!("raw: expected a DataRow of {} columns", values.len()).into());
    }
    for value in values.iter_mut() {
        let len = take::<4>(&mut body)
            .map(i32::from_be_bytes)
            .ok_or("raw: DataRow cut short")?;
        *value = match usize::try_from(len) {
            Err(_) => None,
            Ok(len) => {
                let (v, rest) = body.split_at_checked(len).ok_or("raw: DataRow cut short")?;
                body = rest;
                Some(v)
            }
        };
    }
    if body.is_empty() {
        Ok(())
    } else {
        Err("raw: bytes left over after the DataRow's last column".into())
    }
}

/// The first `N` bytes of `buf`, taken off it.
fn take<const N: usize>(buf: &mut &[u8]) -> Option<[u8; N]> {
    let (head, rest) = buf.split_first_chunk::<N>()?;
    *buf = rest;
    Some(*head)
}

/// One whole message at the front of `buf`: its tag and body, or `None` if more bytes are
/// needed.
fn frame(buf: &[u8]) -> BenchResult<Option<(u8, &[u8])>> {
    let Some(header) = buf.get(..5) else {
        return Ok(None);
    };
    let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    let Some(len) = usize::try_from(len).ok().filter(|&len| len >= 4) else {
        return Err(format!("raw: message {:?} has length {len}", header[0] as char).into());
    };
    Ok(buf.get(5..1 + len).map(|body| (header[0], body)))
}

/// The M (message) field of an ErrorResponse body, or the whole body if it has none.
fn error_text(body: &[u8]) -> String {
    body.split(|&b| b == 0)
        .find_map(|field| field.strip_prefix(b"M"))
        .map_or_else(
            || String::from_utf8_lossy(body).into_owned(),
            |m| String::from_utf8_lossy(m).into_owned(),
        )
}
