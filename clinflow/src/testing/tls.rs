//! Test-time TLS (feature `testing`): a CA made by the test (rcgen), and an
//! IMPOSTOR — a TLS listener on loopback presenting whatever certificate the
//! test gives it, as a man in the middle would. It stands in for PostgreSQL,
//! RabbitMQ or MedCAT only up to the end of the TLS handshake, which is all
//! a refusal test reaches: a client that verifies must hang up there.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A CA of a test's own, its certificate written to a PEM file.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub pem_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA");
        let dir = tempfile::tempdir().expect("a directory for the CA");
        let pem_file = dir.path().join("ca.pem");
        std::fs::write(&pem_file, issuer.pem()).expect("the CA's PEM file");
        Self { issuer, pem_file, _dir: dir }
    }

    /// A server certificate for `names` (DNS names or IP addresses), signed
    /// by this CA, with its key.
    pub fn leaf(&self, names: &[&str]) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).expect("params");
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &self.issuer).expect("server certificate");
        (cert.der().clone(), PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
    }

    /// The same as [`leaf`](Self::leaf), as PEM: the certificate and its
    /// key (PKCS#8), as a server reads them from files.
    pub fn leaf_pem(&self, names: &[&str]) -> (String, String) {
        let params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).expect("params");
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &self.issuer).expect("server certificate");
        (cert.pem(), key.serialize_pem())
    }

    pub fn pem_path(&self) -> &Path {
        &self.pem_file
    }
}

/// The SubjectPublicKeyInfo (DER) of a key given as PEM: what a browser
/// pins (Chromium's `--ignore-certificate-errors-spki-list` takes its
/// SHA-256), trusting that one server key and nothing else.
pub fn spki_der(key_pem: &str) -> Vec<u8> {
    use rcgen::PublicKeyData;
    KeyPair::from_pem(key_pem).expect("a PEM key").subject_public_key_info()
}

/// What an impostor says before its TLS handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preamble {
    /// Nothing: TLS from the first byte (AMQPS, HTTPS).
    None,
    /// PostgreSQL's: read the client's SSLRequest, answer `S`, then TLS.
    Postgres,
    /// PostgreSQL's refusal: read the SSLRequest, answer `N` (no TLS here),
    /// as a server stripping TLS would.
    PostgresWithoutTls,
}

/// Starts an impostor on a free loopback port, answering every connection
/// with `cert` (until the test ends); returns the port.
pub async fn impostor(cert: CertificateDer<'static>, key: PrivateKeyDer<'static>, preamble: Preamble) -> u16 {
    crate::tls::install_crypto_provider();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("the impostor's certificate");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
    let port = listener.local_addr().expect("its address").port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if preamble != Preamble::None {
                    let mut request = [0_u8; 8];
                    if stream.read_exact(&mut request).await.is_err() {
                        return;
                    }
                    let answer = if preamble == Preamble::Postgres { b"S" } else { b"N" };
                    if stream.write_all(answer).await.is_err() || preamble == Preamble::PostgresWithoutTls {
                        // Leave the connection open: the client must hang up.
                        let mut rest = Vec::new();
                        let _ = stream.read_to_end(&mut rest).await;
                        return;
                    }
                }
                // The handshake fails when the client refuses the
                // certificate; either way nothing more is said.
                if let Ok(mut tls) = acceptor.accept(stream).await {
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    port
}

/// The development CA and server certificate (`CLINFLOW_TEST_TLS_DIR`:
/// `ca.pem`, `server.pem`, `server.key`), if the tests run with TLS.
pub fn tls_dir() -> Option<std::path::PathBuf> {
    std::env::var_os("CLINFLOW_TEST_TLS_DIR").map(Into::into)
}

/// The query that asks PostgreSQL for a verified TLS connection with the
/// development CA (empty without it).
pub(crate) fn pg_tls_query() -> String {
    match tls_dir() {
        Some(dir) => format!("?sslmode=verify-full&sslrootcert={}", dir.join("ca.pem").display()),
        None => String::new(),
    }
}
