//! Value types that `postgres-types` does not provide: [`Interval`] and multidimensional
//! [`Array`]s. Everything else (integers, floats, text, bytea, dates and times, uuid, json,
//! one-dimensional arrays as `Vec<T>`, …) comes from `postgres-types` and its `with-*` features,
//! which this crate forwards.

use std::error::Error as StdError;

use bytes::{BufMut, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::types as pg;
use postgres_types::{FromSql, IsNull, Kind, ToSql, Type, to_sql_checked};

type BoxError = Box<dyn StdError + Sync + Send>;

/// A PostgreSQL `interval`: months, days and microseconds kept apart, as the server keeps them
/// (a month is not a fixed number of days, nor a day of hours, across DST changes).
///
/// ```
/// use pgengine::types::Interval;
/// let one_and_a_half_days = Interval { months: 0, days: 1, microseconds: 12 * 3_600_000_000 };
/// assert_eq!(one_and_a_half_days.to_string(), "0 mons 1 days 43200000000 us");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Interval {
    /// Whole months.
    pub months: i32,
    /// Whole days.
    pub days: i32,
    /// Microseconds.
    pub microseconds: i64,
}

impl std::fmt::Display for Interval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} mons {} days {} us",
            self.months, self.days, self.microseconds
        )
    }
}

impl<'a> FromSql<'a> for Interval {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Interval, BoxError> {
        // Binary layout (interval_send): microseconds i64, days i32, months i32.
        let bytes: [u8; 16] = raw.try_into().map_err(|_| "an interval must be 16 bytes")?;
        let microseconds = i64::from_be_bytes(bytes[0..8].try_into().expect("8 bytes"));
        let days = i32::from_be_bytes(bytes[8..12].try_into().expect("4 bytes"));
        let months = i32::from_be_bytes(bytes[12..16].try_into().expect("4 bytes"));
        Ok(Interval {
            months,
            days,
            microseconds,
        })
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::INTERVAL
    }
}

impl ToSql for Interval {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        out.put_i64(self.microseconds);
        out.put_i32(self.days);
        out.put_i32(self.months);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::INTERVAL
    }

    to_sql_checked!();
}

/// One dimension of an [`Array`]: its length and the index of its first element (1 unless
/// the array was built with explicit bounds like `'[0:2]={1,2,3}'`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Dimension {
    /// The number of elements along this dimension.
    pub len: i32,
    /// The index of the first element.
    pub lower_bound: i32,
}

/// A PostgreSQL array of any number of dimensions, with its elements in row-major order.
/// (`Vec<T>` handles one dimension; this type handles the rest.)
///
/// ```
/// use pgengine::types::Array;
/// // {{1,2,3},{4,5,6}}
/// let a = Array::from_parts(vec![2, 3], vec![1, 2, 3, 4, 5, 6]).unwrap();
/// assert_eq!(a.get(&[1, 2]), Some(&6));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Array<T> {
    dimensions: Vec<Dimension>,
    elements: Vec<T>,
}

impl<T> Array<T> {
    /// An array of the given shape (lengths per dimension, lower bounds 1) and elements in
    /// row-major order; `None` if the element count does not match the shape.
    pub fn from_parts(lengths: Vec<i32>, elements: Vec<T>) -> Option<Array<T>> {
        let dimensions: Vec<Dimension> = lengths
            .into_iter()
            .map(|len| Dimension {
                len,
                lower_bound: 1,
            })
            .collect();
        Array::with_dimensions(dimensions, elements)
    }

    /// An array with explicit dimensions; `None` if the element count does not match.
    pub fn with_dimensions(dimensions: Vec<Dimension>, elements: Vec<T>) -> Option<Array<T>> {
        let count = if dimensions.is_empty() {
            0
        } else {
            dimensions
                .iter()
                .try_fold(1usize, |n, d| n.checked_mul(usize::try_from(d.len).ok()?))?
        };
        (count == elements.len()).then_some(Array {
            dimensions,
            elements,
        })
    }

    /// The dimensions, outermost first.
    pub fn dimensions(&self) -> &[Dimension] {
        &self.dimensions
    }

    /// The elements in row-major order.
    pub fn elements(&self) -> &[T] {
        &self.elements
    }

    /// The element at zero-based `index` (one index per dimension).
    pub fn get(&self, index: &[usize]) -> Option<&T> {
        if index.len() != self.dimensions.len() {
            return None;
        }
        let mut flat = 0usize;
        for (i, d) in index.iter().zip(&self.dimensions) {
            if *i >= d.len as usize {
                return None;
            }
            flat = flat * d.len as usize + i;
        }
        self.elements.get(flat)
    }

    /// The elements, consuming the array.
    pub fn into_elements(self) -> Vec<T> {
        self.elements
    }
}

fn member_type(ty: &Type) -> Option<&Type> {
    match ty.kind() {
        Kind::Array(member) => Some(member),
        _ => None,
    }
}

impl<'a, T: FromSql<'a>> FromSql<'a> for Array<T> {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Array<T>, BoxError> {
        let member = member_type(ty).ok_or("not an array type")?;
        let array = pg::array_from_sql(raw)?;
        let dimensions = array
            .dimensions()
            .map(|d| {
                Ok(Dimension {
                    len: d.len,
                    lower_bound: d.lower_bound,
                })
            })
            .collect::<Vec<_>>()?;
        let elements = array
            .values()
            .map(|v| T::from_sql_nullable(member, v))
            .collect::<Vec<_>>()?;
        Array::with_dimensions(dimensions, elements)
            .ok_or_else(|| "array element count does not match its dimensions".into())
    }

    fn accepts(ty: &Type) -> bool {
        member_type(ty).is_some_and(T::accepts)
    }
}

impl<T: ToSql> ToSql for Array<T> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        let member = member_type(ty).ok_or("not an array type")?;
        let dimensions = self.dimensions.iter().map(|d| pg::ArrayDimension {
            len: d.len,
            lower_bound: d.lower_bound,
        });
        pg::array_to_sql(
            dimensions,
            member.oid(),
            self.elements.iter(),
            |e, out| match e.to_sql(member, out)? {
                IsNull::No => Ok(postgres_protocol::IsNull::No),
                IsNull::Yes => Ok(postgres_protocol::IsNull::Yes),
            },
            out,
        )?;
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        member_type(ty).is_some_and(T::accepts)
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_shape_is_checked() {
        assert!(Array::from_parts(vec![2, 2], vec![1, 2, 3]).is_none());
        assert!(Array::from_parts(vec![-1], Vec::<i32>::new()).is_none());
        let a = Array::from_parts(vec![2, 2], vec![1, 2, 3, 4]).unwrap();
        assert_eq!(a.get(&[1, 0]), Some(&3));
        assert_eq!(a.get(&[2, 0]), None);
        assert_eq!(a.get(&[0]), None);
        let empty = Array::<i32>::from_parts(vec![], vec![]).unwrap();
        assert!(empty.elements().is_empty());
    }

    #[test]
    fn interval_binary_layout() {
        let i = Interval {
            months: 1,
            days: 2,
            microseconds: 3,
        };
        let mut buf = BytesMut::new();
        i.to_sql(&Type::INTERVAL, &mut buf).unwrap();
        assert_eq!(&buf[..], b"\0\0\0\0\0\0\0\x03\0\0\0\x02\0\0\0\x01");
        assert_eq!(Interval::from_sql(&Type::INTERVAL, &buf).unwrap(), i);
        assert!(Interval::from_sql(&Type::INTERVAL, &buf[..15]).is_err());
    }
}
