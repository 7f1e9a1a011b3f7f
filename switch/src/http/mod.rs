//! HTTP: `/metrics` (Prometheus text), `/healthz`, and the admin API under `/api/v1`
//! (bearer token). axum rather than actix-web: everything else here is plain tokio.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;

use parley_actors::registry::{Registry, UserRef};
use parley_actors::user::{GetPreferences, GetPresence, SetPreferences};
use parley_core::rules::Preferences;

use crate::store::Store;

/// Shared state.
pub struct HttpState {
    /// Renders `/metrics`.
    pub prometheus: PrometheusHandle,
    /// The database.
    pub store: Store,
    /// Required bearer token for `/api/v1`.
    pub admin_token: String,
    /// Live users (preferences are read and changed through their actors).
    pub registry: Arc<Registry>,
    /// Tenants, agents, enrolment.
    pub federation: Arc<crate::federation::Federation>,
    /// Default lifetime of enrolment tokens.
    pub enrolment_token_lifetime: std::time::Duration,
    /// Region of tenants without a tenant row (`[sip] default_region`).
    pub default_region: String,
    /// Users' address book edits.
    pub books: crate::books::Books,
    /// The cluster, in cluster mode.
    pub cluster: Option<crate::cluster::Cluster>,
}

/// The router.
pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/api/v1/cdrs", get(cdrs))
        .route("/api/v1/cdrs/import", axum::routing::post(import_cdrs))
        .route("/api/v1/cdrs/export", get(export_cdrs))
        .route("/api/v1/users/{user}/address-book", get(address_book))
        .route(
            "/api/v1/users/{user}/address-book/{address}",
            axum::routing::put(put_book_entry).delete(delete_book_entry),
        )
        .route(
            "/api/v1/users/{user}/preferences",
            get(get_preferences).put(put_preferences),
        )
        .route("/api/v1/users/{user}/presence", get(get_presence))
        .route("/api/v1/cluster", get(cluster_nodes))
        .route("/api/v1/tenants", get(list_tenants).post(create_tenant))
        .route(
            "/api/v1/tenants/{tenant}/enrolment-tokens",
            axum::routing::post(create_enrolment_token),
        )
        .route("/api/v1/tenants/{tenant}/agents", get(list_agents))
        .route(
            "/api/v1/tenants/{tenant}/federation",
            axum::routing::put(put_federation),
        )
        .route(
            "/api/v1/agents/{id}/revoke",
            axum::routing::post(revoke_agent),
        )
        .with_state(state)
}

async fn metrics(State(s): State<Arc<HttpState>>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        s.prometheus.render(),
    )
        .into_response()
}

fn authorised(s: &HttpState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Constant-time comparison: the token is a secret.
    let ok = given.is_some_and(|g| {
        g.len() == s.admin_token.len()
            && g.bytes()
                .zip(s.admin_token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if ok {
        Ok(())
    } else {
        Err(Box::new((StatusCode::UNAUTHORIZED, Json(serde_json::json!({"error": "unauthorized", "message": "Authorization: Bearer <admin token> required"}))).into_response()))
    }
}

/// The admin token checked, then the query string read (400 `bad_request` naming what
/// is wrong with it).
fn authorised_query<T>(
    s: &HttpState,
    headers: &HeaderMap,
    query: Result<Query<T>, QueryRejection>,
) -> Result<T, Box<Response>> {
    authorised(s, headers)?;
    query
        .map(|Query(q)| q)
        .map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, "bad_request", e.body_text())))
}

fn db_error(e: crate::store::StoreError) -> Response {
    tracing::error!(error = %e, "admin API database error");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(serde_json::json!({"error": "database", "message": e.to_string()})),
    )
        .into_response()
}

/// `GET /api/v1/cdrs` and `/api/v1/cdrs/export` parameters.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CdrQuery {
    tenant: Option<String>,
    user: Option<String>,
    /// Caller or called.
    number: Option<String>,
    disposition: Option<String>,
    route: Option<String>,
    /// Ended at or after: RFC 3339 or Unix seconds.
    from: Option<String>,
    /// Ended before.
    to: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
    /// Export only: `csv` or `jsonl`.
    format: Option<String>,
}

