//! The trunk actor: one per configured SIP trunk toward the PSTN.
//!
//! Owns the trunk's health state, which the router reads. An operator can mark a trunk
//! down through [`SetTrunkUp`]; OPTIONS health checks feed the same message.

use std::net::SocketAddr;

use actix::prelude::*;

/// One trunk.
#[derive(Debug)]
pub struct TrunkActor {
    name: String,
    addr: SocketAddr,
    up: bool,
}

impl TrunkActor {
    /// A trunk that starts up.
    pub fn new(name: String, addr: SocketAddr) -> Self {
        Self {
            name,
            addr,
            up: true,
        }
    }
}

impl Actor for TrunkActor {
    type Context = Context<Self>;
}

/// Whether the trunk can take calls, and where it is.
#[derive(Message)]
#[rtype(result = "TrunkState")]
pub struct GetTrunkState;

/// Reply to [`GetTrunkState`].
#[derive(Debug, Clone, MessageResponse)]
pub struct TrunkState {
    /// Trunk name.
    pub name: String,
    /// Signalling address.
    pub addr: SocketAddr,
    /// Whether calls may be routed to it.
    pub up: bool,
}

/// Mark the trunk up or down.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetTrunkUp(pub bool);

impl Handler<GetTrunkState> for TrunkActor {
    type Result = TrunkState;
    fn handle(&mut self, _: GetTrunkState, _: &mut Context<Self>) -> TrunkState {
        TrunkState {
            name: self.name.clone(),
            addr: self.addr,
            up: self.up,
        }
    }
}

impl Handler<SetTrunkUp> for TrunkActor {
    type Result = ();
    fn handle(&mut self, m: SetTrunkUp, _: &mut Context<Self>) {
        if self.up != m.0 {
            tracing::info!(trunk = %self.name, up = m.0, "trunk state changed");
        }
        self.up = m.0;
    }
}
