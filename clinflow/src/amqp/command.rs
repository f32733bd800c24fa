//! `broker setup|check`, the operator's side of the topology (the api
//! offers it as `clinflow-api broker`). The services log in as users that
//! may not declare anything (`scripts/broker-users`), so the topology is
//! declared here once, as the broker's administrator, before they start.

use anyhow::Context;
use clap::Subcommand;

use crate::amqp::{self, Topology};
use crate::config;

#[derive(Subcommand, Clone, Copy)]
pub enum BrokerCommand {
    /// Declare the exchanges, queues and bindings of CLINFLOW_QUEUE_PREFIX
    /// (idempotent), logged in with AMQP_URL as a user that may configure
    /// them: the broker's administrator, not a service's user.
    Setup,
    /// Check that they exist, as a service does at each connection
    /// (passive declares: any user of the virtual host may run it).
    Check,
}

/// Runs `command` against AMQP_URL, for the topology of
/// CLINFLOW_QUEUE_PREFIX (`clinflow` by default).
pub async fn run(command: BrokerCommand, tool: &str) -> anyhow::Result<()> {
    let url = crate::tls::amqp_url("AMQP_URL")?;
    crate::tls::warn_if_plaintext_allowed()?;
    let topology = Topology::new(config::optional("CLINFLOW_QUEUE_PREFIX")?.unwrap_or_else(|| "clinflow".into()));
    let connection = amqp::connect(&url, tool).await.context("connecting to RabbitMQ (AMQP_URL)")?;
    let outcome = match command {
        BrokerCommand::Setup => setup(&connection, &topology).await,
        BrokerCommand::Check => topology.check(&connection).await.map_err(Into::into),
    };
    let _ = connection.close(200, "done".into()).await;
    outcome?;
    let (exchanges, queues) = (topology.exchanges().len(), topology.queues().len());
    let done = match command {
        BrokerCommand::Setup => "declared",
        BrokerCommand::Check => "present",
    };
    println!("topology {}: {exchanges} exchanges and {queues} queues {done}", topology.prefix());
    Ok(())
}

async fn setup(connection: &lapin::Connection, topology: &Topology) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    topology
        .declare(&channel)
        .await
        .context("declaring the topology (AMQP_URL must be a user with configure permission: the administrator)")?;
    let _ = channel.close(200, "declared".into()).await;
    Ok(())
}
