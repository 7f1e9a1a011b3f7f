//! CANCEL from the gateway (RFC 3261 §9.2): when it names the ringing INVITE's
//! transaction (`dialogs.rs`) it is answered 200 at once, the call is told, and the INVITE
//! then gets its 487 from the call; any other CANCEL gets 481 and changes nothing.

use std::time::Instant;

use parley_core::sip::SipEvent;
use sipx_sip::{Request, TransactionKey};

use super::{Output, SipCore};
use crate::metrics as m;

impl SipCore {
    pub(super) fn on_cancel(&mut self, now: Instant, key: &TransactionKey, req: &Request) {
        let src = self.dests.get(key).copied();
        match self.match_cancel(req, src) {
            Some(h) => {
                self.respond(now, key, req, 200, None);
                if let Some(call) = self.calls.get(&h)
                    && call.caller.as_ref().is_some_and(|c| !c.final_sent)
                    && !call.done
                {
                    self.out.push_back(Output::Event(h, SipEvent::CallerCancel));
                }
            }
            None => {
                metrics::counter!(m::SIP_UNMATCHED_REQUESTS_TOTAL, "method" => "CANCEL")
                    .increment(1);
                tracing::info!(?src, "CANCEL matches no ringing INVITE: 481");
                self.respond(now, key, req, 481, None)
            }
        }
    }
}
