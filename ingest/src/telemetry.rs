//! Logging: `tracing` to stderr, filtered by `RUST_LOG` (default: warnings,
//! plus this tool's own info lines). Lines are written around the progress
//! bar instead of through it. Log fields carry source_refs and ids only.

use std::io::{self, IsTerminal, Write};
use std::sync::{Arc, Mutex, PoisonError};

use indicatif::ProgressBar;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

const DEFAULT_FILTER: &str = "warn,clinflow_ingest=info";

/// Where log lines go: stderr, suspending the progress bar while writing.
#[derive(Clone, Default)]
pub struct LogSink {
    bar: Arc<Mutex<Option<ProgressBar>>>,
}

impl LogSink {
    pub fn attach(&self, bar: &ProgressBar) {
        *self.slot() = Some(bar.clone());
    }

    pub fn detach(&self) {
        *self.slot() = None;
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<ProgressBar>> {
        self.bar.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub struct SinkWriter {
    bar: Option<ProgressBar>,
}

impl Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // The formatter hands over one whole event per call.
        match &self.bar {
            Some(bar) => bar.suspend(|| io::stderr().write_all(buf))?,
            None => io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for LogSink {
    type Writer = SinkWriter;

    fn make_writer(&'a self) -> SinkWriter {
        SinkWriter { bar: self.slot().clone() }
    }
}

/// Installs the global subscriber (a second call is a no-op).
pub fn init(sink: LogSink) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let _already_set = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(sink)
        .with_ansi(io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}
