//! Node metrics: names, units and descriptions, and the Prometheus exporter.
//!
//! Names follow Prometheus conventions: `parley_` prefix, base units, `_total` counters,
//! `_seconds` histograms. Labels take values from fixed sets only.

use metrics::{Unit, describe_counter, describe_gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// SIP requests received, by `method`.
pub const SIP_REQUESTS_TOTAL: &str = "parley_sip_requests_total";
/// SIP responses sent or received, by `code` and `direction` (`sent`/`received`).
pub const SIP_RESPONSES_TOTAL: &str = "parley_sip_responses_total";
/// SIP datagrams that could not be parsed, by `reason`.
pub const SIP_PARSE_ERRORS_TOTAL: &str = "parley_sip_parse_errors_total";
/// SIP datagrams the socket refused to send.
pub const SIP_SEND_ERRORS_TOTAL: &str = "parley_sip_send_errors_total";
/// SIP transactions in flight, by `kind` (`server`, `client`).
pub const SIP_TRANSACTIONS: &str = "parley_sip_transactions";
/// SIP connections (TCP) open now.
pub const SIP_CONNECTIONS: &str = "parley_sip_connections";
/// SIP connections refused or not opened because `sip.tcp_max_connections` are open, by
/// `transport`.
pub const SIP_CONNECTIONS_REFUSED_TOTAL: &str = "parley_sip_connections_refused_total";
/// SIP connections closed, by `transport` and `reason` (`closed` by the peer, `idle`,
/// `slow`: a message not completed in time, `framing`: unparseable stream, `error`,
/// `dropped`: closed by the node).
pub const SIP_CONNECTIONS_CLOSED_TOTAL: &str = "parley_sip_connections_closed_total";
/// SIP retransmissions sent by our transactions.
pub const SIP_RETRANSMISSIONS_TOTAL: &str = "parley_sip_retransmissions_total";
/// Requests that name no dialog or transaction of ours (481/482), by `method` (`BYE`,
/// `CANCEL`, `INVITE`: re-INVITE or merged request). A steady rate means a peer with
/// stale state — or someone probing Call-IDs.
pub const SIP_UNMATCHED_REQUESTS_TOTAL: &str = "parley_sip_unmatched_requests_total";
/// Requests refused with 503 + Retry-After, by `reason` (`draining`; `transactions`: the
/// server-transaction cap; `transactions_per_source`: a source's share of it;
/// `calls_per_source`: the source's live-call cap; overload control of new calls:
/// `call_rate`, `calls`, `queue_delay`).
pub const SIP_REJECTED_OVERLOAD_TOTAL: &str = "parley_sip_overload_rejections_total";
/// The least time a SIP datagram waited in the kernel's receive queue over the last
/// 100 ms (seconds): above `[sip] max_queue_delay_ms`, new calls are shed.
pub const SIP_QUEUE_DELAY_SECONDS: &str = "parley_sip_queue_delay_seconds";
/// 1 while new calls are shed for queue delay, else 0.
pub const SIP_SHEDDING: &str = "parley_sip_shedding";
/// Control threads carrying SIP (`[sip] control_threads`).
pub const SIP_CONTROL_THREADS: &str = "parley_sip_control_threads";
/// New calls started, by the SIP shard (`shard`) that owns them.
pub const SIP_SHARD_CALLS_TOTAL: &str = "parley_sip_shard_calls_total";
/// SIP datagrams one shard read off the socket for another and handed to it.
pub const SIP_SHARD_HANDOFFS_TOTAL: &str = "parley_sip_shard_handoffs_total";
/// SIP datagrams dropped because the shard they were for held too many handed over.
pub const SIP_SHARD_HANDOFFS_DROPPED_TOTAL: &str = "parley_sip_shard_handoffs_dropped_total";
/// How late the main loop's 20 ms probe timer fired (seconds; several control threads).
pub const MAIN_LOOP_LAG_SECONDS: &str = "parley_main_loop_lag_seconds";
/// Packets relayed, by `path` (`udp_udp`, `udp_roq`, `roq_udp`, `roq_roq`).
pub const RELAY_PACKETS_TOTAL: &str = "parley_relay_packets_total";
/// Bytes relayed (RTP/RTCP packet bytes), by `path`.
pub const RELAY_BYTES_TOTAL: &str = "parley_relay_bytes_total";
/// Packets dropped by the relay, by `reason` (`no_flow`, `wrong_source`, `malformed`,
/// `queue_full`: the outgoing socket's or device connection's send queue was full,
/// `send_error`: any other send failure).
pub const RELAY_DROPS_TOTAL: &str = "parley_relay_drops_total";
/// Relay ports in use.
pub const RELAY_PORTS_ACTIVE: &str = "parley_relay_ports_active";
/// Relay ports free but kept bound for the next call (`[relay] warm_ports`).
pub const RELAY_PORTS_WARM: &str = "parley_relay_ports_warm";
/// Media bridges installed in the relay (one per connected call: UDP↔UDP, UDP↔RoQ or
/// RoQ↔RoQ).
pub const RELAY_FLOWS_ACTIVE: &str = "parley_relay_flows_active";
/// Packets the kernel fast path forwarded (also counted in `RELAY_PACKETS_TOTAL`,
/// `path="udp_udp"`).
pub const RELAY_KERNEL_PACKETS_TOTAL: &str = "parley_relay_kernel_packets_total";
/// Relay ports whose latched flow the kernel fast path forwards.
pub const RELAY_KERNEL_FLOWS: &str = "parley_relay_kernel_flows";
/// 1 when the kernel fast path is loaded, else 0.
pub const RELAY_KERNEL_LOADED: &str = "parley_relay_kernel_loaded";
/// Datagrams returned by one batched read (`recvmmsg`) of a relay socket.
pub const RELAY_BATCH_SIZE: &str = "parley_relay_batch_size";
/// Time from a batch's read off a relay socket to its send (one batch in 64 is sampled).
pub const RELAY_FORWARD_SECONDS: &str = "parley_relay_forward_seconds";
/// re-INVITEs received in established dialogs, by `result` (`accepted`, `moved`, `rejected`).
pub const SIP_REINVITES_TOTAL: &str = "parley_sip_reinvites_total";
/// CDRs written, by `result` (`ok`, `error`).
pub const CDR_WRITES_TOTAL: &str = "parley_cdr_writes_total";
/// Address book entries added or updated.
pub const ADDRESS_BOOK_UPDATES_TOTAL: &str = "parley_address_book_updates_total";
/// Address book entries evicted to keep a book within `[address_book] max_entries`.
pub const ADDRESS_BOOK_EVICTIONS_TOTAL: &str = "parley_address_book_evictions_total";
/// Parties not added to an address book (address empty or over 256 bytes).
pub const ADDRESS_BOOK_REFUSED_TOTAL: &str = "parley_address_book_refused_total";
/// Users' own address book requests, by `op` (`set`, `delete`, `block`, `unblock`,
/// `search`) and `result` (`ok` or the error code).
pub const ADDRESS_BOOK_EDITS_TOTAL: &str = "parley_address_book_edits_total";
/// Chat messages in the archive (`[chat] history_days`).
pub const CHAT_ARCHIVE_MESSAGES: &str = "parley_chat_archive_messages";
/// Messages to devices not sent because their frame would exceed the protocol limit.
pub const IM_FRAMES_REFUSED_TOTAL: &str = "parley_im_frames_refused_total";
/// IM logins, by `tenant` and `result`.
pub const AUTH_RESULTS_TOTAL: &str = "parley_auth_results_total";
/// Auth agents connected now, by `tenant` (directory tenants only).
pub const AUTH_AGENTS_CONNECTED: &str = "parley_auth_agents_connected";
/// Time from sending a login or check to an agent to its answer, by `tenant`.
pub const AUTH_AGENT_REQUEST_SECONDS: &str = "parley_auth_agent_request_seconds";
/// Agent TLS handshakes refused, by `reason` (`untrusted`: not from the agent CA;
/// `revoked`: a revoked or unknown agent certificate).
pub const AUTH_AGENT_HANDSHAKES_REFUSED_TOTAL: &str = "parley_auth_agent_handshakes_refused_total";
/// Agent enrolments, by `result` (`ok`, `bad_token`, `bad_csr`, `store`, `busy`: too many
/// enrolling connections at once).
pub const AUTH_AGENT_ENROLMENTS_TOTAL: &str = "parley_auth_agent_enrolments_total";
/// Rows of imported carrier CDR files, by `result` (`imported`, `duplicate`: imported
/// before; `unmatched`: no user of the tenant in it; `expired`: older than the CDR
/// retention; `rejected`: unreadable).
pub const CDR_IMPORT_ROWS_TOTAL: &str = "parley_cdr_import_rows_total";
/// CDRs (own and imported) deleted by `[cdrs] retention_days`.
pub const CDRS_EXPIRED_TOTAL: &str = "parley_cdrs_expired_total";
/// Users the last directory sync listed, by `tenant`.
pub const DIRECTORY_USERS: &str = "parley_directory_users";
/// Directory numbers the last sync of a tenant could not route to their user because
/// another user (of any tenant) already has them, by `tenant`.
pub const DIRECTORY_NUMBERS_REFUSED: &str = "parley_directory_numbers_refused";
/// Malformed IM control messages or datagrams, by `kind`.
pub const IM_PROTOCOL_ERRORS_TOTAL: &str = "parley_im_protocol_errors_total";
/// QUIC connections refused before their handshake, by `reason` (`pending_per_source`,
/// `pending_total`: too many connections not logged in yet).
pub const IM_CONNECTIONS_REFUSED_TOTAL: &str = "parley_im_connections_refused_total";
/// WebSocket sessions opened by browsers (upgraded; the login follows).
pub const WEB_SESSIONS_TOTAL: &str = "parley_web_sessions_total";
/// WebSocket sessions open now.
pub const WEB_SESSIONS: &str = "parley_web_sessions";
/// WebSocket upgrades refused, by `reason` (`origin`, `pending_per_source`,
/// `pending_total`), and web connections closed at once because the listener was full
/// (`connections`, `[web] max_connections`).
pub const WEB_SESSIONS_REFUSED_TOTAL: &str = "parley_web_sessions_refused_total";
/// Browsers' WebRTC offers, by `result` (`ok`, `refused`).
pub const WEBRTC_OFFERS_TOTAL: &str = "parley_webrtc_offers_total";
/// Browser peer connections that connected (ICE and DTLS done), disconnected or failed,
/// by `result`.
pub const WEBRTC_CONNECTIONS_TOTAL: &str = "parley_webrtc_connections_total";
/// Browser peer connections now.
pub const WEBRTC_PEERS: &str = "parley_webrtc_peers";
/// RTP packets between browsers and the relay, by `direction` (`to_browser`,
/// `from_browser`).
pub const WEBRTC_PACKETS_TOTAL: &str = "parley_webrtc_packets_total";
/// Packets dropped on the browser media path, by `reason` (`queue_full`, `no_peer`,
/// `not_connected`, `other_flow`, `not_rtp`, `no_stream`, `unreadable`, `other_codec`: a
/// codec the call does not carry, `codec_not_negotiated`: the peer connection cannot
/// carry the call's codec).
pub const WEBRTC_DROPS_TOTAL: &str = "parley_webrtc_drops_total";
/// Counter: telephone-event (DTMF, RFC 4733) packets relayed for browsers, by
/// `direction` (`to_browser`, `from_browser`); also counted in `parley_webrtc_packets_total`.
pub const WEBRTC_DTMF_PACKETS_TOTAL: &str = "parley_webrtc_dtmf_packets_total";
/// Counter: video RTP packets relayed for browsers, by `direction` (`to_browser`,
/// `from_browser`); not counted in `parley_webrtc_packets_total` (audio).
pub const WEBRTC_VIDEO_PACKETS_TOTAL: &str = "parley_webrtc_video_packets_total";
/// Counter: video keyframe requests relayed, by `direction`: `from_browser` (the page
/// could not decode the caller's video: a PLI to the caller), `to_browser` (the caller's
/// PLI or FIR, asked of the browser's encoder).
pub const WEBRTC_KEYFRAME_REQUESTS_TOTAL: &str = "parley_webrtc_keyframe_requests_total";

/// Gauge: 1 while the node is connected to NATS (cluster mode).
pub const CLUSTER_NATS_CONNECTED: &str = "parley_cluster_nats_connected";
/// Gauge: live nodes of the cluster this node sees, itself included.
pub const CLUSTER_NODES: &str = "parley_cluster_nodes";
/// Counter: other nodes this node declared dead (not seen for `node_expiry_secs`).
pub const CLUSTER_NODES_LOST_TOTAL: &str = "parley_cluster_nodes_lost_total";
/// Counter: CDRs of calls whose own node was lost, by `outcome`: `written` (this node
/// hosted the answered leg and claimed the call), `withdrawn` (that node came back and
/// wrote it itself), `not_claimed` (claimed elsewhere, or NATS unreachable: the call's
/// node writes it).
pub const CLUSTER_SURVIVOR_CDRS_TOTAL: &str = "parley_cluster_survivor_cdrs_total";
/// Gauge: devices logged in on this node, as published to the cluster.
pub const CLUSTER_LOCAL_DEVICES: &str = "parley_cluster_local_devices";
/// Gauge: users with a device logged in on this node (users per node, summed over nodes).
pub const CLUSTER_LOCAL_USERS: &str = "parley_cluster_local_users";
/// Gauge: devices on other nodes this node's users have.
pub const CLUSTER_REMOTE_DEVICES: &str = "parley_cluster_remote_devices";
/// Gauge: legs this node's calls ring or hold on other nodes.
pub const CLUSTER_REMOTE_LEGS: &str = "parley_cluster_remote_legs";
/// Gauge: legs this node hosts for other nodes' calls.
pub const CLUSTER_HOSTED_LEGS: &str = "parley_cluster_hosted_legs";
/// Counter: call offers handed between nodes, by `direction` (`sent`, `received`).
pub const CLUSTER_OFFERS_TOTAL: &str = "parley_cluster_offers_total";
/// Counter: calls connected to a device on another node (the answer the call took).
pub const CLUSTER_HANDOFFS_ANSWERED_TOTAL: &str = "parley_cluster_handoffs_answered_total";
/// Counter: call signalling messages between nodes, by `direction` (`in`, `out`).
pub const CLUSTER_MESSAGES_TOTAL: &str = "parley_cluster_messages_total";
/// Counter: messages dropped because the outbox toward NATS was full.
pub const CLUSTER_MESSAGES_DROPPED_TOTAL: &str = "parley_cluster_messages_dropped_total";
/// Counter: messages from other nodes that did not parse.
pub const CLUSTER_MESSAGES_INVALID_TOTAL: &str = "parley_cluster_messages_invalid_total";
/// Histogram: a heartbeat write's round trip to JetStream (put to acknowledgement), seconds.
pub const CLUSTER_NATS_SECONDS: &str = "parley_cluster_nats_seconds";

/// Installs the global recorder and returns the handle that renders `/metrics`.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full(RELAY_FORWARD_SECONDS.into()),
            &[
                0.000_002, 0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5,
                0.001, 0.005,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full(RELAY_BATCH_SIZE.into()),
            &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
        )?
        .install_recorder()?;
    describe();
    parley_actors::metrics::describe();
    register_zeroes();
    Ok(handle)
}

