//! Opening a connection: the socket, the StartupMessage, authentication, and the messages the
//! server sends before its first ReadyForQuery (PostgreSQL docs §55.2.1 "Start-up").

use std::time::Duration;

use tokio::net::{TcpStream, UnixStream};

use super::stream::{MessageStream, Socket};
use crate::config::{Config, Host, HostAddr, SslMode};
use crate::error::{Error, ErrorKind, Result};
use crate::protocol::scram::{self, ChannelBinding, ScramSha256};
use crate::protocol::{self, Authentication, BackendMessage, frontend};

/// What the server told us during startup.
pub(crate) struct Startup {
    pub(crate) stream: MessageStream,
    pub(crate) parameters: Vec<(String, String)>,
    pub(crate) process_id: i32,
    pub(crate) secret_key: bytes::Bytes,
    pub(crate) notices: Vec<crate::error::DbError>,
    pub(crate) status: protocol::TransactionStatus,
    /// The server this connection reached (for CancelRequest); `None` over a caller's stream.
    pub(crate) target: Option<Target>,
}

/// One server to try: a host (name or socket directory), the numeric address to dial instead
/// of looking the name up (`hostaddr`), and the port.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) host: Host,
    pub(crate) addr: Option<HostAddr>,
    pub(crate) port: u16,
}

/// Tries each host in turn (libpq's order) and returns the first connection that starts.
pub(crate) async fn connect(config: &Config) -> Result<Startup> {
    let mut last_error = None;
    for (host, addr, port) in config.effective_targets() {
        let target = Target { host, addr, port };
        let attempt = connect_host(config, &target);
        let result = match config.get_connect_timeout() {
            Some(limit) => match tokio::time::timeout(limit, attempt).await {
                Ok(r) => r,
                Err(_) => Err(Error::timeout(format!(
                    "could not connect to {} within {}",
                    describe(&target),
                    human(limit)
                ))),
            },
            None => attempt.await,
        };
        match result {
            Ok(startup) => return Ok(startup),
            // Settings that are wrong for every host make trying the next one pointless.
            Err(e) if e.kind() == ErrorKind::Config => return Err(e),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| Error::config("no host to connect to")))
}

fn describe(target: &Target) -> String {
    let port = target.port;
    match (&target.host, &target.addr) {
        (Host::Tcp(h), Some(addr)) if *h != addr.to_string() => format!("{h} ({addr}):{port}"),
        (Host::Tcp(h), _) => format!("{h}:{port}"),
        (Host::Unix(dir), _) => format!("socket {}/.s.PGSQL.{port}", dir.display()),
    }
}

