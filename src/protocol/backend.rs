//! Messages the server sends (PostgreSQL docs §55.7 "Message Formats", those marked B).
//!
//! [`BackendMessage::decode`] takes one framed message body and returns a typed message, or a
//! protocol error for anything malformed — never a panic, whatever the bytes. Row data is not
//! copied: a [`DataRow`] keeps a `Bytes` slice of the read buffer and is walked lazily.
//!
//! [`BackendMessage::encode`] writes a message as a server would; the scripted test server and
//! the round-trip property tests use it.

use std::ops::Range;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::codec::{Reader, count_i16, put_cstr, write_message};
use crate::error::{DbError, Error, ErrorPosition, Result};

/// The transaction status carried by ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransactionStatus {
    /// `'I'`: not in a transaction block.
    Idle,
    /// `'T'`: in a transaction block.
    InTransaction,
    /// `'E'`: in a failed transaction block; queries are rejected until it ends.
    Failed,
}

impl TransactionStatus {
    /// The status for a byte on the wire, if it is one.
    #[inline]
    pub fn from_byte(byte: u8) -> Option<TransactionStatus> {
        match byte {
            b'I' => Some(TransactionStatus::Idle),
            b'T' => Some(TransactionStatus::InTransaction),
            b'E' => Some(TransactionStatus::Failed),
            _ => None,
        }
    }

    /// The status byte on the wire.
    pub fn byte(self) -> u8 {
        match self {
            TransactionStatus::Idle => b'I',
            TransactionStatus::InTransaction => b'T',
            TransactionStatus::Failed => b'E',
        }
    }
}

/// The body of an Authentication message (`'R'`), by its Int32 code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication {
    /// 0: authentication succeeded.
    Ok,
    /// 2: Kerberos V5 (unsupported by servers since 9.x).
    KerberosV5,
    /// 3: send the password in cleartext.
    CleartextPassword,
    /// 5: send `md5(md5(password + user) + salt)`.
    Md5Password {
        /// The 4-byte salt.
        salt: [u8; 4],
    },
    /// 7: GSSAPI.
    Gss,
    /// 8: more GSSAPI or SSPI data.
    GssContinue(Bytes),
    /// 9: SSPI.
    Sspi,
    /// 10: SASL, with the mechanisms the server offers, in its order of preference.
    Sasl(Vec<String>),
    /// 11: a SASL challenge (SCRAM's server-first-message).
    SaslContinue(Bytes),
    /// 12: SASL outcome data (SCRAM's server-final-message).
    SaslFinal(Bytes),
}

/// One column of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDescription {
    /// The column name.
    pub name: String,
    /// OID of the table the column comes from, or 0.
    pub table_oid: u32,
    /// Attribute number of the column in that table, or 0.
    pub column_id: i16,
    /// OID of the column's data type.
    pub type_oid: u32,
    /// The type's size (`pg_type.typlen`); negative for variable width.
    pub type_size: i16,
    /// The type modifier (`pg_attribute.atttypmod`).
    pub type_modifier: i32,
    /// 0 for text, 1 for binary.
    pub format: i16,
}

/// One row of a result, holding the DataRow body as one shared buffer.
///
/// ```text
/// 'D' | length:i32 | n:i16 | (len:i32 (-1 = NULL) | value) * n
/// ```
///
/// The layout is checked once at decode time, so walking it later cannot fail.
#[derive(Clone)]
pub struct DataRow {
    /// The body after the column count.
    body: Bytes,
    layout: RowLayout,
}

/// How many columns after the first have their place noted in a [`RowLayout`]: 6, which with
/// the column count take 14 bytes, and cover most rows.
const NOTED: usize = 6;

/// What walking a DataRow's length words once finds: how many columns it has, and where the
/// length words of columns 1 to [`NOTED`] begin in the body after the column count (column
/// 0's is at 0), so that reading a column does not hop over every one before it; 0 where not
/// noted (past 64 KiB into the body).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowLayout {
    columns: u16,
    starts: [u16; NOTED],
}

impl PartialEq for DataRow {
    fn eq(&self, other: &DataRow) -> bool {
        // The layout follows from the body.
        self.layout.columns == other.layout.columns && self.body == other.body
    }
}

