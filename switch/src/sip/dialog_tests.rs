//! RFC 3261 §12 and §9.2 against a hostile network: knowing a call's Call-ID is not
//! enough to end, cancel or move it. Each test starts a call, lets a stranger try with the
//! live Call-ID (made-up tags, another source address, another branch), checks that the
//! stranger got 481 and the call saw nothing, then shows the legitimate request works.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use parley_core::sip::{SipEvent, SipLegCmd};

use super::core_tests::{GW, answered_call, drain, first_lines, in_dialog, invite, reinvite};

const STRANGER: &str = "127.0.0.1:6666";

fn ours() -> String {
    parley_codecs::sdp::write([127, 0, 0, 1].into(), 4000, &[0], None, 9)
}

/// An SDP offer that moves the media to 127.0.0.2 (a hijack attempt).
const ELSEWHERE: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.2\r\ns=-\r\nc=IN IP4 127.0.0.2\r\nt=0 0\r\nm=audio 7777 RTP/AVP 0\r\n";

fn gw() -> SocketAddr {
    GW.parse().unwrap()
}

fn stranger() -> SocketAddr {
    STRANGER.parse().unwrap()
}

#[test]
fn a_bye_needs_both_tags_and_the_gateways_address() {
    let mut c = super::core_tests::core();
    let t0 = Instant::now();
    let tag = answered_call(&mut c, t0, "h1", &ours());
    let attempts = [
        (
            gw(),
            in_dialog("BYE", "h1", "z9hG4bK-s1", Some("made-up"), 2),
        ),
        (gw(), in_dialog("BYE", "h1", "z9hG4bK-s2", None, 2)),
        (
            stranger(),
            in_dialog("BYE", "h1", "z9hG4bK-s3", Some(&tag), 2),
        ),
    ];
    for (src, bye) in attempts {
        c.handle_datagram(t0, src, bye);
        let (tx, ev, _) = drain(&mut c);
        assert_eq!(
            first_lines(&tx),
            ["SIP/2.0 481 Call/Transaction Does Not Exist"]
        );
        assert_eq!(tx[0].0, src, "answered where it came from");
        assert!(ev.is_empty(), "the call heard nothing: {ev:?}");
    }
    c.handle_datagram(
        t0,
        gw(),
        in_dialog("BYE", "h1", "z9hG4bK-ok", Some(&tag), 2),
    );
    let (tx, ev, _) = drain(&mut c);
    assert_eq!(first_lines(&tx), ["SIP/2.0 200 OK"]);
    assert_eq!(ev, [SipEvent::CallerBye]);
}

#[test]
fn a_reinvite_outside_the_dialog_cannot_move_the_media() {
    let mut c = super::core_tests::core();
    let t0 = Instant::now();
    let tag = answered_call(&mut c, t0, "h2", &ours());
    c.handle_datagram(t0, gw(), reinvite("h2", "made-up", 2, ELSEWHERE));
    let (tx, ev, _) = drain(&mut c);
    assert_eq!(
        first_lines(&tx),
        ["SIP/2.0 481 Call/Transaction Does Not Exist"]
    );
    assert!(ev.is_empty(), "{ev:?}");
    c.handle_datagram(t0, stranger(), reinvite("h2", &tag, 3, ELSEWHERE));
    let (tx, ev, _) = drain(&mut c);
    assert_eq!(
        first_lines(&tx),
        ["SIP/2.0 481 Call/Transaction Does Not Exist"]
    );
    assert!(ev.is_empty(), "{ev:?}");
    // Inside the dialog, from the gateway: accepted, and the move is reported.
    c.handle_datagram(t0, gw(), reinvite("h2", &tag, 4, ELSEWHERE));
    let (tx, ev, _) = drain(&mut c);
    assert_eq!(first_lines(&tx), ["SIP/2.0 200 OK"]);
    assert_eq!(
        ev,
        [SipEvent::CallerMediaMoved(
            "127.0.0.2:7777".parse().unwrap()
        )]
    );
}

#[test]
fn a_cancel_must_name_the_ringing_invites_transaction() {
    let mut c = super::core_tests::core();
    let t0 = Instant::now();
    c.handle_datagram(t0, gw(), invite("h3", "+15550100001"));
    drain(&mut c);
    c.handle_datagram(
        t0,
        gw(),
        in_dialog("CANCEL", "h3", "z9hG4bK-guessed", None, 1),
    );
    let (tx, ev, _) = drain(&mut c);
    assert_eq!(
        first_lines(&tx),
        ["SIP/2.0 481 Call/Transaction Does Not Exist"]
    );
    assert!(ev.is_empty(), "{ev:?}");
    c.handle_datagram(t0, gw(), in_dialog("CANCEL", "h3", "z9hG4bK-h3", None, 1));
    let (tx, ev, _) = drain(&mut c);
    assert_eq!(first_lines(&tx), ["SIP/2.0 200 OK"]);
    assert_eq!(ev, [SipEvent::CallerCancel]);
}

