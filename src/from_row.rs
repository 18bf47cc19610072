//! Rows into Rust types: the [`FromRow`] trait.
//!
//! A [`Row`] already decodes one column at a time ([`Row::try_get`]); `FromRow` says how a whole
//! row becomes one value. Tuples of up to sixteen elements read their columns by position. With
//! the `derive` feature, `#[derive(FromRow)]` reads a struct's named fields by column name
//! (see [`FromRow`] for the attributes it takes).
//!
//! Every failure is an [`ErrorKind::Conversion`](crate::ErrorKind::Conversion) error that names
//! the column, as [`Row::try_get`]'s are: a column missing, of a type the field cannot be read
//! as, or NULL where the field has no room for it.
//!
//! # Enums and composite types
//!
//! The `derive` feature also turns on postgres-types' `#[derive(ToSql, FromSql)]`, re-exported
//! as `pgengine::ToSql` and `pgengine::FromSql` beside the traits of the same names: a Rust enum
//! for a `CREATE TYPE … AS ENUM`, a struct for a composite type (`#[postgres(name = "…")]` and
//! the other attributes are postgres-types'). The connection looks such types up in the
//! catalogs the first time a statement uses them, so a derived impl recognises them by name.
//!
//! The code those derives write names the `postgres_types` crate directly, partly as
//! `::postgres_types::…`, which only a crate the package itself depends on can satisfy (no
//! `use` can stand in for it), and postgres-derive 0.4 has no attribute to point it elsewhere.
//! A crate that uses them therefore also lists, in its own `Cargo.toml`:
//!
//! ```toml
//! [dependencies]
//! pgengine = { version = "0.1", features = ["derive"] }
//! postgres-types = "0.2"   # the same crate as pgengine's; its `derive` feature is already on
//! ```
//!
//! ```
//! # #[cfg(feature = "derive")]
//! # mod derived {
//! use pgengine::{FromRow, FromSql, ToSql};
//!
//! #[derive(Debug, PartialEq, ToSql, FromSql)]
//! #[postgres(name = "mood", rename_all = "lowercase")]
//! enum Mood {
//!     Sad,
//!     Happy,
//! }
//!
//! #[derive(FromRow)]
//! struct Entry {
//!     id: i32,
//!     mood: Mood,
//! }
//!
//! # async fn demo(conn: &mut pgengine::Connection) -> pgengine::Result<()> {
//! conn.simple_query("CREATE TYPE mood AS ENUM ('sad', 'happy')").await?;
//! let row = conn.query_one(("SELECT 1 AS id, $1::mood AS mood", (Mood::Happy,))).await?;
//! assert_eq!(Entry::from_row(&row)?.mood, Mood::Happy);
//! # Ok(())
//! # }
//! # }
//! ```

use postgres_types::FromSql;

use crate::error::{Error, Result};
use crate::row::Row;

