//! Whether a node takes one more call: overload control for new calls.
//!
//! Pure and sans-IO: the driver passes the time and what it measured. Three limits, each
//! off at 0:
//!
//! - **call rate**: a token bucket of `max_rate` calls per second (a burst of one second's
//!   worth), so a storm is admitted at the rate the node was sized for;
//! - **live calls**: at most `max_calls` calls at once (relay ports, memory);
//! - **queue delay**: how long the requests waited before the node read them (the driver
//!   measures it per datagram from the kernel's receive timestamp). A node that is behind
//!   is behind for every request: admitting more calls only makes each wait longer until
//!   gateways retransmit, and the retransmissions are more load (the avalanche of a
//!   switch past its capacity). So when even the least-delayed request of a 100 ms window
//!   waited more than `max_delay` — a standing queue, in CoDel's sense, not a burst — new
//!   calls are shed until a window's least delay falls under half of it.
//! - **loop lag**: with SIP on several control threads, a call's other half (its user
//!   actor, the device's connection, the store) runs on the main loop, which can fall
//!   behind while every SIP socket is read in time. Its lag (how late a timer of that loop
//!   fires) past `max_delay` sheds new calls the same way, until it is under half of it.
//!
//! A shed call is refused at once and statelessly (503 with Retry-After): refusing costs a
//! parse and a send, a fraction of what a call costs, so the calls admitted keep the node's
//! capacity, and goodput stays flat however far the offered load goes past it. Requests
//! inside calls already admitted (ACK, BYE, re-INVITE) are never shed.

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// The limits of an [`Admission`]; 0 (or a zero duration) turns one off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverloadLimits {
    /// New calls per second (a token bucket holding one second's worth).
    pub max_rate: u32,
    /// Calls at once.
    pub max_calls: usize,
    /// Queue delay past which new calls are shed.
    pub max_delay: Duration,
}

impl OverloadLimits {
    /// No limit at all.
    pub const OFF: OverloadLimits = OverloadLimits {
        max_rate: 0,
        max_calls: 0,
        max_delay: Duration::ZERO,
    };
}

/// Why a new call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// Over `max_rate`.
    CallRate,
    /// At `max_calls`.
    Calls,
    /// The node is behind (`max_delay`).
    QueueDelay,
    /// The main loop is behind (`max_delay`).
    LoopLag,
}

impl Shed {
    /// The label in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Shed::CallRate => "call_rate",
            Shed::Calls => "calls",
            Shed::QueueDelay => "queue_delay",
            Shed::LoopLag => "loop_lag",
        }
    }
}

/// The window over which the least queue delay is taken.
pub const DELAY_WINDOW: Duration = Duration::from_millis(100);

/// A timer noticed this long after its deadline says the node's own loop was behind (a
/// stalled event loop, a stopped process): what the timer waited for may have come in
/// time and still be queued. Timeouts that would blame a peer (a trunk's probe, a
/// device's offer acknowledgement) are not held against it then.
pub const LATE: Duration = Duration::from_millis(250);

/// A least queue delay past which the node counts as behind even where queue-delay
/// shedding is off ([`Admission::behind`]).
pub const BEHIND: Duration = Duration::from_millis(250);

/// Admission of new calls.
#[derive(Debug, Clone)]
pub struct Admission {
    limits: OverloadLimits,
    /// Tokens in the rate bucket (calls), and when it was last refilled.
    tokens: f64,
    refilled: Option<Instant>,
    /// The current delay window: when it started and the least delay seen in it.
    window: Option<(Instant, Duration)>,
    /// The least delay of the last complete window.
    last_min: Duration,
    shedding: bool,
    /// The main loop's lag as last told, and whether it sheds.
    lag: Duration,
    lag_shedding: bool,
}

