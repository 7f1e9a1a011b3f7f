//! Media of one answered storm call (`--media`): 20 ms PCMU packets at 50 per second from
//! the call's own UDP socket to the address of the SDP answer, each stamped so that what
//! comes back (from an echoing far end) gives loss and round-trip time.
//!
//! The stamp is the first 12 bytes of the payload: a 32-bit packet counter and the send
//! time as 64-bit microseconds since the storm's start, both big-endian; the rest is µ-law
//! silence. The RTP header itself may be rewritten on the way (a relay may change SSRC,
//! sequence number and timestamp), so only the payload is trusted.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use parley_codecs::g711;
use parley_codecs::rtp::{self, Kind, RTP_HEADER_LEN, RtpView};
use tokio::net::UdpSocket;
use tokio::sync::oneshot;

use crate::report::MediaSample;

/// Packetisation time.
pub const PTIME: Duration = Duration::from_millis(20);
/// Bytes of the stamp at the start of each payload.
pub const STAMP_LEN: usize = 12;
/// How long a stream keeps receiving after it stops sending, for echoes in flight.
pub const LINGER: Duration = Duration::from_millis(200);

/// Writes the stamp of packet `counter` sent at `sent_us` into `payload`.
pub fn write_stamp(payload: &mut [u8], counter: u32, sent_us: u64) {
    if let Some(p) = payload.get_mut(..STAMP_LEN) {
        p[..4].copy_from_slice(&counter.to_be_bytes());
        p[4..].copy_from_slice(&sent_us.to_be_bytes());
    }
}

/// Reads a stamp back: `(counter, sent_us)`.
pub fn read_stamp(payload: &[u8]) -> Option<(u32, u64)> {
    let p = payload.get(..STAMP_LEN)?;
    let counter = u32::from_be_bytes(p[..4].try_into().ok()?);
    let sent = u64::from_be_bytes(p[4..].try_into().ok()?);
    Some((counter, sent))
}

/// Sends and measures one stream until `stop` fires (or its sender is dropped), then
/// listens for [`LINGER`] more and returns what it measured.
pub async fn run_stream(
    socket: UdpSocket,
    remote: SocketAddr,
    epoch: Instant,
    mut stop: oneshot::Receiver<()>,
) -> MediaSample {
    let mut sample = MediaSample::new();
    let ssrc: u32 = rand::random();
    let seq0: u16 = rand::random();
    let mut packet = [0xffu8; RTP_HEADER_LEN + g711::SAMPLES_PER_20MS];
    let mut head = [0u8; RTP_HEADER_LEN];
    let mut rbuf = [0u8; 2048];
    let mut ticker = tokio::time::interval(PTIME);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut counter: u32 = 0;
    let mut linger_until: Option<tokio::time::Instant> = None;
    loop {
        let linger = async {
            match linger_until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut stop, if linger_until.is_none() => {
                linger_until = Some(tokio::time::Instant::now() + LINGER);
            }
            () = linger => break,
            _ = ticker.tick(), if linger_until.is_none() => {
                let seq = seq0.wrapping_add(counter as u16);
                let ts = counter.wrapping_mul(g711::SAMPLES_PER_20MS as u32);
                rtp::write_header(&mut head, g711::PT_PCMU, counter == 0, seq, ts, ssrc);
                packet[..RTP_HEADER_LEN].copy_from_slice(&head);
                let sent_us = u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
                write_stamp(&mut packet[RTP_HEADER_LEN..], counter, sent_us);
                if socket.send_to(&packet, remote).await.is_ok() {
                    sample.sent += 1;
                }
                counter = counter.wrapping_add(1);
            }
            r = socket.recv_from(&mut rbuf) => {
                let Ok((n, _)) = r else { continue };
                let now_us = u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
                match RtpView::parse(&rbuf[..n]) {
                    Ok(v) if v.kind() == Kind::Rtp => match read_stamp(v.payload()) {
                        Some((c, sent)) if c < counter && sent <= now_us => {
                            sample.received += 1;
                            sample.record_rtt(Duration::from_micros(now_us - sent));
                        }
                        _ => sample.foreign += 1,
                    },
                    _ => sample.foreign += 1,
                }
            }
        }
    }
    sample
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip() {
        let mut p = [0u8; 160];
        write_stamp(&mut p, 7, 123_456_789);
        assert_eq!(read_stamp(&p), Some((7, 123_456_789)));
        assert_eq!(read_stamp(&p[..11]), None);
        write_stamp(&mut p[..5], 1, 1); // too short: left alone, no panic
    }

    #[tokio::test]
    async fn echoed_stream_is_measured() {
        let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        let (five_tx, five_rx) = oneshot::channel();
        let echoer = tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let mut five_tx = Some(five_tx);
            for n_echoed in 1.. {
                let (n, from) = echo.recv_from(&mut buf).await.unwrap();
                echo.send_to(&buf[..n], from).await.unwrap();
                if n_echoed == 5 {
                    echo.send_to(b"not rtp", from).await.unwrap();
                    let _ = five_tx.take().unwrap().send(());
                }
            }
        });
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (stop_tx, stop_rx) = oneshot::channel();
        let stream = tokio::spawn(run_stream(socket, echo_addr, Instant::now(), stop_rx));
        five_rx.await.unwrap();
        drop(stop_tx);
        let s = stream.await.unwrap();
        echoer.abort();
        // The five echoes and the foreign datagram were sent before the stop; the stream
        // reads them while it lingers.
        assert!(s.received >= 5, "{}", s.received);
        assert!(s.received <= s.sent);
        assert_eq!(s.foreign, 1);
        assert_eq!(s.rtt.len(), s.received);
    }
}
