//! Refusals on the audit trail — failed authentications (no, bad, expired
//! or ended-session tokens) and 403s — rate-limited per source address, so
//! a flood of bad requests cannot drown the trail. Past the limit a refusal
//! is counted (`clinflow_audit_denials_suppressed_total`) instead of
//! audited, and the next refusal audited from that address is preceded by
//! an `auth.denials_suppressed` event carrying the count.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU32;
use std::sync::Mutex;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

pub struct DenialLimiter {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    suppressed: Mutex<HashMap<IpAddr, u64>>,
}

/// What to do with one refusal.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Audit it; `suppressed` refusals from the same address went unaudited
    /// since the last audited one.
    Audit {
        suppressed: u64,
    },
    Suppress,
}

impl DenialLimiter {
    pub fn new(quota: Quota) -> Self {
        Self { limiter: RateLimiter::keyed(quota), suppressed: Mutex::new(HashMap::new()) }
    }

    /// `per_minute` audited refusals per address, in bursts of as many.
    pub fn per_minute(per_minute: NonZeroU32) -> Self {
        Self::new(Quota::per_minute(per_minute))
    }

    pub fn verdict(&self, source: Option<IpAddr>) -> Verdict {
        let key = source.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let mut suppressed = self.suppressed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.limiter.check_key(&key).is_ok() {
            if suppressed.len() > 10_000 {
                // Bounded memory under a flood from many addresses.
                self.limiter.retain_recent();
                suppressed.retain(|_, n| *n > 0);
            }
            return Verdict::Audit { suppressed: suppressed.remove(&key).unwrap_or(0) };
        }
        *suppressed.entry(key).or_default() += 1;
        metrics::counter!("clinflow_audit_denials_suppressed_total").increment(1);
        Verdict::Suppress
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_quota_refusals_are_counted_and_reported_with_the_next_audited_one() {
        let limiter = DenialLimiter::new(Quota::per_hour(NonZeroU32::new(1).unwrap()));
        let (a, b) = (Some("10.0.0.1".parse().unwrap()), Some("10.0.0.2".parse().unwrap()));
        assert_eq!(limiter.verdict(a), Verdict::Audit { suppressed: 0 });
        assert_eq!(limiter.verdict(a), Verdict::Suppress);
        assert_eq!(limiter.verdict(a), Verdict::Suppress);
        assert_eq!(limiter.verdict(b), Verdict::Audit { suppressed: 0 }, "per address");
        assert_eq!(*limiter.suppressed.lock().unwrap().get(&"10.0.0.1".parse().unwrap()).unwrap(), 2);
    }
}
