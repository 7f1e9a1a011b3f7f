//! The call actor: drives a [`CallCore`] and performs its actions.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use parley_codecs::sdp::{self, MediaDescription};

use crate::call::{Action, CallCore, Disposition, LegFailure, LegId};
use crate::messages::{
    CallHandle, CdrRecord, CdrSink, DeviceLegEvent, FlowStats, FromDevice, MediaPlane, SipCommand,
    SipEvent, SipLegCmd, ToDevice,
};
use crate::metrics as m;
use crate::registry::UserRef;
use crate::router::{self, Preferences};
use crate::session::PresenceSession;
use crate::trunk::{CallOutcome, ProbeOutcome};
use crate::trunk::{GetTrunkState, TrunkActor};
use crate::user::{PresenceChanged, Snapshot, Watch};

/// Everything a call actor needs to know at birth.
pub struct CallSetup {
    /// The SIP driver's handle of this call.
    pub handle: CallHandle,
    /// Parley call id (`c-…`), shown to devices and in CDRs.
    pub call_id: String,
    /// The gateway's Call-ID.
    pub sip_call_id: String,
    /// The called user.
    pub user: UserRef,
    /// Caller number (E.164) or URI.
    pub caller: String,
    /// Caller display name.
    pub caller_name: Option<String>,
    /// Dialled number (E.164).
    pub called: String,
    /// The caller's SDP offer (audio).
    pub offer: MediaDescription,
    /// The trunk toward the user's PSTN line, if any.
    pub trunk: Option<Addr<TrunkActor>>,
    /// The SIP driver.
    pub sip: Recipient<SipCommand>,
    /// The relay.
    pub media: Arc<dyn MediaPlane>,
    /// The CDR writer.
    pub cdr: Arc<dyn CdrSink>,
    /// Give up ringing after this long.
    pub ring_timeout: Duration,
    /// When the INVITE arrived.
    pub started: Instant,
    /// The same instant on the wall clock, for the CDR.
    pub started_wall: SystemTime,
}

/// One call.
pub struct CallActor {
    s: CallSetup,
    core: CallCore,
    devices: HashMap<u64, Addr<PresenceSession>>,
    trunk_port: Option<u16>,
    trunk_media: Option<MediaDescription>,
    caller_port: Option<u16>,
    roq: Option<(u64, u64)>,
    stats: Arc<FlowStats>,
    answered_at: Option<SystemTime>,
    timer: Option<SpawnHandle>,
    /// When the presence change that triggered the last re-route happened.
    reroute_at: Option<Instant>,
}

impl CallActor {
    /// A call actor; start it with [`Actor::start`].
    pub fn new(setup: CallSetup) -> Self {
        let core = CallCore::new(setup.ring_timeout);
        Self {
            s: setup,
            core,
            devices: HashMap::new(),
            trunk_port: None,
            trunk_media: None,
            caller_port: None,
            roq: None,
            stats: Arc::default(),
            answered_at: None,
            timer: None,
            reroute_at: None,
        }
    }

    fn sip(&self, cmd: SipLegCmd) {
        self.s.sip.do_send(SipCommand {
            call: self.s.handle,
            cmd,
        });
    }

    fn drive(&mut self, ctx: &mut Context<Self>) {
        while let Some(action) = self.core.poll_action() {
            self.perform(action, ctx);
        }
        if let Some(h) = self.timer.take() {
            ctx.cancel_future(h);
        }
        if let Some(deadline) = self.core.poll_timeout() {
            let after = deadline.saturating_duration_since(Instant::now());
            self.timer = Some(ctx.run_later(after, |act, ctx| {
                act.timer = None;
                act.core.handle_timeout(Instant::now());
                act.drive(ctx);
            }));
        }
    }

