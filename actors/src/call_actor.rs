//! The call actor: drives a [`CallCore`] and performs its actions.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use parley_codecs::sdp::{self, MediaDescription};

use crate::call::{Action, CallCore, Disposition, LegFailure, LegId};
use crate::messages::{
    CallHandle, CdrRecord, CdrSink, DeviceLegEvent, FlowStats, FromDevice, MediaPlane, SessionId,
    SipCommand, SipEvent, SipLegCmd, ToDevice,
};
use crate::metrics as m;
use crate::registry::UserRef;
use crate::rules::{self, CallContext, Media, Plan};
use crate::session::PresenceSession;
use crate::trunk::{CallOutcome, ProbeOutcome};
use crate::trunk::{GetTrunkState, TrunkActor};
use crate::user::{Answered, Lookup, PresenceChanged, UserView, Watch};

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
    /// For a call dialled from an IM device: that device (the caller leg is then the
    /// device, not a SIP dialog).
    pub caller_device: Option<(SessionId, Addr<PresenceSession>)>,
    /// For a device dialling a PSTN number: that number (`user` is then the caller's own
    /// user, who owns the CDR). `None`: the call is for `user`.
    pub pstn_destination: Option<String>,
    /// The caller's video stream, if the INVITE offered one.
    pub video_offer: Option<MediaDescription>,
    /// End an answered call when no media crosses it for this long (`None`: never).
    pub media_timeout: Option<Duration>,
}

/// What every call needs from the node, shared by the SIP driver and device sessions.
pub struct CallEnv {
    /// The SIP driver.
    pub sip: Recipient<SipCommand>,
    /// The relay.
    pub media: Arc<dyn MediaPlane>,
    /// The CDR writer.
    pub cdr: Arc<dyn CdrSink>,
    /// The trunk toward users' PSTN lines, if any.
    pub trunk: Option<Addr<TrunkActor>>,
    /// Ring timeout.
    pub ring_timeout: Duration,
    /// Media timeout of answered calls (`None`: never).
    pub media_timeout: Option<Duration>,
}

impl std::fmt::Debug for CallEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallEnv")
            .field("ring_timeout", &self.ring_timeout)
            .finish_non_exhaustive()
    }
}

/// Why the caller's device hears that its call ended, by SIP-style cause.
fn ended_reason(code: u16) -> &'static str {
    match code {
        486 | 600 | 603 => "rejected",
        487 => "cancelled",
        408 | 480 => "unavailable",
        _ => "failed",
    }
}

