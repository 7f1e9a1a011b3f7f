//! `parley-load capacity`: a target's highest clean call rate, found by the tool itself,
//! then the goodput one step above it.
//!
//! The search runs storms of `step` seconds each: it doubles the rate from `start` while
//! runs are clean (up to `max`), then bisects between the last clean and the first
//! unclean rate until they are within `precision` of each other. Then it offers
//! `overload` multiples of the clean rate (1.5×, 2×, 4× by default) for
//! `overload_duration` each and reports the goodput: calls completed per second offered,
//! and that as a share of the clean rate. Any SIP switch can be the target (the tool only
//! speaks SIP over UDP as a gateway would), so Parley and another switch can be measured
//! with the same tool the same way.
//!
//! **Clean** means what `docs/BENCHMARKS.md` means by it: under 0.1% of the calls failed,
//! every call finished inside the run (the last one ended within `tail` of the last
//! INVITE: no calls left waiting on Timer B), and the generator kept the asked rate (a run
//! it could not drive says nothing about the target).

use std::time::Duration;

use serde::Serialize;

use crate::report::Report;
use crate::storm::{self, StormConfig, StormError};

/// What to measure and how.
#[derive(Debug, Clone)]
pub struct CapacityConfig {
    /// Target, numbers, caller, hold, answer timeout (its `rate`, `calls` and `duration`
    /// are set by the search).
    pub base: StormConfig,
    /// First rate tried, calls per second.
    pub start: f64,
    /// Highest rate tried.
    pub max: f64,
    /// Length of each search run.
    pub step: Duration,
    /// The search stops when the unclean rate is within this share of the clean one.
    pub precision: f64,
    /// Multiples of the clean rate offered after the search.
    pub overload: Vec<f64>,
    /// Length of each overload run.
    pub overload_duration: Duration,
    /// How long after the last INVITE the last call may end in a clean run.
    pub tail: Duration,
    /// Pause between runs, for the target to settle.
    pub pause: Duration,
}

impl CapacityConfig {
    /// Defaults: from 100 to 10,000 calls/s, 10 s steps, 5% precision, 1.5×/2×/4× for 30 s
    /// each, a 2 s tail, 3 s pauses.
    pub fn new(base: StormConfig) -> Self {
        Self {
            base,
            start: 100.0,
            max: 10_000.0,
            step: Duration::from_secs(10),
            precision: 0.05,
            overload: vec![1.5, 2.0, 4.0],
            overload_duration: Duration::from_secs(30),
            tail: Duration::from_secs(2),
            pause: Duration::from_secs(3),
        }
    }
}

/// One run of the search.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Step {
    /// Offered calls per second.
    pub rate_cps: f64,
    /// Calls started.
    pub attempts: u64,
    /// Calls that completed (answered and ended cleanly).
    pub completed: u64,
    /// Calls that did not.
    pub failed: u64,
    /// The rate the generator achieved.
    pub achieved_cps: f64,
    /// From the last INVITE to the end of the last call, seconds.
    pub tail_s: f64,
    /// Whether the run was clean.
    pub clean: bool,
    /// Why not.
    pub why: Option<String>,
    /// Failures by reason.
    pub failures: std::collections::BTreeMap<String, u64>,
    /// INVITE → 2xx of the answered calls, 99th percentile (latency of admitted calls).
    pub setup_p99_ms: f64,
    /// Requests the generator had to send again (a retransmission avalanche shows here).
    pub retransmissions: u64,
}

/// One overload run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Overload {
    /// Multiple of the clean rate.
    pub factor: f64,
    /// Offered calls per second.
    pub offered_cps: f64,
    /// Calls completed per second of the run.
    pub goodput_cps: f64,
    /// `goodput_cps` over the clean rate.
    pub goodput_of_clean: f64,
    /// The run as a search step would see it.
    pub run: Step,
}