fn human(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

pub(crate) async fn open_socket(target: &Target) -> Result<Socket> {
    let port = target.port;
    match &target.host {
        Host::Tcp(h) => {
            let connected = match &target.addr {
                Some(addr) => TcpStream::connect(addr.socket_addr(port)).await,
                None => TcpStream::connect((h.as_str(), port)).await,
            };
            let stream = connected
                .map_err(|e| Error::io(&format!("could not connect to {}", describe(target)), e))?;
            // Small queries must not wait for Nagle's algorithm to fill a packet.
            stream
                .set_nodelay(true)
                .map_err(|e| Error::io("could not set TCP_NODELAY", e))?;
            Ok(Socket::Tcp(stream))
        }
        Host::Unix(dir) => {
            let path = dir.join(format!(".s.PGSQL.{port}"));
            let stream = UnixStream::connect(&path)
                .await
                .map_err(|e| Error::io(&format!("could not connect to {}", path.display()), e))?;
            Ok(Socket::Unix(stream))
        }
    }
}

async fn connect_host(config: &Config, target: &Target) -> Result<Startup> {
    match config.get_ssl_mode() {
        SslMode::Disable | SslMode::Allow | SslMode::Prefer => {}
        mode => {
            return Err(Error::config(format!(
                "sslmode={} needs TLS, which this version of pgengine does not support yet; \
                 use sslmode=disable or prefer",
                mode.as_str()
            )));
        }
    }
    let socket = open_socket(target).await?;
    start_on(socket, config, Some(target.clone())).await
}

/// Runs startup and authentication over an already open socket.
pub(crate) async fn start_on(
    socket: Socket,
    config: &Config,
    target: Option<Target>,
) -> Result<Startup> {
    let user = config.effective_user()?;
    let dbname = config.effective_dbname()?;
    let mut stream = MessageStream::new(socket, protocol::DEFAULT_MAX_MESSAGE_LEN);

    let mut params: Vec<(&str, &str)> = vec![
        ("user", &user),
        ("database", &dbname),
        // We decode every text value as UTF-8, so the server must send UTF-8.
        ("client_encoding", "UTF8"),
    ];
    if let Some(app) = config.get_application_name() {
        params.push(("application_name", app));
    }
    if let Some(options) = config.get_options() {
        params.push(("options", options));
    }
    frontend::startup(&mut stream.write_buf, frontend::PROTOCOL_3_0, &params)?;
    stream.flush().await?;

    let (host, port) = match &target {
        Some(t) => (t.host.clone(), t.port),
        None => (Host::Tcp(String::new()), 0),
    };
    authenticate(&mut stream, config, &host, port, &user).await?;
    finish_startup(stream, target).await
}

/// Turns an ErrorResponse received before ReadyForQuery into an error: SQLSTATE class 28
/// ("invalid authorization specification", e.g. 28P01 wrong password) is an auth failure.
fn startup_error(db: Box<crate::error::DbError>) -> Error {
    let kind = if db.code().starts_with("28") {
        ErrorKind::Auth
    } else {
        ErrorKind::Db
    };
    Error::with_db(kind, db)
}

async fn authenticate(
    stream: &mut MessageStream,
    config: &Config,
    host: &Host,
    port: u16,
    user: &str,
) -> Result<()> {
    let password = || {
        config.password_for(host, port).ok_or_else(|| {
            Error::auth(
                "the server asked for a password but none was given \
                 (set it in the connection string, PGPASSWORD or the .pgpass file)",
            )
        })
    };
    let mut scram: Option<ScramSha256> = None;
    loop {
        match stream.read_message().await? {
            BackendMessage::Authentication(auth) => match auth {
                Authentication::Ok => {
                    if let Some(s) = &scram
                        && !s.is_done()
                    {
                        // A server that skips SASLFinal has not proved it knows the password.
                        return Err(Error::auth(
                            "the server ended SCRAM authentication without proving its identity",
                        ));
                    }
                    return Ok(());
                }
                Authentication::CleartextPassword => {
                    frontend::password(&mut stream.write_buf, &password()?)?;
                    stream.flush().await?;
                }
                Authentication::Md5Password { salt } => {
                    let hash = protocol::md5_password(user.as_bytes(), &password()?, salt);
                    frontend::password(&mut stream.write_buf, hash.as_bytes())?;
                    stream.flush().await?;
                }
                Authentication::Sasl(mechanisms) => {
                    if scram.is_some() {
                        return Err(Error::protocol("the server restarted SASL authentication"));
                    }
                    if !mechanisms.iter().any(|m| m == scram::SCRAM_SHA_256) {
                        return Err(Error::auth(format!(
                            "none of the server's SASL mechanisms ({}) is supported",
                            mechanisms.join(", ")
                        )));
                    }
                    // Without TLS there is no channel to bind to: gs2 flag 'n'.
                    let s = ScramSha256::new(&password()?, ChannelBinding::Unsupported);
                    frontend::sasl_initial_response(
                        &mut stream.write_buf,
                        scram::SCRAM_SHA_256,
                        s.client_first(),
                    )?;
                    stream.flush().await?;
                    scram = Some(s);
                }
                Authentication::SaslContinue(data) => {
                    let mut s = scram.take().ok_or_else(|| {
                        Error::protocol("SASLContinue without a SASL exchange in progress")
                    })?;
                    // The key derivation runs as many iterations as the server asks (4096 by
                    // default, millions if it likes): on the blocking pool, not the runtime.
                    let (s, result) = tokio::task::spawn_blocking(move || {
                        let r = s.update(&data);
                        (s, r)
                    })
                    .await
                    .map_err(|e| Error::auth(format!("SCRAM computation failed: {e}")))?;
                    scram = Some(s);
                    let client_final = result?;
                    frontend::sasl_response(&mut stream.write_buf, &client_final)?;
                    stream.flush().await?;
                }
                Authentication::SaslFinal(data) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        Error::protocol("SASLFinal without a SASL exchange in progress")
                    })?;
                    s.finish(&data)?;
                }
                Authentication::KerberosV5 => {
                    return Err(Error::auth("Kerberos V5 authentication is not supported"));
                }
                Authentication::Gss | Authentication::GssContinue(_) => {
                    return Err(Error::auth("GSSAPI authentication is not supported"));
                }
                Authentication::Sspi => {
                    return Err(Error::auth("SSPI authentication is not supported"));
                }
            },
            BackendMessage::ErrorResponse(db) => return Err(startup_error(db)),
            BackendMessage::NoticeResponse(_) => {}
            BackendMessage::NegotiateProtocolVersion {
                newest_minor,
                unrecognized,
            } => {
                // We ask for 3.0 with no options, so any answer but "3.0, nothing unknown"
                // is the server misbehaving; 3.0 itself is fine to continue with.
                if newest_minor != 0 || !unrecognized.is_empty() {
                    return Err(Error::protocol(format!(
                        "the server cannot speak protocol 3.0 (it offers 3.{newest_minor})"
                    )));
                }
            }
            other => {
                return Err(Error::protocol(format!(
                    "unexpected message during authentication: {:?}",
                    other.tag() as char
                )));
            }
        }
    }
}

async fn finish_startup(mut stream: MessageStream, target: Option<Target>) -> Result<Startup> {
    let mut parameters = Vec::new();
    let mut notices = Vec::new();
    let mut key = None;
    loop {
        match stream.read_message().await? {
            BackendMessage::BackendKeyData {
                process_id,
                secret_key,
            } => key = Some((process_id, secret_key)),
            BackendMessage::ParameterStatus { name, value } => parameters.push((name, value)),
            BackendMessage::NoticeResponse(n) => notices.push(*n),
            BackendMessage::ErrorResponse(db) => return Err(startup_error(db)),
            BackendMessage::ReadyForQuery(status) => {
                // Some poolers and proxies send no BackendKeyData: cancellation is then
                // impossible, but the connection is still good.
                let (process_id, secret_key) = key.unwrap_or((0, bytes::Bytes::new()));
                return Ok(Startup {
                    stream,
                    parameters,
                    process_id,
                    secret_key,
                    notices,
                    status,
                    target,
                });
            }
            other => {
                return Err(Error::protocol(format!(
                    "unexpected message during startup: {:?}",
                    other.tag() as char
                )));
            }
        }
    }
}
