//! The tests' audit keys: one Ed25519 key per producer (api, worker, sink),
//! the same in every test process, and their PEM files in one directory for
//! the binaries a test starts (`AUDIT_SIGNING_KEY_FILE`, `AUDIT_PUBLIC_KEYS`).
//! Derived from fixed seeds, so never for a deployment.

use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use ed25519_dalek::SigningKey;

use crate::audit::signing::{PublicKeys, Signer};
use crate::audit::{Actor, Operator};
use crate::chain::{SINK_PRODUCER, Trust};

pub struct AuditKeys {
    pub api: Arc<Signer>,
    pub worker: Arc<Signer>,
    pub sink: Arc<Signer>,
    dir: PathBuf,
}

static KEYS: LazyLock<AuditKeys> = LazyLock::new(AuditKeys::new);

/// The keys every test of this process shares.
pub fn audit_keys() -> &'static AuditKeys {
    &KEYS
}

impl AuditKeys {
    fn new() -> Self {
        let signer = |id: &str, seed: u8| Arc::new(Signer::new(id, SigningKey::from_bytes(&[seed; 32])));
        let keys = Self {
            api: signer("api", 0xa1),
            worker: signer("worker", 0xb2),
            sink: signer(SINK_PRODUCER, 0xc3),
            dir: std::env::temp_dir().join("clinflow-test-audit-keys-v1"),
        };
        keys.write_files().expect("writing the test audit keys");
        keys
    }

    /// `public/<key id>.pem` for every producer, `<key id>.key` beside.
    fn write_files(&self) -> std::io::Result<()> {
        std::fs::create_dir_all(self.dir.join("public"))?;
        for signer in [&self.api, &self.worker, &self.sink] {
            let private = signer.private_pem().map_err(std::io::Error::other)?;
            let public = signer.public_pem().map_err(std::io::Error::other)?;
            write_atomically(&self.private_key_file(signer.key_id()), private.as_bytes())?;
            write_atomically(&self.public_dir().join(format!("{}.pem", signer.key_id())), public.as_bytes())?;
        }
        Ok(())
    }

    /// The directory for `AUDIT_PUBLIC_KEYS`.
    pub fn public_dir(&self) -> PathBuf {
        self.dir.join("public")
    }

    /// The file for `AUDIT_SIGNING_KEY_FILE` of `key_id` (`api`, `worker`, `audit-sink`).
    pub fn private_key_file(&self, key_id: &str) -> PathBuf {
        self.dir.join(format!("{key_id}.key"))
    }

    /// The environment of a service binary that signs as `key_id` and
    /// trusts every producer's key.
    pub fn env(&self, key_id: &str) -> Vec<(&'static str, String)> {
        vec![
            ("AUDIT_SIGNING_KEY_FILE", self.private_key_file(key_id).display().to_string()),
            ("AUDIT_PUBLIC_KEYS", self.public_dir().display().to_string()),
        ]
    }

    pub fn public(&self) -> PublicKeys {
        PublicKeys::of(&[&self.api, &self.worker, &self.sink])
    }

    /// What a verifier holds: the public keys only.
    pub fn trust(&self) -> Trust {
        Trust::new(self.public())
    }

    /// An operator's command run through `tool`'s deployment.
    pub fn operator(&self, tool: &str) -> Operator {
        let signer = match tool {
            "clinflow-worker" => &self.worker,
            "clinflow-audit-sink" => &self.sink,
            _ => &self.api,
        };
        Operator { actor: Actor::operator(tool), signer: signer.clone() }
    }
}

/// Several test processes may write the same files at once: each writes
/// its own temporary file and renames it into place.
fn write_atomically(path: &Path, content: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path)
}
