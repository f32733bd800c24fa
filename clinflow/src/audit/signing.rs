//! Audit events that cannot be forged. Each producer signs each event with
//! Ed25519 under its own key ([`Signer`]); the audit sink and every verifier
//! hold only public keys ([`PublicKeys`]). An event is stored only when its
//! signature holds *and* its key may speak for the event's actor:
//!
//! - a key id is `<producer>` or `<producer>.<anything>` (`api`,
//!   `worker.2027`); the public key is the file `<key id>.pem` in the
//!   directory `AUDIT_PUBLIC_KEYS` names;
//! - producer `P` may sign the events of the service `clinflow-P` and of
//!   its commands (`clinflow-P-cli:<os user>`); the api also signs for users
//!   and anonymous callers, whom only it meets.
//!
//! So the worker's key cannot claim a login, and a broker account that can
//! publish to the audit exchange cannot write history without a key. The
//! sink signs the chain's heads and its checkpoints with its own key
//! (`audit-sink`), so verifying needs no secret at all.

use std::collections::HashMap;
use std::path::Path;

use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey};
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::event::{ActorKind, AuditEvent};
use crate::amqp::Undecodable;
use crate::config::{self, ConfigError};

/// What an event's signature covers, before its key id and canonical bytes.
const EVENT_CONTEXT: &[u8] = b"clinflow audit event v1\n";

/// An audit message as producers publish it and the sink stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedEvent {
    /// With `occurred_at` to the microsecond, as the table keeps it.
    pub event: AuditEvent,
    pub key_id: String,
    /// Ed25519 over "clinflow audit event v1\n" ‖ key id ‖ "\n" ‖ the
    /// event's canonical bytes; base64 on the wire.
    #[serde(with = "base64_bytes")]
    pub signature: Vec<u8>,
}

/// Most events one audit message carries (about 0.7 KB each): a
/// producer's batch goes to the broker as few messages, not one per event
/// (each event still signed on its own). Small enough that the sink's
/// prefetch (twice its batch size, in messages) holds some tens of MB at
/// most after an outage.
pub const MAX_EVENTS_PER_MESSAGE: usize = 100;

/// The body of one audit message carrying `signed` (at most
/// [`MAX_EVENTS_PER_MESSAGE`]): the signed event itself when there is one,
/// else a JSON array of them.
pub fn message_body(signed: &[SignedEvent]) -> Result<Vec<u8>, serde_json::Error> {
    match signed {
        [one] => serde_json::to_vec(one),
        many => serde_json::to_vec(many),
    }
}

/// The events of an audit message: one signed event, or an array of 1 to
/// [`MAX_EVENTS_PER_MESSAGE`] of them (a longer one is no message any
/// producer makes: refused before its signatures cost anything).
/// The error names the fault, never the body's content.
pub fn parse_message(body: &[u8]) -> Result<Vec<SignedEvent>, Undecodable> {
    if body.trim_ascii_start().first() == Some(&b'[') {
        let events: Vec<SignedEvent> = serde_json::from_slice(body)?;
        if events.is_empty() || events.len() > MAX_EVENTS_PER_MESSAGE {
            return Err(Undecodable { fault: "not 1 to MAX_EVENTS_PER_MESSAGE signed events", at: None });
        }
        Ok(events)
    } else {
        Ok(vec![serde_json::from_slice(body)?])
    }
}

/// Why a message is refused (its dead-letter reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No signature, an unknown key, or a signature that does not hold.
    #[error("bad_signature")]
    BadSignature,
    /// A genuine signature by a key that may not speak for the actor.
    #[error("producer_mismatch")]
    ProducerMismatch,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::BadSignature => "bad_signature",
            Refusal::ProducerMismatch => "producer_mismatch",
        }
    }
}

/// A producer's private key and the id verifiers know its public key by.
pub struct Signer {
    key_id: String,
    key: SigningKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

impl Signer {
    pub fn new(key_id: impl Into<String>, key: SigningKey) -> Self {
        Self { key_id: key_id.into(), key }
    }