impl Eq for DataRow {}

/// The places of a row's columns as its layout is walked: column k's goes to slot k, those
/// past the noted ones all to the last slot — a store per column, with no branch.
struct Places([u16; NOTED + 2]);

impl Places {
    fn new() -> Places {
        Places([0; NOTED + 2])
    }

    /// Column `k`'s length word begins `at` bytes into the body (0 if that does not fit).
    #[inline(always)]
    fn note(&mut self, k: usize, at: usize) {
        self.0[k.min(NOTED + 1)] = u16::try_from(at).unwrap_or(0);
    }

    /// What a [`DataRow`] keeps: the places of columns 1 to [`NOTED`].
    fn starts(&self) -> [u16; NOTED] {
        let mut starts = [0; NOTED];
        starts.copy_from_slice(&self.0[1..=NOTED]);
        starts
    }
}

impl RowLayout {
    /// Checks the layout of a DataRow's body (from its column count on): that each value is
    /// there and nothing follows.
    #[inline(always)]
    pub(crate) fn check(b: &[u8]) -> Result<RowLayout> {
        // Every value of every row passes here: the length words are walked by hand rather
        // than through `Reader`.
        let truncated = || Error::protocol("DataRow message is truncated");
        let count = match b {
            [hi, lo, ..] => i16::from_be_bytes([*hi, *lo]),
            _ => return Err(truncated()),
        };
        let columns = u16::try_from(count).map_err(|_| {
            Error::protocol(format!("DataRow has a negative column count: {count}"))
        })?;
        let mut pos = 2;
        let mut places = Places::new();
        for k in 0..usize::from(columns) {
            places.note(k, pos - 2);
            let Some(word) = b.get(pos..pos + 4) else {
                return Err(truncated());
            };
            let len = i32::from_be_bytes([word[0], word[1], word[2], word[3]]);
            pos += 4;
            match usize::try_from(len) {
                Ok(len) if len <= b.len() - pos => pos += len,
                Ok(_) => return Err(truncated()),
                Err(_) if len == -1 => {}
                Err(_) => {
                    return Err(Error::protocol(format!(
                        "DataRow has a column length of {len}"
                    )));
                }
            }
        }
        if pos != b.len() {
            return Err(Error::protocol(format!(
                "DataRow message has {} unexpected trailing bytes",
                b.len() - pos
            )));
        }
        Ok(RowLayout {
            columns,
            starts: places.starts(),
        })
    }

    /// The number of columns.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        usize::from(self.columns)
    }

    /// The value of column `idx` in `body`, the body (after the column count) this layout
    /// was found in; `None` for NULL or out of range.
    #[inline]
    pub(crate) fn value<'a>(&self, body: &'a [u8], idx: usize) -> Option<&'a [u8]> {
        if idx >= usize::from(self.columns) {
            return None;
        }
        // From the place of column min(idx, NOTED), or from the start when that place lies
        // past 64 KiB (not noted), hop over the columns before it by their length words
        // alone. The layout was checked; the checked splits keep even a broken one in bounds.
        let (from, at) = match idx.min(NOTED) {
            0 => (0, 0),
            k => match self.starts[k - 1] {
                0 => (0, 0),
                at => (k, usize::from(at)),
            },
        };
        let mut rest: &[u8] = body.get(at..)?;
        for _ in from..idx {
            let (word, tail) = rest.split_first_chunk::<4>()?;
            rest = match usize::try_from(i32::from_be_bytes(*word)) {
                Ok(len) => tail.get(len..)?,
                Err(_) => tail,
            };
        }
        let (word, tail) = rest.split_first_chunk::<4>()?;
        let len = usize::try_from(i32::from_be_bytes(*word)).ok()?;
        tail.get(..len)
    }
}

impl DataRow {
    pub(crate) fn decode(mut body: Bytes) -> Result<DataRow> {
        let layout = RowLayout::check(&body)?;
        body.advance(2); // the column count; advancing an owned Bytes touches no counter
        Ok(DataRow { body, layout })
    }

    /// The body after the column count, and its layout.
    pub(crate) fn into_parts(self) -> (Bytes, RowLayout) {
        (self.body, self.layout)
    }

