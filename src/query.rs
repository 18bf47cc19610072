//! What a user asks the server to run: SQL text with `$1..$n` placeholders and their values.
//!
//! Two forms reach the same code through [`ToQuery`]:
//!
//! - [`Query`], owned and `Send + Sync`: built in one place, run in another, kept in an
//!   `Atomic` or a batch.
//! - borrowed, for zero-copy calls: `(sql, &[&dyn ToSql])`, or `(sql, (a, b, …))` with a Rust
//!   tuple of values of different types, or a plain `&str` with no parameters.
//!
//! ```
//! use pgengine::Query;
//!
//! let q = Query::new("SELECT name FROM band WHERE popularity > $1 AND name <> $2")
//!     .bind(1000)
//!     .bind("Pythonistas".to_owned());
//! assert_eq!(q.param_count(), 2);
//! ```
//!
//! Before anything is sent, the number of values is checked against the placeholders in the
//! SQL ([`count_placeholders`]), and each value is encoded through `postgres_types::ToSql`.

use std::any::Any;
use std::borrow::Cow;
use std::fmt;

use postgres_types::{ToSql, Type};
use smallvec::SmallVec;

/// Borrowed parameter values of mixed types, for `(sql, params)` queries:
/// `let p: BorrowedParams = &[&id, &name];`.
pub type BorrowedParams<'a> = &'a [&'a (dyn ToSql + Sync)];

/// A parameter value that can be sent and shared between threads.
pub type BoxedParam = Box<dyn ToSql + Send + Sync>;

/// An owned query: SQL text and its parameter values.
///
/// SQL given as a `&'static str` (a literal or a constant) is kept by reference, not copied;
/// other text is given as a `String`. The values of the common scalar types and strings are
/// kept in place, up to [`INLINE_PARAMS`] of them: building such a query allocates nothing.
pub struct Query {
    sql: Cow<'static, str>,
    params: SmallVec<[Bound; INLINE_PARAMS]>,
    timeout: Option<std::time::Duration>,
}

/// How many values a [`Query`] holds without allocating.
pub const INLINE_PARAMS: usize = 3;

impl Query {
    /// A query with no parameters yet.
    ///
    /// ```
    /// use pgengine::Query;
    ///
    /// let fixed = Query::new("SELECT 1"); // a literal is not copied
    /// let table = "band";
    /// let built = Query::new(format!("SELECT count(*) FROM {table}"));
    /// let borrowed = Query::new(table.to_owned()); // other borrowed text: own it first
    /// # let _ = (fixed, built, borrowed);
    /// ```
    pub fn new(sql: impl Into<Cow<'static, str>>) -> Query {
        Query {
            sql: sql.into(),
            params: SmallVec::new(),
            timeout: None,
        }
    }

    /// Gives this query its own time limit, instead of the connection's or engine's query
    /// timeout. When it passes, the statement is cancelled on the server and the query fails
    /// with [`ErrorKind::Timeout`](crate::ErrorKind::Timeout); the connection stays usable.
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgengine::Query;
    ///
    /// let q = Query::new("SELECT pg_sleep(10)").timeout(Duration::from_millis(100));
    /// # use pgengine::query::ToQuery;
    /// assert_eq!(q.time_limit(), Some(Duration::from_millis(100)));
    /// ```
    pub fn timeout(mut self, limit: std::time::Duration) -> Query {
        self.timeout = Some(limit);
        self
    }

    /// Adds the value of the next placeholder (`$1`, then `$2`, …).
    pub fn bind<T: ToSql + Send + Sync + 'static>(mut self, value: T) -> Query {
        self.params.push(Bound::new(value));
        self
    }

    /// Adds the value of the next placeholder, in place.
    pub fn push_bind<T: ToSql + Send + Sync + 'static>(&mut self, value: T) -> &mut Query {
        self.params.push(Bound::new(value));
        self
    }

    /// The SQL text.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// The number of values bound so far.
    pub fn param_count(&self) -> usize {
        self.params.len()
    }
}