/// Even a stranger who sniffed the INVITE's branch cannot cancel it from elsewhere.
/// (Its CANCEL does take the branch's CANCEL transaction, so the gateway's own CANCEL on
/// that branch would then be absorbed as a retransmission: the call rings on to its
/// ring timeout rather than being cancelled by the stranger.)
#[test]
fn a_cancel_from_another_address_is_refused_even_with_the_branch() {
    let mut c = super::core_tests::core();
    let t0 = Instant::now();
    c.handle_datagram(t0, gw(), invite("h7", "+15550100001"));
    drain(&mut c);
    c.handle_datagram(
        t0,
        stranger(),
        in_dialog("CANCEL", "h7", "z9hG4bK-h7", None, 1),
    );
    let (tx, ev, _) = drain(&mut c);
    assert_eq!(
        first_lines(&tx),
        ["SIP/2.0 481 Call/Transaction Does Not Exist"]
    );
    assert_eq!(tx[0].0, stranger());
    assert!(ev.is_empty(), "{ev:?}");
    // The call still rings: our 180 goes out.
    c.handle_command(t0, 1, SipLegCmd::CallerRinging);
    assert_eq!(first_lines(&drain(&mut c).0), ["SIP/2.0 180 Ringing"]);
}

#[test]
fn an_ack_from_a_stranger_does_not_stop_the_200() {
    let mut c = super::core_tests::core();
    let t0 = Instant::now();
    c.handle_datagram(t0, gw(), invite("h4", "+15550100001"));
    drain(&mut c);
    c.handle_command(t0, 1, SipLegCmd::CallerAnswer { sdp: ours() });
    let (tx, _, _) = drain(&mut c);
    let tag = super::core_tests::to_tag_of(&tx[0].1);
    c.handle_datagram(
        t0,
        stranger(),
        in_dialog("ACK", "h4", "z9hG4bK-x", Some(&tag), 1),
    );
    c.handle_timeout(t0 + std::time::Duration::from_millis(500));
    let (tx, _, _) = drain(&mut c);
    assert_eq!(first_lines(&tx), ["SIP/2.0 200 OK"], "still retransmitted");
}

#[test]
fn an_invite_reusing_a_live_call_id_and_from_tag_is_refused_as_merged() {
    let mut c = super::core_tests::core();
    let t0 = Instant::now();
    c.handle_datagram(t0, gw(), invite("h5", "+15550100001"));
    let (_, _, new) = drain(&mut c);
    assert_eq!(new, 1);
    // Same Call-ID and From tag on a new branch.
    let merged = String::from_utf8(invite("h5", "+15550100001").to_vec())
        .unwrap()
        .replace("branch=z9hG4bK-h5", "branch=z9hG4bK-other");
    c.handle_datagram(t0, stranger(), Bytes::from(merged));
    let (tx, _, new) = drain(&mut c);
    assert_eq!(first_lines(&tx), ["SIP/2.0 482 Loop Detected"]);
    assert_eq!(new, 0, "no second call over the first");
    // The first call is untouched: its CANCEL still works.
    c.handle_datagram(t0, gw(), in_dialog("CANCEL", "h5", "z9hG4bK-h5", None, 1));
    assert_eq!(drain(&mut c).1, [SipEvent::CallerCancel]);
}

#[test]
fn without_the_source_check_a_dialog_may_move_between_addresses() {
    let mut c = super::core_tests::core_with(false);
    let t0 = Instant::now();
    let tag = answered_call(&mut c, t0, "h6", &ours());
    // Behind a load balancer the BYE comes from another address: accepted, but the
    // tags are still required.
    c.handle_datagram(
        t0,
        stranger(),
        in_dialog("BYE", "h6", "z9hG4bK-s1", Some("made-up"), 2),
    );
    assert!(drain(&mut c).1.is_empty());
    c.handle_datagram(
        t0,
        stranger(),
        in_dialog("BYE", "h6", "z9hG4bK-s2", Some(&tag), 2),
    );
    assert_eq!(drain(&mut c).1, [SipEvent::CallerBye]);
}
