//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL runs it (docs §55.3.1 "SASL
//! Authentication"), as a pure state machine: messages in, messages out, no I/O.
//!
//! ```text
//! client-first  = gs2-header "n=,r=" client-nonce        (user name is empty: the server uses the startup user)
//! server-first  = "r=" client-nonce server-nonce ",s=" salt ",i=" iterations
//! client-final  = "c=" base64(gs2-header [+ cbind-data]) ",r=" nonce ",p=" base64(ClientProof)
//! server-final  = "v=" base64(ServerSignature)    or   "e=" error
//! ```
//!
//! The server's signature is checked before the exchange counts as done, so a server that does
//! not know the password cannot pretend to (the point of SCRAM over MD5). Every method consumes
//! the state with `mem::replace(.., State::Done)`: after any error the exchange is finished and
//! cannot be continued by mistake.

use std::mem;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256, Sha384, Sha512};

use crate::error::{Error, Result};

/// The mechanism name without channel binding.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
/// The mechanism name with channel binding.
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// The most iterations we accept. Real servers use 4096 (`scram_iterations`, configurable up to
/// 2^31-1); a hostile one could ask for billions to burn our CPU.
pub const MAX_ITERATIONS: u32 = 10_000_000;

/// What the client says about channel binding in this one exchange: the gs2 header's
/// channel-binding flag (RFC 5802 §7), with the binding data when it binds. Chosen per
/// connection from the user's setting, [`config::ChannelBinding`](crate::config::ChannelBinding),
/// and what the server offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gs2Binding {
    /// `n`: the client does not support channel binding.
    Unsupported,
    /// `y`: the client supports it but thinks the server does not.
    UnusedByClient,
    /// `p=tls-server-end-point`: bound to the hash of the server's certificate.
    TlsServerEndPoint(Vec<u8>),
}

impl Gs2Binding {
    fn gs2_header(&self) -> &'static str {
        match self {
            Gs2Binding::Unsupported => "n,,",
            Gs2Binding::UnusedByClient => "y,,",
            Gs2Binding::TlsServerEndPoint(_) => "p=tls-server-end-point,,",
        }
    }

    fn cbind_input(&self) -> Vec<u8> {
        let mut v = self.gs2_header().as_bytes().to_vec();
        if let Gs2Binding::TlsServerEndPoint(data) = self {
            v.extend_from_slice(data);
        }
        v
    }
}

/// The `tls-server-end-point` channel binding data (RFC 5929 §4.1): the hash of the server's
/// DER certificate, with the hash function of the certificate's signature algorithm, SHA-256
/// when that is MD5 or SHA-1. Errors for a certificate that is not DER, or whose signature
/// algorithm names no hash (Ed25519, RSASSA-PSS): RFC 5929 defines no binding for those, and
/// the server (which asks OpenSSL the same question) cannot compute one either.
pub fn tls_server_end_point(cert_der: &[u8]) -> Result<Vec<u8>> {
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm AlgorithmIdentifier, .. }
    // AlgorithmIdentifier ::= SEQUENCE { algorithm OBJECT IDENTIFIER, parameters ANY OPTIONAL }
    let malformed = || Error::auth("the server's TLS certificate is not valid DER");
    let (certificate, _) = der_element(cert_der, 0x30).ok_or_else(malformed)?;
    let (_, rest) = der_element(certificate, 0x30).ok_or_else(malformed)?;
    let (algorithm, _) = der_element(rest, 0x30).ok_or_else(malformed)?;
    let (oid, _) = der_element(algorithm, 0x06).ok_or_else(malformed)?;
    // Arc prefixes 1.2.840.113549.1.1 (PKCS #1) and 1.2.840.10045.4 (ECDSA), DER-encoded.
    const PKCS1: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
    let hash = match oid {
        // md5WithRSA (.4), sha1WithRSA (.5), sha256WithRSA (.11); ecdsa-with-SHA1, -SHA256.
        [p @ .., 4 | 5 | 11] if p == PKCS1 => Sha256::digest(cert_der).to_vec(),
        [p @ .., 1] if p == ECDSA => Sha256::digest(cert_der).to_vec(),
        [p @ .., 3, 2] if p == ECDSA => Sha256::digest(cert_der).to_vec(),
        [p @ .., 12] if p == PKCS1 => Sha384::digest(cert_der).to_vec(),
        [p @ .., 3, 3] if p == ECDSA => Sha384::digest(cert_der).to_vec(),
        [p @ .., 13] if p == PKCS1 => Sha512::digest(cert_der).to_vec(),
        [p @ .., 3, 4] if p == ECDSA => Sha512::digest(cert_der).to_vec(),
        _ => {
            return Err(Error::auth(
                "the server's certificate uses a signature algorithm with no \
                 tls-server-end-point hash, so channel binding is impossible",
            ));
        }
    };
    Ok(hash)
}

