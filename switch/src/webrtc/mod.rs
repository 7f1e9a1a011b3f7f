//! Browser media: one WebRTC peer connection per browser session, terminated by str0m
//! (sans-IO: ICE-lite, DTLS-SRTP) on a thread of its own (`parley-webrtc`), bridged into
//! the relay as the session's RoQ flows.
//!
//! A browser offers its peer connection once, after login (`webrtc_offer` on the
//! WebSocket, answered with `webrtc_answer`); the node then registers the session with
//! the relay like a QUIC device ([`crate::relay::DeviceConn::Sink`]), so routing and
//! call actors need nothing of their own: a call connected to the browser gets a flow id
//! (`call_connected`), RTP the relay sends on that flow is written to the peer
//! connection's audio track, and RTP the browser sends on it goes to the relay as that
//! flow's datagrams, without touching an actor mailbox either way. The thread owns every
//! `Rtc` and the one UDP socket they share (a packet goes to the `Rtc` that
//! [`Rtc::accepts`] it, remembered by source address afterwards).
//!
//! Audio only, G.711 (PCMU, then PCMA), which Chromium offers: gateway calls need no
//! transcoding, and RTP passes through (payload type, sequence numbers and timestamps
//! as sent; header extensions stay on the browser's side). str0m 0.25 because the design
//! names it and it is sans-IO: the same shape as the relay's own loop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use parley_actors::messages::SessionId;
use parley_codecs::{roq, rtp as rtpv};
use str0m::change::SdpOffer;
use str0m::media::{MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{RtpWrite, SeqNo};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};
use tokio::sync::oneshot;

use crate::metrics as m;
use crate::relay::{DatagramSink, Relay, SinkClosed};

const SOCKET: Token = Token(0);
const WAKER: Token = Token(1);

/// Media packets queued toward the thread at most (then dropped and counted): ~1 s of
/// 100 calls' audio. Control commands have a queue of their own, so that the control
/// thread never waits behind media.
const QUEUE: usize = 5000;

/// Browser sessions with a peer connection at most.
const MAX_PEERS: usize = 10_000;

/// What the thread is asked to do.
enum Cmd {
    /// A browser's offer: answer it (the `Rtc` is created now).
    Offer {
        session: SessionId,
        sdp: String,
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// A call connected to the session: its flow carries the audio track.
    Flow {
        session: SessionId,
        call_id: String,
        flow: u64,
    },
    /// That call ended.
    Unflow { session: SessionId, call_id: String },
    /// The session ended.
    Close { session: SessionId },
}

/// The thread's handle.
pub struct WebRtc {
    tx: mpsc::Sender<Cmd>,
    media: mpsc::SyncSender<(SessionId, Bytes)>,
    waker: Arc<Waker>,
    /// Set while a wake-up is pending (one `wake` per batch of commands).
    pending: Arc<AtomicBool>,
    local: SocketAddr,
}

impl std::fmt::Debug for WebRtc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebRtc")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

/// Where the relay sends one browser session's media.
#[derive(Clone)]
pub struct MediaSink {
    session: SessionId,
    tx: mpsc::SyncSender<(SessionId, Bytes)>,
    waker: Arc<Waker>,
    pending: Arc<AtomicBool>,
}

impl DatagramSink for MediaSink {
    /// Room for more (the queue is bounded by packets, not bytes).
    fn space(&self) -> usize {
        usize::MAX
    }

    /// Queues one RoQ datagram for the browser.
    fn send(&self, datagram: Bytes) -> Result<(), SinkClosed> {
        match self.tx.try_send((self.session, datagram)) {
            Ok(()) => {
                wake(&self.waker, &self.pending);
                Ok(())
            }
            Err(mpsc::TrySendError::Full(_)) => {
                metrics::counter!(m::WEBRTC_DROPS_TOTAL, "reason" => "queue_full").increment(1);
                Ok(())
            }
            Err(mpsc::TrySendError::Disconnected(_)) => Err(SinkClosed),
        }
    }
}

fn wake(waker: &Waker, pending: &AtomicBool) {
    if !pending.swap(true, Ordering::AcqRel) {
        let _ = waker.wake();
    }
}

impl WebRtc {
    /// Binds the media socket on `listen` (port 0: any) and starts the thread, which hands
    /// browsers' RTP to `relay`.
    pub fn start(listen: SocketAddr, relay: Arc<Relay>) -> std::io::Result<Self> {
        let mut socket = UdpSocket::bind(listen)?;
        let local = socket.local_addr()?;
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut socket, SOCKET, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = mpsc::channel();
        let (media, media_rx) = mpsc::sync_channel(QUEUE);
        let pending = Arc::new(AtomicBool::new(false));
        let mut thread = Thread {
            poll,
            socket,
            local,
            rx,
            media_rx,
            pending: pending.clone(),
            relay,
            peers: HashMap::new(),
            by_source: HashMap::new(),
        };
        std::thread::Builder::new()
            .name("parley-webrtc".into())
            .spawn(move || thread.run())?;
        tracing::info!(%local, "WebRTC media socket bound");
        Ok(Self {
            tx,
            media,
            waker,
            pending,
            local,
        })
    }