impl CdrQuery {
    /// The store's filter; `number` as E.164 when it is a number (read in the tenant's
    /// region, or the node's default), as the CDRs hold it.
    fn filter(&self, s: &HttpState) -> Result<crate::store::CdrFilter, String> {
        let region = self
            .tenant
            .as_deref()
            .and_then(|t| s.federation.tenant(t))
            .map_or_else(|| s.default_region.clone(), |t| t.row.region.clone());
        let time = |key: &str, v: &Option<String>| -> Result<Option<i64>, String> {
            v.as_deref()
                .map(|t| {
                    parley_codecs::cdr_csv::parse_time(t)
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_millis() as i64)
                        .ok_or_else(|| {
                            format!("`{key}`: {t:?} is not an RFC 3339 time or Unix seconds")
                        })
                })
                .transpose()
        };
        Ok(crate::store::CdrFilter {
            tenant: self.tenant.clone(),
            user: self.user.clone(),
            number: self
                .number
                .as_deref()
                .map(|n| crate::numbers::to_e164(n, &region).unwrap_or_else(|| n.to_owned())),
            disposition: self.disposition.as_deref().map(str::to_ascii_uppercase),
            route: self.route.clone(),
            from_ms: time("from", &self.from)?,
            to_ms: time("to", &self.to)?,
        })
    }

    fn cursor(&self) -> Result<Option<crate::store::CdrCursor>, String> {
        self.cursor
            .as_deref()
            .map(|c| {
                crate::store::CdrCursor::decode(c)
                    .ok_or_else(|| format!("`cursor`: {c:?} is not a cursor this API gave"))
            })
            .transpose()
    }
}

/// CDRs, newest first; the next page's cursor is in `X-Next-Cursor` when there may be one.
async fn cdrs(
    State(s): State<Arc<HttpState>>,
    headers: HeaderMap,
    query: Result<Query<CdrQuery>, QueryRejection>,
) -> Response {
    let q = match authorised_query(&s, &headers, query) {
        Ok(q) => q,
        Err(r) => return *r,
    };
    let (filter, cursor) = match (q.filter(&s), q.cursor()) {
        (Ok(f), Ok(c)) => (f, c),
        (Err(e), _) | (_, Err(e)) => return error(StatusCode::BAD_REQUEST, "bad_request", e),
    };
    if q.format.is_some() {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "`format` is for /api/v1/cdrs/export",
        );
    }
    let limit = q.limit.unwrap_or(1000).clamp(1, 100_000);
    match s.store.cdr_page(&filter, cursor, limit).await {
        Ok((rows, next)) => {
            let mut resp = Json(rows).into_response();
            if let Some(next) = next
                && let Ok(v) = axum::http::HeaderValue::from_str(&next.encode())
            {
                resp.headers_mut().insert("x-next-cursor", v);
            }
            resp
        }
        Err(e) => db_error(e),
    }
}

/// CDR columns of the CSV export, in order.
const CDR_CSV_COLUMNS: &[&str] = &[
    "call_id",
    "sip_call_id",
    "tenant",
    "user",
    "caller",
    "caller_name",
    "called",
    "route",
    "start_time",
    "answer_time",
    "end_time",
    "duration_secs",
    "disposition",
    "sip_cause",
    "packets_in",
    "packets_out",
    "answered_by",
    "direction",
    "dialled_by",
];