/// Splits the DER element with tag `tag` off the front of `der`: its contents, and what follows.
fn der_element(der: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, rest) = der.split_first()?;
    if first != tag {
        return None;
    }
    let (&len0, mut rest) = rest.split_first()?;
    let len = if len0 < 0x80 {
        usize::from(len0)
    } else {
        // Long form: the low bits count the length bytes that follow (at most 4 here).
        let n = usize::from(len0 & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, tail) = rest.split_at(n);
        rest = tail;
        bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

enum State {
    /// client-first sent, waiting for server-first.
    WaitingServerFirst {
        client_first_bare: String,
        nonce: String,
        password: Vec<u8>,
    },
    /// client-final sent, waiting for server-final; holds the signature we expect.
    WaitingServerFinal {
        server_signature: [u8; 32],
    },
    Done,
}

/// A SCRAM-SHA-256 exchange from the client's side.
pub struct ScramSha256 {
    state: State,
    channel_binding: Gs2Binding,
    client_first: String,
}

impl std::fmt::Debug for ScramSha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The state holds the password: never print it.
        f.debug_struct("ScramSha256").finish_non_exhaustive()
    }
}

impl ScramSha256 {
    /// Starts an exchange with a random nonce.
    pub fn new(password: &[u8], channel_binding: Gs2Binding) -> ScramSha256 {
        use rand::RngExt;
        let mut rng = rand::rng();
        // 18 random bytes in base64: printable, no commas, as the server's own nonces.
        let raw: [u8; 18] = rng.random();
        ScramSha256::with_nonce(password, channel_binding, BASE64.encode(raw))
    }

    /// Starts an exchange with a given nonce (for tests with known vectors).
    pub fn with_nonce(password: &[u8], channel_binding: Gs2Binding, nonce: String) -> Self {
        let client_first_bare = format!("n=,r={nonce}");
        let client_first = format!("{}{}", channel_binding.gs2_header(), client_first_bare);
        ScramSha256 {
            state: State::WaitingServerFirst {
                client_first_bare,
                nonce,
                password: prepare_password(password),
            },
            channel_binding,
            client_first,
        }
    }

    /// The client-first-message, to send in SASLInitialResponse.
    pub fn client_first(&self) -> &[u8] {
        self.client_first.as_bytes()
    }

