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
//! Audio: G.711 (PCMU, PCMA), which Chromium offers, so gateway calls need no
//! transcoding; Opus, for calls between devices that both declared it (two browsers);
//! and telephone-event (DTMF, RFC 4733) at 8 and 48 kHz. RTP passes through (sequence
//! numbers and timestamps as sent; header extensions stay on the browser's side); only
//! payload type numbers are mapped, by codec, between the call's (`call_connected`) and
//! what this peer connection negotiated. The page picks its sending codec per call
//! (`RTCRtpEncodingParameters.codec`); should a browser send the other G.711 law than
//! the call's, the payload is converted here (a table lookup per byte), and any other
//! codec than the call's is dropped and counted. str0m 0.25 because the design names it
//! and it is sans-IO: the same shape as the relay's own loop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use parley_actors::messages::SessionId;
use parley_codecs::{control, roq, rtp as rtpv};
use str0m::change::SdpOffer;
use str0m::format::{Codec, FormatParams};
use str0m::media::{Frequency, KeyframeRequestKind, MediaKind, Mid};
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
        format: CallFormat,
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

    /// Call `call_id` connected on `flow`, with the call's payload types: the session's
    /// audio track carries it.
    pub fn connect_flow(&self, session: SessionId, call_id: String, flow: u64, format: CallFormat) {
        let _ = self.command(Cmd::Flow {
            session,
            call_id,
            flow,
            format,
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

/// A call's payload types on the relay's side (as `call_connected` names them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallFormat {
    /// The audio codec's payload type: 0 PCMU, 8 PCMA, [`control::PT_OPUS`] Opus.
    pub pt: u8,
    /// The telephone-event payload type, when the other side takes it.
    pub telephone_event: Option<u8>,
    /// The video flow and its formats, when the call has video for this session.
    pub video: Option<(u64, Vec<control::VideoFormat>)>,
}

/// The call on a peer connection's tracks, with its payload type maps.
struct PeerCall {
    id: String,
    flow: u64,
    map: PtMap,
    /// The video flow, with (relay pt, browser pt) per format both sides have.
    video: Option<(u64, Vec<(u8, u8)>)>,
}

/// The browser's payload types for a call's video formats, by codec; formats the peer
/// connection did not negotiate are left out.
fn video_map(formats: &[control::VideoFormat], pts: &[Negotiated]) -> Vec<(u8, u8)> {
    formats
        .iter()
        .filter_map(|f| {
            let codec = match f.name.to_ascii_uppercase().as_str() {
                "VP8" => Codec::Vp8,
                "VP9" => Codec::Vp9,
                "H264" => Codec::H264,
                "AV1" => Codec::Av1,
                _ => return None,
            };
            pts.iter().find(|n| n.codec == codec).map(|n| (f.pt, n.pt))
        })
        .collect()
}

/// Payload types between the relay's side of a call and one peer connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PtMap {
    /// The call's audio codec: (relay pt, browser pt).
    audio: (u8, u8),
    /// Telephone-event at the audio codec's clock: (relay pt, browser pt).
    tele: Option<(u8, u8)>,
    /// Telephone-event at the other clock, as the browser numbers it, with its clock and
    /// the audio codec's: Chromium sends DTMF at 8 kHz on an Opus call whose codec the
    /// page chose per call (the durations are rescaled to the call's clock).
    tele_other: Option<(u8, u32, u32)>,
    /// The other G.711 law, as the browser numbers it, when the call is G.711: its
    /// packets are converted to the call's law.
    other_law: Option<u8>,
}

/// What one negotiated payload type is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Negotiated {
    pt: u8,
    codec: Codec,
    clock: u32,
}

