//! Rows of a result and the columns that describe them.
//!
//! A [`Row`] keeps the server's DataRow as it came and decodes a column only when it is asked
//! for, through `postgres_types::FromSql`: there is no allocation per column. The rows that
//! arrive together in one read share one piece of the read buffer and one reference to their
//! columns, so that each costs one reference count, not two (see `Block`).

use std::fmt;
use std::sync::Arc;

use postgres_types::{FromSql, Type};

use crate::error::{Error, Result};
use bytes::{Buf, Bytes};

use crate::protocol::{DataRow, FieldDescription, RowLayout};

/// A column of a result: its name, type and origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    name: String,
    table_oid: u32,
    column_id: i16,
    type_: Type,
    /// Which header check the column's values need before decoding, worked out once from the
    /// type rather than for every value read.
    container: Container,
    /// The type was not known when the column was described: `type_` is a placeholder until
    /// it is looked up ([`Column::retyped`]).
    placeholder: bool,
}

impl Column {
    /// A column with its type if it is built in, else a placeholder ([`type_from_oid`]).
    pub(crate) fn from_field(field: &FieldDescription) -> Column {
        match Type::from_oid(field.type_oid) {
            Some(ty) => Column::with_type(field, ty),
            None => Column {
                placeholder: true,
                ..Column::with_type(field, type_from_oid(field.type_oid))
            },
        }
    }

    pub(crate) fn with_type(field: &FieldDescription, type_: Type) -> Column {
        Column {
            name: field.name.clone(),
            table_oid: field.table_oid,
            column_id: field.column_id,
            container: Container::of(&type_),
            type_,
            placeholder: false,
        }
    }

    /// The column with its type looked up (a placeholder still if the catalogs no longer
    /// know it: it is not looked up again).
    pub(crate) fn retyped(self, type_: Type) -> Column {
        Column {
            container: Container::of(&type_),
            type_,
            placeholder: false,
            ..self
        }
    }

    /// Whether the column's type is a placeholder still to be looked up.
    pub(crate) fn is_placeholder(&self) -> bool {
        self.placeholder
    }

    /// The column's name (`?column?` for an unnamed expression).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The column's type.
    pub fn type_(&self) -> &Type {
        &self.type_
    }

    /// The OID of the column's type.
    pub fn type_oid(&self) -> u32 {
        self.type_.oid()
    }

    /// The OID of the table the column comes from, if it is a plain table column.
    pub fn table_oid(&self) -> Option<u32> {
        (self.table_oid != 0).then_some(self.table_oid)
    }

    /// The column's attribute number in that table.
    pub fn column_id(&self) -> Option<i16> {
        (self.column_id != 0).then_some(self.column_id)
    }
}

/// The type for `oid`: a built-in one, or an opaque placeholder for types this crate does not
/// know (extension and user-defined types), which `FromSql` impls can still inspect by OID.
pub(crate) fn type_from_oid(oid: u32) -> Type {
    Type::from_oid(oid).unwrap_or_else(|| {
        Type::new(
            format!("oid_{oid}"),
            oid,
            postgres_types::Kind::Simple,
            "unknown".to_owned(),
        )
    })
}

/// Something that picks a column: its position (`usize`) or its name (`&str`).
pub trait RowIndex: fmt::Display {
    /// The position of the column in `columns`, if there is one.
    fn index(&self, columns: &[Column]) -> Option<usize>;
}

impl RowIndex for usize {
    fn index(&self, columns: &[Column]) -> Option<usize> {
        (*self < columns.len()).then_some(*self)
    }
}

impl RowIndex for str {
    fn index(&self, columns: &[Column]) -> Option<usize> {
        columns.iter().position(|c| c.name == self)
    }
}

impl<T: RowIndex + ?Sized> RowIndex for &T {
    fn index(&self, columns: &[Column]) -> Option<usize> {
        T::index(*self, columns)
    }
}

/// One row of a result, in the binary format.
///
/// ```no_run
/// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
/// for row in engine.query("SELECT id, name, founded FROM band").await? {
///     let id: i32 = row.get("id"); // by name, or by position
///     let name: &str = row.get(1); // borrowed from the row, not copied
///     // NULL reads as None; try_get gives an error where get would panic.
///     let founded: Option<i32> = row.try_get("founded")?;
///     println!("{id} {name} {founded:?}");
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Row {
    data: RowData,
    layout: RowLayout,
}

/// Where a [`Row`]'s columns and bytes are.
#[derive(Clone)]
enum RowData {
    /// A row read on its own: its DataRow's body (after the column count).
    Alone { columns: Arc<[Column]>, body: Bytes },
    /// One of the rows of a [`Block`]: its body is `block.bytes[start..end]`.
    InBlock {
        block: Arc<Block>,
        start: usize,
        end: usize,
    },
}

