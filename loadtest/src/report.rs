//! A storm's results: counters and latency histograms while it runs ([`Collector`]), the
//! once-a-second progress line ([`Progress`]) and the final [`Report`], printed as a table
//! ([`fmt::Display`]) or written as JSON ([`Report::to_json`]), with the pass/fail check
//! ([`Report::check`]).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::sip_uac::{Outcome, UacCounters};

/// Highest latency recorded exactly, in microseconds (one hour); longer ones saturate.
const MAX_MICROS: u64 = 3_600_000_000;

/// An empty histogram of microseconds, up to an hour, 3 significant digits.
pub(crate) fn histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts (1 ≤ low, high ≥ 2·low, 3 digits).
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Percentiles of one latency, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
}

impl Latency {
    /// Percentiles of a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// What came back of the media sent on answered calls (`--media`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct MediaReport {
    /// Calls that had a media stream.
    pub streams: u64,
    /// RTP packets sent.
    pub sent: u64,
    /// Packets received back carrying one of our stamps.
    pub received: u64,
    /// Received datagrams that were not RTP with our stamp.
    pub foreign: u64,
    /// `1 - received / sent` (packets in flight when a call ended count as lost).
    pub loss_ratio: f64,
    /// Send → echo received, from the stamp in each packet.
    pub round_trip: Latency,
    /// Interarrival jitter of each stream's echoed packets (RFC 3550 §6.4.1 estimator,
    /// over the round trip), distribution across streams.
    pub jitter: Latency,
}

/// What the devices a storm logged in saw (`--devices`), summed over all of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct DevicesReport {
    /// Users logged in.
    pub users: u64,
    /// Devices logged in (two per user with churn).
    pub devices: u64,
    /// `incoming_call` messages received (a churned call counts on both devices).
    pub offered: u64,
    /// `answer` messages sent.
    pub answered: u64,
    /// `reject` messages sent.
    pub rejected: u64,
    /// `call_connected` messages received.
    pub connected: u64,
    /// Calls that ended on a device (see `device::DeviceStats`).
    pub ended: u64,
    /// `call_ended` with reason `rerouted` received.
    pub rerouted: u64,
    /// Calls moved to the user's other device by a presence change (`--churn-ratio`).
    pub churns: u64,
    /// RTP packets received by the devices.
    pub rtp_received: u64,
    /// RTP packets sent by the devices (echoed).
    pub rtp_sent: u64,
    /// RTP packets whose SSRC changed within a flow (a stream restarted under a device).
    pub rtp_ssrc_changes: u64,
    /// RTP packets, same SSRC, not following the previous one (sequence not + 1, or the
    /// timestamp going back): loss, reordering or splicing.
    pub rtp_discontinuities: u64,
    /// Churn: the second device's `presence` sent → its `incoming_call` received.
    pub reroute: Latency,
}

/// The final results of a storm.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The SIP target.
    pub target: String,
    /// The numbers called.
    pub to: String,
    /// From the first INVITE to the end of the last call.
    pub elapsed_s: f64,
    /// CPU time (user + system) of the generator's process during the storm; `None` where
    /// `/proc/self/stat` is unavailable.
    pub cpu_s: Option<f64>,
    /// The rate asked for (`--rate`).
    pub rate_cps: f64,
    /// The average rate the schedule asked for over the calls made (differs from
    /// `rate_cps` with a ramp).
    pub asked_cps: f64,
    /// The rate achieved over the same calls.
    pub achieved_cps: f64,
    /// Calls started (INVITEs sent).
    pub attempts: u64,
    /// Calls that got a 2xx.
    pub answered: u64,
    /// Answered calls that ended cleanly (our BYE got a 2xx, or the far end's BYE came).
    pub completed: u64,
    /// Of `completed`, those the far end hung up.
    pub remote_bye: u64,
    /// Calls that did not complete: `attempts - completed`.
    pub failed: u64,
    /// `failed` by reason: a SIP status (`"404"`), `timeout` (no final response within the
    /// answer timeout), `bye_timeout` (no final response to our BYE), `bye_<status>`.
    pub failures: BTreeMap<String, u64>,
    /// Answer-seizure ratio, `answered / attempts`.
    pub asr: f64,
    /// INVITE sent → 2xx received.
    pub setup: Latency,
    /// INVITE sent → first 180/183 received (calls without one are not sampled).
    pub post_dial_delay: Latency,
    /// Most calls in progress at once.
    pub peak_active: u64,
    /// Requests sent again on a retransmission timer.
    pub retransmissions: u64,
    /// 2xx responses received again after our ACK.
    pub duplicate_2xx: u64,
    /// Datagrams that were not usable SIP.
    pub bad_messages: u64,
    /// Messages for no live call.
    pub stray_messages: u64,
    /// Requests from the far end answered with an error.
    pub unsupported_requests: u64,
    /// Datagrams the socket refused to send.
    pub send_errors: u64,
    /// Whether the storm was stopped before its planned end (Ctrl-C).
    pub interrupted: bool,
    /// Media results, with `--media`.
    pub media: Option<MediaReport>,
    /// What the storm's own devices saw, with `--devices`.
    pub devices: Option<DevicesReport>,
    /// What the storm's own SIP UAS (the trunk side, `--uas`) saw.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uas: Option<UasReport>,
}

