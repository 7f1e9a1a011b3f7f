//! The call actor: the shell around a [`CallCore`]. It turns messages into core inputs
//! and core actions into sends — SIP commands, device messages, relay calls, the CDR — and
//! decides nothing itself.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use parley_codecs::sdp;
use parley_core::call::{
    Action, CallCore, CallSpec, EndReason, MediaPlan, MediaSide, Observation, Origin, TrunkOffer,
};
use parley_core::ids::{CallHandle, Sequence};
use parley_core::plan::LegId;

use crate::messages::{
    CdrSink, FlowStats, FromDevice, MediaError, MediaPlane, SessionId, SipCommand, SipLegCmd,
    ToCall, ToDevice,
};
use crate::metrics as m;
use crate::remote::RemoteLegs;
use crate::trunk::TrunkSet;
use crate::user::{Answered, Lookup, PresenceChanged, UserActor, UserView, Watch};

/// What every call needs from the node, shared by the SIP driver and device sessions.
pub struct CallEnv {
    /// The SIP driver.
    pub sip: Recipient<SipCommand>,
    /// The relay.
    pub media: Arc<dyn MediaPlane>,
    /// The CDR writer.
    pub cdr: Arc<dyn CdrSink>,
    /// The trunks toward the PSTN and the number plan over them.
    pub trunks: Arc<TrunkSet>,
    /// Ring timeout.
    pub ring_timeout: Duration,
    /// Media timeout of answered calls (`None`: never).
    pub media_timeout: Option<Duration>,
    /// How long a device has to acknowledge an offer (`None`: the ring timeout).
    pub offer_ack_timeout: Option<Duration>,
    /// Calls ringing one user beyond which new ones get 486 (`None`: unbounded).
    pub max_ringing: Option<usize>,
    /// The node's call handles.
    pub handles: Arc<Sequence>,
    /// Legs to devices on other nodes (cluster mode).
    pub remote: Option<Arc<dyn RemoteLegs>>,
}

impl std::fmt::Debug for CallEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallEnv")
            .field("ring_timeout", &self.ring_timeout)
            .finish_non_exhaustive()
    }
}

/// Everything a call actor needs at birth.
pub struct CallSetup {
    /// What the core is born with.
    pub spec: CallSpec,
    /// The actor of the user whose presence routes the call (the callee; for a PSTN
    /// number dialled by a device, the caller's own user).
    pub callee: Addr<UserActor>,
    /// The dialling device's session, for calls dialled from an IM device.
    pub caller_device: Option<Recipient<ToDevice>>,
    /// The node.
    pub env: Arc<CallEnv>,
}

/// Relay resources a call holds.
#[derive(Default)]
struct Media {
    caller_port: Option<u16>,
    trunk_port: Option<u16>,
    video_port: Option<u16>,
    roq: Vec<(SessionId, u64)>,
    stats: Arc<FlowStats>,
    /// The flow clock when the media was bridged (idle time counts from there).
    since_ms: u64,
}

/// One call.
pub struct CallActor {
    core: CallCore,
    callee: Addr<UserActor>,
    caller_device: Option<Recipient<ToDevice>>,
    env: Arc<CallEnv>,
    /// The callee's device sessions from the last lookup.
    sessions: HashMap<SessionId, Recipient<ToDevice>>,
    media: Media,
    timer: Option<SpawnHandle>,
    /// Whether the SIP driver has been told where this call's events go.
    sip_registered: bool,
}

impl CallActor {
    /// A call actor; start it with [`Actor::start`].
    pub fn new(setup: CallSetup) -> Self {
        Self {
            sip_registered: setup.spec.origin == Origin::Sip,
            core: CallCore::new(setup.spec),
            callee: setup.callee,
            caller_device: setup.caller_device,
            env: setup.env,
            sessions: HashMap::new(),
            media: Media::default(),
            timer: None,
        }
    }

    fn call_handle(&self) -> CallHandle {
        self.core.spec().handle
    }

