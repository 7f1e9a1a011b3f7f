//! Which SIP shard owns a message (`[sip] control_threads`).
//!
//! With more than one control thread, each runs a [`super::driver::SipDriver`] of its own:
//! its own [`super::core::SipCore`] (transactions, dialogs, calls) and the call actors it
//! started, on its own actix arbiter. Every message of a call must reach the same shard,
//! and the only thing every message of a call carries is its Call-ID, so the owner is a
//! function of the Call-ID alone:
//!
//! - Call-IDs Parley makes (a trunk leg's INVITE, an OPTIONS probe) name their shard:
//!   `<token>@s<k>.parley`; a response or an in-dialog request from the trunk comes back
//!   to shard `k`.
//! - Any other Call-ID (a gateway's) hashes to a shard.
//!
//! Any shard reads the shared UDP socket; what it reads for another shard it hands over
//! (one message between threads). A datagram without a Call-ID stays where it was read:
//! the core answers it 400 or drops it, with no call to find.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use super::msg::trim;

/// What the shards of one node share: each one's figures, so that the node's gauges
/// (transactions, queue delay, shedding) and the trunks' "node behind" signal cover all
/// of them.
#[derive(Debug)]
pub struct Shards {
    slots: Vec<Slot>,
    behind: AtomicUsize,
    /// How late the main loop's lag probe last fired, µs.
    loop_lag_us: AtomicU64,
}

/// Datagrams handed to one shard and not yet taken up by it beyond which more are dropped
/// (as a full socket buffer would drop them): a flood aimed at one shard cannot grow its
/// mailbox without bound. About 30 MB of datagrams at most per shard.
pub const MAX_HANDED_OVER: usize = 65_536;

#[derive(Debug, Default)]
struct Slot {
    /// Datagrams handed to this shard and not yet taken up.
    handed: AtomicUsize,
    client: AtomicUsize,
    server: AtomicUsize,
    delay_us: AtomicU64,
    shedding: AtomicBool,
}

impl Shards {
    /// Figures for `n` shards (at least one).
    pub fn new(n: usize) -> Self {
        Self {
            slots: (0..n.max(1)).map(|_| Slot::default()).collect(),
            behind: AtomicUsize::new(0),
            loop_lag_us: AtomicU64::new(0),
        }
    }

    /// Counts a datagram handed to shard `k`; false (and not counted) when `k` holds
    /// [`MAX_HANDED_OVER`] already.
    pub fn hand_over(&self, k: usize) -> bool {
        let Some(s) = self.slots.get(k) else {
            return false;
        };
        s.handed
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < MAX_HANDED_OVER).then_some(n + 1)
            })
            .is_ok()
    }

    /// Shard `k` took up a datagram handed to it.
    pub fn taken_up(&self, k: usize) {
        if let Some(s) = self.slots.get(k) {
            let _ = s
                .handed
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }

    /// The main loop's lag, as its probe measured it.
    pub fn set_loop_lag(&self, lag: Duration) {
        self.loop_lag_us
            .store(lag.as_micros() as u64, Ordering::Relaxed);
    }

    /// The main loop's lag, as last measured.
    pub fn loop_lag(&self) -> Duration {
        Duration::from_micros(self.loop_lag_us.load(Ordering::Relaxed))
    }

    /// How many shards there are.
    pub fn count(&self) -> usize {
        self.slots.len()
    }

    /// Shard `k`'s transactions in flight; the node's totals (client, server).
    pub fn transactions(&self, k: usize, client: usize, server: usize) -> (usize, usize) {
        if let Some(s) = self.slots.get(k) {
            s.client.store(client, Ordering::Relaxed);
            s.server.store(server, Ordering::Relaxed);
        }
        self.slots.iter().fold((0, 0), |(c, v), s| {
            (
                c + s.client.load(Ordering::Relaxed),
                v + s.server.load(Ordering::Relaxed),
            )
        })
    }

    /// Shard `k`'s queue delay and whether it sheds; the node's (the worst delay, and
    /// whether any shard sheds).
    pub fn queue_delay(&self, k: usize, delay: Duration, shedding: bool) -> (Duration, bool) {
        if let Some(s) = self.slots.get(k) {
            s.delay_us
                .store(delay.as_micros() as u64, Ordering::Relaxed);
            s.shedding.store(shedding, Ordering::Relaxed);
        }
        let worst = self
            .slots
            .iter()
            .map(|s| s.delay_us.load(Ordering::Relaxed))
            .max();
        let any = self
            .slots
            .iter()
            .any(|s| s.shedding.load(Ordering::Relaxed));
        (Duration::from_micros(worst.unwrap_or(0)), any)
    }

    /// A shard fell behind (`true`) or caught up; whether the node as a whole changed
    /// (the first shard to fall behind, the last to catch up), and to what.
    pub fn behind(&self, now_behind: bool) -> Option<bool> {
        if now_behind {
            (self.behind.fetch_add(1, Ordering::Relaxed) == 0).then_some(true)
        } else {
            (self.behind.fetch_sub(1, Ordering::Relaxed) == 1).then_some(false)
        }
    }
}

/// The host part of the Call-IDs shard `k` of `n` makes.
pub fn call_id_host(k: usize, n: usize) -> String {
    if n <= 1 {
        "parley".to_string()
    } else {
        format!("s{k}.parley")
    }
}

/// The shard of `n` that owns the call a message with this Call-ID belongs to.
pub fn owner_of_call_id(call_id: &[u8], n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    if let Some(k) = own_shard(call_id)
        && k < n
    {
        return k;
    }
    // A fixed hash (SipHash with zero keys): every shard computes the same owner. A
    // gateway that picks Call-IDs to land on one shard only loads that shard.
    let mut h = std::hash::DefaultHasher::new();
    call_id.hash(&mut h);
    (h.finish() % n as u64) as usize
}

