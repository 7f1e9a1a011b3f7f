//! `parley-load`: runs simulated Parley IM devices and SIP call storms from the command
//! line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use parley_codecs::control::ServerMsg;
use parley_load::device::{Device, DeviceConfig, MediaMode, StatsSnapshot};
use parley_load::fleet::{FleetConfig, parse_users};
use parley_load::parse_duration;
use parley_load::plan::{Hold, Numbers};
use parley_load::replay::Script;
use parley_load::report::Thresholds;
use parley_load::scenario::Scenario;
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
    Device(Box<DeviceArgs>),
    /// Place SIP calls as a PSTN gateway (UAC over UDP) at a set rate and report the
    /// answer ratio, setup-time and post-dial-delay percentiles and failures by reason.
    ///
    /// Prints one progress line a second to stderr and a table at the end (and JSON with
    /// --json). Exits 2 when --max-fail-ratio or --max-setup-p99 is exceeded. Ctrl-C stops
    /// new calls and hangs up the answered ones; a second Ctrl-C aborts.
    Storm(Box<StormArgs>),
    /// Find a SIP target's highest clean call rate, then offer 1.5x, 2x and 4x of it and
    /// print the goodput curve.
    ///
    /// Doubles the rate from --start while runs of --step are clean (under 0.1% failed,
    /// every call finished within --tail of the last INVITE, the generator kept up), then
    /// bisects to --precision; then offers each --overload multiple of the clean rate for
    /// --overload-duration (goodput, setup p99, retransmissions), and last the clean rate
    /// once more (did the target recover?). Works against any switch that answers SIP over
    /// UDP. Exits 2 when not even --start is clean.
    Capacity(Box<CapacityArgs>),
    /// Replay a CDR file (Parley CSV or Asterisk Master.csv) as a storm: each recorded call
    /// placed at its recorded time, to its recorded number, held for its billed time,
    /// gaps and holds divided by --speed.
    ///
    /// Prints the same report as `storm`; exits 2 when --max-fail-ratio is exceeded.
    Replay(Box<ReplayArgs>),
    /// Presence fan-out load: N users (one device each, all with the same password), each
    /// watched by W others; devices change presence at --rate updates/s in total and the
    /// watchers measure delivery and latency. Prints a JSON report.
    Presence(Box<PresenceArgs>),
}

/// Options of the `presence` subcommand.
#[derive(Debug, clap::Args)]
struct PresenceArgs {
    /// The node's QUIC address.
    #[arg(long, default_value = "127.0.0.1:4433")]
    target: SocketAddr,
    /// The node's certificate (DER).
    #[arg(long, default_value = "parley-data/quic-cert.der")]
    cert: PathBuf,
    /// Tenant of the users.
    #[arg(long, default_value = "demo")]
    tenant: String,
    /// Users as a pattern with a range, e.g. `user%d:1-50`.
    #[arg(long)]
    users: String,
    /// Password of every user (or set PARLEY_PASSWORD).
    #[arg(long, env = "PARLEY_PASSWORD", hide_env_values = true)]
    password: String,
    /// Watchers per user.
    #[arg(long, default_value_t = 20)]
    watchers: usize,
    /// Presence updates per second, all users together.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// How long to send updates (e.g. `10s`).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    duration: Duration,
}

/// Options of the `replay` subcommand.
#[derive(Debug, clap::Args)]
struct ReplayArgs {
    /// The CDR file: Parley CSV (with a header) or Asterisk Master.csv (without).
    file: PathBuf,
    /// Speed-up: inter-arrival gaps and hold times are divided by this.
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// The SIP (UDP) address to send INVITEs to.
    #[arg(long)]
    target: SocketAddr,
    /// The calling number.
    #[arg(long, default_value = "+15557770001")]
    from: String,
    /// Calls in progress at most; calls due meanwhile wait, then catch up.
    #[arg(long)]
    max_concurrent: Option<usize>,
    /// A call with no final response this long after its INVITE fails as `timeout`.
    #[arg(long, value_parser = parse_duration, default_value = "32s")]
    answer_timeout: Duration,
    /// Send 20 ms PCMU on answered calls and measure what is echoed back.
    #[arg(long)]
    media: bool,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Exit 2 when failed/attempts is above this.
    #[arg(long)]
    max_fail_ratio: Option<f64>,
    /// Address to bind the SIP socket to.
    #[arg(long, default_value = "127.0.0.1:0")]
    local: SocketAddr,
    /// No progress lines.
    #[arg(long, short)]
    quiet: bool,
}

