//! `parley-load storm --metrics`: the generator serves its own Prometheus metrics while it
//! runs, and every metric the `parley-load` Grafana dashboard queries is among them. The
//! storm calls its own `--uas` on loopback, so no other peer is needed.

use std::io::{BufRead, Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A free UDP port for the storm's SIP side (its target and its own UAS must agree on it
/// before it starts; the metrics listener binds port 0 and says which it got).
fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn scrape(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

#[test]
fn storm_serves_the_metrics_its_dashboard_uses() {
    let sip = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_parley-load"))
        .args([
            "storm",
            "--target",
            &format!("127.0.0.1:{sip}"),
            "--uas",
            &format!("127.0.0.1:{sip}"),
        ])
        .args([
            "--to",
            "+15550100001",
            "--rate",
            "20",
            "--duration",
            "4s",
            "--hold",
            "200ms",
        ])
        .args(["--metrics", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn parley-load");
    // The port the metrics listener got, from its "metrics on http://ADDR/metrics" line;
    // the rest of stderr is drained so that the storm never blocks on it.
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(addr) = line
                .strip_prefix("metrics on http://")
                .and_then(|r| r.strip_suffix("/metrics"))
                && let Ok(a) = addr.parse::<std::net::SocketAddr>()
            {
                let _ = tx.send(a.port());
            }
        }
    });
    let metrics = rx
        .recv_timeout(Duration::from_secs(15))
        .expect("parley-load says where its metrics are");
    // Scrape while the storm runs: once calls have been answered and ended.
    let deadline = Instant::now() + Duration::from_secs(15);
    let body = loop {
        if let Some(b) = scrape(metrics)
            && b.contains("parley_load_calls_ended_total")
            && b.contains("parley_load_post_dial_delay_seconds_bucket")
        {
            break b;
        }
        assert!(Instant::now() < deadline, "no metrics from the storm");
        std::thread::sleep(Duration::from_millis(200));
    };
    let status = child.wait().expect("wait");
    assert!(status.success(), "storm failed: {status}");

    let attempted: f64 = body
        .lines()
        .find(|l| l.starts_with("parley_load_calls_attempted_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    assert!(attempted >= 1.0, "{body}");
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../grafana/dashboards/parley-load.json"
    ))
    .unwrap();
    let mut used: Vec<&str> = dashboard
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("parley_load_"))
        .collect();
    used.sort_unstable();
    used.dedup();
    assert!(used.len() >= 5, "{used:?}");
    for name in used {
        assert!(
            body.lines().any(|l| l.starts_with(name)),
            "dashboard uses {name}, which the storm does not export:\n{body}"
        );
    }
}