impl PtMap {
    /// The map for a call of `format` on a peer connection that negotiated `pts`; `None`
    /// when it did not negotiate the call's codec.
    fn new(format: &CallFormat, pts: &[Negotiated]) -> Option<Self> {
        let codec = match format.pt {
            parley_codecs::g711::PT_PCMU => Codec::PCMU,
            parley_codecs::g711::PT_PCMA => Codec::PCMA,
            control::PT_OPUS => Codec::Opus,
            _ => return None,
        };
        let audio = pts.iter().find(|n| n.codec == codec)?;
        let tele = format.telephone_event.and_then(|relay| {
            pts.iter()
                .find(|n| n.codec == Codec::Tele && n.clock == audio.clock)
                .map(|n| (relay, n.pt))
        });
        let tele_other = format.telephone_event.and_then(|_| {
            pts.iter()
                .find(|n| n.codec == Codec::Tele && n.clock != audio.clock)
                .map(|n| (n.pt, n.clock, audio.clock))
        });
        let other = match codec {
            Codec::PCMU => Some(Codec::PCMA),
            Codec::PCMA => Some(Codec::PCMU),
            _ => None,
        };
        let other_law = other.and_then(|o| pts.iter().find(|n| n.codec == o).map(|n| n.pt));
        Some(Self {
            audio: (format.pt, audio.pt),
            tele,
            tele_other,
            other_law,
        })
    }

    /// The browser's payload type for a packet the relay sends with `pt`.
    fn toward_browser(&self, pt: u8) -> Option<u8> {
        if pt == self.audio.0 {
            Some(self.audio.1)
        } else {
            self.tele.filter(|t| t.0 == pt).map(|t| t.1)
        }
    }

    /// What a packet the browser sent with `pt` becomes on the relay's side.
    fn sent_by_browser(&self, pt: u8) -> FromBrowser {
        if pt == self.audio.1 {
            FromBrowser::Audio(self.audio.0)
        } else if let Some(t) = self.tele.filter(|t| t.1 == pt) {
            FromBrowser::Tele(t.0)
        } else if let (Some(t), Some((other, from, to))) = (self.tele, self.tele_other)
            && other == pt
        {
            FromBrowser::TeleRescaled(t.0, from, to)
        } else if self.other_law == Some(pt) {
            FromBrowser::OtherLaw(self.audio.0)
        } else {
            FromBrowser::Other
        }
    }
}

/// The fate of one packet from a browser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FromBrowser {
    /// The call's codec: relayed with this payload type.
    Audio(u8),
    /// DTMF: relayed with this payload type.
    Tele(u8),
    /// DTMF at another clock than the call's (from, to): relayed with this payload type,
    /// its duration rescaled.
    TeleRescaled(u8, u32, u32),
    /// The other G.711 law: converted to the call's, relayed with this payload type.
    OtherLaw(u8),
    /// A codec the call does not carry: dropped.
    Other,
}

/// Rescales an RFC 4733 event's duration (bytes 2–3, in clock ticks) from one clock to
/// another, saturating.
fn rescale_event(payload: &mut [u8], from: u32, to: u32) {
    if payload.len() < 4 || from == 0 {
        return;
    }
    let d = u64::from(u16::from_be_bytes([payload[2], payload[3]]));
    let scaled = u16::try_from(d * u64::from(to) / u64::from(from)).unwrap_or(u16::MAX);
    payload[2..4].copy_from_slice(&scaled.to_be_bytes());
}

/// Converts G.711 between the laws in place (`to` is the payload type wanted).
fn convert_law(payload: &mut [u8], to: u8) {
    use parley_codecs::g711::{PT_PCMA, decode_alaw, decode_ulaw, encode_alaw, encode_ulaw};
    for b in payload {
        *b = if to == PT_PCMA {
            encode_alaw(decode_ulaw(*b))
        } else {
            encode_ulaw(decode_alaw(*b))
        };
    }
}

/// The payload types a peer connection negotiated: those of the `Rtc`'s codec
/// configuration that the browser offered on one of `mids` (the configuration also holds
/// codecs the browser never offered, at str0m's own numbers).
fn negotiated(rtc: &Rtc, mids: &[Option<Mid>]) -> Vec<Negotiated> {
    let offered: Vec<u8> = mids
        .iter()
        .flatten()
        .filter_map(|mid| rtc.media(*mid))
        .flat_map(|m| m.remote_pts().iter().map(|pt| **pt))
        .collect();
    rtc.codec_config()
        .params()
        .iter()
        .filter(|p| offered.contains(&*p.pt()))
        .map(|p| Negotiated {
            pt: *p.pt(),
            codec: p.spec().codec,
            clock: p.spec().clock_rate.get(),
        })
        .collect()
}