    /// The number of columns.
    pub fn len(&self) -> usize {
        self.layout.len()
    }

    /// True if the row has no columns.
    pub fn is_empty(&self) -> bool {
        self.layout.columns == 0
    }

    /// The whole buffer the ranges of [`DataRow::ranges`] index into.
    pub fn buffer(&self) -> &Bytes {
        &self.body
    }

    /// Each column's byte range in [`DataRow::buffer`], or `None` for NULL.
    pub fn ranges(&self) -> DataRowRanges<'_> {
        DataRowRanges {
            buf: &self.body,
            pos: 0,
            left: self.layout.columns,
        }
    }

    /// The value of column `idx` (`None` for NULL or out of range).
    pub fn value(&self, idx: usize) -> Option<&[u8]> {
        self.layout.value(&self.body, idx)
    }
}

impl std::fmt::Debug for DataRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.ranges().map(|r| r.map(|r| &self.body[r])))
            .finish()
    }
}

/// Iterator over a [`DataRow`]'s column ranges.
pub struct DataRowRanges<'a> {
    buf: &'a [u8],
    pos: usize,
    left: u16,
}

impl Iterator for DataRowRanges<'_> {
    type Item = Option<Range<usize>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // The layout was validated in DataRow::decode, so these reads are in bounds.
        let len_bytes = self.buf.get(self.pos..self.pos + 4)?;
        let len = i32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
        self.pos += 4;
        if len < 0 {
            return Some(None);
        }
        let start = self.pos;
        self.pos += len as usize;
        Some(Some(start..self.pos))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left as usize, Some(self.left as usize))
    }
}

/// The format of a COPY: overall and per column (CopyInResponse / CopyOutResponse /
/// CopyBothResponse).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyFormat {
    /// 0 for text, 1 for binary.
    pub format: i8,
    /// Each column's format code.
    pub column_formats: Vec<i16>,
}

/// A decoded server message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendMessage {
    /// `'R'`: an authentication request or outcome.
    Authentication(Authentication),
    /// `'K'`: the process id and secret key needed to cancel queries on this connection.
    BackendKeyData {
        /// The backend's process id.
        process_id: i32,
        /// The secret key: 4 bytes in protocol 3.0, up to 256 in 3.2.
        secret_key: Bytes,
    },
    /// `'2'`
    BindComplete,
    /// `'3'`
    CloseComplete,
    /// `'C'`: a command finished; the tag says which and how many rows (`"INSERT 0 5"`). Kept
    /// as bytes of the read buffer: it arrives once per statement, and only its row count is
    /// usually wanted.
    CommandComplete(Bytes),
    /// `'d'`: COPY data.
    CopyData(Bytes),
    /// `'c'`: the end of COPY TO STDOUT data.
    CopyDone,
    /// `'G'`: the server is ready for COPY FROM STDIN data.
    CopyInResponse(CopyFormat),
    /// `'H'`: COPY TO STDOUT data follows.
    CopyOutResponse(CopyFormat),
    /// `'W'`: streaming replication's COPY BOTH.
    CopyBothResponse(CopyFormat),
    /// `'D'`: one row.
    DataRow(DataRow),
    /// `'I'`: the query string was empty.
    EmptyQueryResponse,
    /// `'E'`: an error, with every field.
    ErrorResponse(Box<DbError>),
    /// `'V'`: the result of a function call (`None` for NULL).
    FunctionCallResponse(Option<Bytes>),
    /// `'v'`: the server does not support the requested minor version or some options.
    NegotiateProtocolVersion {
        /// The newest minor protocol version the server supports.
        newest_minor: i32,
        /// The protocol options (`_pq_.*`) it did not recognise.
        unrecognized: Vec<String>,
    },
    /// `'n'`: the statement returns no rows.
    NoData,
    /// `'N'`: a notice (warning, info); same fields as an error.
    NoticeResponse(Box<DbError>),
    /// `'A'`: a NOTIFY on a channel this session LISTENs to.
    NotificationResponse {
        /// The notifying backend's process id.
        process_id: i32,
        /// The channel name.
        channel: String,
        /// The payload.
        payload: String,
    },
    /// `'t'`: the parameter types of a prepared statement.
    ParameterDescription(Vec<u32>),
    /// `'S'`: a run-time parameter's current value (server_version, TimeZone, …).
    ParameterStatus {
        /// The parameter's name.
        name: String,
        /// Its value.
        value: String,
    },
    /// `'1'`
    ParseComplete,
    /// `'s'`: Execute's row limit was reached; the portal has more rows.
    PortalSuspended,
    /// `'Z'`: the server is ready for a new query; the byte is the transaction status.
    ReadyForQuery(TransactionStatus),
    /// `'T'`: the columns of the rows that follow.
    RowDescription(Vec<FieldDescription>),
}