/// Every matching CDR as CSV (a header row) or JSON lines, streamed page by page: the
/// export holds one page in memory and no read transaction between pages.
async fn export_cdrs(
    State(s): State<Arc<HttpState>>,
    headers: HeaderMap,
    query: Result<Query<CdrQuery>, QueryRejection>,
) -> Response {
    let q = match authorised_query(&s, &headers, query) {
        Ok(q) => q,
        Err(r) => return *r,
    };
    let filter = match q.filter(&s) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", e),
    };
    let csv = match q.format.as_deref() {
        Some("csv") => true,
        Some("jsonl") => false,
        other => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("`format` must be csv or jsonl, not {other:?}"),
            );
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    let store = s.store.clone();
    tokio::spawn(async move {
        let mut cursor = None;
        let mut first = csv;
        let mut rows_sent = 0u64;
        loop {
            let (rows, next) = match store.cdr_page(&filter, cursor, 1000).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, rows_sent, "CDR export failed");
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    return;
                }
            };
            let mut out = Vec::with_capacity(rows.len() * 256);
            if std::mem::take(&mut first) {
                out.extend_from_slice(CDR_CSV_COLUMNS.join(",").as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            for r in &rows {
                if csv {
                    let mut w = csv::WriterBuilder::new()
                        .terminator(csv::Terminator::CRLF)
                        .from_writer(&mut out);
                    let fields = [
                        r.call_id.clone(),
                        r.sip_call_id.clone(),
                        r.tenant.clone(),
                        r.user.clone(),
                        r.caller.clone(),
                        r.caller_name.clone().unwrap_or_default(),
                        r.called.clone(),
                        r.route.clone(),
                        r.start_time.clone(),
                        r.answer_time.clone().unwrap_or_default(),
                        r.end_time.clone(),
                        r.duration_secs.to_string(),
                        r.disposition.clone(),
                        r.sip_cause.to_string(),
                        r.packets_in.to_string(),
                        r.packets_out.to_string(),
                        r.answered_by.clone().unwrap_or_default(),
                        r.direction.clone(),
                        r.dialled_by.clone().unwrap_or_default(),
                    ];
                    let _ = w.write_record(&fields);
                    let _ = w.flush();
                } else if serde_json::to_writer(&mut out, r).is_ok() {
                    out.push(b'\n');
                }
            }
            rows_sent += rows.len() as u64;
            if !out.is_empty() && tx.send(Ok(bytes::Bytes::from(out))).await.is_err() {
                return; // The client went away.
            }
            match next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        tracing::info!(rows_sent, "CDR export done");
    });
    let body = axum::body::Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async {
        rx.recv().await.map(|item| (item, rx))
    }));
    let content_type = if csv {
        "text/csv; charset=utf-8"
    } else {
        "application/x-ndjson"
    };
    ([("content-type", content_type)], body).into_response()
}

/// `POST /api/v1/cdrs/import` parameters: the format, the tenant, and for `generic` the
/// header names of the columns.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportQuery {
    format: String,
    tenant: Option<String>,
    src: Option<String>,
    dst: Option<String>,
    start: Option<String>,
    name: Option<String>,
    answer: Option<String>,
    end: Option<String>,
    duration: Option<String>,
    billsec: Option<String>,
    disposition: Option<String>,
    id: Option<String>,
}

impl ImportQuery {
    fn format(self) -> Result<parley_codecs::cdr_csv::Format, String> {
        use parley_codecs::cdr_csv::{Format, Mapping};
        let mapping_given = [
            &self.src,
            &self.dst,
            &self.start,
            &self.name,
            &self.answer,
            &self.end,
            &self.duration,
            &self.billsec,
            &self.disposition,
            &self.id,
        ]
        .iter()
        .any(|c| c.is_some());
        match self.format.as_str() {
            "asterisk" | "freeswitch" if mapping_given => Err(format!(
                "column parameters are for format=generic; {} files have a fixed layout",
                self.format
            )),
            "asterisk" => Ok(Format::Asterisk),
            "freeswitch" => Ok(Format::FreeSwitch),
            "generic" => {
                let required = |v: Option<String>, key: &str| {
                    v.filter(|v| !v.is_empty()).ok_or_else(|| {
                        format!("format=generic needs `{key}` (the header name of that column)")
                    })
                };
                Ok(Format::Generic(Box::new(Mapping {
                    src: required(self.src, "src")?,
                    dst: required(self.dst, "dst")?,
                    start: required(self.start, "start")?,
                    name: self.name,
                    answer: self.answer,
                    end: self.end,
                    duration: self.duration,
                    billsec: self.billsec,
                    disposition: self.disposition,
                    id: self.id,
                })))
            }
            other => Err(format!(
                "unknown format {other:?} (asterisk, freeswitch or generic)"
            )),
        }
    }
}

