//! Privacy by design (issue 34) against the real stack: one-time passwords,
//! break-glass limits, care-team additions bound and audited, and the
//! accounting of disclosures.

use std::collections::BTreeMap;
use std::time::Duration;

use clinflow_api::auth::LockoutPolicy;
use clinflow_api::users::Role;
use serde_json::{Value, json};

use crate::common::{AccessOptions, PASSWORD, Stack, wait_for_all_done, wait_until};

fn code(body: &Value) -> Option<&str> {
    body["error"]["code"].as_str()
}

/// `POST /v1/documents/batch` of these uploads, one a line: the answer.
async fn upload_batch(stack: &Stack, token: &str, lines: &[Value]) -> Value {
    let (status, answer) = stack.batch(token, lines.iter().map(|l| format!("{l}\n")).collect()).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

fn blind_index(patient: &str) -> String {
    clinflow::documents::patient_index(&clinflow::testing::index_key(), patient)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn a_password_an_admin_sets_must_be_replaced_before_anything_else() {
    let stack = Stack::start().await;
    stack.user("admin", Role::Admin).await;
    let admin = stack.login("admin").await;
    let one_time = "set by the admin, one time";
    let (status, created) = stack
        .post("/v1/admin/users", Some(&admin), &json!({"username": "nurse", "role": "clinician", "password": one_time}))
        .await;
    assert_eq!(status, 201, "{created}");
    let nurse_id = created["id"].as_str().unwrap().to_owned();
    let login = async |password: &str| {
        stack.post("/v1/auth/login", None, &json!({"username": "nurse", "password": password})).await
    };

    let (status, session) = login(one_time).await;
    assert_eq!((status, session["password_change_required"].as_bool()), (200, Some(true)), "{session}");
    let token = session["access_token"].as_str().unwrap().to_owned();
    let (status, refused) = stack.post("/v1/patients/documents", Some(&token), &json!({"patient_ref": "P1"})).await;
    assert_eq!((status, code(&refused)), (403, Some("password_change_required")), "{refused}");
    assert_eq!(
        code(&stack.get("/v1/concepts/49436004/patients", Some(&token)).await.1),
        Some("password_change_required")
    );
    // The console's read of its own session is open: it is how the page
    // learns to ask for the new password first.
    let (status, own) = stack.get("/v1/auth/session", Some(&token)).await;
    assert_eq!((status, own["password_change_required"].as_bool()), (200, Some(true)), "{own}");

    let change = async |token: &str, current: &str, new: &str| {
        let body = json!({"current_password": current, "new_password": new});
        stack.post("/v1/auth/password", Some(token), &body).await
    };
    let (status, refused) = change(&token, "not the password", "my own long password").await;
    assert_eq!((status, code(&refused)), (403, Some("wrong_password")));
    assert_eq!(code(&change(&token, one_time, "short").await.1), Some("weak_password"));
    assert_eq!(code(&change(&token, one_time, one_time).await.1), Some("same_password"));
    // A second session of the one-time password ends with the change.
    let other = login(one_time).await.1["access_token"].as_str().unwrap().to_owned();
    assert_eq!(change(&token, one_time, "my own long password").await.0, 204);
    assert_eq!(stack.post("/v1/patients/documents", Some(&token), &json!({"patient_ref": "P1"})).await.0, 403);
    let (status, body) = stack.post("/v1/patients/documents", Some(&token), &json!({"patient_ref": "P1"})).await;
    assert_eq!((status, code(&body)), (403, Some("out_of_scope")), "the guard lets the call through now");
    assert_eq!(stack.get("/v1/concepts/49436004/patients", Some(&other)).await.0, 401, "other session ended");
    assert_eq!(login(one_time).await.0, 401);
    let (status, session) = login("my own long password").await;
    assert_eq!((status, session["password_change_required"].as_bool()), (200, Some(false)));

    // An admin's reset is one-time again.
    let reset = format!("/v1/admin/users/{nurse_id}/password");
    assert_eq!(stack.post(&reset, Some(&admin), &json!({"password": "another admin password"})).await.0, 204);
    let (_, session) = login("another admin password").await;
    assert_eq!(session["password_change_required"].as_bool(), Some(true));
    let token = session["access_token"].as_str().unwrap();
    assert_eq!(stack.get("/v1/concepts/49436004/patients", Some(token)).await.0, 403);
    // Logout is allowed before the change.
    assert_eq!(stack.post("/v1/auth/logout", Some(token), &json!({})).await.0, 204);

    wait_until("refusals and the change audited", Duration::from_secs(30), async || {
        let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
            "SELECT action, outcome, reason FROM audit_events WHERE action IN ('auth.password_change', 'patient.read', 'concept.read')",
        )
        .fetch_all(&stack.db.owner)
        .await
        .unwrap();
        let count = |action: &str, outcome: &str, reason: Option<&str>| {
            rows.iter().filter(|r| r.0 == action && r.1 == outcome && r.2.as_deref() == reason).count()
        };
        count("auth.password_change", "success", None) == 1
            && count("auth.password_change", "denied", Some("wrong_password")) == 1
            && count("patient.read", "denied", Some("password_change_required")) == 1
            && count("concept.read", "denied", Some("password_change_required")) == 2
    })
    .await;
    stack.stop().await;
}

#[tokio::test]
async fn break_glass_guesses_lock_the_account_and_grants_are_capped_per_day() {
    let lockout = LockoutPolicy { threshold: 3, ..LockoutPolicy::default() };
    let stack =
        Stack::start_with_access(AccessOptions { lockout, break_glass_per_day: 2, ..AccessOptions::default() }).await;
    stack.user("doctor", Role::Clinician).await;
    stack.user("careful", Role::Clinician).await;
    let glass = |patient: &str, password: &str| json!({"patient_ref": patient, "reason": "unconscious in ED, no team on call", "password": password});

    // Three wrong passwords at break-glass lock the account: the right one
    // no longer logs in, nor breaks the glass.
    let doctor = stack.login("doctor").await;
    for _ in 0..3 {
        let (status, body) = stack.post("/v1/break-glass", Some(&doctor), &glass("PAT-1", "a wrong guess!")).await;
        assert_eq!((status, code(&body)), (403, Some("wrong_password")));
    }
    let (status, _) = stack.post("/v1/auth/login", None, &json!({"username": "doctor", "password": PASSWORD})).await;
    assert_eq!(status, 401, "locked by break-glass guesses");
    let (status, body) = stack.post("/v1/break-glass", Some(&doctor), &glass("PAT-1", PASSWORD)).await;
    assert_eq!((status, code(&body)), (403, Some("wrong_password")), "a locked account breaks no glass");

    // Grants per clinician and day are capped.
    let careful = stack.login("careful").await;
    for patient in ["PAT-1", "PAT-2"] {
        assert_eq!(stack.post("/v1/break-glass", Some(&careful), &glass(patient, PASSWORD)).await.0, 201);
    }
    let (status, body) = stack.post("/v1/break-glass", Some(&careful), &glass("PAT-3", PASSWORD)).await;
    assert_eq!((status, code(&body)), (429, Some("break_glass_limit")), "{body}");
    // A day later the count starts again.
    sqlx::query("UPDATE break_glass_grants SET granted_at = granted_at - interval '25 hours'")
        .execute(&stack.db.owner)
        .await
        .unwrap();
    assert_eq!(stack.post("/v1/break-glass", Some(&careful), &glass("PAT-3", PASSWORD)).await.0, 201);

    wait_until("lockout and limit audited", Duration::from_secs(30), async || {
        let rows: Vec<(String, String, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT action, outcome, reason, patients[1] FROM audit_events
             WHERE action IN ('auth.break_glass', 'auth.lockout')",
        )
        .fetch_all(&stack.db.owner)
        .await
        .unwrap();
        let count = |action: &str, reason: Option<&str>| {
            rows.iter().filter(|r| r.0 == action && r.2.as_deref() == reason).count()
        };
        count("auth.lockout", None) == 1
            && count("auth.break_glass", Some("daily_limit")) == 1
            // Every refused attempt names the patient it was for.
            && rows
                .iter()
                .filter(|r| r.0 == "auth.break_glass" && r.1 == "denied")
                .all(|r| r.3 == Some(blind_index("PAT-1")) || r.3 == Some(blind_index("PAT-3")))
            && count("auth.break_glass", Some("locked")) == 2
            && count("auth.break_glass", Some("wrong_password")) == 2
    })
    .await;
    stack.stop().await;
}

#[tokio::test]
async fn an_ingest_account_adds_patients_only_to_its_own_teams_and_each_addition_is_audited() {
    let stack = Stack::start().await;
    stack.user("admin", Role::Admin).await;
    let loader_id = stack.user("loader", Role::Ingest).await;
    let (admin, loader) = (stack.login("admin").await, stack.login("loader").await);
    let mut teams = BTreeMap::new();
    for name in ["mine", "theirs"] {
        let (_, team) = stack.post("/v1/admin/teams", Some(&admin), &json!({"name": name})).await;
        teams.insert(name, team["id"].as_str().unwrap().to_owned());
    }
    let bind = format!("/v1/admin/teams/{}/members/{loader_id}", teams["mine"]);
    assert_eq!(stack.call("PUT", &bind, Some(&admin), None).await.0, 204);
    let upload = |patient: &str, team: &str| json!({"patient_ref": patient, "text": "Known AF.", "care_team": team});

    // Single uploads: its own team yes, another no.
    let (status, body) = stack.post("/v1/documents", Some(&loader), &upload("PAT-T1", "theirs")).await;
    assert_eq!((status, code(&body)), (403, Some("care_team_not_bound")));
    let (status, first) = stack.post("/v1/documents", Some(&loader), &upload("PAT-T1", "mine")).await;
    assert_eq!(status, 202, "{first}");
    let (status, again) = stack.post("/v1/documents", Some(&loader), &upload("PAT-T1", "mine")).await;
    assert_eq!(status, 202, "{again}");
    // A batch: the line naming the other team is refused, alone.
    let batch = upload_batch(&stack, &loader, &[upload("PAT-T2", "theirs"), upload("PAT-T3", "mine")]).await;
    assert_eq!((batch["accepted"].as_i64(), batch["rejected"].as_i64()), (Some(1), Some(1)), "{batch}");
    assert_eq!(batch["outcomes"][0]["code"], "care_team_not_bound", "{batch}");
    // The admin adds one by reference.
    let add = format!("/v1/admin/teams/{}/patients", teams["theirs"]);
    assert_eq!(stack.post(&add, Some(&admin), &json!({"patient_ref": "PAT-T4"})).await.0, 204);

    // Who is in which team is exactly what the trail says was added.
    let expected: Vec<(String, String, String)> = vec![
        (teams["mine"].clone(), blind_index("PAT-T1"), "loader".into()),
        (teams["mine"].clone(), blind_index("PAT-T3"), "loader".into()),
        (teams["theirs"].clone(), blind_index("PAT-T4"), "admin".into()),
    ];
    let mut expected_sorted = expected.clone();
    expected_sorted.sort();
    wait_until("team additions audited", Duration::from_secs(30), async || {
        let mut rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT resource_id, patients[1], actor_name FROM audit_events
             WHERE action = 'care_team.patient_add' AND resource_kind = 'care_team' AND cardinality(patients) = 1",
        )
        .fetch_all(&stack.db.owner)
        .await
        .unwrap();
        rows.sort();
        rows == expected_sorted
    })
    .await;
    let mut held: Vec<(String, String)> =
        sqlx::query_as("SELECT team_id::text, encode(patient_index, 'hex') FROM care_team_patients")
            .fetch_all(&stack.db.owner)
            .await
            .unwrap();
    held.sort();
    let mut added: Vec<(String, String)> = expected.into_iter().map(|(t, p, _)| (t, p)).collect();
    added.sort();
    assert_eq!(held, added);
    stack.stop().await;
}

