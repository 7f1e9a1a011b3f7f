//! Starting and stopping a node.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use actix::Actor;
use parley_actors::registry::{Registry, UserRef};
use parley_actors::trunk::TrunkActor;
use parley_actors::user::{AddressBookLoaded, PreferencesSink, SeedHistory, UserActor};
use parley_core::directory::UserIdentity;
use parley_core::ids::Sequence;
use parley_core::rules::Preferences;
use serde::Serialize;

use crate::config::Config;
use crate::federation::ca::AgentCa;
use crate::federation::{Federation, UserSink};
use crate::im::{cert, quic};
use crate::relay::{Relay, RelaySettings};
use crate::sip::core::{CoreConfig, SipCore};
use crate::sip::driver::{Drain, DriverDeps, SipDriver};
use crate::store::tenants::DirectoryUserRow;
use crate::store::{Store, cdr_writer};
use crate::{http, metrics as m, numbers};

/// Where a running node listens; written to `<data-dir>/node.json` once it is ready.
#[derive(Debug, Clone, Serialize)]
pub struct NodeInfo {
    /// SIP UDP address.
    pub sip: SocketAddr,
    /// SIP TCP address, when SIP over TCP is on.
    pub sip_tcp: Option<SocketAddr>,
    /// SIP TLS address, when SIP over TLS is on.
    pub sip_tls: Option<SocketAddr>,
    /// QUIC address.
    pub quic: SocketAddr,
    /// HTTP address.
    pub http: SocketAddr,
    /// Auth agent endpoint, when `[federation] listen` is set.
    pub agents: Option<SocketAddr>,
    /// The web client and its WebSocket (`http://…/`, or `https://` with TLS), when
    /// `[web]` is enabled.
    pub web: Option<String>,
    /// Process id.
    pub pid: u32,
}

