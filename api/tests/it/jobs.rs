use std::time::Duration;

use clinflow::amqp::{Outgoing, Publisher, REASON_HEADER};
use clinflow::audit::{Action, Actor, AuditEvent, Outcome};
use clinflow::deadletters;
use clinflow_api::users::Role;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use serde_json::json;

use crate::common::Stack;

/// Publishes raw bytes where document jobs go, as a buggy producer would.
async fn publish_raw(stack: &Stack, body: &[u8]) {
    let publisher = Publisher::new(&stack.amqp).await.unwrap();
    let lane = stack.topology.documents_live();
    publisher
        .channel()
        .basic_publish(
            lane.exchange.as_str().into(),
            lane.key.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test]
async fn malformed_jobs_are_dead_lettered_and_do_not_block_the_queue() {
    let stack = Stack::start().await;
    for body in [&b"not json at all"[..], br#"{"document_id": "not-a-uuid"}"#, b"{}", &[0xff, 0xfe, 0x00]] {
        publish_raw(&stack, body).await;
    }
    // A well-formed job for a document that does not exist is poison too.
    publish_raw(&stack, br#"{"document_id": "018f0000-0000-7000-8000-000000000000"}"#).await;

    stack.user("u", Role::Clinician).await;
    stack.care_team("u", &["PAT-7"]).await;
    let token = stack.login("u").await;
    let (status, up) = stack
        .post("/v1/documents", Some(&token), &json!({"patient_ref": "PAT-7", "text": "Started metformin for T2DM."}))
        .await;
    assert_eq!(status, 202);
    let id = up["id"].as_str().unwrap().to_owned();
    let mut doc = json!(null);
    for _ in 0..200 {
        doc = stack.get(&format!("/v1/documents/{id}"), Some(&token)).await.1;
        if doc["status"] == "done" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(doc["status"], "done", "the valid job behind the bad ones was processed: {doc}");
    assert!(doc["annotations"].as_array().unwrap().iter().any(|a| a["cui"] == "372567009"));

    let lane = stack.topology.documents_live();
    let mut parked = 0;
    for _ in 0..100 {
        parked = stack.queue_depth(&lane.dead_queue).await;
        if parked == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(parked, 5, "the four malformed jobs and the one naming no document are kept, dead-lettered");
    assert_eq!(stack.queue_depth(&lane.queue).await, 0);
    // Each with the reason it was parked for.
    let channel = stack.amqp.create_channel().await.unwrap();
    let mut reasons = Vec::new();
    while let Some(m) = channel
        .basic_get(lane.dead_queue.as_str().into(), lapin::options::BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let header = m.delivery.properties.headers().as_ref().and_then(|h| h.inner().get(REASON_HEADER).cloned());
        reasons.push(match header {
            Some(lapin::types::AMQPValue::LongString(r)) => r.to_string(),
            other => format!("{other:?}"),
        });
    }
    reasons.sort();
    assert_eq!(reasons, ["malformed_job", "malformed_job", "malformed_job", "malformed_job", "no_such_document"]);
    assert!(!stack.worker.is_finished(), "the worker is still running");
    stack.stop().await;
}

#[tokio::test]
async fn malformed_audit_messages_are_dead_lettered_with_a_reason_and_the_sink_goes_on() {
    let stack = Stack::start().await;
    let publisher = Publisher::new(&stack.amqp).await.unwrap();
    let audit = stack.topology.audit();
    publisher.publish_json(&audit.exchange, audit.key, "bogus", &json!({"hello": "world"})).await.unwrap();
    let garbage = Outgoing::new(&audit.exchange, audit.key, "garbage", b"\xff not json");
    publisher.publish_many(&[garbage]).await.unwrap();
    stack.user("u", Role::Clinician).await;
    stack.login("u").await;
    assert_eq!(stack.wait_for_audit_rows(1).await, 1);
    crate::common::wait_until("both parked", Duration::from_secs(10), async || {
        stack.queue_depth(&audit.dead_queue).await == 2
    })
    .await;
    assert!(!stack.sink.is_finished());

    // An event the broker parked (as its delivery limit would): valid, and
    // stored once replayed, as often as it is replayed.
    let event =
        AuditEvent::new(Action::DocumentRead, Actor::service("clinflow-api"), Outcome::Success).reason("parked");
    let body = clinflow::testing::audit_keys().api.body(&event).unwrap();
    let (dead, id) = (stack.topology.dead_letter_exchange(), event.event_id.to_string());
    publisher.publish_many(&[Outgoing::new(&dead, audit.key, &id, &body)]).await.unwrap();
    let operator = clinflow::testing::audit_keys().operator("clinflow-audit-sink");
    let listing = deadletters::list_audit(&stack.amqp, &stack.topology, &operator).await.unwrap();
    assert_eq!(listing.total, 3);
    assert_eq!(listing.by_reason.get("schema_invalid"), Some(&1), "{listing:?}");
    assert_eq!(listing.by_reason.get("undecodable"), Some(&1), "{listing:?}");
    assert_eq!(stack.queue_depth(&audit.dead_queue).await, 3, "listing consumed nothing");

    let only = [id.clone()].into_iter().collect();
    assert_eq!(deadletters::replay_audit(&stack.amqp, &stack.topology, Some(&only), &operator).await.unwrap(), 1);
    let stored = async || -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE event_id = $1::uuid")
            .bind(&id)
            .fetch_one(&stack.db.owner)
            .await
            .unwrap()
    };
    crate::common::wait_until("the replayed event stored", Duration::from_secs(10), async || stored().await == 1).await;
    // Replaying everything: the two that can never be stored come back.
    assert_eq!(deadletters::replay_audit(&stack.amqp, &stack.topology, None, &operator).await.unwrap(), 2);
    crate::common::wait_until("parked again", Duration::from_secs(10), async || {
        stack.queue_depth(&audit.dead_queue).await == 2
    })
    .await;
    assert_eq!(stored().await, 1);
    stack.stop().await;
}