/// The accesses the disclosures lookup lists for `patient`, as (action,
/// outcome, actor, break-glass grant?), oldest first; every page walked.
async fn disclosures(stack: &Stack, token: &str, patient: &str) -> Vec<(String, String, String, bool)> {
    let mut all = Vec::new();
    let mut query = json!({"patient_ref": patient, "limit": 2});
    loop {
        let (status, page) = stack.post("/v1/audit/disclosures", Some(token), &query).await;
        assert_eq!(status, 200, "{page}");
        for d in page["disclosures"].as_array().unwrap() {
            all.push((
                d["action"].as_str().unwrap().to_owned(),
                d["outcome"].as_str().unwrap().to_owned(),
                d["actor_name"].as_str().unwrap_or_default().to_owned(),
                d.get("break_glass_grant").is_some(),
            ));
        }
        let Some(next) = page["next_cursor"].as_i64() else { break };
        query["after"] = json!(next);
    }
    all.reverse();
    all
}

#[tokio::test]
async fn the_accounting_of_disclosures_lists_exactly_who_accessed_a_patient() {
    let stack = Stack::start().await;
    let loader_id = stack.user("loader", Role::Ingest).await;
    stack.user("doctor", Role::Clinician).await;
    stack.user("locum", Role::Clinician).await;
    stack.user("auditor", Role::Auditor).await;
    stack.user("privacy", Role::PrivacyOfficer).await;
    stack.care_team("doctor", &[]).await;
    sqlx::query("INSERT INTO care_team_members (team_id, user_id) SELECT id, $1 FROM care_teams")
        .bind(loader_id)
        .execute(&stack.db.owner)
        .await
        .unwrap();
    let loader = stack.login("loader").await;
    let mut ids = Vec::new();
    for (patient, text) in [("PAT-D", "Known atrial fibrillation."), ("PAT-E", "Atrial fibrillation, new.")] {
        let doc = json!({"patient_ref": patient, "text": text, "care_team": "team-of-doctor"});
        let (status, body) = stack.post("/v1/documents", Some(&loader), &doc).await;
        assert_eq!(status, 202, "{body}");
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    wait_for_all_done(&stack, &ids).await;
    let (doctor, locum) = (stack.login("doctor").await, stack.login("locum").await);
    let (auditor, privacy) = (stack.login("auditor").await, stack.login("privacy").await);
    let d = json!({"patient_ref": "PAT-D"});

    // PAT-D is read through every route a clinician has, refused once, and
    // read under break-glass by a clinician outside the team.
    assert_eq!(stack.get(&format!("/v1/documents/{}", ids[0]), Some(&doctor)).await.0, 200);
    assert_eq!(stack.post("/v1/patients/documents", Some(&doctor), &d).await.0, 200);
    assert_eq!(stack.post("/v1/patients/concepts", Some(&doctor), &d).await.0, 200);
    let (_, listed) = stack.get("/v1/concepts/49436004/patients", Some(&doctor)).await;
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(2), "{listed}");
    assert_eq!(stack.get("/v1/concepts/49436004/documents", Some(&doctor)).await.0, 200);
    assert_eq!(stack.post("/v1/patients/export", Some(&doctor), &d).await.0, 200);
    assert_eq!(stack.post("/v1/patients/documents", Some(&locum), &d).await.0, 403);
    let glass = json!({"patient_ref": "PAT-D", "reason": "covering the ward overnight", "password": PASSWORD});
    assert_eq!(stack.post("/v1/break-glass", Some(&locum), &glass).await.0, 201);
    assert_eq!(stack.get(&format!("/v1/documents/{}", ids[0]), Some(&locum)).await.0, 200);
    let case = json!({"patient_ref": "PAT-D", "reason": "gdpr_access_request", "case_ref": "DSAR-9"});
    assert_eq!(stack.post("/v1/patients/export", Some(&privacy), &case).await.0, 200);
    // PAT-E is read once, alone (the concept pages above named it too).
    assert_eq!(stack.post("/v1/patients/concepts", Some(&doctor), &json!({"patient_ref": "PAT-E"})).await.0, 200);

    let row = |action: &str, outcome: &str, actor: &str, glass: bool| {
        (action.to_owned(), outcome.to_owned(), actor.to_owned(), glass)
    };
    let expected = vec![
        row("care_team.patient_add", "success", "loader", false),
        row("document.read", "success", "doctor", false),
        row("patient.read", "success", "doctor", false),
        row("patient.read", "success", "doctor", false),
        row("concept.read", "success", "doctor", false),
        row("concept.read", "success", "doctor", false),
        row("patient.export", "success", "doctor", false),
        row("patient.read", "denied", "locum", false),
        row("auth.break_glass", "success", "locum", true),
        row("document.read", "success", "locum", true),
        row("patient.export", "success", "privacy", false),
    ];
    // The trail is written by the sink: wait until the last access is there.
    wait_until("PAT-D's accesses on the trail", Duration::from_secs(30), async || {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_disclosures WHERE patient_index = $1")
            .bind(clinflow::documents::patient_index(&clinflow::testing::index_key(), "PAT-D"))
            .fetch_one(&stack.db.owner)
            .await
            .unwrap();
        n >= expected.len() as i64
    })
    .await;
    let listed = disclosures(&stack, &auditor, "PAT-D").await;
    assert_eq!(listed, expected, "exactly PAT-D's accesses, in order");
    // The lookup itself is audited, naming the patient: the next one lists it.
    wait_until("the lookup on the trail", Duration::from_secs(30), async || {
        disclosures(&stack, &privacy, "PAT-D").await.iter().any(|r| r.0 == "audit.disclosures" && r.2 == "auditor")
    })
    .await;
    let e = disclosures(&stack, &auditor, "PAT-E").await;
    let actions: Vec<&str> = e.iter().map(|r| r.0.as_str()).filter(|a| *a != "audit.disclosures").collect();
    assert_eq!(actions, ["care_team.patient_add", "concept.read", "concept.read", "patient.read"], "{e:?}");
    // Nobody else may ask; a patient never accessed has an empty answer.
    assert_eq!(stack.post("/v1/audit/disclosures", Some(&doctor), &d).await.0, 403);
    let (status, none) = stack.post("/v1/audit/disclosures", Some(&auditor), &json!({"patient_ref": "PAT-Z"})).await;
    assert_eq!((status, none["disclosures"].as_array().map(Vec::len)), (200, Some(0)));
    let (status, body) = stack.post("/v1/audit/disclosures", Some(&auditor), &json!({"patient_ref": ""})).await;
    assert_eq!((status, code(&body)), (422, Some("invalid_patient_ref")));
    // The chain, with the patients in it, still verifies.
    let (status, verified) = stack.post("/v1/audit/verify", Some(&auditor), &json!({})).await;
    assert_eq!((status, verified["intact"].as_bool()), (200, Some(true)), "{verified}");
    stack.stop().await;
}

