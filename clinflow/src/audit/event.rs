//! The audit event itself: who did what to which resource, when, from
//! where, and how it ended.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Chosen by the producer, so a redelivered event is stored once.
    pub event_id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub occurred_at: OffsetDateTime,
    pub actor: Actor,
    pub source_ip: Option<IpAddr>,
    pub request_id: Option<String>,
    pub action: Action,
    pub resource: Option<Resource>,
    pub outcome: Outcome,
    /// A short machine code (`bad_credentials`, `role_forbidden`, …), never
    /// free text that could carry PHI.
    pub reason: Option<String>,
    /// The patients this event disclosed (or tried to), by blind index
    /// (hex): the accounting of disclosures is a lookup of these. Last and
    /// left out when empty, so events from before it encode as they did.
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "blind_indexes")]
    pub patients: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Actor {
    pub kind: ActorKind,
    pub id: Option<Uuid>,
    /// Username, service name, or the username a failed login tried.
    pub name: Option<String>,
    pub role: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorKind {
    User,
    Service,
    Anonymous,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resource {
    pub kind: String,
    pub id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    #[serde(rename = "auth.login")]
    Login,
    #[serde(rename = "auth.logout")]
    Logout,
    #[serde(rename = "document.upload")]
    DocumentUpload,
    /// A user read a document or its results.
    #[serde(rename = "document.read")]
    DocumentRead,
    /// The worker decrypted a document to send it to MedCAT.
    #[serde(rename = "document.process")]
    DocumentProcess,
    /// A status read (no PHI); audited only when denied.
    #[serde(rename = "document.status")]
    DocumentStatus,
    /// An operator listed the dead-lettered jobs.
    #[serde(rename = "ops.dead_letters.list")]
    DeadLettersList,
    /// An operator replayed a dead-lettered job (one event per document).
    #[serde(rename = "ops.dead_letters.replay")]
    DeadLettersReplay,
    /// An operator started a reprocess (one event per run, the count in
    /// `reason`-free form: the resource names the selection).
    #[serde(rename = "ops.reprocess")]
    Reprocess,
    /// A request refused for its credentials (no, bad or expired token, or
    /// an ended session); `reason` says which.
    #[serde(rename = "auth.access")]
    Access,
    /// Refusals from one address that were counted but not audited one by
    /// one (rate limit); the resource is `count`/N.
    #[serde(rename = "auth.denials_suppressed")]
    DenialsSuppressed,
    /// An auditor read the audit trail.
    #[serde(rename = "audit.read")]
    AuditRead,
    /// An auditor had the chain verified.
    #[serde(rename = "audit.verify")]
    AuditVerify,
    /// An account was locked after too many failed logins (resource: user).
    #[serde(rename = "auth.lockout")]
    Lockout,
    /// A clinician broke the glass: access to a patient outside their care
    /// teams, for a time (resource: the grant; the patient is never named).
    #[serde(rename = "auth.break_glass")]
    BreakGlass,
    /// An admin read users, sessions, keys, teams or break-glass grants.
    #[serde(rename = "admin.read")]
    AdminRead,
    /// An admin created a user or service account, or changed one (role,
    /// disabled, password); `reason` says which.
    #[serde(rename = "admin.user")]
    AdminUser,
    /// An admin revoked sessions (force logout).
    #[serde(rename = "admin.sessions.revoke")]
    AdminSessionsRevoke,
    /// An admin created or revoked an API key; `reason` says which.
    #[serde(rename = "admin.api_key")]
    AdminApiKey,
    /// An admin created a care team or changed its members or patients;
    /// `reason` says which.
    #[serde(rename = "admin.team")]
    AdminTeam,
    /// A clinician read a patient's document list or problem list
    /// (resource: the patient's blind index, hex).
    #[serde(rename = "patient.read")]
    PatientRead,
    /// A clinician asked which of their patients or documents have a concept
    /// (resource: the CUI; `reason`: how many were shown).
    #[serde(rename = "concept.read")]
    ConceptRead,
    /// A patient's data was exported (FHIR); resource: blind index.
    #[serde(rename = "patient.export")]
    PatientExport,
    /// A patient's data was erased (a second privacy officer approved the
    /// request); resource: blind index; `reason`: the request's reason code,
    /// case and id, and what went.
    #[serde(rename = "patient.erase")]
    PatientErase,
    /// A privacy officer asked for a patient's erasure; resource: blind
    /// index; `reason`: the reason code, case and request id.
    #[serde(rename = "patient.erase_request")]
    PatientEraseRequest,
    /// A privacy officer listed the open erasure requests.
    #[serde(rename = "privacy.read")]
    PrivacyRead,
    /// An auditor or privacy officer asked who accessed a patient (the
    /// accounting of disclosures); the patient is named.
    #[serde(rename = "audit.disclosures")]
    AuditDisclosures,
    /// A user replaced their own password (one an admin set is one-time).
    #[serde(rename = "auth.password_change")]
    PasswordChange,
    /// A user read their own session (who they are, its timeouts, their
    /// live break-glass grants: no PHI); audited only when denied.
    #[serde(rename = "auth.session")]
    Session,
    /// An operator read the queue depths, documents by status and model
    /// versions (counts only); audited only when denied.
    #[serde(rename = "ops.overview")]
    OpsOverview,
    /// A document was purged: kept longer than its lawful basis allows
    /// (`reason` `retention:<basis>`), or its research consent was withdrawn
    /// (`consent_withdrawn`); the patient is named.
    #[serde(rename = "document.purge")]
    DocumentPurge,
    /// A privacy officer recorded a research consent's withdrawal (the
    /// consent's documents are purged, each its own `document.purge`).
    #[serde(rename = "privacy.consent_withdraw")]
    ConsentWithdraw,
    /// A patient was put in a care team, by an admin or by an ingest
    /// account's upload; resource: the team; the patient is named.
    #[serde(rename = "care_team.patient_add")]
    TeamPatientAdd,
    /// An operator re-applied an erasure of the erasure journal to a copy
    /// restored from a backup (resource: blind index; reason
    /// `journal_event:<the erasure's audit event id>`).
    #[serde(rename = "patient.erase.reapply")]
    PatientEraseReapply,
    /// An operator re-wrapped data keys under the primary key-encryption
    /// key (one event per batch: resource `data_keys`/count, reason
    /// `kek:<id>`); no document was decrypted.
    #[serde(rename = "keys.rotate")]
    KeysRotate,
    /// An operator replaced a patient's data key and re-sealed everything
    /// under it (resource: the old key; reason `replaced_by:<new key id>`).
    #[serde(rename = "keys.reencrypt")]
    KeysReencrypt,
    /// An operator moved format-1 ciphertexts (under the master key) to the
    /// patients' data keys (one event per batch: resource `documents`/count).
    #[serde(rename = "keys.migrate_v1")]
    KeysMigrateV1,
    /// An operator sealed patients' references beside their data keys (one
    /// event per batch: resource `data_keys`/count).
    #[serde(rename = "keys.seal_refs")]
    KeysSealRefs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    Failure,
    Denied,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Login => "auth.login",
            Action::Logout => "auth.logout",
            Action::DocumentUpload => "document.upload",
            Action::DocumentRead => "document.read",
            Action::DocumentProcess => "document.process",
            Action::DocumentStatus => "document.status",
            Action::DeadLettersList => "ops.dead_letters.list",
            Action::DeadLettersReplay => "ops.dead_letters.replay",
            Action::Reprocess => "ops.reprocess",
            Action::Access => "auth.access",
            Action::DenialsSuppressed => "auth.denials_suppressed",
            Action::AuditRead => "audit.read",
            Action::AuditVerify => "audit.verify",
            Action::Lockout => "auth.lockout",
            Action::BreakGlass => "auth.break_glass",
            Action::AdminRead => "admin.read",
            Action::AdminUser => "admin.user",
            Action::AdminSessionsRevoke => "admin.sessions.revoke",
            Action::AdminApiKey => "admin.api_key",
            Action::AdminTeam => "admin.team",
            Action::PatientRead => "patient.read",
            Action::ConceptRead => "concept.read",
            Action::PatientExport => "patient.export",
            Action::PatientErase => "patient.erase",
            Action::PatientEraseRequest => "patient.erase_request",
            Action::PrivacyRead => "privacy.read",
            Action::AuditDisclosures => "audit.disclosures",
            Action::PasswordChange => "auth.password_change",
            Action::Session => "auth.session",
            Action::OpsOverview => "ops.overview",
            Action::TeamPatientAdd => "care_team.patient_add",
            Action::DocumentPurge => "document.purge",
            Action::ConsentWithdraw => "privacy.consent_withdraw",
            Action::PatientEraseReapply => "patient.erase.reapply",
            Action::KeysRotate => "keys.rotate",
            Action::KeysReencrypt => "keys.reencrypt",
            Action::KeysMigrateV1 => "keys.migrate_v1",
            Action::KeysSealRefs => "keys.seal_refs",
        }
    }
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Denied => "denied",
        }
    }
}

