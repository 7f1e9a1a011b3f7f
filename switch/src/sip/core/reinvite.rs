//! re-INVITE inside an established dialog (RFC 3261 §14): hold/resume, session refresh,
//! or the peer moving its media. Parley's own media address never changes, so the answer
//! is our description again (direction mirrored, `o=` version bumped when it changes); a
//! moved peer is reported to the call so the relay re-latches.

use std::net::SocketAddr;
use std::time::Instant;

use parley_codecs::sdp;
use parley_core::sip::SipEvent;
use sipx_sip::{Message, Request, TransactionKey};

use super::state::Side;
use super::timers::TimerKind;
use super::{Output, SipCore, msg};
use crate::metrics as m;
use crate::sip::error::SipError;

impl SipCore {
    /// A re-INVITE in an established dialog (RFC 3261 §14.2): hold/resume, a session
    /// refresh, or the peer moving its media. Parley's own media address never changes, so
    /// the answer is our description again (direction mirrored, `o=` version bumped when it
    /// changes); if the peer's address moved, the call is told so the relay re-latches and
    /// keeps the stream continuous. A re-offer without the negotiated codec gets 488 and
    /// the call goes on unchanged.
    pub(super) fn on_reinvite(&mut self, now: Instant, key: &TransactionKey, req: &Request) {
        let src = self.dests.get(key).copied();
        let Some((h, side)) = self.match_dialog(req, src) else {
            metrics::counter!(m::SIP_UNMATCHED_REQUESTS_TOTAL, "method" => "INVITE").increment(1);
            tracing::info!(?src, "re-INVITE matches no dialog: 481");
            self.respond(now, key, req, 481, None);
            return;
        };
        let Some(call) = self.calls.get_mut(&h).filter(|c| !c.done) else {
            self.respond(now, key, req, 481, None);
            return;
        };
        let state = match side {
            Side::Caller => call.caller.as_mut().and_then(|l| l.media.as_mut()),
            Side::Trunk => call.trunk.as_mut().and_then(|l| l.media.as_mut()),
        };
        let Some(state) = state else {
            // Not answered yet: our own INVITE transaction is still open (RFC 3261 §14.2).
            metrics::counter!(m::SIP_REINVITES_TOTAL, "result" => "rejected").increment(1);
            self.respond(now, key, req, 491, None);
            return;
        };
        let body = String::from_utf8_lossy(req.body()).into_owned();
        let (mut moved, mut video_moved) = (None, None);
        if !body.trim().is_empty() {
            // The relay does not transcode: the re-offer must keep a codec of ours.
            let ours: Vec<u8> = sdp::parse_audio(&state.local_sdp)
                .map(|m| m.g711_formats())
                .unwrap_or_default();
            let offer = sdp::parse_audio(&body)
                .ok()
                .filter(|o| o.port != 0 && o.g711_formats().iter().any(|pt| ours.contains(pt)));
            let (Some(offer), Ok(dir)) = (offer, sdp::direction(&body)) else {
                metrics::counter!(m::SIP_PARSE_ERRORS_TOTAL, "reason" => SipError::BadSdp.metric_reason()).increment(1);
                metrics::counter!(m::SIP_REINVITES_TOTAL, "result" => "rejected").increment(1);
                tracing::info!(
                    call = h,
                    "re-INVITE refused: no usable audio with the negotiated codec"
                );
                self.respond(now, key, req, SipError::BadSdp.status(), None);
                return;
            };
            let dir = dir.answer();
            let version = sdp::version(&state.local_sdp).unwrap_or(0);
            if sdp::redescribe(&state.local_sdp, dir, version) != state.local_sdp {
                state.local_sdp = sdp::redescribe(&state.local_sdp, dir, version + 1);
            }
            let addr = SocketAddr::new(offer.addr, offer.port);
            if !offer.addr.is_unspecified() && state.remote != Some(addr) {
                state.remote = Some(addr);
                moved = Some(addr);
            }
            // The video stream we relay, if any, follows its own address.
            if state.has_video()
                && let Ok((_, Some(v))) = sdp::parse_offer(&body)
                && !v.addr.is_unspecified()
            {
                let addr = SocketAddr::new(v.addr, v.port);
                if state.remote_video != Some(addr) {
                    state.remote_video = Some(addr);
                    video_moved = Some(addr);
                }
            }
        }
        // Without SDP the re-INVITE asks for our offer: the current description.
        let answer = state.local_sdp.clone();
        let result = if moved.is_some() || video_moved.is_some() {
            "moved"
        } else {
            "accepted"
        };
        metrics::counter!(m::SIP_REINVITES_TOTAL, "result" => result).increment(1);
        if let Some(addr) = moved {
            tracing::info!(call = h, side = ?side, media = %addr, "re-INVITE moved the peer's media");
            let ev = match side {
                Side::Caller => SipEvent::CallerMediaMoved(addr),
                Side::Trunk => SipEvent::TrunkMediaMoved(addr),
            };
            self.out.push_back(Output::Event(h, ev));
        }
        if let Some(addr) = video_moved
            && side == Side::Caller
        {
            tracing::info!(call = h, media = %addr, "re-INVITE moved the peer's video");
            self.out
                .push_back(Output::Event(h, SipEvent::CallerVideoMoved(addr)));
        }
        let contact = self.contact(src.map_or(super::Transport::Udp, |p| p.transport));
        let Some(resp) = msg::response(req, 200, None, Some(&contact), Some(&answer)) else {
            return;
        };
        // On the caller's dialog the 200 is retransmitted until its ACK, like the first.
        if side == Side::Caller
            && let Some(leg) = self.calls.get_mut(&h).and_then(|c| c.caller.as_mut())
        {
            leg.ok = Some(Message::Response(resp.clone()).to_bytes());
            leg.acked = false;
            leg.retx_gen += 1;
            leg.ack_cseq = msg::cseq(&req.headers).map_or(0, |c| c.sequence);
            leg.retx_interval = self.cfg.timers.t1;
            leg.retx_deadline = Some(now + self.cfg.timers.timeout());
            let generation = leg.retx_gen;
            self.timers
                .set(now + self.cfg.timers.t1, TimerKind::Retx200(h, generation));
        }
        let outputs = self.layer.send_response(key, resp);
        self.run_tx(now, key, outputs, false);
    }
}