/// Runs a node until SIGINT/SIGTERM, then drains. Call inside an actix `System`.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)?;
    let prometheus = m::install()?;
    let url = cfg
        .store
        .url(&cfg.data_dir)
        .map_err(|e| anyhow::anyhow!("[store]: {e}"))?;
    let store = Store::connect(&url)
        .await
        .map_err(|e| anyhow::anyhow!("store {url}: {e}"))?
        .with_book_limit(cfg.address_book.max_entries)
        // Empty unless clustered: nodes sharing one database keep to their own calls' rows.
        .with_node(if cfg.cluster.nats.is_empty() {
            ""
        } else {
            &cfg.cluster.node_id
        })
        .with_retention(
            (cfg.cdrs.retention_days > 0)
                .then(|| Duration::from_secs(u64::from(cfg.cdrs.retention_days) * 86_400)),
        );
    tracing::info!(store = %url, "store open");
    // Calls that were up when the node last died have an open CDR row: close it.
    let cut = store.close_interrupted(None).await?;
    if cut > 0 {
        tracing::warn!(
            calls = cut,
            "closed the CDRs of calls cut by the last stop (disposition INTERRUPTED)"
        );
    }
    for u in &cfg.users {
        let number = numbers::to_e164(&u.number, &cfg.sip.default_region)
            .unwrap_or_else(|| u.number.clone());
        store
            .ensure_user(&u.tenant, &u.user, &number, &u.password)
            .await?;
    }
    let relay = Relay::start(RelaySettings {
        ip: cfg.relay.ip,
        port_min: cfg.relay.port_min,
        port_max: cfg.relay.port_max,
        workers: cfg.relay.workers,
        coalesce: std::time::Duration::from_micros(cfg.relay.coalesce_us),
        rtcp_ports: cfg.relay.rtcp_ports,
        socket_buffer: cfg.relay.socket_buffer_bytes,
        max_ports_per_worker: cfg.relay.max_ports_per_worker,
        warm_ports: cfg.relay.warm_ports,
        latch_any_source: cfg.relay.latch_any_source,
        kernel: cfg.relay.kernel,
        kernel_interfaces: cfg.relay.kernel_interfaces.clone(),
    })?;
    let registry = Arc::new(Registry::default());
    let cluster = match cluster_settings(&cfg) {
        Some(settings) => {
            Some(crate::cluster::Cluster::start(settings, registry.clone(), relay.clone()).await?)
        }
        None => None,
    };
    // With several control threads (`[sip] control_threads`), SIP shard k runs on arbiter
    // k - 1 of these, and users are spread over them and the main arbiter by name.
    let shard_count = cfg.sip.control_threads.max(1);
    let shard_arbiters: Vec<actix_rt::Arbiter> =
        (1..shard_count).map(|_| actix_rt::Arbiter::new()).collect();
    let users = Arc::new(RegistryUsers {
        registry: registry.clone(),
        store: store.clone(),
        directory: dashmap::DashSet::new(),
        board: cluster.as_ref().map(crate::cluster::Cluster::board),
        arbiters: std::iter::once(actix_rt::Arbiter::current())
            .chain(shard_arbiters.iter().map(actix_rt::Arbiter::handle))
            .collect(),
    });
    for (u, from_directory) in store.all_users().await? {
        let prefs = match store.preferences(&u.tenant, &u.user).await? {
            Some(json) => Preferences::from_json(&json).unwrap_or_else(|e| {
                tracing::error!(tenant = %u.tenant, user = %u.user, error = %e, "stored preferences unusable; using defaults");
                Preferences::default()
            }),
            None => Preferences::default(),
        };
        let addr = users.spawn_actor(&u.tenant, &u.user, prefs);
        addr.do_send(SeedHistory(
            store.answer_history(&u.tenant, &u.user, 500).await?,
        ));
        addr.do_send(AddressBookLoaded(
            store.address_book(&u.tenant, &u.user).await?,
        ));
        users.insert(&u, addr, from_directory);
    }

    let (cdr_queue, cdr_task) = cdr_writer::start(store.clone(), registry.clone());
    if cfg.cdrs.retention_days > 0 {
        let (store, days) = (store.clone(), cfg.cdrs.retention_days);
        actix_rt::spawn(async move {
            // At start, then hourly.
            let mut tick = tokio::time::interval(Duration::from_secs(3600));
            loop {
                tick.tick().await;
                let before =
                    std::time::SystemTime::now() - Duration::from_secs(u64::from(days) * 86_400);
                match store.expire_cdrs(before, 10_000).await {
                    Ok(0) => {}
                    Ok(n) => {
                        metrics::counter!(crate::metrics::CDRS_EXPIRED_TOTAL).increment(n);
                        tracing::info!(deleted = n, retention_days = days, "old CDRs deleted");
                    }
                    Err(e) => tracing::error!(error = %e, "CDR retention failed"),
                }
            }
        });
    }
    let cdr_sink: Arc<dyn parley_actors::messages::CdrSink> = Arc::new(cdr_queue.clone());
    if let Some(c) = &cluster {
        c.set_cdrs(store.clone(), cdr_sink.clone());
    }

    // Trunk actors probe through the SIP driver and the driver's calls read the trunks'
    // state: create their contexts first so each side can hold the other's address.
    let trunk_ctxs: Vec<actix::Context<TrunkActor>> =
        cfg.trunks.iter().map(|_| actix::Context::new()).collect();
    let mut trunk_actors = Vec::new();
    let mut trunk_refs = Vec::new();
    for (ctx, t) in trunk_ctxs.iter().zip(&cfg.trunks) {
        // The prober is the SIP driver, set below once it exists.
        let policy = parley_core::trunk::HealthPolicy {
            call_window: Duration::from_millis(cfg.sip.t1_ms.saturating_mul(64)),
            ..t.health_policy()
        };
        let actor = TrunkActor::new(t.name.clone(), t.address, policy, None);
        trunk_refs.push((actix::AsyncContext::address(ctx), actor.up_flag()));
        trunk_actors.push(actor);
    }
    let trunks = Arc::new(parley_actors::trunk::TrunkSet::new(
        cfg.number_plan(),
        trunk_refs,
    ));

    // Shards (`[sip] control_threads`) each read a socket of their own, bound to the same
    // address with SO_REUSEPORT.
    // A SO_REUSEPORT group would let a second node started on the same port by mistake
    // join it (and take half the traffic) instead of failing: the port must be free to a
    // plain bind first (which also picks the port when `listen` says 0).
    let listen = if shard_count > 1 {
        std::net::UdpSocket::bind(cfg.sip.listen)
            .and_then(|probe| probe.local_addr())
            .map_err(|e| anyhow::anyhow!("sip.listen {}: {e}", cfg.sip.listen))?
    } else {
        cfg.sip.listen
    };
    let sip_std = bind_sip_udp(listen, shard_count > 1, cfg.sip.udp_buffer_bytes)
        .map_err(|e| anyhow::anyhow!("sip.listen {}: {e}", cfg.sip.listen))?;
    let sip_addr = sip_std.local_addr()?;
    let mut shard_sockets = Vec::new();
    for k in 1..shard_count {
        shard_sockets.push(
            bind_sip_udp(sip_addr, true, cfg.sip.udp_buffer_bytes).map_err(|e| {
                anyhow::anyhow!("sip.control_threads: shard {k}'s socket on {sip_addr}: {e}")
            })?,
        );
    }
    let sip_socket = Arc::new(tokio::net::UdpSocket::from_std(sip_std)?);
    let sip_tcp = match cfg.sip.tcp_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .map_err(|e| anyhow::anyhow!("sip.tcp_listen {a}: {e}"))?,
        ),
        None => None,
    };
    let sip_tcp_addr = sip_tcp
        .as_ref()
        .map(tokio::net::TcpListener::local_addr)
        .transpose()?;
    let sip_tls = match cfg.sip.tls_listen {
        Some(a) => {
            let (cert, key) = match (&cfg.sip.tls_cert, &cfg.sip.tls_key) {
                (Some(c), Some(k)) => (c.clone(), k.clone()),
                _ => crate::sip::tls::demo_pair(&cfg.data_dir)?,
            };
            let config = crate::sip::tls::server_config(&cert, &key)
                .map_err(|e| anyhow::anyhow!("sip.tls_cert: {e:#}"))?;
            let listener = tokio::net::TcpListener::bind(a)
                .await
                .map_err(|e| anyhow::anyhow!("sip.tls_listen {a}: {e}"))?;
            Some((listener, config))
        }
        None => None,
    };
    let sip_tls_addr = sip_tls.as_ref().map(|(l, _)| l.local_addr()).transpose()?;
    let mut tls_clients = std::collections::HashMap::new();
    for (i, t) in cfg.trunks.iter().enumerate() {
        if let (crate::config::TrunkTransport::Tls, Some(ca)) = (t.transport, &t.tls_ca) {
            let name = t
                .tls_server_name
                .clone()
                .unwrap_or_else(|| t.address.ip().to_string());
            let client = crate::sip::tls::client(ca, &name)
                .map_err(|e| anyhow::anyhow!("trunks[{i}].tls_ca: {e:#}"))?;
            tls_clients.insert(t.address, client);
        }
    }
    let handles = Arc::new(Sequence::new());
    // Each shard takes an even share of the node's limits.
    let share = |v: usize| if v == 0 { 0 } else { v.div_ceil(shard_count) };
    let core_for = |k: usize| {
        SipCore::new(
            CoreConfig {
                local: sip_addr,
                local_tcp: sip_tcp_addr,
                local_tls: sip_tls_addr,
                trunks: cfg
                    .trunks
                    .iter()
                    .map(|t| crate::sip::core::TrunkTarget {
                        addr: t.address,
                        transport: t.transport.transport(),
                        auth: t.credentials(),
                    })
                    .collect(),
                region: cfg.sip.default_region.clone(),
                timers: sipx_sip::Timers {
                    t1: Duration::from_millis(cfg.sip.t1_ms),
                    ..Default::default()
                },
                rng_seed: rand::random(),
                dialog_source_check: cfg.sip.dialog_source_check,
                max_server_transactions: share(cfg.sip.max_server_transactions).max(16),
                max_calls_per_source: share(cfg.sip.max_calls_per_source),
                overload: parley_core::overload::OverloadLimits {
                    max_rate: share(cfg.sip.max_call_rate as usize) as u32,
                    max_calls: share(cfg.sip.max_calls),
                    max_delay: Duration::from_millis(cfg.sip.max_queue_delay_ms),
                },
                max_transactions_per_source: share(cfg.sip.max_transactions_per_source),
                call_id_host: crate::sip::shard::call_id_host(k, shard_count),
            },
            registry.clone(),
            handles.clone(),
        )
    };
    let shards = Arc::new(crate::sip::shard::Shards::new(shard_count));
    metrics::gauge!(m::SIP_CONTROL_THREADS).set(shard_count as f64);
    let deps_for = |k: usize| DriverDeps {
        registry: registry.clone(),
        media: relay.clone(),
        cdr: cdr_sink.clone(),
        trunks: trunks.clone(),
        ring_timeout: cfg.ring_timeout(),
        media_timeout: cfg.media_timeout(),
        offer_ack_timeout: cfg.offer_ack_timeout(),
        max_ringing: cfg.max_ringing(),
        handles: handles.clone(),
        remote: cluster.as_ref().map(crate::cluster::Cluster::legs),
        tcp: None,
        stream: cfg.sip.stream_settings(),
        tls: None,
        tls_clients: tls_clients.clone(),
        shard: k,
        shards: shards.clone(),
    };
    // Shard 0 runs here, on the main arbiter, with the TCP and TLS listeners (one shard
    // only: config validation), the trunk probes and the calls dialled from devices.
    let sip = SipDriver::new(
        sip_socket,
        core_for(0),
        DriverDeps {
            tcp: sip_tcp,
            tls: sip_tls,
            ..deps_for(0)
        },
    )
    .start();
    let mut sip_shards = vec![sip.clone()];
    for (i, (socket, arbiter)) in shard_sockets.into_iter().zip(&shard_arbiters).enumerate() {
        let k = i + 1;
        let (core, deps) = (core_for(k), deps_for(k));
        let (tx, rx) = tokio::sync::oneshot::channel();
        arbiter.spawn(async move {
            // The socket joins this thread's reactor.
            let started = tokio::net::UdpSocket::from_std(socket)
                .map(|s| SipDriver::new(Arc::new(s), core, deps).start());
            let _ = tx.send(started);
        });
        let shard = rx
            .await
            .map_err(|_| anyhow::anyhow!("sip.control_threads: shard {k} did not start"))?
            .map_err(|e| anyhow::anyhow!("sip.control_threads: shard {k}: {e}"))?;
        sip_shards.push(shard);
    }
    if shard_count > 1 {
        let peers: Vec<_> = sip_shards.iter().map(|a| a.clone().recipient()).collect();
        for s in &sip_shards {
            s.do_send(crate::sip::driver::Peers(peers.clone()));
        }
        tracing::info!(
            shards = shard_count,
            "SIP signalling on {shard_count} control threads"
        );
        // The shards read their sockets in time while the main loop (user actors, device
        // connections) may not: its lag is an overload signal of its own.
        let shards = shards.clone();
        actix_rt::spawn(async move {
            // The least lag of the last five probes (100 ms): a standing lag, not one
            // stall (a page fault storm, a large table resized), as with queue delay.
            const TICK: Duration = Duration::from_millis(20);
            let mut recent = [Duration::ZERO; 5];
            for i in (0..recent.len()).cycle() {
                let start = tokio::time::Instant::now();
                tokio::time::sleep(TICK).await;
                recent[i] = start.elapsed().saturating_sub(TICK);
                let lag = recent.iter().min().copied().unwrap_or_default();
                shards.set_loop_lag(lag);
                metrics::gauge!(m::MAIN_LOOP_LAG_SECONDS).set(lag.as_secs_f64());
            }
        });
    }
    for (ctx, actor) in trunk_ctxs.into_iter().zip(trunk_actors) {
        ctx.run(actor.with_prober(sip.clone().recipient()));
    }

    let (cert, key) = cert::load_or_generate(&cfg.data_dir)?;
    let federation = Federation::load(
        cfg.federation.settings(),
        store.clone(),
        AgentCa::load_or_generate(&cfg.data_dir)?,
        &cert,
        users.clone(),
    )
    .await?;
    let agents_addr = match cfg.federation.listen {
        Some(listen) => {
            let server = crate::federation::endpoint::server_config(
                cert.clone(),
                key.clone_key(),
                &federation,
            )?;
            let endpoint = quinn::Endpoint::server(server, listen)
                .map_err(|e| anyhow::anyhow!("federation.listen {listen}: {e}"))?;
            let addr = endpoint.local_addr()?;
            actix_rt::spawn(crate::federation::endpoint::serve(
                endpoint,
                federation.clone(),
            ));
            Some(addr)
        }
        None => None,
    };
    let quic_rt = QuicThreads::start(cfg.quic.threads)?;
    let endpoint = quic::bind_endpoint(
        quic::server_config(cert, key, Duration::from_secs(cfg.quic.idle_timeout_secs))?,
        cfg.quic.listen,
        cfg.quic.socket_buffer_bytes,
        quic_rt.handle(),
    )
    .map_err(|e| anyhow::anyhow!("quic.listen {}: {e}", cfg.quic.listen))?;
    let quic_addr = endpoint.local_addr()?;
    let books = crate::books::Books::new(
        store.clone(),
        registry.clone(),
        federation.clone(),
        cfg.sip.default_region.clone(),
    );
    let im = Arc::new(quic::ImContext {
        books: books.start(),
        store: store.clone(),
        registry: registry.clone(),
        relay: relay.clone(),
        login_timeout: Duration::from_secs(cfg.quic.login_timeout_secs),
        next_session: AtomicU64::new(1),
        quic: quic_rt.handle(),
        guard: std::sync::Mutex::new(parley_core::admission::LoginGuard::new(cfg.login.limits())),
        calls: Some(Arc::new(parley_actors::CallEnv {
            sip: sip.clone().recipient(),
            media: relay.clone(),
            cdr: cdr_sink.clone(),
            trunks,
            ring_timeout: cfg.ring_timeout(),
            media_timeout: cfg.media_timeout(),
            offer_ack_timeout: cfg.offer_ack_timeout(),
            max_ringing: cfg.max_ringing(),
            handles,
            remote: cluster.as_ref().map(crate::cluster::Cluster::legs),
        })),
        chats: crate::chats::Chats::new(store.clone(), registry.clone(), cfg.chat.clone()).start(),
        federation: federation.clone(),
        draining: std::sync::atomic::AtomicBool::new(false),
    });
    actix_rt::spawn(quic::serve(endpoint.clone(), im.clone()));

    let web_url = if cfg.web.enabled {
        let tls = cfg.web.tls_cert.as_deref().zip(cfg.web.tls_key.as_deref());
        let header_timeout = Duration::from_secs(cfg.web.header_timeout_secs);
        let listener = crate::web::WebListener::bind(cfg.web.listen, tls).await?;
        let addr = listener.local_addr()?;
        let webrtc = crate::webrtc::WebRtc::start(cfg.web.media_listen, relay.clone())
            .map_err(|e| anyhow::anyhow!("web.media_listen {}: {e}", cfg.web.media_listen))?;
        let app = crate::web::router(Arc::new(crate::web::WebState {
            im: im.clone(),
            arbiter: actix_rt::Arbiter::current(),
            allowed_origins: cfg.web.allowed_origins.clone(),
            idle: Duration::from_secs(cfg.quic.idle_timeout_secs),
            tls: tls.is_some(),
            webrtc: Some(Arc::new(webrtc)),
        }));
        actix_rt::spawn(crate::web::serve(
            listener,
            app,
            crate::web::WebLimits {
                max_connections: cfg.web.max_connections,
                header_timeout,
            },
        ));
        Some(format!(
            "{}://{addr}/",
            if tls.is_some() { "https" } else { "http" }
        ))
    } else {
        None
    };

    let admin_token = match (&cfg.http.admin_token, cfg.demo) {
        (Some(t), _) if !t.is_empty() => t.clone(),
        _ => {
            let t = crate::sip_token(32);
            cert::write_private(&cfg.data_dir.join("admin-token"), t.as_bytes())?;
            println!(
                "admin token (demo mode): {t}  (also in {})",
                cfg.data_dir.join("admin-token").display()
            );
            t
        }
    };
    let listener = tokio::net::TcpListener::bind(cfg.http.listen)
        .await
        .map_err(|e| anyhow::anyhow!("http.listen {}: {e}", cfg.http.listen))?;
    let http_addr = listener.local_addr()?;
    let app = http::router(Arc::new(http::HttpState {
        prometheus,
        store: store.clone(),
        admin_token,
        registry: registry.clone(),
        federation: federation.clone(),
        enrolment_token_lifetime: Duration::from_secs(cfg.federation.enrolment_token_secs),
        default_region: cfg.sip.default_region.clone(),
        books,
        cluster: cluster.clone(),
    }));
    actix_rt::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });

    let info = NodeInfo {
        sip: sip_addr,
        sip_tcp: sip_tcp_addr,
        sip_tls: sip_tls_addr,
        quic: quic_addr,
        http: http_addr,
        agents: agents_addr,
        web: web_url.clone(),
        pid: std::process::id(),
    };
    std::fs::write(
        cfg.data_dir.join("node.json"),
        serde_json::to_vec_pretty(&info)?,
    )?;
    let tcp = sip_tcp_addr
        .map(|a| format!(" sip=tcp:{a}"))
        .unwrap_or_default()
        + &sip_tls_addr
            .map(|a| format!(" sip=tls:{a}"))
            .unwrap_or_default()
        + &agents_addr
            .map(|a| format!(" agents={a}"))
            .unwrap_or_default()
        + &web_url
            .as_ref()
            .map(|u| format!(" web={u}"))
            .unwrap_or_default();
    println!(
        "parley ready: sip=udp:{sip_addr}{tcp} quic={quic_addr} http=http://{http_addr} data={}",
        cfg.data_dir.display()
    );
    tracing::info!(sip = %sip_addr, quic = %quic_addr, http = %http_addr, "parley ready");

    shutdown_signal().await;
    tracing::info!("shutdown requested: draining (no new calls; up to 30 s for calls in progress)");
    // No new logins; every device is asked to connect to another node (its calls go on).
    im.draining
        .store(true, std::sync::atomic::Ordering::Relaxed);
    for u in registry.all_users() {
        u.addr.do_send(parley_actors::user::Deliver {
            msg: parley_codecs::control::ServerMsg::Reconnect {
                reason: "draining".into(),
                retry_after_secs: 30,
            },
            except: None,
        });
    }
    // New calls are refused (503 + Retry-After, OPTIONS 503) from now on, before the
    // cluster is told (which waits for NATS, bounded, when it is away).
    for s in &sip_shards {
        let _ = s.send(Drain).await;
    }
    if let Some(c) = &cluster {
        // The other nodes stop ringing this node's devices now, not at expiry.
        c.drain().await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut live = 0;
        for s in &sip_shards {
            live += s.send(Drain).await.unwrap_or(0);
        }
        let live = live
            + cluster
                .as_ref()
                .map_or(0, crate::cluster::Cluster::hosted_legs);
        if live == 0 || tokio::time::Instant::now() >= deadline {
            if live > 0 {
                tracing::warn!(live, "drain deadline reached; exiting with calls up");
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Some(c) = &cluster {
        c.leave().await;
    }
    endpoint.close(0u32.into(), b"shutdown");
    // Let call actors hand their CDRs over, then let the writer finish.
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(sip);
    drop(sip_shards);
    for a in &shard_arbiters {
        a.stop();
    }
    relay.stop();
    // Every CDR queued by now is written before we exit (bounded, in case the disk hangs).
    let _ = tokio::time::timeout(Duration::from_secs(5), cdr_queue.flush()).await;
    // Calls the drain deadline cut still have their opening rows: they end now.
    match store
        .close_interrupted(Some(std::time::SystemTime::now()))
        .await
    {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            calls = n,
            "CDRs of calls cut by the drain deadline closed as INTERRUPTED"
        ),
        Err(e) => tracing::error!(error = %e, "closing the CDRs of cut calls failed"),
    }
    drop(cdr_task);
    let _ = std::fs::remove_file(cfg.data_dir.join("node.json"));
    drop(quic_rt);
    tracing::info!("parley stopped");
    Ok(())
}

/// The SIP UDP socket, non-blocking, its buffers sized; in a SO_REUSEPORT group when
/// `shared` (one socket per shard on the same address).
fn bind_sip_udp(
    addr: SocketAddr,
    shared: bool,
    buffer_bytes: usize,
) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if shared {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    crate::sockets::size_buffers(socket2::SockRef::from(&socket), buffer_bytes, "sip")?;
    Ok(socket.into())
}

/// What `[cluster]` asks for (`None`: a single node).
fn cluster_settings(cfg: &Config) -> Option<crate::cluster::Settings> {
    use crate::cluster::{Auth, Settings};
    let c = &cfg.cluster;
    if c.nats.is_empty() {
        return None;
    }
    let auth = match (&c.user, &c.password, &c.token) {
        (Some(u), Some(p), _) => Auth::UserPassword(u.clone(), p.clone()),
        (_, _, Some(t)) => Auth::Token(t.clone()),
        _ => Auth::None,
    };
    Some(Settings {
        urls: c.nats.clone(),
        node_id: c.node_id.clone(),
        auth,
        media_ip: c.media_ip.unwrap_or(cfg.relay.ip),
        heartbeat: Duration::from_millis(c.heartbeat_ms),
        expiry: Duration::from_secs(c.node_expiry_secs),
        device_refresh: Duration::from_secs(c.device_refresh_secs),
    })
}

/// The QUIC runtime's threads. Dropping a tokio runtime blocks, which this async context
/// may not do (tokio panics), so on every way out of `run` it is shut down in the
/// background instead.
struct QuicThreads {
    rt: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl QuicThreads {
    fn start(threads: usize) -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("parley-quic")
            .enable_all()
            .build()?;
        Ok(Self {
            handle: rt.handle().clone(),
            rt: Some(rt),
        })
    }

    fn handle(&self) -> tokio::runtime::Handle {
        self.handle.clone()
    }
}

impl Drop for QuicThreads {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// Persists preferences changed through the IM protocol or the admin API.
struct StorePreferences {
    store: Store,
    tenant: String,
}

impl PreferencesSink for StorePreferences {
    fn save(&self, user: &str, prefs: &Preferences) {
        let (store, tenant, user) = (self.store.clone(), self.tenant.clone(), user.to_owned());
        let json = match serde_json::to_string(prefs) {
            Ok(j) => j,
            Err(e) => return tracing::error!(error = %e, "preferences not serialisable"),
        };
        tokio::spawn(async move {
            if let Err(e) = store.save_preferences(&tenant, &user, &json).await {
                tracing::error!(%tenant, %user, error = %e, "saving preferences failed");
            }
        });
    }
}

/// Directory users become node users: a user actor each, in the registry under every
/// directory number (a number another user already has stays theirs).
struct RegistryUsers {
    registry: Arc<Registry>,
    store: Store,
    /// Users that came from a directory (syncs remove only these).
    directory: dashmap::DashSet<(String, String)>,
    /// Where user actors publish their devices (cluster mode).
    board: Option<Arc<dyn parley_actors::remote::DeviceBoard>>,
    /// The arbiters user actors run on (the main one, and the SIP shards' when there are
    /// several), by a hash of the user.
    arbiters: Vec<actix_rt::ArbiterHandle>,
}

impl RegistryUsers {
    fn spawn_actor(&self, tenant: &str, user: &str, prefs: Preferences) -> actix::Addr<UserActor> {
        let sink = Arc::new(StorePreferences {
            store: self.store.clone(),
            tenant: tenant.to_owned(),
        });
        let actor = UserActor::new(user.to_owned()).with_preferences(prefs, sink);
        let actor = match &self.board {
            Some(board) => actor.with_board(board.clone(), tenant),
            None => actor,
        };
        match self.arbiters.as_slice() {
            [] | [_] => actor.start(),
            all => {
                use std::hash::{Hash, Hasher};
                let mut h = std::hash::DefaultHasher::new();
                (tenant, user).hash(&mut h);
                let home = &all[(h.finish() % all.len() as u64) as usize];
                UserActor::start_in_arbiter(home, move |_| actor)
            }
        }
    }

    fn insert(
        &self,
        u: &DirectoryUserRow,
        addr: actix::Addr<UserActor>,
        from_directory: bool,
    ) -> Vec<String> {
        if from_directory {
            self.directory.insert((u.tenant.clone(), u.user.clone()));
        }
        let user = UserRef {
            id: UserIdentity {
                tenant: u.tenant.clone(),
                user: u.user.clone(),
                number: u.numbers.first().cloned().unwrap_or_default(),
            },
            addr,
        };
        self.registry
            .upsert(user, &u.numbers, u.display_name.clone())
    }
}

impl UserSink for RegistryUsers {
    fn upsert(&self, u: &DirectoryUserRow) -> Vec<String> {
        let addr = match self.registry.user_by_name(&u.tenant, &u.user) {
            Some(existing) => existing.addr,
            None => {
                tracing::info!(tenant = %u.tenant, user = %u.user, numbers = ?u.numbers, "directory user added");
                self.spawn_actor(&u.tenant, &u.user, Preferences::default())
            }
        };
        self.insert(u, addr, true)
    }

    fn retain(&self, tenant: &str, keep: &std::collections::HashSet<String>) {
        for user in self.registry.users_of(tenant) {
            let key = (tenant.to_owned(), user.clone());
            if !keep.contains(&user) && self.directory.remove(&key).is_some() {
                tracing::info!(%tenant, %user, "directory user removed");
                self.registry.remove(tenant, &user);
            }
        }
    }

    fn set_federation(&self, pairs: &[(String, String)]) {
        self.registry.set_federation(pairs);
    }
}
