//! [`Savepoint`]: a named point inside a transaction to roll back to without losing the whole
//! transaction (`SAVEPOINT`, `ROLLBACK TO SAVEPOINT`, `RELEASE SAVEPOINT`).
//!
//! A savepoint name is always a valid SQL identifier, checked before anything is sent and
//! always sent quoted: a name is never pasted into SQL as it came.

use crate::error::{Error, Result, TransactionError};
use crate::transaction::PostgresTransaction;

/// The longest identifier PostgreSQL keeps (NAMEDATALEN - 1); longer ones are truncated by
/// the server, which would make two different names collide.
const MAX_IDENTIFIER_LEN: usize = 63;

/// A savepoint of a [`PostgresTransaction`].
///
/// ```no_run
/// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
/// let tx = engine.begin().await?;
/// tx.execute("INSERT INTO band (name) VALUES ('kept')").await?;
/// let sp = tx.savepoint(None).await?; // savepoint_1
/// tx.execute("INSERT INTO band (name) VALUES ('undone')").await?;
/// sp.rollback_to().await?;
/// tx.commit().await?; // only 'kept' is saved
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Savepoint {
    tx: PostgresTransaction,
    name: SavepointName,
}

impl Savepoint {
    pub(crate) fn new(tx: PostgresTransaction, name: SavepointName) -> Savepoint {
        Savepoint { tx, name }
    }

    /// The savepoint's name.
    pub fn name(&self) -> &str {
        self.name.as_str()
    }

    /// The transaction the savepoint belongs to. Queries through the savepoint (it is a
    /// [`Client`](crate::Client)) run in that transaction.
    pub fn transaction(&self) -> &PostgresTransaction {
        &self.tx
    }

    /// Rolls back to this savepoint (it stays usable; later savepoints are gone). Works in a
    /// failed transaction and makes it active again.
    pub async fn rollback_to(&self) -> Result<()> {
        // The name was checked when the savepoint was made.
        self.tx.rollback_to_checked(self.name.as_str()).await
    }

    /// Releases this savepoint (and later ones), keeping their work.
    pub async fn release(&self) -> Result<()> {
        self.tx.release_checked(self.name.as_str()).await
    }
}

/// A checked savepoint name, held inline: a valid one is at most 63 bytes, so making a
/// savepoint allocates nothing.
#[derive(Clone, Copy)]
pub(crate) struct SavepointName {
    bytes: [u8; MAX_IDENTIFIER_LEN],
    len: u8,
}

impl SavepointName {
    /// `name`, if it is a valid identifier ([`check_savepoint_name`]).
    pub(crate) fn given(name: &str) -> Result<SavepointName> {
        check_savepoint_name(name)?;
        let mut bytes = [0; MAX_IDENTIFIER_LEN];
        bytes[..name.len()].copy_from_slice(name.as_bytes());
        Ok(SavepointName {
            bytes,
            len: name.len() as u8,
        })
    }