/// The tag of a well-formed CommandComplete body: its text before the one NUL that ends it.
pub(crate) fn command_tag(body: &[u8]) -> Option<&[u8]> {
    let (&0, text) = body.split_last()? else {
        return None;
    };
    (!text.contains(&0)).then_some(text)
}

impl BackendMessage {
    /// Decodes the body of one message whose type byte is `tag`.
    pub fn decode(tag: u8, body: Bytes) -> Result<BackendMessage> {
        if tag == b'C'
            && let Some(text) = command_tag(&body)
        {
            // One per statement: the tag keeps the body's own handle on the buffer, cut
            // before its NUL. Anything else takes the general path and its errors.
            let len = text.len();
            let mut text = body;
            text.truncate(len);
            return Ok(BackendMessage::CommandComplete(text));
        }
        let mut r = Reader::new(&body, message_name(tag));
        let msg = match tag {
            b'R' => BackendMessage::Authentication(decode_authentication(&mut r)?),
            b'K' => {
                let process_id = r.i32()?;
                let secret_key = r.rest();
                if !(4..=256).contains(&secret_key.len()) {
                    return Err(Error::protocol(format!(
                        "BackendKeyData has a secret key of {} bytes (must be 4 to 256)",
                        secret_key.len()
                    )));
                }
                BackendMessage::BackendKeyData {
                    process_id,
                    secret_key,
                }
            }
            b'2' => BackendMessage::BindComplete,
            b'3' => BackendMessage::CloseComplete,
            b'C' => BackendMessage::CommandComplete(r.cstr_bytes()?),
            b'd' => BackendMessage::CopyData(r.rest()),
            b'c' => BackendMessage::CopyDone,
            b'G' => BackendMessage::CopyInResponse(decode_copy_format(&mut r)?),
            b'H' => BackendMessage::CopyOutResponse(decode_copy_format(&mut r)?),
            b'W' => BackendMessage::CopyBothResponse(decode_copy_format(&mut r)?),
            b'D' => return Ok(BackendMessage::DataRow(DataRow::decode(body)?)),
            b'I' => BackendMessage::EmptyQueryResponse,
            // Boxed: errors are rare, and inline they would make every message ten times larger.
            b'E' => {
                return Ok(BackendMessage::ErrorResponse(Box::new(DbError::parse(
                    &body,
                )?)));
            }
            b'N' => {
                return Ok(BackendMessage::NoticeResponse(Box::new(DbError::parse(
                    &body,
                )?)));
            }
            b'V' => {
                let len = r.i32()?;
                BackendMessage::FunctionCallResponse(match len {
                    -1 => None,
                    len if len >= 0 => Some(r.bytes(len as usize)?),
                    len => {
                        return Err(Error::protocol(format!(
                            "FunctionCallResponse has a length of {len}"
                        )));
                    }
                })
            }
            b'v' => {
                let newest_minor = r.i32()?;
                let n = r.i32()?;
                if n < 0 || n as usize > r.remaining() {
                    return Err(Error::protocol(format!(
                        "NegotiateProtocolVersion lists {n} options"
                    )));
                }
                let unrecognized = (0..n).map(|_| r.cstr()).collect::<Result<_>>()?;
                BackendMessage::NegotiateProtocolVersion {
                    newest_minor,
                    unrecognized,
                }
            }
            b'n' => BackendMessage::NoData,
            b'A' => BackendMessage::NotificationResponse {
                process_id: r.i32()?,
                channel: r.cstr()?,
                payload: r.cstr()?,
            },
            b't' => {
                let n = r.i16()?;
                // The server sends the count as Int16 but allows up to 65535 parameters.
                let n = n as u16 as usize;
                let oids = (0..n).map(|_| r.u32()).collect::<Result<_>>()?;
                BackendMessage::ParameterDescription(oids)
            }
            b'S' => BackendMessage::ParameterStatus {
                name: r.cstr()?,
                value: r.cstr()?,
            },
            b'1' => BackendMessage::ParseComplete,
            b's' => BackendMessage::PortalSuspended,
            b'Z' => {
                let byte = r.u8()?;
                BackendMessage::ReadyForQuery(TransactionStatus::from_byte(byte).ok_or_else(
                    || {
                        Error::protocol(format!(
                            "ReadyForQuery has an unknown transaction status {byte:#04x}"
                        ))
                    },
                )?)
            }
            b'T' => {
                let n = r.count16("field count")?;
                // Each field takes at least 19 bytes: never reserve more than the body can hold.
                let mut fields = Vec::with_capacity(n.min(r.remaining() / 19));
                for _ in 0..n {
                    fields.push(FieldDescription {
                        name: r.cstr()?,
                        table_oid: r.u32()?,
                        column_id: r.i16()?,
                        type_oid: r.u32()?,
                        type_size: r.i16()?,
                        type_modifier: r.i32()?,
                        format: r.i16()?,
                    });
                }
                BackendMessage::RowDescription(fields)
            }
            other => {
                return Err(Error::protocol(format!(
                    "unknown message type {:?} ({other:#04x}) from the server",
                    other as char
                )));
            }
        };
        r.finish()?;
        Ok(msg)
    }

