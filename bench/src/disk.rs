//! How long the disk takes to make a small write durable, sampled through a
//! run: the wait every commit of PostgreSQL (and so every audited request)
//! shares. On this machine the disk is a virtual one on a shared host, and
//! it sometimes holds a flush for hundreds of milliseconds; a p99 taken over
//! such a moment says more about the host than about clinflow. The probe
//! lets a report tell the two apart instead of guessing; so does counting
//! what the machine read from its disks meanwhile (`bytes_read`), for the
//! other kind of stall: pages that were not in the page cache.

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One 4 KiB write and `fdatasync` every `EVERY`, in a thread of its own.
const EVERY: Duration = Duration::from_millis(100);

pub struct FlushProbe {
    samples: Arc<Mutex<Vec<(Instant, Duration)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    path: std::path::PathBuf,
}

impl FlushProbe {
    /// Starts sampling with a file in `dir` (on the disk to watch).
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("flush-probe");
        let file = File::create(&path)?;
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (samples, stop) = (Arc::clone(&samples), Arc::clone(&stop));
            std::thread::spawn(move || {
                let block = [0x5a_u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let began = Instant::now();
                    if file.write_all_at(&block, 0).and_then(|()| file.sync_data()).is_err() {
                        return;
                    }
                    samples.lock().unwrap_or_else(PoisonError::into_inner).push((began, began.elapsed()));
                    std::thread::sleep(EVERY);
                }
            })
        };
        Ok(Self { samples, stop, thread: Some(thread), path })
    }

    /// The longest flush that was under way at any time in `from..to`.
    pub fn longest(&self, from: Instant, to: Instant) -> Duration {
        let samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        samples
            .iter()
            .filter(|(began, took)| *began < to && *began + *took > from)
            .map(|(_, took)| *took)
            .max()
            .unwrap_or_default()
    }
}

/// Bytes read so far from the machine's disks (`/proc/diskstats`, whole
/// disks from `/sys/block` but loop, RAM and zram devices): what missed the
/// kernel's page cache.
pub fn bytes_read() -> u64 {
    let disks: Vec<String> = std::fs::read_dir("/sys/block")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|name| !["loop", "ram", "zram"].iter().any(|p| name.starts_with(p)))
                .collect()
        })
        .unwrap_or_default();
    let stats = std::fs::read_to_string("/proc/diskstats").unwrap_or_default();
    stats
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // major minor name reads merged sectors-read ...
            let (name, sectors) = (*fields.get(2)?, fields.get(5)?.parse::<u64>().ok()?);
            disks.iter().any(|d| d == name).then_some(sectors * 512)
        })
        .sum()
}

impl Drop for FlushProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
