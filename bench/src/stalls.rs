//! Where a slow second of the latency run went: the api's own stage
//! histograms, PostgreSQL's WAL and checkpointer counters and autovacuum
//! workers, and the machine's CPU (its steal time: the host's other
//! tenants), sampled once a second beside the disk's flush probe (`disk`),
//! so that each second with a request over 20 ms is put down to a stage,
//! to the disk, or to what lies outside the api's handler (the client, TLS,
//! the scheduler).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::PgPool;

use crate::prom::{self, Snapshot};
use crate::stack::{API, Stack};

/// The api's stages on the upload path, as its histogram labels them
/// (api/src/documents.rs, api/src/guard.rs), and the whole request.
const STAGES: [&str; 7] = ["auth", "begin", "data_key", "seal", "insert", "outbox", "commit"];
const REQUEST: &str = "request";

#[derive(Debug, Clone, Copy, Default)]
struct Pg {
    wal_syncs: i64,
    wal_buffers_full: i64,
    checkpoint_buffers: i64,
    checkpoints: i64,
    autovacuum_workers: i64,
}

struct Sample {
    at: Instant,
    api: Snapshot,
    pg: Pg,
    /// /proc/stat's first line: (busy, steal, all) jiffies.
    cpu: (u64, u64, u64),
}

fn cpu() -> (u64, u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> =
        stat.lines().next().unwrap_or_default().split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal …
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    let all: u64 = f.iter().take(8).sum();
    (all - at(3) - at(4) - at(7), at(7), all)
}

pub struct Sampler {
    samples: Arc<Mutex<Vec<Sample>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    /// Samples every second until stopped (a failed scrape skips a sample).
    pub fn start(stack: &Stack, db: &PgPool) -> anyhow::Result<Self> {
        let url = stack.service(API).ok_or_else(|| anyhow::anyhow!("the api is not running"))?.metrics_url.clone();
        let (db, samples) = (db.clone(), Arc::new(Mutex::new(Vec::new())));
        let task = {
            let samples = Arc::clone(&samples);
            tokio::spawn(async move {
                let http = crate::http::client();
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    let (Ok(api), Ok(pg)) = (prom::scrape(&http, &url).await, pg(&db).await) else { continue };
                    let sample = Sample { at: Instant::now(), api, pg, cpu: cpu() };
                    samples.lock().unwrap_or_else(PoisonError::into_inner).push(sample);
                }
            })
        };
        Ok(Self { samples, task })
    }

    pub fn stop(self) -> Samples {
        self.task.abort();
        Samples(std::mem::take(&mut *self.samples.lock().unwrap_or_else(PoisonError::into_inner)))
    }
}

