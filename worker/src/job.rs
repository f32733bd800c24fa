//! A job taken off one of the lanes, and the consuming channels of a slot
//! that its delivery is settled on.

use clinflow::amqp::{ATTEMPTS_HEADER, Lane};
use lapin::Channel;
use lapin::message::Delivery;

/// A job taken off one of the lanes.
pub(crate) struct Job {
    pub(crate) lane: Lane,
    pub(crate) delivery: Delivery,
}

impl Job {
    /// Attempts made before this delivery (from the retry queue's header).
    pub(crate) fn attempts(&self) -> u32 {
        clinflow::amqp::header_int(&self.delivery.properties, ATTEMPTS_HEADER)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0)
    }

    /// Deliveries of this message so far (the quorum queue's count).
    pub(crate) fn redeliveries(&self) -> i64 {
        clinflow::amqp::header_int(&self.delivery.properties, "x-delivery-count").unwrap_or(0)
    }

    pub(crate) fn message_id(&self) -> &str {
        self.delivery.properties.message_id().as_ref().map_or("", |m| m.as_str())
    }
}

/// The consuming channel of each lane, for one slot.
pub(crate) struct Channels<'a> {
    pub(crate) live: &'a Channel,
    pub(crate) backfill: &'a Channel,
}

impl Channels<'_> {
    pub(crate) fn get(&self, lane: Lane) -> &Channel {
        match lane {
            Lane::Live => self.live,
            Lane::Backfill => self.backfill,
        }
    }

    pub(crate) fn connected(&self) -> bool {
        self.live.status().connected() && self.backfill.status().connected()
    }
}