/// Streams the body through the CSV reader into the tenant's users' address books; the
/// answer is the import report.
async fn import_cdrs(
    State(s): State<Arc<HttpState>>,
    headers: HeaderMap,
    query: Result<Query<ImportQuery>, QueryRejection>,
    body: axum::body::Body,
) -> Response {
    use futures_util::TryStreamExt;
    let q = match authorised_query(&s, &headers, query) {
        Ok(q) => q,
        Err(r) => return *r,
    };
    let tenant = q.tenant.clone().unwrap_or_else(|| "demo".into());
    let format = match q.format() {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", e),
    };
    let region = match s.federation.tenant(&tenant) {
        Some(t) => t.row.region.clone(),
        None if !s.registry.users_of(&tenant).is_empty() => s.default_region.clone(),
        None => {
            return error(
                StatusCode::NOT_FOUND,
                "unknown_tenant",
                format!("no tenant {tenant:?}"),
            );
        }
    };
    let stream = body
        .into_data_stream()
        .map_err(|e| std::io::Error::other(e.to_string()));
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
    let started = std::time::Instant::now();
    tracing::info!(%tenant, "CDR import started");
    match crate::store::import::import(&s.store, &s.registry, (&tenant, &region), format, reader)
        .await
    {
        Ok(report) => {
            if let Some(why) = &report.stopped {
                tracing::warn!(%tenant, error = %why, "CDR import stopped");
            }
            tracing::info!(
                %tenant,
                rows = report.rows,
                imported = report.imported,
                duplicates = report.duplicates,
                unmatched = report.unmatched,
                rejected = report.rejected,
                users_touched = report.users_touched,
                secs = started.elapsed().as_secs_f64(),
                "CDR import done"
            );
            Json(report).into_response()
        }
        Err(crate::store::import::ImportError::Header(e)) => {
            error(StatusCode::BAD_REQUEST, "bad_header", e)
        }
        Err(crate::store::import::ImportError::Read(e)) => {
            tracing::warn!(%tenant, error = %e, "CDR import stopped");
            error(StatusCode::BAD_REQUEST, "read_error", e)
        }
        Err(crate::store::import::ImportError::Store(e)) => db_error(e),
    }
}

#[derive(Deserialize)]
struct TenantQuery {
    tenant: Option<String>,
}

/// `GET /api/v1/users/{user}/address-book` parameters.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BookQuery {
    tenant: Option<String>,
    /// Search instead of listing the whole book.
    q: Option<String>,
    /// Most search results.
    limit: Option<u32>,
}

async fn address_book(
    State(s): State<Arc<HttpState>>,
    headers: HeaderMap,
    Path(user): Path<String>,
    q: Result<Query<BookQuery>, QueryRejection>,
) -> Response {
    let q = match authorised_query(&s, &headers, q) {
        Ok(q) => q,
        Err(r) => return *r,
    };
    let tenant = q.tenant.unwrap_or_else(|| "demo".into());
    let rows = match q.q {
        Some(query) => {
            let limit = q
                .limit
                .unwrap_or(parley_codecs::control::MAX_BOOK_SEARCH_RESULTS)
                .clamp(1, parley_codecs::control::MAX_BOOK_SEARCH_RESULTS);
            s.store.book_search((&tenant, &user), &query, limit).await
        }
        None => s.store.address_book(&tenant, &user).await,
    };
    match rows {
        Ok(rows) => Json(rows).into_response(),
        Err(e) => db_error(e),
    }
}

/// `PUT /api/v1/users/{user}/address-book/{address}` body: what to change.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BookEntryBody {
    name: Option<String>,
    note: Option<String>,
    favourite: Option<bool>,
    blocked: Option<bool>,
}

fn book_error(e: parley_actors::book::BookError) -> Response {
    let status = match e.code {
        "bad_entry" => StatusCode::BAD_REQUEST,
        "unknown_entry" => StatusCode::NOT_FOUND,
        "entry_blocked" | "book_full" => StatusCode::CONFLICT,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(status, e.code, e.message)
}

/// Adds or edits an entry of a user's book, as the user's device would (`book_set`, then
/// `book_block` when `blocked` is given); the user's devices see the change.
async fn put_book_entry(
    State(s): State<Arc<HttpState>>,
    headers: HeaderMap,
    Path((user, address)): Path<(String, String)>,
    q: Result<Query<TenantQuery>, QueryRejection>,
    body: Result<Json<BookEntryBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let q = match authorised_query(&s, &headers, q) {
        Ok(q) => q,
        Err(r) => return *r,
    };
    let Json(b) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", e.body_text()),
    };
    let (tenant, _) = match live_user(&s, &headers, q.tenant, &user) {
        Ok(u) => u,
        Err(r) => return *r,
    };
    use parley_actors::book::{BookOp, BookReply};
    let owner = (tenant.as_str(), user.as_str());
    let mut entry = None;
    if b.name.is_some() || b.note.is_some() || b.favourite.is_some() || b.blocked.is_none() {
        let op = BookOp::Set {
            address: address.clone(),
            name: b.name,
            note: b.note,
            favourite: b.favourite,
        };
        match s.books.apply(owner, op).await {
            Ok(BookReply::Entry(e)) => entry = e,
            Ok(BookReply::Results(_) | BookReply::Calls(..)) => {}
            Err(e) => return book_error(e),
        }
    }
    if let Some(blocked) = b.blocked {
        match s
            .books
            .apply(owner, BookOp::Block { address, blocked })
            .await
        {
            Ok(BookReply::Entry(e)) => entry = e,
            Ok(BookReply::Results(_) | BookReply::Calls(..)) => {}
            Err(e) => return book_error(e),
        }
    }
    Json(entry).into_response()
}

