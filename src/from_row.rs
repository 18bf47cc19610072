//! Placeholder until the FromRow work lands (replaced at merge).

use crate::error::Result;
use crate::row::Row;

/// A type built from a result row.
pub trait FromRow: Sized {
    /// Builds the value from `row`.
    fn from_row(row: &Row) -> Result<Self>;
}

impl<A: for<'a> postgres_types::FromSql<'a>> FromRow for (A,) {
    fn from_row(row: &Row) -> Result<Self> {
        Ok((row.try_get(0)?,))
    }
}

impl<A: for<'a> postgres_types::FromSql<'a>, B: for<'a> postgres_types::FromSql<'a>> FromRow
    for (A, B)
{
    fn from_row(row: &Row) -> Result<Self> {
        Ok((row.try_get(0)?, row.try_get(1)?))
    }
}
