//! The B2BUA's pairing: each call joins the caller's dialog (UAS side) and the trunk leg
//! (UAC side) under one handle. Requests inside a dialog find their call by Call-ID;
//! commands from the call go to the leg they name; a finished call's dialogs are kept a
//! while to absorb retransmissions, then reaped.

use std::time::Instant;

use parley_core::ids::CallHandle;
use parley_core::sip::{SipEvent, SipLegCmd};
use sipx_sip::{Request, TransactionKey};

use super::state::Side;
use super::timers::TimerKind;
use super::{Output, SipCore, msg};
use crate::metrics as m;

impl SipCore {
    /// A command from a call actor.
    pub fn handle_command(&mut self, now: Instant, handle: CallHandle, cmd: SipLegCmd) {
        match cmd {
            SipLegCmd::CallerRinging => self.caller_response(now, handle, 180, None),
            SipLegCmd::CallerAnswer { sdp } => self.caller_response(now, handle, 200, Some(&sdp)),
            SipLegCmd::CallerReject(code) => self.caller_response(now, handle, code, None),
            SipLegCmd::CallerBye => self.send_caller_bye(now, handle),
            SipLegCmd::TrunkInvite {
                trunk,
                to,
                from,
                from_name,
                sdp,
            } => {
                self.send_trunk_invite(now, handle, trunk, (&to, &from, from_name.as_deref()), &sdp)
            }
            SipLegCmd::TrunkCancel => self.send_trunk_cancel(now, handle),
            SipLegCmd::TrunkBye => self.send_trunk_bye(now, handle),
            SipLegCmd::Done => {
                if let Some(c) = self.calls.get_mut(&handle) {
                    let ended = (!c.done).then(|| c.caller.as_ref().map(|l| l.src.addr.ip()));
                    c.done = true;
                    if let Some(leg) = c.caller.as_mut() {
                        leg.retx_deadline = None;
                    }
                    if let Some(caller) = ended {
                        self.live_ended(caller);
                    }
                }
                // Keep the dialog a while to absorb retransmissions, then forget it.
                self.timers
                    .set(now + self.cfg.timers.timeout(), TimerKind::Reap(handle));
            }
        }
    }

    pub(super) fn on_bye(&mut self, now: Instant, key: &TransactionKey, req: &Request) {
        let src = self.dests.get(key).copied();
        match self.match_dialog(req, src) {
            Some((h, side)) => {
                self.respond(now, key, req, 200, None);
                if let Some(call) = self.calls.get_mut(&h)
                    && !call.done
                {
                    let ev = match side {
                        Side::Caller => {
                            if let Some(leg) = call.caller.as_mut() {
                                leg.acked = true;
                            }
                            SipEvent::CallerBye
                        }
                        Side::Trunk => SipEvent::TrunkBye,
                    };
                    self.out.push_back(Output::Event(h, ev));
                }
            }
            None => {
                metrics::counter!(m::SIP_UNMATCHED_REQUESTS_TOTAL, "method" => "BYE").increment(1);
                tracing::info!(?src, "BYE matches no dialog: 481");
                self.respond(now, key, req, 481, None)
            }
        }
    }

    pub(super) fn reap(&mut self, h: CallHandle) {
        if let Some(call) = self.calls.remove(&h) {
            if !call.done {
                self.live_ended(call.caller.as_ref().map(|l| l.src.addr.ip()));
            }
            if let Some(c) = call.caller.as_ref()
                && let Some(cid) = msg::call_id(&c.invite.headers)
            {
                let tag = super::dialogs::from_tag(&c.invite.headers).unwrap_or_default();
                self.dialogs.remove(&(cid, tag));
            }
            if let Some(t) = call.trunk
                && let Some(tag) = super::dialogs::from_tag(&t.invite.headers)
            {
                self.dialogs.remove(&(t.call_id, tag));
            }
        }
    }
}