    /// The automatic name of savepoint `id`: `savepoint_<id>`, written without the formatting
    /// machinery (this is every unnamed savepoint's path).
    pub(crate) fn automatic(id: u32) -> SavepointName {
        const PREFIX: &[u8] = b"savepoint_";
        let mut bytes = [0; MAX_IDENTIFIER_LEN];
        bytes[..PREFIX.len()].copy_from_slice(PREFIX);
        let mut digits = [0u8; 10];
        let mut n = id;
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let len = PREFIX.len() + digits.len() - start;
        bytes[PREFIX.len()..len].copy_from_slice(&digits[start..]);
        SavepointName {
            bytes,
            len: len as u8,
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        let bytes = &self.bytes[..usize::from(self.len)];
        debug_assert!(std::str::from_utf8(bytes).is_ok());
        // SAFETY: the bytes are a whole `str` (`given`) or ASCII (`automatic`), never cut, and
        // never changed after. Checking them again cost about 110 instructions per call, two
        // calls per savepoint cycle (callgrind).
        unsafe { std::str::from_utf8_unchecked(bytes) }
    }

    /// Whether this is the name `name` (compared as bytes, as the server compares them).
    pub(crate) fn is(&self, name: &str) -> bool {
        &self.bytes[..usize::from(self.len)] == name.as_bytes()
    }
}

impl std::fmt::Debug for SavepointName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

/// Checks that `name` is a plain SQL identifier: a letter or underscore, then letters,
/// digits, underscores or dollar signs, at most 63 bytes.
pub(crate) fn check_savepoint_name(name: &str) -> Result<()> {
    let valid = if name.is_ascii() {
        // The common case, byte by byte.
        let bytes = name.as_bytes();
        bytes
            .first()
            .is_some_and(|b| b.is_ascii_alphabetic() || *b == b'_')
            && bytes[1..]
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'$')
    } else {
        let mut chars = name.chars();
        chars.next().is_some_and(|c| c.is_alphabetic() || c == '_')
            && chars.all(|c| c.is_alphanumeric() || c == '_' || c == '$')
    };
    if valid && name.len() <= MAX_IDENTIFIER_LEN {
        Ok(())
    } else {
        Err(Error::transaction(
            TransactionError::InvalidSavepointName,
            format!(
                "invalid savepoint name {name:?}: use a letter or underscore followed by letters, \
                 digits, underscores or $, at most {MAX_IDENTIFIER_LEN} bytes"
            ),
        )
        .retry_safe())
    }
}

/// The SQL text `verb "name"`, in parts for `Connection::command`. A name that passed
/// [`check_savepoint_name`] holds no double quote, so quoting it is putting it between two.
pub(crate) fn savepoint_command<'a>(verb: &'a str, name: &'a str) -> [&'a str; 4] {
    debug_assert!(check_savepoint_name(name).is_ok(), "{name:?}");
    [verb, " \"", name, "\""]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn automatic_names_are_the_id_in_decimal() {
        for id in [0, 1, 9, 10, 12345, u32::MAX] {
            let name = SavepointName::automatic(id);
            assert_eq!(name.as_str(), format!("savepoint_{id}"));
            assert!(name.is(&format!("savepoint_{id}")));
            assert!(!name.is("savepoint_"));
            assert!(check_savepoint_name(name.as_str()).is_ok());
        }
    }

    #[test]
    fn given_names_are_kept_whole_up_to_the_longest_identifier() {
        for ok in [
            "a",
            "Ünïcode",
            &"x".repeat(MAX_IDENTIFIER_LEN),
            &"é".repeat(31),
        ] {
            let name = SavepointName::given(ok).unwrap();
            assert_eq!(name.as_str(), ok);
            let shorter: String = ok.chars().skip(1).collect();
            assert!(name.is(ok) && !name.is(&shorter));
            assert_eq!(format!("{name:?}"), format!("{ok:?}"));
        }
        assert!(SavepointName::given(&"x".repeat(MAX_IDENTIFIER_LEN + 1)).is_err());
        assert!(SavepointName::given("a b").is_err());
    }

    #[test]
    fn savepoint_names() {
        for ok in ["a", "_x", "savepoint_1", "Ünïcode", "a$b", &"x".repeat(63)] {
            assert!(check_savepoint_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1a",
            "a b",
            "a;SELECT 1",
            "a\"b",
            "x; DROP TABLE t; --",
            &"x".repeat(64),
        ] {
            let e = check_savepoint_name(bad).unwrap_err();
            assert_eq!(
                e.transaction_error(),
                Some(TransactionError::InvalidSavepointName)
            );
        }
        // The same text as quoting the name as an identifier.
        for name in ["Sp", "savepoint_12", "a$b", "Ünïcode"] {
            let quoted = postgres_protocol::escape::escape_identifier(name);
            let sql = savepoint_command("RELEASE SAVEPOINT", name).concat();
            assert_eq!(sql, format!("RELEASE SAVEPOINT {quoted}"));
        }
    }
}