    /// Appends this message to `buf`, as a server would send it.
    pub fn encode(&self, buf: &mut BytesMut) -> Result<()> {
        let tag = self.tag();
        write_message(buf, Some(tag), |buf| {
            match self {
                BackendMessage::Authentication(auth) => encode_authentication(auth, buf)?,
                BackendMessage::BackendKeyData {
                    process_id,
                    secret_key,
                } => {
                    buf.put_i32(*process_id);
                    buf.put_slice(secret_key);
                }
                BackendMessage::BindComplete
                | BackendMessage::CloseComplete
                | BackendMessage::CopyDone
                | BackendMessage::EmptyQueryResponse
                | BackendMessage::NoData
                | BackendMessage::ParseComplete
                | BackendMessage::PortalSuspended => {}
                BackendMessage::CommandComplete(tag) => put_cstr(buf, tag, "a tag")?,
                BackendMessage::CopyData(data) => buf.put_slice(data),
                BackendMessage::CopyInResponse(f)
                | BackendMessage::CopyOutResponse(f)
                | BackendMessage::CopyBothResponse(f) => {
                    buf.put_i8(f.format);
                    buf.put_i16(count_i16(f.column_formats.len(), "copy columns")?);
                    for &c in &f.column_formats {
                        buf.put_i16(c);
                    }
                }
                BackendMessage::DataRow(row) => {
                    buf.put_u16(row.layout.columns);
                    buf.put_slice(&row.body);
                }
                BackendMessage::ErrorResponse(db) | BackendMessage::NoticeResponse(db) => {
                    encode_error_fields(db, buf)?
                }
                BackendMessage::FunctionCallResponse(v) => match v {
                    Some(v) => {
                        buf.put_i32(v.len() as i32);
                        buf.put_slice(v);
                    }
                    None => buf.put_i32(-1),
                },
                BackendMessage::NegotiateProtocolVersion {
                    newest_minor,
                    unrecognized,
                } => {
                    buf.put_i32(*newest_minor);
                    buf.put_i32(unrecognized.len() as i32);
                    for o in unrecognized {
                        put_cstr(buf, o.as_bytes(), "an option")?;
                    }
                }
                BackendMessage::NotificationResponse {
                    process_id,
                    channel,
                    payload,
                } => {
                    buf.put_i32(*process_id);
                    put_cstr(buf, channel.as_bytes(), "a channel")?;
                    put_cstr(buf, payload.as_bytes(), "a payload")?;
                }
                BackendMessage::ParameterDescription(oids) => {
                    buf.put_u16(u16::try_from(oids.len()).map_err(|_| {
                        Error::conversion("too many parameters in ParameterDescription")
                    })?);
                    for &oid in oids {
                        buf.put_u32(oid);
                    }
                }
                BackendMessage::ParameterStatus { name, value } => {
                    put_cstr(buf, name.as_bytes(), "a parameter name")?;
                    put_cstr(buf, value.as_bytes(), "a parameter value")?;
                }
                BackendMessage::ReadyForQuery(status) => buf.put_u8(status.byte()),
                BackendMessage::RowDescription(fields) => {
                    buf.put_i16(count_i16(fields.len(), "fields")?);
                    for f in fields {
                        put_cstr(buf, f.name.as_bytes(), "a field name")?;
                        buf.put_u32(f.table_oid);
                        buf.put_i16(f.column_id);
                        buf.put_u32(f.type_oid);
                        buf.put_i16(f.type_size);
                        buf.put_i32(f.type_modifier);
                        buf.put_i16(f.format);
                    }
                }
            }
            Ok::<(), Error>(())
        })
    }