/// The rows whole in the read buffer at once, taken together: one piece of the buffer for all
/// of them, and one reference to their columns. Making a row of one costs one reference count
/// (dropping it, one more), where a row alone costs two of each — atomic operations that take
/// about as long as the rest of a row's reading (a tenth of a streamed row's time with the
/// server on the same core).
pub(crate) struct Block {
    columns: Arc<[Column]>,
    bytes: Bytes,
}

/// Where one row of a [`Block`] is: its body (after the column count) and its layout.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowPlace {
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) layout: RowLayout,
}

impl Block {
    /// The rows at `places` in `bytes` (their layouts checked, each with as many columns as
    /// `columns`), handed to `each` in order. A single row is made alone: a block would only
    /// add its allocation.
    pub(crate) fn rows(
        columns: &Arc<[Column]>,
        mut bytes: Bytes,
        places: &[RowPlace],
        mut each: impl FnMut(Row),
    ) {
        debug_assert!(places.iter().all(|p| p.layout.len() == columns.len()));
        if let [place] = places {
            // Trimming an owned Bytes touches no counter.
            bytes.truncate(place.end);
            bytes.advance(place.start);
            each(Row {
                data: RowData::Alone {
                    columns: columns.clone(),
                    body: bytes,
                },
                layout: place.layout,
            });
            return;
        }
        let block = Arc::new(Block {
            columns: columns.clone(),
            bytes,
        });
        for place in places {
            each(Row {
                data: RowData::InBlock {
                    block: block.clone(),
                    start: place.start,
                    end: place.end,
                },
                layout: place.layout,
            });
        }
    }
}

/// A DataRow whose column count is not its RowDescription's.
#[cold]
pub(crate) fn column_count_mismatch(data: usize, columns: usize) -> Error {
    Error::protocol(format!(
        "DataRow has {data} columns but RowDescription has {columns}"
    ))
}

impl Row {
    pub(crate) fn new(columns: Arc<[Column]>, data: DataRow) -> Result<Row> {
        if data.len() != columns.len() {
            return Err(column_count_mismatch(data.len(), columns.len()));
        }
        let (body, layout) = data.into_parts();
        Ok(Row {
            data: RowData::Alone { columns, body },
            layout,
        })
    }

    /// The columns of the row.
    #[inline]
    pub fn columns(&self) -> &[Column] {
        match &self.data {
            RowData::Alone { columns, .. } => columns,
            RowData::InBlock { block, .. } => &block.columns,
        }
    }

    /// The row's body after the column count.
    #[inline]
    fn body(&self) -> &[u8] {
        match &self.data {
            RowData::Alone { body, .. } => body,
            RowData::InBlock { block, start, end } => &block.bytes[*start..*end],
        }
    }

    /// The same row with its columns' types replaced (after a catalog lookup).
    pub(crate) fn retyped(self, columns: Arc<[Column]>) -> Row {
        let body = match self.data {
            RowData::Alone { body, .. } => body,
            RowData::InBlock { block, start, end } => block.bytes.slice(start..end),
        };
        Row {
            data: RowData::Alone { columns, body },
            layout: self.layout,
        }
    }

    /// The number of columns.
    pub fn len(&self) -> usize {
        self.columns().len()
    }

    /// True if the row has no columns.
    pub fn is_empty(&self) -> bool {
        self.columns().is_empty()
    }

    /// The value of a column, decoded as `T`.
    ///
    /// # Panics
    ///
    /// If the column does not exist or cannot be decoded as `T`; use [`Row::try_get`] to get an
    /// error instead.
    #[track_caller]
    pub fn get<'a, I, T>(&'a self, idx: I) -> T
    where
        I: RowIndex,
        T: FromSql<'a>,
    {
        match self.try_get(idx) {
            Ok(v) => v,
            Err(e) => panic!("Row::get: {e}"),
        }
    }

    /// The value of a column, decoded as `T`, or an error saying why it cannot be.
    pub fn try_get<'a, I, T>(&'a self, idx: I) -> Result<T>
    where
        I: RowIndex,
        T: FromSql<'a>,
    {
        let columns = self.columns();
        let i = idx
            .index(columns)
            .ok_or_else(|| Error::conversion(format!("the row has no column {idx}")))?;
        let column = &columns[i];
        if !T::accepts(&column.type_) {
            // postgres-types' own error for it is the source, as its decoders would give.
            return Err(Error::conversion(format!(
                "column {:?} of type {} cannot be read as {}",
                column.name,
                column.type_,
                std::any::type_name::<T>()
            ))
            .with_source(postgres_types::WrongType::new::<T>(column.type_.clone())));
        }
        let raw = self.layout.value(self.body(), i);
        if let Some(raw) = raw
            && column.container != Container::None
        {
            check_claimed_sizes(column.container, raw).map_err(|why| {
                Error::conversion(format!("column {:?} cannot be decoded: {why}", column.name))
            })?;
        }
        FromSql::from_sql_nullable(&column.type_, raw).map_err(|e| Error::from_sql(&column.name, e))
    }

    /// The raw bytes of a column in the wire format, or `None` for NULL.
    pub fn raw(&self, idx: usize) -> Option<&[u8]> {
        self.layout.value(self.body(), idx)
    }
}