/// The shard named by a Call-ID of ours (`…@s<k>.parley`).
fn own_shard(call_id: &[u8]) -> Option<usize> {
    let at = call_id.iter().rposition(|&b| b == b'@')?;
    let host = call_id[at + 1..].strip_prefix(b"s")?;
    let digits = host.strip_suffix(b".parley")?;
    if digits.is_empty() || digits.len() > 3 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The shard that owns a raw SIP message, or `None` when it has no Call-ID header (then
/// whichever shard read it handles it).
pub fn owner(datagram: &[u8], n: usize) -> Option<usize> {
    if n <= 1 {
        return Some(0);
    }
    call_id(datagram).map(|c| owner_of_call_id(c, n))
}

/// The value of the Call-ID header (`Call-ID:` or compact `i:`, any case) of a raw SIP
/// message, trimmed; only the header section is looked at.
pub fn call_id(msg: &[u8]) -> Option<&[u8]> {
    let mut rest = msg;
    // Skip the start line.
    let nl = rest.iter().position(|&b| b == b'\n')?;
    rest = &rest[nl + 1..];
    loop {
        let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        let line = rest[..end].strip_suffix(b"\r").unwrap_or(&rest[..end]);
        if line.is_empty() {
            return None; // end of headers
        }
        if let Some(colon) = line.iter().position(|&b| b == b':') {
            let name = trim(&line[..colon]);
            if name.eq_ignore_ascii_case(b"call-id") || name.eq_ignore_ascii_case(b"i") {
                let value = trim(&line[colon + 1..]);
                return (!value.is_empty()).then_some(value);
            }
        }
        if end >= rest.len() {
            return None;
        }
        rest = &rest[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_call_id_is_found_in_long_and_compact_form_and_only_in_the_headers() {
        let m = b"INVITE sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP x;branch=z9hG4bK1\r\nCALL-ID:  abc@host \r\nCSeq: 1 INVITE\r\n\r\n";
        assert_eq!(call_id(m), Some(&b"abc@host"[..]));
        let m = b"SIP/2.0 200 OK\r\ni: xyz\r\n\r\n";
        assert_eq!(call_id(m), Some(&b"xyz"[..]));
        // A header named like it, and a body line that looks like one, are not it.
        let m = b"BYE sip:a@b SIP/2.0\r\nCall-Info: <x>\r\n\r\nCall-ID: in-body\r\n";
        assert_eq!(call_id(m), None);
        assert_eq!(call_id(b"garbage"), None);
        assert_eq!(call_id(b"BYE sip:a SIP/2.0\nCall-ID:\n\n"), None);
        assert_eq!(
            call_id(b"BYE sip:a SIP/2.0\nCall-ID: bare-lf\n\n"),
            Some(&b"bare-lf"[..])
        );
    }

    #[test]
    fn the_node_is_behind_while_any_shard_is_and_its_figures_sum_the_shards() {
        let s = Shards::new(2);
        assert_eq!(s.behind(true), Some(true));
        assert_eq!(s.behind(true), None);
        assert_eq!(s.behind(false), None);
        assert_eq!(s.behind(false), Some(false));
        assert_eq!(s.transactions(0, 1, 10), (1, 10));
        assert_eq!(s.transactions(1, 2, 20), (3, 30));
        assert_eq!(s.transactions(0, 0, 0), (2, 20));
        let ms = Duration::from_millis;
        assert_eq!(s.queue_delay(0, ms(5), false), (ms(5), false));
        assert_eq!(s.queue_delay(1, ms(150), true), (ms(150), true));
        assert_eq!(s.queue_delay(1, ms(1), false), (ms(5), false));
    }

    #[test]
    fn hand_overs_to_one_shard_are_bounded() {
        let s = Shards::new(2);
        for _ in 0..MAX_HANDED_OVER {
            assert!(s.hand_over(1));
        }
        assert!(!s.hand_over(1));
        assert!(s.hand_over(0), "another shard's bound is its own");
        s.taken_up(1);
        assert!(s.hand_over(1));
        assert!(!s.hand_over(7));
    }

    #[test]
    fn our_call_ids_name_their_shard_and_others_hash_over_all_shards() {
        for n in [2, 3, 8] {
            for k in 0..n {
                let cid = format!("tok3n@{}", call_id_host(k, n));
                assert_eq!(owner_of_call_id(cid.as_bytes(), n), k);
            }
        }
        assert_eq!(call_id_host(0, 1), "parley");
        // Out of range, malformed or foreign: hashed, the same on every shard.
        for cid in [
            "x@s9.parley",
            "x@s.parley",
            "x@s1x.parley",
            "x@s1.parley.example",
        ] {
            let a = owner_of_call_id(cid.as_bytes(), 2);
            assert!(a < 2);
            assert_eq!(a, owner_of_call_id(cid.as_bytes(), 2));
        }
        let mut seen = [0usize; 4];
        for i in 0..4000 {
            seen[owner_of_call_id(format!("{i}-gw@10.0.0.1").as_bytes(), 4)] += 1;
        }
        // Gateway Call-IDs spread over every shard (roughly evenly).
        assert!(seen.iter().all(|&c| c > 800), "{seen:?}");
        assert_eq!(
            owner(b"BYE sip:a SIP/2.0\r\nCall-ID: q@s1.parley\r\n\r\n", 2),
            Some(1)
        );
        assert_eq!(owner(b"junk", 2), None);
        assert_eq!(owner(b"junk", 1), Some(0));
    }
}
