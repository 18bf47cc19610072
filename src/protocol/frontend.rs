//! Messages the client sends (PostgreSQL docs §55.7 "Message Formats", those marked F).
//!
//! Each message has an encoder that appends it to a `BytesMut`, so a whole pipeline (Parse,
//! Bind, Describe, Execute, Sync) is built in one buffer and goes out in one write. The
//! [`FrontendMessage`] enum decodes them again: the scripted test server and the round-trip
//! property tests use it; the driver itself only encodes.
//!
//! Every tagged message has the same frame:
//!
//! ```text
//! +-----+-----------+----------------+
//! | tag | length:i32| body           |   length counts itself and the body, not the tag
//! +-----+-----------+----------------+
//! ```
//!
//! The startup-phase messages (StartupMessage, SSLRequest, GSSENCRequest, CancelRequest) have no
//! tag: their first Int32 is the length, the second a code that says which one it is.

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::{Reader, count_i16, put_cstr, write_message};
use crate::error::{Error, Result};

/// Protocol version 3.0, as the StartupMessage's version field.
pub const PROTOCOL_3_0: i32 = 196_608;
/// Protocol version 3.2 (PostgreSQL 18), as the StartupMessage's version field.
pub const PROTOCOL_3_2: i32 = 196_610;
/// The "version" of an SSLRequest: 1234 in the high 16 bits, 5679 in the low.
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
/// The "version" of a GSSENCRequest.
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
/// The "version" of a CancelRequest.
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;

/// Which kind of object a Describe or Close names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A prepared statement (`'S'`).
    Statement,
    /// A portal (`'P'`).
    Portal,
}

impl Target {
    fn byte(self) -> u8 {
        match self {
            Target::Statement => b'S',
            Target::Portal => b'P',
        }
    }

    fn from_byte(b: u8) -> Result<Target> {
        match b {
            b'S' => Ok(Target::Statement),
            b'P' => Ok(Target::Portal),
            other => Err(Error::protocol(format!(
                "Describe/Close target must be 'S' or 'P', not {other:#04x}"
            ))),
        }
    }
}

/// StartupMessage: the protocol version and `name=value` parameters (user, database, …).
///
/// ```text
/// length:i32 | version:i32 | (name:cstr value:cstr)* | 0
/// ```
pub fn startup(buf: &mut BytesMut, version: i32, params: &[(&str, &str)]) -> Result<()> {
    write_message(buf, None, |buf| {
        buf.put_i32(version);
        for (name, value) in params {
            put_cstr(buf, name.as_bytes(), "a startup parameter name")?;
            put_cstr(buf, value.as_bytes(), "a startup parameter value")?;
        }
        buf.put_u8(0);
        Ok(())
    })
}

/// SSLRequest: asks the server whether it will speak TLS on this socket.
///
/// ```text
/// length:i32 = 8 | 80877103:i32
/// ```
pub fn ssl_request(buf: &mut BytesMut) {
    buf.put_i32(8);
    buf.put_i32(SSL_REQUEST_CODE);
}

/// CancelRequest: sent on a new connection to cancel the query running on another one.
///
/// ```text
/// length:i32 | 80877102:i32 | process_id:i32 | secret_key (4 bytes in 3.0, up to 256 in 3.2)
/// ```
pub fn cancel_request(buf: &mut BytesMut, process_id: i32, secret_key: &[u8]) {
    buf.put_i32(12 + secret_key.len() as i32);
    buf.put_i32(CANCEL_REQUEST_CODE);
    buf.put_i32(process_id);
    buf.put_slice(secret_key);
}

/// PasswordMessage: a cleartext or MD5-hashed password.
///
/// ```text
/// 'p' | length:i32 | password:cstr
/// ```
pub fn password(buf: &mut BytesMut, password: &[u8]) -> Result<()> {
    write_message(buf, Some(b'p'), |buf| put_cstr(buf, password, "a password"))
}

/// SASLInitialResponse: the chosen mechanism and the client-first-message.
///
/// ```text
/// 'p' | length:i32 | mechanism:cstr | data_len:i32 (-1 for none) | data
/// ```
pub fn sasl_initial_response(buf: &mut BytesMut, mechanism: &str, data: &[u8]) -> Result<()> {
    write_message(buf, Some(b'p'), |buf| {
        put_cstr(buf, mechanism.as_bytes(), "a SASL mechanism")?;
        buf.put_i32(data.len() as i32);
        buf.put_slice(data);
        Ok(())
    })
}