/// Options of the `storm` subcommand.
#[derive(Debug, clap::Args)]
struct StormArgs {
    /// Read these options from a TOML file (keys named as the flags, with underscores);
    /// flags given here override it.
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Also play the PSTN trunk: a SIP UAS on this address answers every INVITE (PCMU,
    /// media echoed), e.g. `127.0.0.1:5080` for a demo node's `pstn` trunk.
    #[arg(long)]
    uas: Option<SocketAddr>,
    /// With --uas: time from INVITE to 200 OK.
    #[arg(long, value_parser = parse_duration, default_value = "0")]
    uas_answer_after: Duration,
    /// With --uas: share of INVITEs refused 486 Busy Here.
    #[arg(long, default_value_t = 0.0)]
    uas_reject_ratio: f64,
    /// Serve the generator's own metrics (Prometheus text) at http://ADDR/metrics while the
    /// storm runs (calls attempted/answered/ended, in progress, setup and post-dial delay
    /// histograms); `grafana/dashboards/parley-load.json` shows them live.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// The SIP (UDP) address to send INVITEs to (required, here or in --scenario).
    #[arg(long)]
    target: Option<SocketAddr>,
    /// More SIP addresses (comma-separated or repeated): calls are spread round robin over
    /// --target and these, e.g. the nodes of a Parley cluster. The report counts them
    /// together.
    #[arg(long, value_delimiter = ',')]
    also_target: Vec<SocketAddr>,
    /// Numbers to call: one number, a range FIRST-LAST (cycled through), or @FILE with one
    /// number a line (required, here or in --scenario).
    #[arg(long, value_parser = Numbers::parse)]
    to: Option<Numbers>,
    /// The calling number.
    #[arg(long, default_value = "+15557770001")]
    from: String,
    /// Calls per second (after the ramp).
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Start a linear ramp at this rate (with --ramp-time).
    #[arg(long)]
    ramp_from: Option<f64>,
    /// Length of the ramp from --ramp-from to --rate (e.g. `30s`).
    #[arg(long, value_parser = parse_duration)]
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
    /// Log in IM devices over QUIC for the storm's callees: `alice,bob` or
    /// `PATTERN:FIRST-LAST` with `%d` in the pattern (`user%d:1-50`).
    #[arg(long, value_parser = |s: &str| parse_users(s).map(Users))]
    devices: Option<Users>,
    /// The devices' password (or set PARLEY_PASSWORD).
    #[arg(
        long,
        env = "PARLEY_PASSWORD",
        hide_env_values = true,
        requires = "devices"
    )]
    password: Option<String>,
    /// Tenant of the devices' users.
    #[arg(long, default_value = "demo")]
    tenant: String,
    /// The node's QUIC address, for --devices.
    #[arg(long, default_value = "127.0.0.1:4433")]
    quic: SocketAddr,
    /// The node's certificate (DER), for --devices.
    #[arg(long, default_value = "parley-data/quic-cert.der")]
    cert: PathBuf,
    /// The devices answer this long after `incoming_call`.
    #[arg(long, value_parser = parse_duration, default_value = "0")]
    answer_after: Duration,
    /// Share of calls the devices reject (the caller gets 603), 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    reject_ratio: f64,
    /// Share of calls moved, while they ring, to the user's second device by presence
    /// changes (two devices per user when above 0), 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    churn_ratio: f64,
}

/// The users of `--devices` (a newtype, so that clap takes one value, not many).
#[derive(Debug, Clone)]
struct Users(Vec<String>);

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
    /// Send each line of standard input as a control message (JSON, as in
    /// docs/protocol.md, with an optional request `id`), e.g.
    /// `{"type":"chat","to":"bob","text":"hi","id":1}` or
    /// `{"type":"chat_history","with":"bob","limit":20,"id":2}`.
    #[arg(long)]
    stdin: bool,
    /// Send `chat_read` for every chat received (the sender gets read receipts).
    #[arg(long)]
    mark_read: bool,
}

