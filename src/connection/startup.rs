//! Opening a connection: the socket, the StartupMessage, authentication, and the messages the
//! server sends before its first ReadyForQuery (PostgreSQL docs §55.2.1 "Start-up").

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::socket::ReadWatchedSocket;
use super::socket::Socket;
use super::stream::MessageStream;
use super::tls::TlsConnector;
use crate::config::{
    ChannelBinding, Config, Host, HostAddr, LoadBalanceHosts, SslMode, SslNegotiation,
    TargetSessionAttrs,
};
use crate::error::{Error, ErrorKind, Result, SqlState};
use crate::protocol::scram::{self, Gs2Binding, ScramSha256};
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
    /// The TLS settings the connection was made with, when it runs over TLS: a
    /// CancelRequest must go over TLS too.
    pub(crate) tls: Option<TlsConnector>,
    /// The protocol's minor version in use: 0 (3.0) or 2 (3.2).
    pub(crate) protocol_minor: u16,
}

/// One server to try: a host (name or socket directory), the numeric address to dial instead
/// of looking the name up (`hostaddr`), and the port.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) host: Host,
    pub(crate) addr: Option<HostAddr>,
    pub(crate) port: u16,
}

/// Tries each host in turn (libpq's order, or shuffled with `load_balance_hosts=random`) and
/// returns the first connection that starts and is the kind of server `target_session_attrs`
/// asks for. `prefer-standby` makes two passes, as libpq: standbys only, then any server.
pub(crate) async fn connect(config: &Config) -> Result<Startup> {
    // Settings built with the setters have not been checked together yet.
    config.validate()?;
    let tls = TlsConnector::from_config(config)?;
    let mut targets = config.effective_targets();
    if config.get_load_balance_hosts() == LoadBalanceHosts::Random {
        use rand::seq::SliceRandom;
        targets.shuffle(&mut rand::rng());
    }
    let passes: &[TargetSessionAttrs] = match config.get_target_session_attrs() {
        TargetSessionAttrs::PreferStandby => {
            &[TargetSessionAttrs::Standby, TargetSessionAttrs::Any]
        }
        TargetSessionAttrs::Any => &[TargetSessionAttrs::Any],
        TargetSessionAttrs::ReadWrite => &[TargetSessionAttrs::ReadWrite],
        TargetSessionAttrs::ReadOnly => &[TargetSessionAttrs::ReadOnly],
        TargetSessionAttrs::Primary => &[TargetSessionAttrs::Primary],
        TargetSessionAttrs::Standby => &[TargetSessionAttrs::Standby],
    };
    let mut last_error = None;
    for &wanted in passes {
        for (host, addr, port) in &targets {
            let target = Target {
                host: host.clone(),
                addr: addr.clone(),
                port: *port,
            };
            match connect_target(config, &target, tls.as_ref(), wanted).await {
                Ok(startup) => return Ok(startup),
                // Settings that are wrong for every host make trying the next one pointless.
                Err(e) if e.kind() == ErrorKind::Config => return Err(e),
                Err(e) => last_error = Some(e),
            }
        }
    }
    Err(last_error.unwrap_or_else(|| Error::config("no host to connect to")))
}

/// One host: connect within `connect_timeout`, then check the kind of server.
async fn connect_target(
    config: &Config,
    target: &Target,
    tls: Option<&TlsConnector>,
    wanted: TargetSessionAttrs,
) -> Result<Startup> {
    let attempt = async {
        let mut startup = connect_host(config, target, tls).await?;
        check_session(&mut startup, wanted, target).await?;
        Ok(startup)
    };
    match config.get_connect_timeout() {
        Some(limit) => tokio::time::timeout(limit, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(Error::timeout(format!(
                    "could not connect to {} within {}",
                    describe(target),
                    human(limit)
                )))
            }),
        None => attempt.await,
    }
}

