//! A gateway moves its media mid-call with a re-INVITE (SIPp): Parley answers 200 with its
//! unchanged description, the relay re-latches onto the new address only, and the IM device
//! keeps receiving one continuous RTP stream (same SSRC, consecutive sequence numbers,
//! timestamps moving forward) although the gateway's new source starts a new SSRC with new
//! bases; the device's media now reaches the new address.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Node, scenario, sipp_uac, wait_metric};
use parley_codecs::control::ServerMsg;
use parley_codecs::rtp::{RtpView, write_header};
use parley_load::device::MediaMode;

fn rtp(ssrc: u32, seq: u16, ts: u32) -> Vec<u8> {
    let mut h = [0u8; 12];
    write_header(&mut h, 0, false, seq, ts, ssrc);
    let mut p = h.to_vec();
    p.extend_from_slice(&[0xff; 160]);
    p
}

/// Datagrams received on `s` within `window`, with their sources.
fn drain(s: &UdpSocket, window: Duration) -> Vec<(Vec<u8>, SocketAddr)> {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = std::time::Instant::now() + window;
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while std::time::Instant::now() < deadline {
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            got.push((buf[..n].to_vec(), from));
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reinvite_moves_gateway_media_and_the_device_sees_one_stream() {
    let node = Node::start();
    let mut cfg = node.device_config("alice", "desk");
    cfg.media = MediaMode::Tone;
    let mut device = node.device(cfg).await;

    let (old, new) = (
        Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap()),
        Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap()),
    );
    let sc = scenario(node.dir.path(), "uac_reinvite.xml");
    let text = std::fs::read_to_string(&sc)
        .unwrap()
        .replace("@MEDIA1@", &old.local_addr().unwrap().port().to_string())
        .replace("@MEDIA2@", &new.local_addr().unwrap().port().to_string());
    std::fs::write(&sc, text).unwrap();
    let sipp = tokio::spawn(sipp_uac(
        &node,
        &["-sf", sc.to_str().unwrap()],
        "+15550100001",
        1,
        1,
        &[],
    ));

    let connected = device
        .wait_for(Duration::from_secs(10), |m| {
            matches!(m, ServerMsg::CallConnected { .. })
        })
        .await;
    assert!(
        connected.is_some(),
        "device never connected\n{}",
        node.log()
    );
    // The device's tone reaches the gateway's first address, from the relay port in SDP.
    let o = old.clone();
    let first = tokio::task::spawn_blocking(move || drain(&o, Duration::from_millis(300)))
        .await
        .unwrap();
    assert!(!first.is_empty(), "no device media at the first address");
    let relay = first[0].1;

    // The gateway's media: first source until the re-INVITE moved it, then a new source
    // with its own SSRC, sequence and timestamp bases.
    let moved = Arc::new(AtomicBool::new(false));
    let sender = {
        let (old, new, moved) = (old.clone(), new.clone(), moved.clone());
        std::thread::spawn(move || {
            let mut i = 0u16;
            while !moved.load(Ordering::Relaxed) && i < 500 {
                old.send_to(&rtp(0xaaaa_0001, 1000 + i, 160 * u32::from(i)), relay)
                    .unwrap();
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            for j in 0..50u16 {
                new.send_to(
                    &rtp(
                        0xbbbb_0002,
                        65_500u16.wrapping_add(j),
                        9_000_000 + 160 * u32::from(j),
                    ),
                    relay,
                )
                .unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
            i
        })
    };
    let moves = wait_metric(&node, "parley_sip_reinvites_total{result=\"moved\"}", |v| {
        v >= 1.0
    });
    assert!(
        moves >= 1.0,
        "the re-INVITE never moved the media\n{}",
        node.log()
    );
    moved.store(true, Ordering::Relaxed);
    let n = new.clone();
    let later = tokio::task::spawn_blocking(move || drain(&n, Duration::from_millis(600)))
        .await
        .unwrap();
    let sent_old = sender.join().unwrap();
    assert!(
        sent_old >= 10,
        "the first source sent only {sent_old} packets"
    );

    let run = sipp.await.unwrap();
    assert_eq!(run.code, 0, "SIPp failed:\n{}\n{}", run.output, node.log());
    assert_eq!((run.successful, run.failed), (1, 0));

    // The device's media follows the gateway to its new address, from the same relay port.
    assert!(
        later.len() >= 10
            && later
                .iter()
                .all(|(p, from)| *from == relay && RtpView::parse(p).is_ok()),
        "device media at the new address: {} packets",
        later.len()
    );
    // One stream at the device across the move.
    let stats = device.stats().snapshot();
    assert!(stats.rtp_received >= u64::from(sent_old) + 30, "{stats}");
    assert_eq!(
        (stats.rtp_ssrc_changes, stats.rtp_discontinuities),
        (0, 0),
        "the device saw the source change: {stats}"
    );
    assert_eq!(
        node.metric("parley_sip_reinvites_total{result=\"moved\"}"),
        1.0
    );
    let cdrs = node.wait_cdrs(1);
    assert_eq!(cdrs[0]["disposition"], "ANSWERED", "{}", cdrs[0]);
}
