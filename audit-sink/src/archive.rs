//! The audit trail's past months, archived to files and, past retention,
//! dropped from the table.
//!
//! `audit_events` is partitioned by month of `recorded_at`, which the
//! database keeps monotonic with `seq` and equal across a batch
//! (migrations/20261208000010_audit_partitions.sql): a month holds a run of
//! consecutive rows that ends on a head the sink signed. For a month `M`
//! past the hot window, `archive` writes to its directory:
//!
//! - `audit-M.jsonl.gz`: every row of the month in `seq` order, one JSON
//!   object per line, exactly as PostgreSQL's `to_jsonb` gives it (every
//!   column, bytes as `\\x…` hex), gzip-compressed (deterministic: the same
//!   rows give the same file);
//! - `audit-M.jsonl.gz.sha256`: its SHA-256, in `sha256sum` format;
//! - `audit-M.checkpoints.jsonl`: the checkpoints of `AUDIT_CHECKPOINT_FILE`
//!   within the month, and one the archive run signs with the sink's key at
//!   the month's last row (the format of the checkpoint file).
//!
//! It then verifies the files as written ([`verify`]: checksum, chain,
//! signatures, checkpoints; public keys only) and records the month in
//! `audit_archives` with its last row's hash and head signature: once the
//! month is dropped, that is where the chain left in the table starts.
//! Dropping (`--drop`) takes the oldest month only, only once archived and
//! its file verified again, and only `AUDIT_LOG_RETENTION_DAYS` (at least
//! 2,555) after the month ended; the database function checks the same.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use clinflow::audit::signing::Signer;
use clinflow::chain::{self, ChainError, Head, StoredRow, Trust, Walk};
use clinflow::checkpoint::{self, Checkpoint, hex};
use futures_util::TryStreamExt;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use time::{Date, Month, OffsetDateTime};

/// The shortest retention the law allows here: seven years.
pub const MIN_RETENTION_DAYS: u32 = 2555;
/// Months kept in the table before they are archived, the current one
/// included (`AUDIT_ARCHIVE_HOT_MONTHS`).
pub const DEFAULT_HOT_MONTHS: u16 = 13;

pub const PARTITIONS_AHEAD: &str = "clinflow_audit_partitions_ahead";
pub const UNARCHIVED: &str = "clinflow_audit_months_unarchived_past_hot_window";
pub const LAST_ARCHIVED: &str = "clinflow_audit_archive_last_timestamp_seconds";

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0}")]
    Invalid(String),
}

impl From<sqlx::Error> for ArchiveError {
    fn from(e: sqlx::Error) -> Self {
        Self::Chain(ChainError::Db(e))
    }
}

fn invalid(message: impl Into<String>) -> ArchiveError {
    ArchiveError::Invalid(message.into())
}

/// `AUDIT_LOG_RETENTION_DAYS` (default and least: 2,555 days).
pub fn retention_days() -> anyhow::Result<u32> {
    const VAR: &str = "AUDIT_LOG_RETENTION_DAYS";
    let days = match clinflow::config::optional(VAR)? {
        None => MIN_RETENTION_DAYS,
        Some(v) => v.trim().parse::<u32>().map_err(|_| anyhow::anyhow!("{VAR} must be a whole number of days"))?,
    };
    if days < MIN_RETENTION_DAYS {
        anyhow::bail!("{VAR} is {days}: the audit trail is kept at least {MIN_RETENTION_DAYS} days (seven years)");
    }
    Ok(days)
}

/// `AUDIT_ARCHIVE_HOT_MONTHS`: months kept in the table, this one included.
pub fn hot_months() -> anyhow::Result<u16> {
    Ok(clinflow::config::positive("AUDIT_ARCHIVE_HOT_MONTHS", DEFAULT_HOT_MONTHS)?)
}

/// A month (its first day).
pub fn parse_month(text: &str) -> Option<Date> {
    let (y, m) = text.split_once('-')?;
    if y.len() != 4 || m.len() != 2 {
        return None;
    }
    let month = Month::try_from(m.parse::<u8>().ok()?).ok()?;
    Date::from_calendar_date(y.parse().ok()?, month, 1).ok()
}

