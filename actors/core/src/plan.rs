//! What a call should ring: legs, steps and plans, shared by the rules (which produce
//! plans) and the call state machine (which follows them).

use std::time::Duration;

/// An outbound leg of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LegId {
    /// An IM device, by session id.
    Device(u64),
    /// The PSTN line through the trunk.
    Trunk,
}

/// A step of a plan: legs rung together, and how long before the next step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Legs to ring in parallel.
    pub legs: Vec<LegId>,
    /// Time before the next step (none: until the ring timeout).
    pub timeout: Option<Duration>,
}

/// What to do with a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Ring these steps in order.
    Ring(Vec<Step>),
    /// Forward to this number through the trunk.
    Forward(String),
    /// A PSTN number dialled from an IM device, through the trunk.
    Dial(String),
    /// Refuse with this SIP status.
    Reject(u16),
    /// Nowhere to ring: 480.
    Unavailable,
}

impl Plan {
    /// The metric label of a routing decision.
    pub fn label(&self) -> &'static str {
        match self {
            Plan::Ring(_) => "ring",
            Plan::Forward(_) | Plan::Dial(_) => "forward",
            Plan::Reject(_) => "reject",
            Plan::Unavailable => "none",
        }
    }
}