    /// The message's type byte.
    pub fn tag(&self) -> u8 {
        match self {
            BackendMessage::Authentication(_) => b'R',
            BackendMessage::BackendKeyData { .. } => b'K',
            BackendMessage::BindComplete => b'2',
            BackendMessage::CloseComplete => b'3',
            BackendMessage::CommandComplete(_) => b'C',
            BackendMessage::CopyData(_) => b'd',
            BackendMessage::CopyDone => b'c',
            BackendMessage::CopyInResponse(_) => b'G',
            BackendMessage::CopyOutResponse(_) => b'H',
            BackendMessage::CopyBothResponse(_) => b'W',
            BackendMessage::DataRow(_) => b'D',
            BackendMessage::EmptyQueryResponse => b'I',
            BackendMessage::ErrorResponse(_) => b'E',
            BackendMessage::FunctionCallResponse(_) => b'V',
            BackendMessage::NegotiateProtocolVersion { .. } => b'v',
            BackendMessage::NoData => b'n',
            BackendMessage::NoticeResponse(_) => b'N',
            BackendMessage::NotificationResponse { .. } => b'A',
            BackendMessage::ParameterDescription(_) => b't',
            BackendMessage::ParameterStatus { .. } => b'S',
            BackendMessage::ParseComplete => b'1',
            BackendMessage::PortalSuspended => b's',
            BackendMessage::ReadyForQuery(_) => b'Z',
            BackendMessage::RowDescription(_) => b'T',
        }
    }
}

/// Builds a DataRow from column values (the scripted test server uses it).
impl FromIterator<Option<Bytes>> for DataRow {
    fn from_iter<I: IntoIterator<Item = Option<Bytes>>>(iter: I) -> DataRow {
        let mut body = BytesMut::new();
        let mut columns: u16 = 0;
        let mut places = Places::new();
        for v in iter {
            places.note(usize::from(columns), body.len());
            columns = columns.saturating_add(1);
            match v {
                Some(v) => {
                    body.put_i32(v.len() as i32);
                    body.put_slice(&v);
                }
                None => body.put_i32(-1),
            }
        }
        DataRow {
            body: body.freeze(),
            layout: RowLayout {
                columns,
                starts: places.starts(),
            },
        }
    }
}

fn message_name(tag: u8) -> &'static str {
    match tag {
        b'R' => "Authentication",
        b'K' => "BackendKeyData",
        b'C' => "CommandComplete",
        b'G' => "CopyInResponse",
        b'H' => "CopyOutResponse",
        b'W' => "CopyBothResponse",
        b'D' => "DataRow",
        b'E' => "ErrorResponse",
        b'N' => "NoticeResponse",
        b'V' => "FunctionCallResponse",
        b'v' => "NegotiateProtocolVersion",
        b'A' => "NotificationResponse",
        b't' => "ParameterDescription",
        b'S' => "ParameterStatus",
        b'Z' => "ReadyForQuery",
        b'T' => "RowDescription",
        _ => "backend",
    }
}