/// Registers every series whose labels come from a fixed set, at zero, so that dashboards
/// and `absent()` alerts see them before the first event.
fn register_zeroes() {
    use metrics::{counter, gauge};
    use parley_actors::metrics as a;
    for r in [
        "unparseable",
        "bad_header",
        "bad_version",
        "bad_scheme",
        "bad_extension",
        "bad_content_type",
        "too_many_hops",
        "bad_sdp",
    ] {
        counter!(SIP_PARSE_ERRORS_TOTAL, "reason" => r).increment(0);
    }
    for k in ["fatal", "control", "datagram"] {
        counter!(IM_PROTOCOL_ERRORS_TOTAL, "kind" => k).increment(0);
    }
    for r in ["pending_per_source", "pending_total"] {
        counter!(IM_CONNECTIONS_REFUSED_TOTAL, "reason" => r).increment(0);
    }
    for r in [
        "origin",
        "pending_per_source",
        "pending_total",
        "connections",
    ] {
        counter!(WEB_SESSIONS_REFUSED_TOTAL, "reason" => r).increment(0);
    }
    counter!(WEB_SESSIONS_TOTAL).increment(0);
    for d in ["sent", "received"] {
        counter!(CLUSTER_OFFERS_TOTAL, "direction" => d).increment(0);
    }
    for d in ["in", "out"] {
        counter!(CLUSTER_MESSAGES_TOTAL, "direction" => d).increment(0);
    }
    counter!(CLUSTER_HANDOFFS_ANSWERED_TOTAL).increment(0);
    counter!(CLUSTER_NODES_LOST_TOTAL).increment(0);
    for o in ["written", "withdrawn", "not_claimed"] {
        counter!(CLUSTER_SURVIVOR_CDRS_TOTAL, "outcome" => o).increment(0);
    }
    counter!(CLUSTER_MESSAGES_DROPPED_TOTAL).increment(0);
    counter!(CLUSTER_MESSAGES_INVALID_TOTAL).increment(0);
    for r in ["ok", "refused"] {
        counter!(WEBRTC_OFFERS_TOTAL, "result" => r).increment(0);
    }
    for r in ["connected", "disconnected", "failed"] {
        counter!(WEBRTC_CONNECTIONS_TOTAL, "result" => r).increment(0);
    }
    for d in ["to_browser", "from_browser"] {
        counter!(WEBRTC_PACKETS_TOTAL, "direction" => d).increment(0);
        counter!(WEBRTC_DTMF_PACKETS_TOTAL, "direction" => d).increment(0);
        counter!(WEBRTC_VIDEO_PACKETS_TOTAL, "direction" => d).increment(0);
        counter!(WEBRTC_KEYFRAME_REQUESTS_TOTAL, "direction" => d).increment(0);
    }
    for r in [
        "queue_full",
        "no_peer",
        "not_connected",
        "other_flow",
        "not_rtp",
        "no_stream",
        "unreadable",
        "other_codec",
        "codec_not_negotiated",
    ] {
        counter!(WEBRTC_DROPS_TOTAL, "reason" => r).increment(0);
    }
    gauge!(WEBRTC_PEERS).set(0.0);
    gauge!(WEB_SESSIONS).set(0.0);
    for r in ["ok", "error"] {
        counter!(CDR_WRITES_TOTAL, "result" => r).increment(0);
    }
    counter!(SIP_RETRANSMISSIONS_TOTAL).increment(0);
    counter!(SIP_SEND_ERRORS_TOTAL).increment(0);
    metrics::gauge!(SIP_CONNECTIONS).set(0.0);
    gauge!(SIP_QUEUE_DELAY_SECONDS).set(0.0);
    gauge!(SIP_SHEDDING).set(0.0);
    counter!(SIP_SHARD_HANDOFFS_TOTAL).increment(0);
    counter!(SIP_SHARD_HANDOFFS_DROPPED_TOTAL).increment(0);
    gauge!(MAIN_LOOP_LAG_SECONDS).set(0.0);
    for t in ["tcp", "tls"] {
        counter!(SIP_CONNECTIONS_REFUSED_TOTAL, "transport" => t).increment(0);
        for r in ["closed", "idle", "slow", "framing", "error", "dropped"] {
            counter!(SIP_CONNECTIONS_CLOSED_TOTAL, "transport" => t, "reason" => r).increment(0);
        }
    }
    counter!(SIP_CONNECTIONS_CLOSED_TOTAL, "transport" => "tls", "reason" => "handshake")
        .increment(0);
    for r in [
        "draining",
        "transactions",
        "transactions_per_source",
        "calls_per_source",
        "call_rate",
        "calls",
        "queue_delay",
        "loop_lag",
    ] {
        counter!(SIP_REJECTED_OVERLOAD_TOTAL, "reason" => r).increment(0);
    }
    for method in ["BYE", "CANCEL", "INVITE"] {
        counter!(SIP_UNMATCHED_REQUESTS_TOTAL, "method" => method).increment(0);
    }
    counter!(ADDRESS_BOOK_UPDATES_TOTAL).increment(0);
    counter!(ADDRESS_BOOK_EVICTIONS_TOTAL).increment(0);
    counter!(ADDRESS_BOOK_REFUSED_TOTAL).increment(0);
    for op in ["set", "delete", "block", "unblock", "search"] {
        counter!(ADDRESS_BOOK_EDITS_TOTAL, "op" => op, "result" => "ok").increment(0);
    }
    counter!(IM_FRAMES_REFUSED_TOTAL).increment(0);
    counter!(a::DEVICE_QUEUE_DROPS_TOTAL).increment(0);
    counter!(a::REROUTES_TOTAL).increment(0);
    counter!(a::MEDIA_TIMEOUTS_TOTAL).increment(0);
    counter!(a::OFFERS_UNACKNOWLEDGED_TOTAL).increment(0);
    counter!(a::CALLS_REFUSED_BUSY_TOTAL).increment(0);
    for r in ["ports_exhausted", "unavailable"] {
        counter!(a::MEDIA_SETUP_FAILURES_TOTAL, "reason" => r).increment(0);
    }
    counter!(a::PRESENCE_FANOUT_TOTAL).increment(0);
    for r in [
        "delivered",
        "stored",
        "unknown_user",
        "rejected",
        "mailbox_full",
        "busy",
    ] {
        counter!(a::CHAT_MESSAGES_TOTAL, "result" => r).increment(0);
    }
    counter!(a::CHAT_OFFLINE_DELIVERED_TOTAL).increment(0);
    for st in ["delivered", "read"] {
        counter!(a::CHAT_RECEIPTS_TOTAL, "status" => st).increment(0);
    }
    gauge!(CHAT_ARCHIVE_MESSAGES).set(0.0);
    // Registering the histogram makes it render (empty) before the first re-route.
    for h in [
        a::REROUTE_SECONDS,
        a::CALL_SETUP_SECONDS,
        a::CALL_RINGING_SECONDS,
    ] {
        let _ = metrics::histogram!(h);
    }
    gauge!(RELAY_PORTS_ACTIVE).set(0.0);
    gauge!(RELAY_PORTS_WARM).set(0.0);
    gauge!(RELAY_FLOWS_ACTIVE).set(0.0);
    gauge!(RELAY_KERNEL_FLOWS).set(0.0);
    gauge!(RELAY_KERNEL_LOADED).set(0.0);
    counter!(RELAY_KERNEL_PACKETS_TOTAL).increment(0);
    let _ = metrics::histogram!(RELAY_BATCH_SIZE);
    let _ = metrics::histogram!(RELAY_FORWARD_SECONDS);
    for r in ["accepted", "moved", "rejected"] {
        counter!(SIP_REINVITES_TOTAL, "result" => r).increment(0);
    }
    // Per-tenant series appear with the first directory tenant; these make the dashboard's
    // queries resolve before that.
    gauge!(AUTH_AGENTS_CONNECTED).set(0.0);
    gauge!(DIRECTORY_USERS).set(0.0);
    gauge!(DIRECTORY_NUMBERS_REFUSED).set(0.0);
    let _ = metrics::histogram!(AUTH_AGENT_REQUEST_SECONDS);
    let _ = metrics::histogram!(CLUSTER_NATS_SECONDS);
    // Cluster gauges read 0 on a single node (and before NATS answers).
    for g in [
        CLUSTER_NATS_CONNECTED,
        CLUSTER_NODES,
        CLUSTER_LOCAL_DEVICES,
        CLUSTER_LOCAL_USERS,
        CLUSTER_REMOTE_DEVICES,
        CLUSTER_REMOTE_LEGS,
        CLUSTER_HOSTED_LEGS,
    ] {
        gauge!(g).set(0.0);
    }
    for r in ["imported", "duplicate", "unmatched", "expired", "rejected"] {
        counter!(CDR_IMPORT_ROWS_TOTAL, "result" => r).increment(0);
    }
    counter!(CDRS_EXPIRED_TOTAL).increment(0);
    for r in ["untrusted", "revoked"] {
        counter!(AUTH_AGENT_HANDSHAKES_REFUSED_TOTAL, "reason" => r).increment(0);
    }
    for r in ["ok", "bad_token", "bad_csr"] {
        counter!(AUTH_AGENT_ENROLMENTS_TOTAL, "result" => r).increment(0);
    }
    gauge!(a::CALLS_ACTIVE).set(0.0);
    gauge!(a::PRESENCE_SESSIONS_ACTIVE).set(0.0);
}