impl fmt::Debug for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Values are left out: they may be secrets, and most have no useful Debug anyway.
        f.debug_struct("Query")
            .field("sql", &self.sql)
            .field("params", &self.params.len())
            .finish()
    }
}

/// A list of parameter values, indexed from 0. `Sync`, so that a query future holding a
/// reference to it can move between threads.
pub trait Params: Sync {
    /// How many values there are.
    fn len(&self) -> usize;
    /// The value at `i` (`i < len()`).
    fn get(&self, i: usize) -> &(dyn ToSql + Sync);
    /// True if there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether the value at `i` can be sent as `ty`, when that is known without encoding it;
    /// `None` if only encoding can tell. When the engine chooses a type for a value it tries
    /// built-in types in turn, and through `dyn ToSql` each refusal is an allocated error:
    /// with this answer it skips the types a value refuses for free.
    #[doc(hidden)]
    fn accepts(&self, _i: usize, _ty: &Type) -> Option<bool> {
        None
    }
}

impl Params for [&(dyn ToSql + Sync)] {
    fn len(&self) -> usize {
        <[_]>::len(self)
    }
    fn get(&self, i: usize) -> &(dyn ToSql + Sync) {
        self[i]
    }
}

impl<const N: usize> Params for [&(dyn ToSql + Sync); N] {
    fn len(&self) -> usize {
        N
    }
    fn get(&self, i: usize) -> &(dyn ToSql + Sync) {
        self[i]
    }
}

impl Params for Vec<BoxedParam> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
    fn get(&self, i: usize) -> &(dyn ToSql + Sync) {
        &*self[i]
    }
}

/// One value bound to a [`Query`]: the common types in place, anything else boxed.
enum Bound {
    Bool(bool),
    Int2(i16),
    Int4(i32),
    Int8(i64),
    Float4(f32),
    Float8(f64),
    Str(&'static str),
    String(String),
    Boxed(BoxedParam),
}

impl Bound {
    fn new<T: ToSql + Send + Sync + 'static>(value: T) -> Bound {
        /// `slot`'s value if it is a `U`, taken out of it.
        fn take<U: 'static>(slot: &mut dyn Any) -> Option<U> {
            slot.downcast_mut::<Option<U>>().and_then(Option::take)
        }
        // The type tests are resolved at compile time: each `bind` keeps one branch.
        let mut slot = Some(value);
        let any: &mut dyn Any = &mut slot;
        macro_rules! keep_in_place {
            ($($variant:ident),*) => {$(
                if let Some(v) = take(any) {
                    return Bound::$variant(v);
                }
            )*};
        }
        keep_in_place!(Int4, Int8, String, Str, Bool, Int2, Float8, Float4);
        match slot {
            Some(value) => Bound::Boxed(Box::new(value)),
            None => unreachable!("each branch that takes the value returns"),
        }
    }

    fn text(&self) -> Option<&str> {
        match self {
            Bound::Str(v) => Some(v),
            Bound::String(v) => Some(v),
            _ => None,
        }
    }

    fn as_dyn(&self) -> &(dyn ToSql + Sync) {
        match self {
            Bound::Bool(v) => v,
            Bound::Int2(v) => v,
            Bound::Int4(v) => v,
            Bound::Int8(v) => v,
            Bound::Float4(v) => v,
            Bound::Float8(v) => v,
            Bound::Str(v) => v,
            Bound::String(v) => v,
            Bound::Boxed(v) => &**v,
        }
    }
}

