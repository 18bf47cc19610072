//! Property tests for the codec: every message survives encode → decode unchanged, and decoding
//! any byte string — truncated, oversized, garbage — returns a message or an error, never a panic.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::*;
use crate::error::DbError;

fn text() -> impl Strategy<Value = String> {
    // Any Unicode without NUL, which no C string can hold.
    "[^\u{0}]{0,24}"
}

fn bytes() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from)
}

fn frontend_message() -> impl Strategy<Value = FrontendMessage> {
    let target = prop_oneof![Just(Target::Statement), Just(Target::Portal)];
    prop_oneof![
        (
            any::<i32>().prop_filter("not a special code", |v| ![
                frontend::SSL_REQUEST_CODE,
                frontend::GSSENC_REQUEST_CODE,
                frontend::CANCEL_REQUEST_CODE
            ]
            .contains(v)),
            proptest::collection::vec(
                (text().prop_filter("non-empty", |s| !s.is_empty()), text()),
                0..4
            )
        )
            .prop_map(|(version, params)| FrontendMessage::Startup { version, params }),
        Just(FrontendMessage::SslRequest),
        Just(FrontendMessage::GssEncRequest),
        (
            any::<i32>(),
            proptest::collection::vec(any::<u8>(), 4..=256)
        )
            .prop_map(|(process_id, k)| FrontendMessage::CancelRequest {
                process_id,
                secret_key: k.into()
            }),
        bytes().prop_map(FrontendMessage::Password),
        text().prop_map(FrontendMessage::Query),
        (
            text(),
            text(),
            proptest::collection::vec(any::<u32>(), 0..8)
        )
            .prop_map(|(name, sql, param_types)| FrontendMessage::Parse {
                name,
                sql,
                param_types
            }),
        (
            text(),
            text(),
            proptest::collection::vec(0i16..2, 0..4),
            proptest::collection::vec(proptest::option::of(bytes()), 0..6),
            proptest::collection::vec(0i16..2, 0..4)
        )
            .prop_map(
                |(portal, statement, param_formats, params, result_formats)| {
                    FrontendMessage::Bind {
                        portal,
                        statement,
                        param_formats,
                        params,
                        result_formats,
                    }
                }
            ),
        (target.clone(), text())
            .prop_map(|(target, name)| FrontendMessage::Describe { target, name }),
        (text(), any::<i32>())
            .prop_map(|(portal, max_rows)| FrontendMessage::Execute { portal, max_rows }),
        (target, text()).prop_map(|(target, name)| FrontendMessage::Close { target, name }),
        Just(FrontendMessage::Flush),
        Just(FrontendMessage::Sync),
        Just(FrontendMessage::Terminate),
        bytes().prop_map(FrontendMessage::CopyData),
        Just(FrontendMessage::CopyDone),
        text().prop_map(FrontendMessage::CopyFail),
    ]
}

fn db_error() -> impl Strategy<Value = DbError> {
    (
        text(),
        "[0-9A-Z]{5}",
        text(),
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::option::of(1u32..10_000),
        proptest::option::of(text()),
        proptest::option::of(0u32..100_000),
    )
        .prop_map(
            |(severity, code, message, detail, constraint, position, routine, line)| {
                let mut fields = BytesMut::new();
                let mut put = |t: u8, v: &str| {
                    fields.extend_from_slice(&[t]);
                    fields.extend_from_slice(v.as_bytes());
                    fields.extend_from_slice(&[0]);
                };
                put(b'S', &severity);
                put(b'C', &code);
                put(b'M', &message);
                if let Some(d) = &detail {
                    put(b'D', d);
                }
                if let Some(c) = &constraint {
                    put(b'n', c);
                }
                if let Some(p) = position {
                    put(b'P', &p.to_string());
                }
                if let Some(r) = &routine {
                    put(b'R', r);
                }
                if let Some(l) = line {
                    put(b'L', &l.to_string());
                }
                fields.extend_from_slice(&[0]);
                DbError::parse(&fields.freeze()).expect("generated fields are valid")
            },
        )
}

