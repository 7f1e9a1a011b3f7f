//! Video calls: an INVITE offering audio and video rings only devices that declared video,
//! and the answer carries a relayed video stream; with audio fallback allowed, an audio-only
//! device may take it and the video stream is refused (port 0).

mod common;

use std::time::Duration;

use common::{Node, sipp_uac};
use parley_codecs::control::{ClientMsg, ServerMsg};

const T: Duration = Duration::from_secs(10);

fn video_scenario(node: &Node, video_re: &str) -> std::path::PathBuf {
    let path = common::scenario(node.dir.path(), "uac_video.xml");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("@VIDEO_RE@", video_re);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn video_call_rings_only_the_video_device_and_relays_video() {
    let node = Node::start();
    let mut desk = node.device(node.device_config("alice", "desk")).await;
    desk.send(ClientMsg::Capabilities {
        video: true,
        codecs: Vec::new(),
    })
    .await
    .unwrap();
    let mobile = node.device(node.device_config("alice", "mobile")).await; // audio only
    tokio::time::sleep(Duration::from_millis(200)).await;

    let sc = video_scenario(&node, "m=video [1-9][0-9]* RTP/AVP 96");
    let run = sipp_uac(
        &node,
        &["-sf", sc.to_str().unwrap()],
        "+15550100001",
        1,
        1,
        &[],
    )
    .await;
    assert_eq!(run.code, 0, "{}\n{}", run.output, node.log());
    let offer = desk
        .wait_for(T, |m| matches!(m, ServerMsg::IncomingCall { .. }))
        .await;
    assert!(
        matches!(offer, Some(ServerMsg::IncomingCall { video: true, .. })),
        "{offer:?}"
    );
    let connected = desk
        .wait_for(T, |m| matches!(m, ServerMsg::CallConnected { .. }))
        .await;
    assert!(
        matches!(
            connected,
            Some(ServerMsg::CallConnected {
                video_flow_id: Some(_),
                ..
            })
        ),
        "{connected:?}"
    );
    assert_eq!(
        mobile.stats().snapshot().calls_offered,
        0,
        "the audio-only device must not ring"
    );
    let cdrs = node.wait_cdrs(1);
    assert_eq!(
        (
            cdrs[0]["disposition"].as_str(),
            cdrs[0]["answered_by"].as_str()
        ),
        (Some("ANSWERED"), Some("desk"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_fallback_lets_an_audio_device_take_a_video_call_without_video() {
    let node = Node::start();
    let mut mobile = node.device(node.device_config("alice", "mobile")).await; // audio only
    // Without fallback nothing can take the video call.
    let sc480 = common::scenario(node.dir.path(), "uac_480.xml");
    let text = std::fs::read_to_string(&sc480).unwrap().replace("a=rtpmap:0 PCMU/8000", "a=rtpmap:0 PCMU/8000\n      m=video [media_port+2] RTP/AVP 96\n      a=rtpmap:96 VP8/90000");
    std::fs::write(&sc480, text).unwrap();
    let run = sipp_uac(
        &node,
        &["-sf", sc480.to_str().unwrap()],
        "+15550100001",
        1,
        1,
        &[],
    )
    .await;
    assert_eq!(
        run.code,
        0,
        "video call without a video device must get 480: {}\n{}",
        run.output,
        node.log()
    );
    assert_eq!(mobile.stats().snapshot().calls_offered, 0);

    let (st, body) = node.put(
        "/api/v1/users/alice/preferences",
        r#"{"video_audio_fallback":true}"#,
    );
    assert_eq!(st, 200, "{body}");
    let sc = video_scenario(&node, "m=video 0 ");
    let run = sipp_uac(
        &node,
        &["-sf", sc.to_str().unwrap()],
        "+15550100001",
        1,
        1,
        &[],
    )
    .await;
    assert_eq!(run.code, 0, "{}\n{}", run.output, node.log());
    let offer = mobile
        .wait_for(T, |m| matches!(m, ServerMsg::IncomingCall { .. }))
        .await;
    assert!(
        matches!(offer, Some(ServerMsg::IncomingCall { video: false, .. })),
        "{offer:?}"
    );
    let connected = mobile
        .wait_for(T, |m| matches!(m, ServerMsg::CallConnected { .. }))
        .await;
    assert!(
        matches!(
            connected,
            Some(ServerMsg::CallConnected {
                video_flow_id: None,
                ..
            })
        ),
        "{connected:?}"
    );
}
