//! Every common type through a real server and back, in the binary format: parameters encoded
//! by postgres-types' `ToSql`, results decoded by `FromSql`. Where a generator fits, the value
//! is a proptest property; where the server's text rendering is easy to predict, it is checked
//! too, so an encoder and decoder that were wrong in the same way would still be caught.

mod common;

use std::cell::RefCell;
use std::fmt::Debug;

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use pgengine::Connection;
use pgengine::types::{Array, Interval};
use postgres_types::{FromSqlOwned, ToSql};
use proptest::prelude::*;
use rust_decimal::Decimal;
use uuid::Uuid;

/// A runtime and one connection, reused by every case of a property.
struct Db {
    rt: tokio::runtime::Runtime,
    conn: RefCell<Connection>,
}

impl Db {
    fn new() -> Db {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let conn = RefCell::new(rt.block_on(common::connect()));
        Db { rt, conn }
    }

    /// `SELECT $1::<ty>, $1::<ty>::text` and returns the decoded value and the server's text.
    fn echo<T>(&self, ty: &str, value: &T) -> (T, Option<String>)
    where
        T: ToSql + FromSqlOwned + Sync,
    {
        let sql = format!("SELECT $1::{ty}, $1::{ty}::text");
        let mut conn = self.conn.borrow_mut();
        let row = self
            .rt
            .block_on(conn.query_one((sql.as_str(), (value,))))
            .unwrap_or_else(|e| panic!("{ty}: {e}"));
        (row.get(0), row.get(1))
    }

    /// Asserts that `value` comes back unchanged, and as `text` if given.
    fn round_trip<T>(&self, ty: &str, value: T, text: Option<&str>)
    where
        T: ToSql + FromSqlOwned + Sync + PartialEq + Debug,
    {
        let (back, server_text) = self.echo(ty, &value);
        assert_eq!(back, value, "{ty}");
        if let Some(text) = text {
            assert_eq!(server_text.as_deref(), Some(text), "{ty} as text");
        }
    }

