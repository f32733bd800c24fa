//! Writing history through the broker: whoever can publish to the audit
//! exchange (here with the api's own broker user, as scripts/broker-users
//! makes it) but holds no producer key gets nothing into the chain. Unsigned, wrongly signed and cross-producer
//! events are parked with their reason; a genuine event replayed is stored
//! once; the chain verifies with public keys only.

use std::time::Duration;

use clinflow::amqp::Publisher;
use clinflow::audit::{Action, Actor, AuditEvent, Outcome, Signer};
use clinflow::deadletters;
use clinflow::testing::{BrokerUser, BrokerUsers, audit_keys};

use crate::common::{Stack, audit_trust, wait_until};

/// The event the attacker wrote: the admin logging in from 10.9.9.9.
fn admin_login() -> AuditEvent {
    AuditEvent::new(Action::Login, Actor::anonymous(Some("admin")), Outcome::Success)
        .from_request(Some("10.9.9.9".parse().unwrap()), None)
}

/// A publisher on the api's own broker user, as scripts/broker-users makes
/// it (the users are removed when the first value is dropped).
struct Forger {
    _users: BrokerUsers,
    connection: lapin::Connection,
    publisher: Publisher,
}

impl Forger {
    async fn new(stack: &Stack) -> Self {
        let users = BrokerUsers::create(&stack.topology, clinflow::testing::amqp_url()).await;
        let connection = clinflow::amqp::connect(&users.url(BrokerUser::Api), "clinflow-test-forger").await.unwrap();
        let publisher = Publisher::new(&connection).await.unwrap();
        Self { _users: users, connection, publisher }
    }

    /// One message with this body to the audit exchange.
    async fn publish(&self, stack: &Stack, id: &str, body: Vec<u8>) {
        let audit = stack.topology.audit();
        let message = clinflow::amqp::Outgoing::new(&audit.exchange, audit.key, id, &body);
        self.publisher.publish_many(&[message]).await.unwrap();
    }

    async fn close(self) {
        let _ = self.connection.close(200, "done".into()).await;
    }
}

#[tokio::test]
async fn forged_audit_events_are_parked_and_a_genuine_one_is_stored_once() {
    let stack = Stack::start().await;
    let forger = Forger::new(&stack).await;
    let audit = stack.topology.audit();
    let publish = async |id: &str, body: Vec<u8>| forger.publish(&stack, id, body).await;

    // 1. No signature at all (the message format before signing).
    let unsigned = admin_login();
    publish("unsigned", serde_json::to_vec(&unsigned).unwrap()).await;
    // 2. Signed under the api's key id with a key that is not the api's.
    let impostor = admin_login();
    publish("impostor", Signer::generate("api").body(&impostor).unwrap()).await;
    // 3. The api's genuine signature, the event edited after signing.
    let mut edited = audit_keys().api.sign(&admin_login()).unwrap();
    edited.event.source_ip = Some("10.9.9.10".parse().unwrap());
    let edited_id = edited.event.event_id;
    publish("edited", serde_json::to_vec(&edited).unwrap()).await;
    // 4. The worker's genuine key, claiming to be the api's (a user's login).
    let cross = admin_login();
    publish("cross", audit_keys().worker.body(&cross).unwrap()).await;
    // 5. A genuine event of the api, published twice.
    let genuine = admin_login();
    let body = audit_keys().api.body(&genuine).unwrap();
    publish("genuine", body.clone()).await;
    publish("genuine", body).await;

    wait_until("the four forgeries parked", Duration::from_secs(20), async || {
        stack.queue_depth(&audit.dead_queue).await == 4
    })
    .await;
    assert_eq!(stack.wait_for_audit_rows(1).await, 1, "only the genuine event is stored, once");
    let stored: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT event_id FROM audit_events").fetch_all(&stack.db.owner).await.unwrap();
    assert_eq!(stored, [genuine.event_id]);
    for forged in [unsigned.event_id, impostor.event_id, edited_id, cross.event_id] {
        assert!(!stored.contains(&forged), "{forged} entered the chain");
    }
    let row: (String, bool) = sqlx::query_as("SELECT key_id, signature IS NOT NULL FROM audit_events")
        .fetch_one(&stack.db.owner)
        .await
        .unwrap();
    assert_eq!(row, ("api".to_owned(), true), "the key id is stored with the row");

    let operator = audit_keys().operator("clinflow-audit-sink");
    let listing = deadletters::list_audit(&stack.amqp, &stack.topology, &operator).await.unwrap();
    assert_eq!(listing.by_reason.get("bad_signature"), Some(&3), "{listing:?}");
    assert_eq!(listing.by_reason.get("producer_mismatch"), Some(&1), "{listing:?}");

    // Replaying them changes nothing: they are parked again, never stored.
    deadletters::replay_audit(&stack.amqp, &stack.topology, None, &operator).await.unwrap();
    wait_until("parked again", Duration::from_secs(20), async || stack.queue_depth(&audit.dead_queue).await == 4).await;
    // The chain (the genuine login and the operator's list and replay
    // events) verifies with public keys only.
    let rows = stack.wait_for_audit_rows(3).await;
    assert_eq!(clinflow::chain::verify(&stack.db.audit_reader, &audit_trust()).await.unwrap(), rows);
    forger.close().await;
    stack.stop().await;
}

