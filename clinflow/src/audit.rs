//! The audit event: who did what to which resource, when, from where, and how
//! it ended. Ids only — never document text or patient references.
//!
//! The api writes its events to its outbox (in the transaction of what they
//! record), the worker publishes its own with publisher confirms; both reach
//! `{prefix}.audit`, and `clinflow-audit-sink` is the only writer of the
//! audit table.
//!
//! The event ([`AuditEvent`], module `event`), its producers' signatures
//! ([`signing`]) and its publication by the worker and the commands
//! (`publish`) are modules of their own that import only downwards: this
//! module only gathers them.

mod event;
mod publish;
pub mod signing;

pub use event::{Action, Actor, ActorKind, AuditEvent, Outcome, Resource, hex, now_micros, truncate_to_micros, unhex};
pub use publish::{Operator, publish_many};
pub use signing::{MAX_EVENTS_PER_MESSAGE, SignedEvent, Signer};