/// Counters of the storm's SIP UAS.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UasReport {
    /// New INVITEs received.
    pub invites: u64,
    /// Calls answered and acknowledged.
    pub answered: u64,
    /// Calls refused 486.
    pub rejected: u64,
    /// Calls cancelled before the answer.
    pub cancelled: u64,
    /// BYEs answered.
    pub byes: u64,
    /// Media datagrams echoed.
    pub media_echoed: u64,
}

/// Limits that make a storm fail (`--max-fail-ratio`, `--max-setup-p99`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Thresholds {
    /// Highest acceptable `failed / attempts`.
    pub max_fail_ratio: Option<f64>,
    /// Highest acceptable 99th percentile of the setup time.
    pub max_setup_p99: Option<Duration>,
}

impl Report {
    /// `failed / attempts` (0 when nothing was attempted).
    pub fn fail_ratio(&self) -> f64 {
        if self.attempts == 0 {
            0.0
        } else {
            self.failed as f64 / self.attempts as f64
        }
    }

    /// The thresholds this report exceeds, one sentence each; empty when it passes.
    pub fn check(&self, t: &Thresholds) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(max) = t.max_fail_ratio
            && self.fail_ratio() > max
        {
            out.push(format!(
                "fail ratio {:.4} ({} of {}) is above {max}",
                self.fail_ratio(),
                self.failed,
                self.attempts
            ));
        }
        if let Some(max) = t.max_setup_p99
            && self.setup.count > 0
            && self.setup.p99_ms > max.as_secs_f64() * 1000.0
        {
            out.push(format!(
                "setup p99 {:.1} ms is above {:.1} ms",
                self.setup.p99_ms,
                max.as_secs_f64() * 1000.0
            ));
        }
        out
    }

    /// The report as pretty-printed JSON.
    pub fn to_json(&self) -> serde_json::Result<String> {
        serde_json::to_string_pretty(self)
    }
}

