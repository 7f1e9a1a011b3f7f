//! OPTIONS health probes toward trunks: each probe is a client transaction whose final
//! answer (or timeout) comes out as [`Output::ProbeResult`].

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use sipx_sip::{Method, Uri};

use super::state::Purpose;
use super::{Output, Peer, SipCore, Transport, msg};

impl SipCore {
    /// Sends an OPTIONS probe to `dest` (a trunk health check); the outcome comes out as
    /// [`Output::ProbeResult`] with the returned id.
    /// The probe goes over the transport configured for the trunk at `dest`.
    pub fn handle_probe(&mut self, now: Instant, dest: SocketAddr) -> u64 {
        self.next_probe += 1;
        let id = self.next_probe;
        let transport = self
            .cfg
            .trunks
            .iter()
            .find(|t| t.addr == dest)
            .map_or(Transport::Udp, |t| t.transport);
        let via = self.via(transport);
        let contact = self.contact(transport);
        let tag = self.token(10);
        let from = format!("<sip:parley@{}>;tag={tag}", self.cfg.local);
        let to = format!("<sip:{dest}>");
        let cid = format!("{}@{}", self.token(20), self.cfg.call_id_host);
        let req = Uri::parse(Bytes::from(format!("sip:{dest}")))
            .ok()
            .and_then(|uri| {
                msg::build_request(
                    Method::Options,
                    uri,
                    &via,
                    &from,
                    &to,
                    &cid,
                    1,
                    &contact,
                    &[],
                    None,
                )
            });
        match req {
            Some(req) => self.send_request(
                now,
                0,
                req,
                Peer {
                    addr: dest,
                    transport,
                },
                Purpose::Probe(id),
            ),
            None => self.out.push_back(Output::ProbeResult { id, code: None }),
        }
        id
    }
}