    /// `AUDIT_SIGNING_KEY` (or `AUDIT_SIGNING_KEY_FILE`): a PKCS#8 PEM
    /// Ed25519 key, as `openssl genpkey -algorithm ed25519` writes it. Its id
    /// is `AUDIT_SIGNING_KEY_ID`, by default `producer`; an id of another
    /// producer is refused here rather than by every verifier later, and so
    /// is a key that `AUDIT_PUBLIC_KEYS` (when set) does not know by its id.
    pub fn from_env(producer: &str) -> Result<Self, ConfigError> {
        const VAR: &str = "AUDIT_SIGNING_KEY";
        let pem = config::required(VAR)?;
        let key = SigningKey::from_pkcs8_pem(&pem).map_err(|_| {
            ConfigError::new(VAR, "is not a PEM Ed25519 private key (openssl genpkey -algorithm ed25519)")
        })?;
        let key_id = config::optional("AUDIT_SIGNING_KEY_ID")?.unwrap_or_else(|| producer.to_owned());
        if !valid_key_id(&key_id) || producer_of(&key_id) != producer {
            return Err(ConfigError::new(
                "AUDIT_SIGNING_KEY_ID",
                format!("must be {producer} or {producer}.<letters, digits, -_>"),
            ));
        }
        let signer = Self { key_id, key };
        // Where the verifiers' keys are at hand, a key that is not the one
        // they know under this id (a command run with another service's
        // key file) stops here, not as refused events at the sink.
        if let Some(known) = PublicKeys::from_env("AUDIT_PUBLIC_KEYS")? {
            match known.keys.get(&signer.key_id) {
                Some(public) if *public == signer.verifying_key() => {}
                Some(_) => {
                    return Err(ConfigError::new(
                        VAR,
                        format!("is not the key AUDIT_PUBLIC_KEYS knows as {}: another service's key?", signer.key_id),
                    ));
                }
                None => {
                    return Err(ConfigError::new(
                        VAR,
                        format!(
                            "AUDIT_PUBLIC_KEYS has no {}.pem: every event signed with it would be refused",
                            signer.key_id
                        ),
                    ));
                }
            }
        }
        Ok(signer)
    }

    /// A new key from the operating system's random source.
    pub fn generate(key_id: impl Into<String>) -> Self {
        Self::new(key_id, SigningKey::from_bytes(&crate::crypto::random_32()))
    }

    /// The private key as PKCS#8 PEM (what [`Signer::from_env`] reads).
    pub fn private_pem(&self) -> Result<secrecy::zeroize::Zeroizing<String>, ed25519_dalek::pkcs8::Error> {
        use ed25519_dalek::pkcs8::EncodePrivateKey;
        self.key.to_pkcs8_pem(Default::default())
    }

    /// The public key as SPKI PEM (a `<key id>.pem` of [`PublicKeys::from_dir`]).
    pub fn public_pem(&self) -> Result<String, ed25519_dalek::pkcs8::spki::Error> {
        use ed25519_dalek::pkcs8::spki::EncodePublicKey;
        self.key.verifying_key().to_public_key_pem(Default::default())
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// The event, to the microsecond, with this key's signature.
    pub fn sign(&self, event: &AuditEvent) -> Result<SignedEvent, serde_json::Error> {
        let mut event = event.clone();
        event.occurred_at = super::event::truncate_to_micros(event.occurred_at);
        let signature = self.key.sign(&event_message(&self.key_id, &event.canonical_bytes()?)).to_bytes().to_vec();
        Ok(SignedEvent { event, key_id: self.key_id.clone(), signature })
    }

    /// The events, each signed, packed into as few audit messages as
    /// [`MAX_EVENTS_PER_MESSAGE`] allows: (message id, the first event's
    /// id; body).
    pub fn messages(&self, events: &[AuditEvent]) -> Result<Vec<(String, Vec<u8>)>, serde_json::Error> {
        events
            .chunks(MAX_EVENTS_PER_MESSAGE)
            .map(|chunk| {
                let signed = chunk.iter().map(|e| self.sign(e)).collect::<Result<Vec<_>, _>>()?;
                Ok((chunk[0].event_id.to_string(), message_body(&signed)?))
            })
            .collect()
    }

    /// The message body of `event`: its [`SignedEvent`] as JSON.
    pub fn body(&self, event: &AuditEvent) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(&self.sign(event)?)
    }

    /// A signature over `context` ‖ `parts` (the sink's heads and checkpoints).
    pub(crate) fn sign_parts(&self, context: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        self.key.sign(&concat(context, parts)).to_bytes().to_vec()
    }
}

/// The public keys a verifier trusts, by key id.
#[derive(Debug, Clone, Default)]
pub struct PublicKeys {
    keys: HashMap<String, VerifyingKey>,
}

impl PublicKeys {
    /// The public keys of these signers (tests, and a sink's own key).
    pub fn of(signers: &[&Signer]) -> Self {
        let mut keys = Self::default();
        for signer in signers {
            keys.insert(signer.key_id(), signer.verifying_key());
        }
        keys
    }