/// Checks that the server is the kind `wanted` names (`target_session_attrs`, §34.1.2). Since
/// PostgreSQL 14 the server reports `in_hot_standby` and `default_transaction_read_only` at
/// startup; older servers are asked, as libpq does, with one query. A server that does not
/// qualify is told goodbye.
async fn check_session(
    startup: &mut Startup,
    wanted: TargetSessionAttrs,
    target: &Target,
) -> Result<()> {
    let reported = |name: &str| {
        startup
            .parameters
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v == "on")
    };
    let hot_standby = reported("in_hot_standby");
    let (ok, what) = match wanted {
        TargetSessionAttrs::Any | TargetSessionAttrs::PreferStandby => return Ok(()),
        TargetSessionAttrs::ReadWrite | TargetSessionAttrs::ReadOnly => {
            let read_only = match (reported("default_transaction_read_only"), hot_standby) {
                (Some(default), Some(standby)) => default || standby,
                _ => ask(&mut startup.stream, "SHOW transaction_read_only").await?,
            };
            let ok = read_only == (wanted == TargetSessionAttrs::ReadOnly);
            (ok, if read_only { "read-only" } else { "read-write" })
        }
        TargetSessionAttrs::Primary | TargetSessionAttrs::Standby => {
            let standby = match hot_standby {
                Some(standby) => standby,
                None => ask(&mut startup.stream, "SELECT pg_catalog.pg_is_in_recovery()").await?,
            };
            let ok = standby == (wanted == TargetSessionAttrs::Standby);
            (ok, if standby { "a standby" } else { "a primary" })
        }
    };
    if ok {
        return Ok(());
    }
    frontend::terminate(&mut startup.stream.write_buf);
    let _ = startup.stream.flush().await;
    Err(Error::closed(format!(
        "the server at {} is {what}, but target_session_attrs={}",
        describe(target),
        wanted.as_str()
    ))
    .retry_safe())
}

/// Runs a one-value query during startup and reads it as a boolean (`on`/`t`).
async fn ask(stream: &mut MessageStream, sql: &str) -> Result<bool> {
    frontend::query(&mut stream.write_buf, sql)?;
    stream.flush().await?;
    let mut value = None;
    let mut error = None;
    loop {
        match stream.read_message().await? {
            BackendMessage::DataRow(row) => {
                value = row.value(0).map(|v| v == b"on" || v == b"t");
            }
            BackendMessage::ErrorResponse(db) => error = Some(Error::db(db)),
            BackendMessage::ReadyForQuery(_) => break,
            BackendMessage::RowDescription(_)
            | BackendMessage::CommandComplete(_)
            | BackendMessage::NoticeResponse(_)
            | BackendMessage::ParameterStatus { .. } => {}
            other => {
                return Err(Error::protocol(format!(
                    "unexpected message {:?} answering {sql:?}",
                    other.tag() as char
                )));
            }
        }
    }
    match (error, value) {
        (Some(e), _) => Err(e),
        (None, Some(v)) => Ok(v),
        (None, None) => Err(Error::protocol(format!("no answer to {sql:?}"))),
    }
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

/// Opens a socket to `target`; `config` (absent for a CancelRequest's short-lived socket)
/// supplies the TCP keepalive settings.
pub(crate) async fn open_socket(target: &Target, config: Option<&Config>) -> Result<Socket> {
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
            if let Some(config) = config {
                set_keepalives(&stream, config)?;
            }
            let stream = stream
                .into_std()
                .and_then(ReadWatchedSocket::new)
                .map_err(|e| Error::io("could not register the socket", e))?;
            Ok(Socket::Tcp(stream))
        }
        Host::Unix(dir) => {
            let path = dir.join(format!(".s.PGSQL.{port}"));
            let stream = UnixStream::connect(&path)
                .await
                .map_err(|e| Error::io(&format!("could not connect to {}", path.display()), e))?;
            let stream = stream
                .into_std()
                .and_then(ReadWatchedSocket::new)
                .map_err(|e| Error::io("could not register the socket", e))?;
            Ok(Socket::Unix(stream))
        }
    }
}

/// Applies `keepalives`, `keepalives_idle`, `keepalives_interval`, `keepalives_count` and
/// `tcp_user_timeout`: a server that vanishes (a cable pulled, a VM frozen) is noticed by the
/// kernel instead of leaving the connection waiting forever.
fn set_keepalives(stream: &TcpStream, config: &Config) -> Result<()> {
    let socket = socket2::SockRef::from(stream);
    let failed = |e| Error::io("could not set TCP keepalive options", e);
    if !config.get_keepalives() {
        return socket.set_keepalive(false).map_err(failed);
    }
    let mut keepalive = socket2::TcpKeepalive::new();
    if let Some(idle) = config.get_keepalives_idle() {
        keepalive = keepalive.with_time(idle);
    }
    if let Some(interval) = config.get_keepalives_interval() {
        keepalive = keepalive.with_interval(interval);
    }
    #[cfg(not(any(target_os = "openbsd", target_os = "windows")))]
    if let Some(count) = config.get_keepalives_count() {
        keepalive = keepalive.with_retries(count);
    }
    socket.set_tcp_keepalive(&keepalive).map_err(failed)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Some(limit) = config.get_tcp_user_timeout() {
        socket.set_tcp_user_timeout(Some(limit)).map_err(failed)?;
    }
    Ok(())
}