    fn perform(&mut self, action: Action, ctx: &mut Context<Self>) {
        match action {
            Action::OfferDevice(session) => {
                if let Some(dev) = self.devices.get(&session) {
                    dev.do_send(ToDevice::Offer {
                        call_id: self.s.call_id.clone(),
                        from: self.s.caller.clone(),
                        from_name: self.s.caller_name.clone(),
                        to: self.s.called.clone(),
                        call: ctx.address().recipient(),
                    });
                } else {
                    self.core
                        .handle_leg_failed(LegId::Device(session), LegFailure::Failed(480));
                }
            }
            Action::StartTrunk => match self.s.media.allocate_port() {
                Ok(port) => {
                    self.trunk_port = Some(port);
                    let mut pts = self.s.offer.g711_formats();
                    if pts.is_empty() {
                        pts.push(parley_codecs::g711::PT_PCMU);
                    }
                    let body = sdp::write(
                        self.s.media.local_ip(),
                        port,
                        &pts,
                        self.s.offer.telephone_event(),
                        self.s.handle,
                    );
                    self.sip(SipLegCmd::TrunkInvite {
                        to: self.s.called.clone(),
                        from: self.s.caller.clone(),
                        from_name: self.s.caller_name.clone(),
                        sdp: body,
                    });
                }
                Err(e) => {
                    tracing::warn!(call = %self.s.call_id, error = %e, "no relay port for the trunk leg");
                    self.core
                        .handle_leg_failed(LegId::Trunk, LegFailure::Failed(503));
                }
            },
            Action::CallerRinging => {
                metrics::histogram!(m::CALL_RINGING_SECONDS)
                    .record(self.s.started.elapsed().as_secs_f64());
                self.sip(SipLegCmd::CallerRinging);
            }
            Action::Connect(leg) => {
                if let Err(e) = self.connect(leg) {
                    tracing::warn!(call = %self.s.call_id, error = %e, "media setup failed");
                    self.core.handle_connect_failed(503);
                }
            }
            Action::RejectCaller(code) => self.sip(SipLegCmd::CallerReject(code)),
            Action::ByeCaller => self.sip(SipLegCmd::CallerBye),
            Action::Withdraw(leg, reason) | Action::Hangup(leg, reason) => match leg {
                LegId::Device(s) => {
                    if let Some(dev) = self.devices.get(&s) {
                        dev.do_send(ToDevice::Ended {
                            call_id: self.s.call_id.clone(),
                            reason,
                        });
                    }
                }
                LegId::Trunk if matches!(action, Action::Withdraw(..)) => {
                    self.sip(SipLegCmd::TrunkCancel)
                }
                LegId::Trunk => self.sip(SipLegCmd::TrunkBye),
            },
            Action::Finish { disposition, cause } => self.finish(disposition, cause, ctx),
        }
    }

    fn connect(&mut self, leg: LegId) -> Result<(), crate::messages::MediaError> {
        let port = self.s.media.allocate_port()?;
        self.caller_port = Some(port);
        let caller = (
            port,
            std::net::SocketAddr::new(self.s.offer.addr, self.s.offer.port),
        );
        let pt = match leg {
            LegId::Device(session) => {
                let pt = self
                    .s
                    .offer
                    .first_g711()
                    .unwrap_or(parley_codecs::g711::PT_PCMU);
                let flow = self.s.media.next_flow_id();
                self.s
                    .media
                    .bridge_roq(caller, session, flow, self.stats.clone())?;
                self.roq = Some((session, flow));
                if let Some(dev) = self.devices.get(&session) {
                    dev.do_send(ToDevice::Connected {
                        call_id: self.s.call_id.clone(),
                        flow_id: flow,
                        payload_type: pt,
                    });
                }
                pt
            }
            LegId::Trunk => {
                let (Some(tport), Some(tm)) = (self.trunk_port, self.trunk_media.as_ref()) else {
                    return Err(crate::messages::MediaError::Unavailable);
                };
                self.s.media.bridge_udp(
                    caller,
                    (tport, std::net::SocketAddr::new(tm.addr, tm.port)),
                    self.stats.clone(),
                )?;
                tm.first_g711().unwrap_or(parley_codecs::g711::PT_PCMU)
            }
        };
        self.answered_at = Some(SystemTime::now());
        metrics::histogram!(m::CALL_SETUP_SECONDS).record(self.s.started.elapsed().as_secs_f64());
        let body = sdp::write(
            self.s.media.local_ip(),
            port,
            &[pt],
            self.s.offer.telephone_event(),
            self.s.handle,
        );
        self.sip(SipLegCmd::CallerAnswer { sdp: body });
        Ok(())
    }

