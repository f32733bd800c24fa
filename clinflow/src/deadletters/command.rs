//! `dead-letters list|replay`, the one command over both kinds of
//! dead-letter queue: `clinflow-worker dead-letters` works on the document
//! jobs' ([`DocumentJobs`]), `clinflow-audit-sink dead-letters` on the audit
//! messages' ([`AuditMessages`]). The kind gives the ids `--id` takes and
//! the help texts; each kind runs the command with the functions of
//! [`crate::deadletters`] and prints ids, reasons and counts, never content.

use std::collections::HashSet;
use std::str::FromStr;

use clap::Subcommand;
use lapin::Connection;
use sqlx::PgPool;
use uuid::Uuid;

use crate::amqp::Topology;
use crate::audit::Operator;
use crate::deadletters::{self, Selection};

/// A kind of dead-letter queue: what identifies its messages and how its
/// commands describe themselves.
pub trait Kind: Send + Sync + 'static {
    /// A message's id, as `--id` takes it.
    type Id: FromStr<Err: std::error::Error + Send + Sync + 'static> + Clone + Send + Sync + 'static;
    const LIST_ABOUT: &'static str;
    const REPLAY_ABOUT: &'static str;
    const IDS_HELP: &'static str;
    const ALL_HELP: &'static str;
}

/// The lanes' `.dead` queues of document jobs, by document id.
pub struct DocumentJobs;

impl Kind for DocumentJobs {
    type Id = Uuid;
    const LIST_ABOUT: &'static str = "Count the dead-lettered jobs by reason and list their document ids";
    const REPLAY_ABOUT: &'static str = "Put dead-lettered jobs back on their lane (their documents become queued)";
    const IDS_HELP: &'static str = "Documents whose jobs to replay";
    const ALL_HELP: &'static str = "Every dead-lettered job";
}

/// The audit queue's `.dead` queue, by message (event) id.
pub struct AuditMessages;

impl Kind for AuditMessages {
    type Id = String;
    const LIST_ABOUT: &'static str = "Count the parked messages by reason and list their ids";
    const REPLAY_ABOUT: &'static str = "Put parked messages back on the audit queue (each event is stored once)";
    const IDS_HELP: &'static str = "Message (event) ids to replay";
    const ALL_HELP: &'static str = "Every parked message";
}

#[derive(Subcommand)]
pub enum DeadLetters<K: Kind> {
    #[command(about = K::LIST_ABOUT)]
    List {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    #[command(about = K::REPLAY_ABOUT)]
    Replay {
        #[arg(long = "id", help = K::IDS_HELP, required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<K::Id>,
        #[arg(long, help = K::ALL_HELP)]
        all: bool,
    },
}

impl DeadLetters<DocumentJobs> {
    /// Lists or replays dead-lettered document jobs on `connection`, as
    /// `operator`; `database` connects to PostgreSQL when a replay needs it.
    pub async fn run(
        self,
        connection: &Connection,
        topology: &Topology,
        operator: &Operator,
        database: impl AsyncFnOnce() -> anyhow::Result<PgPool>,
    ) -> anyhow::Result<()> {
        match self {
            Self::List { json } => {
                let listing = deadletters::list(connection, topology, operator).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&listing)?);
                } else {
                    println!("{} dead-lettered job(s)", listing.total);
                    for (reason, n) in &listing.by_reason {
                        println!("  {reason}: {n}");
                    }
                    for job in &listing.jobs {
                        let id = job.document_id.map_or_else(|| "(not a job)".to_owned(), |id| id.to_string());
                        println!("{id}  {}  {}  attempts {}", job.lane, job.reason, job.attempts);
                    }
                }
            }
            Self::Replay { ids, all } => {
                let selection =
                    if all { Selection::All } else { Selection::Documents(ids.into_iter().collect::<HashSet<_>>()) };
                let db = database().await?;
                let replayed = deadletters::replay(connection, &db, topology, &selection, operator).await?;
                println!(
                    "replayed {}; dropped {} whose document is already done; left {} in the dead-letter queues",
                    replayed.replayed.len(),
                    replayed.already_done.len(),
                    replayed.left
                );
            }
        }
        Ok(())
    }
}

impl DeadLetters<AuditMessages> {
    /// Lists or replays parked audit messages on `connection`, as `operator`.
    pub async fn run(self, connection: &Connection, topology: &Topology, operator: &Operator) -> anyhow::Result<()> {
        match self {
            Self::List { json } => {
                let listing = deadletters::list_audit(connection, topology, operator).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&listing)?);
                } else {
                    println!("{} parked audit message(s)", listing.total);
                    for (reason, n) in &listing.by_reason {
                        println!("  {reason}: {n}");
                    }
                    for m in &listing.messages {
                        println!(
                            "{}  {}  {} bytes",
                            if m.message_id.is_empty() { "(no id)" } else { &m.message_id },
                            m.reason,
                            m.bytes
                        );
                    }
                }
            }
            Self::Replay { ids, all } => {
                let ids: HashSet<String> = ids.into_iter().collect();
                let selection = if all { None } else { Some(&ids) };
                let n = deadletters::replay_audit(connection, topology, selection, operator).await?;
                println!("replayed {n} audit message(s)");
            }
        }
        Ok(())
    }
}
