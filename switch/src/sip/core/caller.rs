//! The caller's dialog: we are the UAS of the gateway's INVITE. 100 Trying at once, a
//! new call for the number's user, then what the call decides — 180, the 200 with our
//! SDP (retransmitted until its ACK, RFC 3261 §13.3.1.4), a final error, or our BYE.

use super::Peer;
use std::time::Instant;

use parley_codecs::sdp;
use parley_core::ids::CallHandle;
use parley_core::sip::SipEvent;
use sipx_sip::{HeaderName, Message, Method, Request, TransactionKey};

use super::state::MediaState;
use super::state::{Call, CallerLeg, Purpose, Side};
use super::timers::TimerKind;
use super::{NewCall, Output, SipCore, msg};
use crate::metrics as m;
use crate::numbers;
use crate::sip::error::SipError;

impl SipCore {
    pub(super) fn on_invite(&mut self, now: Instant, key: &TransactionKey, req: Request) {
        if msg::to_tag(&req.headers).is_some() {
            self.on_reinvite(now, key, &req);
            return;
        }
        if self.draining {
            metrics::counter!(m::SIP_REJECTED_OVERLOAD_TOTAL, "reason" => "draining").increment(1);
            // Come back after the drain: another node, or this one restarted.
            self.respond_overloaded(now, key, &req, 30);
            return;
        }
        let Some(src) = self.dests.get(key).copied() else {
            return;
        };
        let cap = self.cfg.max_calls_per_source;
        if cap > 0 && self.live_from(src.addr.ip()) >= cap {
            metrics::counter!(m::SIP_REJECTED_OVERLOAD_TOTAL, "reason" => "calls_per_source")
                .increment(1);
            tracing::debug!(%src, cap, "INVITE refused: the source's live-call cap");
            // Statelessly: a flood must not pile up transactions retransmitting 503s.
            self.refuse_statelessly(key, &req, &SipError::Overloaded);
            return;
        }
        let Some(sip_call_id) = msg::call_id(&req.headers) else {
            return;
        };
        // An RFC 2543 peer sends no From tag (RFC 4475 §3.4.1): its tag is empty (RFC
        // 3261 §12.2.2 treats a missing tag as null).
        let from_tag = super::dialogs::from_tag(&req.headers).unwrap_or_default();
        if self
            .dialogs
            .contains_key(&(sip_call_id.clone(), from_tag.clone()))
        {
            // The same Call-ID and From tag on a new transaction: a merged request (RFC
            // 3261 §8.2.2.2), never a second call over the first.
            metrics::counter!(m::SIP_UNMATCHED_REQUESTS_TOTAL, "method" => "INVITE").increment(1);
            self.respond(now, key, &req, 482, None);
            return;
        }
        // Overload control admitted it already (`SipCore::handle_message`), before any
        // state was kept.
        // 100 Trying at once: stops the gateway's INVITE retransmissions while we route.
        if let Some(r) = msg::response(&req, 100, None, None, None) {
            let outputs = self.layer.send_response(key, r);
            self.run_tx(now, key, outputs, false);
        }
        let dialled = req
            .uri
            .user()
            .map(|u| String::from_utf8_lossy(u).into_owned())
            .unwrap_or_default();
        let Some(called) = numbers::to_e164(&dialled, &self.cfg.region) else {
            self.respond(now, key, &req, 404, None);
            return;
        };
        let Some(user) = self.directory.by_number(&called) else {
            self.respond(now, key, &req, 404, None);
            return;
        };
        let body = String::from_utf8_lossy(req.body()).into_owned();
        let (offer, video) = match sdp::parse_offer(&body) {
            Ok((o, v)) if o.first_g711().is_some() && o.port != 0 => (o, v),
            Ok(_) | Err(_) => {
                metrics::counter!(m::SIP_PARSE_ERRORS_TOTAL, "reason" => SipError::BadSdp.metric_reason()).increment(1);
                self.respond(now, key, &req, SipError::BadSdp.status(), None);
                return;
            }
        };
        let Some(from) = msg::from_addr(&req.headers) else {
            return;
        };
        let caller_name = from
            .display_name
            .as_ref()
            .map(|d| String::from_utf8_lossy(d).into_owned())
            .filter(|s| !s.is_empty());
        let from_user = from
            .uri
            .user()
            .map(|u| String::from_utf8_lossy(u).into_owned())
            .unwrap_or_default();
        let caller = numbers::to_e164(&from_user, &self.cfg.region).unwrap_or_else(|| {
            let host = from.uri.host().map(|h| h.to_string()).unwrap_or_default();
            if from_user.is_empty() {
                format!("sip:{host}")
            } else {
                format!("sip:{from_user}@{host}")
            }
        });
        let handle = self.handles.next();
        let ack_cseq = msg::cseq(&req.headers).map_or(0, |c| c.sequence);
        let local_tag = self.token(12);
        let caller_leg = CallerLeg {
            remote_target: msg::contact_uri(&req.headers),
            invite: req,
            key: key.clone(),
            src,
            local_tag,
            final_sent: false,
            ok: None,
            acked: false,
            retx_interval: self.cfg.timers.t1,
            retx_deadline: None,
            local_cseq: 1,
            media: None,
            retx_gen: 0,
            ack_cseq,
        };
        self.calls.insert(
            handle,
            Box::new(Call {
                caller: Some(caller_leg),
                trunk: None,
                done: false,
            }),
        );
        self.live_started(Some(src.addr.ip()));
        self.dialogs
            .insert((sip_call_id.clone(), from_tag), (handle, Side::Caller));
        self.out.push_back(Output::NewCall(Box::new(NewCall {
            handle,
            sip_call_id,
            user,
            caller,
            caller_name,
            called,
            offer,
            video,
        })));
    }