/// Connects to one server with the TLS behaviour of `sslmode` (libpq's, §34.19.1):
/// `allow` tries plain text first and TLS if the server refuses; `prefer` tries TLS first and
/// plain text if the server does not offer it, the handshake fails, or the server refuses the
/// TLS session; the stricter modes use TLS or fail. Unix-domain sockets never use TLS.
async fn connect_host(
    config: &Config,
    target: &Target,
    tls: Option<&TlsConnector>,
) -> Result<Startup> {
    let (Some(tls), Host::Tcp(_)) = (tls, &target.host) else {
        return attempt(config, target, None).await;
    };
    match config.get_ssl_mode() {
        SslMode::Allow => match attempt(config, target, None).await {
            Err(e) if refused_by_server(&e) => attempt(config, target, Some((tls, false))).await,
            result => result,
        },
        SslMode::Prefer => match attempt(config, target, Some((tls, false))).await {
            Err(e) if e.kind() == ErrorKind::Tls || refused_by_server(&e) => {
                attempt(config, target, None).await
            }
            result => result,
        },
        _ => attempt(config, target, Some((tls, true))).await,
    }
}

/// An error the server sent during startup (a `pg_hba.conf` line that refuses this kind of
/// connection, say), as opposed to one of the network or of our settings.
fn refused_by_server(e: &Error) -> bool {
    e.as_db_error().is_some()
}

/// One connection attempt: plain text, or TLS (`required`: whether a server without TLS is an
/// error or gets a plain-text session).
async fn attempt(
    config: &Config,
    target: &Target,
    tls: Option<(&TlsConnector, bool)>,
) -> Result<Startup> {
    let socket = open_socket(target, Some(config)).await?;
    let (socket, end_point, used) = match tls {
        None => (socket, None, None),
        Some((connector, required)) => match start_tls(socket, connector, target).await? {
            Negotiated::Tls(h) => (h.socket, Some(h.end_point), Some(connector.clone())),
            Negotiated::Refused(_) if required => {
                return Err(Error::tls(format!(
                    "the server at {} does not accept TLS connections, but sslmode={} requires TLS",
                    describe(target),
                    config.get_ssl_mode().as_str()
                )));
            }
            Negotiated::Refused(socket) => (socket, None, None),
        },
    };
    let mut startup = start_with(socket, config, Some(target.clone()), end_point).await?;
    startup.tls = used;
    Ok(startup)
}

/// The server's answer to TLS: a TLS session, or the plain socket back when it said no.
pub(crate) enum Negotiated {
    Tls(super::tls::Handshake),
    Refused(Socket),
}

/// Starts TLS on a fresh socket: SSLRequest and the server's one-byte answer first
/// (§55.2.10 "SSL Session Encryption"), or the handshake at once for `sslnegotiation=direct`.
pub(crate) async fn start_tls(
    mut socket: Socket,
    tls: &TlsConnector,
    target: &Target,
) -> Result<Negotiated> {
    let Host::Tcp(host) = &target.host else {
        return Ok(Negotiated::Refused(socket));
    };
    if tls.negotiation == SslNegotiation::Postgres {
        let mut request = bytes::BytesMut::new();
        frontend::ssl_request(&mut request);
        socket
            .write_all(&request)
            .await
            .map_err(|e| Error::io("could not send SSLRequest", e))?;
        // Exactly one byte: whatever follows 'S' belongs to the TLS handshake, and a server
        // (or a man in the middle) that sends more before it is caught by the handshake
        // instead of being read as plain-text protocol (CVE-2021-23222).
        let answer = socket
            .read_u8()
            .await
            .map_err(|e| Error::io("could not read the answer to SSLRequest", e))?;
        match answer {
            b'S' => {}
            b'N' => return Ok(Negotiated::Refused(socket)),
            // A server too old to know SSLRequest answers with an ErrorResponse.
            b'E' => return Err(Error::tls("the server does not understand SSLRequest")),
            other => {
                return Err(Error::protocol(format!(
                    "unexpected answer {other:#04x} to SSLRequest"
                )));
            }
        }
    }
    // libpq checks the certificate against `host`, even when `hostaddr` is what is dialled.
    tls.handshake(socket, host).await.map(Negotiated::Tls)
}

