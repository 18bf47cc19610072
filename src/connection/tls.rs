//! TLS for a connection, with rustls: what `sslmode`, `sslrootcert`, `sslcert`/`sslkey`,
//! `sslcrl`, `sslsni` and `ssl_min/max_protocol_version` mean, turned into a rustls client
//! configuration; the handshake over an open socket; and the channel binding data that
//! SCRAM-SHA-256-PLUS needs from it.
//!
//! The certificate checks follow libpq (§34.19.1 "Protection Provided in Different Modes"):
//!
//! | sslmode     | chain checked against the roots | host name checked |
//! |-------------|---------------------------------|-------------------|
//! | allow, prefer, require | no (but see below)   | no                |
//! | verify-ca   | yes                             | no                |
//! | verify-full | yes                             | yes               |
//!
//! As in libpq, `require` (and the modes below it) behave as `verify-ca` when a root
//! certificate file is there: named by `sslrootcert`, or `~/.postgresql/root.crt`. The
//! handshake's own signatures are always verified, whatever the mode: a certificate that is
//! not checked is still the key the session is encrypted to.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::socket::Socket;
use crate::config::{Config, SslMode, SslNegotiation};
use crate::error::{Error, Result};

/// ALPN protocol name of PostgreSQL (PostgreSQL 17+ requires it for direct TLS; older servers
/// ignore it).
const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// Everything needed to start TLS on a socket, made once per [`Config`] use and shared by
/// a connection's cancel requests.
#[derive(Clone)]
pub(crate) struct TlsConnector {
    config: Arc<rustls::ClientConfig>,
    pub(crate) negotiation: SslNegotiation,
    /// Whether a wrong host name is fatal (verify-full); otherwise any name will do.
    check_name: bool,
}

impl std::fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnector")
            .field("negotiation", &self.negotiation)
            .field("check_name", &self.check_name)
            .finish_non_exhaustive()
    }
}

/// The outcome of a handshake: the encrypted stream, and the channel binding data for
/// SCRAM-SHA-256-PLUS (`Err` with the reason when the server's certificate allows none).
pub(crate) struct Handshake {
    pub(crate) socket: Socket,
    pub(crate) end_point: std::result::Result<Vec<u8>, Error>,
}

impl TlsConnector {
    /// The connector for `config`, or `None` when `sslmode=disable`. Reads the certificate
    /// files now, so a missing or unreadable file is a configuration error at connect time.
    pub(crate) fn from_config(config: &Config) -> Result<Option<TlsConnector>> {
        let mode = config.get_ssl_mode();
        if mode == SslMode::Disable {
            return Ok(None);
        }
        // `Config::validate` (run by `connect`) has refused the combinations libpq refuses:
        // direct negotiation with a weak mode, `sslrootcert=system` without verify-full.
        let negotiation = config.get_ssl_negotiation();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions = protocol_versions(config)?;
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&versions)
            .map_err(|e| Error::config(format!("TLS versions: {e}")).with_source(e))?;

        let roots = root_certificates(config, mode)?;
        let check_name = mode == SslMode::VerifyFull;
        let verifier: Arc<dyn ServerCertVerifier> = match roots {
            None => Arc::new(AnyCertificate {
                algorithms: provider.signature_verification_algorithms,
            }),
            Some(roots) => {
                let crls = revocation_lists(config)?;
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .with_crls(crls)
                        .build()
                        .map_err(|e| {
                            Error::config(format!("cannot use the root certificates: {e}"))
                                .with_source(e)
                        })?;
                if check_name {
                    webpki
                } else {
                    Arc::new(AnyName { inner: webpki })
                }
            }
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut tls = match client_certificate(config)? {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(|e| {
                Error::config(format!("cannot use the client certificate: {e}")).with_source(e)
            })?,
            None => builder.with_no_client_auth(),
        };
        tls.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        tls.enable_sni = config.get_ssl_sni();
        Ok(Some(TlsConnector {
            config: Arc::new(tls),
            negotiation,
            check_name,
        }))
    }