impl AuditEvent {
    pub fn new(action: Action, actor: Actor, outcome: Outcome) -> Self {
        Self {
            event_id: Uuid::now_v7(),
            occurred_at: now_micros(),
            actor,
            source_ip: None,
            request_id: None,
            action,
            resource: None,
            outcome,
            reason: None,
            patients: Vec::new(),
        }
    }

    /// Names a patient this event disclosed, by blind index.
    pub fn patient(mut self, index: &[u8]) -> Self {
        self.patients.push(hex(index));
        self
    }

    /// Names the patients this event disclosed, by blind index.
    pub fn patients<'a>(mut self, indexes: impl IntoIterator<Item = &'a [u8]>) -> Self {
        self.patients.extend(indexes.into_iter().map(hex));
        self
    }

    /// This id rather than a fresh one (for an event whose id must be
    /// known before it is built: the erasure journal names it).
    pub fn id(mut self, id: Uuid) -> Self {
        self.event_id = id;
        self
    }

    pub fn resource(mut self, kind: &str, id: &str) -> Self {
        self.resource = Some(Resource { kind: kind.into(), id: id.into() });
        self
    }

    pub fn document(mut self, id: Uuid) -> Self {
        self.resource = Some(Resource { kind: "document".into(), id: id.to_string() });
        self
    }

    pub fn outcome(mut self, outcome: Outcome) -> Self {
        self.outcome = outcome;
        self
    }

    pub fn reason(mut self, code: &str) -> Self {
        self.reason = Some(code.to_owned());
        self
    }

    pub fn from_request(mut self, source_ip: Option<IpAddr>, request_id: Option<String>) -> Self {
        self.source_ip = source_ip;
        self.request_id = request_id;
        self
    }

    /// The bytes the audit hash chain covers. Field order is the struct's, so
    /// the encoding is stable; times are kept to the microsecond that
    /// PostgreSQL stores, so an event read back hashes the same.
    pub fn canonical_bytes(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut normalized = self.clone();
        normalized.occurred_at = truncate_to_micros(self.occurred_at);
        serde_json::to_vec(&normalized)
    }
}