fn latency_row(f: &mut fmt::Formatter<'_>, name: &str, l: &Latency) -> fmt::Result {
    writeln!(
        f,
        "  {name:<16} {:>8} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
        l.count, l.mean_ms, l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms
    )
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = |n: u64| {
            if self.attempts == 0 {
                0.0
            } else {
                100.0 * n as f64 / self.attempts as f64
            }
        };
        writeln!(f, "storm to {} ({})", self.target, self.to)?;
        write!(f, "  elapsed           {:.2} s", self.elapsed_s)?;
        match self.cpu_s {
            Some(cpu) => writeln!(
                f,
                "   (generator CPU {cpu:.2} s, {:.1}% of one core)",
                100.0 * cpu / self.elapsed_s.max(1e-9)
            )?,
            None => writeln!(f)?,
        }
        writeln!(
            f,
            "  rate              asked {:.1} cps (--rate {}), achieved {:.1} cps",
            self.asked_cps, self.rate_cps, self.achieved_cps
        )?;
        writeln!(f, "  attempts          {}", self.attempts)?;
        writeln!(
            f,
            "  answered          {}   ASR {:.2}%",
            self.answered,
            100.0 * self.asr
        )?;
        writeln!(
            f,
            "  completed         {}   ({} hung up by the far end)",
            self.completed, self.remote_bye
        )?;
        writeln!(
            f,
            "  failed            {}   ({:.2}%)",
            self.failed,
            pct(self.failed)
        )?;
        for (reason, n) in &self.failures {
            writeln!(f, "    {reason:<15} {n}   ({:.2}%)", pct(*n))?;
        }
        writeln!(f, "  peak active       {}", self.peak_active)?;
        writeln!(
            f,
            "  retransmissions   {}   duplicate 2xx {}",
            self.retransmissions, self.duplicate_2xx
        )?;
        writeln!(
            f,
            "  bad messages      {}   stray {}   unsupported requests {}   send errors {}",
            self.bad_messages, self.stray_messages, self.unsupported_requests, self.send_errors
        )?;
        if self.interrupted {
            writeln!(f, "  interrupted before the planned end")?;
        }
        writeln!(
            f,
            "\n  {:<16} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "latency (ms)", "count", "mean", "p50", "p90", "p99", "p99.9", "max"
        )?;
        latency_row(f, "setup", &self.setup)?;
        latency_row(f, "post-dial delay", &self.post_dial_delay)?;
        if let Some(m) = &self.media {
            latency_row(f, "media rtt", &m.round_trip)?;
            latency_row(f, "media jitter", &m.jitter)?;
            writeln!(
                f,
                "\n  media             {} streams, {} packets sent, {} back ({:.3}% lost), {} foreign",
                m.streams,
                m.sent,
                m.received,
                100.0 * m.loss_ratio,
                m.foreign
            )?;
        }
        if let Some(d) = &self.devices {
            writeln!(
                f,
                "\n  devices           {} users, {} devices: {} offered, {} answered, {} rejected, {} connected, {} ended",
                d.users, d.devices, d.offered, d.answered, d.rejected, d.connected, d.ended
            )?;
            writeln!(
                f,
                "                    {} churned, {} rerouted away, rtp {} received / {} sent ({} SSRC changes, {} discontinuities)",
                d.churns,
                d.rerouted,
                d.rtp_received,
                d.rtp_sent,
                d.rtp_ssrc_changes,
                d.rtp_discontinuities
            )?;
            if d.reroute.count > 0 {
                writeln!(
                    f,
                    "  reroute           {} samples, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                    d.reroute.count, d.reroute.p50_ms, d.reroute.p99_ms, d.reroute.max_ms
                )?;
            }
        }
        if let Some(u) = &self.uas {
            writeln!(
                f,
                "\n  uas (trunk side)  {} invites, {} answered, {} rejected, {} cancelled, {} byes, {} media echoed",
                u.invites, u.answered, u.rejected, u.cancelled, u.byes, u.media_echoed
            )?;
        }
        Ok(())
    }
}

/// One line of live progress.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Time since the start.
    pub t: Duration,
    /// Calls started so far.
    pub attempted: u64,
    /// Calls answered so far.
    pub answered: u64,
    /// Calls failed so far.
    pub failed: u64,
    /// Calls in progress.
    pub active: u64,
    /// Calls started per second since the previous line.
    pub cps: f64,
    /// 99th percentile of the setup times since the previous line (`None`: no answer).
    pub setup_p99: Option<Duration>,
}

impl fmt::Display for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "t={}s attempted={} answered={} failed={} active={} cps={:.1} setup_p99=",
            self.t.as_secs(),
            self.attempted,
            self.answered,
            self.failed,
            self.active,
            self.cps
        )?;
        match self.setup_p99 {
            Some(d) => write!(f, "{}ms", d.as_millis()),
            None => f.write_str("-"),
        }
    }
}