/// `clinflow-api purge`, as an operator runs it (the binary, over TLS, as
/// the api's database role): its output and exit status.
async fn purge(stack: &Stack, args: &[&str]) -> String {
    let admin: sqlx::postgres::PgConnectOptions = clinflow::testing::admin_url().parse().unwrap();
    let tls = clinflow::testing::admin_url().split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
    let url = format!("postgres://clinflow_api@{}:{}/{}{tls}", admin.get_host(), admin.get_port(), stack.db.name);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_clinflow-api"))
        .arg("purge")
        .args(args)
        .envs(clinflow::testing::audit_keys().env("api"))
        .env("DATABASE_URL", url)
        .env("LOG_FORMAT", "text")
        .env("RETENTION_YEARS_DIRECT_CARE", "8")
        .env("RETENTION_YEARS_LEGAL_OBLIGATION", "10")
        .output()
        .await
        .unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "purge {args:?}: {said}");
    said
}

/// Rows of a patient: (documents, results, concept rows, data keys).
async fn held(stack: &Stack, patient: &str) -> [i64; 4] {
    let index = clinflow::documents::patient_index(&clinflow::testing::index_key(), patient);
    let row: (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM documents WHERE patient_index = $1),
                (SELECT count(*) FROM document_results r JOIN documents d ON d.id = r.document_id
                 WHERE d.patient_index = $1),
                (SELECT count(*) FROM document_concepts WHERE patient_index = $1),
                (SELECT count(*) FROM data_keys WHERE patient_index = $1)",
    )
    .bind(index)
    .fetch_one(&stack.db.owner)
    .await
    .unwrap();
    [row.0, row.1, row.2, row.3]
}