    pub fn insert(&mut self, key_id: impl Into<String>, key: VerifyingKey) {
        self.keys.insert(key_id.into(), key);
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Every `<key id>.pem` (SPKI PEM, as `openssl pkey -pubout` writes it)
    /// in `dir`; another file, or a `.pem` that is no Ed25519 public key,
    /// is an error naming it.
    pub fn from_dir(dir: &Path) -> Result<Self, String> {
        let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut keys = Self::default();
        for entry in entries {
            let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
            let Some(key_id) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".pem")) else {
                continue;
            };
            if !valid_key_id(key_id) {
                return Err(format!("{}: not a key id (<producer>[.<version>])", path.display()));
            }
            let pem = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let key = VerifyingKey::from_public_key_pem(&pem)
                .map_err(|_| format!("{}: not a PEM Ed25519 public key", path.display()))?;
            keys.insert(key_id, key);
        }
        if keys.is_empty() {
            return Err(format!("{}: holds no <key id>.pem public key", dir.display()));
        }
        Ok(keys)
    }

    /// The directory `variable` names (`AUDIT_PUBLIC_KEYS`), if set.
    pub fn from_env(variable: &'static str) -> Result<Option<Self>, ConfigError> {
        match config::optional(variable)? {
            Some(dir) => Self::from_dir(Path::new(&dir)).map(Some).map_err(|e| ConfigError::new(variable, e)),
            None => Ok(None),
        }
    }

    /// The signature holds under a key known here, and that key's producer
    /// may speak for the event's actor.
    pub fn check(&self, signed: &SignedEvent) -> Result<(), Refusal> {
        let canonical = signed.event.canonical_bytes().map_err(|_| Refusal::BadSignature)?;
        if !self.holds(&signed.key_id, &event_message(&signed.key_id, &canonical), &signed.signature) {
            return Err(Refusal::BadSignature);
        }
        if !may_speak_for(producer_of(&signed.key_id), &signed.event) {
            return Err(Refusal::ProducerMismatch);
        }
        Ok(())
    }

    /// [`check`](Self::check) for every event of a message at once: the
    /// signatures verified together (Ed25519 batch verification, about
    /// twice as fast per event from a few dozen on); refused if any one of
    /// them does not hold (`BadSignature`), else if any event's key may not
    /// speak for its actor.
    pub fn check_all(&self, signed: &[SignedEvent]) -> Result<(), Refusal> {
        if let [one] = signed {
            return self.check(one);
        }
        let mut messages = Vec::with_capacity(signed.len());
        let mut signatures = Vec::with_capacity(signed.len());
        let mut keys = Vec::with_capacity(signed.len());
        for s in signed {
            let canonical = s.event.canonical_bytes().map_err(|_| Refusal::BadSignature)?;
            let (Some(key), Ok(signature)) = (self.keys.get(&s.key_id), Signature::from_slice(&s.signature)) else {
                return Err(Refusal::BadSignature);
            };
            messages.push(event_message(&s.key_id, &canonical));
            signatures.push(signature);
            keys.push(*key);
        }
        let messages: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
        if ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_err() {
            return Err(Refusal::BadSignature);
        }
        if signed.iter().any(|s| !may_speak_for(producer_of(&s.key_id), &s.event)) {
            return Err(Refusal::ProducerMismatch);
        }
        Ok(())
    }

    /// A signature over `context` ‖ `parts` under `key_id` holds.
    pub(crate) fn holds_parts(&self, key_id: &str, context: &[u8], parts: &[&[u8]], signature: &[u8]) -> bool {
        self.holds(key_id, &concat(context, parts), signature)
    }

    fn holds(&self, key_id: &str, message: &[u8], signature: &[u8]) -> bool {
        let (Some(key), Ok(signature)) = (self.keys.get(key_id), Signature::from_slice(signature)) else {
            return false;
        };
        key.verify(message, &signature).is_ok()
    }
}

/// The producer a key id names: what comes before its first `.`.
pub fn producer_of(key_id: &str) -> &str {
    key_id.split('.').next().unwrap_or(key_id)
}

