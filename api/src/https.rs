//! The api's own HTTPS (`API_TLS_CERT`, `API_TLS_KEY`): its certificate and
//! key from PEM files, TLS 1.3 only unless `API_TLS_MIN_VERSION=1.2`, and
//! the certificate reloaded in place when its files change on disk.
//!
//! A reload swaps the rustls configuration that the next handshake reads
//! (axum-server's `RustlsConfig`); connections already open keep the
//! session they made, so a certificate rotates without downtime. The files
//! are polled (every `API_TLS_RELOAD_SECONDS`): a renewal written in place,
//! renamed over, or swapped by a Kubernetes secret's symlink is seen alike.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum_server::tls_rustls::RustlsConfig;
use clinflow::config::ConfigError;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

pub const CERT: &str = "API_TLS_CERT";
pub const KEY: &str = "API_TLS_KEY";

/// The oldest TLS version the api accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinVersion {
    Tls12,
    Tls13,
}

impl MinVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tls12 => "1.2",
            Self::Tls13 => "1.3",
        }
    }
}

/// Where the certificate and key are, and how they are served.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub min_version: MinVersion,
    /// How often the files are read again for a new certificate.
    pub reload_every: Duration,
}

/// The api's TLS configuration, loaded from its files; clones share it.
#[derive(Clone)]
pub struct ApiTls {
    files: TlsFiles,
    config: RustlsConfig,
    /// Digest of the files' content in service.
    digest: [u8; 32],
    /// The certificate's SHA-256, for the logs (the operator compares it
    /// with `openssl x509 -noout -fingerprint -sha256`).
    pub fingerprint: String,
}

impl std::fmt::Debug for ApiTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiTls").field("files", &self.files).field("fingerprint", &self.fingerprint).finish()
    }
}

impl ApiTls {
    /// Reads and checks the files: an unreadable file, one without a
    /// certificate or key, or a key that is not the certificate's is an
    /// error naming its variable.
    pub fn load(files: TlsFiles) -> Result<Self, ConfigError> {
        clinflow::tls::install_crypto_provider();
        let pem = Pem::read(&files)?;
        let (config, fingerprint) = pem.server_config(&files)?;
        Ok(Self { files, config: RustlsConfig::from_config(Arc::new(config)), digest: pem.digest(), fingerprint })
    }

    /// The configuration the listener reads at each handshake.
    pub fn rustls(&self) -> RustlsConfig {
        self.config.clone()
    }

    pub fn min_version(&self) -> MinVersion {
        self.files.min_version
    }

    /// Reads the files every `reload_every` until `stop`, and serves a new
    /// certificate from the next handshake on when they change. A change
    /// that does not load (a key not yet written beside its new
    /// certificate, a broken file) is logged once and the certificate in
    /// service stays; the next change is tried again.
    pub async fn watch(self, stop: CancellationToken) {
        let mut reloader = Reloader::new(self);
        let mut ticks = tokio::time::interval(reloader.tls.files.reload_every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            // File reads block: off the runtime's threads (a certificate
            // mount that stalls must not stall requests).
            let looked = tokio::task::spawn_blocking(move || {
                let found = reloader.check();
                (reloader, found)
            });
            let Ok((back, found)) = looked.await else {
                tracing::error!("the watch of the api's TLS certificate stopped: it will not be reloaded");
                return;
            };
            reloader = back;
            match found {
                Reload::Unchanged => {}
                Reload::Reloaded { fingerprint } => {
                    tracing::info!(certificate_sha256 = %fingerprint, "reloaded the api's TLS certificate ({CERT})");
                }
                Reload::Failed(error) => {
                    tracing::warn!(%error, "could not reload the api's TLS certificate; serving the previous one");
                }
            }
        }
    }
}

/// What one look at the files found.
#[derive(Debug)]
enum Reload {
    Unchanged,
    Reloaded { fingerprint: String },
    Failed(ConfigError),
}

/// The state of the watch: what the files held when last read.
struct Reloader {
    tls: ApiTls,
    /// Digest of the files' content at the last read (`None`: unreadable).
    seen: Option<[u8; 32]>,
    /// Digest of the content in service.
    served: [u8; 32],
}

impl Reloader {
    fn new(tls: ApiTls) -> Self {
        Self { seen: Some(tls.digest), served: tls.digest, tls }
    }

    /// Reads the files and reloads when their content changed.
    fn check(&mut self) -> Reload {
        let pem = match Pem::read(&self.tls.files) {
            Ok(pem) => pem,
            // Reported once, until the files are readable again.
            Err(error) => return if self.seen.take().is_some() { Reload::Failed(error) } else { Reload::Unchanged },
        };
        let digest = pem.digest();
        if self.seen == Some(digest) || self.served == digest {
            self.seen = Some(digest);
            return Reload::Unchanged;
        }
        self.seen = Some(digest);
        match pem.server_config(&self.tls.files) {
            Ok((config, fingerprint)) => {
                self.tls.config.reload_from_config(Arc::new(config));
                self.served = digest;
                Reload::Reloaded { fingerprint }
            }
            Err(error) => Reload::Failed(error),
        }
    }
}

