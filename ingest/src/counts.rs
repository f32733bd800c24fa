//! The reconciliation of a load: where every record read ended.

/// Every record read ends in exactly one of these.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LoadCounts {
    pub read: u64,
    /// In the state file from an earlier run: not sent again.
    pub skipped: u64,
    /// Rejected here, before sending (reason in the rejects file).
    pub rejected_here: u64,
    pub accepted: u64,
    pub duplicate: u64,
    pub rejected_by_api: u64,
    /// Sent, but no answer came (the run stopped): a rerun sends them again.
    pub unanswered: u64,
}

impl LoadCounts {
    pub fn sent(&self) -> u64 {
        self.accepted + self.duplicate + self.rejected_by_api + self.unanswered
    }

    /// Every record read is accounted for exactly once.
    pub fn reconciles(&self) -> bool {
        self.read == self.skipped + self.rejected_here + self.sent()
    }
}