/// Accumulates a storm's results as its events come in.
#[derive(Debug)]
pub struct Collector {
    attempts: u64,
    answered: u64,
    completed: u64,
    remote_bye: u64,
    failures: BTreeMap<Outcome, u64>,
    failed: u64,
    setup: Histogram<u64>,
    pdd: Histogram<u64>,
    window_setup: Histogram<u64>,
    window_attempts: u64,
    window_start: Duration,
    peak_active: u64,
    send_errors: u64,
    media: Option<MediaCollector>,
}

#[derive(Debug)]
struct MediaCollector {
    streams: u64,
    sent: u64,
    received: u64,
    foreign: u64,
    rtt: Histogram<u64>,
    jitter: Histogram<u64>,
}

/// What one media stream measured, merged into the storm's results.
#[derive(Debug)]
pub struct MediaSample {
    /// RTP packets sent.
    pub sent: u64,
    /// Stamped packets received back.
    pub received: u64,
    /// Other datagrams received.
    pub foreign: u64,
    /// Round-trip times, in microseconds.
    pub rtt: Histogram<u64>,
    /// RFC 3550 jitter estimate so far, microseconds.
    pub jitter_us: f64,
    last_transit: Option<u64>,
}

impl MediaSample {
    /// An empty sample with a histogram ready for round-trip times.
    pub fn new() -> MediaSample {
        MediaSample {
            sent: 0,
            received: 0,
            foreign: 0,
            // Two significant digits keep each stream's histogram small (a few KB); the
            // bounds are constants hdrhistogram accepts, so this cannot fail.
            rtt: Histogram::new_with_bounds(1, MAX_MICROS, 2).expect("valid histogram bounds"),
            jitter_us: 0.0,
            last_transit: None,
        }
    }

    /// Records one round-trip time.
    pub fn record_rtt(&mut self, rtt: Duration) {
        let transit = micros(rtt);
        self.rtt.saturating_record(transit);
        // RFC 3550 §6.4.1: J += (|D| - J) / 16, D the change in transit time between
        // consecutive packets (here over the round trip, stamp to echo).
        if let Some(last) = self.last_transit {
            let d = transit.abs_diff(last) as f64;
            self.jitter_us += (d - self.jitter_us) / 16.0;
        }
        self.last_transit = Some(transit);
    }
}

impl Default for MediaSample {
    fn default() -> Self {
        Self::new()
    }
}

impl Default for Collector {
    fn default() -> Self {
        Self::new(false)
    }
}

/// The generator's own metrics (exported with `parley-load storm --metrics ADDR`).
pub mod m {
    /// Calls started.
    pub const ATTEMPTS: &str = "parley_load_calls_attempted_total";
    /// Calls answered.
    pub const ANSWERED: &str = "parley_load_calls_answered_total";
    /// Calls ended, by `outcome` (`completed`, a SIP status, `timeout`, ...).
    pub const ENDED: &str = "parley_load_calls_ended_total";
    /// Calls in progress.
    pub const ACTIVE: &str = "parley_load_calls_active";
    /// INVITE to 200 OK.
    pub const SETUP_SECONDS: &str = "parley_load_setup_seconds";
    /// INVITE to the first 180/183.
    pub const PDD_SECONDS: &str = "parley_load_post_dial_delay_seconds";

    /// Registers descriptions with the installed recorder.
    pub fn describe() {
        use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
        describe_counter!(ATTEMPTS, Unit::Count, "Calls the generator started");
        describe_counter!(ANSWERED, Unit::Count, "Calls answered (200 OK)");
        describe_counter!(ENDED, Unit::Count, "Calls ended, by outcome");
        describe_gauge!(ACTIVE, Unit::Count, "Calls in progress");
        describe_histogram!(
            SETUP_SECONDS,
            Unit::Seconds,
            "INVITE sent to 200 OK received"
        );
        describe_histogram!(
            PDD_SECONDS,
            Unit::Seconds,
            "INVITE sent to the first 180/183"
        );
    }
}

