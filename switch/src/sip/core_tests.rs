//! The B2BUA core on a virtual clock: no socket, no sleeping. Time is an `Instant` the test
//! moves forward; outputs are drained and inspected as SIP text.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parley_core::directory::{StaticDirectory, UserIdentity};
use parley_core::ids::Sequence;
use parley_core::sip::{SipEvent, SipLegCmd};
use sipx_sip::Timers;

use super::core::{CoreConfig, Output, SipCore};

pub(super) const GW: &str = "127.0.0.1:5070";
pub(super) const TRUNK: &str = "127.0.0.1:5080";

pub(super) fn core() -> SipCore {
    core_with(true)
}

/// A core with alice, the trunk and the given dialog source check.
pub(super) fn core_with(dialog_source_check: bool) -> SipCore {
    core_limited(
        dialog_source_check,
        parley_core::overload::OverloadLimits::OFF,
    )
}

/// [`core_with`], with overload control's limits.
pub(super) fn core_limited(
    dialog_source_check: bool,
    overload: parley_core::overload::OverloadLimits,
) -> SipCore {
    let directory = StaticDirectory(vec![UserIdentity {
        tenant: "demo".into(),
        user: "alice".into(),
        number: "+15550100001".into(),
    }]);
    SipCore::new(
        CoreConfig {
            local: "127.0.0.1:5060".parse().unwrap(),
            local_tcp: None,
            local_tls: None,
            trunks: vec![crate::sip::core::TrunkTarget {
                addr: TRUNK.parse().unwrap(),
                transport: crate::sip::core::Transport::Udp,
                auth: None,
            }],
            region: "US".into(),
            timers: Timers::default(),
            rng_seed: [7; 32],
            dialog_source_check,
            max_server_transactions: 10_000,
            max_calls_per_source: 0,
            overload,
            max_transactions_per_source: 0,
            call_id_host: "parley".into(),
        },
        Arc::new(directory),
        Arc::new(Sequence::new()),
    )
}

