//! The `#[pgengine(...)]` attributes: parsed and checked here, so that the code generation
//! works from plain values and every misuse is a compile error pointing at the attribute.

use syn::{Attribute, LitStr};

/// What the struct's own `#[pgengine(...)]` attributes ask for.
#[derive(Default)]
pub struct ContainerOptions {
    pub rename_all: Option<Case>,
}

/// What a field's `#[pgengine(...)]` attributes ask for.
#[derive(Default)]
pub struct FieldOptions {
    pub rename: Option<LitStr>,
    pub default: bool,
    /// The `flatten` word itself, kept to point at it in errors.
    pub flatten: Option<syn::Path>,
}

impl ContainerOptions {
    pub fn parse(attrs: &[Attribute]) -> syn::Result<ContainerOptions> {
        let mut options = ContainerOptions::default();
        for attr in pgengine_attributes(attrs) {
            attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("rename_all") {
                    if options.rename_all.is_some() {
                        return Err(meta.error("`rename_all` is given twice"));
                    }
                    let rule: LitStr = meta.value()?.parse()?;
                    options.rename_all = Some(Case::from_name(&rule)?);
                    Ok(())
                } else {
                    Err(meta.error(
                        "unknown #[pgengine] attribute on a struct; the struct takes \
                         `rename_all = \"...\"`",
                    ))
                }
            })?;
        }
        Ok(options)
    }
}

impl FieldOptions {
    pub fn parse(attrs: &[Attribute]) -> syn::Result<FieldOptions> {
        let mut options = FieldOptions::default();
        for attr in pgengine_attributes(attrs) {
            attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("rename") {
                    if options.rename.is_some() {
                        return Err(meta.error("`rename` is given twice"));
                    }
                    options.rename = Some(meta.value()?.parse()?);
                } else if meta.path.is_ident("default") {
                    options.default = true;
                } else if meta.path.is_ident("flatten") {
                    options.flatten = Some(meta.path.clone());
                } else {
                    return Err(meta.error(
                        "unknown #[pgengine] attribute on a field; a field takes \
                         `rename = \"...\"`, `default` or `flatten`",
                    ));
                }
                Ok(())
            })?;
        }
        // A flattened field reads many columns, none of them under its own name.
        match &options.flatten {
            Some(flatten) if options.rename.is_some() || options.default => {
                Err(syn::Error::new_spanned(
                    flatten,
                    "`flatten` reads the field from the whole row: it takes no `rename` or \
                     `default`",
                ))
            }
            _ => Ok(options),
        }
    }

    /// True when no attribute was given (what a tuple struct's fields must be).
    pub fn is_empty(&self) -> bool {
        self.rename.is_none() && !self.default && self.flatten.is_none()
    }
}

fn pgengine_attributes(attrs: &[Attribute]) -> impl Iterator<Item = &Attribute> {
    attrs.iter().filter(|a| a.path().is_ident("pgengine"))
}

/// The case `rename_all` gives column names, made from field names. Field names are taken to be
/// snake_case, as Rust's naming convention has them.
#[derive(Clone, Copy)]
pub enum Case {
    Snake,
    Lower,
    Upper,
    Camel,
}

impl Case {
    const NAMES: [(&'static str, Case); 4] = [
        ("snake_case", Case::Snake),
        ("lowercase", Case::Lower),
        ("UPPERCASE", Case::Upper),
        ("camelCase", Case::Camel),
    ];

    fn from_name(name: &LitStr) -> syn::Result<Case> {
        let wanted = name.value();
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == wanted)
            .map(|(_, rule)| *rule)
            .ok_or_else(|| {
                let known: Vec<String> = Self::NAMES
                    .iter()
                    .map(|(n, _)| format!("\"{n}\""))
                    .collect();
                syn::Error::new_spanned(
                    name,
                    format!("unknown rename_all rule; use one of {}", known.join(", ")),
                )
            })
    }

    pub fn apply(self, field: &str) -> String {
        match self {
            Case::Snake => field.to_owned(),
            Case::Lower => field.to_lowercase(),
            Case::Upper => field.to_uppercase(),
            Case::Camel => {
                let mut column = String::with_capacity(field.len());
                let mut word_start = false;
                for c in field.chars() {
                    if c == '_' && !column.is_empty() {
                        word_start = true;
                    } else if word_start {
                        column.extend(c.to_uppercase());
                        word_start = false;
                    } else {
                        column.push(c);
                    }
                }
                column
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Case;

    #[test]
    fn rename_rules_on_snake_case_fields() {
        let cases = [
            (Case::Snake, "user_id", "user_id"),
            (Case::Lower, "user_id", "user_id"),
            (Case::Upper, "user_id", "USER_ID"),
            (Case::Camel, "user_id", "userId"),
            (Case::Camel, "id", "id"),
            (Case::Camel, "created_at_utc", "createdAtUtc"),
            (Case::Camel, "_hidden_value", "_hiddenValue"),
            (Case::Camel, "a__b", "aB"),
            (Case::Upper, "name", "NAME"),
        ];
        for (rule, field, column) in cases {
            assert_eq!(rule.apply(field), column, "{field}");
        }
    }
}