    /// Takes the server-first-message (from AuthenticationSASLContinue) and returns the
    /// client-final-message to send in SASLResponse.
    pub fn update(&mut self, server_first: &[u8]) -> Result<Vec<u8>> {
        let State::WaitingServerFirst {
            client_first_bare,
            nonce,
            password,
        } = mem::replace(&mut self.state, State::Done)
        else {
            return Err(Error::auth("SCRAM: unexpected server-first-message"));
        };
        let server_first = std::str::from_utf8(server_first)
            .map_err(|_| Error::auth("SCRAM: server-first-message is not UTF-8"))?;
        let parsed = parse_server_first(server_first)?;
        // The server's nonce must extend ours; otherwise it is replaying another exchange.
        if !parsed.nonce.starts_with(&nonce) || parsed.nonce.len() == nonce.len() {
            return Err(Error::auth(
                "SCRAM: the server's nonce does not extend the client's",
            ));
        }
        let salt = BASE64
            .decode(parsed.salt)
            .map_err(|_| Error::auth("SCRAM: the salt is not valid base64"))?;

        let salted_password = hi(&password, &salt, parsed.iterations);
        let client_key = hmac(&salted_password, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();

        let channel_binding = BASE64.encode(self.channel_binding.cbind_input());
        let client_final_without_proof = format!("c={channel_binding},r={}", parsed.nonce);
        let auth_message =
            format!("{client_first_bare},{server_first},{client_final_without_proof}");

        let client_signature = hmac(&stored_key, auth_message.as_bytes());
        let mut proof = client_key;
        for (p, s) in proof.iter_mut().zip(client_signature) {
            *p ^= s;
        }
        let server_key = hmac(&salted_password, b"Server Key");
        let server_signature = hmac(&server_key, auth_message.as_bytes());
        self.state = State::WaitingServerFinal { server_signature };

        Ok(format!("{client_final_without_proof},p={}", BASE64.encode(proof)).into_bytes())
    }

    /// Takes the server-final-message (from AuthenticationSASLFinal) and checks the server's
    /// signature.
    pub fn finish(&mut self, server_final: &[u8]) -> Result<()> {
        let State::WaitingServerFinal { server_signature } =
            mem::replace(&mut self.state, State::Done)
        else {
            return Err(Error::auth("SCRAM: unexpected server-final-message"));
        };
        let server_final = std::str::from_utf8(server_final)
            .map_err(|_| Error::auth("SCRAM: server-final-message is not UTF-8"))?;
        let verifier = parse_server_final(server_final)?;
        let verifier = BASE64
            .decode(verifier)
            .map_err(|_| Error::auth("SCRAM: the server signature is not valid base64"))?;
        // Not constant-time: the expected value is ours and the server already knows it.
        if verifier != server_signature {
            return Err(Error::auth(
                "SCRAM: the server's signature is wrong: it does not know the password",
            ));
        }
        Ok(())
    }

    /// True once the server's signature has been verified or the exchange failed.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }
}

/// SASLprep the password (RFC 4013) as the server does; a password that is not valid UTF-8 or
/// that SASLprep rejects is used as raw bytes, which is also what the server does.
fn prepare_password(password: &[u8]) -> Vec<u8> {
    match std::str::from_utf8(password) {
        Ok(s) => match stringprep::saslprep(s) {
            Ok(p) => p.into_owned().into_bytes(),
            Err(_) => password.to_vec(),
        },
        Err(_) => password.to_vec(),
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any size");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Hi() of RFC 5802: PBKDF2 with HMAC-SHA-256 and one output block.
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let key = Hmac::<Sha256>::new_from_slice(password).expect("HMAC takes keys of any size");
    let mut mac = key.clone();
    mac.update(salt);
    mac.update(&1u32.to_be_bytes());
    let mut u: [u8; 32] = mac.finalize().into_bytes().into();
    let mut out = u;
    for _ in 1..iterations {
        let mut mac = key.clone();
        mac.update(&u);
        u = mac.finalize().into_bytes().into();
        for (o, x) in out.iter_mut().zip(u) {
            *o ^= x;
        }
    }
    out
}

/// The fields of a server-first-message.
#[derive(Debug, PartialEq, Eq)]
pub struct ServerFirst<'a> {
    /// The combined client and server nonce.
    pub nonce: &'a str,
    /// The base64 salt.
    pub salt: &'a str,
    /// The iteration count.
    pub iterations: u32,
}

/// Parses `r=<nonce>,s=<salt>,i=<iterations>[,extensions]` (RFC 5802 §7).
pub fn parse_server_first(msg: &str) -> Result<ServerFirst<'_>> {
    let bad = |what: &str| Error::auth(format!("SCRAM: malformed server-first-message: {what}"));
    let mut parts = msg.split(',');
    let nonce = parts
        .next()
        .and_then(|p| p.strip_prefix("r="))
        .ok_or_else(|| bad("no nonce"))?;
    if nonce.is_empty()
        || !nonce
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
    {
        return Err(bad("invalid nonce"));
    }
    let salt = parts
        .next()
        .and_then(|p| p.strip_prefix("s="))
        .ok_or_else(|| bad("no salt"))?;
    let iterations = parts
        .next()
        .and_then(|p| p.strip_prefix("i="))
        .ok_or_else(|| bad("no iteration count"))?;
    let iterations: u32 = iterations
        .parse()
        .map_err(|_| bad("invalid iteration count"))?;
    if iterations == 0 || iterations > MAX_ITERATIONS {
        return Err(bad("iteration count out of range"));
    }
    Ok(ServerFirst {
        nonce,
        salt,
        iterations,
    })
}

/// Parses `v=<signature>` or `e=<error>` (RFC 5802 §7) and returns the base64 signature.
pub fn parse_server_final(msg: &str) -> Result<&str> {
    let first = msg.split(',').next().unwrap_or("");
    if let Some(err) = first.strip_prefix("e=") {
        return Err(Error::auth(format!(
            "SCRAM: the server reported an error: {err}"
        )));
    }
    first
        .strip_prefix("v=")
        .ok_or_else(|| Error::auth("SCRAM: malformed server-final-message"))
}

#[cfg(test)]
mod tests {
    /// A minimal certificate shape: SEQUENCE { SEQUENCE {} (tbs), SEQUENCE { OID } }.
    fn cert_with_algorithm(oid: &[u8]) -> Vec<u8> {
        let mut alg = vec![0x06, oid.len() as u8];
        alg.extend_from_slice(oid);
        let mut body = vec![0x30, 0x00, 0x30, alg.len() as u8];
        body.extend_from_slice(&alg);
        let mut cert = vec![0x30, body.len() as u8];
        cert.extend_from_slice(&body);
        cert
    }

