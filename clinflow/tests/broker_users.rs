//! Least privilege on the broker, from the wrong side: each service's user,
//! made by `scripts/broker-users` (as `./dev/up` and docker-compose make
//! them) for a test topology, is allowed every broker operation its service
//! performs and refused (ACCESS_REFUSED) the ones it must not: the api
//! consuming the audit queue or declaring a queue, the worker consuming the
//! audit queue, the audit sink publishing anywhere but the dead-letter
//! exchange. Every user can check the topology (passive declares need no
//! permission), which is all the services do at connection.
#![cfg(feature = "testing")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use clinflow::amqp::{self, Publisher, Topology};
use clinflow::testing::{self, BrokerUser, BrokerUsers};
use lapin::options::{BasicConsumeOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

/// Every broker round trip of these tests gets this long.
const DEADLINE: Duration = Duration::from_secs(10);

/// One user's connection, trying one operation per channel (a refusal
/// closes its channel).
struct Session<'a> {
    connection: lapin::Connection,
    topology: &'a Topology,
}

impl<'a> Session<'a> {
    async fn open(users: &BrokerUsers, user: BrokerUser, topology: &'a Topology) -> Self {
        let url = users.url(user);
        let connect = amqp::connect(&url, "clinflow-test-broker-users");
        let connection = tokio::time::timeout(DEADLINE, connect).await.expect("connected in time").unwrap();
        Self { connection, topology }
    }

    async fn publish(&self, exchange: &str, key: &str) -> Result<(), String> {
        within(async {
            let publisher = Publisher::new(&self.connection).await?;
            publisher.publish_json(exchange, key, "broker-users-test", &serde_json::json!({})).await?;
            let _ = publisher.channel().close(200, "done".into()).await;
            Ok::<_, amqp::AmqpError>(())
        })
        .await
    }

    async fn consume(&self, queue: &str) -> Result<(), String> {
        within(async {
            let channel = self.connection.create_channel().await?;
            let options = BasicConsumeOptions::default();
            channel.basic_consume(queue.into(), "".into(), options, FieldTable::default()).await?;
            // Closing puts back anything delivered meanwhile.
            channel.close(200, "done".into()).await
        })
        .await
    }

    async fn get(&self, queue: &str) -> Result<(), String> {
        within(async {
            let channel = self.connection.create_channel().await?;
            channel.basic_get(queue.into(), BasicGetOptions { no_ack: false }).await?;
            channel.close(200, "done".into()).await
        })
        .await
    }

    async fn declare_queue(&self, queue: &str) -> Result<(), String> {
        within(async {
            let channel = self.connection.create_channel().await?;
            let options = QueueDeclareOptions { durable: true, ..Default::default() };
            channel.queue_declare(queue.into(), options, FieldTable::default()).await?;
            channel.close(200, "done".into()).await
        })
        .await
    }

    async fn check(&self) -> Result<(), String> {
        within(self.topology.check(&self.connection)).await
    }
}

async fn within<E: std::fmt::Display>(op: impl Future<Output = Result<(), E>>) -> Result<(), String> {
    tokio::time::timeout(DEADLINE, op).await.expect("the broker answered in time").map_err(|e| e.to_string())
}

#[track_caller]
fn allowed(result: Result<(), String>, what: &str) {
    if let Err(e) = result {
        panic!("{what}: must be allowed, was refused: {e}");
    }
}

#[track_caller]
fn refused(result: Result<(), String>, what: &str) {
    match result {
        Ok(()) => panic!("{what}: must be refused, was allowed"),
        Err(e) => assert!(e.contains("ACCESS_REFUSED"), "{what}: refused, but not for access: {e}"),
    }
}