/// Runs startup and authentication over an already open socket.
pub(crate) async fn start_on(
    socket: Socket,
    config: &Config,
    target: Option<Target>,
) -> Result<Startup> {
    start_with(socket, config, target, None).await
}

/// Runs startup and authentication; `end_point` is the TLS channel binding data when the
/// socket runs over TLS.
async fn start_with(
    socket: Socket,
    config: &Config,
    target: Option<Target>,
    end_point: Option<Result<Vec<u8>>>,
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
    // Protocol 3.2 (PostgreSQL 18: longer cancel keys) only when asked for, as libpq 18: an
    // older server answers NegotiateProtocolVersion and the session continues in 3.0.
    let minor = |version: Option<&str>| -> u16 {
        match version {
            Some("3.2" | "latest") => 2,
            _ => 0,
        }
    };
    let asked_minor = minor(config.get_max_protocol_version());
    let least_minor = minor(config.get_min_protocol_version());
    let version = if asked_minor == 2 {
        frontend::PROTOCOL_3_2
    } else {
        frontend::PROTOCOL_3_0
    };
    frontend::startup(&mut stream.write_buf, version, &params)?;
    stream.flush().await?;

    let (host, port) = match &target {
        Some(t) => (t.host.clone(), t.port),
        None => (Host::Tcp(String::new()), 0),
    };
    let minor = authenticate(
        &mut stream,
        config,
        &host,
        port,
        &user,
        end_point,
        (asked_minor, least_minor),
    )
    .await?;
    let mut startup = finish_startup(stream, target).await?;
    startup.protocol_minor = minor;
    Ok(startup)
}

/// Turns an ErrorResponse received before ReadyForQuery into an error: SQLSTATE class 28
/// ("invalid authorization specification", e.g. 28P01 wrong password) is an auth failure.
fn startup_error(db: Box<crate::error::DbError>) -> Error {
    let kind = if db.code().class() == SqlState::INVALID_AUTHORIZATION_SPECIFICATION {
        ErrorKind::Auth
    } else {
        ErrorKind::Db
    };
    Error::with_db(kind, db)
}