impl Collector {
    /// An empty collector; `media` when the storm sends media.
    pub fn new(media: bool) -> Collector {
        Collector {
            attempts: 0,
            answered: 0,
            completed: 0,
            remote_bye: 0,
            failures: BTreeMap::new(),
            failed: 0,
            setup: histogram(),
            pdd: histogram(),
            window_setup: histogram(),
            window_attempts: 0,
            window_start: Duration::ZERO,
            peak_active: 0,
            send_errors: 0,
            media: media.then(|| MediaCollector {
                streams: 0,
                sent: 0,
                received: 0,
                foreign: 0,
                rtt: histogram(),
                jitter: histogram(),
            }),
        }
    }

    /// A call started; `active` calls are now in progress.
    pub fn attempt(&mut self, active: usize) {
        metrics::counter!(m::ATTEMPTS).increment(1);
        metrics::gauge!(m::ACTIVE).set(active as f64);
        self.attempts += 1;
        self.window_attempts += 1;
        self.peak_active = self.peak_active.max(active as u64);
    }

    /// A call rang after `pdd`.
    pub fn ringing(&mut self, pdd: Duration) {
        metrics::histogram!(m::PDD_SECONDS).record(pdd.as_secs_f64());
        self.pdd.saturating_record(micros(pdd));
    }

    /// A call was answered after `setup`.
    pub fn answered(&mut self, setup: Duration) {
        metrics::counter!(m::ANSWERED).increment(1);
        metrics::histogram!(m::SETUP_SECONDS).record(setup.as_secs_f64());
        self.answered += 1;
        self.setup.saturating_record(micros(setup));
        self.window_setup.saturating_record(micros(setup));
    }

    /// A call ended.
    pub fn ended(&mut self, outcome: Outcome) {
        let label = match outcome {
            Outcome::Completed | Outcome::RemoteBye => "completed".to_owned(),
            other => other.to_string(),
        };
        metrics::counter!(m::ENDED, "outcome" => label).increment(1);
        match outcome {
            Outcome::Completed => self.completed += 1,
            Outcome::RemoteBye => {
                self.completed += 1;
                self.remote_bye += 1;
            }
            other => {
                self.failed += 1;
                *self.failures.entry(other).or_default() += 1;
            }
        }
    }

    /// A datagram could not be sent.
    pub fn send_error(&mut self) {
        self.send_errors += 1;
    }

    /// Merges one finished media stream.
    pub fn media(&mut self, s: &MediaSample) {
        if let Some(m) = &mut self.media {
            m.streams += 1;
            m.sent += s.sent;
            m.received += s.received;
            m.foreign += s.foreign;
            // Same bounds, different precision: adding cannot go out of range.
            let _ = m.rtt.add(&s.rtt);
            if s.received > 1 {
                m.jitter.saturating_record(s.jitter_us.round() as u64);
            }
        }
    }

    /// Calls started so far.
    pub fn attempts(&self) -> u64 {
        self.attempts
    }

    /// The progress line at `t`; starts a new window for the per-second figures.
    pub fn progress(&mut self, t: Duration, active: usize) -> Progress {
        let window = t.saturating_sub(self.window_start).as_secs_f64();
        let p = Progress {
            t,
            attempted: self.attempts,
            answered: self.answered,
            failed: self.failed,
            active: active as u64,
            cps: if window > 0.0 {
                self.window_attempts as f64 / window
            } else {
                0.0
            },
            setup_p99: (!self.window_setup.is_empty())
                .then(|| Duration::from_micros(self.window_setup.value_at_quantile(0.99))),
        };
        self.window_setup.reset();
        self.window_attempts = 0;
        self.window_start = t;
        p
    }

