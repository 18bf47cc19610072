//! Rows into Rust types against the real cluster: tuples by position, `#[derive(FromRow)]`
//! structs by column name with their attributes, the errors that name the column at fault, and
//! postgres-types' `#[derive(ToSql, FromSql)]` for an enum and a composite type that the
//! connection learns from the catalogs at run time.

mod common;

use pgengine::pool::PoolOptions;
use pgengine::testing::TempCluster;
use pgengine::{ErrorKind, FromRow, PostgresEngine, Row};

async fn one_row(sql: &str) -> Row {
    let mut conn = common::connect().await;
    conn.query_one(sql).await.unwrap()
}

/// Asserts that `result` is a conversion error whose message contains every one of `words`.
#[track_caller]
fn assert_conversion_error<T>(result: pgengine::Result<T>, words: &[&str]) {
    let Err(err) = result else {
        panic!("expected a conversion error naming {words:?}, got a value");
    };
    assert_eq!(err.kind(), ErrorKind::Conversion, "{err}");
    let message = err.to_string();
    for word in words {
        assert!(message.contains(word), "{word:?} is not in: {message}");
    }
}

#[tokio::test]
async fn tuples_read_columns_by_position() {
    let row = one_row("SELECT 7::int4 AS n, 'seven' AS word, NULL::int8 AS nothing, true").await;
    let (n, word, nothing, yes) = <(i32, String, Option<i64>, bool)>::from_row(&row).unwrap();
    assert_eq!((n, word.as_str(), nothing, yes), (7, "seven", None, true));

    let row = one_row("SELECT 'alone'::text").await;
    assert_eq!(<(String,)>::from_row(&row).unwrap().0, "alone");

    // The largest tuple: sixteen columns, each in its place.
    let row = one_row(
        "SELECT 1::int4, 2::int4, 3::int4, 4::int4, 5::int4, 6::int4, 7::int4, 8::int4, \
         9::int4, 10::int4, 11::int4, 12::int4, 13::int4, 14::int4, 15::int4, 'last'::text",
    )
    .await;
    type Sixteen = (
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
        String,
    );
    let all = Sixteen::from_row(&row).unwrap();
    assert_eq!(
        [
            all.0, all.1, all.2, all.3, all.4, all.5, all.6, all.7, all.8, all.9, all.10, all.11,
            all.12, all.13, all.14
        ],
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    );
    assert_eq!(all.15, "last");
}

#[tokio::test]
async fn a_tuple_needs_exactly_as_many_columns_as_it_has_elements() {
    let row = one_row("SELECT 1::int4 AS a, 2::int4 AS b, 3::int4 AS c").await;
    // Fewer columns than elements, and more: both refused, saying the counts and the columns.
    assert_conversion_error(
        <(i32, i32, i32, i32)>::from_row(&row),
        &["reads 4 columns", "the row has 3 (a, b, c)"],
    );
    assert_conversion_error(
        <(i32, i32)>::from_row(&row),
        &["reads 2 columns", "the row has 3 (a, b, c)"],
    );
    assert_eq!(<(i32, i32, i32)>::from_row(&row).unwrap(), (1, 2, 3));
}

#[tokio::test]
async fn a_tuple_element_of_the_wrong_type_names_its_column() {
    let row = one_row("SELECT 1::int4 AS id, 'not a number'::text AS label").await;
    assert_conversion_error(<(i32, i64)>::from_row(&row), &["\"label\"", "text", "i64"]);
    // NULL where the element has no room for it.
    let row = one_row("SELECT NULL::int4 AS missing").await;
    assert_conversion_error(<(i32,)>::from_row(&row), &["\"missing\"", "NULL"]);
}

#[derive(Debug, PartialEq, FromRow)]
struct Member {
    id: i64,
    #[pgengine(rename = "display_name")]
    name: String,
    #[pgengine(default)]
    nickname: Option<String>,
    #[pgengine(default)]
    score: i32,
    #[pgengine(flatten)]
    band: Band,
}

#[derive(Debug, PartialEq, FromRow)]
struct Band {
    band_name: String,
    r#type: String,
}

#[tokio::test]
async fn a_derived_struct_reads_columns_by_name() {
    // Columns in another order than the fields, one the struct does not read, and every field
    // given a value.
    let row = one_row(
        "SELECT 'Rustaceans' AS band_name, 'Ann' AS display_name, 3::int4 AS score, \
         'trio' AS type, 'Annie' AS nickname, 1::int4 AS unread, 42::int8 AS id",
    )
    .await;
    assert_eq!(
        Member::from_row(&row).unwrap(),
        Member {
            id: 42,
            name: "Ann".into(),
            nickname: Some("Annie".into()),
            score: 3,
            band: Band {
                band_name: "Rustaceans".into(),
                r#type: "trio".into(),
            },
        }
    );
}