    fn sip(&mut self, cmd: SipLegCmd, ctx: &mut Context<Self>) {
        let events = (!self.sip_registered).then(|| ctx.address().recipient::<ToCall>());
        self.sip_registered = true;
        self.env.sip.do_send(SipCommand {
            call: self.call_handle(),
            cmd,
            events,
        });
    }

    fn to_device(&self, session: SessionId, msg: ToDevice) {
        if let Some(dev) = self.sessions.get(&session) {
            dev.do_send(msg);
        }
    }

    /// Drains the core, then re-arms its timer.
    fn drive(&mut self, ctx: &mut Context<Self>) {
        while let Some(action) = self.core.poll_output() {
            self.perform(action, ctx);
        }
        if let Some(h) = self.timer.take() {
            ctx.cancel_future(h);
        }
        if let Some(deadline) = self.core.poll_timeout() {
            let after = deadline.saturating_duration_since(Instant::now());
            self.timer = Some(ctx.run_later(after, |act, ctx| {
                act.timer = None;
                let now = Instant::now();
                if let Some(at) = act.env.trunks.node_behind_at(now) {
                    act.core.handle_node_behind(at);
                }
                act.core.handle_timeout(now);
                act.drive(ctx);
            }));
        }
    }

    fn perform(&mut self, action: Action, ctx: &mut Context<Self>) {
        let call_id = self.core.call_id();
        match action {
            Action::Lookup => self.lookup(ctx),
            Action::WatchPresence => self.callee.do_send(Watch {
                call: self.call_handle(),
                to: ctx.address().recipient::<PresenceChanged>().downgrade(),
            }),
            Action::OfferDevice { session, video } => match self.sessions.get(&session) {
                Some(dev) => dev.do_send(ToDevice::Offer {
                    call_id,
                    from: self.core.spec().caller.clone(),
                    from_name: self.core.spec().caller_name.clone(),
                    to: self.core.spec().called.clone(),
                    video,
                    sip_call_id: self.core.spec().sip_call_id.clone(),
                    call: ctx.address().recipient(),
                }),
                // The device left between the lookup and the offer.
                None => self.core.handle_device(
                    Instant::now(),
                    session,
                    parley_core::call::DeviceLegEvent::Gone,
                ),
            },
            Action::StartTrunk(offer) => self.start_trunk(offer, ctx),
            Action::CallerRinging => match &self.caller_device {
                Some(dev) => dev.do_send(ToDevice::Ringing { call_id }),
                None => self.sip(SipLegCmd::CallerRinging, ctx),
            },
            Action::Connect(plan) => {
                // Answered: no longer ringing the callee.
                self.callee.do_send(crate::user::Unwatch {
                    call: self.call_handle(),
                });
                if let Err(e) = self.connect(plan, ctx) {
                    metrics::counter!(m::MEDIA_SETUP_FAILURES_TOTAL, "reason" => e.reason())
                        .increment(1);
                    tracing::warn!(call = %call_id, error = %e, "media setup failed");
                    self.core.handle_connect_failed(Instant::now(), 503);
                }
            }
            Action::RejectCaller(code) => match &self.caller_device {
                Some(dev) => dev.do_send(ToDevice::Ended {
                    call_id,
                    reason: EndReason::of_cause(code).as_str(),
                }),
                None => self.sip(SipLegCmd::CallerReject(code), ctx),
            },
            Action::ByeCaller => match &self.caller_device {
                Some(dev) => dev.do_send(ToDevice::Ended {
                    call_id,
                    reason: EndReason::RemoteHangup.as_str(),
                }),
                None => self.sip(SipLegCmd::CallerBye, ctx),
            },
            Action::Withdraw(LegId::Device(s), reason)
            | Action::Hangup(LegId::Device(s), reason) => self.to_device(
                s,
                ToDevice::Ended {
                    call_id,
                    reason: reason.as_str(),
                },
            ),
            Action::Withdraw(LegId::Trunk, _) => self.sip(SipLegCmd::TrunkCancel, ctx),
            Action::Hangup(LegId::Trunk, _) => self.sip(SipLegCmd::TrunkBye, ctx),
            Action::TrunkHealth(trunk, outcome) => self.env.trunks.call_outcome(trunk, outcome),
            Action::Answered { device, rank } => {
                metrics::counter!(m::ANSWERED_RANK_TOTAL, "rank" => rank).increment(1);
                tracing::info!(call = %call_id, device = %device, rank, "answered");
                self.callee.do_send(Answered {
                    device,
                    at: SystemTime::now(),
                });
            }
            Action::Repoint(side, addr) => {
                let port = match side {
                    MediaSide::Caller => self.media.caller_port,
                    MediaSide::CallerVideo => self.media.video_port,
                    MediaSide::Trunk => self.media.trunk_port,
                };
                if let Some(port) = port
                    && let Err(e) = self.env.media.repoint(port, addr)
                {
                    tracing::warn!(call = %call_id, port, error = ?e, "relay could not follow the media move");
                }
            }
            Action::DropDevice(session) => self.to_device(session, ToDevice::Unresponsive),
            Action::SampleMedia => {
                let idle = self.media.stats.idle_ms(self.media.since_ms);
                self.core
                    .handle_media_idle(Instant::now(), Duration::from_millis(idle));
            }
            Action::Observe(o) => self.observe(o, &call_id),
            Action::Finish { disposition, cause } => {
                let ports: Vec<u16> = [
                    self.media.caller_port,
                    self.media.trunk_port,
                    self.media.video_port,
                ]
                .into_iter()
                .flatten()
                .collect();
                self.env
                    .media
                    .release(&ports, &std::mem::take(&mut self.media.roq));
                // Closed here, after the release: the kernel's last counts are in (the
                // release folds them), and whatever the workers still receive before they
                // let the ports go is dropped rather than relayed past the CDR.
                let (to_callee, to_caller) = self.media.stats.close();
                let cdr = self.core.cdr(to_callee, to_caller);
                let route = cdr.route.as_str();
                metrics::counter!(m::CALLS_TOTAL, "disposition" => disposition.as_str(), "route" => route)
                    .increment(1);
                tracing::info!(call = %call_id, sip_call_id = %cdr.sip_call_id, disposition = disposition.as_str(), cause, route, "call finished");
                self.env.cdr.submit(cdr);
                // Every SIP dialog of the call (the caller's, or a trunk leg a device
                // dialled) is forgotten once its transactions end.
                if self.sip_registered {
                    self.sip(SipLegCmd::Done, ctx);
                }
                ctx.stop();
            }
        }
    }

