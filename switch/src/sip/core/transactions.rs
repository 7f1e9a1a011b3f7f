//! Glue between the SIP core and `sipx-sip`'s transaction layer: what a transaction
//! outputs (send, arm or clear a timer, hand a message to us, end) is carried out here,
//! and client transactions are started here.

use std::time::Instant;

use parley_core::ids::CallHandle;
use sipx_sip::transaction::Output as TxOut;
use sipx_sip::{Request, TransactionKey};

use super::state::Purpose;
use super::timers::TimerKind;
use super::{Peer, SipCore};
use crate::metrics as m;

impl SipCore {
    pub(super) fn run_tx(
        &mut self,
        now: Instant,
        key: &TransactionKey,
        outputs: Vec<TxOut>,
        retransmit: bool,
    ) {
        for o in outputs {
            match o {
                TxOut::Send(msg) => {
                    if retransmit {
                        metrics::counter!(m::SIP_RETRANSMISSIONS_TOTAL).increment(1);
                    }
                    if let Some(dest) = self.dests.get(key).copied() {
                        self.transmit(dest, &msg);
                    }
                }
                TxOut::SetTimer { timer, after } => self
                    .timers
                    .set(now + after, TimerKind::Txn(key.clone(), timer)),
                TxOut::ClearTimer(timer) => self.timers.clear(key, timer),
                TxOut::ToTu(ev) => self.handle_tu(now, key, *ev),
                TxOut::Terminated(_) => {
                    self.dests.remove(key);
                    self.sources.remove(key);
                    self.purposes.remove(key);
                    self.timers.clear_transaction(key);
                }
                _ => {}
            }
        }
    }

    pub(super) fn send_request(
        &mut self,
        now: Instant,
        h: CallHandle,
        req: Request,
        dest: Peer,
        purpose: Purpose,
    ) {
        let Some((key, outputs)) = self.layer.send_request(req, dest.transport.reliability())
        else {
            tracing::error!("could not create a client transaction");
            return;
        };
        self.dests.insert(key.clone(), dest);
        self.purposes.insert(key.clone(), (h, purpose));
        self.run_tx(now, &key, outputs, false);
    }
}
