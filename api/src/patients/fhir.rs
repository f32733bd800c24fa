//! A patient's export as a FHIR R4 Bundle (GDPR Art. 15 and 20): the notes
//! and the concepts coded in them.

use axum::Json;
use axum::extract::State;
use clinflow::annotation::Annotation;
use clinflow::audit::{Action, Outcome};
use clinflow::documents;
use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Patient, in_scope};
use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::scope::Grant;
use crate::state::AppState;
use crate::users::Role;
use crate::validate::{case_ref, reason_code};

const SNOMED: &str = "http://snomed.info/sct";
const SPAN_EXTENSION: &str = "https://clinflow.dev/fhir/StructureDefinition/evidence-span";

/// The FHIR resource a concept becomes, by its semantic type.
fn resource_kind(type_ids: &[String]) -> &'static str {
    let has = |t: &str| type_ids.iter().any(|x| x == t);
    if has("T121") || has("T200") || has("T195") {
        "MedicationStatement"
    } else if has("T060") || has("T061") || has("T059") {
        "Procedure"
    } else if has("T047") || has("T046") || has("T048") || has("T191") || has("T019") {
        "Condition"
    } else {
        "Observation"
    }
}

/// One coded resource for the concept `cui` in one document, with every
/// mention as an evidence span.
fn concept_resource(patient: &str, doc: Uuid, mentions: &[&Annotation], recorded: &str) -> Value {
    let first = mentions[0];
    let negated = mentions.iter().all(|a| clinflow::concepts::is_negated(a));
    let code = json!({"coding": [{"system": SNOMED, "code": first.cui, "display": first.pretty_name}], "text": first.pretty_name});
    let spans: Vec<Value> = mentions
        .iter()
        .map(|a| {
            json!({"url": SPAN_EXTENSION, "extension": [
                {"url": "document", "valueReference": {"reference": format!("urn:uuid:{doc}")}},
                {"url": "start", "valueInteger": a.start},
                {"url": "end", "valueInteger": a.end},
            ]})
        })
        .collect();
    let id = Uuid::new_v5(&doc, first.cui.as_bytes());
    let subject = json!({"reference": format!("urn:uuid:{patient}")});
    let source = json!({"reference": format!("urn:uuid:{doc}")});
    let mut resource = match resource_kind(&first.type_ids) {
        "Condition" => json!({
            "resourceType": "Condition",
            "verificationStatus": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                "code": if negated { "refuted" } else { "unconfirmed" },
            }]},
            "code": code, "subject": subject, "recordedDate": recorded,
            "evidence": [{"detail": [source]}],
        }),
        "MedicationStatement" => json!({
            "resourceType": "MedicationStatement",
            "status": if negated { "not-taken" } else { "unknown" },
            "medicationCodeableConcept": code, "subject": subject, "dateAsserted": recorded,
            "derivedFrom": [source],
        }),
        "Procedure" => json!({
            "resourceType": "Procedure",
            "status": if negated { "not-done" } else { "unknown" },
            "code": code, "subject": subject, "reasonReference": [],
        }),
        _ => json!({
            "resourceType": "Observation",
            "status": "preliminary",
            "code": code, "subject": subject, "issued": recorded,
            "derivedFrom": [source],
        }),
    };
    if let Some(obj) = resource.as_object_mut() {
        obj.retain(|_, v| !v.as_array().is_some_and(Vec::is_empty));
        obj.insert("id".into(), json!(id));
        obj.insert("extension".into(), Value::Array(spans));
    }
    json!({"fullUrl": format!("urn:uuid:{id}"), "resource": resource})
}

/// Whose export, and (for a privacy officer) why.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    /// The patient reference, as uploaded
    #[schema(schema_with = crate::validate::schema::patient_ref)]
    patient_ref: String,
    /// A privacy officer's reason, as a code (`gdpr_access_request`, …);
    /// required of them, optional for a clinician.
    #[schema(schema_with = reason)]
    reason: Option<String>,
    /// A privacy officer's case reference (`DSAR-2026-0042`); required of
    /// them. Names the case, never the patient.
    #[schema(schema_with = case)]
    case_ref: Option<String>,
}

fn reason() -> utoipa::openapi::schema::Object {
    crate::validate::schema::reason_code(true)
}

fn case() -> utoipa::openapi::schema::Object {
    crate::validate::schema::case_ref(true)
}