/// One browser's peer connection.
struct Peer {
    rtc: Rtc,
    /// The audio m-line, once str0m announced it.
    audio: Option<Mid>,
    /// The video m-line, when the page offered one.
    video: Option<Mid>,
    /// Sequence numbers of the video track toward the browser.
    vseq: SeqMap,
    /// The call on the audio track.
    call: Option<PeerCall>,
    /// Sequence numbers of the audio track toward the browser.
    seq: SeqMap,
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
                format,
            } => {
                if let Some(p) = self.peers.get_mut(&session) {
                    let pts = negotiated(&p.rtc, &[p.audio, p.video]);
                    match PtMap::new(&format, &pts) {
                        Some(map) => {
                            // A new call: its sources continue the tracks' numbering.
                            p.seq.restart();
                            p.vseq.restart();
                            p.call = Some(PeerCall {
                                id: call_id,
                                flow,
                                map,
                                video: format
                                    .video
                                    .as_ref()
                                    .map(|(vflow, formats)| (*vflow, video_map(formats, &pts))),
                            })
                        }
                        None => {
                            // The peer connection cannot carry the call's codec: nothing
                            // goes on the track (the call stays up, silent, and says why).
                            tracing::warn!(session, call = %call_id, pt = format.pt, "the browser's peer connection did not negotiate the call's codec");
                            metrics::counter!(m::WEBRTC_DROPS_TOTAL, "reason" => "codec_not_negotiated")
                                .increment(1);
                            p.call = None;
                        }
                    }
                }
            }
            Cmd::Unflow { session, call_id } => {
                if let Some(p) = self.peers.get_mut(&session)
                    && p.call.as_ref().is_some_and(|c| c.id == call_id)
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
        let mut config = Rtc::builder()
            .set_ice_lite(true)
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_pcmu(true, false)
            .enable_pcma(true, false)
            .enable_opus(true, false)
            .enable_vp8(true)
            .enable_h264(true);
        // DTMF at both audio clocks (Chromium's numbers; str0m takes the offer's).
        for (pt, clock) in [
            (126, Frequency::EIGHT_KHZ),
            (110, Frequency::FORTY_EIGHT_KHZ),
        ] {
            config.codec_config().add_config(
                pt.into(),
                None,
                Codec::Tele,
                clock,
                None,
                FormatParams {
                    telephone_event_max: Some(16),
                    ..FormatParams::default()
                },
            );
        }
        let mut rtc = config.build(now);
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
                video: None,
                vseq: SeqMap::default(),
                call: None,
                seq: SeqMap::default(),
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
        let Ok(view) = rtpv::RtpView::parse(packet) else {
            metrics::counter!(m::WEBRTC_DROPS_TOTAL, "reason" => "not_rtp").increment(1);
            return;
        };
        // The connected call's video flow goes on the video track.
        if let (
            Some(vmid),
            Some(PeerCall {
                video: Some((vflow, vmap)),
                ..
            }),
        ) = (p.video, p.call.as_ref())
            && *vflow == flow
        {
            if view.kind() != rtpv::Kind::Rtp {
                // The caller asks for a keyframe (PLI or FIR): the browser's encoder is
                // asked through str0m. Other RTCP stays on the relay's side.
                if asks_keyframe(packet)
                    && let Some(rx) = p.rtc.direct_api().stream_rx_by_mid(vmid, None)
                {
                    rx.request_keyframe(KeyframeRequestKind::Pli);
                    metrics::counter!(m::WEBRTC_KEYFRAME_REQUESTS_TOTAL, "direction" => "to_browser")
                        .increment(1);
                    self.drain(session);
                }
                return;
            }
            let Some(&(_, pt)) = vmap.iter().find(|(relay, _)| *relay == view.payload_type())
            else {
                metrics::counter!(m::WEBRTC_DROPS_TOTAL, "reason" => "other_codec").increment(1);
                return;
            };
            if write_track(&mut p.rtc, vmid, &mut p.vseq, pt, &view) {
                metrics::counter!(m::WEBRTC_VIDEO_PACKETS_TOTAL, "direction" => "to_browser")
                    .increment(1);
            }
            self.drain(session);
            return;
        }
        // Only the connected call's flow goes on the audio track (a flow of a call that
        // is ending, or one the session has no track for, does not).
        let Some(call) = p.call.as_ref().filter(|c| c.flow == flow) else {
            metrics::counter!(m::WEBRTC_DROPS_TOTAL, "reason" => "other_flow").increment(1);
            return;
        };
        if view.kind() != rtpv::Kind::Rtp {
            // RTCP stays on the relay's side: str0m makes its own reports.
            return;
        }
        let Some(pt) = call.map.toward_browser(view.payload_type()) else {
            metrics::counter!(m::WEBRTC_DROPS_TOTAL, "reason" => "other_codec").increment(1);
            return;
        };
        let dtmf = Some(pt) == call.map.tele.map(|t| t.1);
        if !write_track(&mut p.rtc, mid, &mut p.seq, pt, &view) {
            return;
        }
        metrics::counter!(m::WEBRTC_PACKETS_TOTAL, "direction" => "to_browser").increment(1);
        if dtmf {
            metrics::counter!(m::WEBRTC_DTMF_PACKETS_TOTAL, "direction" => "to_browser")
                .increment(1);
        }
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
                    Event::MediaAdded(added) if added.kind == MediaKind::Video => {
                        p.video.get_or_insert(added.mid);
                    }
                    // The browser cannot decode the caller's video (a loss, or it joined
                    // between keyframes): a PLI to the caller on the call's video flow,
                    // for the caller's stream.
                    Event::KeyframeRequest(req) if Some(req.mid) == p.video => {
                        if let (
                            Some(PeerCall {
                                video: Some((vflow, _)),
                                ..
                            }),
                            Some(media),
                        ) = (&p.call, p.vseq.source_ssrc())
                        {
                            self.relay
                                .roq_in(session, *vflow, Bytes::from(pli(1, media).to_vec()));
                            metrics::counter!(m::WEBRTC_KEYFRAME_REQUESTS_TOTAL, "direction" => "from_browser")
                                .increment(1);
                        }
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
                        if let Some(call) = &p.call {
                            let h = &pkt.header;
                            // Video: the call's video flow, with the caller's number.
                            if let Some((vflow, vmap)) = &call.video
                                && let Some(&(relay, _)) =
                                    vmap.iter().find(|(_, b)| *b == *h.payload_type)
                            {
                                let out = relay_packet(relay, h, &pkt.payload);
                                metrics::counter!(m::WEBRTC_VIDEO_PACKETS_TOTAL, "direction" => "from_browser")
                                    .increment(1);
                                self.relay.roq_in(session, *vflow, Bytes::from(out));
                                continue;
                            }
                            let fate = call.map.sent_by_browser(*h.payload_type);
                            let pt = match fate {
                                FromBrowser::Audio(pt)
                                | FromBrowser::Tele(pt)
                                | FromBrowser::TeleRescaled(pt, ..)
                                | FromBrowser::OtherLaw(pt) => pt,
                                FromBrowser::Other => {
                                    metrics::counter!(m::WEBRTC_DROPS_TOTAL, "reason" => "other_codec")
                                        .increment(1);
                                    continue;
                                }
                            };
                            let mut out = relay_packet(pt, h, &pkt.payload);
                            match fate {
                                FromBrowser::OtherLaw(_) => {
                                    convert_law(&mut out[rtpv::RTP_HEADER_LEN..], pt);
                                }
                                FromBrowser::TeleRescaled(_, from, to) => {
                                    rescale_event(&mut out[rtpv::RTP_HEADER_LEN..], from, to);
                                }
                                _ => {}
                            }
                            metrics::counter!(m::WEBRTC_PACKETS_TOTAL, "direction" => "from_browser")
                                .increment(1);
                            if matches!(fate, FromBrowser::Tele(_) | FromBrowser::TeleRescaled(..))
                            {
                                metrics::counter!(m::WEBRTC_DTMF_PACKETS_TOTAL, "direction" => "from_browser")
                                    .increment(1);
                            }
                            self.relay.roq_in(session, call.flow, Bytes::from(out));
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

/// Writes one RTP packet the relay sent (as `view`) to a track of `rtc` with the
/// browser's payload type `pt`, its sequence number mapped onto the track's by `numbers`;
/// `false` (and counted) when the track has no stream to send on.
fn write_track(
    rtc: &mut Rtc,
    mid: Mid,
    numbers: &mut SeqMap,
    pt: u8,
    view: &rtpv::RtpView<'_>,
) -> bool {
    let seq = numbers.next(view.ssrc(), view.sequence());
    let mut direct = rtc.direct_api();
    let Some(tx) = direct.stream_tx_by_mid(mid, None) else {
        metrics::counter!(m::WEBRTC_DROPS_TOTAL, "reason" => "no_stream").increment(1);
        return false;
    };
    tx.write_rtp(
        RtpWrite::new(
            pt.into(),
            seq,
            view.timestamp(),
            Instant::now(),
            view.payload(),
        )
        .marker(view.marker()),
    );
    true
}

/// An RTCP PLI (RFC 4585 6.3.1) from `sender` for `media`.
fn pli(sender: u32, media: u32) -> [u8; 12] {
    let mut p = [0x81, 206, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0];
    p[4..8].copy_from_slice(&sender.to_be_bytes());
    p[8..12].copy_from_slice(&media.to_be_bytes());
    p
}

/// Whether a (compound) RTCP packet holds a PLI or a FIR (RFC 5104 4.3.1).
fn asks_keyframe(mut rtcp: &[u8]) -> bool {
    while rtcp.len() >= 4 {
        let (fmt, pt) = (rtcp[0] & 0x1f, rtcp[1]);
        let len = (usize::from(u16::from_be_bytes([rtcp[2], rtcp[3]])) + 1) * 4;
        // A packet must be whole to count.
        let Some(rest) = rtcp.get(len..) else {
            return false;
        };
        if pt == 206 && (fmt == 1 || fmt == 4) {
            return true;
        }
        rtcp = rest;
    }
    false
}

/// A browser's RTP packet as the relay takes it: a plain header with the relay's payload
/// type `pt` (header extensions stay on the browser's side), then the payload.
fn relay_packet(pt: u8, h: &str0m::rtp::RtpHeader, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rtpv::RTP_HEADER_LEN + payload.len());
    let mut head = [0u8; rtpv::RTP_HEADER_LEN];
    rtpv::write_header(
        &mut head,
        pt,
        h.marker,
        h.sequence_number,
        h.timestamp,
        *h.ssrc,
    );
    out.extend_from_slice(&head);
    out.extend_from_slice(payload);
    out
}

/// One outgoing track's sequence numbers. str0m protects each packet (SRTP) under the
/// extended number it is given, and the browser's replay check rejects numbers far
/// behind the highest it has seen: so a new source on the track (a new call, or the
/// far end changing SSRC) continues after the last number sent instead of starting
/// from its own random one, while gaps and reordering within a source pass through.
#[derive(Debug, Default)]
struct SeqMap {
    /// The current source, and its last extended sequence number.
    source: Option<(u32, SeqNo)>,
    /// Added (wrapping) to a source's extended numbers.
    offset: u64,
    /// The highest number sent on the track.
    highest: Option<u64>,
}

impl SeqMap {
    /// The next packet starts a source, whatever its SSRC (a new call).
    fn restart(&mut self) {
        self.source = None;
    }

    /// The SSRC of the current source.
    fn source_ssrc(&self) -> Option<u32> {
        self.source.map(|(ssrc, _)| ssrc)
    }

    /// The track's number for packet `seq` of source `ssrc`.
    fn next(&mut self, ssrc: u32, seq: u16) -> SeqNo {
        let ext = match self.source {
            Some((s, last)) if s == ssrc => *extend(Some(last), seq),
            _ => {
                let ext = u64::from(seq);
                let first = self.highest.map_or(ext, |h| h + 1);
                self.offset = first.wrapping_sub(ext);
                ext
            }
        };
        self.source = Some((ssrc, ext.into()));
        let out = ext.wrapping_add(self.offset);
        self.highest = Some(self.highest.map_or(out, |h| h.max(out)));
        out.into()
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
    use super::*;

    /// What Chromium's offer gives once the page set its codec preferences.
    fn chromium() -> Vec<Negotiated> {
        [
            (0, Codec::PCMU, 8000),
            (8, Codec::PCMA, 8000),
            (111, Codec::Opus, 48000),
            (126, Codec::Tele, 8000),
            (110, Codec::Tele, 48000),
        ]
        .into_iter()
        .map(|(pt, codec, clock)| Negotiated { pt, codec, clock })
        .collect()
    }

    #[test]
    fn a_gateway_calls_payload_types_map_to_the_browsers_by_codec() {
        // A gateway offering PCMA and telephone-event at 101.
        let call = CallFormat {
            pt: 8,
            telephone_event: Some(101),
            video: None,
        };
        let map = PtMap::new(&call, &chromium()).unwrap();
        assert_eq!(map.toward_browser(8), Some(8));
        assert_eq!(map.toward_browser(101), Some(126), "DTMF at 8 kHz");
        assert_eq!(map.toward_browser(0), None, "not the call's codec");
        assert_eq!(map.sent_by_browser(8), FromBrowser::Audio(8));
        assert_eq!(map.sent_by_browser(126), FromBrowser::Tele(101));
        assert_eq!(map.sent_by_browser(0), FromBrowser::OtherLaw(8));
        assert_eq!(map.sent_by_browser(111), FromBrowser::Other);
        assert_eq!(
            map.sent_by_browser(110),
            FromBrowser::TeleRescaled(101, 48000, 8000),
            "48 kHz DTMF"
        );
        // No telephone-event on the call: the browser's DTMF goes nowhere.
        let quiet = PtMap::new(
            &CallFormat {
                pt: 0,
                telephone_event: None,
                video: None,
            },
            &chromium(),
        )
        .unwrap();
        assert_eq!(quiet.sent_by_browser(126), FromBrowser::Other);
        assert_eq!(quiet.toward_browser(101), None);
    }

    #[test]
    fn an_opus_call_maps_to_whatever_number_the_browser_negotiated() {
        // A browser numbering Opus 109 and its 48 kHz DTMF 101 (Firefox's numbers).
        let other = vec![
            Negotiated {
                pt: 109,
                codec: Codec::Opus,
                clock: 48000,
            },
            Negotiated {
                pt: 101,
                codec: Codec::Tele,
                clock: 48000,
            },
            Negotiated {
                pt: 0,
                codec: Codec::PCMU,
                clock: 8000,
            },
        ];
        let call = CallFormat {
            pt: control::PT_OPUS,
            telephone_event: Some(control::PT_TELEPHONE_EVENT),
            video: None,
        };
        let map = PtMap::new(&call, &other).unwrap();
        assert_eq!(map.toward_browser(111), Some(109));
        assert_eq!(map.toward_browser(101), Some(101));
        assert_eq!(map.sent_by_browser(109), FromBrowser::Audio(111));
        assert_eq!(map.sent_by_browser(101), FromBrowser::Tele(101));
        assert_eq!(
            map.sent_by_browser(0),
            FromBrowser::Other,
            "G.711 on an Opus call"
        );
        // Chromium's DTMF at 8 kHz on an Opus call: relayed, durations at 48 kHz.
        let chrome = PtMap::new(&call, &chromium()).unwrap();
        assert_eq!(
            chrome.sent_by_browser(126),
            FromBrowser::TeleRescaled(101, 8000, 48000)
        );
        let mut event = [1u8, 0x80, 0x03, 0x20]; // digit 1, end, 800 ticks (100 ms)
        rescale_event(&mut event, 8000, 48000);
        assert_eq!(event, [1, 0x80, 0x12, 0xc0], "4800 ticks");
        rescale_event(&mut event, 48000, 8000);
        assert_eq!(event, [1, 0x80, 0x03, 0x20], "and back");
        let mut long = [1u8, 0, 0xff, 0xff];
        rescale_event(&mut long, 8000, 48000);
        assert_eq!(long[2..], [0xff, 0xff], "saturates");
        let mut short = [1u8, 0x80];
        rescale_event(&mut short, 8000, 48000);
        assert_eq!(short, [1, 0x80], "too short to hold a duration: left as is");
        // A peer connection without Opus cannot carry an Opus call.
        assert_eq!(PtMap::new(&call, &other[2..]), None);
        assert_eq!(
            PtMap::new(
                &CallFormat {
                    pt: 18,
                    telephone_event: None,
                    video: None,
                },
                &chromium()
            ),
            None
        );
    }

    #[test]
    fn video_formats_map_by_codec_and_unknown_ones_are_left_out() {
        let pts = vec![
            Negotiated {
                pt: 96,
                codec: Codec::Vp8,
                clock: 90000,
            },
            Negotiated {
                pt: 102,
                codec: Codec::H264,
                clock: 90000,
            },
        ];
        let f = |pt: u8, name: &str| control::VideoFormat {
            pt,
            name: name.into(),
        };
        assert_eq!(
            video_map(&[f(100, "VP8"), f(97, "h264"), f(98, "THEORA")], &pts),
            vec![(100, 96), (97, 102)]
        );
        assert!(video_map(&[f(96, "VP9")], &pts).is_empty());
    }

    #[test]
    fn the_other_g711_law_is_converted() {
        use parley_codecs::g711::{PT_PCMA, PT_PCMU, decode_alaw, decode_ulaw, tone};
        let ulaw = tone(PT_PCMU, 440.0, 0.02);
        let mut alaw = ulaw.clone();
        convert_law(&mut alaw, PT_PCMA);
        assert_ne!(alaw, ulaw);
        for (u, a) in ulaw.iter().zip(&alaw) {
            let (u, a) = (i32::from(decode_ulaw(*u)), i32::from(decode_alaw(*a)));
            // The laws' steps differ; a sample moves by at most one step of either.
            assert!((u - a).abs() <= (u.abs() / 16).max(16), "{u} vs {a}");
        }
        let mut back = alaw.clone();
        convert_law(&mut back, PT_PCMU);
        assert_eq!(back.len(), ulaw.len());
    }

    #[test]
    fn keyframe_requests_are_found_in_compound_rtcp() {
        let rr = [0x80u8, 201, 0, 1, 0, 0, 0, 9];
        let mut compound = rr.to_vec();
        compound.extend_from_slice(&pli(7, 9));
        assert!(asks_keyframe(&compound));
        assert!(asks_keyframe(&pli(1, 2)));
        let mut fir = pli(1, 2);
        fir[0] = 0x84;
        assert!(asks_keyframe(&fir));
        assert!(!asks_keyframe(&rr));
        // A NACK (transport feedback, 205) is not one; nor is a truncated packet.
        assert!(!asks_keyframe(&[0x81, 205, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2]));
        assert!(!asks_keyframe(&[0x81, 206, 0, 9]));
        assert!(!asks_keyframe(&[0x81]));
    }

    #[test]
    fn a_new_source_on_a_track_continues_after_the_last_number_sent() {
        let mut m = SeqMap::default();
        assert_eq!(*m.next(1, 40_000), 40_000);
        assert_eq!(*m.next(1, 40_001), 40_001);
        assert_eq!(*m.next(1, 40_003), 40_003, "a gap passes through");
        assert_eq!(*m.next(1, 40_002), 40_002, "so does reordering");
        // The next call's source starts lower: the track goes on at 40,004.
        m.restart();
        assert_eq!(*m.next(2, 100), 40_004);
        assert_eq!(*m.next(2, 101), 40_005);
        // The far end changes SSRC mid-call, near the wrap.
        assert_eq!(*m.next(3, 65_535), 40_006);
        assert_eq!(*m.next(3, 0), 40_007, "its own wrap");
        // A new call whose source has the same SSRC still starts after the last.
        m.restart();
        assert_eq!(*m.next(3, 5), 40_008);
    }

    #[test]
    fn sequence_numbers_extend_across_the_wrap() {
        assert_eq!(*extend(None, 7), 7);
        assert_eq!(*extend(Some(65_535.into()), 0), 65_536);
        assert_eq!(*extend(Some(65_536.into()), 65_535), 65_535);
        assert_eq!(*extend(Some(100.into()), 101), 101);
    }
}