fn backend_message() -> impl Strategy<Value = BackendMessage> {
    let status = prop_oneof![
        Just(TransactionStatus::Idle),
        Just(TransactionStatus::InTransaction),
        Just(TransactionStatus::Failed)
    ];
    let auth = prop_oneof![
        Just(Authentication::Ok),
        Just(Authentication::CleartextPassword),
        any::<[u8; 4]>().prop_map(|salt| Authentication::Md5Password { salt }),
        proptest::collection::vec(text().prop_filter("non-empty", |s| !s.is_empty()), 0..3)
            .prop_map(Authentication::Sasl),
        bytes().prop_map(Authentication::SaslContinue),
        bytes().prop_map(Authentication::SaslFinal),
        bytes().prop_map(Authentication::GssContinue),
    ];
    let field = (
        text(),
        any::<u32>(),
        any::<i16>(),
        any::<u32>(),
        any::<i16>(),
        any::<i32>(),
        0i16..2,
    )
        .prop_map(
            |(name, table_oid, column_id, type_oid, type_size, type_modifier, format)| {
                FieldDescription {
                    name,
                    table_oid,
                    column_id,
                    type_oid,
                    type_size,
                    type_modifier,
                    format,
                }
            },
        );
    let copy =
        (0i8..2, proptest::collection::vec(0i16..2, 0..5)).prop_map(|(format, column_formats)| {
            CopyFormat {
                format,
                column_formats,
            }
        });
    prop_oneof![
        auth.prop_map(BackendMessage::Authentication),
        (
            any::<i32>(),
            proptest::collection::vec(any::<u8>(), 4..=256)
        )
            .prop_map(|(process_id, k)| BackendMessage::BackendKeyData {
                process_id,
                secret_key: k.into()
            }),
        Just(BackendMessage::BindComplete),
        Just(BackendMessage::CloseComplete),
        text().prop_map(|t| BackendMessage::CommandComplete(t.into())),
        bytes().prop_map(BackendMessage::CopyData),
        Just(BackendMessage::CopyDone),
        copy.clone().prop_map(BackendMessage::CopyInResponse),
        copy.clone().prop_map(BackendMessage::CopyOutResponse),
        copy.prop_map(BackendMessage::CopyBothResponse),
        proptest::collection::vec(proptest::option::of(bytes()), 0..8)
            .prop_map(|cols| BackendMessage::DataRow(cols.into_iter().collect())),
        Just(BackendMessage::EmptyQueryResponse),
        db_error().prop_map(|e| BackendMessage::ErrorResponse(Box::new(e))),
        db_error().prop_map(|e| BackendMessage::NoticeResponse(Box::new(e))),
        proptest::option::of(bytes()).prop_map(BackendMessage::FunctionCallResponse),
        (any::<i32>(), proptest::collection::vec(text(), 0..3)).prop_map(
            |(newest_minor, unrecognized)| {
                BackendMessage::NegotiateProtocolVersion {
                    newest_minor,
                    unrecognized,
                }
            }
        ),
        Just(BackendMessage::NoData),
        (any::<i32>(), text(), text()).prop_map(|(process_id, channel, payload)| {
            BackendMessage::NotificationResponse {
                process_id,
                channel,
                payload,
            }
        }),
        proptest::collection::vec(any::<u32>(), 0..8)
            .prop_map(BackendMessage::ParameterDescription),
        (text(), text()).prop_map(|(name, value)| BackendMessage::ParameterStatus { name, value }),
        Just(BackendMessage::ParseComplete),
        Just(BackendMessage::PortalSuspended),
        status.prop_map(BackendMessage::ReadyForQuery),
        proptest::collection::vec(field, 0..5).prop_map(BackendMessage::RowDescription),
    ]
}

