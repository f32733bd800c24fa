//! The AMQP headers clinflow sets on its messages and reads back: when a
//! message was published, attempts made at a job, why a message was parked.
//! Set in one place (`amqp::Publisher`), read through these functions.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::BasicProperties;
use lapin::types::AMQPValue;

/// Header carrying the publish time (µs since the Unix epoch), so a consumer
/// can tell how long a message waited in the queue.
pub const PUBLISHED_AT_HEADER: &str = "x-published-at-us";

pub(crate) fn unix_micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// How long ago a message was published (from [`PUBLISHED_AT_HEADER`]).
pub fn queue_wait(properties: &BasicProperties) -> Option<Duration> {
    let published = match properties.headers().as_ref()?.inner().get(PUBLISHED_AT_HEADER)? {
        AMQPValue::LongLongInt(us) => *us,
        _ => return None,
    };
    let age = unix_micros(SystemTime::now()).checked_sub(published)?;
    u64::try_from(age).ok().map(Duration::from_micros)
}

/// Header counting the attempts made at a document job that went through
/// a retry queue (absent on a first delivery).
pub const ATTEMPTS_HEADER: &str = "x-clinflow-attempts";

/// The value of an integer header, if present.
pub fn header_int(properties: &BasicProperties, name: &str) -> Option<i64> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        _ => None,
    }
}

/// The value of a string header, if present.
pub fn header_str(properties: &BasicProperties, name: &str) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(v) => Some(v.to_string()),
        AMQPValue::ShortString(v) => Some(v.to_string()),
        _ => None,
    }
}

/// Header naming, as a short code, why a message was parked in a `.dead`
/// queue by clinflow itself (the broker's own dead-lettering adds `x-death`).
pub const REASON_HEADER: &str = "x-clinflow-reason";
