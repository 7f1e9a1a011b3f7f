//! A SIP UAS that plays the PSTN trunk (or any callee gateway) in a storm.
//!
//! One task, one signalling socket, one media socket. Every INVITE gets 100 Trying, then
//! 180 Ringing and, after `answer_after`, 200 OK with a PCMU answer pointing at the media
//! socket (or a 486 for the `reject_ratio` share); the 200 is retransmitted (T1 doubling)
//! until the ACK. BYE and CANCEL are answered; OPTIONS gets 200 (health checks).
//! The media socket echoes every datagram back to where it came from, like SIPp's
//! `-rtp_echo`, so media through a switch can be checked end to end.

use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use serde::Serialize;
use sipx_sip::{HeaderName, Limits, Message, Method, Request, ResponseBuilder, StatusCode};
use tokio::net::UdpSocket;
use tokio::time::Instant;

/// Settings of the UAS.
#[derive(Debug, Clone)]
pub struct UasConfig {
    /// Signalling address to listen on.
    pub listen: SocketAddr,
    /// Time from the INVITE to the 200 OK.
    pub answer_after: Duration,
    /// Share of INVITEs answered 486 Busy Here instead.
    pub reject_ratio: f64,
}

/// What the UAS saw.
#[derive(Debug, Default, Serialize)]
pub struct UasStats {
    /// New INVITEs.
    pub invites: AtomicU64,
    /// Calls answered 200 and acknowledged.
    pub answered: AtomicU64,
    /// Calls answered 486.
    pub rejected: AtomicU64,
    /// Calls cancelled before the answer.
    pub cancelled: AtomicU64,
    /// BYEs answered.
    pub byes: AtomicU64,
    /// RTP/RTCP datagrams echoed.
    pub media_echoed: AtomicU64,
    /// Datagrams that were not SIP we could handle.
    pub bad_messages: AtomicU64,
}

/// A running UAS; dropping it stops it.
#[derive(Debug)]
pub struct Uas {
    /// Where it listens for SIP.
    pub addr: SocketAddr,
    /// Its counters.
    pub stats: Arc<UasStats>,
    task: tokio::task::JoinHandle<()>,
    media_task: tokio::task::JoinHandle<()>,
}

impl Drop for Uas {
    fn drop(&mut self) {
        self.task.abort();
        self.media_task.abort();
    }
}

struct Pending {
    request: Request,
    src: SocketAddr,
    to_tag: String,
    ok: Option<Bytes>,
    acked: bool,
    retx: Duration,
    tries: u32,
}