    fn observe(&self, o: Observation, call_id: &str) {
        match o {
            Observation::Routed { plan, rule } => {
                let by = if rule.is_some() { "rule" } else { "default" };
                metrics::counter!(m::ROUTE_DECISIONS_TOTAL, "route" => plan, "by" => by)
                    .increment(1);
                match rule {
                    Some(r) => tracing::info!(call = %call_id, rule = %r, plan, "routed by rule"),
                    None => tracing::debug!(call = %call_id, plan, "routed by default policy"),
                }
            }
            Observation::Rerouted { route, reroutes } => {
                metrics::counter!(m::REROUTES_TOTAL).increment(1);
                tracing::info!(call = %call_id, route = route.as_str(), reroutes, "re-routed while ringing");
            }
            Observation::RerouteRinging { since } => {
                metrics::histogram!(m::REROUTE_SECONDS).record(since.elapsed().as_secs_f64());
            }
            Observation::CallerRinging { after } => {
                metrics::histogram!(m::CALL_RINGING_SECONDS).record(after.as_secs_f64());
            }
            Observation::Connected { after } => {
                metrics::histogram!(m::CALL_SETUP_SECONDS).record(after.as_secs_f64());
            }
            Observation::OfferUnacknowledged { session } => {
                metrics::counter!(m::OFFERS_UNACKNOWLEDGED_TOTAL).increment(1);
                tracing::warn!(call = %call_id, session, "offer not acknowledged: the call routes on");
            }
            Observation::TrunkAttempt { trunk, code } => {
                let result = match code {
                    200..=299 => "answered",
                    c if parley_core::numberplan::fails_over(c) => "failed",
                    _ => "rejected",
                };
                let name = self.env.trunks.name(trunk).to_owned();
                metrics::counter!(m::TRUNK_CALLS_TOTAL, "trunk" => name, "result" => result)
                    .increment(1);
            }
            Observation::TrunkFailover { from, to, code } => {
                let (from, to) = (self.env.trunks.name(from), self.env.trunks.name(to));
                tracing::warn!(call = %call_id, from, to, code, "trunk failed: trying the next one");
                metrics::counter!(m::TRUNK_FAILOVERS_TOTAL, "trunk" => from.to_owned())
                    .increment(1);
            }
            Observation::TooManyRinging { ringing } => {
                metrics::counter!(m::CALLS_REFUSED_BUSY_TOTAL).increment(1);
                tracing::info!(call = %call_id, ringing, "callee has too many calls ringing: 486");
            }
            Observation::MediaTimedOut { idle } => {
                tracing::warn!(call = %call_id, idle_ms = idle.as_millis() as u64, "no media: ending the call");
                metrics::counter!(m::MEDIA_TIMEOUTS_TOTAL).increment(1);
            }
        }
    }

