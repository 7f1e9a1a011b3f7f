//! HTTP: `/metrics` (Prometheus text), `/healthz`, and the admin API under `/api/v1`
//! (bearer token). axum rather than actix-web: everything else here is plain tokio.

use std::sync::Arc;

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
}

/// The router.
pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/api/v1/cdrs", get(cdrs))
        .route("/api/v1/users/{user}/address-book", get(address_book))
        .route(
            "/api/v1/users/{user}/preferences",
            get(get_preferences).put(put_preferences),
        )
        .route("/api/v1/users/{user}/presence", get(get_presence))
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

fn db_error(e: crate::store::StoreError) -> Response {
    tracing::error!(error = %e, "admin API database error");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(serde_json::json!({"error": "database", "message": e.to_string()})),
    )
        .into_response()
}

#[derive(Deserialize)]
struct CdrQuery {
    tenant: Option<String>,
    user: Option<String>,
    limit: Option<i64>,
}

async fn cdrs(
    State(s): State<Arc<HttpState>>,
    headers: HeaderMap,
    Query(q): Query<CdrQuery>,
) -> Response {
    if let Err(r) = authorised(&s, &headers) {
        return *r;
    }
    let limit = q.limit.unwrap_or(1000).clamp(1, 100_000);
    match s
        .store
        .cdrs(q.tenant.as_deref(), q.user.as_deref(), limit)
        .await
    {
        Ok(rows) => Json(rows).into_response(),
        Err(e) => db_error(e),
    }
}

#[derive(Deserialize)]
struct TenantQuery {
    tenant: Option<String>,
}

async fn address_book(
    State(s): State<Arc<HttpState>>,
    headers: HeaderMap,
    Path(user): Path<String>,
    Query(q): Query<TenantQuery>,
) -> Response {
    if let Err(r) = authorised(&s, &headers) {
        return *r;
    }
    let tenant = q.tenant.unwrap_or_else(|| "demo".into());
    match s.store.address_book(&tenant, &user).await {
        Ok(rows) => Json(rows).into_response(),
        Err(e) => db_error(e),
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