/// One call.
pub struct CallActor {
    s: CallSetup,
    core: CallCore,
    devices: HashMap<u64, Addr<PresenceSession>>,
    trunk_port: Option<u16>,
    trunk_media: Option<MediaDescription>,
    caller_port: Option<u16>,
    roq: Vec<(u64, u64)>,
    stats: Arc<FlowStats>,
    answered_at: Option<SystemTime>,
    timer: Option<SpawnHandle>,
    /// When the presence change that triggered the last re-route happened.
    reroute_at: Option<Instant>,
    /// Device names by session (for the answer history).
    device_names: HashMap<u64, String>,
    /// Sessions in predicted order at routing time (to measure prediction quality).
    predicted: Vec<u64>,
    /// Whether a rule (not the default policy) routed this call.
    by_rule: bool,
    pstn_fallback: bool,
    answered_by: Option<String>,
    stats_swapped: bool,
    /// Sessions of the callee's devices that take video.
    video_devices: Vec<u64>,
    video_port: Option<u16>,
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
            roq: Vec::new(),
            stats: Arc::default(),
            answered_at: None,
            timer: None,
            reroute_at: None,
            device_names: HashMap::new(),
            predicted: Vec::new(),
            by_rule: false,
            pstn_fallback: true,
            answered_by: None,
            stats_swapped: false,
            video_devices: Vec::new(),
            video_port: None,
        }
    }

    /// Tells the dialling device (IM-originated calls) something.
    fn to_caller_device(&self, msg: ToDevice) -> bool {
        match &self.s.caller_device {
            Some((_, addr)) => {
                addr.do_send(msg);
                true
            }
            None => false,
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
                        video: self.s.video_offer.is_some()
                            && self.video_devices.contains(&session),
                        call: ctx.address().recipient(),
                    });
                } else {
                    self.core.handle_leg_failed(
                        Instant::now(),
                        LegId::Device(session),
                        LegFailure::Failed(480),
                    );
                }
            }
            Action::StartTrunk(target) => match self.s.media.allocate_port() {
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
                        to: target.unwrap_or_else(|| self.s.called.clone()),
                        from: self.s.caller.clone(),
                        from_name: self.s.caller_name.clone(),
                        sdp: body,
                        events: ctx.address().recipient(),
                    });
                }
                Err(e) => {
                    metrics::counter!(m::MEDIA_SETUP_FAILURES_TOTAL, "reason" => e.reason())
                        .increment(1);
                    tracing::warn!(call = %self.s.call_id, error = %e, "no relay port for the trunk leg");
                    self.core.handle_leg_failed(
                        Instant::now(),
                        LegId::Trunk,
                        LegFailure::Failed(503),
                    );
                }
            },
            Action::CallerRinging => {
                metrics::histogram!(m::CALL_RINGING_SECONDS)
                    .record(self.s.started.elapsed().as_secs_f64());
                if !self.to_caller_device(ToDevice::Ringing {
                    call_id: self.s.call_id.clone(),
                }) {
                    self.sip(SipLegCmd::CallerRinging);
                }
            }
            Action::Connect(leg) => {
                if let Err(e) = self.connect(leg) {
                    metrics::counter!(m::MEDIA_SETUP_FAILURES_TOTAL, "reason" => e.reason())
                        .increment(1);
                    tracing::warn!(call = %self.s.call_id, error = %e, "media setup failed");
                    self.core.handle_connect_failed(503);
                } else {
                    self.watch_media(ctx);
                }
            }
            Action::RejectCaller(code) => {
                let ended = ToDevice::Ended {
                    call_id: self.s.call_id.clone(),
                    reason: ended_reason(code),
                };
                if !self.to_caller_device(ended) {
                    self.sip(SipLegCmd::CallerReject(code));
                }
            }
            Action::ByeCaller => {
                if !self.to_caller_device(ToDevice::Ended {
                    call_id: self.s.call_id.clone(),
                    reason: "remote_hangup",
                }) {
                    self.sip(SipLegCmd::CallerBye);
                }
            }
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
        self.learn_answer(leg);
        if let Some((caller_session, caller_addr)) = self.s.caller_device.clone() {
            let LegId::Device(session) = leg else {
                // Device to PSTN: the caller's RoQ flow bridged with the trunk-side port.
                let (Some(tport), Some(tm)) = (self.trunk_port, self.trunk_media.as_ref()) else {
                    return Err(crate::messages::MediaError::Unavailable);
                };
                let flow = self.s.media.next_flow_id();
                let trunk_side = (tport, std::net::SocketAddr::new(tm.addr, tm.port));
                // The relay counts the UDP side as "caller": swap when writing the CDR.
                self.stats_swapped = true;
                self.s
                    .media
                    .bridge_roq(trunk_side, caller_session, flow, self.stats.clone())?;
                self.roq.push((caller_session, flow));
                let pt = tm.first_g711().unwrap_or(parley_codecs::g711::PT_PCMU);
                caller_addr.do_send(ToDevice::Connected {
                    call_id: self.s.call_id.clone(),
                    flow_id: flow,
                    payload_type: pt,
                    video_flow_id: None,
                });
                self.answered_at = Some(SystemTime::now());
                metrics::histogram!(m::CALL_SETUP_SECONDS)
                    .record(self.s.started.elapsed().as_secs_f64());
                return Ok(());
            };
            // Device to device: RoQ on both sides, PCMU (every Parley client sends G.711).
            let (a, b) = (self.s.media.next_flow_id(), self.s.media.next_flow_id());
            self.s
                .media
                .bridge_roq_roq((caller_session, a), (session, b), self.stats.clone())?;
            self.roq.extend([(caller_session, a), (session, b)]);
            let pt = parley_codecs::g711::PT_PCMU;
            if let Some(dev) = self.devices.get(&session) {
                dev.do_send(ToDevice::Connected {
                    call_id: self.s.call_id.clone(),
                    flow_id: b,
                    payload_type: pt,
                    video_flow_id: None,
                });
            }
            caller_addr.do_send(ToDevice::Connected {
                call_id: self.s.call_id.clone(),
                flow_id: a,
                payload_type: pt,
                video_flow_id: None,
            });
            self.answered_at = Some(SystemTime::now());
            metrics::histogram!(m::CALL_SETUP_SECONDS)
                .record(self.s.started.elapsed().as_secs_f64());
            return Ok(());
        }
        // Next to the trunk leg's port when there is one: both legs on one relay worker.
        let port = match self.trunk_port {
            Some(near) => self.s.media.allocate_port_near(near)?,
            None => self.s.media.allocate_port()?,
        };
        self.caller_port = Some(port);
        let caller = (
            port,
            std::net::SocketAddr::new(self.s.offer.addr, self.s.offer.port),
        );
        let mut video_answer = None;
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
                self.roq.push((session, flow));
                // Video rides on its own relay port and RoQ flow when both ends can.
                let mut video_flow_id = None;
                if let Some(v) = self.s.video_offer.clone()
                    && self.video_devices.contains(&session)
                {
                    let vport = self.s.media.allocate_port_near(port)?;
                    self.video_port = Some(vport);
                    let vflow = self.s.media.next_flow_id();
                    let vstats = Arc::new(FlowStats::default());
                    self.s.media.bridge_roq(
                        (vport, std::net::SocketAddr::new(v.addr, v.port)),
                        session,
                        vflow,
                        vstats,
                    )?;
                    self.roq.push((session, vflow));
                    video_flow_id = Some(vflow);
                    video_answer = Some(sdp::VideoAnswer {
                        port: vport,
                        formats: v.formats.clone(),
                    });
                }
                if let Some(dev) = self.devices.get(&session) {
                    dev.do_send(ToDevice::Connected {
                        call_id: self.s.call_id.clone(),
                        flow_id: flow,
                        payload_type: pt,
                        video_flow_id,
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
        let mut body = sdp::write(
            self.s.media.local_ip(),
            port,
            &[pt],
            self.s.offer.telephone_event(),
            self.s.handle,
        );
        if self.s.video_offer.is_some() {
            // RFC 3264: every offered stream gets an m-line in the answer; port 0 refuses it.
            sdp::append_video(
                &mut body,
                &video_answer.unwrap_or(sdp::VideoAnswer {
                    port: 0,
                    formats: Vec::new(),
                }),
            );
        }
        self.sip(SipLegCmd::CallerAnswer { sdp: body });
        Ok(())
    }

    /// The callee's devices, preferences and history, and the trunk state.
    fn lookup(&self) -> impl std::future::Future<Output = (UserView, bool)> + use<> {
        let user = self.s.user.addr.clone();
        let trunk = self.s.trunk.clone();
        let caller = self.s.caller.clone();
        async move {
            let view = user.send(Lookup { caller }).await.unwrap_or_default();
            let trunk_up = match trunk {
                Some(t) => t.send(GetTrunkState).await.map(|s| s.up).unwrap_or(false),
                None => false,
            };
            (view, trunk_up)
        }
    }

    /// Remembers the devices' session actors and evaluates the user's rules.
    fn decide(&mut self, view: UserView, trunk_up: bool) -> (Plan, Option<String>) {
        let states: Vec<_> = view.devices.iter().map(|(d, _)| d.clone()).collect();
        for (d, a) in view.devices {
            if d.video && !self.video_devices.contains(&d.session) {
                self.video_devices.push(d.session);
            }
            self.device_names.insert(d.session, d.device.clone());
            self.devices.entry(d.session).or_insert(a);
        }
        self.predicted = rules::predict(&states, &view.history)
            .iter()
            .map(|d| d.session)
            .collect();
        let now_unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let ctx = CallContext {
            devices: &states,
            history: &view.history,
            caller: &self.s.caller,
            caller_known: view.caller_known,
            media: if self.s.video_offer.is_some() {
                Media::Video
            } else {
                Media::Audio
            },
            voice_network_up: trunk_up,
            now_unix,
        };
        self.pstn_fallback = view.prefs.pstn_fallback;
        rules::plan(&view.prefs, &ctx)
    }

    /// Records who answered: the CDR, the user's answer history, and how the prediction did.
    fn learn_answer(&mut self, leg: LegId) {
        let LegId::Device(session) = leg else {
            self.answered_by = Some("pstn".into());
            return;
        };
        let Some(name) = self.device_names.get(&session).cloned() else {
            return;
        };
        let rank = match self.predicted.iter().position(|s| *s == session) {
            Some(0) => "1",
            Some(1) => "2",
            Some(_) => "3+",
            None => "unranked",
        };
        metrics::counter!(m::ANSWERED_RANK_TOTAL, "rank" => rank).increment(1);
        tracing::info!(call = %self.s.call_id, device = %name, rank, "answered");
        self.s.user.addr.do_send(Answered {
            device: name.clone(),
            at: SystemTime::now(),
        });
        self.answered_by = Some(name);
    }

    /// While the call is answered, checks once a second that media still flows; a call
    /// whose media stopped for the media timeout is ended (a gateway that vanished without a
    /// BYE must not hold a relay port and a "call in progress" forever).
    fn watch_media(&mut self, ctx: &mut Context<Self>) {
        let Some(limit) = self.s.media_timeout else {
            return;
        };
        let since = crate::messages::flow_clock_ms();
        let check = Duration::from_secs(1).min(limit);
        ctx.run_interval(check, move |act, ctx| {
            if act.core.answered_leg().is_none() {
                return;
            }
            let idle = act.stats.idle_ms(since);
            if idle >= limit.as_millis() as u64 {
                tracing::warn!(call = %act.s.call_id, idle_ms = idle, "no media: ending the call");
                metrics::counter!(m::MEDIA_TIMEOUTS_TOTAL).increment(1);
                act.core.handle_media_timeout();
                act.drive(ctx);
            }
        });
    }

    fn trunk_outcome(&self, outcome: ProbeOutcome) {
        if let Some(t) = &self.s.trunk {
            t.do_send(CallOutcome(outcome));
        }
    }

    /// A SIP peer moved its media mid-call (re-INVITE): the relay re-latches that port and
    /// keeps the stream toward the other side continuous.
    fn media_moved(&mut self, port: Option<u16>, addr: std::net::SocketAddr) {
        let Some(port) = port else {
            return; // not bridged yet: nothing to move
        };
        if let Err(e) = self.s.media.repoint(port, addr) {
            tracing::warn!(call = %self.s.call_id, port, error = ?e, "relay could not follow the media move");
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
            .chain(self.video_port)
            .collect();
        self.s.media.release(&ports, &std::mem::take(&mut self.roq));
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
            packets_in: if self.stats_swapped {
                &self.stats.callee_to_caller
            } else {
                &self.stats.caller_to_callee
            }
            .load(Ordering::Relaxed),
            packets_out: if self.stats_swapped {
                &self.stats.caller_to_callee
            } else {
                &self.stats.callee_to_caller
            }
            .load(Ordering::Relaxed),
            direction: if self.s.pstn_destination.is_some() {
                "out"
            } else {
                "in"
            },
            answered_by: self.answered_by.clone(),
        });
        tracing::info!(call = %self.s.call_id, sip_call_id = %self.s.sip_call_id, disposition = disposition.as_str(), cause, route, "call finished");
        if self.s.caller_device.is_none() {
            self.sip(SipLegCmd::Done);
        }
        ctx.stop();
    }
}