    /// The media socket's address (the ICE candidate browsers send to).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn command(&self, cmd: Cmd) -> Result<(), ()> {
        // Control commands are few (a handful per call) and must not be lost: their
        // queue is not bounded by count, and never waits.
        self.tx.send(cmd).map_err(|_| ())?;
        wake(&self.waker, &self.pending);
        Ok(())
    }

    /// Answers a browser session's offer (SDP).
    pub async fn offer(&self, session: SessionId, sdp: String) -> Result<String, String> {
        let (reply, answer) = oneshot::channel();
        self.command(Cmd::Offer {
            session,
            sdp,
            reply,
        })
        .map_err(|()| "the WebRTC thread is gone".to_owned())?;
        answer
            .await
            .map_err(|_| "the WebRTC thread is gone".to_owned())?
    }

    /// Where the relay sends the session's media.
    pub fn sink(&self, session: SessionId) -> MediaSink {
        MediaSink {
            session,
            tx: self.media.clone(),
            waker: self.waker.clone(),
            pending: self.pending.clone(),
        }
    }

    /// Call `call_id` connected on `flow`: the session's audio track carries it.
    pub fn connect_flow(&self, session: SessionId, call_id: String, flow: u64) {
        let _ = self.command(Cmd::Flow {
            session,
            call_id,
            flow,
        });
    }

    /// Call `call_id` ended.
    pub fn end_flow(&self, session: SessionId, call_id: String) {
        let _ = self.command(Cmd::Unflow { session, call_id });
    }

    /// The session ended: its peer connection goes.
    pub fn close(&self, session: SessionId) {
        let _ = self.command(Cmd::Close { session });
    }
}

/// One browser's peer connection.
struct Peer {
    rtc: Rtc,
    /// The audio m-line, once str0m announced it.
    audio: Option<Mid>,
    /// The call on the audio track: (call id, RoQ flow).
    call: Option<(String, u64)>,
    /// Extended sequence number of the last packet sent to the browser.
    seq: Option<SeqNo>,
    connected: bool,
    /// Where the browser sends from (once ICE picked it).
    source: Option<SocketAddr>,
    next: Instant,
}

struct Thread {
    poll: Poll,
    socket: UdpSocket,
    local: SocketAddr,
    rx: mpsc::Receiver<Cmd>,
    media_rx: mpsc::Receiver<(SessionId, Bytes)>,
    pending: Arc<AtomicBool>,
    relay: Arc<Relay>,
    peers: HashMap<SessionId, Peer>,
    by_source: HashMap<SocketAddr, SessionId>,
}