#[tokio::test]
async fn default_fields_take_their_default_when_the_column_is_missing_or_null() {
    // Both default columns missing.
    let row = one_row(
        "SELECT 1::int8 AS id, 'Bo' AS display_name, 'Pythonistas' AS band_name, 'duo' AS type",
    )
    .await;
    let member = Member::from_row(&row).unwrap();
    assert_eq!((member.nickname, member.score), (None, 0));
    assert_eq!(member.name, "Bo");

    // Both present and NULL.
    let row = one_row(
        "SELECT 1::int8 AS id, 'Bo' AS display_name, NULL::text AS nickname, \
         NULL::int4 AS score, 'Pythonistas' AS band_name, 'duo' AS type",
    )
    .await;
    let member = Member::from_row(&row).unwrap();
    assert_eq!((member.nickname, member.score), (None, 0));

    // Present with a value of the wrong type: an error, not a default.
    let row = one_row(
        "SELECT 1::int8 AS id, 'Bo' AS display_name, 'many'::text AS score, \
         'Pythonistas' AS band_name, 'duo' AS type",
    )
    .await;
    assert_conversion_error(Member::from_row(&row), &["\"score\"", "text", "i32"]);
}

#[tokio::test]
async fn a_derived_struct_names_the_column_it_cannot_read() {
    // A column of the wrong type.
    let row = one_row(
        "SELECT 'forty-two'::text AS id, 'Ann' AS display_name, 'R' AS band_name, 'x' AS type",
    )
    .await;
    assert_conversion_error(Member::from_row(&row), &["\"id\"", "text", "i64"]);

    // A renamed column missing: the error names the column, not the field.
    let row = one_row("SELECT 1::int8 AS id, 'Ann' AS name, 'R' AS band_name, 'x' AS type").await;
    assert_conversion_error(Member::from_row(&row), &["no column display_name"]);

    // A flattened struct's column missing.
    let row = one_row("SELECT 1::int8 AS id, 'Ann' AS display_name, 'R' AS band_name").await;
    assert_conversion_error(Member::from_row(&row), &["no column type"]);

    // NULL in a field that is neither Option nor default.
    let row =
        one_row("SELECT 1::int8 AS id, NULL::text AS display_name, 'R' AS band_name, 'x' AS type")
            .await;
    assert_conversion_error(Member::from_row(&row), &["\"display_name\"", "NULL"]);
}

#[derive(Debug, PartialEq, FromRow)]
#[pgengine(rename_all = "camelCase")]
struct CamelCase {
    user_id: i32,
    created_at_utc: String,
    #[pgengine(rename = "plain")]
    not_renamed_by_the_rule: bool,
}

#[derive(Debug, PartialEq, FromRow)]
#[pgengine(rename_all = "UPPERCASE")]
struct UpperCase {
    user_id: i32,
}

#[derive(Debug, PartialEq, FromRow)]
#[pgengine(rename_all = "lowercase")]
#[allow(non_snake_case)]
struct LowerCase {
    userId: i32,
}

#[derive(Debug, PartialEq, FromRow)]
#[pgengine(rename_all = "snake_case")]
struct SnakeCase {
    user_id: i32,
}

#[tokio::test]
async fn rename_all_renames_every_field_without_a_rename_of_its_own() {
    let row = one_row(
        r#"SELECT 1 AS "userId", 'noon' AS "createdAtUtc", true AS plain,
                  2 AS "USER_ID", 3 AS userid, 4 AS user_id"#,
    )
    .await;
    assert_eq!(
        CamelCase::from_row(&row).unwrap(),
        CamelCase {
            user_id: 1,
            created_at_utc: "noon".into(),
            not_renamed_by_the_rule: true,
        }
    );
    assert_eq!(UpperCase::from_row(&row).unwrap().user_id, 2);
    assert_eq!(LowerCase::from_row(&row).unwrap().userId, 3);
    assert_eq!(SnakeCase::from_row(&row).unwrap().user_id, 4);
}

#[derive(Debug, PartialEq, FromRow)]
struct Pair(i32, Option<String>);

#[derive(Debug, PartialEq, FromRow)]
struct Labelled<T> {
    label: String,
    value: T,
    #[pgengine(default)]
    extra: Option<T>,
}

#[tokio::test]
async fn tuple_structs_read_by_position_and_generic_structs_by_name() {
    let row = one_row("SELECT 5::int4 AS whatever, NULL::text AS anything").await;
    assert_eq!(Pair::from_row(&row).unwrap(), Pair(5, None));
    let row = one_row("SELECT 5::int4, 'x'::text, 6::int4").await;
    assert_conversion_error(Pair::from_row(&row), &["Pair", "reads 2 columns", "has 3"]);

    let row = one_row("SELECT 'big' AS label, 9000000000::int8 AS value").await;
    assert_eq!(
        Labelled::<i64>::from_row(&row).unwrap(),
        Labelled {
            label: "big".into(),
            value: 9_000_000_000,
            extra: None,
        }
    );
    let row = one_row("SELECT 'x' AS label, 1.5::float8 AS value, 2.5::float8 AS extra").await;
    assert_eq!(Labelled::<f64>::from_row(&row).unwrap().extra, Some(2.5));
}

