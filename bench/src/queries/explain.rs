//! EXPLAIN (ANALYZE, BUFFERS) of the SQL behind the clinician query
//! endpoints, for diagnosis only. The statements are the api's own, read
//! from the compile-time query data in `.sqlx/` (so they cannot drift from
//! api/src/patients.rs and api/src/care.rs), run as the owner with a real
//! clinician, patient, and the commonest and the rarest concept. Each runs twice (a custom
//! plan, cold then warm), and once more as a generic plan, which the api's
//! prepared statements may switch to after five executions.

use std::fmt::Write as _;

use anyhow::Context as _;
use sqlx::{AssertSqlSafe, PgConnection, PgPool};
use uuid::Uuid;

/// The one statement in `.sqlx/` whose text contains `marker`.
fn api_statement(marker: &str) -> anyhow::Result<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(".sqlx").context("reading .sqlx/ (run from the repository root)")? {
        let text = std::fs::read_to_string(entry?.path())?;
        let query: serde_json::Value = serde_json::from_str(&text)?;
        if let Some(sql) = query["query"].as_str().filter(|q| q.contains(marker)) {
            found.push(sql.to_owned());
        }
    }
    anyhow::ensure!(found.len() == 1, "{} statements in .sqlx/ contain {marker:?}, not one", found.len());
    Ok(found.remove(0))
}

/// The plans as text, for `queries-explain.txt`.
pub async fn plans(
    db: &PgPool,
    clinician: Uuid,
    patient_index: &[u8],
    commonest: &str,
    rarest: &str,
) -> anyhow::Result<String> {
    let mut out = String::from(
        "EXPLAIN (ANALYZE, BUFFERS) of the SQL behind the clinician query endpoints (the api's own\n\
         statements, from .sqlx/), run as PREPARE + EXECUTE; parameters: clinician 0, a patient of\n\
         their team, the commonest and the rarest concept; first page, default limit (100: LIMIT 101).\n",
    );
    // Our own values (a uuid, hex, a CUI of letters and digits) as literals.
    let patient = format!("'\\x{}'::bytea", hex(patient_index));
    let clinician = format!("'{clinician}'::uuid");
    let (commonest, rarest) = (format!("'{commonest}'"), format!("'{rarest}'"));
    let concept_documents = api_statement("ORDER BY s.patient_index DESC, x.document_id DESC")?;
    let concept_patients = api_statement("WHERE a.documents > 0")?;
    let statements = [
        (
            "scope check (care::patient_grant), before each patient endpoint",
            api_statement(r#"AS "team!""#)?,
            format!("{clinician}, {patient}"),
        ),
        (
            "POST /v1/patients/documents",
            api_statement("SELECT id, status, document_date, created_at, result_model")?,
            format!("{patient}, NULL, NULL, NULL, NULL, 101"),
        ),
        ("POST /v1/patients/concepts", api_statement(r#"AS "pretty_name!""#)?, format!("{patient}, false")),
        (
            "GET /v1/concepts/{cui}/documents, the commonest concept",
            concept_documents.clone(),
            format!("{clinician}, {commonest}, NULL, NULL, 101"),
        ),
        (
            "GET /v1/concepts/{cui}/documents, the rarest concept",
            concept_documents,
            format!("{clinician}, {rarest}, NULL, NULL, 101"),
        ),
        (
            "GET /v1/concepts/{cui}/patients, the commonest concept",
            concept_patients.clone(),
            format!("{clinician}, {commonest}, NULL, 101"),
        ),
        (
            "GET /v1/concepts/{cui}/patients, the rarest concept",
            concept_patients,
            format!("{clinician}, {rarest}, NULL, 101"),
        ),
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