    /// 503 with `Retry-After: secs`, through the INVITE's transaction.
    pub(super) fn respond_overloaded(
        &mut self,
        now: Instant,
        key: &TransactionKey,
        req: &Request,
        secs: u32,
    ) {
        let tag = self.token(10);
        if let Some(mut r) = msg::response(req, 503, Some(&tag), None, None) {
            let after = secs.to_string();
            if let Ok(h) = sipx_sip::Header::build(HeaderName::RetryAfter, after) {
                r.headers.push(h);
            }
            let outputs = self.layer.send_response(key, r);
            self.run_tx(now, key, outputs, false);
        }
    }

    /// An ACK from `src`: it stops our 200's retransmission only inside the matched
    /// dialog, and only for the INVITE (CSeq) it acknowledges.
    pub(super) fn on_ack(&mut self, req: &Request, src: Option<Peer>) {
        if let Some((h, Side::Caller)) = self.match_dialog(req, src)
            && let Some(leg) = self.calls.get_mut(&h).and_then(|c| c.caller.as_mut())
            && msg::cseq(&req.headers).is_none_or(|c| c.sequence == leg.ack_cseq)
        {
            leg.acked = true;
        }
    }

    /// The transport of a call's caller dialog.
    fn caller_transport(&self, h: CallHandle) -> Option<super::Transport> {
        Some(self.calls.get(&h)?.caller.as_ref()?.src.transport)
    }

    pub(super) fn caller_response(
        &mut self,
        now: Instant,
        h: CallHandle,
        code: u16,
        sdp: Option<&str>,
    ) {
        let Some(transport) = self.caller_transport(h) else {
            return;
        };
        let contact = self.contact(transport);
        let Some(call) = self.calls.get_mut(&h) else {
            return;
        };
        let Some(leg) = call.caller.as_mut() else {
            return;
        };
        if leg.final_sent {
            return;
        }
        let Some(resp) =
            msg::response(&leg.invite, code, Some(&leg.local_tag), Some(&contact), sdp)
        else {
            return;
        };
        let key = leg.key.clone();
        if code >= 200 {
            leg.final_sent = true;
        }
        if code == 200 {
            if let Some(local) = sdp {
                leg.media = Some(MediaState::new(local, leg.invite.body()));
            }
            leg.ok = Some(Message::Response(resp.clone()).to_bytes());
            leg.retx_interval = self.cfg.timers.t1;
            leg.retx_deadline = Some(now + self.cfg.timers.timeout());
            let generation = leg.retx_gen;
            self.timers
                .set(now + self.cfg.timers.t1, TimerKind::Retx200(h, generation));
        }
        let outputs = self.layer.send_response(&key, resp);
        self.run_tx(now, &key, outputs, false);
    }

    pub(super) fn retransmit_200(&mut self, now: Instant, h: CallHandle, generation: u32) {
        let t2 = self.cfg.timers.t2;
        let Some(call) = self.calls.get_mut(&h) else {
            return;
        };
        let Some(leg) = call.caller.as_mut() else {
            return;
        };
        let (Some(deadline), Some(ok), false) = (leg.retx_deadline, leg.ok.clone(), leg.acked)
        else {
            return;
        };
        if generation != leg.retx_gen {
            return; // superseded by a re-INVITE's 200
        }
        if now >= deadline {
            leg.retx_deadline = None;
            if !call.done {
                self.out
                    .push_back(Output::Event(h, SipEvent::CallerAckTimeout));
            }
            return;
        }
        leg.retx_interval = (leg.retx_interval * 2).min(t2);
        let (src, next) = (leg.src, now + leg.retx_interval);
        // Also over a connection: RFC 3261 §13.3.1.4, the 2xx is retransmitted end to end
        // whatever the transport, as hops beyond the peer may be UDP.
        metrics::counter!(m::SIP_RETRANSMISSIONS_TOTAL).increment(1);
        self.out.push_back(Output::Transmit {
            dest: src.addr,
            transport: src.transport,
            data: ok,
        });
        self.timers.set(next, TimerKind::Retx200(h, generation));
    }

    pub(super) fn send_caller_bye(&mut self, now: Instant, h: CallHandle) {
        let Some(transport) = self.caller_transport(h) else {
            return;
        };
        let via = self.via(transport);
        let contact = self.contact(transport);
        let Some(call) = self.calls.get_mut(&h) else {
            return;
        };
        let Some(leg) = call.caller.as_mut() else {
            return;
        };
        leg.local_cseq += 1;
        leg.retx_deadline = None;
        let inv = &leg.invite;
        let Some(target) = leg
            .remote_target
            .clone()
            .or_else(|| msg::from_addr(&inv.headers).map(|a| a.uri))
        else {
            return;
        };
        let (Some(from), Some(to), Some(cid)) = (
            msg::header_str(&inv.headers, &HeaderName::To),
            msg::header_str(&inv.headers, &HeaderName::From),
            msg::call_id(&inv.headers),
        ) else {
            return;
        };
        let from = if msg::to_tag(&inv.headers).is_some() {
            from
        } else {
            format!("{from};tag={}", leg.local_tag)
        };
        let route: Vec<String> = inv
            .headers
            .get_all(&HeaderName::RecordRoute)
            .map(|h| String::from_utf8_lossy(&h.value()).into_owned())
            .collect();
        let (cseq, dest) = (leg.local_cseq, leg.src);
        let Some(req) = msg::build_request(
            Method::Bye,
            target,
            &via,
            &from,
            &to,
            &cid,
            cseq,
            &contact,
            &route,
            None,
        ) else {
            return;
        };
        self.send_request(now, h, req, dest, Purpose::Bye);
    }
}
