//! Types the server defines at run time — enums, composites, domains, ranges, and arrays of
//! them — looked up in the system catalogs, so that `ToSql`/`FromSql` impls that match on a
//! type's name or kind (such as postgres-types' derives) recognise them. Built-in types need
//! no lookup; each looked-up type is remembered for the life of the connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::BufMut;
use postgres_types::{Field, Kind, Type};

use super::Connection;
use super::response::{Response, Shape, Step};
use crate::error::{Error, Result};
use crate::protocol::{BackendMessage, FieldDescription, Target, frontend};
use crate::row::{Column, Row, type_from_oid};

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

/// The statement and the portal the lookups run through, both closed in the same request.
/// Named, so that the unnamed ones are left alone: a batch looks up its columns' types
/// between two Executes of its unnamed portal, which a Bind to the unnamed portal (any query)
/// would replace, ending the batch after its first rows.
const LOOKUP: &str = "pge_type_lookup";

/// The `oid` type's OID: the lookups' one parameter.
const OID_OID: u32 = 26;

impl Connection {
    /// The type for `oid` if it is built in or already looked up.
    pub(crate) fn known_type(&self, oid: u32) -> Option<Type> {
        Type::from_oid(oid).or_else(|| self.types.get(&oid).cloned())
    }

    /// A column whose type is known (or a placeholder to be looked up).
    pub(crate) fn column(&self, field: &FieldDescription) -> Column {
        match self.types.get(&field.type_oid) {
            Some(ty) => Column::with_type(field, ty.clone()),
            None => Column::from_field(field),
        }
    }

    /// True if any of `columns` has a placeholder type still to be looked up.
    pub(crate) fn needs_lookup(columns: &[Column]) -> bool {
        columns.iter().any(Column::is_placeholder)
    }

    /// `columns` with their placeholder types replaced by the types this connection has looked
    /// up already; `None` if some are still unknown (a lookup needs the connection).
    pub(crate) fn known_columns(&self, columns: &[Column]) -> Option<Arc<[Column]>> {
        columns
            .iter()
            .map(|c| match c.is_placeholder() {
                true => self
                    .types
                    .get(&c.type_oid())
                    .map(|ty| c.clone().retyped(ty.clone())),
                false => Some(c.clone()),
            })
            .collect()
    }

    /// Looks up every placeholder type among `columns` and returns the columns with real
    /// types, remembered for the cached statement of `sql`, if there is one, so that its next
    /// run starts with them.
    pub(crate) async fn resolve_columns(
        &mut self,
        sql: &str,
        columns: &[Column],
    ) -> Result<Arc<[Column]>> {
        let mut out = Vec::with_capacity(columns.len());
        for c in columns {
            out.push(match c.is_placeholder() {
                true => c.clone().retyped(self.resolve_type(c.type_oid()).await?),
                false => c.clone(),
            });
        }
        let columns: Arc<[Column]> = out.into();
        self.remember_columns(sql, &columns);
        Ok(columns)
    }

    /// Gives the cached statement of `sql`, if there is one, `columns` with their types
    /// looked up.
    pub(crate) fn remember_columns(&mut self, sql: &str, columns: &Arc<[Column]>) {
        if let Some(statement) = self.statements.get(sql).cloned()
            && statement.columns.len() == columns.len()
        {
            self.statements
                .insert(sql, statement.with_columns(columns.clone()));
        }
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
            let Some(row) = self.catalog_rows(TYPE_QUERY, oid).await?.pop() else {
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
                    let rows = self.catalog_rows(ENUM_QUERY, oid).await?;
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
                    let rows = self.catalog_rows(FIELDS_QUERY, relid).await?;
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

    /// Runs one of the catalog queries above for `oid` through the [`LOOKUP`] statement and
    /// portal, and returns its rows.
    async fn catalog_rows(&mut self, sql: &str, oid: u32) -> Result<Vec<Row>> {
        self.prepare_request().await?;
        let buf = &mut self.stream.write_buf;
        let mark = buf.len();
        // Closed first too, in case a failed lookup left them: closing what does not exist
        // is no error.
        let written = frontend::close(buf, Target::Portal, LOOKUP)
            .and_then(|()| frontend::close(buf, Target::Statement, LOOKUP))
            .and_then(|()| frontend::parse(buf, LOOKUP, sql, &[OID_OID]))
            .and_then(|()| {
                frontend::bind::<Error, _>(
                    buf,
                    LOOKUP,
                    LOOKUP,
                    &[1],
                    1,
                    |_, buf| {
                        buf.put_u32(oid);
                        Ok(false)
                    },
                    &[1],
                )
            })
            .and_then(|()| frontend::describe(buf, Target::Portal, LOOKUP))
            .and_then(|()| frontend::execute(buf, LOOKUP, 0))
            .and_then(|()| frontend::close(buf, Target::Portal, LOOKUP))
            .and_then(|()| frontend::close(buf, Target::Statement, LOOKUP));
        if let Err(e) = written {
            self.stream.undo_write(mark);
            return Err(e);
        }
        frontend::sync(&mut self.stream.write_buf);
        self.send(1).await?;
        let mut response = Response::new(Shape::Extended);
        let mut columns: Option<Arc<[Column]>> = None;
        let mut rows = Vec::new();
        loop {
            match self.next_step(&mut response).await? {
                Step::Message(BackendMessage::RowDescription(fields)) if columns.is_none() => {
                    columns = Some(fields.iter().map(|f| self.column(f)).collect());
                }
                Step::Row(data) => {
                    let Some(columns) = &columns else {
                        return Err(self.protocol_error("a row before its description"));
                    };
                    rows.push(Row::new(columns.clone(), data).map_err(|e| self.fail(e))?);
                }
                Step::Message(
                    BackendMessage::ParseComplete
                    | BackendMessage::BindComplete
                    | BackendMessage::CloseComplete,
                )
                | Step::Complete(_)
                | Step::Failed => {}
                Step::Over => break,
                other => return Err(self.unexpected_step(other, "a type lookup")),
            }
        }
        response.finish()?;
        Ok(rows)
    }
}
