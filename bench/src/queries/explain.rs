//! EXPLAIN (ANALYZE, BUFFERS) of the SQL behind the three target endpoints,
//! for diagnosis only: the statements are copies of api/src/patients.rs
//! (and the scope check of api/src/care.rs) at the time of writing, run as
//! the owner with a real clinician, patient and the commonest concept. Each
//! runs twice (a custom plan, cold then warm), and once more as a generic
//! plan, which the api's prepared statements may switch to after five
//! executions.

use std::fmt::Write as _;

use sqlx::{AssertSqlSafe, PgConnection, PgPool};
use uuid::Uuid;

const SCOPE_CHECK: &str = r#"SELECT EXISTS (SELECT 1 FROM care_team_members m
                          JOIN care_team_patients p ON p.team_id = m.team_id
                          WHERE m.user_id = $1 AND p.patient_index = $2) AS "team!",
                  (SELECT id FROM break_glass_grants
                   WHERE user_id = $1 AND patient_index = $2 AND expires_at > now()
                   ORDER BY expires_at DESC LIMIT 1) AS glass"#;

const PATIENT_DOCUMENTS: &str = r#"SELECT id, status, document_date, created_at, result_model
           FROM documents
           WHERE patient_index = $1
             AND ($2::uuid IS NULL OR id < $2)
             AND ($3::date IS NULL OR coalesce(document_date, created_at::date) >= $3)
             AND ($4::date IS NULL OR coalesce(document_date, created_at::date) <= $4)
             AND ($5::text IS NULL OR status = $5)
           ORDER BY id DESC LIMIT $6"#;

const PATIENT_CONCEPTS: &str = r#"SELECT dc.cui, coalesce(n.pretty_name, dc.cui) AS "pretty_name!",
                  count(*) AS "documents!",
                  sum(CASE WHEN $2 THEN dc.mentions ELSE dc.mentions - dc.negated END)::int8 AS "mentions!",
                  min(coalesce(d.document_date, d.created_at::date)) AS first_date,
                  max(coalesce(d.document_date, d.created_at::date)) AS last_date
           FROM document_concepts dc
           JOIN documents d ON d.id = dc.document_id AND d.result_model = dc.model_version
           LEFT JOIN concept_names n ON n.cui = dc.cui
           WHERE dc.patient_index = $1 AND ($2 OR dc.mentions > dc.negated)
           GROUP BY dc.cui, n.pretty_name
           ORDER BY count(*) DESC, dc.cui"#;

const CONCEPT_DOCUMENTS: &str = r#"WITH scope AS (
               SELECT p.patient_index FROM care_team_members m
               JOIN care_team_patients p ON p.team_id = m.team_id WHERE m.user_id = $1
               UNION
               SELECT patient_index FROM break_glass_grants WHERE user_id = $1 AND expires_at > now()
           )
           SELECT d.id, d.patient_ref_ct, d.document_date, d.created_at, dc.mentions, dc.negated, dc.first_offset
           FROM document_concepts dc
           JOIN documents d ON d.id = dc.document_id AND d.result_model = dc.model_version
           WHERE dc.cui = $2 AND dc.patient_index IN (SELECT patient_index FROM scope)
             AND ($3::uuid IS NULL OR dc.document_id < $3)
           ORDER BY dc.document_id DESC LIMIT $4"#;

/// The plans as text, for `queries-explain.txt`.
pub async fn plans(db: &PgPool, clinician: Uuid, patient_index: &[u8], cui: &str) -> anyhow::Result<String> {
    let mut out = String::from(
        "EXPLAIN (ANALYZE, BUFFERS) of the SQL behind the clinician query endpoints, copied from\n\
         api/src/patients.rs and api/src/care.rs, run as PREPARE + EXECUTE; parameters: clinician 0,\n\
         a patient of their team, the commonest concept; first page, default limit (100: LIMIT 101).\n",
    );
    // Our own values (a uuid, hex, a CUI of letters and digits) as literals.
    let patient = format!("'\\x{}'::bytea", hex(patient_index));
    let statements = [
        (
            "scope check (care::patient_grant), before each patient endpoint",
            SCOPE_CHECK,
            format!("'{clinician}'::uuid, {patient}"),
        ),
        (
            "GET /v1/patients/{patient_ref}/documents",
            PATIENT_DOCUMENTS,
            format!("{patient}, NULL, NULL, NULL, NULL, 101"),
        ),
        ("GET /v1/patients/{patient_ref}/concepts", PATIENT_CONCEPTS, format!("{patient}, false")),
        ("GET /v1/concepts/{cui}/documents", CONCEPT_DOCUMENTS, format!("'{clinician}'::uuid, '{cui}', NULL, 101")),
    ];
    let mut conn = db.acquire().await?;
    for (run, mode) in [("first run", "auto"), ("second run", "auto"), ("generic plan", "force_generic_plan")] {
        execute(&mut conn, &format!("SET plan_cache_mode = {mode}")).await?;
        for (endpoint, sql, args) in &statements {
            execute(&mut conn, &format!("PREPARE bench_explain AS {sql}")).await?;
            let explain = format!("EXPLAIN (ANALYZE, BUFFERS) EXECUTE bench_explain({args})");
            let lines: Vec<String> = sqlx::query_scalar(AssertSqlSafe(explain)).fetch_all(&mut *conn).await?;
            execute(&mut conn, "DEALLOCATE bench_explain").await?;
            let _ = writeln!(out, "\n== {endpoint} ({run})");
            for line in lines {
                let _ = writeln!(out, "{line}");
            }
        }
    }
    execute(&mut conn, "RESET plan_cache_mode").await?;
    Ok(out)
}

async fn execute(conn: &mut PgConnection, sql: &str) -> anyhow::Result<()> {
    sqlx::query(AssertSqlSafe(sql.to_owned())).execute(conn).await?;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