pub(super) fn invite(call_id: &str, to: &str) -> Bytes {
    let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";
    Bytes::from(format!(
        "INVITE sip:{to}@127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP {GW};branch=z9hG4bK-{call_id}\r\nFrom: \"Gw\" <sip:+15557770001@127.0.0.1>;tag=gw1\r\nTo: <sip:{to}@127.0.0.1>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:gw@{GW}>\r\nMax-Forwards: 70\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    ))
}

pub(super) fn in_dialog(
    method: &str,
    call_id: &str,
    branch: &str,
    to_tag: Option<&str>,
    cseq: u32,
) -> Bytes {
    let tag = to_tag.map(|t| format!(";tag={t}")).unwrap_or_default();
    Bytes::from(format!(
        "{method} sip:+15550100001@127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP {GW};branch={branch}\r\nFrom: \"Gw\" <sip:+15557770001@127.0.0.1>;tag=gw1\r\nTo: <sip:+15550100001@127.0.0.1>{tag}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} {method}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ))
}

/// Drains outputs: (transmitted messages with destinations, events, new calls).
pub(super) fn drain(c: &mut SipCore) -> (Vec<(SocketAddr, String)>, Vec<SipEvent>, usize) {
    let (tx, ev, new, probes) = drain_all(c);
    assert!(probes.is_empty(), "unexpected probe results {probes:?}");
    (tx, ev, new)
}

pub(super) type Drained = (
    Vec<(SocketAddr, String)>,
    Vec<SipEvent>,
    usize,
    Vec<(u64, Option<u16>)>,
);

pub(super) fn drain_all(c: &mut SipCore) -> Drained {
    let (mut tx, mut ev, mut new, mut probes) = (Vec::new(), Vec::new(), 0, Vec::new());
    while let Some(o) = c.poll_output() {
        match o {
            Output::Transmit { dest, data, .. } => {
                tx.push((dest, String::from_utf8_lossy(&data).into_owned()))
            }
            Output::Event(_, e) => ev.push(e),
            Output::NewCall(_) => new += 1,
            Output::ProbeResult { id, code } => probes.push((id, code)),
        }
    }
    (tx, ev, new, probes)
}

pub(super) fn first_lines(tx: &[(SocketAddr, String)]) -> Vec<&str> {
    tx.iter()
        .map(|(_, m)| m.lines().next().unwrap_or(""))
        .collect()
}

pub(super) fn to_tag_of(msg: &str) -> String {
    let to = msg.lines().find(|l| l.starts_with("To:")).unwrap();
    to.split("tag=").nth(1).unwrap().trim().to_owned()
}

#[test]
fn invite_gets_100_and_one_call_even_when_retransmitted() {
    {
        let (mut c, t0, gw) = (core(), Instant::now(), GW.parse().unwrap());
        c.handle_datagram(t0, gw, invite("a1", "+15550100001"));
        let (tx, _, new) = drain(&mut c);
        assert_eq!(first_lines(&tx), vec!["SIP/2.0 100 Trying"]);
        assert_eq!(tx[0].0, gw);
        assert_eq!(new, 1);
        c.handle_datagram(
            t0 + Duration::from_millis(500),
            gw,
            invite("a1", "+15550100001"),
        );
        let (tx, _, new) = drain(&mut c);
        assert_eq!(
            first_lines(&tx),
            vec!["SIP/2.0 100 Trying"],
            "retransmission answered from the transaction"
        );
        assert_eq!(new, 0, "no second call");
    }
}

#[test]
fn a_shed_invite_keeps_no_state_and_its_retransmission_gets_the_same_503() {
    let limits = parley_core::overload::OverloadLimits {
        max_rate: 1,
        ..parley_core::overload::OverloadLimits::OFF
    };
    let (mut c, t0, gw) = (
        core_limited(true, limits),
        Instant::now(),
        GW.parse().unwrap(),
    );
    // The bucket holds one call: the first INVITE is admitted...
    c.handle_datagram(t0, gw, invite("o0", "+15550100001"));
    let (tx, _, new) = drain(&mut c);
    assert_eq!((first_lines(&tx), new), (vec!["SIP/2.0 100 Trying"], 1));
    // ...the next 50 are refused at once, statelessly, with Retry-After.
    for i in 1..=50 {
        c.handle_datagram(t0, gw, invite(&format!("o{i}"), "+15550100001"));
    }
    let (tx, _, new) = drain(&mut c);
    assert_eq!(new, 0);
    assert_eq!(tx.len(), 50);
    assert!(
        tx.iter().all(|(to, m)| *to == gw
            && m.starts_with("SIP/2.0 503")
            && m.contains("Retry-After: ")),
        "{tx:?}"
    );
    assert_eq!(
        c.transactions().1,
        1,
        "only the admitted call's transaction"
    );
    // A refused INVITE's retransmission gets the same 503, still without state; the
    // admitted one's is answered by its transaction.
    let later = t0 + Duration::from_millis(500);
    c.handle_datagram(later, gw, invite("o7", "+15550100001"));
    c.handle_datagram(later, gw, invite("o0", "+15550100001"));
    let (tx, _, new) = drain(&mut c);
    assert_eq!(
        (first_lines(&tx), new),
        (
            vec!["SIP/2.0 503 Service Unavailable", "SIP/2.0 100 Trying"],
            0
        )
    );
    assert_eq!(c.transactions().1, 1);
}

#[test]
fn answer_is_retransmitted_with_backoff_until_ack() {
    {
        let (mut c, t0, gw) = (core(), Instant::now(), GW.parse().unwrap());
        c.handle_datagram(t0, gw, invite("a2", "15550100001"));
        drain(&mut c);
        c.handle_command(t0, 1, SipLegCmd::CallerRinging);
        c.handle_command(
            t0,
            1,
            SipLegCmd::CallerAnswer {
                sdp: "v=0\r\n".into(),
            },
        );
        let (tx, _, _) = drain(&mut c);
        assert_eq!(
            first_lines(&tx),
            vec!["SIP/2.0 180 Ringing", "SIP/2.0 200 OK"]
        );
        let tag = to_tag_of(&tx[1].1);
        assert_eq!(tag, to_tag_of(&tx[0].1), "one To tag for the dialog");
        assert!(tx[1].1.contains("Content-Type: application/sdp"));
        // T1 = 500 ms, doubling: retransmits at +0.5 s, +1.5 s, +3.5 s ...
        let mut retx = Vec::new();
        for ms in (100..=4000).step_by(100) {
            c.handle_timeout(t0 + Duration::from_millis(ms));
            let (tx, _, _) = drain(&mut c);
            if tx.iter().any(|(_, m)| m.starts_with("SIP/2.0 200")) {
                retx.push(ms);
            }
        }
        assert_eq!(retx, vec![500, 1500, 3500]);
        c.handle_datagram(
            t0 + Duration::from_millis(4000),
            gw,
            in_dialog("ACK", "a2", "z9hG4bK-ack", Some(&tag), 1),
        );
        for s in 5..40 {
            c.handle_timeout(t0 + Duration::from_secs(s));
            let (tx, ev, _) = drain(&mut c);
            assert!(
                tx.is_empty() && ev.is_empty(),
                "nothing after the ACK: {tx:?} {ev:?}"
            );
        }
    }
}

#[test]
fn missing_ack_times_out_after_64_t1() {
    {
        let (mut c, t0, gw) = (core(), Instant::now(), GW.parse().unwrap());
        c.handle_datagram(t0, gw, invite("a3", "+15550100001"));
        c.handle_command(
            t0,
            1,
            SipLegCmd::CallerAnswer {
                sdp: "v=0\r\n".into(),
            },
        );
        drain(&mut c);
        c.handle_timeout(t0 + Duration::from_millis(31_900));
        assert!(drain(&mut c).1.is_empty());
        c.handle_timeout(t0 + Duration::from_secs(33));
        assert!(matches!(
            drain(&mut c).1.as_slice(),
            [SipEvent::CallerAckTimeout]
        ));
    }
}

#[test]
fn cancel_gets_200_then_487_which_is_retransmitted_until_ack() {
    {
        let (mut c, t0, gw) = (core(), Instant::now(), GW.parse().unwrap());
        c.handle_datagram(t0, gw, invite("a4", "+15550100001"));
        drain(&mut c);
        c.handle_datagram(t0, gw, in_dialog("CANCEL", "a4", "z9hG4bK-a4", None, 1));
        let (tx, ev, _) = drain(&mut c);
        assert_eq!(first_lines(&tx), vec!["SIP/2.0 200 OK"]);
        assert!(tx[0].1.contains("CSeq: 1 CANCEL"));
        assert!(matches!(ev.as_slice(), [SipEvent::CallerCancel]));
        c.handle_command(t0, 1, SipLegCmd::CallerReject(487));
        let (tx, _, _) = drain(&mut c);
        assert_eq!(first_lines(&tx), vec!["SIP/2.0 487 Request Terminated"]);
        c.handle_timeout(t0 + Duration::from_millis(600));
        assert_eq!(
            first_lines(&drain(&mut c).0),
            vec!["SIP/2.0 487 Request Terminated"],
            "Timer G"
        );
        let tag = to_tag_of(&tx[0].1);
        c.handle_datagram(
            t0 + Duration::from_millis(700),
            gw,
            in_dialog("ACK", "a4", "z9hG4bK-a4", Some(&tag), 1),
        );
        c.handle_timeout(t0 + Duration::from_secs(5));
        assert!(drain(&mut c).0.is_empty(), "ACK stopped Timer G");
    }
}

#[test]
fn bye_from_gateway_is_answered_and_reported() {
    {
        let (mut c, t0, gw) = (core(), Instant::now(), GW.parse().unwrap());
        c.handle_datagram(t0, gw, invite("a5", "+15550100001"));
        c.handle_command(
            t0,
            1,
            SipLegCmd::CallerAnswer {
                sdp: "v=0\r\n".into(),
            },
        );
        let (tx, _, _) = drain(&mut c);
        let tag = to_tag_of(&tx[1].1);
        c.handle_datagram(
            t0,
            gw,
            in_dialog("ACK", "a5", "z9hG4bK-ack5", Some(&tag), 1),
        );
        c.handle_datagram(
            t0,
            gw,
            in_dialog("BYE", "a5", "z9hG4bK-bye5", Some(&tag), 2),
        );
        let (tx, ev, _) = drain(&mut c);
        assert_eq!(first_lines(&tx), vec!["SIP/2.0 200 OK"]);
        assert!(matches!(ev.as_slice(), [SipEvent::CallerBye]));
        // A BYE for a dialog we never had.
        c.handle_datagram(
            t0,
            gw,
            in_dialog("BYE", "nope", "z9hG4bK-bye6", Some("x"), 2),
        );
        assert_eq!(
            first_lines(&drain(&mut c).0),
            vec!["SIP/2.0 481 Call/Transaction Does Not Exist"]
        );
    }
}

#[test]
fn we_send_bye_to_the_gateway_with_swapped_tags() {
    {
        let (mut c, t0, gw) = (core(), Instant::now(), GW.parse().unwrap());
        c.handle_datagram(t0, gw, invite("a6", "+15550100001"));
        c.handle_command(
            t0,
            1,
            SipLegCmd::CallerAnswer {
                sdp: "v=0\r\n".into(),
            },
        );
        let (tx, _, _) = drain(&mut c);
        let tag = to_tag_of(&tx[1].1);
        c.handle_datagram(
            t0,
            gw,
            in_dialog("ACK", "a6", "z9hG4bK-ack6", Some(&tag), 1),
        );
        c.handle_command(t0, 1, SipLegCmd::CallerBye);
        let (tx, _, _) = drain(&mut c);
        assert_eq!(tx.len(), 1);
        let bye = &tx[0].1;
        assert!(
            bye.starts_with("BYE sip:gw@127.0.0.1:5070 SIP/2.0"),
            "{bye}"
        );
        assert!(
            bye.contains(&format!("From: <sip:+15550100001@127.0.0.1>;tag={tag}")),
            "{bye}"
        );
        assert!(
            bye.contains("To: \"Gw\" <sip:+15557770001@127.0.0.1>;tag=gw1"),
            "{bye}"
        );
        assert!(bye.contains("CSeq: 2 BYE"), "{bye}");
        // Timer E retransmits the BYE over UDP.
        c.handle_timeout(t0 + Duration::from_millis(500));
        assert_eq!(
            first_lines(&drain(&mut c).0),
            vec!["BYE sip:gw@127.0.0.1:5070 SIP/2.0"]
        );
    }
}

#[test]
fn trunk_leg_invite_retransmits_rings_answers_and_acks() {
    {
        let (mut c, t0, gw) = (core(), Instant::now(), GW.parse().unwrap());
        let trunk: SocketAddr = TRUNK.parse().unwrap();
        c.handle_datagram(t0, gw, invite("a7", "+15550100001"));
        drain(&mut c);
        c.handle_command(
            t0,
            1,
            SipLegCmd::TrunkInvite {
                trunk: 0,
                to: "+15550100001".into(),
                from: "+15557770001".into(),
                from_name: Some("Gw".into()),
                sdp: "v=0\r\n".into(),
            },
        );
        let (tx, _, _) = drain(&mut c);
        assert_eq!(tx[0].0, trunk);
        let inv = tx[0].1.clone();
        assert!(
            inv.starts_with("INVITE sip:+15550100001@127.0.0.1:5080 SIP/2.0"),
            "{inv}"
        );
        c.handle_timeout(t0 + Duration::from_millis(500));
        assert_eq!(
            first_lines(&drain(&mut c).0),
            vec!["INVITE sip:+15550100001@127.0.0.1:5080 SIP/2.0"],
            "Timer A"
        );
        let header = |name: &str| {
            inv.lines()
                .find(|l| l.starts_with(name))
                .unwrap()
                .to_owned()
        };
        let resp = |code: &str, body: &str| {
            Bytes::from(format!(
                "SIP/2.0 {code}\r\n{}\r\n{}\r\n{};tag=uas1\r\n{}\r\nCSeq: 1 INVITE\r\nContact: <sip:uas@{TRUNK}>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{body}",
                header("Via:"),
                header("From:"),
                header("To:"),
                header("Call-ID:"),
                body.len()
            ))
        };
        c.handle_datagram(
            t0 + Duration::from_millis(600),
            trunk,
            resp("180 Ringing", ""),
        );
        assert!(matches!(
            drain(&mut c).1.as_slice(),
            [SipEvent::TrunkRinging]
        ));
        let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 7000 RTP/AVP 0\r\n";
        c.handle_datagram(t0 + Duration::from_millis(700), trunk, resp("200 OK", sdp));
        let (tx, ev, _) = drain(&mut c);
        assert_eq!(first_lines(&tx), vec!["ACK sip:uas@127.0.0.1:5080 SIP/2.0"]);
        assert!(matches!(ev.as_slice(), [SipEvent::TrunkAnswered(m)] if m.port == 7000));
        // The 200 retransmitted (our ACK lost): ACK again, no second answer event.
        c.handle_datagram(t0 + Duration::from_millis(1200), trunk, resp("200 OK", sdp));
        let (tx, ev, _) = drain(&mut c);
        assert_eq!(first_lines(&tx), vec!["ACK sip:uas@127.0.0.1:5080 SIP/2.0"]);
        assert!(ev.is_empty());
    }
}

#[test]
fn bad_requests_get_400_404_488_and_options_200() {
    {
        let (mut c, t0, gw) = (core(), Instant::now(), GW.parse().unwrap());
        let bad = String::from_utf8(in_dialog("INVITE", "b1", "z9hG4bK-b1", None, 1).to_vec())
            .unwrap()
            .replace("CSeq: 1 INVITE", "CSeq: x INVITE");
        c.handle_datagram(t0, gw, Bytes::from(bad));
        assert_eq!(
            first_lines(&drain(&mut c).0),
            vec!["SIP/2.0 400 Bad Request"]
        );
        c.handle_datagram(t0, gw, invite("b2", "+15559999999"));
        assert_eq!(
            first_lines(&drain(&mut c).0),
            vec!["SIP/2.0 100 Trying", "SIP/2.0 404 Not Found"]
        );
        c.handle_datagram(t0, gw, in_dialog("INVITE", "b3", "z9hG4bK-b3", None, 1));
        assert_eq!(
            first_lines(&drain(&mut c).0),
            vec!["SIP/2.0 100 Trying", "SIP/2.0 488 Not Acceptable Here"]
        );
        c.handle_datagram(t0, gw, in_dialog("OPTIONS", "b4", "z9hG4bK-b4", None, 1));
        assert_eq!(first_lines(&drain(&mut c).0), vec!["SIP/2.0 200 OK"]);
        c.handle_datagram(t0, gw, Bytes::from_static(b"\x00\x01garbage"));
        c.handle_datagram(t0, gw, Bytes::from_static(b"\r\n\r\n"));
        assert!(
            drain(&mut c).0.is_empty(),
            "garbage and keep-alives get no answer"
        );
        c.set_draining(true);
        c.handle_datagram(t0, gw, invite("b5", "+15550100001"));
        let (tx, _, new) = drain(&mut c);
        assert_eq!(first_lines(&tx), vec!["SIP/2.0 503 Service Unavailable"]);
        assert!(tx[0].1.contains("Retry-After: 30"));
        assert_eq!(new, 0);
        // A gateway's health check hears that the node is going away.
        c.handle_datagram(t0, gw, in_dialog("OPTIONS", "b6", "z9hG4bK-b6", None, 1));
        let (tx, _, _) = drain(&mut c);
        assert_eq!(first_lines(&tx), vec!["SIP/2.0 503 Service Unavailable"]);
        assert!(tx[0].1.contains("Retry-After: 30"), "{}", tx[0].1);
    }
}

#[test]
fn options_probes_report_answers_and_timeouts() {
    {
        let (mut c, t0) = (core(), Instant::now());
        let trunk: SocketAddr = TRUNK.parse().unwrap();
        let id = c.handle_probe(t0, trunk);
        let (tx, _, _, probes) = drain_all(&mut c);
        assert!(probes.is_empty());
        assert_eq!(tx[0].0, trunk);
        let opt = tx[0].1.clone();
        assert!(
            opt.starts_with("OPTIONS sip:127.0.0.1:5080 SIP/2.0"),
            "{opt}"
        );
        let header = |name: &str| {
            opt.lines()
                .find(|l| l.starts_with(name))
                .unwrap()
                .to_owned()
        };
        let ok = format!(
            "SIP/2.0 200 OK\r\n{}\r\n{}\r\n{};tag=t\r\n{}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
            header("Via:"),
            header("From:"),
            header("To:"),
            header("Call-ID:")
        );
        c.handle_datagram(t0, trunk, Bytes::from(ok));
        assert_eq!(drain_all(&mut c).3, vec![(id, Some(200))]);

        // Nobody answers: Timer E retransmits, Timer F (64*T1) gives up.
        let id2 = c.handle_probe(t0, trunk);
        drain_all(&mut c);
        c.handle_timeout(t0 + Duration::from_millis(500));
        let (tx, _, _, probes) = drain_all(&mut c);
        assert_eq!(first_lines(&tx), vec!["OPTIONS sip:127.0.0.1:5080 SIP/2.0"]);
        assert!(probes.is_empty());
        c.handle_timeout(t0 + Duration::from_secs(33));
        assert_eq!(drain_all(&mut c).3, vec![(id2, None)]);
    }
}

pub(super) fn reinvite(call_id: &str, to_tag: &str, cseq: u32, sdp: &str) -> Bytes {
    Bytes::from(format!(
        "INVITE sip:parley@127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP {GW};branch=z9hG4bK-re{cseq}\r\nFrom: \"Gw\" <sip:+15557770001@127.0.0.1>;tag=gw1\r\nTo: <sip:+15550100001@127.0.0.1>;tag={to_tag}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} INVITE\r\nContact: <sip:gw@{GW}>\r\nMax-Forwards: 70\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    ))
}

pub(super) fn body_of(msg: &str) -> &str {
    msg.split("\r\n\r\n").nth(1).unwrap_or("")
}

/// A gateway call `call_id` answered with our description `ours` and acknowledged (call
/// handle 1, at `t0`); returns our To tag.
pub(super) fn answered_call(c: &mut SipCore, t0: Instant, call_id: &str, ours: &str) -> String {
    let gw = GW.parse().unwrap();
    c.handle_datagram(t0, gw, invite(call_id, "+15550100001"));
    drain(c);
    c.handle_command(t0, 1, SipLegCmd::CallerAnswer { sdp: ours.into() });
    let (tx, _, _) = drain(c);
    let tag = to_tag_of(&tx[0].1);
    c.handle_datagram(
        t0,
        gw,
        in_dialog("ACK", call_id, "z9hG4bK-ack1", Some(&tag), 1),
    );
    drain(c);
    tag
}

#[test]
fn reinvite_moves_media_holds_and_refuses_other_codecs() {
    {
        let (mut c, t0, gw) = (core(), Instant::now(), GW.parse().unwrap());
        let ours = parley_codecs::sdp::write([127, 0, 0, 1].into(), 4000, &[0], None, 9);
        let tag = answered_call(&mut c, t0, "r1", &ours);

        // Same address, session refresh: 200 with our unchanged description, no event.
        let same = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\n";
        c.handle_datagram(t0, gw, reinvite("r1", &tag, 2, same));
        let (tx, ev, _) = drain(&mut c);
        assert_eq!(first_lines(&tx), vec!["SIP/2.0 200 OK"]);
        assert_eq!(body_of(&tx[0].1), ours);
        assert_eq!(to_tag_of(&tx[0].1), tag, "same dialog");
        assert!(ev.is_empty(), "{ev:?}");
        c.handle_datagram(t0, gw, in_dialog("ACK", "r1", "z9hG4bK-a2", Some(&tag), 2));

        // The gateway moves its media: the call is told; the answer is unchanged.
        let moved = same.replace("m=audio 6000", "m=audio 6100");
        c.handle_datagram(t0, gw, reinvite("r1", &tag, 3, &moved));
        let (tx, ev, _) = drain(&mut c);
        assert_eq!(first_lines(&tx), vec!["SIP/2.0 200 OK"]);
        assert_eq!(body_of(&tx[0].1), ours);
        assert!(
            matches!(ev.as_slice(), [SipEvent::CallerMediaMoved(a)] if *a == "127.0.0.1:6100".parse().unwrap()),
            "{ev:?}"
        );
        // Its 200 is retransmitted until its own ACK, like the first: a late duplicate
        // ACK of the previous one does not stop it.
        c.handle_datagram(t0, gw, in_dialog("ACK", "r1", "z9hG4bK-a2", Some(&tag), 2));
        c.handle_timeout(t0 + Duration::from_millis(500));
        let (tx, _, _) = drain(&mut c);
        assert_eq!(first_lines(&tx), vec!["SIP/2.0 200 OK"]);
        c.handle_datagram(t0, gw, in_dialog("ACK", "r1", "z9hG4bK-a3", Some(&tag), 3));
        drain(&mut c);

        // Hold (sendonly): recvonly answer, o= version bumped; no move.
        c.handle_datagram(
            t0,
            gw,
            reinvite("r1", &tag, 4, &(moved.clone() + "a=sendonly\r\n")),
        );
        let (tx, ev, _) = drain(&mut c);
        let held = body_of(&tx[0].1);
        assert!(
            held.contains("a=recvonly") && held.contains("o=parley 9 10 "),
            "{held}"
        );
        assert!(ev.is_empty());
        c.handle_datagram(t0, gw, in_dialog("ACK", "r1", "z9hG4bK-a4", Some(&tag), 4));

        // A codec the call did not negotiate: 488, nothing changes.
        let pcma = moved
            .replace("RTP/AVP 0", "RTP/AVP 8")
            .replace("6100", "6200");
        c.handle_datagram(t0, gw, reinvite("r1", &tag, 5, &pcma));
        let (tx, ev, _) = drain(&mut c);
        assert_eq!(first_lines(&tx), vec!["SIP/2.0 488 Not Acceptable Here"]);
        assert!(ev.is_empty());

        // An unknown dialog: 481.
        c.handle_datagram(t0, gw, reinvite("nope", "x", 1, same));
        assert_eq!(
            first_lines(&drain(&mut c).0),
            vec!["SIP/2.0 481 Call/Transaction Does Not Exist"]
        );
    }
}

#[test]
fn trunk_reinvite_moving_its_media_is_answered_and_reported() {
    {
        let (mut c, t0, gw) = (core(), Instant::now(), GW.parse().unwrap());
        let trunk: SocketAddr = TRUNK.parse().unwrap();
        c.handle_datagram(t0, gw, invite("t1", "+15550100001"));
        drain(&mut c);
        let ours = parley_codecs::sdp::write([127, 0, 0, 1].into(), 4002, &[0, 8], None, 5);
        c.handle_command(
            t0,
            1,
            SipLegCmd::TrunkInvite {
                trunk: 0,
                to: "+15550100001".into(),
                from: "+15557770001".into(),
                from_name: None,
                sdp: ours.clone(),
            },
        );
        let (tx, _, _) = drain(&mut c);
        let inv = tx[0].1.clone();
        let header = |name: &str| {
            inv.lines()
                .find(|l| l.starts_with(name))
                .unwrap()
                .to_owned()
        };
        let answer = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 7000 RTP/AVP 8\r\n";
        let ok = format!(
            "SIP/2.0 200 OK\r\n{}\r\n{}\r\n{};tag=uas1\r\n{}\r\nCSeq: 1 INVITE\r\nContact: <sip:uas@{TRUNK}>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{answer}",
            header("Via:"),
            header("From:"),
            header("To:"),
            header("Call-ID:"),
            answer.len()
        );
        c.handle_datagram(t0, trunk, Bytes::from(ok));
        drain(&mut c);
        // The trunk (now the UAC of this request) re-INVITEs with its media elsewhere,
        // keeping PCMA (the second codec of our offer).
        let from_tag = header("From:").split("tag=").nth(1).unwrap().to_owned();
        let call_id = header("Call-ID:")
            .trim_start_matches("Call-ID:")
            .trim()
            .to_owned();
        let moved = answer.replace("7000", "7100");
        let reinvite = format!(
            "INVITE sip:parley@127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP {TRUNK};branch=z9hG4bK-tr2\r\nFrom: <sip:+15550100001@{TRUNK}>;tag=uas1\r\nTo: <sip:+15557770001@127.0.0.1>;tag={from_tag}\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:uas@{TRUNK}>\r\nMax-Forwards: 70\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{moved}",
            moved.len()
        );
        c.handle_datagram(t0, trunk, Bytes::from(reinvite));
        let (tx, ev, _) = drain(&mut c);
        assert_eq!(first_lines(&tx), vec!["SIP/2.0 200 OK"], "{tx:?}");
        assert_eq!(tx[0].0, trunk);
        assert_eq!(body_of(&tx[0].1), ours);
        assert!(
            matches!(ev.as_slice(), [SipEvent::TrunkMediaMoved(a)] if *a == "127.0.0.1:7100".parse().unwrap()),
            "{ev:?}"
        );
    }
}

#[test]
fn reinvite_moving_the_video_stream_is_reported_apart() {
    use parley_codecs::sdp::{Format, VideoAnswer, append_video, write};
    {
        let (mut c, t0, gw) = (core(), Instant::now(), GW.parse().unwrap());
        // We answered audio and video (relay ports 4000 and 4010).
        let mut ours = write([127, 0, 0, 1].into(), 4000, &[0], None, 3);
        let vp8 = Format {
            pt: 96,
            name: "VP8".into(),
            clock: 90_000,
        };
        append_video(
            &mut ours,
            &VideoAnswer {
                port: 4010,
                formats: vec![vp8],
            },
        );
        let tag = answered_call(&mut c, t0, "v1", &ours);
        // Same audio address (the INVITE's 6000), video somewhere new.
        let re = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\nm=video 6102 RTP/AVP 96\r\na=rtpmap:96 VP8/90000\r\n";
        c.handle_datagram(t0, gw, reinvite("v1", &tag, 2, re));
        let (tx, ev, _) = drain(&mut c);
        assert_eq!(first_lines(&tx), vec!["SIP/2.0 200 OK"]);
        assert_eq!(body_of(&tx[0].1), ours);
        assert!(
            matches!(ev.as_slice(), [SipEvent::CallerVideoMoved(a)] if *a == "127.0.0.1:6102".parse().unwrap()),
            "{ev:?}"
        );
    }
}
