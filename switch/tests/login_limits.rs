//! Logins that reveal nothing and cannot be guessed at speed: unknown tenant, unknown user
//! and wrong password get the same answer; failed logins are throttled per user name
//! (existing or not) and per source address, with a clear `rate_limited` error; and
//! connections that never log in are capped per source. Real QUIC connections.

mod common;

use std::time::Duration;

use common::Node;
use parley_load::device::{Device, DeviceError};

async fn login(node: &Node, tenant: &str, user: &str, password: &str) -> Result<Device, String> {
    let mut cfg = node.device_config(user, "desk");
    cfg.tenant = tenant.into();
    cfg.password = password.into();
    Device::connect(cfg).await.map_err(|e| match e {
        DeviceError::Auth(m) => m,
        other => panic!("{other}\n{}", node.log()),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_throttled_per_user_name_and_per_source_alike_for_strangers() {
    let node = Node::start_full(
        "",
        "",
        "[login]\nfailures_per_user = 3\nfailures_per_source = 6\nwindow_secs = 600",
    );
    // Three kinds of bad login, one answer.
    let denied = "auth_failed: bad tenant, user or password";
    assert_eq!(
        login(&node, "demo", "alice", "wrong")
            .await
            .err()
            .as_deref(),
        Some(denied)
    );
    assert_eq!(
        login(&node, "nowhere", "alice", "demo")
            .await
            .err()
            .as_deref(),
        Some(denied)
    );
    assert_eq!(
        login(&node, "demo", "nobody", "demo")
            .await
            .err()
            .as_deref(),
        Some(denied)
    );
    assert_eq!(
        login(&node, "demo", "alice", "wrong")
            .await
            .err()
            .as_deref(),
        Some(denied)
    );
    assert_eq!(
        login(&node, "demo", "alice", "wrong")
            .await
            .err()
            .as_deref(),
        Some(denied)
    );
    // alice's name has had three failures: even her right password is refused now.
    let e = login(&node, "demo", "alice", "demo")
        .await
        .err()
        .unwrap_or_default();
    assert!(
        e.starts_with("rate_limited: too many failed logins for this user; retry in"),
        "{e}"
    );
    // bob is not affected (the source has five failures of six).
    assert!(login(&node, "demo", "bob", "demo").await.is_ok());
    // A sixth failure from this address, for a name nobody has: the address is throttled
    // now, for bob too.
    assert_eq!(
        login(&node, "demo", "carol", "x").await.err().as_deref(),
        Some(denied)
    );
    let e = login(&node, "demo", "bob", "demo")
        .await
        .err()
        .unwrap_or_default();
    assert!(
        e.starts_with("rate_limited: too many failed logins from your address"),
        "{e}"
    );
    assert_eq!(
        node.metric("parley_auth_results_total{tenant=\"unknown\",result=\"throttled\"}"),
        2.0
    );
    assert!(node.log().contains("IM login throttled"));
    // No password reached the log.
    assert!(!node.log().contains("wrong"), "{}", node.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_do_not_log_in_are_capped_per_source() {
    let node = Node::start_full("", "", "[login]\npending_per_source = 2");
    let connect = || node.quic_connection();
    // Two connections that say nothing.
    let first = connect().await.unwrap();
    let _second = connect().await.unwrap();
    // The third is refused before its handshake.
    let third = connect().await;
    assert!(third.is_err(), "{third:?}");
    assert_eq!(
        node.metric("parley_im_connections_refused_total{reason=\"pending_per_source\"}"),
        1.0
    );
    // One goes away: a device may connect and log in again.
    first.close(0u32.into(), b"bye");
    let mut logged_in = None;
    for _ in 0..50 {
        if let Ok(d) = Device::connect(node.device_config("alice", "desk")).await {
            logged_in = Some(d);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(logged_in.is_some(), "{}", node.log());
    // A logged-in device no longer counts as pending: another quiet connection fits.
    assert!(connect().await.is_ok());
}
