//! CANCEL from the gateway (RFC 3261 §9.2): answered 200 at once; the ringing call is
//! told, and the INVITE then gets its 487 from the call.

use std::time::Instant;

use parley_core::sip::SipEvent;
use sipx_sip::{Request, TransactionKey};

use super::state::Side;
use super::{Output, SipCore, msg};

impl SipCore {
    pub(super) fn on_cancel(&mut self, now: Instant, key: &TransactionKey, req: &Request) {
        let found = msg::call_id(&req.headers).and_then(|cid| self.by_call_id.get(&cid).copied());
        match found {
            Some((h, Side::Caller)) => {
                self.respond(now, key, req, 200, None);
                if let Some(call) = self.calls.get(&h)
                    && call.caller.as_ref().is_some_and(|c| !c.final_sent)
                    && !call.done
                {
                    self.out.push_back(Output::Event(h, SipEvent::CallerCancel));
                }
            }
            _ => self.respond(now, key, req, 481, None),
        }
    }
}