/// Options of the `capacity` subcommand.
#[derive(Debug, Parser)]
struct CapacityArgs {
    /// The SIP (UDP) address to send INVITEs to.
    #[arg(long)]
    target: SocketAddr,
    /// Numbers to call: one number, a range FIRST-LAST (cycled through), or @FILE.
    #[arg(long, value_parser = Numbers::parse)]
    to: Numbers,
    /// The calling number.
    #[arg(long, default_value = "+15557770001")]
    from: String,
    /// First rate tried, calls per second.
    #[arg(long, default_value_t = 100.0)]
    start: f64,
    /// Highest rate tried.
    #[arg(long, default_value_t = 10_000.0)]
    max: f64,
    /// Length of each search run (e.g. `10s`).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    step: Duration,
    /// Stop bisecting when the unclean rate is within this share of the clean one.
    #[arg(long, default_value_t = 0.05)]
    precision: f64,
    /// Multiples of the clean rate to offer afterwards, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1.5,2,4")]
    overload: Vec<f64>,
    /// Length of each overload run.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    overload_duration: Duration,
    /// How long after the last INVITE the last call may end in a clean run (raise it
    /// above --hold).
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    tail: Duration,
    /// Pause between runs.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    pause: Duration,
    /// Hold time of answered calls: DUR, uniform:A-B or exp:MEAN.
    #[arg(long, default_value = "0")]
    hold: Hold,
    /// A call with no final response this long after its INVITE fails as `timeout`.
    #[arg(long, value_parser = parse_duration, default_value = "32s")]
    answer_timeout: Duration,
    /// Calls in progress at most.
    #[arg(long)]
    max_concurrent: Option<usize>,
    /// Address to bind the SIP socket to.
    #[arg(long, default_value = "127.0.0.1:0")]
    local: SocketAddr,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
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
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::Device(args) => run_device(*args).await.map(|()| ExitCode::SUCCESS),
        Command::Capacity(args) => run_capacity(*args).await,
        Command::Storm(mut args) => {
            if let (Some(path), Some(m)) = (&args.scenario, matches.subcommand_matches("storm")) {
                let sc = Scenario::from_file(path)
                    .with_context(|| format!("scenario {}", path.display()))?;
                args.apply(sc, m);
            }
            run_storm(*args).await
        }
        Command::Replay(args) => run_replay(*args).await,
        Command::Presence(args) => run_presence(*args).await.map(|()| ExitCode::SUCCESS),
    }
}

async fn run_presence(a: PresenceArgs) -> anyhow::Result<()> {
    let (pattern, range) = a
        .users
        .split_once(':')
        .context("--users must look like user%d:1-50")?;
    let (lo, hi) = range
        .split_once('-')
        .context("--users range must be FIRST-LAST")?;
    let (lo, hi): (u32, u32) = (lo.parse()?, hi.parse()?);
    anyhow::ensure!(
        lo <= hi && hi - lo < 10_000,
        "--users range must be FIRST-LAST with at most 10000 users"
    );
    let users = (lo..=hi)
        .map(|i| pattern.replace("%d", &i.to_string()))
        .collect();
    let cert_der =
        std::fs::read(&a.cert).with_context(|| format!("reading {}", a.cert.display()))?;
    let report = parley_load::presence::run(parley_load::presence::PresenceConfig {
        target: a.target,
        cert_der,
        tenant: a.tenant,
        password: a.password,
        users,
        watchers: a.watchers,
        rate: a.rate,
        duration: a.duration,
    })
    .await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

impl StormArgs {
    /// Takes the scenario's value of every option not given on the command line (or in
    /// the environment).
    fn apply(&mut self, sc: Scenario, m: &ArgMatches) {
        let given = |id: &str| {
            matches!(
                m.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        };
        macro_rules! take {
            // Options that are `Option`s here too.
            (opt $($f:ident),*) => {$(
                if !given(stringify!($f)) && sc.$f.is_some() {
                    self.$f = sc.$f;
                }
            )*};
            // Options with a default.
            (val $($f:ident),*) => {$(
                if !given(stringify!($f)) && let Some(v) = sc.$f {
                    self.$f = v;
                }
            )*};
        }
        take!(opt target, to, ramp_from, ramp_time, calls, duration, max_concurrent, json,
            max_fail_ratio, max_setup_p99, password);
        take!(val from, rate, hold, answer_timeout, media, local, quiet, tenant, quic, cert,
            answer_after, reject_ratio, churn_ratio);
        if !given("devices") && sc.devices.is_some() {
            self.devices = sc.devices.map(Users);
        }
    }
}

/// Serves the generator's own metrics (Prometheus text) on `addr` while the storm runs.
async fn serve_metrics(addr: SocketAddr) -> anyhow::Result<()> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ],
        )?
        .install_recorder()?;
    parley_load::report::m::describe();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--metrics {addr}"))?;
    eprintln!("metrics on http://{}/metrics", listener.local_addr()?);
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut conn, _)) = listener.accept().await {
            let body = handle.render();
            tokio::spawn(async move {
                let mut req = [0u8; 1024];
                let _ = conn.read(&mut req).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(head.as_bytes()).await;
                let _ = conn.write_all(body.as_bytes()).await;
            });
        }
    });
    Ok(())
}