impl fmt::Debug for Row {
    /// Shows each column as `name: value`, decoded for common built-in types and given as a
    /// byte count otherwise (used by the engine's `log_responses`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_map();
        for (i, c) in self.columns().iter().enumerate() {
            d.entry(&c.name, &DebugValue(self, i));
        }
        d.finish()
    }
}

/// One value of a row, for Debug output.
struct DebugValue<'a>(&'a Row, usize);

impl fmt::Debug for DebugValue<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (row, i) = (self.0, self.1);
        let Some(raw) = row.raw(i) else {
            return f.write_str("NULL");
        };
        let ty = &row.columns()[i].type_;
        macro_rules! show {
            ($t:ty) => {
                if let Ok(v) = row.try_get::<_, $t>(i) {
                    return v.fmt(f);
                }
            };
        }
        match *ty {
            Type::BOOL => show!(bool),
            Type::INT2 => show!(i16),
            Type::INT4 => show!(i32),
            Type::INT8 => show!(i64),
            Type::FLOAT4 => show!(f32),
            Type::FLOAT8 => show!(f64),
            Type::OID => show!(u32),
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => show!(&str),
            _ => {}
        }
        write!(f, "<{} bytes of {}>", raw.len(), ty)
    }
}

/// Refuses container values whose headers claim more elements than their bytes can hold.
///
/// postgres-types sizes its `Vec` (or `HashMap`) from the element count in the value's header
/// before reading a single element; a hostile server claiming 2^31 elements in a 20-byte value
/// would make the process abort on a huge allocation (found by fuzzing). Every array element
/// takes at least its 4-byte length, and every hstore pair at least 8 bytes.
fn check_claimed_sizes(container: Container, raw: &[u8]) -> std::result::Result<(), String> {
    let word = |at: usize| -> Option<i32> {
        raw.get(at..at + 4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    match container {
        Container::Array => {
            // ndim, has_nulls, element type, then (length, lower bound) per dimension.
            let Some(ndim) = word(0) else { return Ok(()) }; // too short: FromSql says so
            // PostgreSQL's MAXDIM is 6.
            if !(0..=6).contains(&ndim) {
                return Err(format!("the array claims {ndim} dimensions"));
            }
            let mut count: u64 = if ndim == 0 { 0 } else { 1 };
            for d in 0..ndim as usize {
                let len = word(12 + 8 * d).ok_or("the array header is truncated")?;
                let len = u64::try_from(len).map_err(|_| format!("an array dimension of {len}"))?;
                count = count.saturating_mul(len);
            }
            let left = raw.len().saturating_sub(12 + 8 * ndim as usize) as u64;
            if count > left / 4 {
                return Err(format!("the array claims {count} elements in {left} bytes"));
            }
        }
        Container::Hstore => {
            let Some(n) = word(0) else { return Ok(()) };
            let n = u64::try_from(n).map_err(|_| format!("hstore claims {n} pairs"))?;
            let left = raw.len().saturating_sub(4) as u64;
            if n > left / 8 {
                return Err(format!("hstore claims {n} pairs in {left} bytes"));
            }
        }
        Container::None => {}
    }
    Ok(())
}

/// The kinds of value whose header claims an element count (see [`check_claimed_sizes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Container {
    None,
    Array,
    Hstore,
}

impl Container {
    fn of(ty: &Type) -> Container {
        match ty.kind() {
            postgres_types::Kind::Array(_) => Container::Array,
            _ if ty.name() == "hstore" => Container::Hstore,
            _ => Container::None,
        }
    }
}

/// One row of a simple-protocol result: every value in the text format.
///
/// ```no_run
/// # async fn demo(conn: &mut pgengine::Connection) -> pgengine::Result<()> {
/// let results = conn.simple_query("SELECT 1 AS one, NULL AS nothing").await?;
/// let row = &results[0].rows()[0];
/// assert_eq!(row.get("one"), Some("1"));
/// assert_eq!(row.get("nothing"), None);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct SimpleRow {
    columns: Arc<[Column]>,
    data: DataRow,
}

