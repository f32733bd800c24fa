//! A 2 MB line in a batch of 10,000 lines, and a line past the 10,000th,
//! against the api's default batch limits: those two lines are rejected
//! (each with its code, nothing of them stored), every other is stored.

use clinflow_api::batch::BatchLimits;
use clinflow_api::users::Role;
use serde_json::{Value, json};

use super::{Hostile, MARK, stored};

#[tokio::test]
async fn hostile_a_2_mb_line_in_a_batch_of_10000_lines_is_rejected_alone() {
    const LINES: usize = 10_000;
    const BIG: usize = 5_000;
    let h = Hostile::start().await;
    let base = h.stack.serve_another_api(|s| s.batch_limits = BatchLimits::default()).await;
    let limits = BatchLimits::default();
    assert_eq!((limits.max_lines, limits.max_line_bytes), (LINES, 2_000_000));

    let line = |n: usize| json!({"patient_ref": "PAT-H-BULK", "text": "Known AF.", "source_ref": format!("bulk-{n}")});
    let mut body = String::new();
    for n in 1..=LINES + 1 {
        if n == BIG {
            let text = format!("{MARK}{}", "x".repeat(limits.max_line_bytes));
            body.push_str(&json!({"patient_ref": "PAT-H-BULK", "text": text, "source_ref": "bulk-big"}).to_string());
        } else {
            body.push_str(&line(n).to_string());
        }
        body.push('\n');
    }
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM documents").fetch_one(&h.stack.db.owner).await.unwrap();
    let response = h
        .stack
        .http
        .post(format!("{base}/v1/documents/batch"))
        .bearer_auth(h.token(Role::Ingest))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(!text.contains(MARK));
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!((answer["accepted"].as_u64(), answer["rejected"].as_u64()), (Some(LINES as u64 - 1), Some(2)));
    let rejected: Vec<(u64, &str)> = answer["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["outcome"] == "rejected")
        .map(|o| (o["line"].as_u64().unwrap(), o["code"].as_str().unwrap()))
        .collect();
    assert_eq!(rejected, [(BIG as u64, "line_too_large"), (LINES as u64 + 1, "too_many_lines")]);
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM documents").fetch_one(&h.stack.db.owner).await.unwrap();
    assert_eq!(after - before, LINES as i64 - 1, "every other line stored, the two rejected not");
    let before = stored(&h.stack).await;
    h.still_serving(&base).await;
    assert_eq!(stored(&h.stack).await, before);
    let test = "hostile_a_2_mb_line_in_a_batch_of_10000_lines_is_rejected_alone";
    for (what, expected) in [
        ("a 2 MB line in a batch of 10,000 lines", "200; that line `line_too_large`, the 9,999 others stored"),
        ("a 10,001st line", "200; that line `too_many_lines`, nothing of it stored"),
    ] {
        println!("| {what} | `POST /v1/documents/batch` | {expected} | `{test}` |");
    }
    h.stop().await;
}
