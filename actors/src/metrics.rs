//! Control-plane metrics: names, units and descriptions in one place.
//!
//! Label values come from fixed sets (dispositions, routes, statuses), never from user or
//! call ids, so cardinality stays bounded.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// Calls in progress (ringing or answered).
pub const CALLS_ACTIVE: &str = "parley_calls_active";
/// Finished calls, by `disposition` and `route`.
pub const CALLS_TOTAL: &str = "parley_calls_total";
/// Time from INVITE to the caller being answered.
pub const CALL_SETUP_SECONDS: &str = "parley_call_setup_seconds";
/// Time from INVITE to the first ringing leg (post-dial delay).
pub const CALL_RINGING_SECONDS: &str = "parley_call_ringing_seconds";
/// Connected IM device sessions.
pub const PRESENCE_SESSIONS_ACTIVE: &str = "parley_presence_sessions_active";
/// Presence updates received from devices, by `status`.
pub const PRESENCE_UPDATES_TOTAL: &str = "parley_presence_updates_total";
/// Control messages to devices dropped because the device's queue was full.
pub const DEVICE_QUEUE_DROPS_TOTAL: &str = "parley_device_queue_drops_total";
/// Trunk health (1 up, 0 down), by `trunk`.
pub const TRUNK_UP: &str = "parley_trunk_up";
/// Trunk health observations, by `trunk`, `source` (`options`, `call`) and `result`.
pub const TRUNK_PROBES_TOTAL: &str = "parley_trunk_probes_total";
/// Final answers of trunks to calls' INVITEs, by `trunk` and `result` (`answered`;
/// `failed`: 408, 5xx or no answer, the call fails over when another trunk can take it;
/// `rejected`: the callee's answer — busy, declined, not found).
pub const TRUNK_CALLS_TOTAL: &str = "parley_trunk_calls_total";
/// Calls that moved on from a failed trunk to the next one, by the failed `trunk`.
pub const TRUNK_FAILOVERS_TOTAL: &str = "parley_trunk_failovers_total";
/// Calls refused 486 because the callee already had `[calls] max_ringing_per_user`
/// calls ringing.
pub const CALLS_REFUSED_BUSY_TOTAL: &str = "parley_calls_refused_ringing_cap_total";
/// Presence updates pushed to subscribed devices.
pub const PRESENCE_FANOUT_TOTAL: &str = "parley_presence_fanout_total";
/// Chat messages sent by devices, by `result` (`delivered`: handed to an online device;
/// `stored`: kept for the recipient's next login; `unknown_user`, `rejected` (bad text),
/// `mailbox_full`, `busy`).
pub const CHAT_MESSAGES_TOTAL: &str = "parley_chat_messages_total";
/// Kept chat messages handed to a device when it logged in.
pub const CHAT_OFFLINE_DELIVERED_TOTAL: &str = "parley_chat_offline_delivered_total";
/// Receipts sent to senders' devices, by `status` (`delivered`, `read`).
pub const CHAT_RECEIPTS_TOTAL: &str = "parley_chat_receipts_total";
/// Answered calls ended because no media crossed them for the media timeout.
pub const MEDIA_TIMEOUTS_TOTAL: &str = "parley_media_timeouts_total";
/// Call offers a device never acknowledged: the device was presumed lost, its connection
/// closed, and the call routed on.
pub const OFFERS_UNACKNOWLEDGED_TOTAL: &str = "parley_offers_unacknowledged_total";
/// Calls or legs refused 503 because the relay could not give them media, by `reason`
/// (`ports_exhausted`: the port range or a worker's cap; `unavailable`: out of file
/// descriptors, relay stopped).
pub const MEDIA_SETUP_FAILURES_TOTAL: &str = "parley_media_setup_failures_total";
/// Re-routes of ringing calls after a presence change.
pub const REROUTES_TOTAL: &str = "parley_reroutes_total";
/// Time from a presence change to the re-routed leg ringing.
pub const REROUTE_SECONDS: &str = "parley_reroute_seconds";
/// Answered device calls by the answering device's predicted rank (`1`, `2`, `3+`, `unranked`).
pub const ANSWERED_RANK_TOTAL: &str = "parley_answered_rank_total";
/// Routing decisions, by `route` (`ring`, `forward`, `reject`, `none`) and `by` (`rule`, `default`).
pub const ROUTE_DECISIONS_TOTAL: &str = "parley_route_decisions_total";

