//! `#[derive(FromRow)]` for pgengine: the impl of `pgengine::FromRow` for a struct, reading each
//! named field from the column of its name, or a tuple struct's fields by position.
//!
//! Use it through pgengine's `derive` feature (`#[derive(pgengine::FromRow)]`); the attributes
//! it takes are described on the `pgengine::FromRow` trait. The code it writes names only
//! `::pgengine::…` paths, so the crate that derives needs pgengine and nothing else.

use proc_macro::TokenStream;
use proc_macro2::{TokenStream as TokenStream2, TokenTree};
use quote::{ToTokens, quote, quote_spanned};
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Fields, FieldsNamed, FieldsUnnamed, Ident, Type, WherePredicate};

mod attributes;

use attributes::{ContainerOptions, FieldOptions};

/// Implements `pgengine::FromRow` for a struct: named fields by column name, tuple struct
/// fields by position. See the `pgengine::FromRow` trait for the `#[pgengine(...)]` attributes.
#[proc_macro_derive(FromRow, attributes(pgengine))]
pub fn derive_from_row(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as DeriveInput);
    expand(input)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

fn expand(input: DeriveInput) -> syn::Result<TokenStream2> {
    let options = ContainerOptions::parse(&input.attrs)?;
    let data = match &input.data {
        Data::Struct(data) => data,
        Data::Enum(data) => {
            return Err(syn::Error::new(
                data.enum_token.span,
                "#[derive(FromRow)] builds a struct from a row's columns; an enum is one column's \
                 value: derive pgengine::FromSql for it (feature `derive`) and read it with \
                 `Row::get`, or as a field of a struct that derives FromRow",
            ));
        }
        Data::Union(data) => {
            return Err(syn::Error::new(
                data.union_token.span,
                "#[derive(FromRow)] works on structs, not unions",
            ));
        }
    };
    let mut bounds = Vec::new();
    let type_params: Vec<Ident> = input
        .generics
        .type_params()
        .map(|p| p.ident.clone())
        .collect();
    let body = match &data.fields {
        Fields::Named(fields) => named_fields(fields, &options, &type_params, &mut bounds)?,
        Fields::Unnamed(fields) => {
            if options.rename_all.is_some() {
                return Err(syn::Error::new_spanned(
                    &input.ident,
                    "`rename_all` renames named fields; a tuple struct reads its columns by \
                     position",
                ));
            }
            tuple_fields(fields, &type_params, &mut bounds)?
        }
        Fields::Unit => {
            return Err(syn::Error::new_spanned(
                &input.ident,
                "#[derive(FromRow)] needs fields to read columns into; a unit struct has none",
            ));
        }
    };

    let mut generics = input.generics.clone();
    generics.make_where_clause().predicates.extend(bounds);
    let (impl_generics, type_generics, where_clause) = generics.split_for_impl();
    let ident = &input.ident;
    Ok(quote! {
        #[automatically_derived]
        impl #impl_generics ::pgengine::FromRow for #ident #type_generics #where_clause {
            fn from_row(row: &::pgengine::Row) -> ::pgengine::Result<Self> {
                #body
            }
        }
    })
}

/// `Ok(Self { field: value, … })`, each value read by column name (or built from the whole row
/// for `flatten`), in the order the fields are declared.
fn named_fields(
    fields: &FieldsNamed,
    options: &ContainerOptions,
    type_params: &[Ident],
    bounds: &mut Vec<WherePredicate>,
) -> syn::Result<TokenStream2> {
    let mut inits = Vec::with_capacity(fields.named.len());
    for field in &fields.named {
        let field_options = FieldOptions::parse(&field.attrs)?;
        let ident = field.ident.as_ref().expect("named fields have names");
        let ty = &field.ty;
        let generic = mentions_any(ty, type_params);
        let value = if field_options.flatten.is_some() {
            if generic {
                bounds.push(syn::parse_quote!(#ty: ::pgengine::FromRow));
            }
            quote_spanned! {ty.span()=> <#ty as ::pgengine::FromRow>::from_row(row)? }
        } else {
            let column = match (&field_options.rename, options.rename_all) {
                (Some(rename), _) => rename.value(),
                (None, Some(rule)) => rule.apply(&ident.unraw().to_string()),
                (None, None) => ident.unraw().to_string(),
            };
            if generic {
                bounds.push(syn::parse_quote!(#ty: for<'__row> ::pgengine::FromSql<'__row>));
            }
            if field_options.default {
                if generic {
                    bounds.push(syn::parse_quote!(#ty: ::core::default::Default));
                }
                quote_spanned! {ty.span()=>
                    ::pgengine::from_row::__private::try_get_or_default::<#ty>(row, #column)?
                }
            } else {
                quote_spanned! {ty.span()=> ::pgengine::Row::try_get::<_, #ty>(row, #column)? }
            }
        };
        inits.push(quote! { #ident: #value });
    }
    Ok(quote! {
        ::core::result::Result::Ok(Self { #(#inits,)* })
    })
}

/// `Ok(Self(…))` with field `i` read from column `i`, after the same column count check as a
/// tuple's.
fn tuple_fields(
    fields: &FieldsUnnamed,
    type_params: &[Ident],
    bounds: &mut Vec<WherePredicate>,
) -> syn::Result<TokenStream2> {
    let mut values = Vec::with_capacity(fields.unnamed.len());
    for (position, field) in fields.unnamed.iter().enumerate() {
        if !FieldOptions::parse(&field.attrs)?.is_empty() {
            return Err(syn::Error::new_spanned(
                field,
                "a tuple struct reads its columns by position: its fields take no #[pgengine] \
                 attributes (use named fields to rename, default or flatten)",
            ));
        }
        let ty = &field.ty;
        if mentions_any(ty, type_params) {
            bounds.push(syn::parse_quote!(#ty: for<'__row> ::pgengine::FromSql<'__row>));
        }
        values.push(quote_spanned! {ty.span()=>
            ::pgengine::Row::try_get::<_, #ty>(row, #position)?
        });
    }
    let count = fields.unnamed.len();
    Ok(quote! {
        ::pgengine::from_row::__private::expect_column_count(
            row,
            #count,
            ::core::any::type_name::<Self>(),
        )?;
        ::core::result::Result::Ok(Self(#(#values,)*))
    })
}

/// True if `ty` names one of the struct's type parameters anywhere (`T`, `Option<T>`,
/// `Vec<T>`…): such a field's type gets a where-clause bound, since whether it can be read
/// depends on what the parameter is. Concrete types need none: the compiler checks them where
/// they are read, and reports there.
fn mentions_any(ty: &Type, type_params: &[Ident]) -> bool {
    fn walk(tokens: TokenStream2, type_params: &[Ident]) -> bool {
        tokens.into_iter().any(|token| match token {
            TokenTree::Ident(ident) => type_params.contains(&ident),
            TokenTree::Group(group) => walk(group.stream(), type_params),
            _ => false,
        })
    }
    !type_params.is_empty() && walk(ty.to_token_stream(), type_params)
}