/// `POST /v1/patients/export`: everything held on the patient as a FHIR R4
/// `collection` Bundle: the Patient, a DocumentReference per note (its text
/// as an attachment), and for each concept of each current result a
/// Condition, MedicationStatement, Procedure or Observation coded in SNOMED
/// CT, with its evidence spans. 404 when nothing is held.
///
/// A clinician exports a patient in their scope; a privacy officer any
/// patient (GDPR Art. 15 and 20), with a reason code and the case's
/// reference. Every export raises an alert (`ClinflowPatientExported`).
#[utoipa::path(post, path = "/v1/patients/export", tag = "patients",
    request_body = ExportRequest,
    responses((status = 200, description = "A FHIR R4 Bundle (type collection)", body = Object)),
    extensions(("x-errors" = json!([
        "out_of_scope", "not_found: nothing is held on this patient", "invalid_patient_ref",
        "invalid_reason: a privacy officer's reason is missing or not a code",
        "invalid_case_ref: a privacy officer's case_ref is missing or malformed",
    ]))))]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn export(
    State(state): State<AppState>,
    user: AuthUser,
    JsonBody(req): JsonBody<ExportRequest>,
) -> Result<Json<Value>, ApiError> {
    let patient = Patient::parse(&state, &req.patient_ref)?;
    let mut why = Vec::new();
    let grant = match user.role {
        Role::PrivacyOfficer => {
            // Well formed without them (a clinician's export needs neither),
            // but a privacy officer exports only for a case.
            let (Some(reason), Some(case)) = (req.reason.as_deref(), req.case_ref.as_deref()) else {
                return Err(ApiError::BadRequest {
                    status: axum::http::StatusCode::FORBIDDEN,
                    code: "case_required",
                    message: "a privacy officer's export names its reason and case_ref".into(),
                });
            };
            why.push(reason_code("reason", reason)?);
            why.push(format!("case:{}", case_ref(case)?));
            None
        }
        _ => {
            if let Some(reason) = req.reason.as_deref() {
                why.push(reason_code("reason", reason)?);
            }
            if let Some(case) = req.case_ref.as_deref() {
                why.push(format!("case:{}", case_ref(case)?));
            }
            Some(in_scope(&state, &user, &patient, Action::PatientExport).await?)
        }
    };
    let docs = sqlx::query!(
        r#"SELECT d.id, d.status, t.text_ct AS "text_ct!", d.document_date, d.created_at, r.model_version AS "model_version?",
                  r.annotations_ct AS "annotations_ct?"
           FROM documents d
           JOIN document_texts t ON t.document_id = d.id
           LEFT JOIN document_results r ON r.document_id = d.id AND r.model_version = d.result_model
           WHERE d.patient_index = $1 ORDER BY d.id"#,
        patient.index,
    )
    .fetch_all(&state.db)
    .await?;
    if docs.is_empty() {
        let event = user.event(Action::PatientExport, Outcome::Failure).resource("patient", &patient.audit_id());
        state.audit(&event.patient(&patient.index).reason("not_found")).await?;
        return Err(ApiError::NotFound);
    }
    let patient_id = Uuid::new_v5(&Uuid::NAMESPACE_OID, &patient.index);
    let mut entries = vec![json!({
        "fullUrl": format!("urn:uuid:{patient_id}"),
        "resource": {
            "resourceType": "Patient",
            "id": patient_id,
            "identifier": [{"system": "urn:clinflow:patient-ref", "value": patient.reference}],
        },
    })];
    let rfc3339 = |t: OffsetDateTime| t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
    let mut sealed: Vec<&[u8]> = docs.iter().map(|d| d.text_ct.as_slice()).collect();
    sealed.extend(docs.iter().filter_map(|d| d.annotations_ct.as_deref()));
    let opener = state.keys.opener(&state.db, sealed).await?;
    let mut concepts = 0;
    for d in &docs {
        let text = opener.open(documents::text_field(d.id), &d.text_ct).map_err(anyhow::Error::new)?;
        let created = rfc3339(d.created_at);
        let mut attachment = json!({"contentType": "text/plain; charset=utf-8", "data": base64_encode(&text)});
        if let Some(date) = d.document_date {
            attachment["creation"] = json!(format!("{date}T00:00:00Z"));
        }
        entries.push(json!({
            "fullUrl": format!("urn:uuid:{}", d.id),
            "resource": {
                "resourceType": "DocumentReference",
                "id": d.id,
                "status": "current",
                "docStatus": if d.status == "done" { "final" } else { "preliminary" },
                "subject": {"reference": format!("urn:uuid:{patient_id}")},
                "date": created,
                "content": [{"attachment": attachment}],
            },
        }));
        let Some(sealed) = &d.annotations_ct else { continue };
        let plain = opener.open(documents::annotations_field(d.id), sealed).map_err(anyhow::Error::new)?;
        let annotations: Vec<Annotation> = serde_json::from_slice(&plain).map_err(anyhow::Error::new)?;
        let mut by_cui: std::collections::BTreeMap<&str, Vec<&Annotation>> = Default::default();
        for a in &annotations {
            by_cui.entry(a.cui.as_str()).or_default().push(a);
        }
        for mentions in by_cui.values() {
            entries.push(concept_resource(&patient_id.to_string(), d.id, mentions, &created));
            concepts += 1;
        }
    }
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": rfc3339(OffsetDateTime::now_utc()),
        "entry": entries,
    });
    why.push(format!("documents:{} concepts:{concepts}", docs.len()));
    why.extend(grant.and_then(Grant::audit_reason));
    let event = user.event(Action::PatientExport, Outcome::Success).resource("patient", &patient.audit_id());
    state.audit(&event.patient(&patient.index).reason(&why.join(" "))).await?;
    crate::telemetry::privacy_event("export");
    Ok(Json(bundle))
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semantic_types_choose_the_resource() {
        let t = |s: &str| vec![s.to_owned()];
        assert_eq!(resource_kind(&t("T047")), "Condition");
        assert_eq!(resource_kind(&t("T121")), "MedicationStatement");
        assert_eq!(resource_kind(&t("T060")), "Procedure");
        assert_eq!(resource_kind(&t("T184")), "Observation");
        assert_eq!(resource_kind(&[]), "Observation");
    }
}