    /// The callee's devices and the trunk state, fetched from their actors.
    fn lookup(
        &self,
    ) -> impl std::future::Future<Output = (Vec<(router::DeviceState, Addr<PresenceSession>)>, bool)>
    + use<> {
        let user = self.s.user.addr.clone();
        let trunk = self.s.trunk.clone();
        async move {
            let devices = user.send(Snapshot).await.unwrap_or_default();
            let trunk_up = match trunk {
                Some(t) => t.send(GetTrunkState).await.map(|s| s.up).unwrap_or(false),
                None => false,
            };
            (devices, trunk_up)
        }
    }

    /// Remembers the devices' session actors and runs the router.
    fn decide(
        &mut self,
        devices: Vec<(router::DeviceState, Addr<PresenceSession>)>,
        trunk_up: bool,
    ) -> (Vec<router::DeviceState>, router::Route) {
        let states: Vec<_> = devices.iter().map(|(d, _)| d.clone()).collect();
        for (d, a) in devices {
            self.devices.entry(d.session).or_insert(a);
        }
        let route = router::route(&states, &Preferences::default(), trunk_up);
        (states, route)
    }

    fn trunk_outcome(&self, outcome: ProbeOutcome) {
        if let Some(t) = &self.s.trunk {
            t.do_send(CallOutcome(outcome));
        }
    }

    fn leg_ringing(&mut self, leg: LegId) {
        if let Some(at) = self.reroute_at.take() {
            metrics::histogram!(m::REROUTE_SECONDS).record(at.elapsed().as_secs_f64());
        }
        self.core.handle_leg_ringing(leg);
    }

    fn finish(&mut self, disposition: Disposition, cause: u16, ctx: &mut Context<Self>) {
        let ports: Vec<u16> = self
            .caller_port
            .into_iter()
            .chain(self.trunk_port)
            .collect();
        self.s.media.release(&ports, self.roq.take());
        let route = self.core.route();
        metrics::counter!(m::CALLS_TOTAL, "disposition" => disposition.as_str(), "route" => route)
            .increment(1);
        self.s.cdr.submit(CdrRecord {
            call_id: self.s.call_id.clone(),
            sip_call_id: self.s.sip_call_id.clone(),
            tenant: self.s.user.tenant.clone(),
            user: self.s.user.user.clone(),
            caller: self.s.caller.clone(),
            caller_name: self.s.caller_name.clone(),
            called: self.s.called.clone(),
            route: route.into(),
            start: self.s.started_wall,
            answer: self.answered_at,
            end: SystemTime::now(),
            disposition: disposition.as_str().into(),
            cause,
            packets_in: self.stats.caller_to_callee.load(Ordering::Relaxed),
            packets_out: self.stats.callee_to_caller.load(Ordering::Relaxed),
        });
        tracing::info!(call = %self.s.call_id, sip_call_id = %self.s.sip_call_id, disposition = disposition.as_str(), cause, route, "call finished");
        self.sip(SipLegCmd::Done);
        ctx.stop();
    }
}