fn valid_key_id(key_id: &str) -> bool {
    !key_id.is_empty()
        && key_id.len() <= 64
        && key_id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !key_id.starts_with('.')
}

/// Whether producer `producer` may sign `event` (see the module's rules).
fn may_speak_for(producer: &str, event: &AuditEvent) -> bool {
    match event.actor.kind {
        ActorKind::User | ActorKind::Anonymous => producer == "api",
        ActorKind::Service => event.actor.name.as_deref().is_some_and(|name| {
            let service = format!("clinflow-{producer}");
            name == service || name.strip_prefix(service.as_str()).is_some_and(|rest| rest.starts_with("-cli:"))
        }),
    }
}

fn event_message(key_id: &str, canonical: &[u8]) -> Vec<u8> {
    concat(EVENT_CONTEXT, &[key_id.as_bytes(), b"\n", canonical])
}

fn concat(context: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut message = Vec::with_capacity(context.len() + parts.iter().map(|p| p.len()).sum::<usize>());
    message.extend_from_slice(context);
    for part in parts {
        message.extend_from_slice(part);
    }
    message
}

mod base64_bytes {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::event::{Action, Actor, Outcome};

    fn event(actor: Actor) -> AuditEvent {
        AuditEvent::new(Action::DocumentProcess, actor, Outcome::Success).document(uuid::Uuid::now_v7())
    }

    #[test]
    fn a_signed_event_survives_the_wire_and_is_checked() {
        let worker = Signer::generate("worker");
        let keys = PublicKeys::of(&[&worker]);
        let body = worker.body(&event(Actor::service("clinflow-worker"))).unwrap();
        let back: SignedEvent = serde_json::from_slice(&body).unwrap();
        assert_eq!(keys.check(&back), Ok(()));
    }

    #[test]
    fn one_event_travels_as_itself_and_many_as_an_array() {
        let worker = Signer::generate("worker");
        let signed: Vec<SignedEvent> =
            (0..3).map(|_| worker.sign(&event(Actor::service("clinflow-worker"))).unwrap()).collect();
        let one = message_body(&signed[..1]).unwrap();
        assert_eq!(one, serde_json::to_vec(&signed[0]).unwrap(), "a single event's body is unchanged");
        assert_eq!(parse_message(&one).unwrap(), signed[..1]);
        let many = message_body(&signed).unwrap();
        assert!(many.starts_with(b"["));
        assert_eq!(parse_message(&many).unwrap(), signed);
        assert!(parse_message(b"[]").is_err(), "an empty batch is no message");
        let too_many: Vec<SignedEvent> = (0..=MAX_EVENTS_PER_MESSAGE).map(|_| signed[0].clone()).collect();
        assert!(parse_message(&serde_json::to_vec(&too_many).unwrap()).is_err(), "more than a producer sends");
        assert_eq!(parse_message(&message_body(&too_many[1..]).unwrap()).unwrap().len(), MAX_EVENTS_PER_MESSAGE);
        assert!(parse_message(b" [{\"event\": 1}]").is_err());
    }

    /// serde's messages quote the values they could not read; a refused
    /// message's error names the fault and where it is, not its content.
    #[test]
    fn a_refused_message_error_does_not_quote_the_body() {
        let worker = Signer::generate("worker");
        let mut body = serde_json::to_value(worker.sign(&event(Actor::service("clinflow-worker"))).unwrap()).unwrap();
        body["event"]["action"] = "PAT-SECRET".into();
        for bad in [serde_json::to_vec(&body).unwrap(), b"\"PAT-SECRET\"".to_vec(), b"[\"PAT-SECRET\"]".to_vec()] {
            let error = parse_message(&bad).unwrap_err().to_string();
            assert!(!error.contains("SECRET") && error.contains(" at line 1 column "), "{error}");
        }
    }

    #[test]
    fn a_changed_event_or_an_unknown_key_is_a_bad_signature() {
        let worker = Signer::generate("worker");
        let keys = PublicKeys::of(&[&worker]);
        let mut signed = worker.sign(&event(Actor::service("clinflow-worker"))).unwrap();
        signed.event.reason = Some("edited".into());
        assert_eq!(keys.check(&signed), Err(Refusal::BadSignature));
        let stranger = Signer::generate("worker").sign(&event(Actor::service("clinflow-worker"))).unwrap();
        assert_eq!(keys.check(&stranger), Err(Refusal::BadSignature));
        let mut renamed = worker.sign(&event(Actor::service("clinflow-worker"))).unwrap();
        renamed.key_id = "worker.2".into();
        assert_eq!(keys.check(&renamed), Err(Refusal::BadSignature));
    }

