//! The trunk leg: we are the UAC of an INVITE toward the PSTN trunk. Its provisional and
//! final answers become the call's events; we ACK 2xx ourselves (again when a 2xx is
//! retransmitted), CANCEL while it rings and BYE once it answered. A digest challenge is
//! answered once per leg (`auth.rs`).

use std::time::Instant;

use bytes::Bytes;
use parley_codecs::sdp;
use parley_core::ids::CallHandle;
use parley_core::sip::SipEvent;
use sipx_sip::{
    HeaderName, Message, Method, Request, RequestBuilder, Response, TransactionKey, Uri,
};

use super::state::MediaState;
use super::state::{Call, Purpose, Side, TrunkLeg};
use super::{Output, Peer, SipCore, msg};

impl SipCore {
    pub(super) fn send_trunk_invite(
        &mut self,
        now: Instant,
        h: CallHandle,
        trunk_id: parley_core::numberplan::TrunkId,
        (to, from, from_name): (&str, &str, Option<&str>),
        body: &str,
    ) {
        let Some(peer) = self.cfg.trunks.get(trunk_id).map(|t| Peer {
            addr: t.addr,
            transport: t.transport,
        }) else {
            self.out
                .push_back(Output::Event(h, SipEvent::TrunkFailed(503)));
            return;
        };
        let trunk = peer.addr;
        let via = self.via(peer.transport);
        let contact = self.contact(peer.transport);
        let param = match peer.transport {
            super::Transport::Udp => String::new(),
            t => format!(";transport={}", t.as_str()),
        };
        let Ok(uri) = Uri::parse(Bytes::from(format!("sip:{to}@{trunk}{param}"))) else {
            self.out
                .push_back(Output::Event(h, SipEvent::TrunkFailed(484)));
            return;
        };
        let from_user = from
            .strip_prefix("sip:")
            .map(|s| s.split('@').next().unwrap_or("anonymous"))
            .unwrap_or(from);
        let display = from_name
            .map(|n| format!("\"{}\" ", n.replace(['"', '\\', '\r', '\n'], "")))
            .unwrap_or_default();
        let tag = self.token(12);
        let from_hdr = format!(
            "{display}<sip:{from_user}@{}>;tag={tag}",
            self.cfg.local.ip()
        );
        let to_hdr = format!("<sip:{to}@{trunk}>");
        let cid = format!("{}@{}", self.token(20), self.cfg.call_id_host);
        let Some(req) = msg::build_request(
            Method::Invite,
            uri,
            &via,
            &from_hdr,
            &to_hdr,
            &cid,
            1,
            &contact,
            &[],
            Some(body),
        ) else {
            self.out
                .push_back(Output::Event(h, SipEvent::TrunkFailed(500)));
            return;
        };
        // A failover replaces the failed leg: its dialog (never established) goes with it.
        if let Some(old) = self.calls.get_mut(&h).and_then(|c| c.trunk.take()) {
            self.dialogs.remove(&(old.call_id, old.local_tag));
        }
        // A call dialled from an IM device has no caller leg here: it starts with this one.
        let live = &mut self.live;
        let call = self.calls.entry(h).or_insert_with(|| {
            *live += 1;
            Box::new(Call {
                caller: None,
                trunk: None,
                done: false,
            })
        });
        {
            call.trunk = Some(TrunkLeg {
                trunk: trunk_id,
                local_tag: tag.clone(),
                call_id: cid.clone(),
                invite: req.clone(),
                dest: peer,
                to_value: None,
                remote_target: None,
                answered: false,
                cancelled: false,
                auth_tried: false,
                media: None,
            });
        }
        self.dialogs.insert((cid, tag), (h, Side::Trunk));
        self.send_request(now, h, req, peer, Purpose::TrunkInvite);
    }

    pub(super) fn on_response(&mut self, now: Instant, key: &TransactionKey, resp: &Response) {
        let Some((h, purpose)) = self.purposes.get(key).copied() else {
            return;
        };
        let code = resp.status.code();
        if let Purpose::Probe(id) = purpose {
            if code >= 200 {
                self.out.push_back(Output::ProbeResult {
                    id,
                    code: Some(code),
                });
            }
            return;
        }
        if purpose != Purpose::TrunkInvite {
            return;
        }
        let Some(call) = self.calls.get_mut(&h) else {
            return;
        };
        let done = call.done;
        let Some(leg) = call.trunk.as_mut() else {
            return;
        };
        // After a failover, answers of the failed trunk's transaction are not this leg's.
        if msg::header_str(&resp.headers, &HeaderName::CallId).as_deref()
            != Some(leg.call_id.as_str())
        {
            return;
        }
        match code {
            100 => {}
            101..=199 => {
                if !done {
                    self.out.push_back(Output::Event(h, SipEvent::TrunkRinging));
                }
            }
            200..=299 => {
                let first = !leg.answered;
                leg.answered = true;
                leg.to_value = msg::header_str(&resp.headers, &HeaderName::To);
                leg.remote_target =
                    msg::contact_uri(&resp.headers).or_else(|| leg.remote_target.clone());
                self.send_trunk_ack(h);
                if !first {
                    return;
                }
                let cancelled = self
                    .calls
                    .get(&h)
                    .and_then(|c| c.trunk.as_ref())
                    .is_some_and(|t| t.cancelled);
                if done || cancelled {
                    self.send_trunk_bye(now, h);
                    return;
                }
                match sdp::parse_audio(&String::from_utf8_lossy(resp.body())) {
                    Ok(md) if md.first_g711().is_some() => {
                        if let Some(leg) = self.calls.get_mut(&h).and_then(|c| c.trunk.as_mut()) {
                            let local = String::from_utf8_lossy(leg.invite.body()).into_owned();
                            leg.media = Some(MediaState::new(&local, resp.body()));
                        }
                        self.out
                            .push_back(Output::Event(h, SipEvent::TrunkAnswered(md)));
                    }
                    _ => {
                        self.send_trunk_bye(now, h);
                        self.out
                            .push_back(Output::Event(h, SipEvent::TrunkFailed(488)));
                    }
                }
            }
            401 | 407
                if !done
                    && !leg.cancelled
                    && !leg.auth_tried
                    && self
                        .cfg
                        .trunks
                        .get(leg.trunk)
                        .is_some_and(|t| t.auth.is_some()) =>
            {
                leg.auth_tried = true;
                if !self.retry_with_credentials(now, h, resp) {
                    self.out
                        .push_back(Output::Event(h, SipEvent::TrunkFailed(code)));
                }
            }
            _ => {
                // A 487 to our own CANCEL (re-route, caller cancel) is not a trunk failure.
                if !done && !leg.cancelled {
                    self.out
                        .push_back(Output::Event(h, SipEvent::TrunkFailed(code)));
                }
            }
        }
    }

