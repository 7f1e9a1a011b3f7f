//! `parley-load capacity` against a real SIPp UAS: it finds the clean rate by itself,
//! offers multiples of it and reports the goodput, and says so (exit 2) when a target has
//! no clean rate at all.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{free_port_block, free_udp_port, parley_load_bin, scenario, sipp_bin};

struct Sipp(Child);

impl Drop for Sipp {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A SIPp UAS on a free port, with `scenario_args`; returns it and its port.
fn uas(dir: &std::path::Path, scenario_args: &[String]) -> (Sipp, u16) {
    let port = free_udp_port();
    let media = free_port_block(4);
    let child = Command::new(sipp_bin())
        .args(scenario_args)
        .args(["-i", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .args(["-mp", &media.to_string(), "-nostdin", "-timeout", "120s"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sipp uas");
    std::thread::sleep(Duration::from_millis(300));
    (Sipp(child), port)
}

/// Runs `parley-load capacity` with short runs against `port`; (exit code, report JSON,
/// stdout).
fn capacity(dir: &std::path::Path, port: u16, extra: &[&str]) -> (i32, serde_json::Value, String) {
    let json = dir.join("capacity.json");
    let out = Command::new(parley_load_bin())
        .args(["capacity", "--target", &format!("127.0.0.1:{port}")])
        .args(["--to", "+15550100001-+15550100050"])
        .args([
            "--step",
            "2s",
            "--overload-duration",
            "2s",
            "--pause",
            "500ms",
        ])
        .args(extra)
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run parley-load capacity");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let report = std::fs::read_to_string(&json)
        .map(|t| serde_json::from_str(&t).unwrap())
        .unwrap_or_else(|e| {
            panic!(
                "no report ({e}): {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    (out.status.code().unwrap_or(-1), report, stdout)
}

#[test]
fn capacity_searches_up_to_the_maximum_and_measures_goodput_above_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_uas, port) = uas(dir.path(), &["-sn".into(), "uas".into()]);
    let (code, r, out) = capacity(
        dir.path(),
        port,
        &["--start", "20", "--max", "80", "--overload", "1.5,2"],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(r["clean_cps"], 80.0, "{out}");
    assert_eq!(r["reached_max"], true, "{out}");
    let rates: Vec<f64> = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            assert_eq!(s["clean"], true, "{s}");
            assert_eq!(s["failed"], 0, "{s}");
            s["rate_cps"].as_f64().unwrap()
        })
        .collect();
    assert_eq!(rates, [20.0, 40.0, 80.0], "{out}");
    // A SIPp UAS does not tire at 160 calls/s: goodput follows the offered load.
    let overload = r["overload"].as_array().unwrap();
    assert_eq!(overload.len(), 2, "{out}");
    for o in overload {
        let (factor, share) = (
            o["factor"].as_f64().unwrap(),
            o["goodput_of_clean"].as_f64().unwrap(),
        );
        assert!(share >= 0.95 * factor, "{o}");
        assert_eq!(o["run"]["failed"], 0, "{o}");
    }
    assert!(out.contains("clean at 80 calls/s"), "{out}");
}

#[test]
fn a_target_that_refuses_every_call_has_no_clean_rate() {
    let dir = tempfile::tempdir().unwrap();
    let refuse = scenario(dir.path(), "uas_503.xml");
    let (_uas, port) = uas(dir.path(), &["-sf".into(), refuse.display().to_string()]);
    let (code, r, out) = capacity(dir.path(), port, &["--start", "20", "--max", "80"]);
    assert_eq!(code, 2, "{out}");
    assert_eq!(r["clean_cps"], serde_json::Value::Null, "{out}");
    let steps = r["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 1, "{out}");
    assert!(
        steps[0]["failures"]["503"].as_u64().unwrap() > 0,
        "{}",
        steps[0]
    );
    assert!(r["overload"].as_array().unwrap().is_empty(), "{out}");
    assert!(out.contains("no clean rate"), "{out}");
}
