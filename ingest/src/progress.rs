//! The progress bar on stderr. Hidden when stderr is not a terminal or with
//! `--quiet`, so logs and pipes stay clean.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::counts::LoadCounts;

#[derive(Clone)]
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    pub fn new(visible: bool) -> Self {
        let bar = if visible {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(style(false));
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        } else {
            ProgressBar::hidden()
        };
        Self { bar }
    }

    pub fn hidden() -> Self {
        Self::new(false)
    }

    pub fn bar(&self) -> &ProgressBar {
        &self.bar
    }

    pub fn is_visible(&self) -> bool {
        !self.bar.is_hidden()
    }

    /// Once the total is known the bar can show a fill and an ETA.
    pub fn set_total(&self, total: u64) {
        self.bar.set_length(total);
        self.bar.set_style(style(true));
    }

    /// One record handled (skipped or rejected here).
    pub fn record(&self, counts: &LoadCounts) {
        self.inc(1, counts);
    }

    pub fn inc(&self, n: u64, counts: &LoadCounts) {
        self.bar.inc(n);
        let mut message = format!(
            "accepted {} · duplicate {} · skipped {} · rejected {}",
            counts.accepted,
            counts.duplicate,
            counts.skipped,
            counts.rejected_here + counts.rejected_by_api
        );
        if counts.unanswered > 0 {
            message.push_str(&format!(" · unanswered {}", counts.unanswered));
        }
        self.bar.set_message(message);
    }

    pub fn set_position(&self, position: u64, message: &str) {
        self.bar.set_position(position);
        self.bar.set_message(message.to_owned());
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

fn style(with_total: bool) -> ProgressStyle {
    let template = if with_total {
        "{spinner} {elapsed_precise} [{wide_bar}] {human_pos}/{human_len} ({per_sec:1}, ETA {eta}) {msg}"
    } else {
        "{spinner} {elapsed_precise} {human_pos} ({per_sec:1}) {msg}"
    };
    ProgressStyle::with_template(template)
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}