async fn run_storm(args: StormArgs) -> anyhow::Result<ExitCode> {
    if let Some(addr) = args.metrics {
        serve_metrics(addr).await?;
    }
    let target = args
        .target
        .context("no target: give --target or `target` in the scenario")?;
    let to = args
        .to
        .context("no numbers to call: give --to or `to` in the scenario")?;
    anyhow::ensure!(
        args.ramp_from.is_some() == args.ramp_time.is_some(),
        "a ramp needs both --ramp-from and --ramp-time"
    );
    let devices_only = [
        ("--reject-ratio", args.reject_ratio != 0.0),
        ("--churn-ratio", args.churn_ratio != 0.0),
    ];
    if args.devices.is_none()
        && let Some((flag, _)) = devices_only.iter().find(|(_, set)| *set)
    {
        anyhow::bail!("{flag} needs --devices");
    }
    let mut cfg = StormConfig::new(target, to);
    cfg.also_targets = args.also_target;
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
    cfg.uas = args.uas.map(|listen| parley_load::sip_uas::UasConfig {
        listen,
        answer_after: args.uas_answer_after,
        reject_ratio: args.uas_reject_ratio,
    });
    cfg.progress = !args.quiet;
    if let Some(Users(users)) = args.devices {
        let cert_der = std::fs::read(&args.cert)
            .with_context(|| format!("reading certificate {}", args.cert.display()))?;
        let password = args
            .password
            .context("--devices needs --password (or PARLEY_PASSWORD)")?;
        let mut fleet = FleetConfig::new(args.quic, cert_der, users, &password);
        fleet.tenant = args.tenant;
        fleet.answer_after = args.answer_after;
        fleet.reject_ratio = args.reject_ratio;
        fleet.churn_ratio = args.churn_ratio;
        cfg.devices = Some(fleet);
    }
    if cfg.calls.is_none() && cfg.duration.is_none() {
        eprintln!("no --calls or --duration: running until Ctrl-C");
    }
    let thresholds = Thresholds {
        max_fail_ratio: args.max_fail_ratio,
        max_setup_p99: args.max_setup_p99,
    };

    finish_storm(cfg, thresholds, args.json.as_deref()).await
}

async fn run_replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let (script, layout) = Script::from_file(&args.file, args.speed)?;
    let first_to_last = script.calls.last().map(|c| c.offset).unwrap_or_default();
    eprintln!(
        "replaying {} calls from {} ({layout:?} layout) over {:.1} s",
        script.calls.len(),
        args.file.display(),
        first_to_last.as_secs_f64()
    );
    let mut cfg = StormConfig::new(args.target, script.numbers());
    cfg.local = args.local;
    cfg.from = args.from;
    // The average arrival rate, for the report only: the script says when calls start.
    cfg.rate = if first_to_last.is_zero() {
        script.calls.len() as f64
    } else {
        script.calls.len().saturating_sub(1).max(1) as f64 / first_to_last.as_secs_f64()
    };
    cfg.max_concurrent = args.max_concurrent;
    cfg.answer_timeout = args.answer_timeout;
    cfg.media = args.media;
    cfg.progress = !args.quiet;
    cfg.script = Some(Arc::new(script));
    let thresholds = Thresholds {
        max_fail_ratio: args.max_fail_ratio,
        max_setup_p99: None,
    };
    finish_storm(cfg, thresholds, args.json.as_deref()).await
}