    /// The final report. `sending` is the time from the first to the last INVITE; `asked`
    /// is what the schedule asked for over the same calls.
    pub fn report(&self, summary: Summary) -> Report {
        let rate = |calls: u64, over: Duration| {
            if calls <= 1 || over.is_zero() {
                0.0
            } else {
                (calls - 1) as f64 / over.as_secs_f64()
            }
        };
        let mut failures = BTreeMap::new();
        for (outcome, n) in &self.failures {
            *failures.entry(outcome.to_string()).or_default() += n;
        }
        let c = summary.counters;
        Report {
            target: summary.target,
            to: summary.to,
            elapsed_s: summary.elapsed.as_secs_f64(),
            cpu_s: summary.cpu.map(|d| d.as_secs_f64()),
            rate_cps: summary.rate,
            asked_cps: rate(self.attempts, summary.asked),
            achieved_cps: rate(self.attempts, summary.sending),
            attempts: self.attempts,
            answered: self.answered,
            completed: self.completed,
            remote_bye: self.remote_bye,
            failed: self.attempts.saturating_sub(self.completed),
            failures,
            asr: if self.attempts == 0 {
                0.0
            } else {
                self.answered as f64 / self.attempts as f64
            },
            setup: Latency::of(&self.setup),
            post_dial_delay: Latency::of(&self.pdd),
            peak_active: self.peak_active,
            retransmissions: c.retransmissions,
            duplicate_2xx: c.duplicate_2xx,
            bad_messages: c.bad_messages,
            stray_messages: c.stray_messages,
            unsupported_requests: c.unsupported_requests,
            send_errors: self.send_errors,
            interrupted: summary.interrupted,
            media: self.media.as_ref().map(|m| MediaReport {
                streams: m.streams,
                sent: m.sent,
                received: m.received,
                foreign: m.foreign,
                loss_ratio: if m.sent == 0 {
                    0.0
                } else {
                    1.0 - (m.received.min(m.sent) as f64 / m.sent as f64)
                },
                round_trip: Latency::of(&m.rtt),
                jitter: Latency::of(&m.jitter),
            }),
            devices: None,
            uas: None,
        }
    }
}

/// What the driver knows at the end that the collector does not.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The SIP target.
    pub target: String,
    /// The numbers called.
    pub to: String,
    /// The configured rate.
    pub rate: f64,
    /// First INVITE → last call ended.
    pub elapsed: Duration,
    /// First INVITE → last INVITE.
    pub sending: Duration,
    /// When the schedule asked for the last INVITE made.
    pub asked: Duration,
    /// CPU time of the process during the storm.
    pub cpu: Option<Duration>,
    /// The UAC's counters.
    pub counters: UacCounters,
    /// Stopped before the planned end.
    pub interrupted: bool,
}

/// CPU time (user + system) this process has used, from `/proc/self/stat`.
pub fn process_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    cpu_time_from_stat(&stat)
}

