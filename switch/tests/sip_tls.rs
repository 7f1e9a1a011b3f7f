//! SIP over TLS against a real TLS peer (Debian's SIPp has no TLS): baresip, auto-answering
//! behind a trunk reached over TLS, and dialling the node's TLS listener as a gateway.
//! Certificates are made for the test (rcgen); each side verifies the other's.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Node, free_udp_port, sipp_uac};

/// A self-signed certificate for 127.0.0.1: (certificate PEM, key PEM).
fn pair() -> (String, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    (ck.cert.pem(), ck.signing_key.serialize_pem())
}

fn baresip_bin() -> &'static str {
    assert!(
        Command::new("baresip")
            .arg("-h")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok(),
        "baresip is required for this test (Debian package baresip; .ci/test installs it)"
    );
    "baresip"
}

/// A headless baresip in `dir`: SIP on `port` (TLS on `port + 1`), auto-answering, its
/// account `user`, its certificate `combined` (cert + key PEM), trusting `ca`; runs
/// `commands`, quits after `secs`.
struct Baresip(Child, PathBuf);

impl Baresip {
    fn start(
        dir: &Path,
        user: &str,
        port: u16,
        (combined, ca): (&Path, &Path),
        commands: &[&str],
        secs: u32,
    ) -> Baresip {
        let cfg = dir.join("baresip");
        std::fs::create_dir_all(&cfg).unwrap();
        let wav = dir.join("tone.wav");
        write_wav(&wav);
        std::fs::write(
            cfg.join("config"),
            format!(
                "sip_listen 127.0.0.1:{port}\nsip_certificate {}\nsip_cafile {}\n\
                 net_interface 127.0.0.1\nmodule_path /usr/lib/baresip/modules\n\
                 module g711.so\nmodule aufile.so\nmodule account.so\nmodule menu.so\n\
                 audio_source aufile,{}\naudio_player aufile,{}\naudio_alert aufile,/dev/null\n\
                 rtp_ports 41000-41999\n",
                combined.display(),
                ca.display(),
                wav.display(),
                dir.join("rx.wav").display()
            ),
        )
        .unwrap();
        std::fs::write(
            cfg.join("accounts"),
            format!("<sip:{user}@127.0.0.1:{port};transport=tls>;regint=0;answermode=auto;audio_codecs=PCMU\n"),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("baresip.log")).unwrap();
        let mut cmd = Command::new(baresip_bin());
        cmd.arg("-f").arg(&cfg).args(["-t", &secs.to_string()]);
        for c in commands {
            cmd.args(["-e", c]);
        }
        let child = cmd
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn baresip");
        std::thread::sleep(Duration::from_millis(800));
        Baresip(child, dir.join("baresip.log"))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }

    fn wait(&mut self) {
        let _ = self.0.wait();
    }
}

impl Drop for Baresip {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Ten seconds of a 440 Hz tone, 8 kHz 16-bit mono WAV (baresip's aufile source).
fn write_wav(path: &Path) {
    let samples: Vec<i16> = (0..80_000)
        .map(|i| ((i as f64 * 440.0 * 2.0 * std::f64::consts::PI / 8000.0).sin() * 8000.0) as i16)
        .collect();
    let data_len = (samples.len() * 2) as u32;
    let mut w = Vec::new();
    w.extend_from_slice(b"RIFF");
    w.extend_from_slice(&(36 + data_len).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&8000u32.to_le_bytes());
    w.extend_from_slice(&16000u32.to_le_bytes());
    w.extend_from_slice(&2u16.to_le_bytes());
    w.extend_from_slice(&16u16.to_le_bytes());
    w.extend_from_slice(b"data");
    w.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        w.extend_from_slice(&s.to_le_bytes());
    }
    std::fs::write(path, w).unwrap();
}

/// Certificates for the node and for baresip, written into `dir`.
struct Certs {
    node_cert: PathBuf,
    node_key: PathBuf,
    peer_combined: PathBuf,
    peer_cert: PathBuf,
}

fn certs(dir: &Path) -> Certs {
    let (nc, nk) = pair();
    let (pc, pk) = pair();
    let c = Certs {
        node_cert: dir.join("node-cert.pem"),
        node_key: dir.join("node-key.pem"),
        peer_combined: dir.join("peer.pem"),
        peer_cert: dir.join("peer-cert.pem"),
    };
    std::fs::write(&c.node_cert, nc).unwrap();
    std::fs::write(&c.node_key, nk).unwrap();
    std::fs::write(&c.peer_combined, format!("{pc}{pk}")).unwrap();
    std::fs::write(&c.peer_cert, pc).unwrap();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trunk_over_tls_answers_a_call_and_hangs_up_over_the_same_connection() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path());
    let port = free_udp_port();
    let node = Node::start_full(
        &format!(
            "tls_listen = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"",
            c.node_cert.display(),
            c.node_key.display()
        ),
        &format!(
            "probe_interval_ms = 0\n\
             [[trunks]]\nname = \"tls\"\naddress = \"127.0.0.1:{}\"\ntransport = \"tls\"\ntls_ca = \"{}\"\nprobe_interval_ms = 0\npriority = 0",
            port + 1,
            c.peer_cert.display()
        ),
        "",
    );
    // The trunk's far end answers as alice's PSTN line.
    let peer = Baresip::start(
        dir.path(),
        "+15550100001",
        port,
        (&c.peer_combined, &c.node_cert),
        &[],
        20,
    );
    let run = sipp_uac(
        &node,
        &["-sn", "uac"],
        "+15550100001",
        1,
        1,
        &["-d", "2000"],
    )
    .await;
    assert_eq!(
        (run.code, run.successful),
        (0, 1),
        "{}\n{}\n{}",
        run.output,
        node.log(),
        peer.log()
    );
    let cdrs = node.wait_cdrs(1);
    let cdr = &cdrs[0];
    assert_eq!(cdr["disposition"], "ANSWERED", "{cdr}\n{}", peer.log());
    assert_eq!(cdr["answered_by"], "tls", "{cdr}");
    assert!(cdr["duration_secs"].as_f64().unwrap() >= 1.5, "{cdr}");
    assert!(peer.log().contains("127.0.0.1"), "{}", peer.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_dialling_over_tls_reaches_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path());
    let node = Node::start_with(&format!(
        "tls_listen = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"",
        c.node_cert.display(),
        c.node_key.display()
    ));
    let tls = node.sip_tls.expect("TLS listener");
    let mut cfg = node.device_config("alice", "desk");
    cfg.hangup_after = None;
    let device = node.device(cfg).await;
    let mut peer = Baresip::start(
        dir.path(),
        "+15557770009",
        free_udp_port(),
        (&c.peer_combined, &c.node_cert),
        &[&format!("/dial sip:+15550100001@{tls}")],
        5,
    );
    peer.wait();
    let cdrs = node.wait_cdrs(1);
    assert_eq!(cdrs.len(), 1, "{}\n{}", node.log(), peer.log());
    let cdr = &cdrs[0];
    assert_eq!(
        cdr["disposition"],
        "ANSWERED",
        "{cdr}\n{}\n{}",
        node.log(),
        peer.log()
    );
    assert_eq!(cdr["route"], "im");
    assert_eq!(device.stats().snapshot().calls_connected, 1);
    assert!(
        node.metric("parley_sip_connections_closed_total{transport=\"tls\",reason=\"handshake\"}")
            == 0.0
    );
}
