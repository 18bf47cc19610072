//! Types the server defines at run time — enums, composites, domains, ranges, and arrays of
//! them — looked up in the system catalogs, so that `ToSql`/`FromSql` impls that match on a
//! type's name or kind (such as postgres-types' derives) recognise them. Built-in types need
//! no lookup; each looked-up type is remembered for the life of the connection.

use std::future::Future;
use std::pin::Pin;

use postgres_types::{Field, Kind, Type};

use super::Connection;
use crate::error::{Error, Result};
use crate::protocol::FieldDescription;
use crate::row::{Column, type_from_oid};

const TYPE_QUERY: &str = "SELECT t.typname, t.typtype, t.typelem, t.typbasetype, n.nspname, \
     t.typrelid, r.rngsubtype \
     FROM pg_catalog.pg_type t \
     JOIN pg_catalog.pg_namespace n ON t.typnamespace = n.oid \
     LEFT JOIN pg_catalog.pg_range r ON r.rngtypid = t.oid \
     WHERE t.oid = $1";
const ENUM_QUERY: &str = "SELECT enumlabel FROM pg_catalog.pg_enum \
     WHERE enumtypid = $1 ORDER BY enumsortorder";
/// How deep type lookups may nest (see `resolve_type_at`).
const MAX_TYPE_DEPTH: usize = 16;
const FIELDS_QUERY: &str = "SELECT attname, atttypid FROM pg_catalog.pg_attribute \
     WHERE attrelid = $1 AND NOT attisdropped AND attnum > 0 ORDER BY attnum";

impl Connection {
    /// The type for `oid` if it is built in or already looked up.
    pub(crate) fn known_type(&self, oid: u32) -> Option<Type> {
        Type::from_oid(oid).or_else(|| self.types.get(&oid).cloned())
    }

    /// A column whose type is known (or a placeholder to be looked up).
    pub(crate) fn column(&self, field: &FieldDescription) -> Column {
        let ty = self
            .known_type(field.type_oid)
            .unwrap_or_else(|| type_from_oid(field.type_oid));
        Column::with_type(field, ty)
    }

    /// True if any of `oids` still needs a catalog lookup.
    pub(crate) fn needs_lookup(&self, mut oids: impl Iterator<Item = u32>) -> bool {
        oids.any(|oid| self.known_type(oid).is_none())
    }

    /// Looks up every unknown type among `columns` and returns the columns with real types.
    pub(crate) async fn resolve_columns(&mut self, columns: &[Column]) -> Result<Vec<Column>> {
        let mut out = Vec::with_capacity(columns.len());
        for c in columns {
            let ty = self.resolve_type(c.type_oid()).await?;
            out.push(c.clone().retyped(ty));
        }
        Ok(out)
    }

    /// The type for `oid`, looked up in the catalogs if it is not built in.
    pub(crate) async fn resolve_type(&mut self, oid: u32) -> Result<Type> {
        self.resolve_type_at(oid, 0).await
    }

    /// Looks up `oid`, `depth` levels below the type first asked for. Real types nest a few
    /// levels (an array of a domain over a composite…); a server whose answers nest deeper —
    /// or loop — is refused instead of being followed until the stack runs out.
    fn resolve_type_at(
        &mut self,
        oid: u32,
        depth: usize,
    ) -> Pin<Box<dyn Future<Output = Result<Type>> + Send + '_>> {
        Box::pin(async move {
            if let Some(ty) = self.known_type(oid) {
                return Ok(ty);
            }
            if depth >= MAX_TYPE_DEPTH {
                // The server's answers cannot be trusted: neither can the connection.
                return Err(self.fail(Error::protocol(format!(
                    "type {oid} nests more than {MAX_TYPE_DEPTH} levels deep in the catalog's \
                     answers (a cycle?)"
                ))));
            }
            let Some(row) = self.query_opt((TYPE_QUERY, (oid,))).await? else {
                // Dropped since the server described it: keep the placeholder.
                return Ok(type_from_oid(oid));
            };
            let name: String = row.try_get(0)?;
            let typtype: i8 = row.try_get(1)?;
            let elem: u32 = row.try_get(2)?;
            let base: u32 = row.try_get(3)?;
            let schema: String = row.try_get(4)?;
            let relid: u32 = row.try_get(5)?;
            let range_subtype: Option<u32> = row.try_get(6)?;
            let kind = match typtype as u8 {
                b'e' => {
                    let rows = self.query((ENUM_QUERY, (oid,))).await?;
                    let labels = rows.iter().map(|r| r.try_get(0)).collect::<Result<_>>()?;
                    Kind::Enum(labels)
                }
                b'p' => Kind::Pseudo,
                b'd' => Kind::Domain(self.resolve_type_at(base, depth + 1).await?),
                b'r' => match range_subtype {
                    Some(sub) => Kind::Range(self.resolve_type_at(sub, depth + 1).await?),
                    None => Kind::Simple,
                },
                b'c' => {
                    let rows = self.query((FIELDS_QUERY, (relid,))).await?;
                    let mut fields = Vec::with_capacity(rows.len());
                    for r in rows {
                        let field_name: String = r.try_get(0)?;
                        let field_type: u32 = r.try_get(1)?;
                        let ty = self.resolve_type_at(field_type, depth + 1).await?;
                        fields.push(Field::new(field_name, ty));
                    }
                    Kind::Composite(fields)
                }
                _ if elem != 0 && name.starts_with('_') => {
                    Kind::Array(self.resolve_type_at(elem, depth + 1).await?)
                }
                _ => Kind::Simple,
            };
            let ty = Type::new(name, oid, kind, schema);
            self.types.insert(oid, ty.clone());
            Ok(ty)
        })
    }
}
