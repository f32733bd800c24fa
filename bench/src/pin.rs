//! CPU placement for the ratio rounds. On this machine the whole pipeline
//! shares 2 cores with MedCAT, which then waits for a CPU (17 % of its time
//! in the pipeline against 1 % alone): the ratio measures the machine as
//! much as the pipeline. So each round is measured twice: everything
//! sharing every core, and MedCAT alone on core 0 with everything else —
//! PostgreSQL, RabbitMQ, the services, this harness — on the others, as in
//! a deployment that gives MedCAT its own CPUs. Direct and pipeline get the
//! same placement within a pair.
//!
//! Affinity is set with `taskset` on every thread of the processes; new
//! threads and PostgreSQL's new backends inherit it from their parent. It
//! is put back on every core by `Pinned::release`, or on drop, and
//! `bench/run` puts it back again at exit in case this process was killed.
//! Processes other than these (a `./dev/up` stack beside the bench) are
//! left where they are.

use std::process::Command;

/// Processes, by command name, that go with the pipeline.
const PIPELINE: [&str; 2] = ["postgres", "beam.smp"];

pub struct Pinned {
    medcat: u32,
    services: Vec<u32>,
    /// Every core, as taskset writes it. Read before pinning: once this
    /// process is pinned, `available_parallelism` counts its one core.
    all: String,
    released: bool,
}

impl Pinned {
    /// MedCAT (`medcat`, every thread) on core 0; PostgreSQL, RabbitMQ,
    /// `services` and this process on cores 1.. . None on a single core. On
    /// an error (a process this user may not move), whatever was moved is
    /// put back before it returns.
    pub fn medcat_alone(medcat: u32, services: Vec<u32>) -> anyhow::Result<Option<Self>> {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        if cores < 2 {
            return Ok(None);
        }
        let mut pinned = Self { medcat, services, all: format!("0-{}", cores - 1), released: false };
        if let Err(e) = taskset("0", medcat) {
            pinned.released = true; // nothing moved
            return Err(e);
        }
        let rest = format!("1-{}", cores - 1);
        for pid in pinned.pipeline() {
            taskset(&rest, pid)?;
        }
        Ok(Some(pinned))
    }

    /// Every pipeline process now, including backends started since.
    fn pipeline(&self) -> Vec<u32> {
        let mut pids = crate::stack::pids_of(&PIPELINE);
        pids.extend(&self.services);
        pids.push(std::process::id());
        pids
    }

    /// Every process back on every core. Errors are reported, not returned:
    /// a process may have exited since.
    pub fn release(mut self) {
        self.restore();
    }

    fn restore(&mut self) {
        if std::mem::replace(&mut self.released, true) {
            return;
        }
        let failed: Vec<anyhow::Error> = std::iter::once(self.medcat)
            .chain(self.pipeline())
            .filter_map(|pid| taskset(&self.all, pid).err())
            .collect();
        if let Some(first) = failed.first() {
            eprintln!("   {} processes not put back on every core, e.g. {first:#}", failed.len());
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        self.restore();
    }
}

/// `taskset -a -p -c <cpus> <pid>`: every thread of `pid`. A process that
/// has exited meanwhile is not an error; a thread that exited between
/// taskset listing and setting it fails the call, which is tried again.
fn taskset(cpus: &str, pid: u32) -> anyhow::Result<()> {
    let mut attempt = 0;
    loop {
        let out = Command::new("taskset")
            .args(["-a", "-p", "-c", cpus, &pid.to_string()])
            .output()
            .map_err(|e| anyhow::anyhow!("running taskset (util-linux): {e}"))?;
        if out.status.success() || !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return Ok(());
        }
        attempt += 1;
        anyhow::ensure!(attempt < 3, "taskset -c {cpus} {pid}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
}