#[tokio::test]
async fn each_service_user_may_do_its_work_and_is_refused_the_rest() {
    let (t, admin) = testing::topology().await;
    let users = BrokerUsers::create(&t, testing::amqp_url()).await;
    let (jobs, audit, dead, retry) =
        (t.jobs_exchange(), t.audit_exchange(), t.dead_letter_exchange(), t.retry_exchange());
    let (live, backfill, audit_q) = (t.documents_live(), t.documents_backfill(), t.audit());
    let (live_key, audit_key) = (live.key, audit_q.key);

    let api = Session::open(&users, BrokerUser::Api, &t).await;
    allowed(api.check().await, "api: check the topology");
    allowed(api.publish(&jobs, live_key).await, "api: publish a job");
    allowed(api.publish(&audit, audit_key).await, "api: publish an audit event");
    allowed(api.get(&live.dead_queue).await, "api (/v1/ops): read a lane's dead letters");
    refused(api.consume(&audit_q.queue).await, "api: consume the audit queue");
    refused(api.consume(&live.queue).await, "api: consume a lane");
    refused(api.get(&audit_q.dead_queue).await, "api: read the audit dead letters");
    refused(api.declare_queue(&format!("{}.extra", t.prefix())).await, "api: declare a queue");
    refused(api.declare_queue(&live.queue).await, "api: declare (redeclare) a lane");
    refused(api.publish(&dead, live_key).await, "api: publish to the dead-letter exchange");
    refused(api.publish(&retry, live_key).await, "api: publish to the retry exchange");

    let worker = Session::open(&users, BrokerUser::Worker, &t).await;
    allowed(worker.check().await, "worker: check the topology");
    allowed(worker.consume(&live.queue).await, "worker: consume the live lane");
    allowed(worker.consume(&backfill.queue).await, "worker: consume the backfill lane");
    allowed(worker.publish(&retry, live_key).await, "worker: publish a retry");
    allowed(worker.publish(&dead, live_key).await, "worker: park a job");
    allowed(worker.publish(&audit, audit_key).await, "worker: publish an audit event");
    refused(worker.consume(&audit_q.queue).await, "worker: consume the audit queue");
    refused(worker.get(&live.dead_queue).await, "worker: read the dead letters");
    refused(worker.publish(&jobs, live_key).await, "worker: publish a job");
    refused(worker.declare_queue(&format!("{}.extra", t.prefix())).await, "worker: declare a queue");

    let sink = Session::open(&users, BrokerUser::AuditSink, &t).await;
    allowed(sink.check().await, "sink: check the topology");
    allowed(sink.consume(&audit_q.queue).await, "sink: consume the audit queue");
    allowed(sink.publish(&dead, audit_key).await, "sink: park a message it cannot store");
    for exchange in [&jobs, &audit, &retry] {
        refused(sink.publish(exchange, live_key).await, &format!("sink: publish to {exchange}"));
    }
    refused(sink.publish("", &audit_q.queue).await, "sink: publish through the default exchange");
    refused(sink.consume(&live.queue).await, "sink: consume a lane");
    refused(sink.get(&audit_q.dead_queue).await, "sink: read the audit dead letters");

    let ops = Session::open(&users, BrokerUser::Ops, &t).await;
    allowed(ops.check().await, "ops: check the topology");
    for queue in [&live.dead_queue, &backfill.dead_queue, &audit_q.dead_queue] {
        allowed(ops.get(queue).await, &format!("ops: read {queue}"));
    }
    allowed(ops.publish(&jobs, live_key).await, "ops: replay a job");
    allowed(ops.publish(&audit, audit_key).await, "ops: replay an audit message, audit itself");
    refused(ops.consume(&live.queue).await, "ops: consume a lane");
    refused(ops.consume(&audit_q.queue).await, "ops: consume the audit queue");
    refused(ops.publish(&dead, live_key).await, "ops: publish to the dead-letter exchange");

    for session in [api, worker, sink, ops] {
        let _ = session.connection.close(200, "done".into()).await;
    }
    drop(users);
    testing::delete_queues(&t, &admin).await;
}

#[tokio::test]
async fn a_missing_topology_is_named_by_the_check() {
    let (declared, admin) = testing::topology().await;
    // Another prefix, never declared.
    let missing = Topology::new(format!("{}-never-declared", declared.prefix()));
    let err = within(missing.check(&admin)).await.expect_err("nothing is declared under this prefix");
    assert!(err.contains(&format!("exchange {}.jobs is missing", missing.prefix())), "{err}");
    assert!(err.contains("broker setup") && !err.contains('\n'), "{err}");
    allowed(within(declared.check(&admin)).await, "the declared topology checks");
    testing::delete_queues(&declared, &admin).await;
}