impl Actor for CallActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        metrics::gauge!(m::CALLS_ACTIVE).increment(1.0);
        if let Some(number) = self.s.pstn_destination.clone() {
            // A device dials a PSTN number: straight to the trunk, if the voice network is up.
            let trunk = self.s.trunk.clone();
            let up = async move {
                match trunk {
                    Some(t) => t.send(GetTrunkState).await.map(|s| s.up).unwrap_or(false),
                    None => false,
                }
            };
            ctx.wait(up.into_actor(self).map(move |up, act, ctx| {
                let plan = if up {
                    Plan::Dial(number)
                } else {
                    Plan::Unavailable
                };
                tracing::info!(call = %act.s.call_id, ?plan, "device dials the PSTN");
                act.core.handle_plan(Instant::now(), plan, false);
                act.drive(ctx);
            }));
            return;
        }
        ctx.wait(self.lookup().into_actor(self).map(|(view, trunk_up), act, ctx| {
            let (plan, rule) = act.decide(view, trunk_up);
            let label = match &plan {
                Plan::Ring(_) => "ring",
                Plan::Forward(_) | Plan::Dial(_) => "forward",
                Plan::Reject(_) => "reject",
                Plan::Unavailable => "none",
            };
            metrics::counter!(m::ROUTE_DECISIONS_TOTAL, "route" => label, "by" => if rule.is_some() { "rule" } else { "default" }).increment(1);
            if let Some(r) = &rule {
                tracing::info!(call = %act.s.call_id, rule = %r, ?plan, "routed by rule");
            } else {
                tracing::debug!(call = %act.s.call_id, ?plan, "routed by default policy");
            }
            act.by_rule = rule.is_some();
            let fallback = act.pstn_fallback && trunk_up;
            act.core.handle_plan(Instant::now(), plan, fallback);
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
        if self
            .s
            .caller_device
            .as_ref()
            .is_some_and(|(s, _)| *s == msg.session)
        {
            // The dialling device hung up (or went away).
            if matches!(msg.event, DeviceLegEvent::Hangup | DeviceLegEvent::Gone) {
                if self.core.answered_leg().is_some() {
                    self.core.handle_caller_gone(Disposition::Answered, 200);
                } else {
                    self.core.handle_caller_cancel();
                }
                self.drive(ctx);
            }
            return;
        }
        let leg = LegId::Device(msg.session);
        let answered = self.core.answered_leg() == Some(leg);
        match msg.event {
            DeviceLegEvent::Delivered => self.leg_ringing(leg),
            DeviceLegEvent::Answer => self.core.handle_leg_answered(leg),
            DeviceLegEvent::Reject => {
                self.core
                    .handle_leg_failed(Instant::now(), leg, LegFailure::Declined(603))
            }
            DeviceLegEvent::Hangup | DeviceLegEvent::Gone if answered => {
                self.core.handle_leg_hangup(Instant::now(), leg)
            }
            DeviceLegEvent::Hangup => {
                self.core
                    .handle_leg_failed(Instant::now(), leg, LegFailure::Declined(603))
            }
            DeviceLegEvent::Gone => {
                self.core
                    .handle_leg_failed(Instant::now(), leg, LegFailure::Failed(480))
            }
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
                self.core
                    .handle_leg_failed(Instant::now(), LegId::Trunk, why);
            }
            SipEvent::TrunkBye => self.core.handle_leg_hangup(Instant::now(), LegId::Trunk),
            SipEvent::CallerMediaMoved(addr) => self.media_moved(self.caller_port, addr),
            SipEvent::TrunkMediaMoved(addr) => self.media_moved(self.trunk_port, addr),
            SipEvent::CallerVideoMoved(addr) => self.media_moved(self.video_port, addr),
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
        if self.core.has_more_steps() {
            return; // a sequential plan follows its own steps
        }
        ctx.wait(self.lookup().into_actor(self).map(move |(view, trunk_up), act, ctx| {
            let (plan, _) = act.decide(view, trunk_up);
            let legs = match plan {
                Plan::Ring(steps) if steps.len() == 1 => steps.into_iter().flat_map(|s| s.legs).collect(),
                Plan::Unavailable => Vec::new(),
                // Several steps, forwarding, rejection: not a re-route; keep ringing.
                _ => return act.drive(ctx),
            };
            let label = if legs.iter().any(|l| matches!(l, LegId::Device(_))) { "im" } else if legs.is_empty() { "none" } else { "pstn" };
            if act.core.handle_reroute(legs) {
                metrics::counter!(m::REROUTES_TOTAL).increment(1);
                act.reroute_at = Some(msg.at);
                tracing::info!(call = %act.s.call_id, route = label, reroutes = act.core.reroutes(), "re-routed while ringing");
            }
            act.drive(ctx);
        }));
    }
}