proptest! {
    /// The in-place path for bodiless messages gives exactly what framing and decoding give,
    /// for well-formed and malformed ones alike, and leaves the buffer in the same place.
    #[test]
    fn read_message_fast_path_matches_the_general_one(
        tag in prop::sample::select(vec![b'2', b'1', b'3', b'n', b'Z', b'C']),
        len in 3i32..8,
        body in proptest::collection::vec(
            prop::sample::select(vec![b'I', b'T', b'E', b'X', 0u8]), 0..6),
    ) {
        let mut bytes = vec![tag];
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(&body);
        let mut fast = BytesMut::from(&bytes[..]);
        let mut general = fast.clone();
        let got = crate::protocol::read_message(&mut fast, 1 << 20);
        let want = match crate::protocol::split_frame(&mut general, 1 << 20) {
            Ok(Some((tag, body))) => BackendMessage::decode(tag, body).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        match (got, want) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
            (Err(_), Err(_)) => {}
            (a, b) => prop_assert!(false, "fast {:?}, general {:?}", a, b),
        }
        prop_assert_eq!(fast, general);
    }

    /// The channel binding hash reads a certificate the server sent: any bytes give a hash or
    /// an error, never a panic; a DER prefix with a known signature algorithm gives a hash of
    /// the whole input.
    #[test]
    fn a_data_rows_values_are_the_same_in_any_order_of_reading(
        cols in proptest::collection::vec(proptest::option::of(bytes()), 0..12),
        order in proptest::collection::vec(0usize..10, 0..24),
    ) {
        // Decoded from the wire, as a connection gets it.
        let built: DataRow = cols.iter().cloned().collect();
        let mut wire = BytesMut::new();
        BackendMessage::DataRow(built).encode(&mut wire).unwrap();
        let row = match read_message(&mut wire, usize::MAX).unwrap() {
            Some(BackendMessage::DataRow(row)) => row,
            other => panic!("{other:?}"),
        };
        for &i in &order {
            let expected = cols.get(i).and_then(|c| c.as_deref());
            prop_assert_eq!(row.value(i), expected, "column {} after {:?}", i, order);
        }
        // A clone starts reading from the front and finds the same.
        let copy = row.clone();
        for i in (0..cols.len()).rev() {
            prop_assert_eq!(copy.value(i), cols[i].as_deref());
        }
    }

    #[test]
    fn tls_server_end_point_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = crate::protocol::scram::tls_server_end_point(&bytes);
    }

    #[test]
    fn frontend_round_trip(msg in frontend_message()) {
        let mut buf = BytesMut::new();
        msg.encode(&mut buf).unwrap();
        let startup = matches!(
            msg,
            FrontendMessage::Startup { .. }
                | FrontendMessage::SslRequest
                | FrontendMessage::GssEncRequest
                | FrontendMessage::CancelRequest { .. }
        );
        let decoded = if startup {
            FrontendMessage::decode_startup(&mut buf)
        } else {
            FrontendMessage::decode(&mut buf, DEFAULT_MAX_MESSAGE_LEN)
        };
        prop_assert_eq!(decoded.unwrap(), Some(msg));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn backend_round_trip(msg in backend_message()) {
        let mut buf = BytesMut::new();
        msg.encode(&mut buf).unwrap();
        let decoded = read_message(&mut buf, DEFAULT_MAX_MESSAGE_LEN).unwrap();
        prop_assert_eq!(decoded, Some(msg));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn backend_stream_in_pieces(msgs in proptest::collection::vec(backend_message(), 1..6), cut in 1usize..40) {
        // Bytes that arrive in arbitrary pieces decode to the same messages in order.
        let mut wire = BytesMut::new();
        for m in &msgs {
            m.encode(&mut wire).unwrap();
        }
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for chunk in wire.chunks(cut) {
            buf.extend_from_slice(chunk);
            while let Some(m) = read_message(&mut buf, DEFAULT_MAX_MESSAGE_LEN).unwrap() {
                out.push(m);
            }
        }
        prop_assert_eq!(out, msgs);
    }

    #[test]
    fn truncated_message_is_incomplete(msg in backend_message(), keep in 0.0f64..1.0) {
        let mut wire = BytesMut::new();
        msg.encode(&mut wire).unwrap();
        let keep = ((wire.len() as f64) * keep) as usize;
        prop_assume!(keep < wire.len());
        let mut buf = BytesMut::from(&wire[..keep]);
        prop_assert_eq!(read_message(&mut buf, DEFAULT_MAX_MESSAGE_LEN).unwrap(), None);
        prop_assert_eq!(buf.len(), keep);
    }

    #[test]
    fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut buf = BytesMut::from(&data[..]);
        // Decode until incomplete or an error; any outcome but a panic is fine.
        while let Ok(Some(_)) = read_message(&mut buf, 1 << 16) {}
        let mut buf = BytesMut::from(&data[..]);
        while let Ok(Some(_)) = FrontendMessage::decode(&mut buf, 1 << 16) {}
        let mut buf = BytesMut::from(&data[..]);
        let _ = FrontendMessage::decode_startup(&mut buf);
    }

    #[test]
    fn garbage_body_with_valid_tag_never_panics(tag in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..128)) {
        let _ = BackendMessage::decode(tag, Bytes::from(body));
    }

    #[test]
    fn oversized_length_is_refused_before_allocating(tag in any::<u8>(), len in (1i64 << 16)..=(i32::MAX as i64)) {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[tag]);
        buf.extend_from_slice(&(len as i32).to_be_bytes());
        let cap = buf.capacity();
        prop_assert!(read_message(&mut buf, 1 << 16).is_err());
        prop_assert_eq!(buf.capacity(), cap);
    }

    #[test]
    fn negative_or_tiny_length_is_an_error(tag in any::<u8>(), len in i32::MIN..4) {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[tag]);
        buf.extend_from_slice(&len.to_be_bytes());
        prop_assert!(read_message(&mut buf, DEFAULT_MAX_MESSAGE_LEN).is_err());
    }
}

#[test]
fn md5_password_matches_postgres() {
    // The same as the server's `SELECT 'md5' || md5(md5('pencil' || 'user') || 'salt')`
    // (computed independently with Python's hashlib).
    assert_eq!(
        md5_password(b"user", b"pencil", *b"salt"),
        "md5d3d9bcccbaa2fb5234570d4d0f22b055"
    );
}
