//! Which call an in-dialog request belongs to (RFC 3261 §12.2.2) and which INVITE a
//! CANCEL cancels (§9.2). Knowing a Call-ID is not enough to end, cancel or move a call:
//! a request must carry both of the dialog's tags, and on the gateway's side it must come
//! from the transport address the dialog was set up from (unless
//! [`super::CoreConfig::dialog_source_check`] is off, for gateways behind load
//! balancers). A CANCEL must name the INVITE's transaction (its branch and sent-by).
//! Anything else is answered 481 and changes nothing.
//!
//! Dialogs are indexed by Call-ID and the tag that is the peer's on the caller side (the
//! gateway's From tag) and ours on the trunk side (our From tag), so two dialogs that
//! share a Call-ID never overwrite each other.

use super::Peer;

use parley_core::ids::CallHandle;
use sipx_sip::{Request, TransactionKey};

use super::state::Side;
use super::{SipCore, msg};

/// Call-ID and the tag that, with it, names one of our dialogs.
pub(super) type DialogKey = (String, String);

/// The From tag of a message.
pub(super) fn from_tag(headers: &sipx_sip::Headers) -> Option<String> {
    let from = headers.typed::<sipx_sip::headers::From>()?.ok()?;
    from.tag().map(|t| String::from_utf8_lossy(t).into_owned())
}

impl SipCore {
    /// The call and side of an in-dialog request (BYE, re-INVITE, ACK of a 2xx) from
    /// `src`, if it matches one of our dialogs exactly.
    pub(super) fn match_dialog(
        &self,
        req: &Request,
        src: Option<Peer>,
    ) -> Option<(CallHandle, Side)> {
        let cid = msg::call_id(&req.headers)?;
        let (from, to) = (
            from_tag(&req.headers).unwrap_or_default(),
            msg::to_tag(&req.headers)?,
        );
        if let Some(&(h, Side::Caller)) = self.dialogs.get(&(cid.clone(), from.clone())) {
            let leg = self.calls.get(&h)?.caller.as_ref()?;
            let from_gateway =
                !self.cfg.dialog_source_check || src.is_some_and(|s| s.same_origin(&leg.src));
            return (to == leg.local_tag && from_gateway).then_some((h, Side::Caller));
        }
        if let Some(&(h, Side::Trunk)) = self.dialogs.get(&(cid, to)) {
            let leg = self.calls.get(&h)?.trunk.as_ref()?;
            let remote = leg.to_value.as_deref().and_then(tag_of)?;
            return (from == remote).then_some((h, Side::Trunk));
        }
        None
    }

    /// The call whose ringing INVITE a CANCEL cancels: same transaction (branch and
    /// sent-by of the top Via), same From tag and Call-ID, and from the gateway's address.
    pub(super) fn match_cancel(&self, req: &Request, src: Option<Peer>) -> Option<CallHandle> {
        let cid = msg::call_id(&req.headers)?;
        let from = from_tag(&req.headers).unwrap_or_default();
        let &(h, side) = self.dialogs.get(&(cid, from))?;
        if side != Side::Caller {
            return None;
        }
        let leg = self.calls.get(&h)?.caller.as_ref()?;
        let invite = TransactionKey::for_cancelled_invite(req)?;
        let from_gateway =
            !self.cfg.dialog_source_check || src.is_some_and(|s| s.same_origin(&leg.src));
        (invite == leg.key && from_gateway).then_some(h)
    }

    /// The trunk-side call a response (a retransmitted 2xx) belongs to: our From tag.
    pub(super) fn trunk_dialog_of_response(
        &self,
        headers: &sipx_sip::Headers,
    ) -> Option<CallHandle> {
        let key = (msg::call_id(headers)?, from_tag(headers)?);
        match self.dialogs.get(&key) {
            Some(&(h, Side::Trunk)) => Some(h),
            _ => None,
        }
    }
}

/// The `tag` parameter of a To/From header value.
fn tag_of(value: &str) -> Option<&str> {
    let i = value.find(";tag=")?;
    let rest = &value[i + 5..];
    Some(
        rest.split([';', ' ', '\t', '\r', '\n'])
            .next()
            .unwrap_or(rest),
    )
    .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    #[test]
    fn tag_of_finds_the_tag_parameter() {
        assert_eq!(super::tag_of("<sip:a@b>;tag=xyz"), Some("xyz"));
        assert_eq!(super::tag_of("<sip:a@b>;tag=xyz;foo=1"), Some("xyz"));
        assert_eq!(super::tag_of("<sip:a@b>"), None);
        assert_eq!(super::tag_of("<sip:a@b>;tag="), None);
    }
}