/// SASLResponse: a further SASL message (SCRAM's client-final-message).
///
/// ```text
/// 'p' | length:i32 | data
/// ```
pub fn sasl_response(buf: &mut BytesMut, data: &[u8]) -> Result<()> {
    write_message(buf, Some(b'p'), |buf| {
        buf.put_slice(data);
        Ok(())
    })
}

/// Query: one or more SQL statements for the simple query protocol.
///
/// ```text
/// 'Q' | length:i32 | sql:cstr
/// ```
pub fn query(buf: &mut BytesMut, sql: &str) -> Result<()> {
    query_parts(buf, &[sql])
}

/// Query whose SQL text is `parts` one after the other: no string to build first. The
/// transaction and savepoint commands' path: the length is known before anything is written,
/// so the message goes in with one reservation and no length patched in afterwards.
pub(crate) fn query_parts(buf: &mut BytesMut, parts: &[&str]) -> Result<()> {
    let text: usize = parts.iter().map(|part| part.len()).sum();
    // The length counts itself and the NUL, not the tag.
    let Ok(len) = i32::try_from(text + 5) else {
        return Err(Error::protocol(format!(
            "a query of {text} bytes is too large to send"
        )));
    };
    let start = buf.len();
    buf.reserve(1 + len as usize);
    buf.put_u8(b'Q');
    buf.put_i32(len);
    for part in parts {
        buf.extend_from_slice(part.as_bytes());
    }
    // One look for a NUL over the whole text, not one per part.
    if buf[start + 5..].contains(&0) {
        buf.truncate(start);
        return Err(Error::conversion("SQL text must not contain a NUL byte"));
    }
    buf.put_u8(0);
    Ok(())
}

/// Parse: prepares `sql` as the statement `name` ("" for the unnamed statement). A type OID of
/// 0 leaves that parameter's type to the server.
///
/// ```text
/// 'P' | length:i32 | name:cstr | sql:cstr | n:i16 | type_oid:i32 * n
/// ```
pub fn parse(buf: &mut BytesMut, name: &str, sql: &str, param_types: &[u32]) -> Result<()> {
    write_message(buf, Some(b'P'), |buf| {
        put_cstr(buf, name.as_bytes(), "a statement name")?;
        put_cstr(buf, sql.as_bytes(), "SQL text")?;
        buf.put_i16(count_i16(param_types.len(), "parameter types")?);
        for &oid in param_types {
            buf.put_u32(oid);
        }
        Ok(())
    })
}

/// Bind: creates `portal` from `statement` with parameter values.
///
/// `write_param(i, buf)` appends the value of parameter `i` and returns `Ok(false)`, or
/// appends nothing and returns `Ok(true)` for NULL; the length prefix is written here, so a
/// value is serialised straight into the outgoing buffer with no copy.
///
/// ```text
/// 'B' | length:i32 | portal:cstr | statement:cstr
///     | nf:i16 | format:i16 * nf          (0 = text, 1 = binary; 0 or 1 entry = applies to all)
///     | np:i16 | (len:i32 (-1 = NULL) | value) * np
///     | nr:i16 | result_format:i16 * nr
/// ```
pub fn bind<E, F>(
    buf: &mut BytesMut,
    portal: &str,
    statement: &str,
    param_formats: &[i16],
    param_count: usize,
    mut write_param: F,
    result_formats: &[i16],
) -> std::result::Result<(), E>
where
    E: From<Error>,
    F: FnMut(usize, &mut BytesMut) -> std::result::Result<bool, E>,
{
    write_message(buf, Some(b'B'), |buf| {
        put_cstr(buf, portal.as_bytes(), "a portal name")?;
        put_cstr(buf, statement.as_bytes(), "a statement name")?;
        buf.put_i16(count_i16(param_formats.len(), "parameter formats")?);
        for &f in param_formats {
            buf.put_i16(f);
        }
        buf.put_i16(count_i16(param_count, "parameters")?);
        for i in 0..param_count {
            put_param(buf, i, |buf| write_param(i, buf))?;
        }
        buf.put_i16(count_i16(result_formats.len(), "result formats")?);
        for &f in result_formats {
            buf.put_i16(f);
        }
        Ok(())
    })
}