pub fn month_name(month: Date) -> String {
    format!("{:04}-{:02}", month.year(), u8::from(month.month()))
}

/// The first day of the month `n` months after `month` (before, if negative).
pub fn add_months(month: Date, n: i32) -> Date {
    let index = month.year() * 12 + i32::from(u8::from(month.month())) - 1 + n;
    let (year, m) = (index.div_euclid(12), index.rem_euclid(12) + 1);
    let m = u8::try_from(m).ok().and_then(|m| Month::try_from(m).ok()).unwrap_or(Month::January);
    Date::from_calendar_date(year, m, 1).unwrap_or(month)
}

fn this_month() -> Date {
    let today = OffsetDateTime::now_utc().date();
    today.replace_day(1).unwrap_or(today)
}

/// The months not archived yet may not start before this one.
pub fn hot_window_start(hot_months: u16) -> Date {
    add_months(this_month(), 1 - i32::from(hot_months))
}

/// The first instant of `month`, UTC.
fn instant(month: Date) -> OffsetDateTime {
    month.midnight().assume_utc()
}

/// The months with a partition in the table, oldest first.
pub async fn partitions(db: &PgPool) -> Result<Vec<Date>, sqlx::Error> {
    let names = sqlx::query_scalar!(
        r#"SELECT c.relname::text AS "name!" FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
           WHERE i.inhparent = 'audit_events'::regclass"#
    )
    .fetch_all(db)
    .await?;
    let mut months: Vec<Date> = names
        .iter()
        .filter_map(|n| n.strip_prefix("audit_events_"))
        .filter_map(|ym| parse_month(&ym.replacen('_', "-", 1)))
        .collect();
    months.sort_unstable();
    Ok(months)
}

/// The files of one month's archive in `dir`.
pub struct ArchiveFiles {
    pub rows: PathBuf,
    pub checksum: PathBuf,
    pub checkpoints: PathBuf,
}

impl ArchiveFiles {
    pub fn in_dir(dir: &Path, month: Date) -> Self {
        Self::of(&dir.join(format!("audit-{}.jsonl.gz", month_name(month))))
    }

    /// The files beside the rows' file `rows` (`audit-M.jsonl.gz`).
    pub fn of(rows: &Path) -> Self {
        let name = rows.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let stem = name.strip_suffix(".jsonl.gz").unwrap_or(name);
        Self {
            rows: rows.to_path_buf(),
            checksum: rows.with_file_name(format!("{name}.sha256")),
            checkpoints: rows.with_file_name(format!("{stem}.checkpoints.jsonl")),
        }
    }
}

/// What an archive holds, once verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub first_seq: i64,
    pub last: Head,
    pub rows: i64,
    pub head_key_id: String,
    pub head_signature: Vec<u8>,
    pub sha256: String,
    pub checkpoints: usize,
    /// The row hash the first row follows (the previous month's last).
    pub follows: Vec<u8>,
}

fn sha256_of(path: &Path) -> Result<String, ArchiveError> {
    let mut file = std::fs::File::open(path).map_err(|e| ArchiveError::Io(path.into(), e))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(|e| ArchiveError::Io(path.into(), e))?;
        if n == 0 {
            return Ok(hex(&hash.finalize()));
        }
        hash.update(buf.get(..n).unwrap_or_default());
    }
}

