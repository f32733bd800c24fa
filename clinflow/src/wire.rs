//! The JSON bodies of the HTTP API, defined once: the api serializes and
//! parses these, and clinflow-ingest uses the same types, so client and server
//! cannot drift apart.
//!
//! Types that hold PHI (`UploadRequest`) print it as `<redacted>` in `{:?}`;
//! answers the api gives about uploads (`BatchResponse`, `DocumentStatus`)
//! never hold any.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

pub const LOGIN_PATH: &str = "/v1/auth/login";
pub const DOCUMENTS_PATH: &str = "/v1/documents";
pub const BATCH_PATH: &str = "/v1/documents/batch";
pub const STATUSES_PATH: &str = "/v1/documents/status";
/// Most ids one `POST /v1/documents/status` may ask about.
pub const MAX_STATUS_IDS: usize = 1_000;

/// Batch line outcomes that mean "not read: send this line again in another
/// batch", as opposed to a line that is wrong in itself.
pub const RESEND_CODES: &[&str] = &["too_many_lines", "batch_too_large"];

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub username: String,
    #[cfg_attr(feature = "openapi", schema(format = Password))]
    pub password: String,
}

impl fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginRequest").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Serialize, Deserialize)]
pub struct LoginResponse {
    pub access_token: String,
    pub token_type: Cow<'static, str>,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// The password was set by an admin and is one-time: until it is
    /// replaced (`POST /v1/auth/password`), every other call is refused with
    /// 403 `password_change_required`.
    #[serde(default)]
    pub password_change_required: bool,
}

/// One document to upload: the body of `POST /v1/documents` and one line of
/// `POST /v1/documents/batch`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadRequest {
    pub patient_ref: String,
    pub text: String,
    /// The uploader's own name for the note; unique per uploading account, so
    /// sending it again answers `duplicate` with the first document's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ref: Option<String>,
    /// `YYYY-MM-DD`. A string so that a bad value gets a clear message from the
    /// api without its value being echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(format = Date))]
    pub document_date: Option<String>,
    /// The care team (by name) whose clinicians may read this patient; the
    /// patient is added to it. Only ingest accounts may name one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub care_team: Option<String>,
}

// By hand so that `{:?}` can never put PHI in a log line.
impl fmt::Debug for UploadRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UploadRequest")
            .field("patient_ref", &"<redacted>")
            .field("text_bytes", &self.text.len())
            .field("source_ref", &self.source_ref.as_ref().map(|_| "<redacted>"))
            .field("document_date", &self.document_date.as_ref().map(|_| "<redacted>"))
            .field("care_team", &self.care_team)
            .finish()
    }
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    Processing,
    Done,
    Failed,
}

impl Status {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "queued" => Some(Self::Queued),
            "processing" => Some(Self::Processing),
            "done" => Some(Self::Done),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Processing => "processing",
            Self::Done => "done",
            Self::Failed => "failed",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, Self::Done | Self::Failed)
    }
}

/// The 202 answer to a single upload.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Serialize, Deserialize)]
pub struct UploadResponse {
    pub id: Uuid,
    pub status: Status,
}

/// What happened to one line of a batch (lines are numbered from 1, blank
/// lines included).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum LineOutcome {
    Accepted {
        line: usize,
        id: Uuid,
    },
    /// The caller already uploaded this `source_ref`: `id` is that document.
    Duplicate {
        line: usize,
        id: Uuid,
    },
    /// `message` names fields and limits, never the line's content.
    Rejected {
        line: usize,
        code: Cow<'static, str>,
        message: String,
    },
}

impl LineOutcome {
    pub fn line(&self) -> usize {
        match self {
            Self::Accepted { line, .. } | Self::Duplicate { line, .. } | Self::Rejected { line, .. } => *line,
        }
    }
}

/// The answer to `POST /v1/documents/batch`: one outcome per non-blank line,
/// in line order, and their counts.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct BatchResponse {
    pub accepted: usize,
    pub duplicate: usize,
    pub rejected: usize,
    pub outcomes: Vec<LineOutcome>,
}

impl BatchResponse {
    pub fn push(&mut self, outcome: LineOutcome) {
        match outcome {
            LineOutcome::Accepted { .. } => self.accepted += 1,
            LineOutcome::Duplicate { .. } => self.duplicate += 1,
            LineOutcome::Rejected { .. } => self.rejected += 1,
        }
        self.outcomes.push(outcome);
    }
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusRequest {
    pub ids: Vec<Uuid>,
}

/// Where a document is, without anything of its content: reading it is not
/// a PHI read.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DocumentStatus {
    pub id: Uuid,
    pub status: Status,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// Why a `failed` document failed (a code such as `nlp_error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_code: Option<String>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct StatusesResponse {
    pub documents: Vec<DocumentStatus>,
    /// Ids that do not exist, or that the caller may not see.
    pub missing: Vec<Uuid>,
}

/// Every error answer: `{"error": {"code", "message"}}`; a 409 for a
/// `source_ref` the caller already uploaded also names that document.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
    /// Only with 409 `duplicate_source_ref`: the caller's own document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// A stable machine-readable code, such as `not_found` or `invalid_body`.
    pub code: Cow<'static, str>,
    /// For people; never quotes the request.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upload_without_optional_fields_serializes_without_them() {
        let body = UploadRequest {
            patient_ref: "P".into(),
            text: "t".into(),
            source_ref: None,
            document_date: None,
            care_team: None,
        };
        assert_eq!(serde_json::to_string(&body).unwrap(), r#"{"patient_ref":"P","text":"t"}"#);
    }

    #[test]
    fn debug_output_of_an_upload_redacts_phi() {
        let body = UploadRequest {
            patient_ref: "PAT-SECRET".into(),
            text: "the patient has a secret".into(),
            source_ref: Some("smith_john.txt".into()),
            document_date: Some("2026-01-02".into()),
            care_team: None,
        };
        let shown = format!("{body:?}");
        for phi in ["SECRET", "secret", "smith", "2026"] {
            assert!(!shown.contains(phi), "{shown}");
        }
        let login = LoginRequest { username: "u".into(), password: "hunter2".into() };
        assert!(!format!("{login:?}").contains("hunter2"));
    }

    #[test]
    fn batch_outcomes_round_trip() {
        let id = Uuid::now_v7();
        let mut response = BatchResponse::default();
        response.push(LineOutcome::Accepted { line: 1, id });
        response.push(LineOutcome::Duplicate { line: 2, id });
        response.push(LineOutcome::Rejected {
            line: 4,
            code: "empty_text".into(),
            message: "text must not be empty".into(),
        });
        let json = serde_json::to_string(&response).unwrap();
        assert!(json.contains(r#"{"outcome":"rejected","line":4,"code":"empty_text""#), "{json}");
        let back: BatchResponse = serde_json::from_str(&json).unwrap();
        assert_eq!((back.accepted, back.duplicate, back.rejected), (1, 1, 1));
        assert_eq!(back.outcomes, response.outcomes);
        assert_eq!(back.outcomes[2].line(), 4);
    }

    #[test]
    fn status_names_round_trip() {
        for s in [Status::Queued, Status::Processing, Status::Done, Status::Failed] {
            assert_eq!(Status::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{}\"", s.as_str()));
        }
        assert!(Status::Done.is_final() && !Status::Processing.is_final());
    }
}