/// Encodes as the value it holds. Text going to a built-in text type is written directly:
/// postgres-types first compares the type's name with those of extension types (`ltree`, …),
/// which would cost more than the copy.
impl ToSql for Bound {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<postgres_types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        // A trait object only offers the checked form.
        self.to_sql_checked(ty, out)
    }

    fn accepts(_: &Type) -> bool {
        // Checked per value, in `to_sql_checked`.
        true
    }

    fn to_sql_checked(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<postgres_types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self.text() {
            Some(text) if is_builtin_text(ty) => {
                out.extend_from_slice(text.as_bytes());
                Ok(postgres_types::IsNull::No)
            }
            _ => self.as_dyn().to_sql_checked(ty, out),
        }
    }

    fn encode_format(&self, ty: &Type) -> postgres_types::Format {
        self.as_dyn().encode_format(ty)
    }
}

/// The built-in types a `&str` is sent to as its bytes (what postgres-types does for them).
fn is_builtin_text(ty: &Type) -> bool {
    matches!(
        *ty,
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN
    )
}

impl fmt::Debug for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Values may be secrets.
        f.write_str("Bound(..)")
    }
}

impl Params for SmallVec<[Bound; INLINE_PARAMS]> {
    fn len(&self) -> usize {
        <[Bound]>::len(self)
    }
    fn get(&self, i: usize) -> &(dyn ToSql + Sync) {
        &self[i]
    }
    fn accepts(&self, i: usize, ty: &Type) -> Option<bool> {
        let accepts = match &self[i] {
            Bound::Bool(_) => bool::accepts(ty),
            Bound::Int2(_) => i16::accepts(ty),
            Bound::Int4(_) => i32::accepts(ty),
            Bound::Int8(_) => i64::accepts(ty),
            Bound::Float4(_) => f32::accepts(ty),
            Bound::Float8(_) => f64::accepts(ty),
            Bound::Str(_) | Bound::String(_) => <&str>::accepts(ty),
            Bound::Boxed(_) => return None,
        };
        Some(accepts)
    }
}

impl<P: Params + ?Sized> Params for &P {
    fn len(&self) -> usize {
        P::len(self)
    }
    fn get(&self, i: usize) -> &(dyn ToSql + Sync) {
        P::get(self, i)
    }
    fn accepts(&self, i: usize, ty: &Type) -> Option<bool> {
        P::accepts(self, i, ty)
    }
}

impl Params for () {
    fn len(&self) -> usize {
        0
    }
    fn get(&self, i: usize) -> &(dyn ToSql + Sync) {
        unreachable!("() has no parameter {i}")
    }
}

macro_rules! tuple_params {
    ($n:literal: $($T:ident $i:tt),+) => {
        impl<$($T: ToSql + Sync),+> Params for ($($T,)+) {
            fn len(&self) -> usize {
                $n
            }
            fn get(&self, i: usize) -> &(dyn ToSql + Sync) {
                match i {
                    $($i => &self.$i,)+
                    _ => panic!("parameter index {i} out of range for {} values", $n),
                }
            }
            fn accepts(&self, i: usize, ty: &Type) -> Option<bool> {
                match i {
                    $($i => Some(<$T as ToSql>::accepts(ty)),)+
                    _ => None,
                }
            }
        }
    };
}

tuple_params!(1: A 0);
tuple_params!(2: A 0, B 1);
tuple_params!(3: A 0, B 1, C 2);
tuple_params!(4: A 0, B 1, C 2, D 3);
tuple_params!(5: A 0, B 1, C 2, D 3, E 4);
tuple_params!(6: A 0, B 1, C 2, D 3, E 4, F 5);
tuple_params!(7: A 0, B 1, C 2, D 3, E 4, F 5, G 6);
tuple_params!(8: A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7);
tuple_params!(9: A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8);
tuple_params!(10: A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9);
tuple_params!(11: A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10);
tuple_params!(12: A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11);

