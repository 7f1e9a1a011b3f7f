//! `parley-load`: runs simulated Parley IM devices and SIP call storms from the command
//! line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use parley_codecs::control::ServerMsg;
use parley_load::device::{Device, DeviceConfig, MediaMode, StatsSnapshot};
use parley_load::parse_duration;
use parley_load::plan::{Hold, Numbers};
use parley_load::report::Thresholds;
use parley_load::storm::{self, StormConfig};
use serde::Serialize;

/// Load generator and endpoint simulator for the Parley switch.
#[derive(Debug, Parser)]
#[command(name = "parley-load", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Log in as one IM device and answer, reject, echo or play tones on incoming calls.
    ///
    /// Prints one line per call event and periodic statistics, then a JSON summary on exit
    /// (Ctrl-C, SIGTERM or the end of --duration).
    Device(DeviceArgs),
    /// Place SIP calls as a PSTN gateway (UAC over UDP) at a set rate and report the
    /// answer ratio, setup-time and post-dial-delay percentiles and failures by reason.
    ///
    /// Prints one progress line a second to stderr and a table at the end (and JSON with
    /// --json). Exits 2 when --max-fail-ratio or --max-setup-p99 is exceeded. Ctrl-C stops
    /// new calls and hangs up the answered ones; a second Ctrl-C aborts.
    Storm(StormArgs),
}

/// Options of the `storm` subcommand.
#[derive(Debug, clap::Args)]
struct StormArgs {
    /// The SIP (UDP) address to send INVITEs to.
    #[arg(long)]
    target: SocketAddr,
    /// Numbers to call: one number, a range FIRST-LAST (cycled through), or @FILE with one
    /// number a line.
    #[arg(long, value_parser = Numbers::parse)]
    to: Numbers,
    /// The calling number.
    #[arg(long, default_value = "+15557770001")]
    from: String,
    /// Calls per second (after the ramp).
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Start a linear ramp at this rate (with --ramp-time).
    #[arg(long, requires = "ramp_time")]
    ramp_from: Option<f64>,
    /// Length of the ramp from --ramp-from to --rate (e.g. `30s`).
    #[arg(long, value_parser = parse_duration, requires = "ramp_from")]
    ramp_time: Option<Duration>,
    /// Stop after this many calls.
    #[arg(long)]
    calls: Option<u64>,
    /// Stop starting calls after this long (e.g. `60s`, `10m`).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Calls in progress at most; calls due meanwhile wait, then catch up.
    #[arg(long)]
    max_concurrent: Option<usize>,
    /// Hold time of answered calls before our BYE: DUR, uniform:A-B or exp:MEAN.
    #[arg(long, default_value = "0")]
    hold: Hold,
    /// A call with no final response this long after its INVITE fails as `timeout`.
    #[arg(long, value_parser = parse_duration, default_value = "32s")]
    answer_timeout: Duration,
    /// Send 20 ms PCMU at 50 packets/s on answered calls and measure what is echoed back.
    #[arg(long)]
    media: bool,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Exit 2 when failed/attempts is above this (e.g. `0.01`).
    #[arg(long)]
    max_fail_ratio: Option<f64>,
    /// Exit 2 when the 99th percentile of the setup time is above this (e.g. `200ms`).
    #[arg(long, value_parser = parse_duration)]
    max_setup_p99: Option<Duration>,
    /// Address to bind the SIP socket to.
    #[arg(long, default_value = "127.0.0.1:0")]
    local: SocketAddr,
    /// No progress lines.
    #[arg(long, short)]
    quiet: bool,
}

/// Options of the `device` subcommand.
#[derive(Debug, clap::Args)]
struct DeviceArgs {
    /// The node's QUIC address.
    #[arg(long, default_value = "127.0.0.1:4433")]
    target: SocketAddr,
    /// The node's self-signed certificate (DER), `<data-dir>/quic-cert.der`.
    #[arg(long, default_value = "parley-data/quic-cert.der")]
    cert: PathBuf,
    /// Tenant (enterprise) name.
    #[arg(long, default_value = "demo")]
    tenant: String,
    /// User name within the tenant.
    #[arg(long)]
    user: String,
    /// The user's password (or set PARLEY_PASSWORD).
    #[arg(long, env = "PARLEY_PASSWORD", hide_env_values = true)]
    password: String,
    /// Device name, unique per user.
    #[arg(long, default_value = "parley-load")]
    device: String,
    /// Answer incoming calls after this delay (e.g. `500ms`, `2s`); omit to never answer.
    #[arg(long, value_parser = parse_duration)]
    answer_after: Option<Duration>,
    /// Media on connected calls: `none` (only count), `echo` (send every received RTP
    /// packet back) or `tone` (send a 440 Hz G.711 tone, 50 packets per second).
    #[arg(long, default_value = "echo")]
    media: MediaMode,
    /// Reject every incoming call at once.
    #[arg(long)]
    reject: bool,
    /// Hang up connected calls after this long (e.g. `5s`); omit to let the caller hang up.
    #[arg(long, value_parser = parse_duration)]
    hangup_after: Option<Duration>,
    /// Stop after this long (e.g. `60s`, `2m`); omit to run until Ctrl-C or SIGTERM.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Print a statistics line this often; `0` disables.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    stats_every: Duration,
}

