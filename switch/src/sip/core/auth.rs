//! Digest authentication toward the trunk (RFC 3261 §22, RFC 7616 through `sipx-sip`):
//! a 401/407 to our INVITE is answered once per leg with the configured credentials.

use std::time::Instant;

use bytes::Bytes;
use parley_core::ids::CallHandle;
use sipx_sip::{HeaderName, Method, RequestBuilder, Response};

use super::state::Purpose;
use super::{SipCore, msg};

impl SipCore {
    /// Answers the trunk's digest challenge: the same INVITE (same dialog identifiers, next
    /// CSeq, new branch) with credentials. Returns false when the challenge is unusable.
    pub(super) fn retry_with_credentials(
        &mut self,
        now: Instant,
        h: CallHandle,
        resp: &Response,
    ) -> bool {
        let trunk = self
            .calls
            .get(&h)
            .and_then(|c| c.trunk.as_ref())
            .map(|t| t.trunk);
        let Some(creds) = trunk
            .and_then(|t| self.cfg.trunks.get(t))
            .and_then(|t| t.auth.clone())
        else {
            return false;
        };
        let mut challenges = Vec::new();
        for (name, proxy) in [
            (HeaderName::WwwAuthenticate, false),
            (HeaderName::ProxyAuthenticate, true),
        ] {
            for hdr in resp.headers.get_all(&name) {
                if let Some(c) = sipx_sip::auth::Challenge::parse(&hdr.value(), proxy) {
                    challenges.push(c);
                }
            }
        }
        let Some(challenge) = sipx_sip::auth::strongest(challenges) else {
            tracing::warn!("trunk challenge without a usable Digest offer");
            return false;
        };
        let Some(transport) = self
            .calls
            .get(&h)
            .and_then(|c| c.trunk.as_ref())
            .map(|t| t.dest.transport)
        else {
            return false;
        };
        let via = self.via(transport);
        let cnonce = self.token(16);
        let Some(leg) = self.calls.get_mut(&h).and_then(|c| c.trunk.as_mut()) else {
            return false;
        };
        let inv = &leg.invite;
        let uri = inv.uri.to_string();
        let answer = sipx_sip::auth::respond(&challenge, &creds, "INVITE", &uri, 1, &cnonce);
        let seq = msg::cseq(&inv.headers).map_or(1, |c| c.sequence) + 1;
        let mut b = RequestBuilder::new(Method::Invite, inv.uri.clone());
        let Ok(nb) = b.header(HeaderName::Via, via) else {
            return false;
        };
        b = nb.max_forwards(70);
        for name in [
            HeaderName::From,
            HeaderName::To,
            HeaderName::CallId,
            HeaderName::Contact,
            HeaderName::UserAgent,
            HeaderName::ContentType,
        ] {
            if let Some(v) = inv.headers.value(&name) {
                let Ok(nb) = b.header(name, Bytes::from(v.into_owned())) else {
                    return false;
                };
                b = nb;
            }
        }
        let Ok(nb) = b
            .cseq(seq, &Method::Invite)
            .and_then(|b| b.header(challenge.response_header(), answer))
        else {
            return false;
        };
        let req = nb.body(inv.body().clone()).build();
        leg.invite = req.clone();
        let dest = leg.dest;
        tracing::info!(realm = %challenge.realm, "answering the trunk's digest challenge");
        self.send_request(now, h, req, dest, Purpose::TrunkInvite);
        true
    }
}
