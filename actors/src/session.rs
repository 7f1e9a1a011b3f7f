//! The presence session actor: one per logged-in IM device connection.
//!
//! The switch's QUIC driver authenticates the device, starts this actor, feeds it the
//! device's control messages ([`FromClient`]) and writes what the actor pushes to the
//! bounded `out` queue. The actor keeps the calls offered to the device so that its
//! answers reach the right call actor, and tells them when the device goes away.

use std::collections::HashMap;

use actix::prelude::*;
use parley_codecs::control::{ClientMsg, ServerMsg};
use tokio::sync::mpsc;

use crate::messages::{DeviceLegEvent, FromDevice, SessionId, ToDevice};
use crate::metrics as m;
use crate::user::{Attach, Detach, PresenceUpdate, UserActor};

/// A device session.
pub struct PresenceSession {
    id: SessionId,
    device: String,
    user: Addr<UserActor>,
    out: mpsc::Sender<ServerMsg>,
    calls: HashMap<String, Recipient<FromDevice>>,
}

impl PresenceSession {
    /// A session for an authenticated device; `out` is the device's send queue.
    pub fn new(
        id: SessionId,
        device: String,
        user: Addr<UserActor>,
        out: mpsc::Sender<ServerMsg>,
    ) -> Self {
        Self {
            id,
            device,
            user,
            out,
            calls: HashMap::new(),
        }
    }

    fn send(&self, msg: ServerMsg) {
        if self.out.try_send(msg).is_err() {
            metrics::counter!(m::DEVICE_QUEUE_DROPS_TOTAL).increment(1);
            tracing::warn!(
                session = self.id,
                "device send queue full or closed; message dropped"
            );
        }
    }

    fn forward_to_call(&mut self, call_id: &str, event: DeviceLegEvent, keep: bool) {
        let rec = if keep {
            self.calls.get(call_id).cloned()
        } else {
            self.calls.remove(call_id)
        };
        match rec {
            Some(r) => r.do_send(FromDevice {
                session: self.id,
                event,
            }),
            None => self.send(ServerMsg::Error {
                code: "unknown_call".into(),
                message: format!("no call {call_id} on this device"),
                fatal: false,
            }),
        }
    }
}

impl Actor for PresenceSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        metrics::gauge!(m::PRESENCE_SESSIONS_ACTIVE).increment(1.0);
        self.user.do_send(Attach {
            session: self.id,
            device: self.device.clone(),
            addr: ctx.address(),
        });
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        metrics::gauge!(m::PRESENCE_SESSIONS_ACTIVE).decrement(1.0);
        self.user.do_send(Detach(self.id));
        for (_, call) in self.calls.drain() {
            call.do_send(FromDevice {
                session: self.id,
                event: DeviceLegEvent::Gone,
            });
        }
    }
}

/// A control message from the device (after login).
#[derive(Message)]
#[rtype(result = "()")]
pub struct FromClient(pub ClientMsg);

/// The device's connection closed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnected;

/// Send this message to the device as is.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Push(pub ServerMsg);

impl Handler<FromClient> for PresenceSession {
    type Result = ();
    fn handle(&mut self, msg: FromClient, _: &mut Context<Self>) {
        match msg.0 {
            ClientMsg::Presence {
                status, idle_ms, ..
            } => {
                let label = match status {
                    parley_codecs::control::Status::Available => "available",
                    parley_codecs::control::Status::Away => "away",
                    parley_codecs::control::Status::Busy => "busy",
                    parley_codecs::control::Status::DoNotDisturb => "do_not_disturb",
                    parley_codecs::control::Status::Offline => "offline",
                };
                metrics::counter!(m::PRESENCE_UPDATES_TOTAL, "status" => label).increment(1);
                self.user.do_send(PresenceUpdate {
                    session: self.id,
                    status,
                    idle_ms,
                });
            }
            ClientMsg::Answer { call_id } => {
                self.forward_to_call(&call_id, DeviceLegEvent::Answer, true)
            }
            ClientMsg::Reject { call_id } => {
                self.forward_to_call(&call_id, DeviceLegEvent::Reject, false)
            }
            ClientMsg::Hangup { call_id } => {
                self.forward_to_call(&call_id, DeviceLegEvent::Hangup, false)
            }
            ClientMsg::Ping { id } => self.send(ServerMsg::Pong { id }),
            ClientMsg::Login { .. } => self.send(ServerMsg::Error {
                code: "already_logged_in".into(),
                message: "login is accepted once per connection".into(),
                fatal: false,
            }),
        }
    }
}

impl Handler<ToDevice> for PresenceSession {
    type Result = ();
    fn handle(&mut self, msg: ToDevice, _: &mut Context<Self>) {
        match msg {
            ToDevice::Offer {
                call_id,
                from,
                from_name,
                to,
                call,
            } => {
                self.calls.insert(call_id.clone(), call.clone());
                self.send(ServerMsg::IncomingCall {
                    call_id,
                    from,
                    from_name,
                    to,
                });
                call.do_send(FromDevice {
                    session: self.id,
                    event: DeviceLegEvent::Delivered,
                });
            }
            ToDevice::Connected {
                call_id,
                flow_id,
                payload_type,
            } => {
                self.send(ServerMsg::CallConnected {
                    call_id,
                    flow_id,
                    payload_type,
                });
            }
            ToDevice::Ended { call_id, reason } => {
                self.calls.remove(&call_id);
                self.send(ServerMsg::CallEnded {
                    call_id,
                    reason: reason.into(),
                });
            }
        }
    }
}

impl Handler<Push> for PresenceSession {
    type Result = ();
    fn handle(&mut self, msg: Push, _: &mut Context<Self>) {
        self.send(msg.0);
    }
}

impl Handler<Disconnected> for PresenceSession {
    type Result = ();
    fn handle(&mut self, _: Disconnected, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
