//! `parley-load storm`: places SIP calls as a PSTN gateway toward a target at a given rate
//! and reports what happened.
//!
//! One task runs one event loop that owns everything: the UDP socket, the sans-IO
//! [`Uac`] holding every call's state and timers, the schedule, and the
//! [`Collector`]. Each turn it runs due timers, starts due calls, sends what the UAC
//! queued, takes the UAC's events, then sleeps until a datagram arrives or the next timer,
//! call or progress line is due. With `--media`, each answered call gets one extra task
//! for its RTP ([`crate::media`]); without it there is no task per call at all.
//!
//! ```no_run
//! use std::time::Duration;
//! use parley_load::plan::{Hold, Numbers};
//! use parley_load::storm::{self, StormConfig};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let mut cfg = StormConfig::new("127.0.0.1:5060".parse()?, Numbers::parse("+15550100001")?);
//! cfg.rate = 200.0;
//! cfg.calls = Some(2000);
//! cfg.hold = "uniform:1s-3s".parse()?;
//! let report = storm::run(cfg).await?;
//! println!("{report}");
//! assert_eq!(report.failed, 0);
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use crate::fleet::{Fleet, FleetConfig, FleetError};
use crate::plan::{Hold, Numbers, Schedule};
use crate::replay::Script;
use crate::report::{Collector, MediaSample, Report, Summary, process_cpu_time};
use crate::sip_uac::{CallNo, DISCARD_PORT, Event, Output, Uac, UacConfig};

/// Calls started per loop turn at most, so that a backlog (after `--max-concurrent` held
/// calls back, or a stall) cannot keep the loop from reading the socket.
const MAX_STARTS_PER_TURN: usize = 256;
/// Datagrams read per readiness, so that a flood cannot starve timers and call starts.
const MAX_READS_PER_TURN: usize = 256;
/// Room kept free in the receive buffer: the largest datagram.
const RECV_ROOM: usize = 65_536;
/// How often the progress line is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Time between the end of the last call and the devices' logout, for the node's last
/// messages to them to arrive.
const DEVICE_DRAIN: Duration = Duration::from_millis(300);

