//! The UAC on a virtual clock: every datagram in and out is checked, no socket.

use super::*;

const LOCAL: &str = "127.0.0.1:5070";
const TARGET: &str = "127.0.0.1:5060";
const SDP_ANSWER: &str = "v=0\r\no=uas 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n\
                          t=0 0\r\nm=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";

/// A UAC whose outputs are sorted into datagrams and events as they are drained, so a
/// test can read either without losing the other.
struct TestUac {
    u: Uac,
    tx: std::collections::VecDeque<Transmit>,
    ev: std::collections::VecDeque<Event>,
}

impl TestUac {
    fn pull(&mut self) {
        while let Some(o) = self.u.poll_output() {
            match o {
                Output::Transmit(t) => self.tx.push_back(t),
                Output::Event(e) => self.ev.push_back(e),
            }
        }
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        self.pull();
        self.tx.pop_front()
    }

    fn poll_event(&mut self) -> Option<Event> {
        self.pull();
        self.ev.pop_front()
    }
}

impl std::ops::Deref for TestUac {
    type Target = Uac;
    fn deref(&self) -> &Uac {
        &self.u
    }
}

impl std::ops::DerefMut for TestUac {
    fn deref_mut(&mut self) -> &mut Uac {
        &mut self.u
    }
}

fn uac(answer_timeout: Duration) -> TestUac {
    let mut cfg = UacConfig::new(
        LOCAL.parse().unwrap(),
        TARGET.parse().unwrap(),
        "+15557770001",
    );
    cfg.answer_timeout = answer_timeout;
    cfg.parse_sdp = true;
    TestUac {
        u: Uac::new(cfg, "testrun"),
        tx: Default::default(),
        ev: Default::default(),
    }
}