/// The server's `mood` enum, by the names of its labels.
#[derive(Debug, Clone, Copy, PartialEq, pgengine::ToSql, pgengine::FromSql)]
#[postgres(name = "mood", rename_all = "lowercase")]
enum Mood {
    Sad,
    Ok,
    Happy,
}

/// The server's `pair` composite type, field by field.
#[derive(Debug, Clone, PartialEq, pgengine::ToSql, pgengine::FromSql)]
#[postgres(name = "pair")]
struct PairValue {
    a: Option<i32>,
    b: String,
}

#[derive(Debug, PartialEq, FromRow)]
struct Diary {
    id: i32,
    mood: Mood,
    moods: Vec<Mood>,
    pair: PairValue,
    /// The server's own rendering, to check the encoding as well as the round trip.
    as_text: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn derived_enum_and_composite_types_go_in_and_come_out() {
    let mut setup = common::connect().await;
    // In their own schema, so that nothing else in this binary sees them half made.
    setup
        .simple_query(
            "DROP SCHEMA IF EXISTS from_row_types CASCADE; \
             CREATE SCHEMA from_row_types; \
             CREATE TYPE from_row_types.mood AS ENUM ('sad', 'ok', 'happy'); \
             CREATE TYPE from_row_types.pair AS (a int4, b text); \
             CREATE TABLE from_row_types.diary (id int4, mood from_row_types.mood, \
                 moods from_row_types.mood[], pair from_row_types.pair)",
        )
        .await
        .unwrap();

    // Through an engine's pool: each of its connections looks the types up for itself.
    let mut config = common::tcp_config(TempCluster::SUPERUSER);
    config.options("-c search_path=from_row_types,public");
    let engine = PostgresEngine::new(config);
    engine
        .start_connection_pool(PoolOptions::default().max_size(2))
        .await
        .unwrap();

    let entries = [
        (1, Mood::Happy, vec![Mood::Sad, Mood::Ok], Some(7), "seven"),
        (2, Mood::Sad, vec![], None, "none, \"quoted\""),
    ];
    for (id, mood, moods, a, b) in &entries {
        let pair = PairValue {
            a: *a,
            b: (*b).to_owned(),
        };
        let inserted = engine
            .execute((
                "INSERT INTO diary (id, mood, moods, pair) VALUES ($1, $2, $3, $4)",
                (*id, *mood, moods.clone(), pair),
            ))
            .await
            .unwrap();
        assert_eq!(inserted, 1);
    }

    // The server holds what was sent: its own text for each value.
    let text: Vec<(i32, String)> = setup
        .query(
            "SELECT id, format('%s %s %s', mood, moods, pair) \
             FROM from_row_types.diary ORDER BY id",
        )
        .await
        .unwrap()
        .iter()
        .map(|row| <(i32, String)>::from_row(row).unwrap())
        .collect();
    assert_eq!(
        text,
        [
            (1, "happy {sad,ok} (7,seven)".to_owned()),
            // A record's text doubles the quotes inside a quoted field.
            (2, r#"sad {} (,"none, ""quoted""")"#.to_owned()),
        ]
    );

    // And reads it back into the Rust types, as result columns of a derived struct.
    let rows = engine
        .query(
            "SELECT id, mood, moods, pair, format('%s %s', mood, pair) AS as_text \
             FROM diary ORDER BY id",
        )
        .await
        .unwrap();
    let diaries: Vec<Diary> = rows.iter().map(|r| Diary::from_row(r).unwrap()).collect();
    assert_eq!(
        diaries,
        [
            Diary {
                id: 1,
                mood: Mood::Happy,
                moods: vec![Mood::Sad, Mood::Ok],
                pair: PairValue {
                    a: Some(7),
                    b: "seven".into()
                },
                as_text: "happy (7,seven)".into(),
            },
            Diary {
                id: 2,
                mood: Mood::Sad,
                moods: vec![],
                pair: PairValue {
                    a: None,
                    b: "none, \"quoted\"".into()
                },
                as_text: r#"sad (,"none, ""quoted""")"#.into(),
            },
        ]
    );

    // A parameter and a result in one statement, on a connection of its own.
    let mut conn = common::connect().await;
    let row = conn
        .query_one((
            "SELECT $1::from_row_types.mood AS mood, \
                    ROW($2::int4 + 1, upper($3))::from_row_types.pair AS pair",
            (Mood::Ok, 41i32, "answer"),
        ))
        .await
        .unwrap();
    let (mood, pair) = <(Mood, PairValue)>::from_row(&row).unwrap();
    assert_eq!(mood, Mood::Ok);
    assert_eq!(
        pair,
        PairValue {
            a: Some(42),
            b: "ANSWER".into()
        }
    );

    // A column of another type is refused by the derived FromSql's `accepts`, by name.
    let row = conn
        .query_one("SELECT 'happy'::text AS mood")
        .await
        .unwrap();
    assert_conversion_error(<(Mood,)>::from_row(&row), &["\"mood\"", "text"]);

    engine.close_connection_pool().await.unwrap();
    setup
        .simple_query("DROP SCHEMA from_row_types CASCADE")
        .await
        .unwrap();
}