/// Anything that can be run as a query: SQL text and its parameter values.
///
/// Implemented for [`Query`] (owned or borrowed), `&str` and `String` (no parameters), and
/// `(sql, params)` pairs where `params` is a slice or array of `&(dyn ToSql + Sync)` or a
/// tuple of values:
///
/// ```no_run
/// # async fn demo(conn: &mut pgengine::Connection) -> pgengine::Result<()> {
/// conn.execute("CREATE TEMP TABLE t (id int8, name text)").await?;
/// conn.execute(("INSERT INTO t VALUES ($1, $2)", (7i64, "seven"))).await?;
/// let name: String = conn.query_one(("SELECT name FROM t WHERE id = $1", (&7i64,))).await?.get(0);
/// # Ok(())
/// # }
/// ```
pub trait ToQuery: Sync {
    /// The SQL text.
    fn sql(&self) -> &str;
    /// The parameter values.
    fn params(&self) -> &dyn Params;
    /// The query's own time limit, if it has one (see [`Query::timeout`]).
    fn time_limit(&self) -> Option<std::time::Duration> {
        None
    }

    /// This query as an owned [`Query`] if it is one, so that a collection of queries (an
    /// `Atomic`) keeps it as it is instead of boxing it. Not part of the API.
    #[doc(hidden)]
    fn __into_query(self) -> std::result::Result<Query, Self>
    where
        Self: Sized,
    {
        Err(self)
    }
}

impl ToQuery for Query {
    fn sql(&self) -> &str {
        &self.sql
    }
    fn params(&self) -> &dyn Params {
        &self.params
    }
    fn time_limit(&self) -> Option<std::time::Duration> {
        self.timeout
    }
    fn __into_query(self) -> std::result::Result<Query, Self> {
        Ok(self)
    }
}

impl<Q: ToQuery + ?Sized> ToQuery for &Q {
    fn sql(&self) -> &str {
        (**self).sql()
    }
    fn params(&self) -> &dyn Params {
        (**self).params()
    }
    fn time_limit(&self) -> Option<std::time::Duration> {
        (**self).time_limit()
    }
}

impl ToQuery for str {
    fn sql(&self) -> &str {
        self
    }
    fn params(&self) -> &dyn Params {
        &()
    }
}

impl ToQuery for String {
    fn sql(&self) -> &str {
        self
    }
    fn params(&self) -> &dyn Params {
        &()
    }
}

impl<S: AsRef<str> + Sync, P: Params> ToQuery for (S, P) {
    fn sql(&self) -> &str {
        self.0.as_ref()
    }
    fn params(&self) -> &dyn Params {
        &self.1
    }
}

/// The built-in types a parameter's type is chosen from when the server has not described the
/// statement yet, in order of preference: the first one the value accepts wins. Where a Rust
/// type accepts several (a `String` accepts text, varchar, bpchar and name; a JSON value json
/// and jsonb), the first is the one the server converts from most freely — text has implicit
/// casts to varchar and bpchar, and json and jsonb assignment casts both ways.
pub(crate) const CANDIDATE_TYPES: &[Type] = &[
    Type::BOOL,
    Type::INT4,
    Type::INT8,
    Type::INT2,
    Type::FLOAT8,
    Type::FLOAT4,
    Type::TEXT,
    Type::BYTEA,
    Type::NUMERIC,
    Type::TIMESTAMPTZ,
    Type::TIMESTAMP,
    Type::DATE,
    Type::TIME,
    Type::TIMETZ,
    Type::INTERVAL,
    Type::UUID,
    Type::JSONB,
    Type::JSON,
    Type::INET,
    Type::CIDR,
    Type::MACADDR,
    Type::MACADDR8,
    Type::BIT,
    Type::VARBIT,
    Type::POINT,
    Type::BOX,
    Type::PATH,
    Type::OID,
    Type::CHAR,
    Type::VARCHAR,
    Type::BPCHAR,
    Type::NAME,
    Type::BOOL_ARRAY,
    Type::INT4_ARRAY,
    Type::INT8_ARRAY,
    Type::INT2_ARRAY,
    Type::FLOAT8_ARRAY,
    Type::FLOAT4_ARRAY,
    Type::TEXT_ARRAY,
    Type::BYTEA_ARRAY,
    Type::NUMERIC_ARRAY,
    Type::TIMESTAMPTZ_ARRAY,
    Type::TIMESTAMP_ARRAY,
    Type::DATE_ARRAY,
    Type::TIME_ARRAY,
    Type::INTERVAL_ARRAY,
    Type::UUID_ARRAY,
    Type::JSONB_ARRAY,
    Type::JSON_ARRAY,
    Type::INET_ARRAY,
    Type::OID_ARRAY,
    Type::CHAR_ARRAY,
    Type::VARCHAR_ARRAY,
    Type::BPCHAR_ARRAY,
    Type::NAME_ARRAY,
];