impl Admission {
    /// An admission with `limits`, its rate bucket full.
    pub fn new(limits: OverloadLimits) -> Self {
        Self {
            limits,
            tokens: f64::from(limits.max_rate),
            refilled: None,
            window: None,
            last_min: Duration::ZERO,
            shedding: false,
            lag: Duration::ZERO,
            lag_shedding: false,
        }
    }

    /// The limits.
    pub fn limits(&self) -> OverloadLimits {
        self.limits
    }

    /// A request was read `delay` after the kernel received it.
    pub fn handle_delay(&mut self, now: Instant, delay: Duration) {
        match &mut self.window {
            Some((start, min)) if now.saturating_duration_since(*start) < DELAY_WINDOW => {
                *min = (*min).min(delay);
            }
            _ => {
                if let Some((_, min)) = self.window.replace((now, delay)) {
                    self.close_window(min);
                }
            }
        }
    }

    fn close_window(&mut self, min: Duration) {
        self.last_min = min;
        self.shedding = self.hysteresis(self.shedding, min);
    }

    /// The main loop's lag, measured now: past `max_delay` new calls are shed (with the
    /// same hysteresis as queue delay).
    pub fn handle_lag(&mut self, lag: Duration) {
        self.lag = lag;
        self.lag_shedding = self.hysteresis(self.lag_shedding, lag);
    }

    /// Shedding starts above `max_delay` and stops under half of it (off at 0).
    fn hysteresis(&self, shedding: bool, delay: Duration) -> bool {
        let max = self.limits.max_delay;
        if max.is_zero() {
            false
        } else if delay > max {
            true
        } else if delay < max / 2 {
            false
        } else {
            shedding
        }
    }

    /// Whether new calls are being shed for queue delay or loop lag.
    pub fn shedding(&self) -> bool {
        self.shedding || self.lag_shedding
    }

    /// Whether the node is behind: shedding, or (shedding off or not yet on) the last
    /// window's least delay or the loop's lag at least [`BEHIND`]. Timeouts toward peers
    /// meanwhile may be the node's own lateness, not the peer's.
    pub fn behind(&self) -> bool {
        self.shedding() || self.last_min >= BEHIND || self.lag >= BEHIND
    }

    /// The least queue delay of the last complete window.
    pub fn queue_delay(&self) -> Duration {
        self.last_min
    }

    /// Time passed: a window that ended with no request since (the queue drained, then
    /// silence) counts as closed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some((start, min)) = self.window
            && now.saturating_duration_since(start) >= DELAY_WINDOW
        {
            self.close_window(min);
            self.window = None;
        }
    }

    /// Whether a new call may start now, `live` calls being up; an admitted call takes a
    /// token of the rate bucket.
    pub fn admit(&mut self, now: Instant, live: usize) -> Result<(), Shed> {
        self.handle_timeout(now);
        if self.shedding {
            return Err(Shed::QueueDelay);
        }
        if self.lag_shedding {
            return Err(Shed::LoopLag);
        }
        if self.limits.max_calls > 0 && live >= self.limits.max_calls {
            return Err(Shed::Calls);
        }
        if self.limits.max_rate > 0 {
            let rate = f64::from(self.limits.max_rate);
            if let Some(last) = self.refilled {
                let secs = now.saturating_duration_since(last).as_secs_f64();
                self.tokens = (self.tokens + secs * rate).min(rate);
            }
            self.refilled = Some(now);
            if self.tokens < 1.0 {
                return Err(Shed::CallRate);
            }
            self.tokens -= 1.0;
        }
        Ok(())
    }
}

/// Requests refused lately, so that their retransmissions get the same answer: a refusal
/// keeps no transaction, and a retransmission sent before the 503 reached the gateway
/// (it waited in the same queue) would otherwise start the call the gateway has already
/// given up on. Bounded: past `cap` keys the oldest goes, and a key is kept `ttl`.
#[derive(Debug)]
pub struct RecentlyRefused<K> {
    keys: HashSet<K>,
    order: VecDeque<(Instant, K)>,
    ttl: Duration,
    cap: usize,
}