/// Verifies an archive offline, with public keys only: the checksum file
/// matches the file; its rows form one chain (each row following the one
/// before, every event's signature, every hash, every head the sink signed)
/// from the first row's `prev_hash` (32 zero bytes at seq 1) — or from
/// `after`, the previous archive's end, when given — to a last row the sink
/// signed as a head; and its checkpoint file holds one checkpoint, signed
/// by the sink, at that last row, with every checkpoint in it matching its
/// row.
pub fn verify(rows_file: &Path, trust: &Trust, after: Option<&Head>) -> Result<Verified, ArchiveError> {
    let files = ArchiveFiles::of(rows_file);
    let sha256 = sha256_of(&files.rows)?;
    let recorded = std::fs::read_to_string(&files.checksum).map_err(|e| ArchiveError::Io(files.checksum.clone(), e))?;
    if recorded.split_whitespace().next() != Some(sha256.as_str()) {
        return Err(invalid(format!(
            "{}: the checksum does not match the file (altered or truncated)",
            rows_file.display()
        )));
    }
    let checkpoints = checkpoint::read(&files.checkpoints, trust)?;
    let mut vouched: HashMap<i64, Vec<&str>> = HashMap::new();
    for c in &checkpoints {
        vouched.entry(c.seq).or_default().push(&c.row_hash);
    }
    let file = std::fs::File::open(&files.rows).map_err(|e| ArchiveError::Io(files.rows.clone(), e))?;
    let reader = BufReader::new(flate2::read::GzDecoder::new(file));
    let mut walk: Option<Walk> = None;
    let (mut first_seq, mut rows, mut matched) = (0, 0_i64, 0_usize);
    let mut head_key = None;
    let mut follows = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| ArchiveError::Io(files.rows.clone(), e))?;
        let row: StoredRow = serde_json::from_str(&line)
            .map_err(|e| invalid(format!("{} line {}: not an audit row ({e})", rows_file.display(), n + 1)))?;
        let walk = walk.get_or_insert_with(|| {
            first_seq = row.seq;
            follows = row.prev_hash.clone();
            let start = match after {
                Some(after) => after.clone(),
                None if row.seq == 1 => Head::genesis(),
                None => Head { seq: row.seq - 1, row_hash: row.prev_hash.clone(), occurred_at: None },
            };
            Walk::from(&start)
        });
        let (seq, row_hash) = (row.seq, hex(&row.row_hash));
        head_key = row.head_key_id.clone().zip(row.head_signature.clone());
        walk.step(trust, row)?;
        if let Some(expected) = vouched.get(&seq) {
            if expected.iter().any(|hash| *hash != row_hash) {
                return Err(
                    ChainError::Broken { seq, problem: "row_hash differs from the archive's checkpoint" }.into()
                );
            }
            matched += expected.len();
        }
        rows += 1;
    }
    let last = walk.ok_or_else(|| invalid(format!("{}: holds no rows", rows_file.display())))?.end()?;
    if matched != checkpoints.len() {
        return Err(invalid(format!(
            "{}: a checkpoint vouches for a row the archive does not hold",
            files.checkpoints.display()
        )));
    }
    if !vouched.contains_key(&last.seq) {
        return Err(invalid(format!("{}: no checkpoint at the archive's last row", files.checkpoints.display())));
    }
    let (head_key_id, head_signature) =
        head_key.ok_or_else(|| invalid("the archive's last row carries no head signature (format 1)"))?;
    Ok(Verified { first_seq, last, rows, head_key_id, head_signature, sha256, checkpoints: checkpoints.len(), follows })
}

/// Which months to archive, and where.
pub struct Archiver<'a> {
    pub db: &'a PgPool,
    pub trust: &'a Trust,
    /// The sink's key: signs the checkpoint at each month's last row.
    pub signer: &'a Signer,
    pub dir: &'a Path,
    /// `AUDIT_CHECKPOINT_FILE`: its checkpoints within a month go with it.
    pub checkpoint_file: Option<&'a Path>,
}

/// What one month's run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Archived {
        rows: i64,
    },
    /// Archived before (the record and the files agree).
    AlreadyArchived,
    /// No rows: nothing to archive.
    Empty,
    Dropped {
        rows: i64,
    },
}