pub use crate::sql::count_placeholders;

#[cfg(test)]
mod tests {
    use super::*;

    /// What `value` encodes to as `ty`, straight and through a bound [`Query`].
    fn both_ways<T: ToSql + Send + Sync + Clone + 'static>(value: T, ty: Type) {
        let mut direct = bytes::BytesMut::new();
        let outcome =
            |r: Result<postgres_types::IsNull, Box<dyn std::error::Error + Sync + Send>>| {
                r.map(|null| matches!(null, postgres_types::IsNull::Yes))
                    .map_err(|e| e.to_string())
            };
        let direct_null = outcome(value.to_sql_checked(&ty, &mut direct));
        let q = Query::new("SELECT $1").bind(value);
        let mut bound = bytes::BytesMut::new();
        let bound_null = outcome(q.params().get(0).to_sql_checked(&ty, &mut bound));
        assert_eq!(direct_null, bound_null, "{ty}");
        assert_eq!(direct, bound, "{ty}");
    }

    /// A value that cannot be encoded keeps the `ToSql` implementation's error as the
    /// error's source, and nothing was sent.
    #[test]
    fn an_encoding_error_keeps_its_cause() {
        use std::error::Error as _;

        #[derive(Debug)]
        struct TooBig;
        impl std::fmt::Display for TooBig {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("too big to send")
            }
        }
        impl std::error::Error for TooBig {}
        #[derive(Debug)]
        struct Refuses;
        impl ToSql for Refuses {
            fn to_sql(
                &self,
                _: &Type,
                _: &mut bytes::BytesMut,
            ) -> Result<postgres_types::IsNull, Box<dyn std::error::Error + Sync + Send>>
            {
                Err(Box::new(TooBig))
            }
            fn accepts(_: &Type) -> bool {
                true
            }
            postgres_types::to_sql_checked!();
        }

        let q = Query::new("SELECT $1, $2").bind(1i32).bind(Refuses);
        let e = encode_params(q.params()).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Conversion);
        assert!(
            e.to_string().contains("parameter $2: too big to send"),
            "{e}"
        );
        assert!(e.safe_to_retry());
        assert!(e.source().is_some_and(|s| s.is::<TooBig>()), "{e:?}");
    }

    #[test]
    fn bound_values_encode_as_themselves() {
        // Kept in place.
        both_ways(true, Type::BOOL);
        both_ways(-7i16, Type::INT2);
        both_ways(i32::MIN, Type::INT4);
        both_ways(i64::MAX, Type::INT8);
        both_ways(f32::NAN, Type::FLOAT4);
        both_ways(-0.5f64, Type::FLOAT8);
        both_ways("static ünïcode", Type::TEXT);
        both_ways(String::from("owned"), Type::VARCHAR);
        both_ways(String::from("owned"), Type::TEXT);
        both_ways("name", Type::NAME);
        both_ways("bp", Type::BPCHAR);
        both_ways("unknown", Type::UNKNOWN);
        both_ways("{}", Type::JSON);
        // Boxed, NULL included.
        both_ways(Some(5i32), Type::INT4);
        both_ways(None::<i32>, Type::INT4);
        both_ways(vec![1i64, 2], Type::INT8_ARRAY);
        both_ways(vec![0u8, 255], Type::BYTEA);
        // A wrong type is refused the same way by both, naming the value's own type.
        both_ways(1i32, Type::TEXT);
        both_ways(String::from("x"), Type::INT4);
        both_ways(vec![1i64], Type::TEXT);
    }

    #[test]
    fn inline_storage_takes_the_first_values() {
        let mut q = Query::new("SELECT $1, $2, $3, $4");
        for i in 0..4i32 {
            q.push_bind(i);
        }
        assert_eq!(q.param_count(), 4);
        assert!(q.params.spilled(), "a fourth value moves them to the heap");
        let three = Query::new("SELECT $1, $2, $3")
            .bind(1i32)
            .bind("a")
            .bind(2.0f64);
        assert!(!three.params.spilled());
    }

    #[test]
    fn tuple_and_slice_params() {
        let q = ("SELECT $1, $2", (1i32, "two"));
        assert_eq!(q.params().len(), 2);
        let v = 5i64;
        let slice: &[&(dyn ToSql + Sync)] = &[&v];
        let q = ("SELECT $1", slice);
        assert_eq!(q.params().len(), 1);
        assert_eq!(ToQuery::params("SELECT 1").len(), 0);
        let owned = Query::new("SELECT $1").bind(3i16);
        assert_eq!(owned.params().len(), 1);
        assert!(!format!("{owned:?}").contains('3'));
    }

    /// Checks that wherever `params` says without encoding whether a value takes a type, the
    /// value's own encoding agrees, for every type the engine may choose; returns how many
    /// answers it gave.
    fn accepts_agrees_with_encoding(params: &dyn Params) -> usize {
        let mut answered = 0;
        for i in 0..params.len() {
            for ty in CANDIDATE_TYPES {
                let Some(said) = params.accepts(i, ty) else {
                    continue;
                };
                answered += 1;
                let mut buf = bytes::BytesMut::new();
                let refused = matches!(
                    params.get(i).to_sql_checked(ty, &mut buf),
                    Err(e) if e.is::<postgres_types::WrongType>()
                );
                assert_eq!(said, !refused, "value {i} as {ty}");
            }
        }
        answered
    }

    #[test]
    fn what_params_say_they_accept_is_what_they_encode() {
        let tuple = (
            true,
            1i16,
            2i32,
            3i64,
            1.5f32,
            2.5f64,
            "s",
            String::from("t"),
        );
        let n = CANDIDATE_TYPES.len();
        assert_eq!(accepts_agrees_with_encoding(&tuple), 8 * n);
        let tuple = (Some(1i32), vec![1u8], vec![1i64, 2]);
        assert_eq!(accepts_agrees_with_encoding(&tuple), 3 * n);
        let bound = Query::new("SELECT $1, $2, $3, $4, $5")
            .bind(true)
            .bind(7i64)
            .bind("x")
            .bind(String::from("y"))
            .bind(0.5f32);
        assert_eq!(accepts_agrees_with_encoding(&bound.params), 5 * n);
        // Boxed values can only be asked by encoding them.
        let boxed = Query::new("SELECT $1").bind(Some(1i32));
        assert_eq!(accepts_agrees_with_encoding(&boxed.params), 0);
        let encoded = encode_params(&tuple).unwrap().unwrap();
        assert_eq!(accepts_agrees_with_encoding(&encoded), 3 * n);
    }
}