fn decode_authentication(r: &mut Reader<'_>) -> Result<Authentication> {
    Ok(match r.i32()? {
        0 => Authentication::Ok,
        2 => Authentication::KerberosV5,
        3 => Authentication::CleartextPassword,
        5 => {
            let salt = r.bytes(4)?;
            Authentication::Md5Password {
                salt: [salt[0], salt[1], salt[2], salt[3]],
            }
        }
        7 => Authentication::Gss,
        8 => Authentication::GssContinue(r.rest()),
        9 => Authentication::Sspi,
        10 => {
            let mut mechanisms = Vec::new();
            loop {
                let m = r.cstr()?;
                if m.is_empty() {
                    break;
                }
                mechanisms.push(m);
            }
            Authentication::Sasl(mechanisms)
        }
        11 => Authentication::SaslContinue(r.rest()),
        12 => Authentication::SaslFinal(r.rest()),
        code => {
            return Err(Error::auth(format!(
                "the server asked for an unknown authentication method (code {code})"
            )));
        }
    })
}

fn encode_authentication(auth: &Authentication, buf: &mut BytesMut) -> Result<()> {
    match auth {
        Authentication::Ok => buf.put_i32(0),
        Authentication::KerberosV5 => buf.put_i32(2),
        Authentication::CleartextPassword => buf.put_i32(3),
        Authentication::Md5Password { salt } => {
            buf.put_i32(5);
            buf.put_slice(salt);
        }
        Authentication::Gss => buf.put_i32(7),
        Authentication::GssContinue(d) => {
            buf.put_i32(8);
            buf.put_slice(d);
        }
        Authentication::Sspi => buf.put_i32(9),
        Authentication::Sasl(mechanisms) => {
            buf.put_i32(10);
            for m in mechanisms {
                put_cstr(buf, m.as_bytes(), "a SASL mechanism")?;
            }
            buf.put_u8(0);
        }
        Authentication::SaslContinue(d) => {
            buf.put_i32(11);
            buf.put_slice(d);
        }
        Authentication::SaslFinal(d) => {
            buf.put_i32(12);
            buf.put_slice(d);
        }
    }
    Ok(())
}

fn decode_copy_format(r: &mut Reader<'_>) -> Result<CopyFormat> {
    let format = r.u8()? as i8;
    let n = r.count16("column count")?;
    let column_formats = (0..n).map(|_| r.i16()).collect::<Result<_>>()?;
    Ok(CopyFormat {
        format,
        column_formats,
    })
}