impl Actor {
    pub fn service(name: &str) -> Self {
        Self { kind: ActorKind::Service, id: None, name: Some(name.to_owned()), role: None }
    }

    /// An operator running one of the services' commands (`tool`), as the
    /// OS user running it: letters, digits and `._-` only.
    pub fn operator(tool: &str) -> Self {
        let user: String = std::env::var("USER")
            .unwrap_or_default()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c))
            .take(64)
            .collect();
        Self::service(&format!("{tool}-cli:{}", if user.is_empty() { "unknown" } else { &user }))
    }

    pub fn anonymous(attempted_name: Option<&str>) -> Self {
        Self { kind: ActorKind::Anonymous, id: None, name: attempted_name.map(str::to_owned), role: None }
    }
}

/// Blind indexes as the chain stores them: 64 lowercase hex digits each (an
/// event naming anything else is refused as schema-invalid by the sink).
fn blind_indexes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let patients = Vec::<String>::deserialize(d)?;
    let valid = |p: &String| p.len() == 64 && p.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    match patients.iter().find(|p| !valid(p)) {
        Some(_) => Err(serde::de::Error::custom("patients: not a blind index (64 lowercase hex digits)")),
        None => Ok(patients),
    }
}

/// The bytes of a hex string (`None` if it is not one).
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| text.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect()
}