    #[test]
    fn a_batch_is_checked_whole_and_refused_for_any_one_bad_event() {
        let (worker, api) = (Signer::generate("worker"), Signer::generate("api"));
        let keys = PublicKeys::of(&[&worker, &api]);
        let mut batch: Vec<SignedEvent> = (0..40)
            .map(|i| {
                let signer = if i % 2 == 0 { &worker } else { &api };
                let actor = if i % 2 == 0 { Actor::service("clinflow-worker") } else { Actor::anonymous(Some("u")) };
                signer.sign(&event(actor)).unwrap()
            })
            .collect();
        assert_eq!(keys.check_all(&batch), Ok(()), "forty good events, two keys");
        for (i, s) in batch.iter().enumerate() {
            assert_eq!(keys.check(s), Ok(()), "event {i} alone");
        }

        let mut edited = batch.clone();
        edited[17].event.reason = Some("edited".into());
        assert_eq!(keys.check_all(&edited), Err(Refusal::BadSignature));
        let mut swapped = batch.clone();
        swapped.swap(3, 5); // same producer: the signatures move with their events
        assert_eq!(keys.check_all(&swapped), Ok(()));
        let (s3, s5) = (swapped[3].signature.clone(), swapped[5].signature.clone());
        swapped[3].signature = s5;
        swapped[5].signature = s3;
        assert_eq!(keys.check_all(&swapped), Err(Refusal::BadSignature), "signatures swapped between events");
        let mut unknown = batch.clone();
        unknown[39] = Signer::generate("api").sign(&event(Actor::anonymous(Some("u")))).unwrap();
        assert_eq!(keys.check_all(&unknown), Err(Refusal::BadSignature), "a key that is not the api's");
        batch[8] = worker.sign(&event(Actor::anonymous(Some("admin")))).unwrap();
        assert_eq!(keys.check_all(&batch), Err(Refusal::ProducerMismatch), "the worker speaking for a user");
    }

    #[test]
    fn a_key_speaks_only_for_its_producer() {
        let worker = Signer::generate("worker");
        let api = Signer::generate("api.2027");
        let keys = PublicKeys::of(&[&worker, &api]);
        let check = |signer: &Signer, actor: Actor| keys.check(&signer.sign(&event(actor)).unwrap());
        assert_eq!(check(&worker, Actor::service("clinflow-worker-cli:ops")), Ok(()));
        assert_eq!(check(&worker, Actor::anonymous(Some("admin"))), Err(Refusal::ProducerMismatch));
        assert_eq!(check(&worker, Actor::service("clinflow-api")), Err(Refusal::ProducerMismatch));
        assert_eq!(check(&worker, Actor::service("clinflow-workerx")), Err(Refusal::ProducerMismatch));
        assert_eq!(check(&api, Actor::anonymous(Some("admin"))), Ok(()));
        assert_eq!(check(&api, Actor::service("clinflow-api-cli:root")), Ok(()));
        assert_eq!(check(&api, Actor::service("clinflow-worker")), Err(Refusal::ProducerMismatch));
    }

    #[test]
    fn a_generated_key_reads_back_from_its_pem() {
        let signer = Signer::generate("api");
        let pem = signer.private_pem().unwrap();
        let back = SigningKey::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(back.verifying_key(), signer.verifying_key());
        assert_ne!(Signer::generate("api").verifying_key(), signer.verifying_key());
    }

    #[test]
    fn keys_are_read_from_openssl_pem_files() {
        let dir = tempfile::tempdir().unwrap();
        let signer = Signer::generate("api");
        let pem = signer.public_pem().unwrap();
        std::fs::write(dir.path().join("api.pem"), pem).unwrap();
        std::fs::write(dir.path().join("README"), "not a key").unwrap();
        let keys = PublicKeys::from_dir(dir.path()).unwrap();
        assert_eq!(keys.len(), 1);
        std::fs::write(dir.path().join("worker.pem"), "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
            .unwrap();
        let error = PublicKeys::from_dir(dir.path()).unwrap_err();
        assert!(error.contains("worker.pem"), "{error}");
    }
}