    /// Asks the callee's actor for its view; the trunks' state is read when it arrives.
    fn lookup(&mut self, ctx: &mut Context<Self>) {
        let user = self.callee.clone();
        let caller = self.core.spec().caller.clone();
        ctx.wait(
            async move { user.send(Lookup { caller }).await.unwrap_or_default() }
                .into_actor(self)
                .map(|view: UserView, act, ctx| {
                    act.sessions.extend(view.sessions);
                    let now_unix = SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    // Calls draw their weighted trunk order from their handle: spread, and
                    // the same on a re-route of one call.
                    let trunks = act.env.trunks.snapshot(act.core.spec().handle);
                    act.core
                        .handle_lookup(Instant::now(), view.callee, trunks, now_unix);
                    act.drive(ctx);
                }),
        );
    }

    fn start_trunk(&mut self, offer: TrunkOffer, ctx: &mut Context<Self>) {
        // After a failover the leg keeps its relay port.
        let port = match self.media.trunk_port {
            Some(p) => Ok(p),
            None => self.env.media.allocate_port(),
        };
        match port {
            Ok(port) => {
                self.media.trunk_port = Some(port);
                let body = sdp::write(
                    self.env.media.local_ip(),
                    port,
                    &offer.formats,
                    offer.telephone_event,
                    self.call_handle(),
                );
                let spec = self.core.spec();
                let cmd = SipLegCmd::TrunkInvite {
                    trunk: offer.trunk,
                    to: offer.to,
                    from: spec.caller.clone(),
                    from_name: spec.caller_name.clone(),
                    sdp: body,
                };
                self.sip(cmd, ctx);
            }
            Err(e) => {
                metrics::counter!(m::MEDIA_SETUP_FAILURES_TOTAL, "reason" => e.reason())
                    .increment(1);
                tracing::warn!(call = %self.core.call_id(), error = %e, "no relay port for the trunk leg");
                self.core.handle_trunk_unavailable(Instant::now());
            }
        }
    }