/// A type that can be built from one row of a result.
///
/// Implemented for tuples of 1 to 16 elements, read by position: the row must have exactly as
/// many columns as the tuple has elements, so that a column added to (or left out of) a query
/// is an error instead of a silent shift of every value after it.
///
/// ```
/// use pgengine::{FromRow, Row};
///
/// // A hand-written impl: columns by name, with the row's own errors.
/// struct Band {
///     name: String,
///     popularity: i32,
/// }
///
/// impl FromRow for Band {
///     fn from_row(row: &Row) -> pgengine::Result<Band> {
///         Ok(Band {
///             name: row.try_get("name")?,
///             popularity: row.try_get("popularity")?,
///         })
///     }
/// }
///
/// # async fn demo(conn: &mut pgengine::Connection) -> pgengine::Result<()> {
/// let row = conn.query_one("SELECT 'Pythonistas' AS name, 1000 AS popularity").await?;
/// let band = Band::from_row(&row)?;
/// let (name, popularity) = <(String, i32)>::from_row(&row)?;
/// assert_eq!((band.name, band.popularity), (name, popularity));
/// # Ok(())
/// # }
/// ```
///
/// # Deriving it
///
/// With the `derive` feature, `#[derive(pgengine::FromRow)]` writes the impl for a struct:
///
/// - a named field reads the column of its name (a raw identifier `r#type` reads `type`);
/// - `#[pgengine(rename = "column")]` on a field reads another column;
/// - `#[pgengine(default)]` on a field gives it `Default::default()` when the column is missing
///   or NULL (a value of the wrong type is still an error);
/// - `#[pgengine(flatten)]` on a field builds it, with its own `FromRow`, from the same row;
/// - `#[pgengine(rename_all = "...")]` on the struct renames every field that has no `rename`
///   of its own: `"snake_case"`, `"lowercase"`, `"UPPERCASE"` or `"camelCase"` (PostgreSQL
///   folds unquoted names to lower case, so the last two need quoted names in the query:
///   `SELECT user_id AS "userId"`);
/// - a tuple struct reads its fields by position, with the same column count check as a tuple.
///
/// Columns the struct does not read are ignored, so that a flattened field can read its own.
/// Fields own their values (`String`, not `&str`): a row is read into a value that outlives it.
///
/// ```
/// # #[cfg(feature = "derive")]
/// # mod derived {
/// use pgengine::FromRow;
///
/// #[derive(FromRow)]
/// struct Member {
///     id: i64,
///     #[pgengine(rename = "display_name")]
///     name: String,
///     #[pgengine(default)]
///     nickname: Option<String>,
///     #[pgengine(flatten)]
///     band: Band,
/// }
///
/// #[derive(FromRow)]
/// struct Band {
///     band_name: String,
/// }
///
/// # async fn demo(conn: &mut pgengine::Connection) -> pgengine::Result<()> {
/// let row = conn
///     .query_one("SELECT 7::int8 AS id, 'Ann' AS display_name, 'Rustaceans' AS band_name")
///     .await?;
/// let member = Member::from_row(&row)?;
/// assert_eq!(member.nickname, None); // no such column
/// assert_eq!(member.band.band_name, "Rustaceans");
/// # Ok(())
/// # }
/// # }
/// ```
pub trait FromRow: Sized {
    /// Builds a value from `row`, or says which column could not be read and why.
    ///
    /// ```
    /// use pgengine::FromRow;
    ///
    /// # async fn demo(conn: &mut pgengine::Connection) -> pgengine::Result<()> {
    /// let row = conn.query_one("SELECT 1::int4 AS n, 'one' AS word").await?;
    /// let (n, word) = <(i32, String)>::from_row(&row)?;
    /// assert_eq!((n, word.as_str()), (1, "one"));
    /// # Ok(())
    /// # }
    /// ```
    fn from_row(row: &Row) -> Result<Self>;
}

/// The row itself, so that code generic over [`FromRow`] (such as
/// [`Client::query_as`](crate::Client::query_as)) can also ask for plain rows.
impl FromRow for Row {
    fn from_row(row: &Row) -> Result<Row> {
        Ok(row.clone())
    }
}

/// The tuple impls: each element `$t` reads column `$i`, after the count is checked.
macro_rules! tuple_from_row {
    ($count:literal: $($t:ident $i:tt),+) => {
        impl<$($t),+> FromRow for ($($t,)+)
        where
            $($t: for<'a> FromSql<'a>,)+
        {
            fn from_row(row: &Row) -> Result<Self> {
                __private::expect_column_count(row, $count, std::any::type_name::<Self>())?;
                Ok(($(row.try_get::<_, $t>($i)?,)+))
            }
        }
    };
}

tuple_from_row!(1: T0 0);
tuple_from_row!(2: T0 0, T1 1);
tuple_from_row!(3: T0 0, T1 1, T2 2);
tuple_from_row!(4: T0 0, T1 1, T2 2, T3 3);
tuple_from_row!(5: T0 0, T1 1, T2 2, T3 3, T4 4);
tuple_from_row!(6: T0 0, T1 1, T2 2, T3 3, T4 4, T5 5);
tuple_from_row!(7: T0 0, T1 1, T2 2, T3 3, T4 4, T5 5, T6 6);
tuple_from_row!(8: T0 0, T1 1, T2 2, T3 3, T4 4, T5 5, T6 6, T7 7);
tuple_from_row!(9: T0 0, T1 1, T2 2, T3 3, T4 4, T5 5, T6 6, T7 7, T8 8);
tuple_from_row!(10: T0 0, T1 1, T2 2, T3 3, T4 4, T5 5, T6 6, T7 7, T8 8, T9 9);
tuple_from_row!(11: T0 0, T1 1, T2 2, T3 3, T4 4, T5 5, T6 6, T7 7, T8 8, T9 9, T10 10);
tuple_from_row!(12: T0 0, T1 1, T2 2, T3 3, T4 4, T5 5, T6 6, T7 7, T8 8, T9 9, T10 10, T11 11);
tuple_from_row!(13: T0 0, T1 1, T2 2, T3 3, T4 4, T5 5, T6 6, T7 7, T8 8, T9 9, T10 10, T11 11,
    T12 12);