impl Actor for CallActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        metrics::gauge!(m::CALLS_ACTIVE).increment(1.0);
        ctx.wait(self.lookup().into_actor(self).map(|(devices, trunk_up), act, ctx| {
            let (states, route) = act.decide(devices, trunk_up);
            metrics::counter!(m::ROUTE_DECISIONS_TOTAL, "route" => route.label()).increment(1);
            tracing::debug!(call = %act.s.call_id, ?route, devices = states.len(), "routed");
            let prefs = Preferences::default();
            let fallback = matches!(router::fallback(&prefs, trunk_up), router::Route::Trunk);
            act.core.handle_route(Instant::now(), route, fallback);
            act.drive(ctx);
            if act.core.is_ringing() {
                // While it rings, every presence change of the callee re-evaluates the route.
                act.s.user.addr.do_send(Watch(ctx.address().recipient::<PresenceChanged>().downgrade()));
            }
        }));
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        metrics::gauge!(m::CALLS_ACTIVE).decrement(1.0);
    }
}

impl Handler<FromDevice> for CallActor {
    type Result = ();
    fn handle(&mut self, msg: FromDevice, ctx: &mut Context<Self>) {
        let leg = LegId::Device(msg.session);
        let answered = self.core.answered_leg() == Some(leg);
        match msg.event {
            DeviceLegEvent::Delivered => self.leg_ringing(leg),
            DeviceLegEvent::Answer => self.core.handle_leg_answered(leg),
            DeviceLegEvent::Reject => self.core.handle_leg_failed(leg, LegFailure::Declined(603)),
            DeviceLegEvent::Hangup | DeviceLegEvent::Gone if answered => {
                self.core.handle_leg_hangup(leg)
            }
            DeviceLegEvent::Hangup => self.core.handle_leg_failed(leg, LegFailure::Declined(603)),
            DeviceLegEvent::Gone => self.core.handle_leg_failed(leg, LegFailure::Failed(480)),
        }
        self.drive(ctx);
    }
}

impl Handler<SipEvent> for CallActor {
    type Result = ();
    fn handle(&mut self, msg: SipEvent, ctx: &mut Context<Self>) {
        match msg {
            SipEvent::CallerCancel => self.core.handle_caller_cancel(),
            SipEvent::CallerBye => self.core.handle_caller_gone(Disposition::Answered, 200),
            SipEvent::CallerAckTimeout => self.core.handle_caller_gone(Disposition::Failed, 408),
            SipEvent::TrunkRinging => self.leg_ringing(LegId::Trunk),
            SipEvent::TrunkAnswered(md) => {
                self.trunk_outcome(ProbeOutcome::Answered(200));
                self.trunk_media = Some(md);
                self.core.handle_leg_answered(LegId::Trunk);
            }
            SipEvent::TrunkFailed(code) => {
                match code {
                    408 => self.trunk_outcome(ProbeOutcome::Timeout),
                    503 => self.trunk_outcome(ProbeOutcome::Answered(503)),
                    _ => {}
                }
                let why = if matches!(code, 486 | 600 | 603) {
                    LegFailure::Declined(code)
                } else {
                    LegFailure::Failed(code)
                };
                self.core.handle_leg_failed(LegId::Trunk, why);
            }
            SipEvent::TrunkBye => self.core.handle_leg_hangup(LegId::Trunk),
        }
        self.drive(ctx);
    }
}

impl Handler<PresenceChanged> for CallActor {
    type Result = ();
    fn handle(&mut self, msg: PresenceChanged, ctx: &mut Context<Self>) {
        if !self.core.is_ringing() {
            return;
        }
        ctx.wait(self.lookup().into_actor(self).map(move |(devices, trunk_up), act, ctx| {
            let (_, route) = act.decide(devices, trunk_up);
            let label = route.label();
            if act.core.handle_reroute(route) {
                metrics::counter!(m::REROUTES_TOTAL).increment(1);
                act.reroute_at = Some(msg.at);
                tracing::info!(call = %act.s.call_id, route = label, reroutes = act.core.reroutes(), "re-routed while ringing");
            }
            act.drive(ctx);
        }));
    }
}