async fn pg(db: &PgPool) -> Result<Pg, sqlx::Error> {
    let (wal_syncs, wal_buffers_full, checkpoint_buffers, checkpoints, autovacuum_workers): (i64, i64, i64, i64, i64) =
        sqlx::query_as(
            "SELECT w.wal_sync, w.wal_buffers_full, b.buffers_checkpoint, b.checkpoints_timed + b.checkpoints_req,
                    (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker')
             FROM pg_stat_wal w, pg_stat_bgwriter b",
        )
        .fetch_one(db)
        .await?;
    Ok(Pg { wal_syncs, wal_buffers_full, checkpoint_buffers, checkpoints, autovacuum_workers })
}

pub struct Samples(Vec<Sample>);

/// What happened in the api and PostgreSQL from `from` until a second after
/// `to` (a request sent in a second may finish in the next).
#[derive(Debug, Serialize, Default, Clone)]
pub struct Attribution {
    /// Observations over 20 ms, by stage ("request": the whole handler).
    pub over_20ms: Vec<(&'static str, f64)>,
    /// Each stage's mean then, in ms.
    pub mean_ms: Vec<(&'static str, f64)>,
    /// The machine's CPUs busy, and stolen by the host, as a fraction.
    pub cpu_busy: f64,
    pub cpu_steal: f64,
    /// Autovacuum workers seen running in the samples.
    pub autovacuum_workers: i64,
    pub wal_syncs: i64,
    pub wal_buffers_full: i64,
    /// Buffers the checkpointer wrote meanwhile (a checkpoint under way).
    pub checkpoint_buffers: i64,
    pub checkpoints_started: i64,
    /// The verdict: the stage holding most of the slow requests; else every
    /// stage slower (five or more slow requests) or a request or two across
    /// stages; or "outside the handler" when the api saw none over 20 ms.
    pub cause: String,
}

impl Samples {
    pub fn attribute(&self, from: Instant, to: Instant, longest_flush_ms: f64) -> Option<Attribution> {
        let first = self.0.iter().rev().find(|s| s.at <= from)?;
        let last = self.0.iter().find(|s| s.at >= to + Duration::from_secs(1)).or(self.0.last())?;
        let over = |stage: &str| {
            let (metric, labels): (&str, Vec<(&str, &str)>) = if stage == REQUEST {
                ("clinflow_http_request_seconds", vec![("route", "/v1/documents"), ("method", "POST")])
            } else {
                ("clinflow_api_stage_seconds", vec![("stage", stage)])
            };
            let count = format!("{metric}_count");
            let bucket = format!("{metric}_bucket");
            let mut under = labels.clone();
            under.push(("le", "0.02"));
            let delta = |name: &str, l: &[(&str, &str)]| last.api.sum(name, l) - first.api.sum(name, l);
            delta(&count, &labels) - delta(&bucket, &under)
        };
        let over_20ms: Vec<(&'static str, f64)> =
            STAGES.iter().chain([&REQUEST]).map(|s| (*s, over(s))).filter(|(_, n)| *n > 0.0).collect();
        let mean_ms: Vec<(&'static str, f64)> = STAGES
            .iter()
            .map(|s| {
                let l = [("stage", *s)];
                let d = |name: &str| last.api.sum(name, &l) - first.api.sum(name, &l);
                let n = d("clinflow_api_stage_seconds_count");
                (*s, if n > 0.0 { d("clinflow_api_stage_seconds_sum") / n * 1e3 } else { 0.0 })
            })
            .collect();
        let slow_requests = over_20ms.iter().find(|(s, _)| *s == REQUEST).map_or(0.0, |(_, n)| *n);
        let (slowest, slow_in_stage) = over_20ms
            .iter()
            .filter(|(s, _)| *s != REQUEST)
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map_or(("", 0.0), |(s, n)| (*s, *n));
        let (busy, steal, all) =
            (last.cpu.0 - first.cpu.0, last.cpu.1 - first.cpu.1, (last.cpu.2 - first.cpu.2).max(1));
        let (cpu_busy, cpu_steal) = (busy as f64 / all as f64, steal as f64 / all as f64);
        // A stage is the cause when it holds most of the slow requests;
        // else they were slow a little in every stage (the CPU, most often).
        let cause = if slow_in_stage > 0.0 && slow_in_stage * 2.0 >= slow_requests {
            if longest_flush_ms > 20.0 {
                format!("{slowest} (disk flush {longest_flush_ms:.0} ms)")
            } else {
                slowest.to_owned()
            }
        } else if slow_requests >= 5.0 {
            let (stage, ms) = mean_ms.iter().copied().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap_or(("", 0.0));
            format!("every stage slower (longest mean: {stage} {ms:.1} ms)")
        } else if slow_requests > 0.0 {
            "a request or two, across stages".to_owned()
        } else {
            "outside the handler (client, TLS, scheduling)".to_owned()
        };
        Some(Attribution {
            over_20ms,
            wal_syncs: last.pg.wal_syncs - first.pg.wal_syncs,
            wal_buffers_full: last.pg.wal_buffers_full - first.pg.wal_buffers_full,
            checkpoint_buffers: last.pg.checkpoint_buffers - first.pg.checkpoint_buffers,
            checkpoints_started: last.pg.checkpoints - first.pg.checkpoints,
            mean_ms,
            cpu_busy,
            cpu_steal,
            autovacuum_workers: self
                .0
                .iter()
                .filter(|s| s.at >= first.at && s.at <= last.at)
                .map(|s| s.pg.autovacuum_workers)
                .max()
                .unwrap_or(0),
            cause,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: Instant, text: &str) -> Sample {
        Sample { at, api: prom::parse(text), pg: Pg::default(), cpu: (0, 0, 100) }
    }

    /// Two commits and three whole requests over 20 ms (of four), between
    /// two samples: the commit is the cause, as the disk was slow then.
    #[test]
    fn puts_a_slow_second_down_to_the_stage_holding_its_slow_requests() {
        let t0 = Instant::now();
        let before = "clinflow_api_stage_seconds_count{stage=\"commit\"} 10\n\
                      clinflow_api_stage_seconds_bucket{stage=\"commit\",le=\"0.02\"} 10\n\
                      clinflow_api_stage_seconds_sum{stage=\"commit\"} 0.01\n\
                      clinflow_http_request_seconds_count{method=\"POST\",route=\"/v1/documents\"} 10\n\
                      clinflow_http_request_seconds_bucket{method=\"POST\",route=\"/v1/documents\",le=\"0.02\"} 10\n";
        let after = "clinflow_api_stage_seconds_count{stage=\"commit\"} 14\n\
                     clinflow_api_stage_seconds_bucket{stage=\"commit\",le=\"0.02\"} 12\n\
                     clinflow_api_stage_seconds_bucket{stage=\"commit\",le=\"0.025\"} 12\n\
                     clinflow_api_stage_seconds_sum{stage=\"commit\"} 0.09\n\
                     clinflow_http_request_seconds_count{method=\"POST\",route=\"/v1/documents\"} 14\n\
                     clinflow_http_request_seconds_bucket{method=\"POST\",route=\"/v1/documents\",le=\"0.02\"} 11\n";
        let samples = Samples(vec![sample(t0, before), sample(t0 + Duration::from_secs(3), after)]);
        let from = t0 + Duration::from_millis(500);
        let a = samples.attribute(from, from + Duration::from_secs(1), 45.0).expect("sampled");
        assert_eq!(a.over_20ms, vec![("commit", 2.0), ("request", 3.0)]);
        assert_eq!(a.cause, "commit (disk flush 45 ms)");
        let commit = a.mean_ms.iter().find(|(s, _)| *s == "commit").expect("commit").1;
        assert!((commit - 20.0).abs() < 1e-9, "{commit}");

        // The same second with no stage over 20 ms: outside the handler.
        let quiet = Samples(vec![sample(t0, before), sample(t0 + Duration::from_secs(3), before)]);
        let a = quiet.attribute(from, from + Duration::from_secs(1), 0.0).expect("sampled");
        assert_eq!(a.cause, "outside the handler (client, TLS, scheduling)");
        // Before the first sample nothing can be said.
        assert!(quiet.attribute(t0 - Duration::from_secs(1), t0, 0.0).is_none());
    }
}