    /// Wires the media as the core planned it, then answers the caller and tells the devices.
    fn connect(&mut self, plan: MediaPlan, ctx: &mut Context<Self>) -> Result<(), MediaError> {
        let call_id = self.core.call_id();
        let media = self.env.media.clone();
        let stats = self.media.stats.clone();
        self.media.since_ms = crate::messages::flow_clock_ms();
        match plan {
            MediaPlan::DeviceToTrunk {
                caller,
                trunk,
                pt,
                telephone_event,
            } => {
                let tport = self.media.trunk_port.ok_or(MediaError::Unavailable)?;
                let flow = media.next_flow_id();
                media.bridge_roq((tport, trunk), caller, flow, stats)?;
                self.media.roq.push((caller, flow));
                self.tell_caller_device(ToDevice::Connected {
                    call_id,
                    flow_id: flow,
                    payload_type: pt,
                    video_flow_id: None,
                    telephone_event,
                    video_formats: Vec::new(),
                });
            }
            MediaPlan::DeviceToDevice {
                caller,
                callee,
                pt,
                telephone_event,
            } => {
                if let Some((remote, peer)) = self.remote_media(callee, &call_id) {
                    // The callee is on another node: the caller's flow is bridged to a
                    // relay port toward that node's relay port for the callee.
                    let port = media.allocate_port()?;
                    self.media.trunk_port = Some(port);
                    let a = media.next_flow_id();
                    media.bridge_roq((port, peer), caller, a, stats)?;
                    self.media.roq.push((caller, a));
                    let here = SocketAddr::new(remote.media_ip(), port);
                    remote.connect(callee, &call_id, here, pt, Some(telephone_event));
                    self.tell_caller_device(ToDevice::Connected {
                        call_id,
                        flow_id: a,
                        payload_type: pt,
                        video_flow_id: None,
                        telephone_event: Some(telephone_event),
                        video_formats: Vec::new(),
                    });
                    return Ok(());
                }
                let (a, b) = (media.next_flow_id(), media.next_flow_id());
                media.bridge_roq_roq((caller, a), (callee, b), stats)?;
                self.media.roq.extend([(caller, a), (callee, b)]);
                self.to_device(
                    callee,
                    ToDevice::Connected {
                        call_id: call_id.clone(),
                        flow_id: b,
                        payload_type: pt,
                        video_flow_id: None,
                        telephone_event: Some(telephone_event),
                        video_formats: Vec::new(),
                    },
                );
                self.tell_caller_device(ToDevice::Connected {
                    call_id,
                    flow_id: a,
                    payload_type: pt,
                    video_flow_id: None,
                    telephone_event: Some(telephone_event),
                    video_formats: Vec::new(),
                });
            }
            MediaPlan::SipToDevice {
                caller,
                session,
                pt,
                telephone_event,
                video,
                video_offered,
            } => {
                if let Some((remote, peer)) = self.remote_media(session, &call_id) {
                    // The device is on another node: the caller's port is bridged to a
                    // second port here, which sends to that node's relay port for the
                    // device (the media crosses the two nodes' relays, no more). Video is
                    // not carried across nodes (remote devices never declare it).
                    let port = self.caller_port()?;
                    let toward = media.allocate_port_near(port)?;
                    self.media.trunk_port = Some(toward);
                    media.bridge_udp((port, caller), (toward, peer), stats)?;
                    let here = SocketAddr::new(remote.media_ip(), toward);
                    remote.connect(session, &call_id, here, pt, telephone_event);
                    self.answer_caller(port, pt, telephone_event, video_offered, None, ctx);
                    return Ok(());
                }
                let port = self.caller_port()?;
                let flow = media.next_flow_id();
                media.bridge_roq((port, caller), session, flow, stats)?;
                self.media.roq.push((session, flow));
                let mut video_answer = None;
                let mut video_flow_id = None;
                let mut video_formats = Vec::new();
                if let Some(v) = video {
                    video_formats = v
                        .formats
                        .iter()
                        .map(|f| parley_codecs::control::VideoFormat {
                            pt: f.pt,
                            name: f.name.clone(),
                        })
                        .collect();
                    let vport = media.allocate_port_near(port)?;
                    self.media.video_port = Some(vport);
                    let vflow = media.next_flow_id();
                    media.bridge_roq((vport, v.caller), session, vflow, Arc::default())?;
                    self.media.roq.push((session, vflow));
                    video_flow_id = Some(vflow);
                    video_answer = Some(sdp::VideoAnswer {
                        port: vport,
                        formats: v.formats,
                    });
                }
                self.to_device(
                    session,
                    ToDevice::Connected {
                        call_id,
                        flow_id: flow,
                        payload_type: pt,
                        video_flow_id,
                        telephone_event,
                        video_formats,
                    },
                );
                self.answer_caller(port, pt, telephone_event, video_offered, video_answer, ctx);
            }
            MediaPlan::SipToTrunk {
                caller,
                trunk,
                pt,
                telephone_event,
                video_offered,
            } => {
                let tport = self.media.trunk_port.ok_or(MediaError::Unavailable)?;
                let port = self.caller_port()?;
                media.bridge_udp((port, caller), (tport, trunk), stats)?;
                self.answer_caller(port, pt, telephone_event, video_offered, None, ctx);
            }
        }
        Ok(())
    }