impl SimpleRow {
    pub(crate) fn new(columns: Arc<[Column]>, data: DataRow) -> Result<SimpleRow> {
        if data.len() != columns.len() {
            return Err(column_count_mismatch(data.len(), columns.len()));
        }
        Ok(SimpleRow { columns, data })
    }

    /// The columns of the row.
    pub fn columns(&self) -> &[Column] {
        &self.columns
    }

    /// The number of columns.
    pub fn len(&self) -> usize {
        self.columns.len()
    }

    /// True if the row has no columns.
    pub fn is_empty(&self) -> bool {
        self.columns.is_empty()
    }

    /// The text of a column, `None` for NULL; an error if the column does not exist or its
    /// text is not UTF-8.
    pub fn try_get<I: RowIndex>(&self, idx: I) -> Result<Option<&str>> {
        let i = idx
            .index(&self.columns)
            .ok_or_else(|| Error::conversion(format!("the row has no column {idx}")))?;
        self.data
            .value(i)
            .map(|v| {
                std::str::from_utf8(v).map_err(|e| {
                    Error::conversion(format!("column {idx} is not valid UTF-8")).with_source(e)
                })
            })
            .transpose()
    }

    /// The text of a column, `None` for NULL or when there is no such column.
    pub fn get<I: RowIndex>(&self, idx: I) -> Option<&str> {
        self.try_get(idx).ok().flatten()
    }
}

impl fmt::Debug for SimpleRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_map();
        for (i, c) in self.columns.iter().enumerate() {
            d.entry(&c.name, &self.get(i));
        }
        d.finish()
    }
}

/// The outcome of one statement of a simple query.
#[derive(Debug, Clone)]
pub struct SimpleQueryResult {
    pub(crate) columns: Arc<[Column]>,
    pub(crate) rows: Vec<SimpleRow>,
    pub(crate) tag: String,
}

impl SimpleQueryResult {
    /// The columns, empty for a statement that returns no rows.
    pub fn columns(&self) -> &[Column] {
        &self.columns
    }

    /// The rows, in the order the server sent them.
    pub fn rows(&self) -> &[SimpleRow] {
        &self.rows
    }

    /// The command tag, e.g. `"SELECT 2"` or `"INSERT 0 1"`.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The number of rows the command returned or affected, from its tag.
    pub fn rows_affected(&self) -> u64 {
        rows_affected(self.tag.as_bytes())
    }
}

