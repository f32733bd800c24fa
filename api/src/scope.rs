//! Care-team scope: which patients a clinician may read (their care teams',
//! and those of a live break-glass grant), and how patients join teams.
//! Patients are held by their blind index
//! (`clinflow::documents::patient_index`), never in clear.

use std::collections::HashMap;

use axum::http::StatusCode;
use clinflow::audit::{Action, Outcome, Signer};
use clinflow::outbox;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::error::ApiError;

/// Why a clinician may read a patient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    CareTeam,
    BreakGlass(Uuid),
}

impl Grant {
    /// The audit `reason` of a read under this grant: reads under
    /// break-glass are marked with their grant.
    pub fn audit_reason(self) -> Option<String> {
        match self {
            Grant::CareTeam => None,
            Grant::BreakGlass(id) => Some(format!("break_glass:{id}")),
        }
    }
}

/// Whether `user` may read the patient with this blind index: through a care
/// team, else through a live break-glass grant.
pub async fn patient_grant(
    db: impl PgExecutor<'_>,
    user: Uuid,
    patient_index: &[u8],
) -> Result<Option<Grant>, sqlx::Error> {
    let row = sqlx::query!(
        r#"SELECT EXISTS (SELECT 1 FROM care_team_members m
                          JOIN care_team_patients p ON p.team_id = m.team_id
                          WHERE m.user_id = $1 AND p.patient_index = $2) AS "team!",
                  (SELECT id FROM break_glass_grants
                   WHERE user_id = $1 AND patient_index = $2 AND expires_at > now()
                   ORDER BY expires_at DESC LIMIT 1) AS glass"#,
        user,
        patient_index,
    )
    .fetch_one(db)
    .await?;
    Ok(if row.team { Some(Grant::CareTeam) } else { row.glass.map(Grant::BreakGlass) })
}

/// A care team an upload names: its id, and whether the uploader is bound
/// to it (an ingest account adds patients only to its own teams).
#[derive(Debug, Clone, Copy)]
pub struct UploadTeam {
    pub id: Uuid,
    pub bound: bool,
}

/// The care teams of these names, for `uploader`'s uploads.
pub async fn upload_teams(
    db: impl PgExecutor<'_>,
    uploader: Uuid,
    names: &[String],
) -> Result<HashMap<String, UploadTeam>, sqlx::Error> {
    if names.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = sqlx::query!(
        r#"SELECT t.id, t.name,
                  EXISTS (SELECT 1 FROM care_team_members m WHERE m.team_id = t.id AND m.user_id = $2) AS "bound!"
           FROM care_teams t WHERE t.name = ANY($1)"#,
        names,
        uploader
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| (r.name, UploadTeam { id: r.id, bound: r.bound })).collect())
}

/// The team's id if the uploader is bound to it, else 403
/// `care_team_not_bound`: a leaked ingest key cannot open a patient to a
/// team its account does not feed.
pub fn bound(team: &UploadTeam) -> Result<Uuid, ApiError> {
    if !team.bound {
        return Err(ApiError::BadRequest {
            status: StatusCode::FORBIDDEN,
            code: "care_team_not_bound",
            message: "this account is not bound to that care team: an admin adds it as a member of the team".into(),
        });
    }
    Ok(team.id)
}

/// The audit events of patients put in teams by `user`'s upload, for its
/// outbox: each names the team and the patient.
pub fn additions_audited(
    signer: &Signer,
    user: &AuthUser,
    added: &[(Uuid, Vec<u8>)],
) -> Result<Vec<outbox::Message>, ApiError> {
    added
        .iter()
        .map(|(team, patient)| {
            let event = user
                .event(Action::TeamPatientAdd, Outcome::Success)
                .resource("care_team", &team.to_string())
                .patient(patient)
                .reason("upload");
            outbox::Message::audit(signer, &event).map_err(|e| ApiError::Unexpected(anyhow::Error::new(e)))
        })
        .collect()
}

/// Puts patients (blind indexes) in teams; pairs already there are kept.
/// Returns the pairs that are new: each is an audited event.
pub async fn add_patients(
    conn: &mut PgConnection,
    pairs: &[(Uuid, Vec<u8>)],
) -> Result<Vec<(Uuid, Vec<u8>)>, sqlx::Error> {
    if pairs.is_empty() {
        return Ok(Vec::new());
    }
    let (teams, patients): (Vec<Uuid>, Vec<Vec<u8>>) = pairs.iter().cloned().unzip();
    let added = sqlx::query!(
        "INSERT INTO care_team_patients (team_id, patient_index)
         SELECT * FROM UNNEST($1::uuid[], $2::bytea[]) ON CONFLICT DO NOTHING
         RETURNING team_id, patient_index",
        &teams,
        &patients,
    )
    .fetch_all(conn)
    .await?;
    Ok(added.into_iter().map(|r| (r.team_id, r.patient_index)).collect())
}