/// A parameter value already encoded for one type: what a query's values become when the
/// query is handed to another task (the engine's pipelined mode). It only accepts being sent
/// as that type.
#[derive(Debug, Clone)]
pub(crate) struct EncodedParam {
    pub(crate) ty: Type,
    pub(crate) value: Option<EncodedValue>,
    pub(crate) format: postgres_types::Format,
}

/// An encoded value: most (integers, floats, timestamps, uuids, short text) fit inline, so a
/// pipelined query's parameters cost no allocation of their own.
#[derive(Debug, Clone)]
pub(crate) enum EncodedValue {
    Inline { len: u8, bytes: [u8; INLINE_VALUE] },
    Heap(Box<[u8]>),
}

/// The longest value kept inline.
const INLINE_VALUE: usize = 22;

impl EncodedValue {
    fn new(encoded: &[u8]) -> EncodedValue {
        if encoded.len() <= INLINE_VALUE {
            let mut bytes = [0; INLINE_VALUE];
            bytes[..encoded.len()].copy_from_slice(encoded);
            EncodedValue::Inline {
                len: encoded.len() as u8,
                bytes,
            }
        } else {
            EncodedValue::Heap(encoded.into())
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            EncodedValue::Inline { len, bytes } => &bytes[..usize::from(*len)],
            EncodedValue::Heap(bytes) => bytes,
        }
    }
}