impl<K: Hash + Eq + Clone> RecentlyRefused<K> {
    /// An empty set keeping keys `ttl`, at most `cap` of them.
    pub fn new(ttl: Duration, cap: usize) -> Self {
        Self {
            keys: HashSet::new(),
            order: VecDeque::new(),
            ttl,
            cap: cap.max(1),
        }
    }

    /// `key` was refused now.
    pub fn insert(&mut self, now: Instant, key: K) {
        self.expire(now);
        if self.keys.len() >= self.cap
            && let Some((_, old)) = self.order.pop_front()
        {
            self.keys.remove(&old);
        }
        if self.keys.insert(key.clone()) {
            self.order.push_back((now, key));
        }
    }

    /// Whether `key` was refused within the last `ttl`.
    pub fn contains(&mut self, now: Instant, key: &K) -> bool {
        self.expire(now);
        self.keys.contains(key)
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.saturating_duration_since(*at) < self.ttl {
                break;
            }
            if let Some((_, k)) = self.order.pop_front() {
                self.keys.remove(&k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_rate: u32, max_calls: usize, max_delay_ms: u64) -> OverloadLimits {
        OverloadLimits {
            max_rate,
            max_calls,
            max_delay: Duration::from_millis(max_delay_ms),
        }
    }

    #[test]
    fn off_admits_everything() {
        let mut a = Admission::new(OverloadLimits::OFF);
        let t = Instant::now();
        for i in 0..10_000 {
            a.handle_delay(t, Duration::from_secs(5));
            assert_eq!(a.admit(t + Duration::from_millis(i), 1_000_000), Ok(()));
        }
    }

    #[test]
    fn the_rate_bucket_admits_a_seconds_worth_then_the_rate() {
        let mut a = Admission::new(limits(10, 0, 0));
        let t = Instant::now();
        let admitted = (0..50).filter(|_| a.admit(t, 0).is_ok()).count();
        assert_eq!(admitted, 10, "a full bucket: one second's worth");
        assert_eq!(a.admit(t, 0), Err(Shed::CallRate));
        // 100 ms later: one more token.
        let t1 = t + Duration::from_millis(100);
        assert_eq!(a.admit(t1, 0), Ok(()));
        assert_eq!(a.admit(t1, 0), Err(Shed::CallRate));
        // Over 10 s at 40 offered per second, 10 per second get in.
        let mut ok = 0;
        for i in 1..=400u64 {
            if a.admit(t1 + Duration::from_millis(25 * i), 0).is_ok() {
                ok += 1;
            }
        }
        assert!((99..=101).contains(&ok), "{ok} admitted in 10 s at 10/s");
        // A long pause refills to one second's worth, no more.
        let t2 = t1 + Duration::from_secs(3600);
        assert_eq!((0..50).filter(|_| a.admit(t2, 0).is_ok()).count(), 10);
    }

    #[test]
    fn live_calls_are_capped() {
        let mut a = Admission::new(limits(0, 3, 0));
        let t = Instant::now();
        assert_eq!(a.admit(t, 2), Ok(()));
        assert_eq!(a.admit(t, 3), Err(Shed::Calls));
        assert_eq!(a.admit(t, 2), Ok(()));
    }

    #[test]
    fn a_standing_queue_sheds_a_burst_does_not() {
        let mut a = Admission::new(limits(0, 0, 50));
        let t = Instant::now();
        let ms = Duration::from_millis;
        // A burst: some requests wait long, but one in each window waited little.
        for i in 0..30 {
            let d = if i % 10 == 0 { ms(1) } else { ms(200) };
            a.handle_delay(t + ms(10 * i), d);
        }
        assert!(!a.shedding());
        assert_eq!(a.admit(t + ms(300), 0), Ok(()));
        // A standing queue: every request of a window waited over 50 ms.
        for i in 30..60 {
            a.handle_delay(t + ms(10 * i), ms(80));
        }
        assert!(a.shedding());
        assert_eq!(a.queue_delay(), ms(80));
        assert_eq!(a.admit(t + ms(600), 0), Err(Shed::QueueDelay));
        // Down to 40 ms (under the limit, over half of it): still shedding.
        for i in 60..90 {
            a.handle_delay(t + ms(10 * i), ms(40));
        }
        assert!(a.shedding(), "hysteresis: not back under half the limit");
        // Drained: a window under 25 ms admits again.
        for i in 90..120 {
            a.handle_delay(t + ms(10 * i), ms(2));
        }
        assert_eq!(a.admit(t + ms(1200), 0), Ok(()));
    }

    #[test]
    fn behind_without_shedding_is_a_quarter_second_of_least_delay() {
        let t0 = Instant::now();
        let mut a = Admission::new(limits(0, 0, 0)); // queue-delay shedding off
        let ms = Duration::from_millis;
        a.handle_delay(t0, ms(300));
        a.handle_delay(t0 + ms(100), ms(10)); // closes the first window: least 300 ms
        assert!(a.behind() && !a.shedding());
        a.handle_delay(t0 + ms(200), ms(10)); // the second window: 10 ms
        assert!(!a.behind());
        assert_eq!(a.admit(t0 + ms(200), 0), Ok(()));
    }

    #[test]
    fn a_lagging_main_loop_sheds_until_it_is_under_half_the_limit() {
        let mut a = Admission::new(limits(0, 0, 100));
        let now = Instant::now();
        let ms = Duration::from_millis;
        a.handle_lag(ms(40));
        assert_eq!(a.admit(now, 0), Ok(()));
        assert!(!a.behind());
        a.handle_lag(ms(120));
        assert_eq!(a.admit(now, 0), Err(Shed::LoopLag));
        assert!(a.shedding());
        a.handle_lag(ms(60)); // under the limit, not under half: still shedding
        assert_eq!(a.admit(now, 0), Err(Shed::LoopLag));
        a.handle_lag(ms(10));
        assert_eq!(a.admit(now, 0), Ok(()));
        // Off with the queue-delay limit, but a long lag still counts as behind.
        let mut off = Admission::new(limits(0, 0, 0));
        off.handle_lag(ms(300));
        assert_eq!(off.admit(now, 0), Ok(()));
        assert!(off.behind());
    }

    #[test]
    fn silence_after_a_drained_queue_ends_the_shedding() {
        let mut a = Admission::new(limits(0, 0, 50));
        let t = Instant::now();
        let ms = Duration::from_millis;
        for i in 0..25 {
            a.handle_delay(t + ms(10 * i), ms(90));
        }
        assert!(a.shedding());
        // The last window before the silence had a short delay: it closes on the next
        // admission even though no request came since.
        a.handle_delay(t + ms(300), ms(1));
        assert!(a.shedding());
        a.handle_timeout(t + ms(2000));
        assert!(!a.shedding());
        assert_eq!(a.queue_delay(), ms(1));
    }

    #[test]
    fn refused_keys_are_remembered_for_a_while_and_bounded() {
        let t = Instant::now();
        let s = Duration::from_secs;
        let mut r = RecentlyRefused::new(s(4), 3);
        r.insert(t, "a");
        r.insert(t, "a");
        assert_eq!(r.len(), 1);
        assert!(r.contains(t + s(3), &"a"));
        assert!(!r.contains(t + s(4), &"a"), "expired after the ttl");
        assert!(r.is_empty());
        for (i, k) in ["a", "b", "c", "d"].into_iter().enumerate() {
            r.insert(t + s(10) + Duration::from_millis(i as u64), k);
        }
        assert_eq!(r.len(), 3, "capped");
        assert!(!r.contains(t + s(10), &"a"), "the oldest went");
        assert!(r.contains(t + s(10), &"d"));
    }
}