    /// Asserts that NULL of type `ty` comes back as `None::<T>`.
    fn null<T>(&self, ty: &str)
    where
        T: ToSql + FromSqlOwned + Sync + Debug,
    {
        let (back, text) = self.echo::<Option<T>>(ty, &None);
        assert!(back.is_none(), "{ty}");
        assert_eq!(text, None);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn integers(a in any::<i16>(), b in any::<i32>(), c in any::<i64>(), d in any::<i8>()) {
        let db = Db::new();
        db.round_trip("int2", a, Some(&a.to_string()));
        db.round_trip("int4", b, Some(&b.to_string()));
        db.round_trip("int8", c, Some(&c.to_string()));
        db.round_trip("\"char\"", d, None);
    }

    /// An owned `Query` keeps the common values in place (the first three) and boxes the rest;
    /// both ways must reach the server as the values themselves.
    #[test]
    fn owned_query_values(flag in any::<bool>(), small in any::<i16>(), n in any::<i32>(),
                          big in any::<i64>(), x in any::<f64>(), s in "\\PC{0,20}",
                          maybe in proptest::option::of(any::<i32>())) {
        prop_assume!(!s.contains('\0'));
        let db = Db::new();
        let mut conn = db.conn.borrow_mut();
        let inline = pgengine::Query::new("SELECT $1::int4, $2::text, $3::bool")
            .bind(n)
            .bind(s.clone())
            .bind(flag);
        let row = db.rt.block_on(conn.query_one(&inline)).unwrap();
        prop_assert_eq!(row.get::<_, i32>(0), n);
        prop_assert_eq!(row.get::<_, String>(1), s.clone());
        prop_assert_eq!(row.get::<_, bool>(2), flag);

        let spilled = pgengine::Query::new(
            "SELECT $1::int2, $2::int8, $3::float8, $4::text, $5::int4, $6::text",
        )
        .bind(small)
        .bind(big)
        .bind(x)
        .bind("static text")
        .bind(maybe)
        .bind(s.clone());
        let row = db.rt.block_on(conn.query_one(&spilled)).unwrap();
        prop_assert_eq!(row.get::<_, i16>(0), small);
        prop_assert_eq!(row.get::<_, i64>(1), big);
        let back = row.get::<_, f64>(2);
        prop_assert!(back == x || (x.is_nan() && back.is_nan()));
        prop_assert_eq!(row.get::<_, &str>(3), "static text");
        prop_assert_eq!(row.get::<_, Option<i32>>(4), maybe);
        prop_assert_eq!(row.get::<_, String>(5), s);
    }

    #[test]
    fn floats(a in any::<f32>(), b in any::<f64>()) {
        let db = Db::new();
        let (back, _) = db.echo("float4", &a);
        prop_assert!(back == a || (a.is_nan() && back.is_nan()));
        let (back, text) = db.echo("float8", &b);
        prop_assert!(back == b || (b.is_nan() && back.is_nan()));
        // The server prints the shortest text that reads back exactly (extra_float_digits 1).
        if b.is_finite() {
            prop_assert_eq!(text.unwrap().parse::<f64>().unwrap(), b);
        }
    }

    #[test]
    fn text_and_bytes(s in "\\PC{0,40}", bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        prop_assume!(!s.contains('\0'));
        let db = Db::new();
        db.round_trip("text", s.clone(), Some(&s));
        db.round_trip("varchar", s.clone(), Some(&s));
        db.round_trip("bytea", bytes.clone(), None);
        let (_, hex) = db.echo("bytea", &bytes);
        let expected: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        prop_assert_eq!(hex.unwrap(), format!("\\x{expected}"));
    }

    #[test]
    fn numeric(mantissa in any::<i64>(), scale in 0u32..20) {
        let db = Db::new();
        let d = Decimal::new(mantissa, scale);
        db.round_trip("numeric", d, Some(&d.to_string()));
    }

    #[test]
    fn dates_and_times(days in -700_000i64..2_000_000, micros in 0i64..86_400_000_000) {
        let db = Db::new();
        let date = NaiveDate::from_ymd_opt(2000, 1, 1).unwrap() + chrono::Duration::days(days);
        let time = NaiveTime::MIN + chrono::Duration::microseconds(micros);
        let ts = NaiveDateTime::new(date, time);
        db.round_trip("date", date, None);
        db.round_trip("time", time, None);
        db.round_trip("timestamp", ts, None);
        db.round_trip("timestamptz", ts.and_utc(), None);
        if date.format("%Y").to_string().len() == 4 && days > -700_000 {
            let (_, text) = db.echo("date", &date);
            prop_assert_eq!(text.unwrap(), date.format("%Y-%m-%d").to_string());
        }
    }

    #[test]
    fn intervals(months in -10_000i32..10_000, days in -100_000i32..100_000, us in any::<i32>()) {
        let db = Db::new();
        db.round_trip("interval", Interval { months, days, microseconds: i64::from(us) }, None);
    }

    #[test]
    fn uuids(bits in any::<u128>()) {
        let db = Db::new();
        let u = Uuid::from_u128(bits);
        db.round_trip("uuid", u, Some(&u.hyphenated().to_string()));
    }

    #[test]
    fn one_dimensional_arrays_with_nulls(v in proptest::collection::vec(proptest::option::of(any::<i32>()), 0..12),
                                         t in proptest::collection::vec(proptest::option::of("[a-z ,{}\"]{0,6}"), 0..6)) {
        let db = Db::new();
        db.round_trip("int4[]", v, None);
        db.round_trip("text[]", t, None);
    }

    #[test]
    fn multidimensional_arrays(rows in 1i32..4, cols in 1i32..4, seed in any::<i64>()) {
        let db = Db::new();
        let n = (rows * cols) as usize;
        let elements: Vec<Option<i64>> =
            (0..n).map(|i| if (seed >> (i % 60)) & 1 == 1 { None } else { Some(seed.wrapping_mul(i as i64)) }).collect();
        let a = Array::from_parts(vec![rows, cols], elements).unwrap();
        db.round_trip("int8[]", a, None);
    }
}

#[test]
fn float_specials() {
    let db = Db::new();
    for v in [
        f64::INFINITY,
        f64::NEG_INFINITY,
        0.0,
        -0.0,
        f64::MIN_POSITIVE,
        f64::MAX,
    ] {
        db.round_trip("float8", v, None);
    }
    let (nan, text) = db.echo("float8", &f64::NAN);
    assert!(nan.is_nan());
    assert_eq!(text.as_deref(), Some("NaN"));
    assert_eq!(
        db.echo("float8", &f64::INFINITY).1.as_deref(),
        Some("Infinity")
    );
    assert_eq!(
        db.echo("float4", &f32::NEG_INFINITY).1.as_deref(),
        Some("-Infinity")
    );
    let (nan, _) = db.echo("float4", &f32::NAN);
    assert!(nan.is_nan());
}

#[test]
fn bools_and_extremes() {
    let db = Db::new();
    db.round_trip("bool", true, Some("true"));
    db.round_trip("bool", false, Some("false"));
    db.round_trip("int8", i64::MIN, Some("-9223372036854775808"));
    db.round_trip("text", "ü ß € 𝄞 日本".to_owned(), Some("ü ß € 𝄞 日本"));
    db.round_trip("text", String::new(), Some(""));
    db.round_trip(
        "numeric",
        "-123456789012345678.9012345678".parse::<Decimal>().unwrap(),
        Some("-123456789012345678.9012345678"),
    );
    db.round_trip(
        "interval",
        Interval {
            months: 14,
            days: 3,
            microseconds: 3_723_000_004,
        },
        Some("1 year 2 mons 3 days 01:02:03.000004"),
    );
    let ts: DateTime<Utc> = "2024-02-29T12:34:56.789012Z".parse().unwrap();
    db.round_trip("timestamptz", ts, None);
}

#[test]
fn json_and_jsonb() {
    let db = Db::new();
    let v = serde_json::json!({"a": [1, 2.5, null, true], "b": {"ü": "x"}, "c": ""});
    db.round_trip("jsonb", v.clone(), None);
    db.round_trip("json", v.clone(), None);
    db.round_trip("jsonb", serde_json::Value::Null, Some("null"));
}

#[test]
fn multidimensional_text_and_empty_arrays() {
    let db = Db::new();
    let a = Array::from_parts(
        vec![2, 2],
        vec![
            Some("a".to_owned()),
            None,
            Some("c".to_owned()),
            Some("d d".to_owned()),
        ],
    )
    .unwrap();
    let (back, text) = db.echo("text[]", &a);
    assert_eq!(back, a);
    assert_eq!(text.as_deref(), Some("{{a,NULL},{c,\"d d\"}}"));
    // An array with explicit lower bounds keeps them.
    let mut conn = db.conn.borrow_mut();
    let row = db
        .rt
        .block_on(conn.query_one("SELECT '[0:1][2:3]={{1,2},{3,4}}'::int4[]"))
        .unwrap();
    let a: Array<i32> = row.get(0);
    assert_eq!(a.dimensions()[0].lower_bound, 0);
    assert_eq!(a.dimensions()[1].lower_bound, 2);
    assert_eq!(a.elements(), &[1, 2, 3, 4]);
    drop(conn);
    db.round_trip("int4[]", Vec::<i32>::new(), Some("{}"));
}

#[test]
fn null_of_every_type() {
    let db = Db::new();
    db.null::<i16>("int2");
    db.null::<i32>("int4");
    db.null::<i64>("int8");
    db.null::<f32>("float4");
    db.null::<f64>("float8");
    db.null::<bool>("bool");
    db.null::<String>("text");
    db.null::<Vec<u8>>("bytea");
    db.null::<Decimal>("numeric");
    db.null::<NaiveDate>("date");
    db.null::<NaiveTime>("time");
    db.null::<NaiveDateTime>("timestamp");
    db.null::<DateTime<Utc>>("timestamptz");
    db.null::<Interval>("interval");
    db.null::<Uuid>("uuid");
    db.null::<serde_json::Value>("jsonb");
    db.null::<serde_json::Value>("json");
    db.null::<Vec<i32>>("int4[]");
    db.null::<Array<i32>>("int4[]");
}

#[test]
fn time_crate_values() {
    let db = Db::new();
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_000).unwrap();
    db.round_trip("timestamptz", t, None);
    db.round_trip("date", t.date(), None);
}