    /// Runs the TLS handshake over `socket` with the server `host` (the name the certificate
    /// must match under verify-full, and the SNI name).
    pub(crate) async fn handshake(&self, socket: Socket, host: &str) -> Result<Handshake> {
        let name = server_name(host, self.check_name)?;
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let stream = connector.connect(name, socket).await.map_err(|e| {
            // rustls reports a rejected certificate as InvalidData with its own error inside:
            // that error is the cause (an io::Error does not give its inner error as source).
            let detail = e
                .get_ref()
                .map(|inner| inner.to_string())
                .unwrap_or_else(|| e.to_string());
            let failed = Error::tls(format!("TLS handshake with {host} failed: {detail}"));
            match e.downcast::<rustls::Error>() {
                Ok(rejected) => failed.with_source(rejected),
                Err(e) => failed.with_source(e),
            }
        })?;
        let (_, session) = stream.get_ref();
        if session
            .alpn_protocol()
            .is_some_and(|p| p != ALPN_POSTGRESQL)
        {
            return Err(Error::tls(
                "the server chose an ALPN protocol other than postgresql",
            ));
        }
        let end_point = match session.peer_certificates().and_then(|c| c.first()) {
            Some(cert) => crate::protocol::scram::tls_server_end_point(cert),
            None => Err(Error::auth("the server sent no TLS certificate")),
        };
        Ok(Handshake {
            socket: Socket::Tls(Box::new(stream)),
            end_point,
        })
    }
}

/// The name to check the certificate against. Under the modes that do not check names, a
/// host that is no valid DNS name (a socket-style or odd alias) must not stop the handshake.
fn server_name(host: &str, check_name: bool) -> Result<ServerName<'static>> {
    match ServerName::try_from(host.to_owned()) {
        Ok(name) => Ok(name),
        Err(_) if !check_name => Ok(ServerName::IpAddress(
            std::net::Ipv4Addr::UNSPECIFIED.into(),
        )),
        Err(_) => Err(Error::config(format!(
            "sslmode=verify-full: {host:?} is not a host name a certificate can be checked against"
        ))),
    }
}

/// TLS 1.2 and 1.3 are all rustls speaks; libpq's default minimum is TLS 1.2 too.
fn protocol_versions(config: &Config) -> Result<Vec<&'static rustls::SupportedProtocolVersion>> {
    let rank = |v: &str| match v {
        "TLSv1" => 0,
        "TLSv1.1" => 1,
        "TLSv1.2" => 2,
        _ => 3,
    };
    let min = config.get_ssl_min_protocol_version().map_or(2, rank);
    let max = config.get_ssl_max_protocol_version().map_or(3, rank);
    let mut versions = Vec::new();
    if min <= 2 && max >= 2 {
        versions.push(&rustls::version::TLS12);
    }
    if max >= 3 {
        versions.push(&rustls::version::TLS13);
    }
    if versions.is_empty() {
        return Err(Error::config(
            "ssl_max_protocol_version is below TLSv1.2, and older TLS versions are not supported",
        ));
    }
    Ok(versions)
}

fn home_file(name: &str) -> Option<PathBuf> {
    std::env::var_os("HOME").map(|home| Path::new(&home).join(".postgresql").join(name))
}

/// The trusted roots, or `None` when the server's certificate is not to be checked.
fn root_certificates(config: &Config, mode: SslMode) -> Result<Option<RootCertStore>> {
    let verify = matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull);
    let path = match config.get_ssl_root_cert() {
        Some(p) if p == Path::new("system") => return system_roots().map(Some),
        Some(p) => Some(p.to_owned()),
        None => home_file("root.crt").filter(|p| p.exists()),
    };
    let Some(path) = path else {
        if verify {
            return Err(Error::config(format!(
                "sslmode={} needs a root certificate file: set sslrootcert to a file, or to \
                 \"system\" for the system's trusted roots, or use a weaker sslmode",
                mode.as_str()
            )));
        }
        return Ok(None);
    };
    // Under require a root file that is present turns checking on (libpq's rule); one that
    // was named but cannot be read is an error in every mode.
    let certs = read_certificates(&path, "root certificate")?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(Error::config(format!(
            "the root certificate file {} holds no usable certificate",
            path.display()
        )));
    }
    Ok(Some(roots))
}