/// Fields 14 and 15 (utime, stime) of a `/proc/<pid>/stat` line, in clock ticks of
/// USER_HZ, which Linux fixes at 100 per second for user space on every architecture
/// this tool runs on.
fn cpu_time_from_stat(stat: &str) -> Option<Duration> {
    const USER_HZ: u64 = 100;
    // The command name (field 2) is in parentheses and may itself hold spaces or ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // `rest` starts at field 3 (state); utime is field 14.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let ticks = utime + stime;
    Some(Duration::from_millis(ticks * 1000 / USER_HZ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary() -> Summary {
        Summary {
            target: "127.0.0.1:5060".into(),
            to: "+15550100001".into(),
            rate: 100.0,
            elapsed: Duration::from_secs(3),
            sending: Duration::from_millis(30),
            asked: Duration::from_millis(30),
            cpu: Some(Duration::from_millis(250)),
            counters: UacCounters::default(),
            interrupted: false,
        }
    }

    #[test]
    fn report_counts_rates_and_percentiles() {
        let mut c = Collector::new(false);
        for i in 0..4u64 {
            c.attempt(i as usize + 1);
        }
        for ms in [10u64, 20, 30] {
            c.ringing(Duration::from_millis(ms / 2));
            c.answered(Duration::from_millis(ms));
        }
        c.ended(Outcome::Completed);
        c.ended(Outcome::RemoteBye);
        c.ended(Outcome::ByeTimeout);
        c.ended(Outcome::Rejected(486));
        let r = c.report(summary());
        assert_eq!(
            (r.attempts, r.answered, r.completed, r.remote_bye),
            (4, 3, 2, 1)
        );
        assert_eq!(r.failed, 2);
        assert_eq!(
            r.failures,
            BTreeMap::from([("486".to_string(), 1), ("bye_timeout".to_string(), 1)])
        );
        assert!((r.asr - 0.75).abs() < 1e-9);
        assert!((r.achieved_cps - 100.0).abs() < 1e-9);
        assert_eq!(r.setup.count, 3);
        assert!((r.setup.p50_ms - 20.0).abs() < 0.1, "{:?}", r.setup);
        assert!((r.setup.max_ms - 30.0).abs() < 0.1);
        assert_eq!(r.post_dial_delay.count, 3);
        assert_eq!(r.peak_active, 4);
        assert!((r.fail_ratio() - 0.5).abs() < 1e-9);

        let json: serde_json::Value = serde_json::from_str(&r.to_json().unwrap()).unwrap();
        assert_eq!(json["failures"]["486"], 1);
        assert_eq!(json["setup"]["count"], 3);
        assert_eq!(json["cpu_s"], 0.25);
        let table = r.to_string();
        assert!(table.contains("ASR 75.00%"), "{table}");
        assert!(table.contains("bye_timeout"), "{table}");
    }

    #[test]
    fn thresholds_flag_what_they_should() {
        let mut c = Collector::new(false);
        for _ in 0..10 {
            c.attempt(1);
            c.answered(Duration::from_millis(5));
            c.ended(Outcome::Completed);
        }
        c.attempt(1);
        c.ended(Outcome::Timeout);
        let r = c.report(summary());
        let none = Thresholds::default();
        assert!(r.check(&none).is_empty());
        let strict = Thresholds {
            max_fail_ratio: Some(0.05),
            max_setup_p99: Some(Duration::from_millis(4)),
        };
        assert_eq!(r.check(&strict).len(), 2, "{:?}", r.check(&strict));
        let lax = Thresholds {
            max_fail_ratio: Some(0.1),
            max_setup_p99: Some(Duration::from_millis(6)),
        };
        assert!(r.check(&lax).is_empty(), "{:?}", r.check(&lax));
    }

    #[test]
    fn progress_line_covers_its_window() {
        let mut c = Collector::new(false);
        for _ in 0..50 {
            c.attempt(3);
        }
        c.answered(Duration::from_millis(4));
        let p = c.progress(Duration::from_millis(500), 3);
        assert_eq!(p.cps, 100.0);
        assert_eq!(
            p.to_string(),
            "t=0s attempted=50 answered=1 failed=0 active=3 cps=100.0 setup_p99=4ms"
        );
        let p = c.progress(Duration::from_millis(1500), 0);
        assert_eq!((p.cps, p.setup_p99), (0.0, None));
        assert!(p.to_string().ends_with("setup_p99=-"));
    }

    #[test]
    fn media_samples_merge() {
        let mut c = Collector::new(true);
        let mut s = MediaSample::new();
        s.sent = 100;
        s.received = 98;
        s.record_rtt(Duration::from_millis(2));
        c.media(&s);
        let m = c.report(summary()).media.unwrap();
        assert_eq!((m.streams, m.sent, m.received), (1, 100, 98));
        assert!((m.loss_ratio - 0.02).abs() < 1e-9);
        assert_eq!(m.round_trip.count, 1);
    }

    #[test]
    fn cpu_time_parses_proc_stat() {
        let line = "1234 (parley load) S 1 1234 1234 0 -1 4194560 500 0 0 0 150 25 0 0 20 0 \
                    3 0 100 12345 678 18446744073709551615";
        assert_eq!(cpu_time_from_stat(line), Some(Duration::from_millis(1750)));
        assert_eq!(cpu_time_from_stat("garbage"), None);
        assert!(process_cpu_time().is_some());
    }

    #[test]
    fn jitter_follows_rfc3550() {
        let mut s = MediaSample::new();
        for ms in [10, 12, 10] {
            s.record_rtt(Duration::from_millis(ms));
        }
        // D = 2000 µs twice: J = 125, then 125 + (2000 - 125) / 16.
        assert!(
            (s.jitter_us - (125.0 + 1875.0 / 16.0)).abs() < 1e-9,
            "{}",
            s.jitter_us
        );
    }
}