/// Deletes an entry of a user's book (a tombstone, as `book_delete`).
async fn delete_book_entry(
    State(s): State<Arc<HttpState>>,
    headers: HeaderMap,
    Path((user, address)): Path<(String, String)>,
    q: Result<Query<TenantQuery>, QueryRejection>,
) -> Response {
    let q = match authorised_query(&s, &headers, q) {
        Ok(q) => q,
        Err(r) => return *r,
    };
    let (tenant, _) = match live_user(&s, &headers, q.tenant, &user) {
        Ok(u) => u,
        Err(r) => return *r,
    };
    let op = parley_actors::book::BookOp::Delete { address };
    match s.books.apply((&tenant, &user), op).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => book_error(e),
    }
}

fn error(status: StatusCode, code: &str, message: impl std::fmt::Display) -> Response {
    (
        status,
        Json(serde_json::json!({"error": code, "message": message.to_string()})),
    )
        .into_response()
}

/// Authorises the request and finds the user's live actor (401, 404 otherwise).
fn live_user(
    s: &HttpState,
    headers: &HeaderMap,
    tenant: Option<String>,
    user: &str,
) -> Result<(String, UserRef), Box<Response>> {
    authorised(s, headers)?;
    let tenant = tenant.unwrap_or_else(|| "demo".into());
    let u = s.registry.user_by_name(&tenant, user).ok_or_else(|| {
        Box::new(error(
            StatusCode::NOT_FOUND,
            "unknown_user",
            format!("no user {user} in tenant {tenant}"),
        ))
    })?;
    Ok((tenant, u))
}

async fn get_preferences(
    State(s): State<Arc<HttpState>>,
    headers: HeaderMap,
    Path(user): Path<String>,
    Query(q): Query<TenantQuery>,
) -> Response {
    let (_, u) = match live_user(&s, &headers, q.tenant, &user) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    match u.addr.send(GetPreferences).await {
        Ok(p) => Json(p.as_ref().clone()).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e),
    }
}

async fn put_preferences(
    State(s): State<Arc<HttpState>>,
    headers: HeaderMap,
    Path(user): Path<String>,
    Query(q): Query<TenantQuery>,
    body: String,
) -> Response {
    let (tenant, u) = match live_user(&s, &headers, q.tenant, &user) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let prefs = match Preferences::from_json(&body) {
        Ok(p) => p,
        Err(e) => {
            tracing::info!(%tenant, %user, error = %e, "preferences refused");
            return error(StatusCode::BAD_REQUEST, "bad_preferences", e);
        }
    };
    let reply = Json(prefs.clone()).into_response();
    match u.addr.send(SetPreferences(prefs)).await {
        Ok(()) => {
            tracing::info!(%tenant, %user, "preferences changed through the admin API");
            reply
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e),
    }
}

async fn get_presence(
    State(s): State<Arc<HttpState>>,
    headers: HeaderMap,
    Path(user): Path<String>,
    Query(q): Query<TenantQuery>,
) -> Response {
    let (_, u) = match live_user(&s, &headers, q.tenant, &user) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    match u.addr.send(GetPresence).await {
        Ok(p) => Json(p).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e),
    }
}