/// What `capacity` found.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CapacityReport {
    /// The SIP target.
    pub target: String,
    /// The highest clean rate found; `None` when not even `start` was clean.
    pub clean_cps: Option<f64>,
    /// Whether the search stopped at `max` still clean (the target may do more).
    pub reached_max: bool,
    /// Every search run, in order.
    pub steps: Vec<Step>,
    /// The runs above the clean rate.
    pub overload: Vec<Overload>,
    /// A run at the clean rate right after the overload runs (one pause later): clean
    /// again when the target recovered from the storm within that pause.
    pub recovery: Option<Step>,
}

/// Judges a storm of `duration` by the clean rule.
pub fn judge(r: &Report, duration: Duration, tail: Duration) -> Step {
    let tail_s = (r.elapsed_s - duration.as_secs_f64()).max(0.0);
    let mut why = Vec::new();
    // Under 0.1%: failed / attempts < 1/1000.
    if r.attempts == 0 {
        why.push("no call was made".to_owned());
    } else if r.failed * 1000 >= r.attempts {
        why.push(format!(
            "{} of {} calls failed ({:.2}%)",
            r.failed,
            r.attempts,
            100.0 * r.failed as f64 / r.attempts as f64
        ));
    }
    if tail_s > tail.as_secs_f64() {
        why.push(format!(
            "the last call ended {tail_s:.1} s after the last INVITE (more than {:.1} s)",
            tail.as_secs_f64()
        ));
    }
    if r.achieved_cps < 0.98 * r.asked_cps {
        why.push(format!(
            "the generator made {:.0} of {:.0} calls/s",
            r.achieved_cps, r.asked_cps
        ));
    }
    Step {
        rate_cps: r.rate_cps,
        attempts: r.attempts,
        completed: r.completed,
        failed: r.failed,
        achieved_cps: r.achieved_cps,
        tail_s,
        clean: why.is_empty(),
        why: (!why.is_empty()).then(|| why.join("; ")),
        failures: r.failures.clone(),
        setup_p99_ms: r.setup.p99_ms,
        retransmissions: r.retransmissions,
    }
}

/// Runs the search and the overload runs with storms against `cfg.base`'s target;
/// `on_step` sees each run as it ends (progress).
pub async fn run(
    cfg: &CapacityConfig,
    on_step: impl FnMut(&str, &Step),
) -> Result<CapacityReport, StormError> {
    let storm_at = |rate: f64, duration: Duration| async move {
        let mut s = cfg.base.clone();
        s.rate = rate;
        s.ramp = None;
        s.calls = None;
        s.duration = Some(duration);
        s.script = None;
        let report = storm::run(s).await?;
        Ok(judge(&report, duration, cfg.tail))
    };
    search(cfg, storm_at, on_step).await
}

/// The search and the overload runs, with `run_at(rate, duration)` making each run.
pub async fn search<F, Fut>(
    cfg: &CapacityConfig,
    run_at: F,
    mut on_step: impl FnMut(&str, &Step),
) -> Result<CapacityReport, StormError>
where
    F: Fn(f64, Duration) -> Fut,
    Fut: std::future::Future<Output = Result<Step, StormError>>,
{
    if !(cfg.start > 0.0 && cfg.max >= cfg.start) {
        return Err(StormError::Config(
            "--start must be above 0 and at most --max".into(),
        ));
    }
    if !(cfg.precision > 0.0 && cfg.precision < 1.0) {
        return Err(StormError::Config(
            "--precision must be between 0 and 1".into(),
        ));
    }
    let mut steps = Vec::new();
    let (mut lo, mut hi): (Option<f64>, Option<f64>) = (None, None);
    let mut rate = cfg.start;
    // Doubling while clean.
    loop {
        let step = run_at(rate, cfg.step).await?;
        on_step("search", &step);
        let clean = step.clean;
        steps.push(step);
        tokio::time::sleep(cfg.pause).await;
        if !clean {
            hi = Some(rate);
            break;
        }
        lo = Some(rate);
        if rate >= cfg.max {
            break;
        }
        rate = (rate * 2.0).min(cfg.max);
    }
    // Bisecting between the last clean and the first unclean rate.
    if let (Some(mut l), Some(mut h)) = (lo, hi) {
        while h - l > cfg.precision * l {
            let mid = ((l + h) / 2.0).round().max(1.0);
            if mid <= l || mid >= h {
                break;
            }
            let step = run_at(mid, cfg.step).await?;
            on_step("search", &step);
            if step.clean {
                l = mid;
            } else {
                h = mid;
            }
            steps.push(step);
            tokio::time::sleep(cfg.pause).await;
        }
        lo = Some(l);
    }
    let mut overload = Vec::new();
    if let Some(clean) = lo {
        for &factor in &cfg.overload {
            let offered = clean * factor;
            let step = run_at(offered, cfg.overload_duration).await?;
            on_step("overload", &step);
            let goodput = step.completed as f64 / cfg.overload_duration.as_secs_f64();
            overload.push(Overload {
                factor,
                offered_cps: offered,
                goodput_cps: goodput,
                goodput_of_clean: goodput / clean,
                run: step,
            });
            tokio::time::sleep(cfg.pause).await;
        }
    }
    let mut recovery = None;
    if let Some(clean) = lo.filter(|_| !cfg.overload.is_empty()) {
        let step = run_at(clean, cfg.step).await?;
        on_step("recovery", &step);
        recovery = Some(step);
    }
    Ok(CapacityReport {
        target: cfg.base.target.to_string(),
        clean_cps: lo,
        reached_max: lo.is_some_and(|l| l >= cfg.max) && hi.is_none(),
        steps,
        overload,
        recovery,
    })
}