    /// For a device on another node: the cluster's legs and where that node receives the
    /// device's media for this call (`None` for a local device). A remote device that
    /// answered without a media address fails the connection (503).
    fn remote_media(
        &self,
        session: SessionId,
        call_id: &str,
    ) -> Option<(Arc<dyn RemoteLegs>, SocketAddr)> {
        let remote = self.env.remote.as_ref()?;
        let peer = remote.answer_media(session, call_id)?;
        Some((remote.clone(), peer))
    }

    /// The caller's relay port, next to the trunk leg's when there is one (both legs on
    /// one relay worker).
    fn caller_port(&mut self) -> Result<u16, MediaError> {
        let port = match self.media.trunk_port {
            Some(near) => self.env.media.allocate_port_near(near)?,
            None => self.env.media.allocate_port()?,
        };
        self.media.caller_port = Some(port);
        Ok(port)
    }

    fn tell_caller_device(&self, msg: ToDevice) {
        if let Some(dev) = &self.caller_device {
            dev.do_send(msg);
        }
    }

    fn answer_caller(
        &mut self,
        port: u16,
        pt: u8,
        telephone_event: Option<u8>,
        video_offered: bool,
        video: Option<sdp::VideoAnswer>,
        ctx: &mut Context<Self>,
    ) {
        let mut body = sdp::write(
            self.env.media.local_ip(),
            port,
            &[pt],
            telephone_event,
            self.call_handle(),
        );
        if video_offered {
            // RFC 3264: every offered stream gets an m-line in the answer; port 0 refuses it.
            sdp::append_video(
                &mut body,
                &video.unwrap_or(sdp::VideoAnswer {
                    port: 0,
                    formats: Vec::new(),
                }),
            );
        }
        self.sip(SipLegCmd::CallerAnswer { sdp: body }, ctx);
    }
}

impl Actor for CallActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        metrics::gauge!(m::CALLS_ACTIVE).increment(1.0);
        // The CDR row exists from the first moment: a crash cannot lose the call.
        self.env.cdr.submit(self.core.cdr_opening());
        self.drive(ctx);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        metrics::gauge!(m::CALLS_ACTIVE).decrement(1.0);
    }
}

impl Handler<FromDevice> for CallActor {
    type Result = ();
    fn handle(&mut self, msg: FromDevice, ctx: &mut Context<Self>) {
        self.core
            .handle_device(Instant::now(), msg.session, msg.event);
        self.drive(ctx);
    }
}

impl Handler<ToCall> for CallActor {
    type Result = ();
    fn handle(&mut self, msg: ToCall, ctx: &mut Context<Self>) {
        self.core.handle_sip(Instant::now(), msg.0);
        self.drive(ctx);
    }
}

impl Handler<PresenceChanged> for CallActor {
    type Result = ();
    fn handle(&mut self, msg: PresenceChanged, ctx: &mut Context<Self>) {
        self.core.handle_presence_changed(msg.at);
        self.drive(ctx);
    }
}