    #[test]
    fn end_point_hash_follows_the_signature_algorithm() {
        const SHA256_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b];
        const SHA1_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05];
        const SHA384_ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
        const SHA512_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d];
        const ED25519: &[u8] = &[0x2b, 0x65, 0x70];
        for (oid, len) in [
            (SHA256_RSA, 32),
            (SHA1_RSA, 32),
            (SHA384_ECDSA, 48),
            (SHA512_RSA, 64),
        ] {
            let cert = cert_with_algorithm(oid);
            let hash = tls_server_end_point(&cert).unwrap();
            assert_eq!(hash.len(), len, "{oid:x?}");
        }
        // SHA-1 is upgraded to SHA-256 (RFC 5929 §4.1).
        let cert = cert_with_algorithm(SHA1_RSA);
        assert_eq!(
            tls_server_end_point(&cert).unwrap(),
            Sha256::digest(&cert).to_vec()
        );
        assert!(tls_server_end_point(&cert_with_algorithm(ED25519)).is_err());
        assert!(tls_server_end_point(&[]).is_err());
    }

    use super::*;

    /// RFC 7677 §3's example exchange (user "user", password "pencil"), with the user name left
    /// out of client-first as PostgreSQL does, so the proof differs from the RFC's: we check it
    /// against a server-side computation instead.
    fn server_signature_for(
        password: &[u8],
        salt: &[u8],
        iters: u32,
        auth_message: &str,
    ) -> String {
        let salted = hi(password, salt, iters);
        let server_key = hmac(&salted, b"Server Key");
        BASE64.encode(hmac(&server_key, auth_message.as_bytes()))
    }

    #[test]
    fn full_exchange_verifies_server_signature() {
        let nonce = "rOprNGfwEbeRWgbNEkqO".to_owned();
        let mut scram = ScramSha256::with_nonce(b"pencil", Gs2Binding::Unsupported, nonce);
        assert_eq!(scram.client_first(), b"n,,n=,r=rOprNGfwEbeRWgbNEkqO");
        let server_first = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let client_final =
            String::from_utf8(scram.update(server_first.as_bytes()).unwrap()).unwrap();
        assert!(
            client_final
                .starts_with("c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=")
        );
        let without_proof = client_final.rsplit_once(",p=").unwrap().0;
        let auth = format!("n=,r=rOprNGfwEbeRWgbNEkqO,{server_first},{without_proof}");
        let salt = BASE64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let sig = server_signature_for(b"pencil", &salt, 4096, &auth);
        scram.finish(format!("v={sig}").as_bytes()).unwrap();
        assert!(scram.is_done());
    }

    #[test]
    fn rfc7677_salted_password() {
        // RFC 7677's test vector: SaltedPassword for "pencil" with that salt and 4096 iterations
        // gives the ServerSignature below for the RFC's own AuthMessage.
        let salt = BASE64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let auth = "n=user,r=rOprNGfwEbeRWgbNEkqO,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        assert_eq!(
            server_signature_for(b"pencil", &salt, 4096, auth),
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }

    #[test]
    fn rejects_nonce_that_does_not_extend_ours() {
        let mut scram = ScramSha256::with_nonce(b"p", Gs2Binding::Unsupported, "abc".into());
        let err = scram.update(b"r=xyzdef,s=c2FsdA==,i=4096").unwrap_err();
        assert!(err.to_string().contains("nonce"), "{err}");
        // The exchange is over after an error.
        assert!(scram.is_done());
        assert!(scram.update(b"r=abcdef,s=c2FsdA==,i=4096").is_err());
    }

    #[test]
    fn rejects_wrong_signature_and_server_error() {
        let mut scram = ScramSha256::with_nonce(b"p", Gs2Binding::Unsupported, "abc".into());
        scram.update(b"r=abcdef,s=c2FsdA==,i=16").unwrap();
        let err = scram
            .finish(b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
            .unwrap_err();
        assert!(err.to_string().contains("signature"), "{err}");
        let mut scram = ScramSha256::with_nonce(b"p", Gs2Binding::Unsupported, "abc".into());
        scram.update(b"r=abcdef,s=c2FsdA==,i=16").unwrap();
        assert!(
            scram
                .finish(b"e=invalid-proof")
                .unwrap_err()
                .to_string()
                .contains("invalid-proof")
        );
    }

    #[test]
    fn parses_and_rejects_server_first() {
        assert_eq!(
            parse_server_first("r=ab,s=c2FsdA==,i=4096,x=ext").unwrap(),
            ServerFirst {
                nonce: "ab",
                salt: "c2FsdA==",
                iterations: 4096
            }
        );
        for bad in [
            "",
            "r=",
            "s=x,r=y,i=1",
            "r=a,s=b",
            "r=a,s=b,i=0",
            "r=a,s=b,i=-1",
            "r=a,s=b,i=99999999999",
        ] {
            assert!(parse_server_first(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn saslprep_maps_non_ascii_spaces() {
        // U+00A0 NO-BREAK SPACE maps to a plain space under SASLprep.
        assert_eq!(prepare_password("a\u{a0}b".as_bytes()), b"a b");
        // Invalid UTF-8 is used raw.
        assert_eq!(prepare_password(&[0xff, 0x41]), vec![0xff, 0x41]);
    }
}
