//! Compiles the relay's eBPF program (`bpf/relay.bpf.c`) with clang when clang can target
//! BPF, and tells the crate whether it did (`cfg(parley_bpf)`): without clang the build
//! still succeeds and the kernel fast path reports itself unavailable at run time.
//!
//! `PARLEY_CLANG` names the compiler (default `clang`); `PARLEY_BPF=off` skips it.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(parley_bpf)");
    println!("cargo::rerun-if-changed=bpf/relay.bpf.c");
    println!("cargo::rerun-if-env-changed=PARLEY_CLANG");
    println!("cargo::rerun-if-env-changed=PARLEY_BPF");
    if std::env::var("PARLEY_BPF").is_ok_and(|v| v == "off") {
        println!("cargo::warning=PARLEY_BPF=off: the relay's kernel fast path is not built");
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("relay.bpf.o");
    let clang = std::env::var("PARLEY_CLANG").unwrap_or_else(|_| "clang".to_owned());
    let arch = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86_64-linux-gnu",
        Ok("aarch64") => "aarch64-linux-gnu",
        _ => "",
    };
    let mut cmd = Command::new(&clang);
    cmd.args(["-O2", "-g", "-target", "bpf", "-Wall"]);
    if !arch.is_empty() {
        // Debian puts <asm/types.h> under the multiarch directory.
        cmd.arg(format!("-I/usr/include/{arch}"));
    }
    cmd.args(["-c", "bpf/relay.bpf.c", "-o"]).arg(&out);
    match cmd.output() {
        Ok(o) if o.status.success() => println!("cargo::rustc-cfg=parley_bpf"),
        Ok(o) => println!(
            "cargo::warning=the relay's eBPF program did not compile ({clang}: {}); the kernel fast path is unavailable",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .next()
                .unwrap_or("no output")
        ),
        Err(e) => println!(
            "cargo::warning=no {clang} ({e}): the relay's kernel fast path is not built (install clang and libbpf-dev)"
        ),
    }
}