fn target() -> SocketAddr {
    TARGET.parse().unwrap()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn sent(u: &mut TestUac) -> Vec<String> {
    std::iter::from_fn(|| u.poll_transmit())
        .map(|t| String::from_utf8(t.data.to_vec()).unwrap())
        .collect()
}

fn events(u: &mut TestUac) -> Vec<Event> {
    std::iter::from_fn(|| u.poll_event()).collect()
}

fn parse(msg: &str) -> Message {
    sipx_sip::parse_datagram(Bytes::from(msg.to_owned()), &sipx_sip::Limits::datagram())
        .unwrap_or_else(|e| panic!("{e}: {msg}"))
}

fn header(msg: &str, name: HeaderName) -> String {
    let m = parse(msg);
    String::from_utf8(m.headers().value(&name).unwrap().to_vec()).unwrap()
}

fn start_line(msg: &str) -> &str {
    msg.lines().next().unwrap()
}

/// A response to `req` as a UAS writes it.
fn reply(req: &str, code: u16, tag: Option<&str>, extra: &str, body: &str) -> Bytes {
    let to = header(req, HeaderName::To);
    let to = match tag {
        Some(t) => format!("{to};tag={t}"),
        None => to,
    };
    Bytes::from(format!(
        "SIP/2.0 {code} Whatever\r\nVia: {}\r\nFrom: {}\r\nTo: {to}\r\nCall-ID: {}\r\n\
         CSeq: {}\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        header(req, HeaderName::Via),
        header(req, HeaderName::From),
        header(req, HeaderName::CallId),
        header(req, HeaderName::CSeq),
        body.len()
    ))
}

fn feed(u: &mut Uac, at: Instant, data: Bytes) {
    u.handle_datagram(at, target(), data);
}

/// Starts a call and has it answered at `t0 + 50ms`; returns the INVITE and ACK.
fn answered(u: &mut TestUac, t0: Instant, hold: Duration) -> (String, String) {
    u.start_call(t0, "+15550100001", hold, 4000);
    let invite = sent(u).remove(0);
    let ok = reply(
        &invite,
        200,
        Some("uas1"),
        "Contact: <sip:uas@127.0.0.1:5999>\r\nContent-Type: application/sdp\r\n",
        SDP_ANSWER,
    );
    feed(u, t0 + ms(50), ok);
    let mut out = sent(u);
    assert_eq!(out.len(), 1, "{out:?}");
    (invite, out.remove(0))
}

#[test]
fn invite_is_well_formed_and_offers_pcmu() {
    let mut u = uac(T1 * 64);
    let t0 = Instant::now();
    let no = u.start_call(t0, "+15550100001", ms(0), 4000);
    assert_eq!(no, 0);
    let invite = sent(&mut u).remove(0);
    assert_eq!(
        start_line(&invite),
        "INVITE sip:+15550100001@127.0.0.1:5060 SIP/2.0"
    );
    let Message::Request(req) = parse(&invite) else {
        panic!("not a request")
    };
    assert_eq!(req.method, Method::Invite);
    let cseq = req.headers.typed::<CSeq>().unwrap().unwrap();
    assert_eq!((cseq.sequence, cseq.method), (1, Method::Invite));
    assert!(
        header(&invite, HeaderName::From)
            .starts_with("\"parley-load\" <sip:+15557770001@127.0.0.1>;tag=")
    );
    assert_eq!(header(&invite, HeaderName::CallId), "0-testrun@parley-load");
    let md = parley_codecs::sdp::parse_audio(std::str::from_utf8(req.body()).unwrap()).unwrap();
    assert_eq!((md.port, md.first_g711()), (4000, Some(0)));
    assert_eq!(md.addr, "127.0.0.1".parse::<IpAddr>().unwrap());
    // Content-Length is exact.
    let body_at = invite.find("\r\n\r\n").unwrap() + 4;
    assert_eq!(
        header(&invite, HeaderName::ContentLength),
        (invite.len() - body_at).to_string()
    );
}

#[test]
fn invite_retransmits_on_timer_a_until_a_provisional() {
    let mut u = uac(T1 * 64);
    let t0 = Instant::now();
    u.start_call(t0, "+15550100001", ms(0), 4000);
    let invite = sent(&mut u).remove(0);
    let mut at = Vec::new();
    for step in 1..=80 {
        let now = t0 + ms(100 * step);
        u.handle_timeout(now);
        for m in sent(&mut u) {
            assert_eq!(m, invite, "a retransmission is the same INVITE");
            at.push(now);
        }
    }
    // T1 doubling: 0.5 s, 1.5 s, 3.5 s, 7.5 s after the INVITE.
    assert_eq!(
        at,
        vec![t0 + ms(500), t0 + ms(1500), t0 + ms(3500), t0 + ms(7500)]
    );
    let mut u = uac(T1 * 64);
    u.start_call(t0, "+15550100001", ms(0), 4000);
    let invite = sent(&mut u).remove(0);
    feed(&mut u, t0 + ms(100), reply(&invite, 100, None, "", ""));
    for step in 1..=200 {
        u.handle_timeout(t0 + ms(100 * step));
    }
    assert!(sent(&mut u).is_empty(), "no retransmission after a 100");
    assert_eq!(u.counters().retransmissions, 0);
    assert!(events(&mut u).is_empty(), "100 Trying is not ringing");
}

#[test]
fn answered_call_acks_holds_then_byes_until_200() {
    let mut u = uac(T1 * 64);
    let t0 = Instant::now();
    u.start_call(t0, "+15550100001", ms(1000), 4000);
    let invite = sent(&mut u).remove(0);
    feed(
        &mut u,
        t0 + ms(20),
        reply(&invite, 180, Some("uas1"), "", ""),
    );
    feed(
        &mut u,
        t0 + ms(30),
        reply(&invite, 183, Some("uas1"), "", ""),
    );
    assert_eq!(
        events(&mut u),
        vec![Event::Ringing {
            call: 0,
            pdd: ms(20)
        }]
    );
    let ok = reply(
        &invite,
        200,
        Some("uas1"),
        "Contact: <sip:uas@127.0.0.1:5999>\r\nRecord-Route: <sip:p1;lr>, <sip:p2;lr>\r\n\
         Content-Type: application/sdp\r\n",
        SDP_ANSWER,
    );
    feed(&mut u, t0 + ms(50), ok.clone());
    let ack = sent(&mut u).remove(0);
    assert_eq!(start_line(&ack), "ACK sip:uas@127.0.0.1:5999 SIP/2.0");
    assert_eq!(header(&ack, HeaderName::CSeq), "1 ACK");
    assert!(header(&ack, HeaderName::To).ends_with(";tag=uas1"));
    assert_ne!(
        header(&ack, HeaderName::Via),
        header(&invite, HeaderName::Via),
        "the ACK of a 2xx is a new transaction"
    );
    let routes: Vec<&str> = ack
        .lines()
        .filter_map(|l| l.strip_prefix("Route: "))
        .collect();
    assert_eq!(routes, vec!["<sip:p2;lr>", "<sip:p1;lr>"]);
    assert_eq!(
        events(&mut u),
        vec![Event::Answered {
            call: 0,
            setup: ms(50),
            media: Some("127.0.0.1:40000".parse().unwrap()),
        }]
    );
    // A retransmitted 2xx gets the same ACK again.
    feed(&mut u, t0 + ms(60), ok);
    assert_eq!(sent(&mut u), vec![ack.clone()]);
    assert_eq!(u.counters().duplicate_2xx, 1);

    u.handle_timeout(t0 + ms(1049));
    assert!(sent(&mut u).is_empty(), "hold not over");
    u.handle_timeout(t0 + ms(1050));
    let bye = sent(&mut u).remove(0);
    assert_eq!(start_line(&bye), "BYE sip:uas@127.0.0.1:5999 SIP/2.0");
    assert_eq!(header(&bye, HeaderName::CSeq), "2 BYE");
    assert_eq!(header(&bye, HeaderName::To), header(&ack, HeaderName::To));
    assert_eq!(
        header(&bye, HeaderName::From),
        header(&invite, HeaderName::From)
    );
    // Timer E: 0.5 s, then 1 s.
    u.handle_timeout(t0 + ms(1550));
    u.handle_timeout(t0 + ms(2550));
    assert_eq!(sent(&mut u), vec![bye.clone(), bye.clone()]);
    assert_eq!(u.active(), 1);
    feed(&mut u, t0 + ms(2600), reply(&bye, 200, None, "", ""));
    assert_eq!(
        events(&mut u),
        vec![Event::Ended {
            call: 0,
            outcome: Outcome::Completed
        }]
    );
    assert_eq!(u.active(), 0);
    assert_eq!(u.counters().retransmissions, 2);
    // Late timers of the ended call do nothing.
    u.handle_timeout(t0 + ms(60_000));
    assert!(sent(&mut u).is_empty());
    assert_eq!(u.poll_timeout(), None);
}

#[test]
fn rejected_call_is_acked_on_the_invite_branch() {
    let mut u = uac(T1 * 64);
    let t0 = Instant::now();
    u.start_call(t0, "+15559999999", ms(0), 4000);
    let invite = sent(&mut u).remove(0);
    feed(&mut u, t0 + ms(5), reply(&invite, 100, None, "", ""));
    let not_found = reply(&invite, 404, Some("x9"), "", "");
    feed(&mut u, t0 + ms(10), not_found.clone());
    let ack = sent(&mut u).remove(0);
    assert_eq!(
        start_line(&ack),
        "ACK sip:+15559999999@127.0.0.1:5060 SIP/2.0"
    );
    assert_eq!(
        header(&ack, HeaderName::Via),
        header(&invite, HeaderName::Via)
    );
    assert_eq!(header(&ack, HeaderName::CSeq), "1 ACK");
    assert!(header(&ack, HeaderName::To).ends_with(";tag=x9"));
    assert_eq!(
        events(&mut u),
        vec![Event::Ended {
            call: 0,
            outcome: Outcome::Rejected(404)
        }]
    );
    // The 404 again (our ACK was lost): ACKed again from the response alone.
    feed(&mut u, t0 + ms(500), not_found);
    let again = sent(&mut u).remove(0);
    assert_eq!(start_line(&again), start_line(&ack));
    assert_eq!(
        header(&again, HeaderName::Via),
        header(&ack, HeaderName::Via)
    );
    assert_eq!(header(&again, HeaderName::To), header(&ack, HeaderName::To));
    assert_eq!(header(&again, HeaderName::CSeq), "1 ACK");
    assert_eq!(u.counters().stray_messages, 1);
}

#[test]
fn answer_timeout_cancels_after_a_provisional() {
    let mut u = uac(Duration::from_secs(5));
    let t0 = Instant::now();
    u.start_call(t0, "+15550100001", ms(0), 4000);
    let invite = sent(&mut u).remove(0);
    feed(&mut u, t0 + ms(10), reply(&invite, 180, Some("r"), "", ""));
    events(&mut u);
    u.handle_timeout(t0 + ms(4999));
    assert!(sent(&mut u).is_empty());
    u.handle_timeout(t0 + ms(5000));
    let cancel = sent(&mut u).remove(0);
    assert_eq!(
        start_line(&cancel),
        "CANCEL sip:+15550100001@127.0.0.1:5060 SIP/2.0"
    );
    assert_eq!(
        header(&cancel, HeaderName::Via),
        header(&invite, HeaderName::Via)
    );
    assert_eq!(header(&cancel, HeaderName::CSeq), "1 CANCEL");
    assert_eq!(
        header(&cancel, HeaderName::To),
        header(&invite, HeaderName::To)
    );
    feed(
        &mut u,
        t0 + ms(5010),
        reply(&cancel, 200, Some("r"), "", ""),
    );
    u.handle_timeout(t0 + ms(6000));
    assert!(
        sent(&mut u).is_empty(),
        "CANCEL answered: no retransmission"
    );
    feed(
        &mut u,
        t0 + ms(5020),
        reply(&invite, 487, Some("r"), "", ""),
    );
    let ack = sent(&mut u).remove(0);
    assert_eq!(header(&ack, HeaderName::CSeq), "1 ACK");
    assert_eq!(
        events(&mut u),
        vec![Event::Ended {
            call: 0,
            outcome: Outcome::Timeout
        }]
    );
}

#[test]
fn silent_peer_times_out_at_timer_b() {
    let mut u = uac(T1 * 64);
    let t0 = Instant::now();
    u.start_call(t0, "+15550100001", ms(0), 4000);
    sent(&mut u);
    let mut now = t0;
    while u.active() > 0 && now < t0 + Duration::from_secs(60) {
        now = u.poll_timeout().unwrap();
        u.handle_timeout(now);
    }
    assert_eq!(now, t0 + ms(32_000));
    // 0.5, 1.5, 3.5, 7.5, 15.5 and 31.5 s.
    assert_eq!(sent(&mut u).len(), 6);
    assert_eq!(u.counters().retransmissions, 6);
    assert_eq!(
        events(&mut u),
        vec![Event::Ended {
            call: 0,
            outcome: Outcome::Timeout
        }]
    );
}

#[test]
fn late_2xx_after_the_timeout_is_acked_and_hung_up() {
    let mut u = uac(Duration::from_secs(2));
    let t0 = Instant::now();
    u.start_call(t0, "+15550100001", ms(10_000), 4000);
    let invite = sent(&mut u).remove(0);
    u.handle_timeout(t0 + ms(2000));
    sent(&mut u);
    assert_eq!(u.active(), 1, "waits out Timer B for a late answer");
    let ok = reply(&invite, 200, Some("late"), "", "");
    feed(&mut u, t0 + ms(2500), ok);
    let out = sent(&mut u);
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(out[0].starts_with("ACK sip:+15550100001@127.0.0.1:5060"));
    assert!(out[1].starts_with("BYE "));
    feed(&mut u, t0 + ms(2600), reply(&out[1], 200, None, "", ""));
    assert_eq!(
        events(&mut u),
        vec![Event::Ended {
            call: 0,
            outcome: Outcome::Timeout
        }]
    );
}

#[test]
fn unanswered_bye_ends_as_bye_timeout_with_timer_e_capped_at_t2() {
    let mut u = uac(T1 * 64);
    let t0 = Instant::now();
    answered(&mut u, t0, ms(0));
    events(&mut u);
    u.handle_timeout(t0 + ms(50));
    let bye = sent(&mut u).remove(0);
    let mut gaps = Vec::new();
    let mut last = t0 + ms(50);
    while u.active() > 0 {
        let now = u.poll_timeout().unwrap();
        u.handle_timeout(now);
        for m in sent(&mut u) {
            assert_eq!(m, bye);
            gaps.push(now - last);
            last = now;
        }
    }
    assert_eq!(
        &gaps[..5],
        &[ms(500), ms(1000), ms(2000), ms(4000), ms(4000)]
    );
    assert_eq!(last - (t0 + ms(50)), ms(31_500));
    assert_eq!(
        events(&mut u),
        vec![Event::Ended {
            call: 0,
            outcome: Outcome::ByeTimeout
        }]
    );
}

#[test]
fn bye_rejected_is_a_failure() {
    let mut u = uac(T1 * 64);
    let t0 = Instant::now();
    answered(&mut u, t0, ms(0));
    events(&mut u);
    u.handle_timeout(t0 + ms(50));
    let bye = sent(&mut u).remove(0);
    feed(&mut u, t0 + ms(60), reply(&bye, 481, None, "", ""));
    assert_eq!(
        events(&mut u),
        vec![Event::Ended {
            call: 0,
            outcome: Outcome::ByeRejected(481)
        }]
    );
    assert!(!Outcome::ByeRejected(481).is_success());
    assert_eq!(Outcome::ByeRejected(481).to_string(), "bye_481");
}

#[test]
fn remote_bye_is_answered_200_and_ends_the_call() {
    let mut u = uac(T1 * 64);
    let t0 = Instant::now();
    let (invite, ack) = answered(&mut u, t0, Duration::from_secs(60));
    events(&mut u);
    // The far end's BYE: From/To swapped, its own CSeq.
    let from = header(&invite, HeaderName::From);
    let to = header(&ack, HeaderName::To);
    let cid = header(&invite, HeaderName::CallId);
    let bye = format!(
        "BYE sip:parley-load@127.0.0.1:5070 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKfar1\r\n\
         Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKfar0\r\nFrom: {to}\r\nTo: {from}\r\n\
         Call-ID: {cid}\r\nCSeq: 7 BYE\r\nContent-Length: 0\r\n\r\n"
    );
    let far: SocketAddr = "127.0.0.1:6000".parse().unwrap();
    u.handle_datagram(t0 + ms(100), far, Bytes::from(bye));
    let t = u.poll_transmit().unwrap();
    assert_eq!(t.dest, far, "responses go back to the request's source");
    let ok = String::from_utf8(t.data.to_vec()).unwrap();
    assert_eq!(start_line(&ok), "SIP/2.0 200 OK");
    assert_eq!(header(&ok, HeaderName::CSeq), "7 BYE");
    assert_eq!(ok.matches("Via: ").count(), 2);
    assert_eq!(
        events(&mut u),
        vec![Event::Ended {
            call: 0,
            outcome: Outcome::RemoteBye
        }]
    );
    // The hold timer of the ended call does nothing.
    u.handle_timeout(t0 + Duration::from_secs(61));
    assert!(u.poll_transmit().is_none());
    // A BYE for no call: 481.
    let stray = "BYE sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKs\r\n\
                 From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: nope\r\nCSeq: 1 BYE\r\n\
                 Content-Length: 0\r\n\r\n";
    u.handle_datagram(t0, far, Bytes::from_static(stray.as_bytes()));
    let r = String::from_utf8(u.poll_transmit().unwrap().data.to_vec()).unwrap();
    assert!(r.starts_with("SIP/2.0 481 "), "{r}");
    // OPTIONS: 200; INFO: 501.
    for (method, code) in [("OPTIONS", "200"), ("INFO", "501")] {
        let req = stray.replace("BYE", method);
        u.handle_datagram(t0, far, Bytes::from(req));
        let r = String::from_utf8(u.poll_transmit().unwrap().data.to_vec()).unwrap();
        assert!(r.starts_with(&format!("SIP/2.0 {code} ")), "{r}");
    }
    assert_eq!(u.counters().unsupported_requests, 1);
}

#[test]
fn hang_up_all_cuts_holds_short() {
    let mut u = uac(T1 * 64);
    let t0 = Instant::now();
    answered(&mut u, t0, Duration::from_secs(3600));
    u.start_call(t0 + ms(60), "+15550100001", Duration::from_secs(3600), 4002);
    let second = sent(&mut u).remove(0);
    u.hang_up_all(t0 + ms(100));
    u.handle_timeout(t0 + ms(100));
    let out = sent(&mut u);
    assert_eq!(out.len(), 1);
    assert!(out[0].starts_with("BYE "));
    // The second call, answered after the stop, hangs up at once.
    feed(&mut u, t0 + ms(200), reply(&second, 200, Some("t"), "", ""));
    u.handle_timeout(t0 + ms(200));
    let out = sent(&mut u);
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(out[0].starts_with("ACK ") && out[1].starts_with("BYE "));
}

#[test]
fn bad_input_is_counted_never_fatal() {
    let mut u = uac(T1 * 64);
    let t0 = Instant::now();
    let (invite, _) = answered(&mut u, t0, Duration::from_secs(10));
    events(&mut u);
    let before = u.counters().bad_messages;
    for junk in [
        &b"\xff\xfe garbage"[..],
        b"SIP/2.0 200 OK\r\n\r\n",
        b"SIP/2.0 200 OK\r\nCall-ID: 0-testrun@parley-load\r\n\r\n",
        b"SIP/2.0 200 OK\r\nCSeq: 1 INVITE\r\n\r\n",
        b"INVITE sip:x SIP/2.0\r\nCSeq: 1 INVITE\r\nCall-ID: 0-testrun@parley-load\r\n\r\n",
        b"BYE sip:x SIP/2.0\r\nCall-ID: 0-testrun@parley-load\r\nCSeq: 2 BYE\r\n\r\n",
        b"SIP/2.0 200 OK\r\nCall-ID: 99999999999999999999999-x\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n",
    ] {
        u.handle_datagram(t0, target(), Bytes::copy_from_slice(junk));
    }
    u.handle_datagram(t0, target(), Bytes::from_static(b"\r\n\r\n"));
    assert_eq!(u.counters().bad_messages - before, 6);
    assert_eq!(u.active(), 1, "the live call is untouched");

    // Mutated copies of real responses: whatever they parse as, nothing panics.
    let samples = [
        reply(
            &invite,
            200,
            Some("uas1"),
            "Contact: <sip:uas@127.0.0.1:5999>\r\n",
            SDP_ANSWER,
        ),
        reply(&invite, 486, Some("uas1"), "", ""),
        reply(&invite, 180, Some("uas1"), "", ""),
    ];
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..3000 {
        let mut m = samples[i % samples.len()].to_vec();
        for _ in 0..=(next() % 4) {
            if m.is_empty() {
                break;
            }
            let at = (next() as usize) % m.len();
            match next() % 3 {
                0 => m[at] = next() as u8,
                1 => {
                    m.remove(at);
                }
                _ => m.truncate(at),
            }
        }
        u.handle_datagram(t0 + ms(100), target(), Bytes::from(m));
        // What goes out may echo the mutated bytes; it only has to exist without a panic.
        while u.poll_transmit().is_some() {}
        let _ = events(&mut u);
    }
    u.handle_timeout(t0 + Duration::from_secs(120));
}

#[test]
fn record_route_values_split_at_top_level_commas() {
    assert_eq!(
        split_top_level(r#"<sip:a;lr>, "x,y" <sip:b>,<sip:c,d;lr>"#),
        vec!["<sip:a;lr>", r#""x,y" <sip:b>"#, "<sip:c,d;lr>"]
    );
    assert!(split_top_level(" , ").is_empty());
}

#[test]
fn a_call_started_via_another_target_sends_everything_there() {
    let mut u = uac(T1 * 64);
    let t0 = Instant::now();
    let other: SocketAddr = "127.0.0.1:5061".parse().unwrap();
    u.start_call_via(t0, other, "+15550100002", ms(100), 4000);
    let t = u.poll_transmit().unwrap();
    assert_eq!(t.dest, other);
    let invite = String::from_utf8(t.data.to_vec()).unwrap();
    assert_eq!(
        start_line(&invite),
        "INVITE sip:+15550100002@127.0.0.1:5061 SIP/2.0"
    );
    // Timer A retransmits to the same place.
    u.handle_timeout(t0 + T1);
    assert_eq!(u.poll_transmit().unwrap().dest, other);
    let ok = reply(
        &invite,
        200,
        Some("uas2"),
        "Contact: <sip:uas@127.0.0.1:5061>\r\nContent-Type: application/sdp\r\n",
        SDP_ANSWER,
    );
    u.handle_datagram(t0 + ms(600), other, ok.clone());
    let ack = u.poll_transmit().unwrap();
    assert_eq!(ack.dest, other);
    // The hold ends: the BYE goes there too.
    u.handle_timeout(t0 + ms(700));
    let bye = u.poll_transmit().unwrap();
    assert_eq!(bye.dest, other);
    assert!(
        String::from_utf8(bye.data.to_vec())
            .unwrap()
            .starts_with("BYE ")
    );
    // A call on the configured target is unchanged.
    u.start_call(t0 + ms(800), "+15550100001", ms(100), 4002);
    let first = std::iter::from_fn(|| u.poll_transmit())
        .find(|t| t.data.starts_with(b"INVITE"))
        .unwrap();
    assert_eq!(first.dest, target());
}
