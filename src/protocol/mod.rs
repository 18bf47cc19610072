//! The PostgreSQL frontend/backend protocol, version 3.0 (PostgreSQL docs chapter 55): bytes in,
//! bytes out. Nothing here does I/O.
//!
//! - [`frontend`]: encoders for every message the client sends, appending to a `BytesMut` so
//!   that a pipeline goes out in one write; and a decoder for them (for test servers).
//! - [`backend`]: the decoder for every message the server sends (and an encoder, for test
//!   servers). Row data stays in the read buffer as `Bytes` slices.
//! - [`scram`] and [`md5_password`]: the authentication exchanges as pure state machines.
//!
//! Framing is split from decoding: [`split_frame`] finds one whole message in a buffer and says
//! "incomplete" with `Ok(None)` or "corrupt" with an error; the length limit is checked before a
//! single byte of the message is reserved, so a hostile length prefix cannot make us allocate.

pub mod backend;
pub(crate) mod codec;
pub mod frontend;
pub mod scram;

use bytes::{Buf, Bytes, BytesMut};

pub use backend::{
    Authentication, BackendMessage, CopyFormat, DataRow, FieldDescription, TransactionStatus,
};
pub(crate) use backend::{RowLayout, command_tag};
pub use frontend::{FrontendMessage, Target};

use crate::error::{Error, Result};

/// The default limit on one message's length: 1 GiB, the server's own limit on a field value
/// (`MaxAllocSize`), so every message a real server sends fits.
pub const DEFAULT_MAX_MESSAGE_LEN: usize = 1 << 30;

/// Splits one tagged message off the front of `buf`: `Ok(Some((tag, body)))` when it is all
/// there, `Ok(None)` when more bytes are needed, and an error for a length that is negative,
/// shorter than the length field itself, or above `max_len`.
///
/// ```text
/// +-----+------------+--------------------+
/// | tag | length:i32 | body (length - 4)  |
/// +-----+------------+--------------------+
/// ```
pub fn split_frame(buf: &mut BytesMut, max_len: usize) -> Result<Option<(u8, Bytes)>> {
    let Some(len) = frame_len(buf, max_len)? else {
        return Ok(None);
    };
    if buf.len() < 1 + len {
        return Ok(None);
    }
    let tag = buf[0];
    let mut frame = buf.split_to(1 + len).freeze();
    frame.advance(5);
    Ok(Some((tag, frame)))
}

/// Checks the header at the front of `buf` and returns the message's length field (which counts
/// itself), or `Ok(None)` if the header is not complete. Callers use it to know how much more to
/// read before a message is whole.
pub fn frame_len(buf: &[u8], max_len: usize) -> Result<Option<usize>> {
    let Some((tag, len)) = header(buf) else {
        return Ok(None);
    };
    match usize::try_from(len) {
        Ok(n) if n >= 4 && n <= max_len => Ok(Some(n)),
        _ => Err(bad_length(tag, len, max_len)),
    }
}

/// The error for a length [`frame_len`] refuses: out of line, so that the check every message
/// passes stays a few instructions long.
#[cold]
#[inline(never)]
fn bad_length(tag: u8, len: i32, max_len: usize) -> Error {
    if len < 4 {
        Error::protocol(format!(
            "message {:?} has an invalid length {len}",
            tag as char
        ))
    } else {
        Error::protocol(format!(
            "message {:?} of {len} bytes exceeds the limit of {max_len} bytes",
            tag as char
        ))
    }
}

/// The tag and length field of the message at the front of `buf` if the whole message has
/// arrived and its length is one [`frame_len`] accepts; `None` otherwise (not all there yet,
/// or malformed: `frame_len` says which).
pub fn whole_frame(buf: &[u8], max_len: usize) -> Option<(u8, usize)> {
    let (tag, len) = header(buf)?;
    let len = usize::try_from(len)
        .ok()
        .filter(|&l| l >= 4 && l <= max_len)?;
    (buf.len() > len).then_some((tag, len))
}

/// The tag and length field at the front of `buf`, once its 5 bytes have arrived.
fn header(buf: &[u8]) -> Option<(u8, i32)> {
    let [tag, a, b, c, d, ..] = *buf else {
        return None;
    };
    Some((tag, i32::from_be_bytes([a, b, c, d])))
}

/// Frames and decodes one server message from the front of `buf`.
pub fn read_message(buf: &mut BytesMut, max_len: usize) -> Result<Option<BackendMessage>> {
    // The messages that carry nothing (or one status byte) are most of a pipeline's answers:
    // read them in place, without splitting a shared `Bytes` off the buffer for their body.
    if let [tag, 0, 0, 0, len @ (4 | 5), rest @ ..] = &buf[..] {
        let msg = match (*tag, *len, rest.first()) {
            (b'2', 4, _) => Some(BackendMessage::BindComplete),
            (b'1', 4, _) => Some(BackendMessage::ParseComplete),
            (b'3', 4, _) => Some(BackendMessage::CloseComplete),
            (b'n', 4, _) => Some(BackendMessage::NoData),
            (b'Z', 5, Some(b'I')) => Some(BackendMessage::ReadyForQuery(TransactionStatus::Idle)),
            (b'Z', 5, Some(b'T')) => Some(BackendMessage::ReadyForQuery(
                TransactionStatus::InTransaction,
            )),
            (b'Z', 5, Some(b'E')) => Some(BackendMessage::ReadyForQuery(TransactionStatus::Failed)),
            // Anything else (and a malformed one of these) takes the general path below.
            _ => None,
        };
        if let Some(msg) = msg {
            buf.advance(1 + usize::from(*len));
            return Ok(Some(msg));
        }
    }
    match split_frame(buf, max_len)? {
        Some((tag, body)) => BackendMessage::decode(tag, body).map(Some),
        None => Ok(None),
    }
}

/// The response to an MD5 password request (Authentication code 5):
/// `"md5" + hex(md5(hex(md5(password + user)) + salt))`.
pub fn md5_password(user: &[u8], password: &[u8], salt: [u8; 4]) -> String {
    use md5::{Digest, Md5};
    let mut md5 = Md5::new();
    md5.update(password);
    md5.update(user);
    let inner = hex(&md5.finalize_reset());
    md5.update(inner.as_bytes());
    md5.update(salt);
    format!("md5{}", hex(&md5.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests;