/// The authentication exchange (§55.2.1). `require_auth` and `channel_binding=require` are
/// checked when the server names its method, before any secret is sent: a server (or an
/// impostor) that asks for a refused method learns nothing.
async fn authenticate(
    stream: &mut MessageStream,
    config: &Config,
    host: &Host,
    port: u16,
    user: &str,
    end_point: Option<Result<Vec<u8>>>,
    (asked_minor, least_minor): (u16, u16),
) -> Result<u16> {
    let mut minor = asked_minor;
    let binding = config.get_channel_binding();
    let allow = |method: &str| -> Result<()> {
        if !config.require_auth_allows(method) {
            return Err(Error::auth(format!(
                "the server asked for authentication method \"{method}\", which require_auth={} \
                 does not allow; nothing was sent",
                config.get_require_auth().unwrap_or_default()
            )));
        }
        if binding == ChannelBinding::Require && method != "scram-sha-256" {
            return Err(Error::auth(format!(
                "channel_binding=require, but the server asked for authentication method \
                 \"{method}\", which has no channel binding; nothing was sent"
            )));
        }
        Ok(())
    };
    // The method the server asked for (None: it let us in without asking), and whether it
    // was SCRAM bound to the TLS channel.
    let mut method: Option<&str> = None;
    let mut bound = false;
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
                    if method.is_none() && !config.require_auth_allows("none") {
                        return Err(Error::auth(format!(
                            "the server let us in without authentication, which \
                             require_auth={} does not allow",
                            config.get_require_auth().unwrap_or_default()
                        )));
                    }
                    if binding == ChannelBinding::Require && !bound {
                        return Err(Error::auth(
                            "channel_binding=require, but the server authenticated us without \
                             channel binding",
                        ));
                    }
                    return Ok(minor);
                }
                Authentication::CleartextPassword => {
                    allow("password")?;
                    method = Some("password");
                    frontend::password(&mut stream.write_buf, &password()?)?;
                    stream.flush().await?;
                }
                Authentication::Md5Password { salt } => {
                    allow("md5")?;
                    method = Some("md5");
                    let hash = protocol::md5_password(user.as_bytes(), &password()?, salt);
                    frontend::password(&mut stream.write_buf, hash.as_bytes())?;
                    stream.flush().await?;
                }
                Authentication::Sasl(mechanisms) => {
                    if scram.is_some() {
                        return Err(Error::protocol("the server restarted SASL authentication"));
                    }
                    allow("scram-sha-256")?;
                    method = Some("scram-sha-256");
                    let (mechanism, cbind) = choose_mechanism(&mechanisms, binding, &end_point)?;
                    bound = matches!(cbind, Gs2Binding::TlsServerEndPoint(_));
                    let s = ScramSha256::new(&password()?, cbind);
                    frontend::sasl_initial_response(
                        &mut stream.write_buf,
                        mechanism,
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
                    .map_err(|e| {
                        Error::auth(format!("SCRAM computation failed: {e}")).with_source(e)
                    })?;
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
                // §55.2.1: the server offers the newest minor version it speaks that is not
                // above ours. The field is documented as the minor version, but servers send
                // the whole version number (major << 16 | minor), as libpq reads it; both are
                // understood. We send no `_pq_.` options, so none can be unrecognized.
                let offered = match newest_minor {
                    v if (0..=0xffff).contains(&v) => v as u16,
                    v if v >> 16 == 3 => (v & 0xffff) as u16,
                    _ => u16::MAX,
                };
                if offered > asked_minor || !unrecognized.is_empty() {
                    return Err(Error::protocol(format!(
                        "NegotiateProtocolVersion offers 3.{newest_minor} (we asked for \
                         3.{asked_minor}) and rejects options {unrecognized:?}"
                    )));
                }
                if offered < least_minor {
                    return Err(Error::config(format!(
                        "the server speaks protocol 3.{offered} at most, but \
                         min_protocol_version=3.{least_minor}"
                    )));
                }
                minor = offered;
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

/// Picks the SASL mechanism and the gs2 channel binding flag (RFC 5802 §6, as libpq):
/// SCRAM-SHA-256-PLUS bound to the certificate when TLS is on and the server offers it;
/// otherwise plain SCRAM with `y` ("I could bind, but you did not offer it", which lets a
/// server that does support it detect a downgrade) under TLS, or `n` without TLS.
fn choose_mechanism(
    offered: &[String],
    binding: ChannelBinding,
    end_point: &Option<Result<Vec<u8>>>,
) -> Result<(&'static str, Gs2Binding)> {
    let offers = |m: &str| offered.iter().any(|o| o == m);
    if binding != ChannelBinding::Disable && offers(scram::SCRAM_SHA_256_PLUS) {
        match end_point {
            Some(Ok(hash)) => {
                return Ok((
                    scram::SCRAM_SHA_256_PLUS,
                    Gs2Binding::TlsServerEndPoint(hash.clone()),
                ));
            }
            Some(Err(e)) if binding == ChannelBinding::Require => {
                let refused = Error::auth(format!("channel_binding=require: {e}"));
                return Err(refused.with_source(e.duplicate()));
            }
            _ => {}
        }
    }
    if binding == ChannelBinding::Require {
        return Err(Error::auth(if end_point.is_none() {
            "channel_binding=require, but the connection does not use TLS, so there is no \
             channel to bind to"
                .to_owned()
        } else {
            format!(
                "channel_binding=require, but the server offers no SASL mechanism with channel \
                 binding ({})",
                offered.join(", ")
            )
        }));
    }
    if !offers(scram::SCRAM_SHA_256) {
        return Err(Error::auth(format!(
            "none of the server's SASL mechanisms ({}) is supported",
            offered.join(", ")
        )));
    }
    let flag = match end_point {
        Some(Ok(_)) if binding != ChannelBinding::Disable => Gs2Binding::UnusedByClient,
        _ => Gs2Binding::Unsupported,
    };
    Ok((scram::SCRAM_SHA_256, flag))
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
                    tls: None,
                    protocol_minor: 0,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keepalive_settings_reach_the_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = TcpStream::connect(addr).await.unwrap();
        let config = Config::parse(
            "keepalives_idle=42 keepalives_interval=7 keepalives_count=3 tcp_user_timeout=9000",
        )
        .unwrap();
        set_keepalives(&stream, &config).unwrap();
        let socket = socket2::SockRef::from(&stream);
        assert!(socket.keepalive().unwrap());
        assert_eq!(
            socket.tcp_keepalive_time().unwrap(),
            Duration::from_secs(42)
        );
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(7)
        );
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), 3);
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(9))
        );

        let off = Config::parse("keepalives=0").unwrap();
        set_keepalives(&stream, &off).unwrap();
        assert!(!socket.keepalive().unwrap());
    }
}