/// The platform's trusted roots, read once per process.
fn system_roots() -> Result<RootCertStore> {
    static ROOTS: OnceLock<std::result::Result<RootCertStore, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                Err("found no trusted root certificates on this system (sslrootcert=system)".into())
            } else {
                Ok(roots)
            }
        })
        .clone()
        .map_err(Error::config)
}

fn read_certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let unreadable = |e: rustls::pki_types::pem::Error| {
        Error::config(format!(
            "could not read the {what} file {}: {e}",
            path.display()
        ))
        .with_source(e)
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(unreadable)?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(unreadable)?;
    Ok(certs)
}

/// The revocation lists of `sslcrl` (a file) and `sslcrldir` (every file in the directory).
fn revocation_lists(config: &Config) -> Result<Vec<CertificateRevocationListDer<'static>>> {
    let mut files = Vec::new();
    if let Some(file) = config.get_ssl_crl() {
        files.push(file.to_owned());
    }
    if let Some(dir) = config.get_ssl_crl_dir() {
        let entries = std::fs::read_dir(dir).map_err(|e| {
            Error::config(format!(
                "could not read the CRL directory {}: {e}",
                dir.display()
            ))
            .with_source(e)
        })?;
        files.extend(
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_file()),
        );
    }
    let mut crls = Vec::new();
    for file in files {
        let read = CertificateRevocationListDer::pem_file_iter(&file)
            .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| {
                Error::config(format!(
                    "could not read the CRL file {}: {e}",
                    file.display()
                ))
                .with_source(e)
            })?;
        crls.extend(read);
    }
    Ok(crls)
}

/// The client certificate and key: `sslcert`/`sslkey`, else `~/.postgresql/postgresql.crt` and
/// `.key` when they exist (libpq's defaults). `sslcertmode=disable` never sends one.
fn client_certificate(
    config: &Config,
) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>> {
    if config.get_ssl_cert_mode() == "disable" {
        return Ok(None);
    }
    let cert = match config.get_ssl_cert() {
        Some(p) => Some(p.to_owned()),
        None => home_file("postgresql.crt"),
    };
    let Some(cert) = cert.filter(|p| p.exists()) else {
        return Ok(None);
    };
    let key = match config.get_ssl_key() {
        Some(p) => p.to_owned(),
        None => home_file("postgresql.key").unwrap_or_else(|| cert.with_extension("key")),
    };
    let chain = read_certificates(&cert, "client certificate")?;
    let text = std::fs::read(&key).map_err(|e| {
        Error::config(format!(
            "could not read the client key file {}: {e}",
            key.display()
        ))
        .with_source(e)
    })?;
    if text.windows(9).any(|w| w == b"ENCRYPTED") {
        return Err(Error::config(format!(
            "the client key {} is encrypted; pgengine cannot decrypt keys (sslpassword): \
             store it decrypted (`openssl pkey -in KEY -out KEY.plain`) with mode 0600",
            key.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_slice(&text).map_err(|e| {
        Error::config(format!(
            "could not read the client key file {}: {e}",
            key.display()
        ))
        .with_source(e)
    })?;
    Ok(Some((chain, key)))
}

/// `sslmode=require` (no roots): any certificate, but the handshake signatures are checked.
#[derive(Debug)]
struct AnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must lead to a trusted root; the name is not checked.
#[derive(Debug)]
struct AnyName {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain (and revocation) before the name, so a name error means
        // everything else passed.
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