    pub(super) fn trunk_leg_abandoned(&self, h: CallHandle) -> bool {
        self.calls
            .get(&h)
            .is_none_or(|c| c.done || c.trunk.as_ref().is_none_or(|t| t.cancelled))
    }

    pub(super) fn send_trunk_cancel(&mut self, now: Instant, h: CallHandle) {
        let Some(leg) = self.calls.get_mut(&h).and_then(|c| c.trunk.as_mut()) else {
            return;
        };
        if leg.answered || leg.cancelled {
            return;
        }
        leg.cancelled = true;
        let inv = leg.invite.clone();
        let dest = leg.dest;
        // CANCEL copies Request-URI, Via (same branch), From, To, Call-ID and the CSeq number.
        let mut b = RequestBuilder::new(Method::Cancel, inv.uri.clone());
        for name in [
            HeaderName::Via,
            HeaderName::From,
            HeaderName::To,
            HeaderName::CallId,
        ] {
            if let Some(v) = inv.headers.value(&name) {
                let Ok(nb) = b.header(name, Bytes::from(v.into_owned())) else {
                    return;
                };
                b = nb;
            }
        }
        let seq = msg::cseq(&inv.headers).map(|c| c.sequence).unwrap_or(1);
        let Ok(b) = b.max_forwards(70).cseq(seq, &Method::Cancel) else {
            return;
        };
        self.send_request(now, h, b.build(), dest, Purpose::TrunkCancel);
    }

    /// A request inside the trunk dialog (ACK for the 2xx: the INVITE's CSeq; BYE: the
    /// next one), addressed to the trunk's Contact, with where to send it.
    pub(super) fn trunk_dialog_request(
        &mut self,
        h: CallHandle,
        method: Method,
    ) -> Option<(Request, Peer)> {
        let transport = self.calls.get(&h)?.trunk.as_ref()?.dest.transport;
        let via = self.via(transport);
        let contact = self.contact(transport);
        let leg = self.calls.get(&h)?.trunk.as_ref()?;
        let inv = &leg.invite;
        let target = leg.remote_target.clone().unwrap_or_else(|| inv.uri.clone());
        let from = msg::header_str(&inv.headers, &HeaderName::From)?;
        let to = leg.to_value.clone()?;
        let invite_seq = msg::cseq(&inv.headers).map_or(1, |c| c.sequence);
        let seq = if method == Method::Ack {
            invite_seq
        } else {
            invite_seq + 1
        };
        let req = msg::build_request(
            method,
            target,
            &via,
            &from,
            &to,
            &leg.call_id,
            seq,
            &contact,
            &[],
            None,
        )?;
        Some((req, leg.dest))
    }

    pub(super) fn send_trunk_ack(&mut self, h: CallHandle) {
        if let Some((ack, dest)) = self.trunk_dialog_request(h, Method::Ack) {
            self.transmit(dest, &Message::Request(ack));
        }
    }

    pub(super) fn send_trunk_bye(&mut self, now: Instant, h: CallHandle) {
        let answered = self
            .calls
            .get(&h)
            .and_then(|c| c.trunk.as_ref())
            .is_some_and(|t| t.answered);
        if let (true, Some((bye, dest))) = (answered, self.trunk_dialog_request(h, Method::Bye)) {
            self.send_request(now, h, bye, dest, Purpose::Bye);
        }
    }

    pub(super) fn on_stray_response(&mut self, resp: &Response) {
        // A 2xx retransmitted after our INVITE transaction ended: our ACK was lost.
        let is_invite_2xx = resp.status.is_success()
            && msg::cseq(&resp.headers).is_some_and(|c| c.method == Method::Invite);
        if !is_invite_2xx {
            return;
        }
        if let Some((h, Side::Trunk)) = self
            .trunk_dialog_of_response(&resp.headers)
            .map(|h| (h, Side::Trunk))
        {
            self.send_trunk_ack(h);
        }
    }
}