/// Lowercase hex, as blind indexes, hashes and signatures are written on
/// the audit trail and in its checkpoints.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

pub fn now_micros() -> OffsetDateTime {
    truncate_to_micros(OffsetDateTime::now_utc())
}

pub fn truncate_to_micros(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(t.nanosecond() / 1_000 * 1_000).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_bytes_survive_a_round_trip_through_json() {
        let event = AuditEvent::new(Action::DocumentRead, Actor::service("t"), Outcome::Success)
            .document(Uuid::now_v7())
            .reason("x");
        let json = serde_json::to_vec(&event).unwrap();
        let back: AuditEvent = serde_json::from_slice(&json).unwrap();
        assert_eq!(event.canonical_bytes().unwrap(), back.canonical_bytes().unwrap());
        assert_eq!(event.occurred_at.nanosecond() % 1_000, 0);
    }

    /// The patients an event names are part of what is signed and hashed,
    /// absent when none (so events from before them hash as they did), and
    /// only blind indexes: anything else is refused when the sink reads it.
    #[test]
    fn patients_are_blind_indexes_or_the_event_is_refused() {
        let plain = AuditEvent::new(Action::DocumentRead, Actor::service("t"), Outcome::Success);
        assert!(!String::from_utf8(plain.canonical_bytes().unwrap()).unwrap().contains("patients"));
        let index = [0xab_u8; 32];
        let named = plain.clone().patient(&index);
        assert_eq!(named.patients, vec!["ab".repeat(32)]);
        assert_ne!(named.canonical_bytes().unwrap(), plain.canonical_bytes().unwrap());
        let json = serde_json::to_value(&named).unwrap();
        assert_eq!(serde_json::from_value::<AuditEvent>(json.clone()).unwrap(), named);
        for bad in ["PAT-12345", "AB".repeat(32).as_str(), "ab", &"ab".repeat(33)] {
            let mut forged = json.clone();
            forged["patients"] = serde_json::json!([bad]);
            assert!(serde_json::from_value::<AuditEvent>(forged).is_err(), "{bad} accepted as a blind index");
        }
    }

    #[test]
    fn action_names_match_their_serde_names() {
        for a in [
            Action::Login,
            Action::Logout,
            Action::DocumentUpload,
            Action::DocumentRead,
            Action::DocumentProcess,
            Action::DocumentStatus,
            Action::DeadLettersList,
            Action::DeadLettersReplay,
            Action::Reprocess,
            Action::Access,
            Action::DenialsSuppressed,
            Action::AuditRead,
            Action::AuditVerify,
            Action::KeysRotate,
            Action::KeysReencrypt,
            Action::KeysMigrateV1,
            Action::KeysSealRefs,
            Action::PatientErase,
            Action::PatientEraseRequest,
            Action::PatientEraseReapply,
            Action::PrivacyRead,
            Action::AuditDisclosures,
            Action::PasswordChange,
            Action::Session,
            Action::OpsOverview,
            Action::TeamPatientAdd,
            Action::DocumentPurge,
            Action::ConsentWithdraw,
        ] {
            assert_eq!(serde_json::to_value(a).unwrap(), serde_json::Value::from(a.as_str()));
        }
    }
}