/// Runs a configured storm with Ctrl-C handling, prints its report, writes the JSON and
/// checks the thresholds.
async fn finish_storm(
    cfg: StormConfig,
    thresholds: Thresholds,
    json: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
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
    if let Some(path) = json {
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

async fn run_capacity(args: CapacityArgs) -> anyhow::Result<ExitCode> {
    let mut base = StormConfig::new(args.target, args.to);
    base.local = args.local;
    base.from = args.from;
    base.hold = args.hold;
    base.answer_timeout = args.answer_timeout;
    base.max_concurrent = args.max_concurrent;
    let mut cfg = parley_load::capacity::CapacityConfig::new(base);
    cfg.start = args.start;
    cfg.max = args.max;
    cfg.step = args.step;
    cfg.precision = args.precision;
    cfg.overload = args.overload;
    cfg.overload_duration = args.overload_duration;
    cfg.tail = args.tail;
    cfg.pause = args.pause;
    let report = parley_load::capacity::run(&cfg, |phase, s| {
        eprintln!(
            "{phase}: {:.0} calls/s: {} attempts, {} failed, tail {:.1} s: {}",
            s.rate_cps,
            s.attempts,
            s.failed,
            s.tail_s,
            s.why.as_deref().unwrap_or("clean")
        );
    })
    .await?;
    print!("{report}");
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(if report.clean_cps.is_some() {
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
    let mut lines = args
        .stdin
        .then(|| tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(tokio::io::stdin())));

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
            line = async {
                match lines.as_mut() {
                    Some(l) => l.next_line().await,
                    None => std::future::pending().await,
                }
            } => match line {
                Ok(Some(line)) if line.trim().is_empty() => {}
                Ok(Some(line)) => match parley_codecs::control::decode_request(line.as_bytes()) {
                    (Ok(msg), Some(id)) => dev.send_request(msg, id).await?,
                    (Ok(msg), None) => dev.send(msg).await?,
                    (Err(e), _) => eprintln!("not a control message ({e}): {line}"),
                },
                // End of input: keep running (calls, chats) until the usual stop.
                Ok(None) | Err(_) => lines = None,
            },
            ev = dev.next_event(Duration::from_secs(3600)) => match ev {
                Some(msg) => {
                    print_event(&msg);
                    if let ServerMsg::Chat { id, own: false, .. } = &msg
                        && args.mark_read
                    {
                        dev.send(parley_codecs::control::ClientMsg::ChatRead { message: *id }).await?;
                    }
                }
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
            ..
        } => match from_name {
            Some(name) => println!("incoming call {call_id} from {name} <{from}> to {to}"),
            None => println!("incoming call {call_id} from {from} to {to}"),
        },
        ServerMsg::CallConnected {
            call_id,
            flow_id,
            payload_type,
            ..
        } => println!("connected {call_id} flow {flow_id} payload type {payload_type}"),
        ServerMsg::CallEnded { call_id, reason } => println!("ended {call_id} ({reason})"),
        ServerMsg::AddressBook {
            entries,
            offset,
            total,
        } => {
            println!(
                "address book: entries {}-{} of {total}",
                offset + 1,
                offset + entries.len() as u64
            );
        }
        ServerMsg::AddressBookUpdate { entries, removed } => {
            for e in entries {
                println!(
                    "address book: {} ({}) calls {}{}",
                    e.address,
                    e.name.as_deref().unwrap_or("-"),
                    e.call_count,
                    if e.known { ", known" } else { "" }
                );
            }
            for a in removed {
                println!("address book: {a} removed");
            }
        }
        ServerMsg::Error {
            code,
            message,
            fatal,
            id,
        } => println!(
            "error {code}: {message}{}{}",
            id.map(|i| format!(" (request {i})")).unwrap_or_default(),
            if *fatal { " (fatal)" } else { "" }
        ),
        ServerMsg::Chat {
            from,
            to,
            text,
            id,
            own,
            ..
        } => {
            if *own {
                println!("chat {id} sent by you (another device) to {to}: {text}")
            } else {
                println!("chat {id} from {from}: {text}")
            }
        }
        ServerMsg::ChatAck {
            id,
            delivered,
            message,
            stored,
        } => println!(
            "chat {message} (yours {id}) {}",
            if *stored {
                "stored for the recipient's next login".to_owned()
            } else {
                format!("delivered to {delivered} devices")
            }
        ),
        ServerMsg::ChatReceipt {
            message,
            status,
            by,
            ..
        } => println!("chat {message} {status:?} by {by}"),
        ServerMsg::ChatHistory {
            with,
            messages,
            more,
            ..
        } => {
            println!(
                "history with {with}: {} messages{}",
                messages.len(),
                if *more { " (more)" } else { "" }
            );
            for m in messages {
                println!(
                    "  {} {} -> {}: {}{}",
                    m.id,
                    m.from,
                    m.to,
                    m.text,
                    if m.read {
                        " (read)"
                    } else if m.delivered {
                        " (delivered)"
                    } else {
                        ""
                    }
                );
            }
        }
        ServerMsg::PresenceUpdate {
            user,
            status,
            note,
            devices,
        } => println!(
            "presence {user}: {status:?}{} ({devices} devices)",
            note.as_deref()
                .map(|n| format!(" \"{n}\""))
                .unwrap_or_default()
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
