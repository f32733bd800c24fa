//! Care-team scope: which patients a clinician may read (their care teams',
//! and those of a live break-glass grant), and how patients join teams.
//! Patients are held by their blind index
//! (`clinflow::documents::patient_index`), never in clear.

use std::collections::HashMap;

use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

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

/// The ids of these care teams, by name.
pub async fn team_ids(db: impl PgExecutor<'_>, names: &[String]) -> Result<HashMap<String, Uuid>, sqlx::Error> {
    if names.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = sqlx::query!("SELECT id, name FROM care_teams WHERE name = ANY($1)", names).fetch_all(db).await?;
    Ok(rows.into_iter().map(|r| (r.name, r.id)).collect())
}

/// Puts patients (blind indexes) in teams; pairs already there are kept.
pub async fn add_patients(conn: &mut PgConnection, pairs: &[(Uuid, Vec<u8>)]) -> Result<(), sqlx::Error> {
    if pairs.is_empty() {
        return Ok(());
    }
    let (teams, patients): (Vec<Uuid>, Vec<Vec<u8>>) = pairs.iter().cloned().unzip();
    sqlx::query!(
        "INSERT INTO care_team_patients (team_id, patient_index)
         SELECT * FROM UNNEST($1::uuid[], $2::bytea[]) ON CONFLICT DO NOTHING",
        &teams,
        &patients,
    )
    .execute(conn)
    .await?;
    Ok(())
}