fn describe() {
    use metrics::describe_histogram;
    describe_gauge!(
        CLUSTER_NATS_CONNECTED,
        Unit::Count,
        "1 while connected to NATS (cluster mode)"
    );
    describe_gauge!(
        CLUSTER_NODES,
        Unit::Count,
        "Live cluster nodes seen, this one included"
    );
    describe_counter!(
        CLUSTER_SURVIVOR_CDRS_TOTAL,
        Unit::Count,
        "CDRs of calls whose own node was lost, written by this node (which hosted the answered leg), by outcome"
    );
    describe_counter!(
        CLUSTER_NODES_LOST_TOTAL,
        Unit::Count,
        "Nodes declared dead (not seen for node_expiry_secs)"
    );
    describe_gauge!(
        CLUSTER_LOCAL_DEVICES,
        Unit::Count,
        "Devices on this node published to the cluster"
    );
    describe_gauge!(
        CLUSTER_REMOTE_DEVICES,
        Unit::Count,
        "Devices on other nodes known here"
    );
    describe_gauge!(
        CLUSTER_REMOTE_LEGS,
        Unit::Count,
        "Legs of this node's calls on other nodes"
    );
    describe_gauge!(
        CLUSTER_HOSTED_LEGS,
        Unit::Count,
        "Legs hosted for other nodes' calls"
    );
    describe_counter!(
        CLUSTER_OFFERS_TOTAL,
        Unit::Count,
        "Call offers handed between nodes, by direction"
    );
    describe_counter!(
        CLUSTER_HANDOFFS_ANSWERED_TOTAL,
        Unit::Count,
        "Calls connected to a device on another node (answers the call took; a second answer, withdrawn, is not counted)"
    );
    describe_counter!(
        CLUSTER_MESSAGES_TOTAL,
        Unit::Count,
        "Call signalling messages between nodes, by direction"
    );
    describe_counter!(
        CLUSTER_MESSAGES_DROPPED_TOTAL,
        Unit::Count,
        "Cluster messages dropped: outbox full"
    );
    describe_counter!(
        CLUSTER_MESSAGES_INVALID_TOTAL,
        Unit::Count,
        "Cluster messages that did not parse"
    );
    describe_histogram!(
        CLUSTER_NATS_SECONDS,
        Unit::Seconds,
        "Heartbeat write round trip to JetStream"
    );
    describe_counter!(
        SIP_UNMATCHED_REQUESTS_TOTAL,
        Unit::Count,
        "Requests that matched no dialog or transaction (answered 481/482), by method"
    );
    describe_counter!(
        SIP_REQUESTS_TOTAL,
        Unit::Count,
        "SIP requests received, by method"
    );
    describe_counter!(
        SIP_RESPONSES_TOTAL,
        Unit::Count,
        "SIP responses by status code and direction"
    );
    describe_counter!(
        SIP_PARSE_ERRORS_TOTAL,
        Unit::Count,
        "SIP datagrams rejected as malformed, by reason"
    );
    metrics::describe_gauge!(
        SIP_CONNECTIONS,
        Unit::Count,
        "SIP connections (TCP) open now"
    );
    metrics::describe_gauge!(
        SIP_TRANSACTIONS,
        Unit::Count,
        "SIP transactions in flight, by kind (server, client)"
    );
    describe_counter!(
        SIP_CONNECTIONS_REFUSED_TOTAL,
        Unit::Count,
        "SIP connections refused or not opened because sip.tcp_max_connections are open"
    );
    describe_counter!(
        SIP_CONNECTIONS_CLOSED_TOTAL,
        Unit::Count,
        "SIP connections closed, by transport and reason (closed, idle, slow, framing, error, dropped; handshake: TLS handshake failed)"
    );
    describe_counter!(
        SIP_SEND_ERRORS_TOTAL,
        Unit::Count,
        "SIP datagrams the socket refused to send"
    );
    describe_counter!(
        SIP_RETRANSMISSIONS_TOTAL,
        Unit::Count,
        "SIP messages retransmitted by Parley's transactions"
    );
    describe_counter!(
        SIP_REJECTED_OVERLOAD_TOTAL,
        Unit::Count,
        "Requests answered 503 with Retry-After: draining, server-transaction cap, live calls per source cap, call rate, live calls, queue delay"
    );
    describe_gauge!(
        SIP_QUEUE_DELAY_SECONDS,
        Unit::Seconds,
        "Least time a SIP datagram waited in the kernel's receive queue over the last 100 ms"
    );
    describe_gauge!(
        SIP_SHEDDING,
        Unit::Count,
        "1 while new calls are refused for queue delay"
    );
    describe_gauge!(
        SIP_CONTROL_THREADS,
        Unit::Count,
        "Control threads carrying SIP, each with its own transactions, dialogs and call actors"
    );
    describe_counter!(
        SIP_SHARD_CALLS_TOTAL,
        Unit::Count,
        "New calls started, by the SIP shard (control thread) that owns them"
    );
    describe_gauge!(
        MAIN_LOOP_LAG_SECONDS,
        Unit::Seconds,
        "How late the main loop (user actors, device connections) fires its 20 ms probe timer, the least of the last five; with several control threads, past [sip] max_queue_delay_ms new calls are shed"
    );
    describe_counter!(
        SIP_SHARD_HANDOFFS_DROPPED_TOTAL,
        Unit::Count,
        "SIP datagrams dropped because the shard they were for held 65,536 handed over and not yet taken up"
    );
    describe_counter!(
        SIP_SHARD_HANDOFFS_TOTAL,
        Unit::Count,
        "SIP datagrams a shard read off the socket for another shard and handed to it"
    );
    describe_counter!(
        RELAY_PACKETS_TOTAL,
        Unit::Count,
        "RTP/RTCP packets relayed, by path"
    );
    describe_counter!(
        RELAY_BYTES_TOTAL,
        Unit::Bytes,
        "RTP/RTCP bytes relayed, by path"
    );
    describe_counter!(
        RELAY_DROPS_TOTAL,
        Unit::Count,
        "Packets dropped by the relay, by reason"
    );
    describe_gauge!(
        RELAY_PORTS_WARM,
        Unit::Count,
        "Relay UDP ports free but kept bound for the next call ([relay] warm_ports), RTCP ports included"
    );
    describe_gauge!(
        RELAY_PORTS_ACTIVE,
        Unit::Count,
        "Relay UDP ports allocated to calls"
    );
    describe_gauge!(
        RELAY_FLOWS_ACTIVE,
        Unit::Count,
        "Media bridges installed in the relay (one per connected call)"
    );
    describe_counter!(
        RELAY_KERNEL_PACKETS_TOTAL,
        Unit::Count,
        "RTP/RTCP packets forwarded by the kernel fast path (eBPF), also in parley_relay_packets_total{path=\"udp_udp\"}"
    );
    describe_gauge!(
        RELAY_KERNEL_FLOWS,
        Unit::Count,
        "Latched relay flows forwarded by the kernel fast path"
    );
    describe_gauge!(
        RELAY_KERNEL_LOADED,
        Unit::Count,
        "1 when the relay's eBPF fast path is loaded, else 0"
    );
    metrics::describe_histogram!(
        RELAY_BATCH_SIZE,
        Unit::Count,
        "Datagrams returned by one batched read of a relay socket"
    );
    metrics::describe_histogram!(
        RELAY_FORWARD_SECONDS,
        Unit::Seconds,
        "Time from a batch's read off a relay socket to its send (one batch in 64 sampled)"
    );
    describe_counter!(
        SIP_REINVITES_TOTAL,
        Unit::Count,
        "re-INVITEs in established dialogs, by result (accepted: same media address; moved: the peer's media moved; rejected)"
    );
    describe_counter!(CDR_WRITES_TOTAL, Unit::Count, "CDR rows written, by result");
    describe_counter!(
        ADDRESS_BOOK_UPDATES_TOTAL,
        Unit::Count,
        "Address book entries added or updated"
    );
    describe_counter!(
        ADDRESS_BOOK_EVICTIONS_TOTAL,
        Unit::Count,
        "Address book entries evicted to keep a book within address_book.max_entries (never-known parties first)"
    );
    metrics::describe_gauge!(
        CHAT_ARCHIVE_MESSAGES,
        Unit::Count,
        "Chat messages kept in the archive (conversations and messages waiting for offline users)"
    );
    describe_counter!(
        ADDRESS_BOOK_EDITS_TOTAL,
        Unit::Count,
        "Address book requests of users (devices and the admin API), by op and result (ok or the error code)"
    );
    describe_counter!(
        ADDRESS_BOOK_REFUSED_TOTAL,
        Unit::Count,
        "Parties not added to an address book (address empty or longer than 256 bytes)"
    );
    describe_counter!(
        WEB_SESSIONS_TOTAL,
        Unit::Count,
        "WebSocket sessions opened by browsers (the IM login follows)"
    );
    describe_gauge!(WEB_SESSIONS, Unit::Count, "WebSocket sessions open now");
    describe_counter!(
        WEBRTC_OFFERS_TOTAL,
        Unit::Count,
        "Browsers' WebRTC offers, by result"
    );
    describe_counter!(
        WEBRTC_CONNECTIONS_TOTAL,
        Unit::Count,
        "Browser peer connections connected (ICE and DTLS done), disconnected or failed"
    );
    describe_gauge!(WEBRTC_PEERS, Unit::Count, "Browser peer connections now");
    describe_counter!(
        WEBRTC_PACKETS_TOTAL,
        Unit::Count,
        "RTP packets between browsers and the relay, by direction"
    );
    describe_counter!(
        WEBRTC_DROPS_TOTAL,
        Unit::Count,
        "Packets dropped on the browser media path, by reason"
    );
    describe_counter!(
        WEB_SESSIONS_REFUSED_TOTAL,
        Unit::Count,
        "WebSocket upgrades refused, by reason (origin not allowed, too many connections not logged in)"
    );
    describe_counter!(
        IM_FRAMES_REFUSED_TOTAL,
        Unit::Count,
        "Messages to IM devices not sent because their frame would exceed the 64 KiB protocol limit"
    );
    describe_counter!(
        AUTH_RESULTS_TOTAL,
        Unit::Count,
        "IM device logins by tenant and result"
    );
    describe_gauge!(
        AUTH_AGENTS_CONNECTED,
        Unit::Count,
        "Auth agents connected now, by tenant"
    );
    metrics::describe_histogram!(
        AUTH_AGENT_REQUEST_SECONDS,
        Unit::Seconds,
        "Time from a login or token check sent to an auth agent to its answer, by tenant"
    );
    describe_counter!(
        AUTH_AGENT_HANDSHAKES_REFUSED_TOTAL,
        Unit::Count,
        "Auth agent TLS handshakes refused, by reason (untrusted: not from the agent CA; revoked)"
    );
    describe_counter!(
        AUTH_AGENT_ENROLMENTS_TOTAL,
        Unit::Count,
        "Auth agent enrolments, by result"
    );
    describe_counter!(
        CDR_IMPORT_ROWS_TOTAL,
        Unit::Count,
        "Rows of imported carrier CDR files, by result"
    );
    describe_counter!(
        CDRS_EXPIRED_TOTAL,
        Unit::Count,
        "CDRs (own and imported) deleted by the retention setting"
    );
    describe_gauge!(
        DIRECTORY_NUMBERS_REFUSED,
        Unit::Count,
        "Directory numbers of the last sync not routed to their user: another user already has them"
    );
    describe_gauge!(
        DIRECTORY_USERS,
        Unit::Count,
        "Users the last directory sync of a tenant listed"
    );
    describe_counter!(
        IM_CONNECTIONS_REFUSED_TOTAL,
        Unit::Count,
        "QUIC connections refused before their handshake: too many not logged in yet, from one address or in all"
    );
    describe_counter!(
        IM_PROTOCOL_ERRORS_TOTAL,
        Unit::Count,
        "Malformed IM control frames or datagrams, by kind"
    );
}