fn encode_error_fields(db: &DbError, buf: &mut BytesMut) -> Result<()> {
    let mut field = |ty: u8, v: &str| -> Result<()> {
        buf.put_u8(ty);
        put_cstr(buf, v.as_bytes(), "an error field")
    };
    field(b'S', db.severity())?;
    if let Some(v) = db.severity_nonlocalized() {
        field(b'V', v)?;
    }
    field(b'C', db.code().as_str())?;
    field(b'M', db.message())?;
    let line = db.line().map(|l| l.to_string());
    let optional: [(u8, Option<&str>); 12] = [
        (b'D', db.detail()),
        (b'H', db.hint()),
        (b'W', db.where_()),
        (b's', db.schema()),
        (b't', db.table()),
        (b'c', db.column()),
        (b'd', db.datatype()),
        (b'n', db.constraint()),
        (b'F', db.file()),
        (b'L', line.as_deref()),
        (b'R', db.routine()),
        (0, None),
    ];
    for (ty, v) in optional {
        if let Some(v) = v {
            field(ty, v)?;
        }
    }
    match db.position() {
        Some(ErrorPosition::Original(p)) => field(b'P', &p.to_string())?,
        Some(ErrorPosition::Internal { position, query }) => {
            field(b'p', &position.to_string())?;
            field(b'q', query)?;
        }
        None => {}
    }
    buf.put_u8(0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &'static [u8]) -> Result<BackendMessage> {
        BackendMessage::decode(bytes[0], Bytes::from_static(&bytes[5..]))
    }

    #[test]
    fn ready_for_query() {
        assert_eq!(
            decode(b"Z\0\0\0\x05T").unwrap(),
            BackendMessage::ReadyForQuery(TransactionStatus::InTransaction)
        );
        assert!(decode(b"Z\0\0\0\x05X").is_err());
        assert!(decode(b"Z\0\0\0\x04").is_err());
    }

    #[test]
    fn data_row_with_null() {
        let msg = decode(b"D\0\0\0\x13\0\x02\0\0\0\x03abc\xff\xff\xff\xff").unwrap();
        let BackendMessage::DataRow(row) = msg else {
            panic!("not a DataRow: {msg:?}")
        };
        assert_eq!(row.len(), 2);
        assert_eq!(row.value(0), Some(&b"abc"[..]));
        assert_eq!(row.value(1), None);
    }

    #[test]
    fn data_row_values_far_into_a_long_row() {
        // Columns whose places lie past 64 KiB into the body are found by walking: a long
        // value first, then values of every kind, read in every order.
        let long = Bytes::from(vec![7u8; 70_000]);
        let mut cols: Vec<Option<Bytes>> = vec![Some(Bytes::from_static(b"a")), Some(long)];
        for i in 0..9u8 {
            cols.push(match i % 3 {
                0 => None,
                1 => Some(Bytes::new()),
                _ => Some(Bytes::from(vec![i; usize::from(i)])),
            });
        }
        let built: DataRow = cols.iter().cloned().collect();
        let mut wire = BytesMut::new();
        BackendMessage::DataRow(built.clone())
            .encode(&mut wire)
            .unwrap();
        let Some(BackendMessage::DataRow(row)) =
            super::super::read_message(&mut wire, usize::MAX).unwrap()
        else {
            panic!("not a DataRow")
        };
        assert_eq!(row, built);
        for r in [&row, &built] {
            for i in (0..cols.len()).rev().chain(0..cols.len()) {
                assert_eq!(r.value(i), cols[i].as_deref(), "column {i}");
            }
            assert_eq!(r.value(cols.len()), None);
        }
    }

    #[test]
    fn data_row_values_past_nulls_and_empty_values() {
        // "abc", NULL, "", "xy".
        let msg =
            decode(b"D\0\0\0\x1b\0\x04\0\0\0\x03abc\xff\xff\xff\xff\0\0\0\0\0\0\0\x02xy").unwrap();
        let BackendMessage::DataRow(row) = msg else {
            panic!("not a DataRow: {msg:?}")
        };
        let values: Vec<Option<&[u8]>> = (0..5).map(|i| row.value(i)).collect();
        assert_eq!(
            values,
            [
                Some(&b"abc"[..]),
                None,
                Some(&b""[..]),
                Some(&b"xy"[..]),
                None
            ]
        );
        // The same as the ranges say.
        let ranges: Vec<Option<&[u8]>> =
            row.ranges().map(|r| r.map(|r| &row.buffer()[r])).collect();
        assert_eq!(values[..4], ranges[..]);
    }

    #[test]
    fn data_row_rejects_bad_lengths() {
        // -2 is not a valid column length.
        assert!(decode(b"D\0\0\0\x0a\0\x01\xff\xff\xff\xfe").is_err());
        // Claims 9 bytes, has 3.
        assert!(decode(b"D\0\0\0\x0d\0\x01\0\0\0\x09abc").is_err());
        // More columns claimed than present.
        assert!(decode(b"D\0\0\0\x06\0\x05").is_err());
        // Trailing garbage.
        assert!(decode(b"D\0\0\0\x07\0\0zz").is_err());
    }

    #[test]
    fn authentication_md5_and_sasl() {
        assert_eq!(
            decode(b"R\0\0\0\x0c\0\0\0\x05abcd").unwrap(),
            BackendMessage::Authentication(Authentication::Md5Password { salt: *b"abcd" })
        );
        assert_eq!(
            decode(b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0").unwrap(),
            BackendMessage::Authentication(Authentication::Sasl(vec!["SCRAM-SHA-256".into()]))
        );
        let err = decode(b"R\0\0\0\x08\0\0\0\x63").unwrap_err();
        assert!(err.to_string().contains("code 99"), "{err}");
    }

    #[test]
    fn unknown_tag_is_an_error() {
        let err = decode(b"@\0\0\0\x04").unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Protocol);
    }
}