/// The row count at the end of a CommandComplete tag (`"INSERT 0 5"` → 5), or 0 for commands
/// that report none (`"CREATE TABLE"`).
pub(crate) fn rows_affected(tag: &[u8]) -> u64 {
    // By hand rather than through `str::parse`: this runs once per statement.
    if !tag.last().is_some_and(u8::is_ascii_digit) {
        // `SAVEPOINT`, `COMMIT`: no count.
        return 0;
    }
    let digits = tag.rsplit(|&b| b == b' ').next().unwrap_or_default();
    if digits.is_empty() {
        return 0;
    }
    let mut n: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return 0;
        }
        match n
            .checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(d - b'0')))
        {
            Some(next) => n = next,
            None => return 0,
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::rows_affected;

    #[test]
    fn debug_shows_decoded_values() {
        use crate::protocol::FieldDescription;
        let field = |name: &str, oid| FieldDescription {
            name: name.into(),
            table_oid: 0,
            column_id: 0,
            type_oid: oid,
            type_size: -1,
            type_modifier: -1,
            format: 1,
        };
        let columns: std::sync::Arc<[super::Column]> = [
            field("n", 23),
            field("t", 25),
            field("u", 2950),
            field("z", 25),
        ]
        .iter()
        .map(super::Column::from_field)
        .collect();
        let data = [
            Some(bytes::Bytes::from_static(&[0, 0, 0, 7])),
            Some(bytes::Bytes::from_static(b"hi")),
            Some(bytes::Bytes::from_static(&[0; 16])),
            None,
        ]
        .into_iter()
        .collect();
        let row = super::Row::new(columns, data).unwrap();
        assert_eq!(
            format!("{row:?}"),
            r#"{"n": 7, "t": "hi", "u": <16 bytes of uuid>, "z": NULL}"#
        );
    }

    /// A conversion error keeps what caused it as its source, of its own type: the `FromSql`
    /// implementation's error, postgres-types' `WrongType` and `WasNull`, a `Utf8Error`.
    #[test]
    fn conversion_errors_keep_their_cause() {
        use crate::ErrorKind;
        use crate::protocol::FieldDescription;
        use postgres_types::{FromSql, Type, WasNull, WrongType};
        use std::error::Error as _;

        #[derive(Debug)]
        struct Refused;
        impl std::fmt::Display for Refused {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("refused by the decoder")
            }
        }
        impl std::error::Error for Refused {}
        struct Picky;
        impl<'a> FromSql<'a> for Picky {
            fn from_sql(
                _: &Type,
                _: &'a [u8],
            ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
                Err(Box::new(Refused))
            }
            fn accepts(ty: &Type) -> bool {
                *ty == Type::INT4
            }
        }

        let field = |name: &str, oid| FieldDescription {
            name: name.into(),
            table_oid: 0,
            column_id: 0,
            type_oid: oid,
            type_size: -1,
            type_modifier: -1,
            format: 1,
        };
        let columns: std::sync::Arc<[super::Column]> =
            [field("n", 23), field("z", 23), field("t", 25)]
                .iter()
                .map(super::Column::from_field)
                .collect();
        let data = || {
            [
                Some(bytes::Bytes::from_static(&[0, 0, 0, 7])),
                None,
                Some(bytes::Bytes::from_static(b"\xff")),
            ]
            .into_iter()
            .collect()
        };
        let row = super::Row::new(columns.clone(), data()).unwrap();

        let e = row.try_get::<_, Picky>("n").err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Conversion);
        assert!(e.to_string().contains("refused by the decoder"), "{e}");
        assert!(e.source().is_some_and(|s| s.is::<Refused>()), "{e:?}");
        let e = row.try_get::<_, i32>("z").unwrap_err();
        assert!(e.source().is_some_and(|s| s.is::<WasNull>()), "{e:?}");
        let e = row.try_get::<_, i32>("t").unwrap_err();
        assert!(e.source().is_some_and(|s| s.is::<WrongType>()), "{e:?}");

        let simple = super::SimpleRow::new(columns, data()).unwrap();
        let e = simple.try_get("t").unwrap_err();
        assert!(
            e.source().is_some_and(|s| s.is::<std::str::Utf8Error>()),
            "{e:?}"
        );
    }

    #[test]
    fn container_headers_cannot_claim_more_than_they_hold() {
        use postgres_types::Type;
        // int4[] with one dimension of 2^31-1 elements, and no element bytes.
        let mut raw = Vec::new();
        for w in [1i32, 0, 23, i32::MAX, 1] {
            raw.extend_from_slice(&w.to_be_bytes());
        }
        let array = super::Container::of(&Type::INT4_ARRAY);
        assert!(super::check_claimed_sizes(array, &raw).is_err());
        // The same header with its one element really there is fine.
        let mut ok = Vec::new();
        for w in [1i32, 0, 23, 1, 1, 4, 7] {
            ok.extend_from_slice(&w.to_be_bytes());
        }
        assert!(super::check_claimed_sizes(array, &ok).is_ok());
        assert!(super::check_claimed_sizes(array, &7i32.to_be_bytes()).is_err());
        let hstore = Type::new(
            "hstore".into(),
            99999,
            postgres_types::Kind::Simple,
            "public".into(),
        );
        let hstore = super::Container::of(&hstore);
        assert!(super::check_claimed_sizes(hstore, &i32::MAX.to_be_bytes()).is_err());
        assert!(super::check_claimed_sizes(hstore, &0i32.to_be_bytes()).is_ok());
        // Values of other types are not looked at.
        assert_eq!(super::Container::of(&Type::INT4), super::Container::None);
    }

    #[test]
    fn rows_affected_from_tags() {
        assert_eq!(rows_affected(b"INSERT 0 5"), 5);
        assert_eq!(rows_affected(b"SELECT 12"), 12);
        assert_eq!(rows_affected(b"UPDATE 0"), 0);
        assert_eq!(rows_affected(b"CREATE TABLE"), 0);
        assert_eq!(rows_affected(b""), 0);
        assert_eq!(rows_affected(b"SELECT 18446744073709551615"), u64::MAX);
        assert_eq!(rows_affected(b"SELECT 18446744073709551616"), 0);
        assert_eq!(rows_affected(b"SELECT 1x"), 0);
        assert_eq!(rows_affected(b"SELECT x1"), 0);
        assert_eq!(rows_affected(b"12"), 12);
        assert_eq!(rows_affected(b"SAVEPOINT"), 0);
        assert_eq!(rows_affected(b"SELECT "), 0);
    }
}