/// A tenant name: 1 to 64 of `a-z`, `0-9`, `.`, `_`, `-`.
fn valid_tenant(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTenant {
    name: String,
    /// ISO 3166 alpha-2 region for directory numbers.
    region: String,
    /// Users authenticate through auth agents.
    #[serde(default)]
    directory: bool,
}

async fn list_tenants(State(s): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorised(&s, &headers) {
        return *r;
    }
    let list: Vec<_> = s
        .federation
        .tenants()
        .into_iter()
        .map(|(t, agents)| serde_json::json!({"name": t.name, "region": t.region, "directory": t.directory, "agents_connected": agents}))
        .collect();
    Json(list).into_response()
}

async fn create_tenant(
    State(s): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if let Err(r) = authorised(&s, &headers) {
        return *r;
    }
    let t: NewTenant = match serde_json::from_str(&body) {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", e),
    };
    if !valid_tenant(&t.name) {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_tenant",
            "name: 1 to 64 of a-z, 0-9, '.', '_', '-'",
        );
    }
    let region = t.region.to_ascii_uppercase();
    if region.parse::<phonenumber::country::Id>().is_err() {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_region",
            format!("region {}: not an ISO 3166 alpha-2 code", t.region),
        );
    }
    let row = crate::store::tenants::TenantRow {
        name: t.name,
        region,
        directory: t.directory,
    };
    match s.federation.upsert_tenant(row.clone()).await {
        Ok(()) => {
            tracing::info!(tenant = %row.name, region = %row.region, directory = row.directory, "tenant created or updated through the admin API");
            (StatusCode::CREATED, Json(row)).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "database", e),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NewToken {
    /// Seconds the token stays usable.
    ttl_secs: Option<u64>,
}

fn known_tenant(s: &HttpState, tenant: &str) -> Result<(), Box<Response>> {
    if s.federation.tenant(tenant).is_none() {
        return Err(Box::new(error(
            StatusCode::NOT_FOUND,
            "unknown_tenant",
            format!("no tenant {tenant}"),
        )));
    }
    Ok(())
}

async fn create_enrolment_token(
    State(s): State<Arc<HttpState>>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
    body: String,
) -> Response {
    if let Err(r) = authorised(&s, &headers).and_then(|()| known_tenant(&s, &tenant)) {
        return *r;
    }
    let req: NewToken = if body.trim().is_empty() {
        NewToken::default()
    } else {
        match serde_json::from_str(&body) {
            Ok(t) => t,
            Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", e),
        }
    };
    let ttl = req
        .ttl_secs
        .map_or(s.enrolment_token_lifetime, std::time::Duration::from_secs);
    match s.federation.enrolment_token(&tenant, ttl).await {
        Ok((token, expires)) => {
            // The token itself is a secret: it is returned, never logged.
            tracing::info!(%tenant, ttl_secs = ttl.as_secs(), "enrolment token created");
            let expires = crate::store::rfc3339(expires);
            (
                StatusCode::CREATED,
                Json(serde_json::json!({"tenant": tenant, "token": token, "expires": expires})),
            )
                .into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "database", e),
    }
}

/// The cluster's nodes as this node sees them (404 `not_clustered` on a single node).
async fn cluster_nodes(State(s): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorised(&s, &headers) {
        return *r;
    }
    match &s.cluster {
        Some(c) => Json(c.nodes()).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "not_clustered",
            "this node is not in a cluster ([cluster] nats is empty)",
        ),
    }
}

async fn list_agents(
    State(s): State<Arc<HttpState>>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
) -> Response {
    if let Err(r) = authorised(&s, &headers).and_then(|()| known_tenant(&s, &tenant)) {
        return *r;
    }
    match s.federation.agents(Some(&tenant)).await {
        Ok(list) => Json(
            list.into_iter()
                .map(|(a, connected)| serde_json::json!({"id": a.id, "tenant": a.tenant, "name": a.name, "revoked": a.revoked, "connected": connected}))
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "database", e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FederationRule {
    /// Tenants this tenant's users may reach (they must allow this one too).
    allow: Vec<String>,
}

async fn put_federation(
    State(s): State<Arc<HttpState>>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
    body: String,
) -> Response {
    if let Err(r) = authorised(&s, &headers).and_then(|()| known_tenant(&s, &tenant)) {
        return *r;
    }
    let rule: FederationRule = match serde_json::from_str(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", e),
    };
    if let Some(bad) = rule
        .allow
        .iter()
        .find(|p| !valid_tenant(p) || **p == tenant)
    {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_tenant",
            format!("allow: {bad} is not another tenant's name"),
        );
    }
    match s.federation.set_federation(&tenant, &rule.allow).await {
        Ok(()) => {
            tracing::info!(%tenant, allow = ?rule.allow, "federation rule set");
            Json(serde_json::json!({"tenant": tenant, "allow": rule.allow})).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "database", e),
    }
}

async fn revoke_agent(
    State(s): State<Arc<HttpState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = authorised(&s, &headers) {
        return *r;
    }
    match s.federation.revoke(&id).await {
        Ok(true) => Json(serde_json::json!({"id": id, "revoked": true})).into_response(),
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            "unknown_agent",
            format!("no agent {id}"),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "database", e),
    }
}