tuple_from_row!(14: T0 0, T1 1, T2 2, T3 3, T4 4, T5 5, T6 6, T7 7, T8 8, T9 9, T10 10, T11 11,
    T12 12, T13 13);
tuple_from_row!(15: T0 0, T1 1, T2 2, T3 3, T4 4, T5 5, T6 6, T7 7, T8 8, T9 9, T10 10, T11 11,
    T12 12, T13 13, T14 14);
tuple_from_row!(16: T0 0, T1 1, T2 2, T3 3, T4 4, T5 5, T6 6, T7 7, T8 8, T9 9, T10 10, T11 11,
    T12 12, T13 13, T14 14, T15 15);

/// What `#[derive(FromRow)]`'s code calls, beside [`Row`]'s public methods: the checks that
/// make an error of this crate's own, which code in another crate cannot construct. Not part of
/// the API: it changes with the derive macro, which is released together with this crate.
#[doc(hidden)]
pub mod __private {
    use super::*;

    /// An error unless `row` has exactly `expected` columns, for a value of type `target` that
    /// reads them by position.
    pub fn expect_column_count(row: &Row, expected: usize, target: &str) -> Result<()> {
        if row.len() == expected {
            return Ok(());
        }
        let names: Vec<&str> = row.columns().iter().map(|c| c.name()).collect();
        Err(Error::conversion(format!(
            "{target} reads {expected} column{} by position, but the row has {} ({})",
            if expected == 1 { "" } else { "s" },
            row.len(),
            names.join(", ")
        )))
    }

    /// The value of column `name`, or `T::default()` when the row has no such column or the
    /// value is NULL. A value that cannot be read as `T` is still an error.
    pub fn try_get_or_default<T>(row: &Row, name: &str) -> Result<T>
    where
        T: for<'a> FromSql<'a> + Default,
    {
        let Some(i) = row.columns().iter().position(|c| c.name() == name) else {
            return Ok(T::default());
        };
        if row.raw(i).is_some() {
            return row.try_get(i);
        }
        // NULL: still an error if the column's type is not one that `T` reads.
        Ok(row.try_get::<_, Option<T>>(i)?.unwrap_or_default())
    }
}

/// The shapes `#[derive(FromRow)]` refuses, each a compile error of its own (the messages are
/// checked by hand: rustdoc only sees that compiling fails).
///
/// An enum is one column's value, not a row:
///
/// ```compile_fail
/// #[derive(pgengine::FromRow)]
/// enum Mood { Sad, Happy }
/// ```
///
/// A unit struct has nothing to read:
///
/// ```compile_fail
/// #[derive(pgengine::FromRow)]
/// struct Nothing;
/// ```
///
/// A misspelt attribute is not ignored:
///
/// ```compile_fail
/// #[derive(pgengine::FromRow)]
/// struct Member { #[pgengine(renam = "display_name")] name: String }
/// ```
///
/// A flattened field reads the whole row, under no name of its own:
///
/// ```compile_fail
/// #[derive(pgengine::FromRow)]
/// struct Band { band_name: String }
/// #[derive(pgengine::FromRow)]
/// struct Member { #[pgengine(flatten, rename = "band")] band: Band }
/// ```
///
/// A tuple struct's fields are read by position and take no attributes:
///
/// ```compile_fail
/// #[derive(pgengine::FromRow)]
/// struct Pair(#[pgengine(default)] i32, String);
/// ```
///
/// The same items without the mistake compile:
///
/// ```
/// #[derive(pgengine::FromRow)]
/// struct Band { band_name: String }
/// #[derive(pgengine::FromRow)]
/// struct Member { #[pgengine(rename = "display_name")] name: String, #[pgengine(flatten)] band: Band }
/// #[derive(pgengine::FromRow)]
/// struct Pair(i32, String);
/// ```
#[cfg(all(doctest, feature = "derive"))]
pub struct DeriveRefusals;
