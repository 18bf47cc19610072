//! The raw client: the least a client can do and still be correct, as the lower bound every
//! async driver is measured against. It is a bound for clients on tokio, not for every client:
//! with client and server on one core, libpq's blocking `poll`/`recv` path beats it (13.3 against
//! 17.2 µs per ping), and a blocking variant of this client measured 15.4 µs, so most of that
//! gap is the runtime's park path (timer wheel, `epoll_wait`, readiness bookkeeping).
//!
//! It logs in (trust authentication only), and then only frames messages: the caller writes
//! pre-encoded requests and looks at the bodies of the messages it cares about (the batch
//! workload's `raw` only counts DataRows; its `raw-decoded` splits them with
//! [`data_row_values`] and decodes the values as every other contender does). There is no
//! statement cache, no state machine, no decoding beyond what the caller does; reads ask the
//! socket for everything it has (64 KiB of room), as pgengine's reader does. On a server error
//! it gives up: a benchmark has nothing to recover.

use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use pgengine::config::Host;
use pgengine::protocol::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

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

/// A Unix or TCP socket; one branch per call, as in pgengine's own socket type.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
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
        let stream = match Endpoint::from_config(config)? {
            Endpoint::Unix(path) => Stream::Unix(
                UnixStream::connect(&path)
                    .await
                    .map_err(|e| format!("raw: could not connect to {}: {e}", path.display()))?,
            ),
            Endpoint::Tcp(host, port) => {
                let socket = TcpStream::connect((host.as_str(), port))
                    .await
                    .map_err(|e| format!("raw: could not connect to {host}:{port}: {e}"))?;
                // As libpq does: a request must not wait for an ACK of the previous one.
                socket.set_nodelay(true)?;
                Stream::Tcp(socket)
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
        self.stream.shutdown().await?;
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
