//! A whole run: a fresh database and queues, the services, the phases
//! (`measure`), then the report; the database and queues are removed again
//! (the database kept with `--keep-database`).

use std::time::Instant;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection};

use crate::cli::{Cli, HopsArg};
use crate::measure::{Bench, measure};
use crate::plan::Plan;
use crate::stack::{Hops, Links, Stack, TlsFiles};
use crate::{notes, phases, report};

/// Runs the benchmark `cli` asks for; the figures go to stdout and
/// `--results-dir`, progress to stderr.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let started = Instant::now();
    let plan = Plan::for_mode(cli.mode, cli.backlog, cli.query_docs).with_query_rate(cli.query_rate);
    let vocabulary = notes::Vocabulary::load(&cli.concepts)?;
    let owner = fresh_database(&cli.admin_url, &cli.database).await?;
    let admin: PgConnectOptions = cli.admin_url.parse().context("--admin-url")?;
    let (host, port) = (admin.get_host().to_owned(), admin.get_port());
    let database_url = |role: &str| format!("postgres://{role}@{host}:{port}/{}", cli.database);
    let topology = clinflow::amqp::Topology::new(&cli.queue_prefix);
    let amqp = clinflow::amqp::connect(&cli.amqp_url.clone().into(), "clinflow-bench").await?;
    phases::delete_queues(&amqp, &topology).await;
    // As deployed: declared once by an administrator (the bench's broker
    // user), then only checked by the services it starts.
    topology.declare(&amqp.create_channel().await?).await?;

    let mut master_key = [0u8; 32];
    master_key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    master_key[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    let links = Links {
        database_url: database_url("clinflow_api"),
        audit_reader_url: database_url("clinflow_audit_reader"),
        amqp_url: cli.amqp_url.clone(),
        tls: tls_files(&cli),
    };
    let hops = if cli.hops == HopsArg::Plain { Hops::Plain } else { Hops::Tls };
    let mut stack = Stack::new(cli.bin_dir.clone(), cli.log_dir.clone(), links, hops, &cli.queue_prefix, &master_key)?;
    stack.medcat_pid = cli.medcat_pid;
    let password = uuid::Uuid::new_v4().to_string();
    stack.create_user("bench-ingest", "ingest", &password).await?;

    let ctx = phases::Context::new(&owner, &vocabulary, &plan);
    let bench = Bench { cli: &cli, plan: &plan, ctx: &ctx, amqp: &amqp, topology: &topology, password: &password };
    let result = measure(&bench, &master_key, &mut stack).await;
    let rss = report::peak_rss(&stack);
    stack.stop_all().await;
    phases::delete_queues(&amqp, &topology).await;
    owner.close().await;
    if cli.keep_database {
        eprintln!("kept database {}", cli.database);
    } else {
        drop_database(&cli.admin_url, &cli.database).await;
    }
    let mut figures = result?;
    figures.peak_rss_mib = rss.into_iter().chain(figures.peak_rss_mib).collect();
    report::print_and_save(&cli.results_dir, cli.mode, &cli.profile, &plan, &figures, started.elapsed())
}

/// What TLS hops need, when every flag for it is given.
fn tls_files(cli: &Cli) -> Option<TlsFiles> {
    Some(TlsFiles {
        ca_file: cli.ca_file.clone()?,
        cert: cli.tls_cert.clone()?,
        key: cli.tls_key.clone()?,
        amqp_url: cli.amqp_tls_url.clone()?,
    })
}

async fn fresh_database(admin_url: &str, name: &str) -> anyhow::Result<sqlx::PgPool> {
    drop_database(admin_url, name).await;
    let admin: PgConnectOptions = admin_url.parse().context("--admin-url")?;
    let mut conn = admin.connect().await.context("connecting to PostgreSQL as the admin")?;
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{name}\""))).execute(&mut conn).await?;
    conn.close().await?;
    let owner = PgPoolOptions::new().max_connections(4).connect_with(admin.database(name)).await?;
    clinflow::MIGRATOR.run(&owner).await.context("migrating the bench database")?;
    Ok(owner)
}

async fn drop_database(admin_url: &str, name: &str) {
    let Ok(admin) = admin_url.parse::<PgConnectOptions>() else { return };
    if let Ok(mut conn) = admin.connect().await {
        let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
        if let Err(e) = sqlx::query(AssertSqlSafe(sql)).execute(&mut conn).await {
            eprintln!("dropping {name}: {e}");
        }
    }
}