impl Thread {
    fn run(&mut self) {
        let mut events = Events::with_capacity(64);
        let mut buf = vec![0u8; 2000];
        loop {
            let now = Instant::now();
            let timeout = self
                .peers
                .values()
                .map(|p| p.next)
                .min()
                .map(|t| {
                    t.saturating_duration_since(now)
                        .max(Duration::from_millis(1))
                })
                .unwrap_or(Duration::from_millis(500));
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "WebRTC poll failed; browser media stops");
                return;
            }
            for ev in events.iter() {
                match ev.token() {
                    SOCKET => self.read(&mut buf),
                    WAKER => {
                        self.pending.store(false, Ordering::Release);
                        if !self.commands() {
                            return;
                        }
                    }
                    _ => {}
                }
            }
            let now = Instant::now();
            let due: Vec<SessionId> = self
                .peers
                .iter()
                .filter(|(_, p)| p.next <= now)
                .map(|(s, _)| *s)
                .collect();
            for s in due {
                self.input(s, Input::Timeout(now));
            }
        }
    }

    /// Handles queued commands, then queued media; `false` once the handle is gone (the
    /// node stops).
    fn commands(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(cmd) => self.command(cmd),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => return false,
            }
        }
        while let Ok((session, datagram)) = self.media_rx.try_recv() {
            self.media_out(session, &datagram);
        }
        true
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Offer {
                session,
                sdp,
                reply,
            } => {
                let answer = self.accept(session, &sdp);
                let result = if answer.is_ok() { "ok" } else { "refused" };
                metrics::counter!(m::WEBRTC_OFFERS_TOTAL, "result" => result).increment(1);
                let _ = reply.send(answer);
            }
            Cmd::Flow {
                session,
                call_id,
                flow,
            } => {
                if let Some(p) = self.peers.get_mut(&session) {
                    p.call = Some((call_id, flow));
                }
            }
            Cmd::Unflow { session, call_id } => {
                if let Some(p) = self.peers.get_mut(&session)
                    && p.call.as_ref().is_some_and(|(c, _)| *c == call_id)
                {
                    p.call = None;
                }
            }
            Cmd::Close { session } => self.remove(session),
        }
    }

    fn remove(&mut self, session: SessionId) {
        if let Some(mut p) = self.peers.remove(&session) {
            p.rtc.disconnect();
            if let Some(src) = p.source {
                self.by_source.remove(&src);
            }
            metrics::gauge!(m::WEBRTC_PEERS).set(self.peers.len() as f64);
        }
    }

    /// A new peer connection for `session` from the browser's offer.
    fn accept(&mut self, session: SessionId, sdp: &str) -> Result<String, String> {
        if self.peers.len() >= MAX_PEERS && !self.peers.contains_key(&session) {
            return Err("too many browser media sessions on this node".into());
        }
        let offer = SdpOffer::from_sdp_string(sdp).map_err(|e| format!("not an SDP offer: {e}"))?;
        let now = Instant::now();
        let mut rtc = Rtc::builder()
            .set_ice_lite(true)
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_pcmu(true, false)
            .enable_pcma(true, false)
            .build(now);
        let candidate = Candidate::host(self.local, "udp").map_err(|e| e.to_string())?;
        rtc.add_local_candidate(candidate);
        let answer = rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| format!("offer refused: {e}"))?;
        // A second offer replaces the first peer connection.
        self.remove(session);
        self.peers.insert(
            session,
            Peer {
                rtc,
                audio: None,
                call: None,
                seq: None,
                connected: false,
                source: None,
                next: now,
            },
        );
        metrics::gauge!(m::WEBRTC_PEERS).set(self.peers.len() as f64);
        self.drain(session);
        Ok(answer.to_sdp_string())
    }

    fn read(&mut self, buf: &mut [u8]) {
        loop {
            let (n, source) = match self.socket.recv_from(buf) {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "WebRTC socket read failed");
                    return;
                }
            };
            let Ok(contents) = buf[..n].try_into() else {
                metrics::counter!(m::WEBRTC_DROPS_TOTAL, "reason" => "unreadable").increment(1);
                continue;
            };
            let input = Input::Receive(
                Instant::now(),
                Receive {
                    proto: Protocol::Udp,
                    source,
                    destination: self.local,
                    contents,
                },
            );
            let owner = self.by_source.get(&source).copied().or_else(|| {
                self.peers
                    .iter()
                    .find(|(_, p)| p.rtc.accepts(&input))
                    .map(|(s, _)| *s)
            });
            match owner {
                Some(s) => self.input(s, input),
                // Nothing signalling set up expects it.
                None => {
                    metrics::counter!(m::WEBRTC_DROPS_TOTAL, "reason" => "no_peer").increment(1)
                }
            }
        }
    }

    /// Feeds one input to a session's `Rtc`, then drains it.
    fn input(&mut self, session: SessionId, input: Input) {
        let Some(p) = self.peers.get_mut(&session) else {
            return;
        };
        if let Input::Receive(_, r) = &input
            && p.source != Some(r.source)
            && p.rtc.accepts(&input)
        {
            if let Some(old) = p.source.replace(r.source) {
                self.by_source.remove(&old);
            }
            self.by_source.insert(r.source, session);
        }
        if let Err(e) = p.rtc.handle_input(input) {
            tracing::debug!(session, error = %e, "WebRTC input refused");
        }
        self.drain(session);
    }

    /// RTP from the relay toward the browser.
    fn media_out(&mut self, session: SessionId, datagram: &[u8]) {
        let Some(p) = self.peers.get_mut(&session) else {
            return;
        };
        let (Some(mid), true) = (p.audio, p.connected) else {
            metrics::counter!(m::WEBRTC_DROPS_TOTAL, "reason" => "not_connected").increment(1);
            return;
        };
        let Ok((flow, packet)) = roq::decode(datagram) else {
            return;
        };
        // Only the connected call's flow goes on the audio track (a flow of a call that
        // is ending, or one the session has no track for, does not).
        if p.call.as_ref().is_none_or(|(_, f)| *f != flow) {
            metrics::counter!(m::WEBRTC_DROPS_TOTAL, "reason" => "other_flow").increment(1);
            return;
        }
        let Ok(view) = rtpv::RtpView::parse(packet) else {
            metrics::counter!(m::WEBRTC_DROPS_TOTAL, "reason" => "not_rtp").increment(1);
            return;
        };
        if view.kind() != rtpv::Kind::Rtp {
            // RTCP stays on the relay's side: str0m makes its own reports.
            return;
        }
        let seq = extend(p.seq, view.sequence());
        p.seq = Some(seq);
        let mut direct = p.rtc.direct_api();
        let Some(tx) = direct.stream_tx_by_mid(mid, None) else {
            metrics::counter!(m::WEBRTC_DROPS_TOTAL, "reason" => "no_stream").increment(1);
            return;
        };
        tx.write_rtp(
            RtpWrite::new(
                view.payload_type().into(),
                seq,
                view.timestamp(),
                Instant::now(),
                view.payload(),
            )
            .marker(view.marker()),
        );
        metrics::counter!(m::WEBRTC_PACKETS_TOTAL, "direction" => "to_browser").increment(1);
        self.drain(session);
    }

    /// Runs a session's `Rtc` until it waits: packets out, events handled.
    fn drain(&mut self, session: SessionId) {
        let Some(p) = self.peers.get_mut(&session) else {
            return;
        };
        let mut gone = false;
        loop {
            match p.rtc.poll_output() {
                Ok(Output::Timeout(t)) => {
                    p.next = t;
                    break;
                }
                Ok(Output::Transmit(t)) => {
                    if let Err(e) = self.socket.send_to(&t.contents, t.destination) {
                        tracing::debug!(session, error = %e, "WebRTC send failed");
                    }
                }
                Ok(Output::Event(e)) => match e {
                    Event::MediaAdded(added) if added.kind == MediaKind::Audio => {
                        p.audio.get_or_insert(added.mid);
                    }
                    Event::Connected => {
                        p.connected = true;
                        metrics::counter!(m::WEBRTC_CONNECTIONS_TOTAL, "result" => "connected")
                            .increment(1);
                        tracing::info!(session, "browser media connected (ICE, DTLS-SRTP)");
                    }
                    Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                        metrics::counter!(m::WEBRTC_CONNECTIONS_TOTAL, "result" => "disconnected")
                            .increment(1);
                        gone = true;
                    }
                    Event::RtpPacket(pkt) => {
                        if let Some((_, flow)) = &p.call {
                            let h = &pkt.header;
                            let mut out =
                                Vec::with_capacity(rtpv::RTP_HEADER_LEN + pkt.payload.len());
                            let mut head = [0u8; rtpv::RTP_HEADER_LEN];
                            rtpv::write_header(
                                &mut head,
                                *h.payload_type,
                                h.marker,
                                h.sequence_number,
                                h.timestamp,
                                *h.ssrc,
                            );
                            out.extend_from_slice(&head);
                            out.extend_from_slice(&pkt.payload);
                            metrics::counter!(m::WEBRTC_PACKETS_TOTAL, "direction" => "from_browser")
                                .increment(1);
                            self.relay.roq_in(session, *flow, Bytes::from(out));
                        }
                    }
                    _ => {}
                },
                Err(e) => {
                    tracing::info!(session, error = %e, "browser media failed");
                    metrics::counter!(m::WEBRTC_CONNECTIONS_TOTAL, "result" => "failed")
                        .increment(1);
                    gone = true;
                    break;
                }
            }
            if !p.rtc.is_alive() {
                gone = true;
                break;
            }
        }
        if gone {
            self.remove(session);
        }
    }
}

/// The extended sequence number of `seq` following `last` (RFC 3550 A.1's rollover).
fn extend(last: Option<SeqNo>, seq: u16) -> SeqNo {
    let Some(last) = last else {
        return u64::from(seq).into();
    };
    let last = *last;
    let roc = last >> 16;
    let low = (last & 0xffff) as u16;
    let roc = if seq < low && low.wrapping_sub(seq) > 0x8000 {
        roc + 1
    } else if seq > low && seq.wrapping_sub(low) > 0x8000 && roc > 0 {
        roc - 1
    } else {
        roc
    };
    ((roc << 16) | u64::from(seq)).into()
}

#[cfg(test)]
mod tests {
    use super::extend;

    #[test]
    fn sequence_numbers_extend_across_the_wrap() {
        assert_eq!(*extend(None, 7), 7);
        assert_eq!(*extend(Some(65_535.into()), 0), 65_536);
        assert_eq!(*extend(Some(65_536.into()), 65_535), 65_535);
        assert_eq!(*extend(Some(100.into()), 101), 101);
    }
}