/// Registers descriptions with the installed recorder.
pub fn describe() {
    describe_gauge!(
        CALLS_ACTIVE,
        Unit::Count,
        "Calls in progress (ringing or answered)"
    );
    describe_counter!(
        CALLS_TOTAL,
        Unit::Count,
        "Finished calls by disposition and route"
    );
    describe_histogram!(
        CALL_SETUP_SECONDS,
        Unit::Seconds,
        "INVITE received to 200 OK sent to the caller"
    );
    describe_histogram!(
        CALL_RINGING_SECONDS,
        Unit::Seconds,
        "INVITE received to 180 Ringing sent to the caller"
    );
    describe_gauge!(
        PRESENCE_SESSIONS_ACTIVE,
        Unit::Count,
        "Logged-in IM device sessions"
    );
    describe_counter!(
        PRESENCE_UPDATES_TOTAL,
        Unit::Count,
        "Presence updates received from devices, by status"
    );
    describe_counter!(
        DEVICE_QUEUE_DROPS_TOTAL,
        Unit::Count,
        "Control messages dropped because a device's send queue was full"
    );
    describe_counter!(
        ROUTE_DECISIONS_TOTAL,
        Unit::Count,
        "Routing decisions by route"
    );
    describe_gauge!(
        TRUNK_UP,
        Unit::Count,
        "Trunk health: 1 up, 0 down (calls go over the packet network)"
    );
    describe_counter!(
        TRUNK_PROBES_TOTAL,
        Unit::Count,
        "Trunk health observations by source (OPTIONS probe or call) and result"
    );
    describe_counter!(
        REROUTES_TOTAL,
        Unit::Count,
        "Ringing calls re-routed after a presence change"
    );
    describe_histogram!(
        REROUTE_SECONDS,
        Unit::Seconds,
        "Presence change to the re-routed leg ringing"
    );
    describe_counter!(
        PRESENCE_FANOUT_TOTAL,
        Unit::Count,
        "Presence updates pushed to subscribed devices"
    );
    describe_counter!(
        CHAT_MESSAGES_TOTAL,
        Unit::Count,
        "Chat messages sent by devices, by result (delivered, stored for an offline user, refused)"
    );
    describe_counter!(
        CHAT_OFFLINE_DELIVERED_TOTAL,
        Unit::Count,
        "Kept chat messages handed to a device at its login"
    );
    describe_counter!(
        CHAT_RECEIPTS_TOTAL,
        Unit::Count,
        "Delivery and read receipts relayed to senders, by status"
    );
    describe_counter!(
        ANSWERED_RANK_TOTAL,
        Unit::Count,
        "Answered device calls by the predicted rank of the answering device"
    );
    describe_counter!(
        CALLS_REFUSED_BUSY_TOTAL,
        Unit::Count,
        "Calls refused 486 because the callee already had calls.max_ringing_per_user calls ringing"
    );
    describe_counter!(
        TRUNK_CALLS_TOTAL,
        Unit::Count,
        "Final answers of a trunk to calls' INVITEs, by trunk and result (answered; failed: 408/5xx/no answer; rejected: busy, declined, not found)"
    );
    describe_counter!(
        TRUNK_FAILOVERS_TOTAL,
        Unit::Count,
        "Calls that failed over from this trunk (408/5xx/no answer) to the next one of their number's trunk group"
    );
    describe_counter!(
        OFFERS_UNACKNOWLEDGED_TOTAL,
        Unit::Count,
        "Call offers a device never acknowledged (device presumed lost, call routed on)"
    );
    describe_counter!(
        MEDIA_TIMEOUTS_TOTAL,
        Unit::Count,
        "Answered calls ended because no media crossed them for the media timeout"
    );
    describe_counter!(
        MEDIA_SETUP_FAILURES_TOTAL,
        Unit::Count,
        "Calls or legs refused 503 because the relay had no media for them, by reason"
    );
}