/// A producer's batch travels as one message (a JSON array of events, each
/// signed): stored whole. A forged event slipped into such a batch keeps the
/// whole message out of the chain, genuine events and all, parked with the
/// forgery's reason; an empty batch is no event at all, and a batch longer
/// than any producer sends is refused unread.
#[tokio::test]
async fn a_batch_of_events_is_stored_whole_or_parked_whole() {
    let stack = Stack::start().await;
    let forger = Forger::new(&stack).await;
    let audit = stack.topology.audit();
    let publish = async |id: &str, body: Vec<u8>| forger.publish(&stack, id, body).await;
    let api = &audit_keys().api;

    // Three genuine events in one message: the api's outbox makes such.
    let genuine: Vec<AuditEvent> = (0..3).map(|_| admin_login()).collect();
    let messages = clinflow::outbox::Message::audits(api, &genuine).unwrap();
    assert_eq!(messages.len(), 1, "one message for the three");
    publish("batch", messages[0].body.clone()).await;
    // Two genuine events and one signed with a key that is not the api's.
    let (good, forged) = ([admin_login(), admin_login()], admin_login());
    let mixed =
        vec![api.sign(&good[0]).unwrap(), Signer::generate("api").sign(&forged).unwrap(), api.sign(&good[1]).unwrap()];
    publish("mixed", clinflow::audit::signing::message_body(&mixed).unwrap()).await;
    publish("empty", b"[]".to_vec()).await;
    let long: Vec<AuditEvent> = (0..=clinflow::audit::MAX_EVENTS_PER_MESSAGE).map(|_| admin_login()).collect();
    let long: Vec<_> = long.iter().map(|e| api.sign(e).unwrap()).collect();
    publish("long", serde_json::to_vec(&long).unwrap()).await;

    wait_until("the mixed, the empty and the long batch parked", Duration::from_secs(20), async || {
        stack.queue_depth(&audit.dead_queue).await == 3
    })
    .await;
    assert_eq!(stack.wait_for_audit_rows(3).await, 3);
    let stored: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT event_id FROM audit_events ORDER BY seq").fetch_all(&stack.db.owner).await.unwrap();
    assert_eq!(stored, genuine.iter().map(|e| e.event_id).collect::<Vec<_>>(), "the batch, whole and in order");
    for kept_out in [good[0].event_id, good[1].event_id, forged.event_id] {
        assert!(!stored.contains(&kept_out), "{kept_out} of the mixed batch entered the chain");
    }
    let operator = audit_keys().operator("clinflow-audit-sink");
    let listing = deadletters::list_audit(&stack.amqp, &stack.topology, &operator).await.unwrap();
    assert_eq!(listing.by_reason.get("bad_signature"), Some(&1), "{listing:?}");
    assert_eq!(listing.by_reason.get("schema_invalid"), Some(&2), "{listing:?}");
    let rows = stack.wait_for_audit_rows(4).await;
    assert_eq!(rows, 4, "the batch and the operator's listing, nothing of the long one");
    assert_eq!(clinflow::chain::verify(&stack.db.audit_reader, &audit_trust()).await.unwrap(), rows);
    forger.close().await;
    stack.stop().await;
}