/// Why a storm could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StormError {
    /// A configuration value is out of range.
    #[error("bad configuration: {0}")]
    Config(String),
    /// The storm's devices could not log in.
    #[error(transparent)]
    Devices(#[from] FleetError),
    /// The SIP socket could not be bound or used.
    #[error("SIP socket {addr}: {source}")]
    Socket {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Everything a storm needs.
#[derive(Debug, Clone)]
pub struct StormConfig {
    /// Where INVITEs go (SIP over UDP).
    pub target: SocketAddr,
    /// More switches: call `n` goes to `target` when `n % (1 + len)` is 0, else to
    /// `also_targets[n % (1 + len) - 1]` (a cluster's nodes, round robin).
    pub also_targets: Vec<SocketAddr>,
    /// Address to bind the SIP socket to (`127.0.0.1:0` by default). With an unspecified
    /// IP (`0.0.0.0`) the address toward `target` is written in the messages.
    pub local: SocketAddr,
    /// The numbers to call.
    pub to: Numbers,
    /// The calling number.
    pub from: String,
    /// Calls per second (after the ramp).
    pub rate: f64,
    /// A linear ramp: from this rate to `rate` over the duration.
    pub ramp: Option<(f64, Duration)>,
    /// Stop after this many calls.
    pub calls: Option<u64>,
    /// Stop starting calls after this long.
    pub duration: Option<Duration>,
    /// Calls in progress at most; due calls wait (and then catch up) while at the limit.
    pub max_concurrent: Option<usize>,
    /// How long answered calls are held before our BYE.
    pub hold: Hold,
    /// A call with no final response this long after its INVITE fails as `timeout`.
    pub answer_timeout: Duration,
    /// Send PCMU from a per-call socket on answered calls and measure the echo.
    pub media: bool,
    /// Print a progress line to stderr every second.
    pub progress: bool,
    /// IM devices to log in before the first call and log out after the last
    /// (`--devices`); their counts go into [`Report::devices`].
    pub devices: Option<FleetConfig>,
    /// A SIP UAS to run alongside, playing the PSTN trunk (`--uas`); its counts go into
    /// [`Report::uas`].
    pub uas: Option<crate::sip_uas::UasConfig>,
    /// Calls to place at given offsets, each with its own number and hold time (a replay);
    /// when set, `rate`, `ramp`, `calls`, `to` (except in the report) and `hold` are not
    /// used.
    pub script: Option<Arc<Script>>,
}

impl StormConfig {
    /// Defaults: bind `127.0.0.1:0`, from `+15557770001`, 10 calls per second, no ramp, no
    /// limit (set `calls` or `duration`, or stop it with [`run_until`]), no hold, 32 s
    /// answer timeout, no media, no progress lines.
    pub fn new(target: SocketAddr, to: Numbers) -> StormConfig {
        StormConfig {
            target,
            also_targets: Vec::new(),
            local: SocketAddr::from(([127, 0, 0, 1], 0)),
            to,
            from: "+15557770001".into(),
            rate: 10.0,
            ramp: None,
            calls: None,
            duration: None,
            max_concurrent: None,
            hold: Hold::default(),
            answer_timeout: Duration::from_secs(32),
            media: false,
            progress: false,
            devices: None,
            uas: None,
            script: None,
        }
    }

    fn schedule(&self) -> Result<Schedule, StormError> {
        let bad = |e: crate::plan::PlanError| StormError::Config(e.to_string());
        match self.ramp {
            Some((from, time)) => Schedule::ramped(self.rate, from, time).map_err(bad),
            None => Schedule::constant(self.rate).map_err(bad),
        }
    }
}

/// Runs a storm to its end (`calls` made or `duration` over, then every call finished).
pub async fn run(cfg: StormConfig) -> Result<Report, StormError> {
    run_until(cfg, std::future::pending()).await
}

/// Runs a storm until its end or until `stop` completes; then no call starts, answered
/// calls hang up at once, and the report comes when every call has finished.
pub async fn run_until(
    cfg: StormConfig,
    stop: impl Future<Output = ()>,
) -> Result<Report, StormError> {
    let schedule = cfg.schedule()?;
    if cfg.script.as_ref().is_some_and(|s| s.calls.is_empty()) {
        return Err(StormError::Config("the replay has no call".into()));
    }
    if cfg.to.is_empty() && cfg.script.is_none() {
        return Err(StormError::Config("no number to call".into()));
    }
    if cfg.max_concurrent == Some(0) {
        return Err(StormError::Config(
            "--max-concurrent must be at least 1".into(),
        ));
    }
    let socket = UdpSocket::bind(cfg.local)
        .await
        .map_err(|source| StormError::Socket {
            addr: cfg.local,
            source,
        })?;
    let bound = socket.local_addr().map_err(|source| StormError::Socket {
        addr: cfg.local,
        source,
    })?;
    let local = SocketAddr::new(advertised_ip(bound.ip(), cfg.target), bound.port());
    let mut uac_cfg = UacConfig::new(local, cfg.target, cfg.from.clone());
    uac_cfg.answer_timeout = cfg.answer_timeout;
    uac_cfg.parse_sdp = cfg.media;
    let run_token: String = {
        let mut rng = rand::rng();
        (0..10)
            .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
            .collect()
    };
    let uas = match cfg.uas.clone() {
        Some(u) => Some(
            crate::sip_uas::start(u)
                .await
                .map_err(|source| StormError::Socket {
                    addr: cfg.local,
                    source,
                })?,
        ),
        None => None,
    };
    // Devices last: a bad SIP setting should not cost a fleet's logins first.
    let fleet = match cfg.devices.clone() {
        Some(f) => Some(Fleet::start(f).await?),
        None => None,
    };
    let mut driver = Driver {
        uac: Uac::new(uac_cfg, run_token),
        pending_events: std::collections::VecDeque::new(),
        socket,
        stats: Collector::new(cfg.media),
        schedule,
        media: MediaState::default(),
        number: String::with_capacity(32),
        rbuf: BytesMut::with_capacity(RECV_ROOM),
        local_ip: local.ip(),
        epoch: Instant::now(),
        cfg,
    };
    let report = driver.run(stop).await;
    let devices = match fleet {
        Some(f) => {
            // The node's last `call_ended`s leave after its answer to our last BYE.
            tokio::time::sleep(DEVICE_DRAIN).await;
            Some(f.finish().await)
        }
        None => None,
    };
    let uas = uas.map(|u| {
        let s = &u.stats;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        crate::report::UasReport {
            invites: get(&s.invites),
            answered: get(&s.answered),
            rejected: get(&s.rejected),
            cancelled: get(&s.cancelled),
            byes: get(&s.byes),
            media_echoed: get(&s.media_echoed),
        }
    });
    report.map(|r| Report { devices, uas, ..r })
}

/// The IP to write in Via/Contact/SDP: the bound one, or, when bound to the unspecified
/// address, the one the kernel would use toward `target`.
fn advertised_ip(bound: IpAddr, target: SocketAddr) -> IpAddr {
    if !bound.is_unspecified() {
        return bound;
    }
    let probe = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    StdUdpSocket::bind(probe)
        .and_then(|s| {
            s.connect(target)?;
            s.local_addr()
        })
        .map(|a| a.ip())
        .unwrap_or(bound)
}

#[derive(Default)]
struct MediaState {
    /// Sockets of calls not answered yet (their port is in the offer).
    pending: HashMap<CallNo, StdUdpSocket>,
    /// Running streams, stopped by dropping their sender.
    running: HashMap<CallNo, oneshot::Sender<()>>,
    tasks: JoinSet<MediaSample>,
}

struct Driver {
    cfg: StormConfig,
    uac: Uac,
    /// Events drained with the datagrams, handled once those are sent.
    pending_events: std::collections::VecDeque<Event>,
    socket: UdpSocket,
    stats: Collector,
    schedule: Schedule,
    media: MediaState,
    number: String,
    rbuf: BytesMut,
    local_ip: IpAddr,
    /// The storm's start; media stamps count from it.
    epoch: Instant,
}

impl Driver {
    async fn run(&mut self, stop: impl Future<Output = ()>) -> Result<Report, StormError> {
        tokio::pin!(stop);
        let cpu0 = process_cpu_time();
        let start = Instant::now();
        self.epoch = start;
        // A seeded generator of our own: the thread-local one would make this future !Send.
        let mut rng = StdRng::from_rng(&mut rand::rng());
        let mut scheduling = true;
        let mut interrupted = false;
        let mut last_start = start;
        let mut next_progress = start + PROGRESS_EVERY;
        // A live bar on a terminal; plain lines (one a second) when stderr is a file or pipe.
        let bar = (self.cfg.progress && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(
            || {
                let b = match self.cfg.calls {
                    Some(n) => indicatif::ProgressBar::new(n),
                    None => indicatif::ProgressBar::new_spinner(),
                };
                let style = indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} calls  {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
                b.set_style(style);
                b
            },
        );
        loop {
            let now = Instant::now();
            self.uac.handle_timeout(now);

            // Start the calls that are due.
            let mut blocked = false;
            let mut started_now = 0;
            while scheduling && started_now < MAX_STARTS_PER_TURN {
                let n = self.uac.started();
                let Some(due) = self.due(n) else {
                    scheduling = false;
                    break;
                };
                if self.cfg.calls.is_some_and(|c| n >= c)
                    || self.cfg.duration.is_some_and(|d| due >= d)
                {
                    scheduling = false;
                    break;
                }
                // A due time too far to represent (a vanishing rate) is never reached.
                let Some(due_at) = start.checked_add(due) else {
                    scheduling = false;
                    break;
                };
                if due_at > now {
                    break;
                }
                if self
                    .cfg
                    .max_concurrent
                    .is_some_and(|m| self.uac.active() >= m)
                {
                    blocked = true;
                    break;
                }
                self.start_call(now, &mut rng);
                last_start = now;
                started_now += 1;
            }

            self.flush().await;
            self.take_events();

            if self.cfg.progress && now >= next_progress {
                let p = self.stats.progress(now - start, self.uac.active());
                match &bar {
                    Some(b) => {
                        b.set_position(self.stats.attempts());
                        b.set_message(p.to_string());
                    }
                    None => eprintln!("{p}"),
                }
                while next_progress <= now {
                    next_progress += PROGRESS_EVERY;
                }
            }
            if !scheduling && self.uac.active() == 0 && self.media.tasks.is_empty() {
                break;
            }

            // Sleep until a datagram, the next timer, the next call or the next line.
            let mut wake = self.uac.poll_timeout();
            if scheduling
                && !blocked
                && let Some(next_call) = self
                    .due(self.uac.started())
                    .and_then(|due| start.checked_add(due))
            {
                wake = Some(wake.map_or(next_call, |w| w.min(next_call)));
            }
            if self.cfg.progress {
                wake = Some(wake.map_or(next_progress, |w| w.min(next_progress)));
            }
            let sleep = async {
                match wake {
                    Some(at) => {
                        tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                r = self.socket.readable() => {
                    if r.is_ok() {
                        self.read_datagrams();
                    }
                }
                Some(done) = self.media.tasks.join_next(), if !self.media.tasks.is_empty() => {
                    if let Ok(sample) = done {
                        self.stats.media(&sample);
                    }
                }
                () = &mut stop, if !interrupted => {
                    interrupted = true;
                    scheduling = false;
                    self.uac.hang_up_all(Instant::now());
                }
                () = sleep => {}
            }
        }

        let end = Instant::now();
        let n = self.stats.attempts();
        let summary = Summary {
            target: std::iter::once(&self.cfg.target)
                .chain(&self.cfg.also_targets)
                .map(SocketAddr::to_string)
                .collect::<Vec<_>>()
                .join(","),
            to: self.cfg.to.to_string(),
            rate: self.cfg.rate,
            elapsed: end - start,
            sending: last_start - start,
            asked: self.due(n.saturating_sub(1)).unwrap_or_default(),
            cpu: match (cpu0, process_cpu_time()) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a)),
                _ => None,
            },
            counters: self.uac.counters(),
            interrupted,
        };
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
        Ok(self.stats.report(summary))
    }

    /// When call `n` is due after the start; `None`: there is no such call.
    fn due(&self, n: u64) -> Option<Duration> {
        match &self.cfg.script {
            Some(s) => s.calls.get(usize::try_from(n).ok()?).map(|c| c.offset),
            None => Some(self.schedule.time_of(n)),
        }
    }

    fn start_call(&mut self, now: Instant, rng: &mut StdRng) {
        let n = self.uac.started();
        let scripted = self
            .cfg
            .script
            .as_ref()
            .and_then(|s| s.calls.get(usize::try_from(n).ok()?));
        let hold = match scripted {
            Some(c) => {
                self.number.clear();
                self.number.push_str(&c.to);
                c.hold
            }
            None => {
                self.cfg.to.nth(n, &mut self.number);
                self.cfg.hold.sample(rng)
            }
        };
        let mut port = DISCARD_PORT;
        if self.cfg.media {
            // A socket per call, bound now so that its port goes into the offer.
            match StdUdpSocket::bind((self.local_ip, 0)).and_then(|s| {
                s.set_nonblocking(true)?;
                Ok((s.local_addr()?.port(), s))
            }) {
                Ok((p, s)) => {
                    port = p;
                    self.media.pending.insert(n, s);
                }
                Err(e) => tracing::warn!(error = %e, "no media socket for a call"),
            }
        }
        let spread = 1 + self.cfg.also_targets.len() as u64;
        let target = match (n % spread) as usize {
            0 => self.cfg.target,
            i => self.cfg.also_targets[i - 1],
        };
        self.uac
            .start_call_via(now, target, &self.number, hold, port);
        self.stats.attempt(self.uac.active());
    }

    async fn flush(&mut self) {
        while let Some(out) = self.uac.poll_output() {
            match out {
                Output::Transmit(t) => {
                    if self.socket.send_to(&t.data, t.dest).await.is_err() {
                        self.stats.send_error();
                    }
                }
                Output::Event(ev) => self.pending_events.push_back(ev),
            }
        }
    }

    fn take_events(&mut self) {
        while let Some(ev) = self.pending_events.pop_front() {
            match ev {
                Event::Ringing { pdd, .. } => self.stats.ringing(pdd),
                Event::Answered { call, setup, media } => {
                    self.stats.answered(setup);
                    if let (Some(remote), Some(sock)) = (media, self.media.pending.remove(&call)) {
                        self.start_media(call, sock, remote);
                    }
                }
                Event::Ended { call, outcome } => {
                    self.stats.ended(outcome);
                    self.media.pending.remove(&call);
                    // Dropping the sender stops the stream.
                    self.media.running.remove(&call);
                }
            }
        }
    }

    fn start_media(&mut self, call: CallNo, sock: StdUdpSocket, remote: SocketAddr) {
        let sock = match UdpSocket::from_std(sock) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "media socket not usable");
                return;
            }
        };
        let (tx, rx) = oneshot::channel();
        self.media.running.insert(call, tx);
        // Stamps are microseconds since the storm's start.
        self.media
            .tasks
            .spawn(crate::media::run_stream(sock, remote, self.epoch, rx));
    }

    /// Reads what the socket holds, up to a bound, into one reused buffer: each datagram
    /// is split off as `Bytes` for the parser and the space is reclaimed once it is dropped.
    fn read_datagrams(&mut self) {
        for _ in 0..MAX_READS_PER_TURN {
            self.rbuf.reserve(RECV_ROOM);
            match self.socket.try_recv_buf_from(&mut self.rbuf) {
                Ok((_, src)) => {
                    let data = self.rbuf.split().freeze();
                    self.uac.handle_datagram(Instant::now(), src, data);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // ICMP errors surface here on some systems; the call timers cover them.
                Err(_) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_checked() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut cfg = StormConfig::new("127.0.0.1:9".parse().unwrap(), Numbers::single("1"));
        cfg.rate = 0.0;
        assert!(matches!(
            rt.block_on(run(cfg.clone())),
            Err(StormError::Config(_))
        ));
        cfg.rate = 10.0;
        cfg.max_concurrent = Some(0);
        assert!(matches!(rt.block_on(run(cfg)), Err(StormError::Config(_))));
    }

    #[test]
    fn a_storm_can_be_spawned() {
        fn assert_send<T: Send>(_: &T) {}
        let cfg = StormConfig::new("127.0.0.1:9".parse().unwrap(), Numbers::single("1"));
        assert_send(&run(cfg));
    }

    #[test]
    fn unspecified_bind_advertises_a_concrete_ip() {
        let ip = advertised_ip(
            "0.0.0.0".parse().unwrap(),
            "127.0.0.1:5060".parse().unwrap(),
        );
        assert_eq!(ip, "127.0.0.1".parse::<IpAddr>().unwrap());
        let ip = advertised_ip(
            "127.0.0.2".parse().unwrap(),
            "127.0.0.1:5060".parse().unwrap(),
        );
        assert_eq!(ip, "127.0.0.2".parse::<IpAddr>().unwrap());
    }
}