/// The largest value a Bind can carry: the server refuses any message longer than
/// `MaxAllocSize - 1` (PostgreSQL's `PQ_LARGE_MESSAGE_LIMIT`, 1 GiB less two bytes), so a
/// longer value is refused here, before anything is sent, instead of costing the session.
pub(crate) const MAX_VALUE_LEN: usize = 0x3FFF_FFFE;

/// Writes parameter `i` of a Bind: its length, then what `write` puts after it, which says
/// whether the value is NULL (length -1, nothing after it).
pub(crate) fn put_param<E: From<Error>>(
    buf: &mut BytesMut,
    i: usize,
    write: impl FnOnce(&mut BytesMut) -> std::result::Result<bool, E>,
) -> std::result::Result<(), E> {
    let len_at = buf.len();
    buf.put_i32(0);
    let is_null = write(buf)?;
    let len = if is_null {
        buf.truncate(len_at + 4);
        -1
    } else {
        let len = buf.len() - len_at - 4;
        if len > MAX_VALUE_LEN {
            return Err(Error::conversion(format!(
                "parameter ${} is {len} bytes, over the 1 GiB a server accepts in one message",
                i + 1
            ))
            .into());
        }
        len as i32
    };
    buf[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Describe: asks for a statement's parameter and row description, or a portal's row
/// description.
///
/// ```text
/// 'D' | length:i32 | 'S' or 'P' | name:cstr
/// ```
pub fn describe(buf: &mut BytesMut, target: Target, name: &str) -> Result<()> {
    write_message(buf, Some(b'D'), |buf| {
        buf.put_u8(target.byte());
        put_cstr(buf, name.as_bytes(), "a statement or portal name")
    })
}

/// Execute: runs `portal`, returning at most `max_rows` rows (0 = all); if rows remain, the
/// server answers PortalSuspended instead of CommandComplete.
///
/// ```text
/// 'E' | length:i32 | portal:cstr | max_rows:i32
/// ```
pub fn execute(buf: &mut BytesMut, portal: &str, max_rows: i32) -> Result<()> {
    write_message(buf, Some(b'E'), |buf| {
        put_cstr(buf, portal.as_bytes(), "a portal name")?;
        buf.put_i32(max_rows);
        Ok(())
    })
}

/// Close: releases a prepared statement or a portal on the server.
///
/// ```text
/// 'C' | length:i32 | 'S' or 'P' | name:cstr
/// ```
pub fn close(buf: &mut BytesMut, target: Target, name: &str) -> Result<()> {
    write_message(buf, Some(b'C'), |buf| {
        buf.put_u8(target.byte());
        put_cstr(buf, name.as_bytes(), "a statement or portal name")
    })
}

fn empty(buf: &mut BytesMut, tag: u8) {
    buf.put_u8(tag);
    buf.put_i32(4);
}

/// Flush: asks the server to send what it has produced so far, without ending the pipeline.
///
/// ```text
/// 'H' | length:i32 = 4
/// ```
pub fn flush(buf: &mut BytesMut) {
    empty(buf, b'H');
}

/// Sync: ends an extended-protocol pipeline; the server answers ReadyForQuery. After an error
/// the server skips every message until the next Sync.
///
/// ```text
/// 'S' | length:i32 = 4
/// ```
pub fn sync(buf: &mut BytesMut) {
    empty(buf, b'S');
}

/// Terminate: a polite goodbye before closing the socket.
///
/// ```text
/// 'X' | length:i32 = 4
/// ```
pub fn terminate(buf: &mut BytesMut) {
    empty(buf, b'X');
}

/// CopyData: a chunk of COPY FROM STDIN data.
///
/// ```text
/// 'd' | length:i32 | data
/// ```
pub fn copy_data(buf: &mut BytesMut, data: &[u8]) -> Result<()> {
    write_message(buf, Some(b'd'), |buf| {
        buf.put_slice(data);
        Ok(())
    })
}

/// CopyDone: the end of COPY FROM STDIN data.
///
/// ```text
/// 'c' | length:i32 = 4
/// ```
pub fn copy_done(buf: &mut BytesMut) {
    empty(buf, b'c');
}

/// CopyFail: aborts COPY FROM STDIN with an error message.
///
/// ```text
/// 'f' | length:i32 | message:cstr
/// ```
pub fn copy_fail(buf: &mut BytesMut, message: &str) -> Result<()> {
    write_message(buf, Some(b'f'), |buf| {
        put_cstr(buf, message.as_bytes(), "a CopyFail message")
    })
}

/// A decoded client message, as a server (our scripted test server) sees it. Each variant is
/// the message of the same name in the PostgreSQL docs' "Message Formats", its fields as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontendMessage {
    /// StartupMessage.
    Startup {
        /// The protocol version asked for: the major version in the high 16 bits, the minor
        /// in the low 16 (196608 for 3.0).
        version: i32,
        /// The run-time parameters (`user`, `database`, `options`, …) in the order sent.
        params: Vec<(String, String)>,
    },
    /// SSLRequest.
    SslRequest,
    /// GSSENCRequest.
    GssEncRequest,
    /// CancelRequest.
    CancelRequest {
        /// The process ID of the backend whose query is to be cancelled.
        process_id: i32,
        /// Its secret key: 4 bytes in protocol 3.0, up to 256 in 3.2.
        secret_key: Bytes,
    },
    /// PasswordMessage, SASLInitialResponse and SASLResponse share the tag `'p'`; only the
    /// authentication state tells them apart, so the body is kept raw (see
    /// [`FrontendMessage::sasl_initial_response`]).
    Password(Bytes),
    /// Query: the SQL text of a simple query.
    Query(String),
    /// Parse.
    Parse {
        /// The prepared statement's name; empty for the unnamed statement.
        name: String,
        /// The SQL text.
        sql: String,
        /// The parameters' type OIDs the client fixes; 0 leaves one to the server.
        param_types: Vec<u32>,
    },
    /// Bind.
    Bind {
        /// The portal's name; empty for the unnamed portal.
        portal: String,
        /// The prepared statement's name; empty for the unnamed statement.
        statement: String,
        /// The parameters' format codes (0 text, 1 binary): none (all text), one for all, or
        /// one each.
        param_formats: Vec<i16>,
        /// The parameters' values; `None` is NULL (length -1).
        params: Vec<Option<Bytes>>,
        /// The result columns' format codes, counted as `param_formats` are.
        result_formats: Vec<i16>,
    },
    /// Describe.
    Describe {
        /// A statement or a portal.
        target: Target,
        /// Its name; empty for the unnamed one.
        name: String,
    },
    /// Execute.
    Execute {
        /// The portal's name; empty for the unnamed portal.
        portal: String,
        /// The most rows to return before PortalSuspended; 0 for no limit.
        max_rows: i32,
    },
    /// Close.
    Close {
        /// A statement or a portal.
        target: Target,
        /// Its name; empty for the unnamed one.
        name: String,
    },
    /// Flush.
    Flush,
    /// Sync.
    Sync,
    /// Terminate.
    Terminate,
    /// CopyData: a piece of COPY FROM STDIN's data stream.
    CopyData(Bytes),
    /// CopyDone.
    CopyDone,
    /// CopyFail, with the client's reason.
    CopyFail(String),
}

impl FrontendMessage {
    /// Decodes the first message of a connection (untagged), or `Ok(None)` if `buf` does not
    /// hold all of it yet.
    pub fn decode_startup(buf: &mut BytesMut) -> Result<Option<FrontendMessage>> {
        if buf.len() < 8 {
            return Ok(None);
        }
        let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        // The server caps startup packets at 10000 bytes (MAX_STARTUP_PACKET_LENGTH).
        if !(8..=10_000).contains(&len) {
            return Err(Error::protocol(format!(
                "invalid startup packet length {len}"
            )));
        }
        let len = len as usize;
        if buf.len() < len {
            return Ok(None);
        }
        let body = buf.split_to(len).freeze().slice(4..);
        let mut r = Reader::new(&body, "StartupMessage");
        let code = r.i32()?;
        let msg = match code {
            SSL_REQUEST_CODE => FrontendMessage::SslRequest,
            GSSENC_REQUEST_CODE => FrontendMessage::GssEncRequest,
            CANCEL_REQUEST_CODE => {
                let process_id = r.i32()?;
                let secret_key = r.rest();
                FrontendMessage::CancelRequest {
                    process_id,
                    secret_key,
                }
            }
            version => {
                let mut params = Vec::new();
                loop {
                    let name = r.cstr()?;
                    if name.is_empty() {
                        break;
                    }
                    params.push((name, r.cstr()?));
                }
                FrontendMessage::Startup { version, params }
            }
        };
        r.finish()?;
        Ok(Some(msg))
    }

    /// Decodes one tagged message, or `Ok(None)` if `buf` does not hold all of it yet.
    pub fn decode(buf: &mut BytesMut, max_len: usize) -> Result<Option<FrontendMessage>> {
        let Some((tag, body)) = super::split_frame(buf, max_len)? else {
            return Ok(None);
        };
        let mut r = Reader::new(&body, "frontend");
        let msg = match tag {
            b'p' => FrontendMessage::Password(r.rest()),
            b'Q' => FrontendMessage::Query(r.cstr()?),
            b'P' => {
                let name = r.cstr()?;
                let sql = r.cstr()?;
                let n = r.count16("parameter type count")?;
                let param_types = (0..n).map(|_| r.u32()).collect::<Result<_>>()?;
                FrontendMessage::Parse {
                    name,
                    sql,
                    param_types,
                }
            }
            b'B' => {
                let portal = r.cstr()?;
                let statement = r.cstr()?;
                let n = r.count16("format count")?;
                let param_formats = (0..n).map(|_| r.i16()).collect::<Result<_>>()?;
                let n = r.count16("parameter count")?;
                let mut params = Vec::with_capacity(n);
                for _ in 0..n {
                    let len = r.i32()?;
                    params.push(match len {
                        -1 => None,
                        len if len >= 0 => Some(r.bytes(len as usize)?),
                        len => return Err(Error::protocol(format!("Bind value length {len}"))),
                    });
                }
                let n = r.count16("result format count")?;
                let result_formats = (0..n).map(|_| r.i16()).collect::<Result<_>>()?;
                FrontendMessage::Bind {
                    portal,
                    statement,
                    param_formats,
                    params,
                    result_formats,
                }
            }
            b'D' => FrontendMessage::Describe {
                target: Target::from_byte(r.u8()?)?,
                name: r.cstr()?,
            },
            b'E' => FrontendMessage::Execute {
                portal: r.cstr()?,
                max_rows: r.i32()?,
            },
            b'C' => FrontendMessage::Close {
                target: Target::from_byte(r.u8()?)?,
                name: r.cstr()?,
            },
            b'H' => FrontendMessage::Flush,
            b'S' => FrontendMessage::Sync,
            b'X' => FrontendMessage::Terminate,
            b'd' => FrontendMessage::CopyData(r.rest()),
            b'c' => FrontendMessage::CopyDone,
            b'f' => FrontendMessage::CopyFail(r.cstr()?),
            other => {
                return Err(Error::protocol(format!(
                    "unknown frontend message type {:?}",
                    other as char
                )));
            }
        };
        r.finish()?;
        Ok(Some(msg))
    }

    /// Reads a `Password` body as a SASLInitialResponse: `(mechanism, data)`; `data` is
    /// `None` when the client sent a length of -1.
    pub fn sasl_initial_response(body: &Bytes) -> Result<(String, Option<Bytes>)> {
        let mut r = Reader::new(body, "SASLInitialResponse");
        let mechanism = r.cstr()?;
        let len = r.i32()?;
        let data = if len == -1 {
            None
        } else {
            Some(r.bytes(len.max(0) as usize)?)
        };
        r.finish()?;
        Ok((mechanism, data))
    }

    /// Appends this message to `buf` (what a client would send).
    pub fn encode(&self, buf: &mut BytesMut) -> Result<()> {
        match self {
            FrontendMessage::Startup { version, params } => {
                let params: Vec<(&str, &str)> = params
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_str()))
                    .collect();
                startup(buf, *version, &params)
            }
            FrontendMessage::SslRequest => {
                ssl_request(buf);
                Ok(())
            }
            FrontendMessage::GssEncRequest => {
                buf.put_i32(8);
                buf.put_i32(GSSENC_REQUEST_CODE);
                Ok(())
            }
            FrontendMessage::CancelRequest {
                process_id,
                secret_key,
            } => {
                cancel_request(buf, *process_id, secret_key);
                Ok(())
            }
            FrontendMessage::Password(body) => sasl_response(buf, body),
            FrontendMessage::Query(sql) => query(buf, sql),
            FrontendMessage::Parse {
                name,
                sql,
                param_types,
            } => parse(buf, name, sql, param_types),
            FrontendMessage::Bind {
                portal,
                statement,
                param_formats,
                params,
                result_formats,
            } => bind::<Error, _>(
                buf,
                portal,
                statement,
                param_formats,
                params.len(),
                |i, buf| match &params[i] {
                    Some(v) => {
                        buf.put_slice(v);
                        Ok(false)
                    }
                    None => Ok(true),
                },
                result_formats,
            ),
            FrontendMessage::Describe { target, name } => describe(buf, *target, name),
            FrontendMessage::Execute { portal, max_rows } => execute(buf, portal, *max_rows),
            FrontendMessage::Close { target, name } => close(buf, *target, name),
            FrontendMessage::Flush => {
                flush(buf);
                Ok(())
            }
            FrontendMessage::Sync => {
                sync(buf);
                Ok(())
            }
            FrontendMessage::Terminate => {
                terminate(buf);
                Ok(())
            }
            FrontendMessage::CopyData(data) => copy_data(buf, data),
            FrontendMessage::CopyDone => {
                copy_done(buf);
                Ok(())
            }
            FrontendMessage::CopyFail(msg) => copy_fail(buf, msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_exact_bytes() {
        let mut buf = BytesMut::new();
        query(&mut buf, "SELECT 1").unwrap();
        assert_eq!(&buf[..], b"Q\0\0\0\x0dSELECT 1\0");
    }

    #[test]
    fn query_parts_write_what_the_joined_text_would() {
        let mut parts = BytesMut::from(&b"before"[..]);
        query_parts(&mut parts, &["SAVEPOINT", " \"", "s_1", "\""]).unwrap();
        let mut joined = BytesMut::from(&b"before"[..]);
        query(&mut joined, "SAVEPOINT \"s_1\"").unwrap();
        assert_eq!(parts, joined);
        let mut refused = BytesMut::from(&b"kept"[..]);
        assert!(query_parts(&mut refused, &["SELECT", "\0"]).is_err());
        assert_eq!(&refused[..], b"kept");
    }

    #[test]
    fn sync_and_terminate_exact_bytes() {
        let mut buf = BytesMut::new();
        sync(&mut buf);
        terminate(&mut buf);
        flush(&mut buf);
        assert_eq!(&buf[..], b"S\0\0\0\x04X\0\0\0\x04H\0\0\0\x04");
    }

    #[test]
    fn startup_exact_bytes() {
        let mut buf = BytesMut::new();
        startup(&mut buf, PROTOCOL_3_0, &[("user", "bob")]).unwrap();
        assert_eq!(&buf[..], b"\0\0\0\x12\0\x03\0\0user\0bob\0\0");
    }

    #[test]
    fn ssl_and_cancel_request_exact_bytes() {
        let mut buf = BytesMut::new();
        ssl_request(&mut buf);
        assert_eq!(&buf[..], b"\0\0\0\x08\x04\xd2\x16\x2f");
        buf.clear();
        cancel_request(&mut buf, 7, &[1, 2, 3, 4]);
        assert_eq!(
            &buf[..],
            b"\0\0\0\x10\x04\xd2\x16\x2e\0\0\0\x07\x01\x02\x03\x04"
        );
    }

    #[test]
    fn bind_exact_bytes_with_null() {
        let mut buf = BytesMut::new();
        let params: [Option<&[u8]>; 2] = [Some(b"\0\0\0\x2a"), None];
        bind::<Error, _>(
            &mut buf,
            "",
            "s1",
            &[1],
            2,
            |i, buf| match params[i] {
                Some(v) => {
                    buf.put_slice(v);
                    Ok(false)
                }
                None => Ok(true),
            },
            &[1],
        )
        .unwrap();
        let expected: &[u8] =
            b"B\0\0\0\x1e\0s1\0\0\x01\0\x01\0\x02\0\0\0\x04\0\0\0\x2a\xff\xff\xff\xff\0\x01\0\x01";
        assert_eq!(&buf[..], expected);
    }

    #[test]
    fn nul_in_sql_is_refused_and_buffer_untouched() {
        let mut buf = BytesMut::new();
        sync(&mut buf);
        assert!(query(&mut buf, "SELECT\0 1").is_err());
        assert_eq!(&buf[..], b"S\0\0\0\x04");
    }

    #[test]
    fn failing_bind_param_leaves_buffer_untouched() {
        let mut buf = BytesMut::new();
        let r = bind::<Error, _>(
            &mut buf,
            "",
            "",
            &[],
            1,
            |_, buf| {
                buf.put_slice(b"partial");
                Err(Error::conversion("nope"))
            },
            &[],
        );
        assert!(r.is_err());
        assert!(buf.is_empty());
    }
}