impl ToSql for EncodedParam {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<postgres_types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match &self.value {
            Some(v) => {
                out.extend_from_slice(v.as_slice());
                Ok(postgres_types::IsNull::No)
            }
            None => Ok(postgres_types::IsNull::Yes),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    fn to_sql_checked(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<postgres_types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        if *ty != self.ty {
            return Err(Box::new(postgres_types::WrongType::new::<EncodedParam>(
                ty.clone(),
            )));
        }
        self.to_sql(ty, out)
    }

    fn encode_format(&self, _: &Type) -> postgres_types::Format {
        match self.format {
            postgres_types::Format::Text => postgres_types::Format::Text,
            postgres_types::Format::Binary => postgres_types::Format::Binary,
        }
    }
}

/// Encodes `params` with the types a new statement would choose for them (the first of
/// [`CANDIDATE_TYPES`] each value accepts), or `None` if some value accepts none of them.
pub(crate) fn encode_params(params: &dyn Params) -> crate::Result<Option<Vec<EncodedParam>>> {
    thread_local! {
        // Reused by every call on this thread: values are encoded here, then copied out.
        static SCRATCH: std::cell::RefCell<bytes::BytesMut> =
            std::cell::RefCell::new(bytes::BytesMut::with_capacity(256));
    }
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut buf) => {
            let result = encode_params_with(params, &mut buf);
            if buf.capacity() > 64 * 1024 {
                // One huge value must not keep its memory on this thread for good.
                *buf = bytes::BytesMut::with_capacity(256);
            }
            result
        }
        // A ToSql impl that itself encodes a query's parameters on this thread.
        Err(_) => encode_params_with(params, &mut bytes::BytesMut::new()),
    })
}

fn encode_params_with(
    params: &dyn Params,
    buf: &mut bytes::BytesMut,
) -> crate::Result<Option<Vec<EncodedParam>>> {
    let mut out = Vec::with_capacity(params.len());
    'values: for i in 0..params.len() {
        let value = params.get(i);
        for ty in CANDIDATE_TYPES {
            if params.accepts(i, ty) == Some(false) {
                continue;
            }
            buf.clear();
            match value.to_sql_checked(ty, buf) {
                Ok(null) => {
                    let format = value.encode_format(ty);
                    let bytes = match null {
                        postgres_types::IsNull::Yes => None,
                        postgres_types::IsNull::No => Some(EncodedValue::new(buf)),
                    };
                    out.push(EncodedParam {
                        ty: ty.clone(),
                        value: bytes,
                        format,
                    });
                    continue 'values;
                }
                Err(e) if e.is::<postgres_types::WrongType>() => {}
                Err(e) => {
                    let e = crate::Error::to_sql(format_args!("parameter ${}", i + 1), e);
                    return Err(e.retry_safe());
                }
            }
        }
        return Ok(None);
    }
    Ok(Some(out))
}

impl Params for Vec<EncodedParam> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
    fn get(&self, i: usize) -> &(dyn ToSql + Sync) {
        &self[i]
    }
    fn accepts(&self, i: usize, ty: &Type) -> Option<bool> {
        Some(self[i].ty == *ty)
    }
}