/// Starts the UAS on the current tokio runtime.
pub async fn start(cfg: UasConfig) -> std::io::Result<Uas> {
    let socket = UdpSocket::bind(cfg.listen).await?;
    let addr = socket.local_addr()?;
    let media = UdpSocket::bind(SocketAddr::new(addr.ip(), 0)).await?;
    let media_addr = media.local_addr()?;
    let stats = Arc::new(UasStats::default());
    let media_stats = stats.clone();
    let media_task = tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, src)) = media.recv_from(&mut buf).await {
            if media.send_to(&buf[..n], src).await.is_ok() {
                media_stats.media_echoed.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let task = tokio::spawn(run(socket, media_addr, cfg, stats.clone()));
    Ok(Uas {
        addr,
        stats,
        task,
        media_task,
    })
}

fn response(
    req: &Request,
    code: u16,
    reason: &str,
    to_tag: &str,
    contact: SocketAddr,
    sdp: Option<String>,
) -> Option<Bytes> {
    let mut b = ResponseBuilder::to_request(req, StatusCode::new(code)?, reason.to_owned()).ok()?;
    if code > 100 {
        let to = String::from_utf8_lossy(&req.headers.value(&HeaderName::To)?).into_owned();
        if !to.contains(";tag=") {
            b = b
                .set_header(&HeaderName::To, format!("{to};tag={to_tag}"))
                .ok()?;
        }
        b = b
            .header(HeaderName::Contact, format!("<sip:uas@{contact}>"))
            .ok()?;
    }
    if let Some(body) = sdp {
        b = b
            .header(HeaderName::ContentType, "application/sdp")
            .ok()?
            .body(Bytes::from(body));
    }
    Some(Message::Response(b.build()).to_bytes())
}

async fn run(socket: UdpSocket, media: SocketAddr, cfg: UasConfig, stats: Arc<UasStats>) {
    let local = socket.local_addr().unwrap_or(cfg.listen);
    let limits = Limits::datagram();
    let mut calls: HashMap<String, Pending> = HashMap::new();
    // (due, call-id, what): what = 0 answer, 1 retransmit 200, 2 forget
    let mut timers: BinaryHeap<std::cmp::Reverse<(Instant, String, u8)>> = BinaryHeap::new();
    let mut buf = vec![0u8; 65_535];
    loop {
        let next = timers.peek().map(|t| t.0.0);
        let recv = socket.recv_from(&mut buf);
        let due = async {
            match next {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = recv => {
                let Ok((n, src)) = r else { continue };
                let data = Bytes::copy_from_slice(&buf[..n]);
                let Ok(Message::Request(req)) = sipx_sip::parse_datagram(data, &limits) else {
                    if !buf[..n].iter().all(u8::is_ascii_whitespace) && !buf[..n].starts_with(b"SIP/2.0") {
                        stats.bad_messages.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                };
                let Some(cid) = req.headers.value(&HeaderName::CallId).map(|v| String::from_utf8_lossy(&v).into_owned()) else {
                    stats.bad_messages.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                match req.method {
                    Method::Invite => {
                        if let Some(p) = calls.get(&cid) {
                            // A retransmission: repeat what we last said.
                            if let Some(ok) = &p.ok {
                                let _ = socket.send_to(ok, src).await;
                            } else if let Some(r) = response(&req, 180, "Ringing", &p.to_tag, local, None) {
                                let _ = socket.send_to(&r, src).await;
                            }
                            continue;
                        }
                        stats.invites.fetch_add(1, Ordering::Relaxed);
                        let to_tag: String = {
                            let mut rng = rand::rng();
                            (0..10).map(|_| char::from(b'a' + rng.random_range(0..26u8))).collect()
                        };
                        for (code, reason) in [(100, "Trying"), (180, "Ringing")] {
                            if let Some(r) = response(&req, code, reason, &to_tag, local, None) {
                                let _ = socket.send_to(&r, src).await;
                            }
                        }
                        calls.insert(cid.clone(), Pending { request: req, src, to_tag, ok: None, acked: false, retx: Duration::from_millis(500), tries: 0 });
                        timers.push(std::cmp::Reverse((Instant::now() + cfg.answer_after, cid, 0)));
                    }
                    Method::Ack => {
                        if let Some(p) = calls.get_mut(&cid)
                            && p.ok.is_some()
                            && !p.acked
                        {
                            p.acked = true;
                            stats.answered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Method::Bye => {
                        if let Some(r) = response(&req, 200, "OK", "bye", local, None) {
                            let _ = socket.send_to(&r, src).await;
                        }
                        if calls.remove(&cid).is_some() {
                            stats.byes.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Method::Cancel => {
                        if let Some(r) = response(&req, 200, "OK", "cancel", local, None) {
                            let _ = socket.send_to(&r, src).await;
                        }
                        if let Some(p) = calls.get(&cid)
                            && p.ok.is_none()
                        {
                            if let Some(r) = response(&p.request, 487, "Request Terminated", &p.to_tag, local, None) {
                                let _ = socket.send_to(&r, p.src).await;
                            }
                            calls.remove(&cid);
                            stats.cancelled.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Method::Options => {
                        if let Some(r) = response(&req, 200, "OK", "opt", local, None) {
                            let _ = socket.send_to(&r, src).await;
                        }
                    }
                    _ => {
                        if let Some(r) = response(&req, 501, "Not Implemented", "x", local, None) {
                            let _ = socket.send_to(&r, src).await;
                        }
                    }
                }
            }
            () = due => {
                let Some(std::cmp::Reverse((_, cid, what))) = timers.pop() else { continue };
                let Some(p) = calls.get_mut(&cid) else { continue };
                match what {
                    0 => {
                        let reject = rand::rng().random_bool(cfg.reject_ratio.clamp(0.0, 1.0));
                        if reject {
                            if let Some(r) = response(&p.request, 486, "Busy Here", &p.to_tag, local, None) {
                                let _ = socket.send_to(&r, p.src).await;
                            }
                            stats.rejected.fetch_add(1, Ordering::Relaxed);
                            // Keep the call briefly to absorb the ACK, then forget it.
                            timers.push(std::cmp::Reverse((Instant::now() + Duration::from_secs(5), cid, 2)));
                            continue;
                        }
                        let sdp = format!(
                            "v=0\r\no=uas 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n",
                            ip = media.ip(),
                            port = media.port()
                        );
                        p.ok = response(&p.request, 200, "OK", &p.to_tag, local, Some(sdp));
                        if let Some(ok) = &p.ok {
                            let _ = socket.send_to(ok, p.src).await;
                        }
                        timers.push(std::cmp::Reverse((Instant::now() + p.retx, cid, 1)));
                    }
                    1 if !p.acked && p.tries < 7 => {
                        if let Some(ok) = &p.ok {
                            let _ = socket.send_to(ok, p.src).await;
                        }
                        p.tries += 1;
                        p.retx = (p.retx * 2).min(Duration::from_secs(4));
                        timers.push(std::cmp::Reverse((Instant::now() + p.retx, cid, 1)));
                    }
                    2 => {
                        calls.remove(&cid);
                    }
                    _ => {}
                }
            }
        }
    }
}