#[tokio::test]
async fn every_upload_has_a_lawful_basis_and_purge_removes_what_is_kept_longer_than_it_allows() {
    let stack = Stack::start().await;
    stack.user("loader", Role::Ingest).await;
    let bare = stack.user("bare", Role::Ingest).await;
    sqlx::query("UPDATE users SET default_lawful_basis = NULL WHERE id = $1")
        .bind(bare)
        .execute(&stack.db.owner)
        .await
        .unwrap();
    stack.user("privacy", Role::PrivacyOfficer).await;
    stack.user("doctor", Role::Clinician).await;
    let (loader, bare) = (stack.login("loader").await, stack.login("bare").await);
    let note = |patient: &str, date: &str, extra: Value| {
        let mut doc =
            json!({"patient_ref": patient, "text": "Atrial fibrillation, on apixaban.", "document_date": date});
        doc.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        doc
    };

    // No basis, and none on the account: refused, naming the field.
    let (status, body) = stack.post("/v1/documents", Some(&bare), &note("PAT-X", "2025-01-01", json!({}))).await;
    assert_eq!((status, code(&body)), (422, Some("missing_lawful_basis")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("lawful_basis"));
    let research = json!({"lawful_basis": "research"});
    let (status, body) = stack.post("/v1/documents", Some(&bare), &note("PAT-X", "2025-01-01", research)).await;
    assert_eq!((status, code(&body)), (422, Some("missing_consent_ref")));
    let lines =
        [json!({}), json!({"lawful_basis": "legal_obligation"})].map(|basis| note("PAT-X", "2025-01-01", basis));
    let batch = upload_batch(&stack, &bare, &lines).await;
    assert_eq!(
        (batch["accepted"].as_i64(), batch["outcomes"][0]["code"].as_str()),
        (Some(1), Some("missing_lawful_basis"))
    );

    // Kept, each with its basis: the account's default, or the upload's own.
    let uploads = [
        ("PAT-OLD", "2012-01-01", json!({})),
        ("PAT-OLD", "2025-01-01", json!({})),
        ("PAT-GONE", "2010-05-05", json!({"lawful_basis": "legal_obligation"})),
        ("PAT-R1", "2024-03-01", json!({"lawful_basis": "research", "consent_ref": "CONSENT-1"})),
        ("PAT-R2", "2024-03-01", json!({"lawful_basis": "research", "consent_ref": "CONSENT-1"})),
        ("PAT-R2", "2024-03-02", json!({"lawful_basis": "research", "consent_ref": "CONSENT-2"})),
    ];
    let mut ids = Vec::new();
    for (patient, date, basis) in uploads {
        let (status, body) = stack.post("/v1/documents", Some(&loader), &note(patient, date, basis)).await;
        assert_eq!(status, 202, "{body}");
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    wait_for_all_done(&stack, &ids).await;
    let stored: Vec<(String, bool)> = sqlx::query_as(
        "SELECT lawful_basis, consent_index IS NOT NULL FROM documents WHERE id = ANY($1::uuid[]) ORDER BY id",
    )
    .bind(&ids)
    .fetch_all(&stack.db.owner)
    .await
    .unwrap();
    let bases: Vec<&str> = stored.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(bases, ["direct_care", "direct_care", "legal_obligation", "research", "research", "research"]);
    assert_eq!(stored.iter().filter(|s| s.1).count(), 3, "research documents hold their consent's index");
    let before = held(&stack, "PAT-OLD").await;
    assert!(before[0] == 2 && before[1] == 2 && before[2] > 0 && before[3] == 1, "{before:?}");

    // The dry run counts and removes nothing.
    let said = purge(&stack, &[]).await;
    assert!(said.contains("dry run"), "{said}");
    assert!(said.contains("direct_care       kept 8 years: 1 documents"), "{said}");
    assert!(said.contains("legal_obligation  kept 10 years: 1 documents"), "{said}");
    assert_eq!(held(&stack, "PAT-OLD").await, before);

    // Applied: the 2012 and 2010 notes go with their results and concepts;
    // PAT-GONE, left with nothing, loses their data key too.
    let metrics = tempfile::tempdir().unwrap();
    let metrics_file = metrics.path().join("purge.prom");
    let said = purge(&stack, &["--apply", "--batch-size", "1", "--metrics-file", metrics_file.to_str().unwrap()]).await;
    assert!(said.contains("purged 2 documents"), "{said}");
    let after = held(&stack, "PAT-OLD").await;
    assert_eq!((after[0], after[1], after[3]), (1, 1, 1), "one note kept, and the key");
    assert!(after[2] < before[2], "{before:?} -> {after:?}");
    assert_eq!(held(&stack, "PAT-GONE").await, [0, 0, 0, 0]);
    let prom = std::fs::read_to_string(&metrics_file).unwrap();
    assert!(prom.contains(r#"clinflow_purge_documents{basis="direct_care",applied="true"} 1"#), "{prom}");
    assert!(prom.contains("clinflow_purge_last_run_timestamp_seconds"), "{prom}");
    assert!(purge(&stack, &[]).await.contains("direct_care       kept 8 years: 0 documents"));

    // A research consent withdrawn: its documents go, the other consent's stay.
    let doctor = stack.login("doctor").await;
    let withdraw = json!({"consent_ref": "CONSENT-1", "case_ref": "WD-2026-3"});
    assert_eq!(stack.post("/v1/privacy/consents/withdraw", Some(&doctor), &withdraw).await.0, 403);
    let privacy = stack.login("privacy").await;
    let (status, gone) = stack.post("/v1/privacy/consents/withdraw", Some(&privacy), &withdraw).await;
    assert_eq!((status, gone["documents"].as_i64(), gone["data_keys"].as_i64()), (200, Some(2), Some(1)), "{gone}");
    assert_eq!(held(&stack, "PAT-R1").await, [0, 0, 0, 0]);
    assert_eq!(held(&stack, "PAT-R2").await[0], 1, "CONSENT-2's note stays");

    // Each purged document is on the trail, naming its patient and why.
    let purged_of = |patient: &str, reason: &str| (blind_index(patient), reason.to_owned());
    let mut expected = vec![
        purged_of("PAT-OLD", "retention:direct_care"),
        purged_of("PAT-GONE", "retention:legal_obligation"),
        purged_of("PAT-R1", "consent_withdrawn"),
        purged_of("PAT-R2", "consent_withdrawn"),
    ];
    expected.sort();
    wait_until("purges audited", Duration::from_secs(30), async || {
        let mut rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT patients[1], reason FROM audit_events WHERE action = 'document.purge' AND resource_kind = 'document'",
        )
        .fetch_all(&stack.db.owner)
        .await
        .unwrap();
        rows.sort();
        let withdrawn: i64 =
            sqlx::query_scalar(
                "SELECT count(*) FROM audit_events WHERE action = 'privacy.consent_withdraw' AND outcome = 'success'",
            )
                .fetch_one(&stack.db.owner)
                .await
                .unwrap();
        rows == expected && withdrawn == 1
    })
    .await;
    stack.stop().await;
}