impl Archiver<'_> {
    /// Archives `month` (written, verified, recorded), or checks an earlier
    /// archive of it.
    pub async fn archive(&self, month: Date) -> Result<Outcome, ArchiveError> {
        let files = ArchiveFiles::in_dir(self.dir, month);
        let recorded = sqlx::query!(
            "SELECT last_seq, last_row_hash, file_sha256, dropped_at FROM audit_archives WHERE month = $1",
            month
        )
        .fetch_optional(self.db)
        .await?;
        if let Some(r) = &recorded
            && files.rows.exists()
        {
            let verified = verify(&files.rows, self.trust, None)?;
            if verified.sha256 != r.file_sha256 || verified.last.row_hash != r.last_row_hash {
                return Err(invalid(format!("{}: not the archive recorded for the month", files.rows.display())));
            }
            return Ok(Outcome::AlreadyArchived);
        }
        if recorded.as_ref().is_some_and(|r| r.dropped_at.is_some()) {
            return Err(invalid(format!(
                "{} was dropped and its archive is not in {}",
                month_name(month),
                self.dir.display()
            )));
        }
        let Some((first_seq, written)) = self.write(month, &files).await? else { return Ok(Outcome::Empty) };
        // The month must follow the one before it, online or archived.
        let after = match first_seq {
            1 => Head::genesis(),
            _ => Head { seq: first_seq - 1, row_hash: self.row_hash_before(first_seq).await?, occurred_at: None },
        };
        let verified = verify(&files.rows, self.trust, Some(&after))?;
        if verified.last != written {
            return Err(invalid("the archive read back differs from the rows written"));
        }
        if let Some(r) = recorded {
            // Written again (e.g. to another directory): the same rows give the same file.
            if r.file_sha256 != verified.sha256 || r.last_seq != verified.last.seq {
                return Err(invalid(format!(
                    "{}: differs from the archive recorded for the month",
                    files.rows.display()
                )));
            }
            return Ok(Outcome::AlreadyArchived);
        }
        let file_name = files.rows.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        sqlx::query!(
            "INSERT INTO audit_archives (month, first_seq, last_seq, row_count, last_row_hash, head_key_id,
                                         head_signature, file_name, file_sha256)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            month,
            verified.first_seq,
            verified.last.seq,
            verified.rows,
            verified.last.row_hash,
            verified.head_key_id,
            verified.head_signature,
            file_name,
            verified.sha256,
        )
        .execute(self.db)
        .await?;
        Ok(Outcome::Archived { rows: verified.rows })
    }

    /// The hash the row `first_seq` must follow: the row before it in the
    /// table, or the last row of the archived month that held it.
    async fn row_hash_before(&self, first_seq: i64) -> Result<Vec<u8>, ArchiveError> {
        if first_seq <= 1 {
            return Ok(Head::genesis().row_hash);
        }
        let online = sqlx::query_scalar!("SELECT row_hash FROM audit_events WHERE seq = $1", first_seq - 1)
            .fetch_optional(self.db)
            .await?;
        let archived =
            sqlx::query_scalar!("SELECT last_row_hash FROM audit_archives WHERE last_seq = $1", first_seq - 1)
                .fetch_optional(self.db)
                .await?;
        online.or(archived).ok_or_else(|| {
            ChainError::Broken {
                seq: first_seq - 1,
                problem: "missing: the month before it is neither online nor archived",
            }
            .into()
        })
    }

    /// Writes the month's rows, checksum and checkpoints; returns the first
    /// seq and the last row (`None`: the month has no rows, nothing is
    /// written).
    async fn write(&self, month: Date, files: &ArchiveFiles) -> Result<Option<(i64, Head)>, ArchiveError> {
        std::fs::create_dir_all(self.dir).map_err(|e| ArchiveError::Io(self.dir.into(), e))?;
        let partial = files.rows.with_extension("gz.partial");
        let io = |e| ArchiveError::Io(partial.clone(), e);
        let file = std::fs::File::create(&partial).map_err(io)?;
        let mut gz = flate2::write::GzEncoder::new(BufWriter::new(file), flate2::Compression::default());
        let mut rows = sqlx::query_scalar!(
            r#"SELECT to_jsonb(a)::text AS "row!" FROM audit_events a
               WHERE a.recorded_at >= $1 AND a.recorded_at < $2 ORDER BY a.seq"#,
            instant(month),
            instant(add_months(month, 1)),
        )
        .fetch(self.db);
        let mut last: Option<StoredRow> = None;
        let mut first_seq = 0;
        while let Some(line) = rows.try_next().await? {
            let row: StoredRow =
                serde_json::from_str(&line).map_err(|e| invalid(format!("a row of the table: {e}")))?;
            if last.is_none() {
                first_seq = row.seq;
            }
            last = Some(row);
            gz.write_all(line.as_bytes()).map_err(io)?;
            gz.write_all(b"\n").map_err(io)?;
        }
        let Some(last) = last else {
            drop(gz);
            let _ = std::fs::remove_file(&partial);
            return Ok(None);
        };
        let file = gz.finish().map_err(io)?.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&partial, &files.rows).map_err(|e| ArchiveError::Io(files.rows.clone(), e))?;

        let name = files.rows.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let sum = format!("{}  {name}\n", sha256_of(&files.rows)?);
        write_synced(&files.checksum, sum.as_bytes())?;

        // The checkpoints within the month, and one at its last row.
        let mut lines = Vec::new();
        if let Some(path) = self.checkpoint_file.filter(|p| p.exists()) {
            for c in checkpoint::read(path, self.trust)? {
                if (first_seq..=last.seq).contains(&c.seq) {
                    lines.push(c);
                }
            }
        }
        lines.push(Checkpoint::new(self.signer, last.seq, &last.row_hash, chain::now()));
        let mut text = Vec::new();
        for c in &lines {
            serde_json::to_writer(&mut text, c).map_err(|e| invalid(e.to_string()))?;
            text.push(b'\n');
        }
        write_synced(&files.checkpoints, &text)?;
        Ok(Some((first_seq, Head { seq: last.seq, row_hash: last.row_hash, occurred_at: Some(last.occurred_at) })))
    }

    /// Drops `month` from the table: its archive in the directory must
    /// verify and be the one recorded; the database function checks the
    /// retention, that it is the oldest month and that its rows are those
    /// archived. A month without rows and without archive is dropped too.
    pub async fn drop_month(&self, month: Date, retention_days: u32) -> Result<Outcome, ArchiveError> {
        let recorded = sqlx::query!("SELECT file_sha256 FROM audit_archives WHERE month = $1", month)
            .fetch_optional(self.db)
            .await?;
        if let Some(r) = recorded {
            let files = ArchiveFiles::in_dir(self.dir, month);
            let verified = verify(&files.rows, self.trust, None)?;
            if verified.sha256 != r.file_sha256 {
                return Err(invalid(format!("{}: not the archive recorded for the month", files.rows.display())));
            }
        }
        let days = i32::try_from(retention_days).map_err(|_| invalid("retention too long"))?;
        let rows = sqlx::query_scalar!(r#"SELECT audit_events_drop_partition($1, $2) AS "rows!""#, month, days)
            .fetch_one(self.db)
            .await?;
        Ok(Outcome::Dropped { rows })
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), ArchiveError> {
    let io = |e| ArchiveError::Io(path.into(), e);
    let mut file = std::fs::File::create(path).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

/// Creates this month's and next month's partitions if they are missing
/// (`audit_events_ensure_partitions()`, which the sink may call but not
/// steer); returns how many it created.
pub async fn create_ahead(db: &PgPool) -> Result<i32, sqlx::Error> {
    let created = sqlx::query_scalar!(r#"SELECT audit_events_ensure_partitions() AS "created!""#).fetch_one(db).await?;
    if created > 0 {
        tracing::info!(created, "audit partitions created ahead");
    }
    Ok(created)
}

/// Creates this month's and next month's partitions if they are missing
/// (`audit_events_ensure_partitions()`), and refreshes the gauges of the
/// archive's state. Returns how many partitions it created.
pub async fn ensure_partitions(db: &PgPool, hot_months: u16) -> Result<i32, sqlx::Error> {
    let created = create_ahead(db).await?;
    let months = partitions(db).await?;
    let now = this_month();
    metrics::gauge!(PARTITIONS_AHEAD).set(months.iter().filter(|m| **m > now).count() as f64);
    let archived = sqlx::query!(r#"SELECT month AS "month!", archived_at AS "archived_at!" FROM audit_archives"#)
        .fetch_all(db)
        .await?;
    let cutoff = hot_window_start(hot_months);
    let unarchived = months.iter().filter(|m| **m < cutoff && !archived.iter().any(|a| a.month == **m)).count();
    metrics::gauge!(UNARCHIVED).set(unarchived as f64);
    if let Some(newest) = archived.iter().map(|a| a.archived_at).max() {
        metrics::gauge!(LAST_ARCHIVED).set(newest.unix_timestamp() as f64);
    }
    Ok(created)
}

/// Describes the archive's gauges (the sink keeps them).
pub fn register() {
    metrics::describe_gauge!(PARTITIONS_AHEAD, "Audit partitions of months after this one (should stay at least 1)");
    metrics::describe_gauge!(UNARCHIVED, "Audit months past the hot window (AUDIT_ARCHIVE_HOT_MONTHS) not archived");
    metrics::describe_gauge!(LAST_ARCHIVED, metrics::Unit::Seconds, "Unix time of the newest archive recorded");
}

/// One archive run's results, for a Prometheus textfile collector (a
/// one-shot command has no port to be scraped on): months by outcome, rows
/// archived and dropped, the run's time and whether it succeeded. No
/// label names a month or anything in it.
#[derive(Debug, Default)]
pub struct RunMetrics {
    pub archived: u64,
    pub already: u64,
    pub empty: u64,
    pub dropped: u64,
    pub failed: u64,
    pub rows_archived: i64,
    pub rows_dropped: i64,
}

impl RunMetrics {
    pub fn count(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Archived { rows } => {
                self.archived += 1;
                self.rows_archived += rows;
            }
            Outcome::AlreadyArchived => self.already += 1,
            Outcome::Empty => self.empty += 1,
            Outcome::Dropped { rows } => {
                self.dropped += 1;
                self.rows_dropped += rows;
            }
        }
    }

    pub fn render(&self, at: OffsetDateTime) -> String {
        let mut out = String::from(
            "# HELP clinflow_audit_archive_run_months Audit months handled by the last archive run, by outcome\n\
             # TYPE clinflow_audit_archive_run_months gauge\n",
        );
        for (outcome, n) in [
            ("archived", self.archived),
            ("already_archived", self.already),
            ("empty", self.empty),
            ("dropped", self.dropped),
            ("failed", self.failed),
        ] {
            out.push_str(&format!("clinflow_audit_archive_run_months{{outcome=\"{outcome}\"}} {n}\n"));
        }
        out.push_str(&format!(
            "# HELP clinflow_audit_archive_run_rows Audit rows archived and dropped by the last archive run\n\
             # TYPE clinflow_audit_archive_run_rows gauge\n\
             clinflow_audit_archive_run_rows{{step=\"archived\"}} {}\n\
             clinflow_audit_archive_run_rows{{step=\"dropped\"}} {}\n\
             # HELP clinflow_audit_archive_run_timestamp_seconds Unix time the last archive run ended\n\
             # TYPE clinflow_audit_archive_run_timestamp_seconds gauge\n\
             clinflow_audit_archive_run_timestamp_seconds {}\n\
             # HELP clinflow_audit_archive_run_success 1 if the last archive run handled every month, else 0\n\
             # TYPE clinflow_audit_archive_run_success gauge\n\
             clinflow_audit_archive_run_success {}\n",
            self.rows_archived,
            self.rows_dropped,
            at.unix_timestamp(),
            u8::from(self.failed == 0),
        ));
        out
    }

    /// Writes the file whole (a temporary file renamed over it).
    pub fn write(&self, path: &Path) -> Result<(), ArchiveError> {
        let partial = path.with_extension("prom.partial");
        write_synced(&partial, self.render(OffsetDateTime::now_utc()).as_bytes())?;
        std::fs::rename(&partial, path).map_err(|e| ArchiveError::Io(path.into(), e))
    }
}