/// The two files' content.
struct Pem {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl Pem {
    fn read(files: &TlsFiles) -> Result<Self, ConfigError> {
        Ok(Self { cert: read(CERT, &files.cert)?, key: read(KEY, &files.key)? })
    }

    fn digest(&self) -> [u8; 32] {
        let mut hash = Sha256::new();
        for part in [&self.cert, &self.key] {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part);
        }
        hash.finalize().into()
    }

    /// The rustls configuration of these files, and the certificate's
    /// fingerprint.
    fn server_config(&self, files: &TlsFiles) -> Result<(ServerConfig, String), ConfigError> {
        let path = files.cert.display();
        let chain = CertificateDer::pem_slice_iter(&self.cert).collect::<Result<Vec<_>, _>>();
        let chain = match chain {
            Ok(chain) if !chain.is_empty() => chain,
            _ => return Err(problem(CERT, format!("{path:?} holds no PEM certificate"))),
        };
        let key = PrivateKeyDer::from_pem_slice(&self.key)
            .map_err(|_| problem(KEY, format!("{:?} holds no PEM private key", files.key.display())))?;
        let fingerprint = Sha256::digest(&chain[0]).iter().map(|b| format!("{b:02x}")).collect();
        let versions: &[&rustls::SupportedProtocolVersion] = match files.min_version {
            MinVersion::Tls13 => &[&rustls::version::TLS13],
            MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        };
        let mut config = ServerConfig::builder_with_protocol_versions(versions)
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => {
                    problem(KEY, format!("is not the key of the certificate in {CERT}"))
                }
                other => problem(KEY, format!("cannot be used with the certificate in {CERT}: {other}")),
            })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok((config, fingerprint))
    }
}

fn read(name: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| problem(name, format!("{:?}: {e}", path.display())))
}

fn problem(name: &'static str, problem: String) -> ConfigError {
    ConfigError { name, problem }
}

#[cfg(test)]
mod tests {
    use clinflow::testing::tls::TestCa;

    use super::*;

    fn write_leaf(ca: &TestCa, dir: &Path) -> TlsFiles {
        let (cert, key) = ca.leaf_pem(&["127.0.0.1"]);
        std::fs::write(dir.join("cert.pem"), cert).unwrap();
        std::fs::write(dir.join("key.pem"), key).unwrap();
        TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            min_version: MinVersion::Tls13,
            reload_every: Duration::from_secs(1),
        }
    }

    #[test]
    fn a_changed_certificate_is_reloaded_and_a_broken_one_is_reported_once_and_not_served() {
        let ca = TestCa::new("reload test CA");
        let dir = tempfile::tempdir().unwrap();
        let files = write_leaf(&ca, dir.path());
        let tls = ApiTls::load(files.clone()).unwrap();
        let first = tls.fingerprint.clone();
        let mut reloader = Reloader::new(tls.clone());
        assert!(matches!(reloader.check(), Reload::Unchanged));

        write_leaf(&ca, dir.path());
        let Reload::Reloaded { fingerprint: second } = reloader.check() else { panic!("not reloaded") };
        assert_ne!(second, first);
        assert!(matches!(reloader.check(), Reload::Unchanged));
        let served = Arc::as_ptr(&tls.rustls().get_inner());

        // A new certificate beside the old key: refused, reported once.
        let key = std::fs::read(&files.key).unwrap();
        write_leaf(&ca, dir.path());
        std::fs::write(&files.key, key).unwrap();
        let Reload::Failed(error) = reloader.check() else { panic!("a mismatched key was loaded") };
        assert_eq!(error.to_string(), format!("{KEY}: is not the key of the certificate in {CERT}"));
        assert!(matches!(reloader.check(), Reload::Unchanged));
        assert_eq!(Arc::as_ptr(&tls.rustls().get_inner()), served, "the previous certificate stays in service");

        // Its key written too: served.
        write_leaf(&ca, dir.path());
        assert!(matches!(reloader.check(), Reload::Reloaded { .. }));
        assert_ne!(Arc::as_ptr(&tls.rustls().get_inner()), served);

        // A file gone is reported once; back unchanged, nothing to do.
        let cert = std::fs::read(&files.cert).unwrap();
        std::fs::remove_file(&files.cert).unwrap();
        let Reload::Failed(error) = reloader.check() else { panic!("a missing file passed") };
        assert!(error.to_string().starts_with(&format!("{CERT}: ")), "{error}");
        assert!(matches!(reloader.check(), Reload::Unchanged));
        std::fs::write(&files.cert, cert).unwrap();
        assert!(matches!(reloader.check(), Reload::Unchanged));
    }
}