impl std::fmt::Display for CapacityReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "target {}", self.target)?;
        writeln!(
            f,
            "{:>10} {:>9} {:>9} {:>7} {:>8} {:>7}  verdict",
            "rate/s", "attempts", "completed", "failed", "made/s", "tail s"
        )?;
        for s in &self.steps {
            writeln!(
                f,
                "{:>10.0} {:>9} {:>9} {:>7} {:>8.0} {:>7.1}  {}",
                s.rate_cps,
                s.attempts,
                s.completed,
                s.failed,
                s.achieved_cps,
                s.tail_s,
                s.why.as_deref().unwrap_or("clean")
            )?;
        }
        match self.clean_cps {
            Some(c) if self.reached_max => {
                writeln!(f, "clean at {c:.0} calls/s, the most tried (--max)")?
            }
            Some(c) => writeln!(f, "highest clean rate: {c:.0} calls/s")?,
            None => writeln!(f, "no clean rate: the first run was not clean")?,
        }
        if !self.overload.is_empty() {
            writeln!(
                f,
                "{:>7} {:>10} {:>10} {:>9} {:>7} {:>11} {:>8}  failures",
                "factor", "offered/s", "goodput/s", "of clean", "failed", "setup p99", "retrans"
            )?;
            for o in &self.overload {
                let failures: Vec<String> = o
                    .run
                    .failures
                    .iter()
                    .map(|(k, v)| format!("{v} {k}"))
                    .collect();
                writeln!(
                    f,
                    "{:>6.1}x {:>10.0} {:>10.0} {:>8.0}% {:>7} {:>8.0} ms {:>8}  {}",
                    o.factor,
                    o.offered_cps,
                    o.goodput_cps,
                    100.0 * o.goodput_of_clean,
                    o.run.failed,
                    o.run.setup_p99_ms,
                    o.run.retransmissions,
                    failures.join(", ")
                )?;
            }
        }
        if let Some(r) = &self.recovery {
            writeln!(
                f,
                "recovery at {:.0} calls/s right after: {} of {} completed, {}",
                r.rate_cps,
                r.completed,
                r.attempts,
                r.why.as_deref().unwrap_or("clean")
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A made-up target that carries `capacity` calls/s cleanly, and past it completes
    /// only `capacity` a second (the rest refused).
    fn target(
        capacity: f64,
    ) -> impl Fn(f64, Duration) -> std::future::Ready<Result<Step, StormError>> {
        move |rate, duration| {
            let secs = duration.as_secs_f64();
            let attempts = (rate * secs) as u64;
            let completed = (rate.min(capacity) * secs) as u64;
            let clean = rate <= capacity;
            std::future::ready(Ok(Step {
                rate_cps: rate,
                attempts,
                completed,
                failed: attempts - completed,
                achieved_cps: rate,
                tail_s: 0.0,
                clean,
                why: (!clean).then(|| "refused".to_owned()),
                failures: Default::default(),
                setup_p99_ms: 1.0,
                retransmissions: 0,
            }))
        }
    }

    fn config() -> CapacityConfig {
        let mut c = CapacityConfig::new(StormConfig::new(
            "127.0.0.1:5060".parse().unwrap(),
            crate::plan::Numbers::parse("+15550100001").unwrap(),
        ));
        c.start = 100.0;
        c.max = 10_000.0;
        c.pause = Duration::ZERO;
        c
    }

    #[tokio::test]
    async fn the_search_doubles_then_bisects_to_the_precision() {
        let cfg = config();
        let r = search(&cfg, target(1_234.0), |_, _| {}).await.unwrap();
        let clean = r.clean_cps.unwrap();
        // Within 5% below the true capacity, never above it.
        assert!((1_234.0 * 0.95..=1_234.0).contains(&clean), "{r}");
        let rates: Vec<f64> = r.steps.iter().take(6).map(|s| s.rate_cps).collect();
        assert_eq!(rates, [100.0, 200.0, 400.0, 800.0, 1600.0, 1200.0], "{r}");
        assert!(!r.reached_max);
        // Goodput above capacity: the capacity, as a share of the clean rate.
        let shares: Vec<f64> = r.overload.iter().map(|o| o.factor).collect();
        assert_eq!(shares, [1.5, 2.0, 4.0]);
        for o in &r.overload {
            assert!((o.goodput_cps - 1_234.0).abs() < 1.0, "{o:?}");
        }
        // Then the clean rate once more, which this target carries again.
        let recovery = r.recovery.as_ref().unwrap();
        assert_eq!((recovery.rate_cps, recovery.clean), (clean, true), "{r}");
    }

    #[tokio::test]
    async fn a_target_clean_at_the_maximum_or_not_at_the_start() {
        let mut cfg = config();
        cfg.max = 300.0;
        let r = search(&cfg, target(1e9), |_, _| {}).await.unwrap();
        assert_eq!((r.clean_cps, r.reached_max), (Some(300.0), true), "{r}");
        let r = search(&cfg, target(50.0), |_, _| {}).await.unwrap();
        assert_eq!(
            (
                r.clean_cps,
                r.steps.len(),
                r.overload.len(),
                r.recovery.is_none()
            ),
            (None, 1, 0, true),
            "{r}"
        );
    }

    #[test]
    fn the_clean_rule_counts_failures_the_tail_and_the_generator() {
        let report = |attempts: u64, failed: u64, elapsed_s: f64, achieved: f64| Report {
            target: String::new(),
            to: String::new(),
            elapsed_s,
            cpu_s: None,
            rate_cps: 100.0,
            asked_cps: 100.0,
            achieved_cps: achieved,
            attempts,
            answered: attempts - failed,
            completed: attempts - failed,
            remote_bye: 0,
            failed,
            failures: Default::default(),
            asr: 1.0,
            setup: Default::default(),
            post_dial_delay: Default::default(),
            peak_active: 0,
            retransmissions: 0,
            duplicate_2xx: 0,
            bad_messages: 0,
            stray_messages: 0,
            unsupported_requests: 0,
            send_errors: 0,
            interrupted: false,
            media: None,
            devices: None,
            uas: None,
        };
        let d = Duration::from_secs(10);
        let t = Duration::from_secs(2);
        assert!(judge(&report(1000, 0, 10.5, 100.0), d, t).clean);
        // 1 in 1000 is not under 0.1%.
        assert!(!judge(&report(1000, 1, 10.5, 100.0), d, t).clean);
        assert!(judge(&report(2000, 1, 10.5, 100.0), d, t).clean);
        // Calls left waiting for Timer B: 32 s after the last INVITE.
        let late = judge(&report(1000, 0, 42.0, 100.0), d, t);
        assert!(!late.clean && late.why.unwrap().contains("after the last INVITE"));
        let slow = judge(&report(1000, 0, 10.5, 80.0), d, t);
        assert!(!slow.clean && slow.why.unwrap().contains("generator"));
    }
}
