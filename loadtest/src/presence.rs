//! Presence fan-out load: every user's device changes presence at a steady total rate and
//! each user is watched by a fixed number of other users' devices; the watchers measure
//! delivery and latency (the send time rides in the presence note).
//!
//! Subscriptions form a ring: user *i* watches users *i+1* … *i+w* (mod *n*), so every user
//! has exactly *w* watchers. Each update therefore fans out to *w* devices.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use parley_codecs::control::{ClientMsg, ServerMsg, Status};
use serde::Serialize;
use tokio::sync::Mutex;

use crate::device::{Device, DeviceConfig, DeviceError, MediaMode};

/// What to run.
#[derive(Debug, Clone)]
pub struct PresenceConfig {
    /// The node's QUIC address.
    pub target: std::net::SocketAddr,
    /// The node's certificate (DER).
    pub cert_der: Vec<u8>,
    /// Tenant of all users.
    pub tenant: String,
    /// Password of all users.
    pub password: String,
    /// User names (one device each).
    pub users: Vec<String>,
    /// Watchers per user (< number of users).
    pub watchers: usize,
    /// Presence updates per second, all users together.
    pub rate: f64,
    /// How long to send updates.
    pub duration: Duration,
}

/// What happened.
#[derive(Debug, Clone, Serialize)]
pub struct PresenceReport {
    /// Users (devices).
    pub users: usize,
    /// Watchers per user.
    pub watchers: usize,
    /// Presence updates sent by devices.
    pub updates_sent: u64,
    /// Updates watchers should have received (sent × watchers).
    pub expected: u64,
    /// Updates watchers did receive.
    pub delivered: u64,
    /// Seconds updates were sent for.
    pub elapsed_s: f64,
    /// Updates sent per second.
    pub sent_per_s: f64,
    /// Updates delivered to watchers per second.
    pub delivered_per_s: f64,
    /// Update to watcher delivery latency, ms: p50, p99, max.
    pub latency_ms: [f64; 3],
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Runs the load; devices log in first (not timed).
pub async fn run(cfg: PresenceConfig) -> Result<PresenceReport, DeviceError> {
    let n = cfg.users.len();
    if n < 2 || cfg.watchers == 0 || cfg.watchers >= n {
        return Err(DeviceError::Protocol(format!(
            "need at least 2 users and 1..{} watchers",
            n.saturating_sub(1)
        )));
    }
    let mut devices = Vec::with_capacity(n);
    for u in &cfg.users {
        let d = Device::connect(DeviceConfig {
            target: cfg.target,
            cert_der: cfg.cert_der.clone(),
            tenant: cfg.tenant.clone(),
            user: u.clone(),
            password: cfg.password.clone(),
            device: "bench".into(),
            answer_after: None,
            reject: false,
            hangup_after: None,
            media: MediaMode::None,
        })
        .await?;
        devices.push(d);
    }
    for (i, d) in devices.iter().enumerate() {
        let users = (1..=cfg.watchers)
            .map(|k| cfg.users[(i + k) % n].clone())
            .collect();
        d.send(ClientMsg::Subscribe { users }).await?;
    }
    // Let the initial presence_update of every subscription arrive, then start counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let delivered = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
            .map_err(|e| DeviceError::Protocol(e.to_string()))?,
    ));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut senders = Vec::new();
    let mut readers = Vec::new();
    for mut d in devices {
        let (delivered, hist, stop) = (delivered.clone(), hist.clone(), stop.clone());
        // Drain queued events (initial updates) without counting them.
        while d.next_event(Duration::from_millis(1)).await.is_some() {}
        let (tx, mut rx) = tokio::sync::mpsc::channel::<ClientMsg>(1024);
        senders.push(tx);
        readers.push(tokio::spawn(async move {
            let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok();
            loop {
                tokio::select! {
                    msg = rx.recv() => match msg {
                        Some(m) => { let _ = d.send(m).await; }
                        None => break,
                    },
                    ev = d.next_event(Duration::from_millis(200)) => {
                        if let Some(ServerMsg::PresenceUpdate { note: Some(ref note), .. }) = ev
                            && let Ok(sent) = note.parse::<u64>()
                        {
                            delivered.fetch_add(1, Ordering::Relaxed);
                            if let Some(h) = local.as_mut() {
                                let _ = h.record(now_us().saturating_sub(sent).max(1));
                            }
                        } else if ev.is_none() && stop.load(Ordering::Relaxed) {
                            break;
                        }
                    }
                }
            }
            if let Some(l) = local {
                let _ = hist.lock().await.add(&l);
            }
            d
        }));
    }
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / cfg.rate.max(0.1));
    let mut next = tokio::time::Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < cfg.duration {
        let i = (sent as usize) % n;
        let status = if (sent / n as u64).is_multiple_of(2) {
            Status::Busy
        } else {
            Status::Available
        };
        let msg = ClientMsg::Presence {
            status,
            idle_ms: 0,
            note: Some(now_us().to_string()),
        };
        if senders[i].try_send(msg).is_ok() {
            sent += 1;
        }
        next += interval;
        tokio::time::sleep_until(next).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Give in-flight updates time to arrive.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    drop(senders);
    for r in readers {
        let _ = r.await;
    }
    let h = hist.lock().await;
    let got = delivered.load(Ordering::Relaxed);
    Ok(PresenceReport {
        users: n,
        watchers: cfg.watchers,
        updates_sent: sent,
        expected: sent * cfg.watchers as u64,
        delivered: got,
        elapsed_s: elapsed,
        sent_per_s: sent as f64 / elapsed,
        delivered_per_s: got as f64 / elapsed,
        latency_ms: [
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.max() as f64 / 1000.0,
        ],
    })
}
