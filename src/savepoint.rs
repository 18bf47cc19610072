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
    name: String,
}

impl Savepoint {
    pub(crate) fn new(tx: PostgresTransaction, name: String) -> Savepoint {
        Savepoint { tx, name }
    }

    /// The savepoint's name.
    pub fn name(&self) -> &str {
        &self.name
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
        self.tx.rollback_to_checked(&self.name).await
    }

    /// Releases this savepoint (and later ones), keeping their work.
    pub async fn release(&self) -> Result<()> {
        self.tx.release_checked(&self.name).await
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