/// The final JSON line.
#[derive(Serialize)]
struct Summary<'a> {
    user: &'a str,
    number: &'a str,
    session: u64,
    elapsed_s: f64,
    end: &'a str,
    #[serde(flatten)]
    stats: StatsSnapshot,
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Device(args) => run_device(args).await.map(|()| ExitCode::SUCCESS),
        Command::Storm(args) => run_storm(args).await,
    }
}

async fn run_storm(args: StormArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = StormConfig::new(args.target, args.to);
    cfg.local = args.local;
    cfg.from = args.from;
    cfg.rate = args.rate;
    cfg.ramp = args.ramp_from.zip(args.ramp_time);
    cfg.calls = args.calls;
    cfg.duration = args.duration;
    cfg.max_concurrent = args.max_concurrent;
    cfg.hold = args.hold;
    cfg.answer_timeout = args.answer_timeout;
    cfg.media = args.media;
    cfg.progress = !args.quiet;
    if cfg.calls.is_none() && cfg.duration.is_none() {
        eprintln!("no --calls or --duration: running until Ctrl-C");
    }
    let thresholds = Thresholds {
        max_fail_ratio: args.max_fail_ratio,
        max_setup_p99: args.max_setup_p99,
    };

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let signals = tokio::spawn(async move {
        let sig = shutdown_signal().await;
        eprintln!("{sig}: no new calls, hanging up; again to abort");
        let _ = stop_tx.send(());
        let sig = shutdown_signal().await;
        eprintln!("{sig}: aborted");
        std::process::exit(130);
    });
    let report = storm::run_until(cfg, async {
        if stop_rx.await.is_err() {
            // The signal task is gone without a signal: never stop on that.
            std::future::pending::<()>().await;
        }
    })
    .await;
    signals.abort();
    let report = report?;

    println!("{report}");
    if let Some(path) = &args.json {
        std::fs::write(path, report.to_json()?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let violations = report.check(&thresholds);
    for v in &violations {
        eprintln!("FAIL: {v}");
    }
    Ok(if violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

async fn run_device(args: DeviceArgs) -> anyhow::Result<()> {
    let cert_der = std::fs::read(&args.cert)
        .with_context(|| format!("reading certificate {}", args.cert.display()))?;
    let mut dev = Device::connect(DeviceConfig {
        target: args.target,
        cert_der,
        tenant: args.tenant.clone(),
        user: args.user.clone(),
        password: args.password.clone(),
        device: args.device.clone(),
        answer_after: args.answer_after,
        reject: args.reject,
        hangup_after: args.hangup_after,
        media: args.media,
    })
    .await
    .with_context(|| format!("logging in to {} as {}", args.target, args.user))?;
    println!(
        "logged in as {} ({}), session {}",
        args.user,
        dev.number(),
        dev.session()
    );

    let started = tokio::time::Instant::now();
    let stop_at = args.duration.map(|d| started + d);
    let stop = async {
        match stop_at {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stop);
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let mut stats_tick = (!args.stats_every.is_zero()).then(|| {
        let mut i = tokio::time::interval_at(started + args.stats_every, args.stats_every);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        i
    });
    let stats = dev.stats();

    let end = loop {
        tokio::select! {
            () = &mut stop => break "duration",
            sig = &mut signal => break sig,
            _ = async {
                match stats_tick.as_mut() {
                    Some(t) => t.tick().await,
                    None => std::future::pending().await,
                }
            } => println!("stats {}", stats.snapshot()),
            ev = dev.next_event(Duration::from_secs(3600)) => match ev {
                Some(msg) => print_event(&msg),
                None if dev.events_closed() => {
                    match dev.close_reason() {
                        Some(reason) => println!("connection closed: {reason}"),
                        None => println!("control stream closed"),
                    }
                    break "closed";
                }
                None => {}
            },
        }
    };

    let summary = Summary {
        user: &args.user,
        number: dev.number(),
        session: dev.session(),
        elapsed_s: started.elapsed().as_secs_f64(),
        end,
        stats: stats.snapshot(),
    };
    println!("{}", serde_json::to_string(&summary)?);
    dev.close();
    if end == "closed" {
        anyhow::bail!("the node closed the connection");
    }
    Ok(())
}

fn print_event(msg: &ServerMsg) {
    match msg {
        ServerMsg::IncomingCall {
            call_id,
            from,
            from_name,
            to,
        } => match from_name {
            Some(name) => println!("incoming call {call_id} from {name} <{from}> to {to}"),
            None => println!("incoming call {call_id} from {from} to {to}"),
        },
        ServerMsg::CallConnected {
            call_id,
            flow_id,
            payload_type,
        } => println!("connected {call_id} flow {flow_id} payload type {payload_type}"),
        ServerMsg::CallEnded { call_id, reason } => println!("ended {call_id} ({reason})"),
        ServerMsg::AddressBook { entries } => {
            println!("address book: {} entries", entries.len());
        }
        ServerMsg::Error {
            code,
            message,
            fatal,
        } => println!(
            "error {code}: {message}{}",
            if *fatal { " (fatal)" } else { "" }
        ),
        ServerMsg::LoginOk { .. } | ServerMsg::Pong { .. } => {}
        // Messages the device does not act on (presence of watched users, chat, …).
        other => println!("{other:?}"),
    }
}

/// Resolves with the name of the signal that asked us to stop.
async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "interrupt",
                _ = term.recv() => "terminate",
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                "interrupt"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "interrupt"
    }
}
