//! A call from the INVITE datagram to the CDR and the address book, with every core in
//! memory on a virtual clock (`harness.rs`): the cases that need many seconds of
//! ringing, timers or races to show are cheap and exact here. The same behaviours are
//! proven against real SIPp peers and devices in the other test files.

mod harness;

mod basic;
mod cancel;
mod disconnect;
mod lost_device;
mod missing_ack;
mod reroute;
mod sequential;
mod trunk_failover;
