//! JSON bodies exchanged with the API. Response types deliberately omit
//! `patient_ref` and the text: what is never parsed can never be logged.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Serialize)]
pub(crate) struct LoginRequest<'a> {
    pub username: &'a str,
    pub password: &'a str,
}

#[derive(Deserialize)]
pub(crate) struct LoginResponse {
    pub access_token: String,
}

#[derive(Serialize)]
pub(crate) struct NewDocument<'a> {
    pub patient_ref: &'a str,
    pub text: &'a str,
    pub source_ref: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub document_date: Option<String>,
}

/// The 202 answer to an upload, and the optional body of a 409.
#[derive(Deserialize)]
pub(crate) struct Accepted {
    pub id: Uuid,
}

#[derive(Deserialize)]
pub(crate) struct ErrorBody {
    pub error: ErrorFields,
}

#[derive(Deserialize)]
pub(crate) struct ErrorFields {
    pub code: String,
    #[serde(default)]
    pub message: String,
}

impl ErrorBody {
    pub fn parse(body: &[u8]) -> Option<Self> {
        serde_json::from_slice(body).ok()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DocumentStatus {
    Queued,
    Processing,
    Done,
    Failed,
    /// A status this client does not know yet: treated as still pending.
    #[serde(other)]
    Unknown,
}

impl DocumentStatus {
    pub fn is_final(self) -> bool {
        matches!(self, DocumentStatus::Done | DocumentStatus::Failed)
    }
}

/// `GET /v1/documents/{id}`, without the PHI fields.
#[derive(Debug, Deserialize)]
pub struct DocumentView {
    pub id: Uuid,
    pub status: DocumentStatus,
    #[serde(default)]
    pub model_version: Option<String>,
    #[serde(default)]
    pub annotations: Option<Vec<AnnotationView>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AnnotationView {
    pub cui: String,
    #[serde(default)]
    pub pretty_name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_document_answer_and_ignores_phi_fields() {
        let body = r#"{"id":"0190b7a2-3c4d-7e8f-9a0b-1c2d3e4f5a6b","status":"done",
            "patient_ref":"PAT-1","created_at":"2026-11-23T10:00:00Z","model_version":"m1",
            "annotations":[{"cui":"C0011849","pretty_name":"Diabetes mellitus","start":0,"end":8,
            "acc":0.99,"meta_anns":{"Presence":{"value":"True"}}}]}"#;
        let view: DocumentView = serde_json::from_str(body).unwrap();
        assert_eq!(view.status, DocumentStatus::Done);
        assert_eq!(view.annotations.unwrap()[0].cui, "C0011849");
    }

    #[test]
    fn queued_document_without_annotations_and_unknown_status() {
        let view: DocumentView = serde_json::from_str(
            r#"{"id":"0190b7a2-3c4d-7e8f-9a0b-1c2d3e4f5a6b","status":"queued","patient_ref":"P","annotations":null}"#,
        )
        .unwrap();
        assert!(view.annotations.is_none() && !view.status.is_final());
        let view: DocumentView =
            serde_json::from_str(r#"{"id":"0190b7a2-3c4d-7e8f-9a0b-1c2d3e4f5a6b","status":"retrying"}"#).unwrap();
        assert_eq!(view.status, DocumentStatus::Unknown);
    }

    #[test]
    fn upload_body_omits_a_missing_date() {
        let body = NewDocument { patient_ref: "P", text: "t", source_ref: "s", document_date: None };
        assert_eq!(serde_json::to_string(&body).unwrap(), r#"{"patient_ref":"P","text":"t","source_ref":"s"}"#);
    }
}
