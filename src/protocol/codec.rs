//! Byte-level helpers shared by every message: a bounds-checked reader over a message body and
//! a writer that backfills a message's length once its body is written.
//!
//! Every read checks the remaining length first and reports a typed error instead of
//! panicking, because the bytes come from the network (jackc/pgx's pgproto3 checks bounds
//! before every read for the same reason).

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{Error, Result};

/// Reads the fields of one message body, front to back.
pub(crate) struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    /// The message's name, for error messages.
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a Bytes, what: &'static str) -> Reader<'a> {
        Reader { buf, pos: 0, what }
    }

    fn short(&self) -> Error {
        Error::protocol(format!("{} message is truncated", self.what))
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn u8(&mut self) -> Result<u8> {
        let b = *self.buf.get(self.pos).ok_or_else(|| self.short())?;
        self.pos += 1;
        Ok(b)
    }

    pub(crate) fn i16(&mut self) -> Result<i16> {
        Ok(i16::from_be_bytes(self.array()?))
    }

    pub(crate) fn i32(&mut self) -> Result<i32> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let end = self.pos.checked_add(N).ok_or_else(|| self.short())?;
        let bytes = self.buf.get(self.pos..end).ok_or_else(|| self.short())?;
        self.pos = end;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    /// A count field that must not be negative (e.g. a column count).
    pub(crate) fn count16(&mut self, field: &str) -> Result<usize> {
        let n = self.i16()?;
        usize::try_from(n)
            .map_err(|_| Error::protocol(format!("{} has a negative {field}: {n}", self.what)))
    }

    /// `n` bytes, shared with the message buffer (no copy).
    pub(crate) fn bytes(&mut self, n: usize) -> Result<Bytes> {
        if n > self.remaining() {
            return Err(self.short());
        }
        let out = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(out)
    }

    /// Everything that is left.
    pub(crate) fn rest(&mut self) -> Bytes {
        let out = self.buf.slice(self.pos..);
        self.pos = self.buf.len();
        out
    }

    /// A NUL-terminated string, without its terminator, as bytes shared with the buffer.
    pub(crate) fn cstr_bytes(&mut self) -> Result<Bytes> {
        let tail = &self.buf[self.pos..];
        let nul = tail.iter().position(|&b| b == 0).ok_or_else(|| {
            Error::protocol(format!(
                "{} has a string without a NUL terminator",
                self.what
            ))
        })?;
        let out = self.buf.slice(self.pos..self.pos + nul);
        self.pos += nul + 1;
        Ok(out)
    }

    /// A NUL-terminated string that must be UTF-8 (we always run with client_encoding UTF8).
    pub(crate) fn cstr(&mut self) -> Result<String> {
        let bytes = self.cstr_bytes()?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| Error::protocol(format!("{} has a string that is not UTF-8", self.what)))
    }

    /// Fails unless every byte of the body was consumed: trailing bytes mean we and the peer
    /// disagree about the layout, and nothing after that can be trusted.
    pub(crate) fn finish(&self) -> Result<()> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(Error::protocol(format!(
                "{} message has {} unexpected trailing bytes",
                self.what,
                self.remaining()
            )))
        }
    }
}

/// Writes one message: the tag byte (if any), a length placeholder, the body written by `body`,
/// then the real length over the placeholder. The length counts itself but not the tag.
pub(crate) fn write_message<E>(
    buf: &mut BytesMut,
    tag: Option<u8>,
    body: impl FnOnce(&mut BytesMut) -> std::result::Result<(), E>,
) -> std::result::Result<(), E>
where
    E: From<Error>,
{
    let start = buf.len();
    if let Some(tag) = tag {
        buf.put_u8(tag);
    }
    let len_at = buf.len();
    buf.put_i32(0);
    if let Err(e) = body(buf) {
        // Leave the buffer as it was: a half-written message must never reach the socket.
        buf.truncate(start);
        return Err(e);
    }
    let len = buf.len() - len_at;
    let Ok(len) = i32::try_from(len) else {
        buf.truncate(start);
        return Err(Error::protocol(format!("message of {len} bytes is too large to send")).into());
    };
    buf[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Writes `s` followed by a NUL terminator. A NUL inside `s` would end the string early and
/// desynchronise the stream, so it is refused.
pub(crate) fn put_cstr(buf: &mut BytesMut, s: &[u8], what: &str) -> Result<()> {
    if s.contains(&0) {
        return Err(Error::conversion(format!(
            "{what} must not contain a NUL byte"
        )));
    }
    buf.put_slice(s);
    buf.put_u8(0);
    Ok(())
}

/// Converts a count to the protocol's Int16, refusing more than it can hold.
pub(crate) fn count_i16(n: usize, what: &str) -> Result<i16> {
    i16::try_from(n).map_err(|_| Error::conversion(format!("too many {what}: {n} (at most 32767)")))
}
