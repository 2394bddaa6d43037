//! The admin HTTP API (axum), `/metrics` and `/healthz`.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/healthz` | `ok` when the database answers (no auth) |
//! | GET | `/metrics` | Prometheus text format (no auth) |
//! | GET | `/api/v1/subscribers?after=&limit=` | list subscribers |
//! | POST | `/api/v1/subscribers` | add one (JSON, as `subscriber add`) |
//! | POST | `/api/v1/subscribers/import` | CSV body, one transaction |
//! | GET | `/api/v1/subscribers/{supi}` | one subscriber with its children |
//! | GET | `/api/v1/subscribers/{supi}/children` | its children |
//! | PATCH | `/api/v1/subscribers/{supi}/policy` | change policy (JSON, partial) |
//! | POST | `/api/v1/subscribers/{supi}/suspend` \| `resume` \| `revoke` | lifecycle |
//! | GET | `/api/v1/children/{supi}` | one child credential, with its sync state |
//! | POST | `/api/v1/children/{supi}/revoke` | revoke one child credential |
//! | GET | `/api/v1/audit?supi=&limit=` | audit trail, newest `limit`, oldest first |
//!
//! `/api/v1` needs `Authorization: Bearer <admin.token>` (compared in constant time). Errors are
//! `{"error": "<kind>", "message": "..."}` with 400/401/404/409/500/503.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use serde::Deserialize;
use serde_json::json;
use zeroize::Zeroizing;

use crate::admin::{self, AddSubscriber, AdminError, PolicyUpdate};
use crate::model::{SubscriptionStatus, Timestamp};
use crate::service::Service;
use crate::store::Store;

/// State of the HTTP server.
#[derive(Debug, Clone)]
pub struct HttpState {
    /// The service.
    pub svc: Arc<Service>,
    /// The admin bearer token.
    pub token: Arc<Zeroizing<String>>,
}

struct ApiError(AdminError);

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = match &self.0 {
            AdminError::BadRequest(_) | AdminError::Import(_) => {
                (StatusCode::BAD_REQUEST, "bad_request")
            }
            AdminError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            AdminError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            AdminError::Store(
                crate::store::StoreError::Busy | crate::store::StoreError::Unavailable(_),
            ) => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            AdminError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        if status.is_server_error() {
            tracing::warn!("admin API: {}", self.0);
        }
        (
            status,
            axum::Json(json!({"error": kind, "message": self.0.to_string()})),
        )
            .into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

async fn run<T: serde::Serialize + Send + 'static>(
    svc: &Arc<Service>,
    f: impl FnOnce(&dyn Store) -> Result<T, AdminError> + Send + 'static,
) -> ApiResult {
    let st = svc.store.clone();
    let r = tokio::task::spawn_blocking(move || f(&*st))
        .await
        .map_err(|e| {
            ApiError(AdminError::Store(crate::store::StoreError::Database(
                e.to_string(),
            )))
        })??;
    Ok(axum::Json(r).into_response())
}

/// The router.
pub fn router(state: HttpState) -> Router {
    let api = Router::new()
        .route("/subscribers", get(list).post(create))
        .route(
            "/subscribers/import",
            post(import).layer(DefaultBodyLimit::max(256 * 1024 * 1024)),
        )
        .route("/subscribers/{supi}", get(show))
        .route("/subscribers/{supi}/children", get(children))
        .route("/subscribers/{supi}/policy", patch(policy).put(policy))
        .route("/subscribers/{supi}/suspend", post(suspend))
        .route("/subscribers/{supi}/resume", post(resume))
        .route("/subscribers/{supi}/revoke", post(revoke))
        .route("/children/{supi}", get(show_child))
        .route("/children/{supi}/revoke", post(revoke_child))
        .route("/audit", get(audit))
        .route("/attestation/roots", get(list_roots))
        .route(
            "/attestation/roots/{name}",
            post(add_root).delete(remove_root),
        )
        .layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .nest("/api/v1", api)
        .with_state(state)
}

async fn auth(
    State(st): State<HttpState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let ok = presented.is_some_and(|p| {
        p.len() == st.token.len()
            && companion_crypto::secret::ct_eq(p.as_bytes(), st.token.as_bytes())
    });
    if !ok {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            axum::Json(json!({
                "error": "unauthorized",
                "message": "missing or wrong bearer token: send Authorization: Bearer <contents of admin.token>"
            })),
        )
            .into_response();
    }
    next.run(req).await
}

async fn healthz(State(st): State<HttpState>) -> Response {
    let store = st.svc.store.clone();
    match tokio::task::spawn_blocking(move || store.count_parents()).await {
        Ok(Ok(_)) => (StatusCode::OK, "ok\n").into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n").into_response(),
    }
}

async fn metrics(State(st): State<HttpState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.svc.metrics.render(),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    after: Option<String>,
    #[serde(default)]
    limit: u32,
}

async fn list(State(st): State<HttpState>, Query(q): Query<ListQuery>) -> ApiResult {
    run(&st.svc, move |s| {
        admin::list_subscribers(s, q.after.as_deref(), q.limit)
    })
    .await
}

async fn create(State(st): State<HttpState>, body: Bytes) -> ApiResult {
    let req: AddSubscriber = serde_json::from_slice(&body)
        .map_err(|e| AdminError::BadRequest(format!("request body: {e}")))?;
    let op = st.svc.issuer.op.clone();
    let r = run(&st.svc, move |s| {
        admin::add_subscriber(s, &req, Some(&op), "api", Timestamp::now())
    })
    .await?;
    Ok((StatusCode::CREATED, r).into_response())
}

async fn import(State(st): State<HttpState>, body: Bytes) -> ApiResult {
    run(&st.svc, move |s| {
        let n = admin::import(s, body.as_ref(), "api:import", Timestamp::now())?;
        Ok(json!({ "imported": n }))
    })
    .await
}

async fn show(State(st): State<HttpState>, Path(supi): Path<String>) -> ApiResult {
    run(&st.svc, move |s| {
        admin::show_subscriber(s, &supi, Timestamp::now())
    })
    .await
}

async fn children(State(st): State<HttpState>, Path(supi): Path<String>) -> ApiResult {
    run(&st.svc, move |s| {
        Ok(admin::show_subscriber(s, &supi, Timestamp::now())?.children)
    })
    .await
}

async fn policy(State(st): State<HttpState>, Path(supi): Path<String>, body: Bytes) -> ApiResult {
    let upd: PolicyUpdate = serde_json::from_slice(&body)
        .map_err(|e| AdminError::BadRequest(format!("request body: {e}")))?;
    run(&st.svc, move |s| {
        admin::update_policy(s, &supi, &upd, "api", Timestamp::now())
    })
    .await
}

async fn status(st: HttpState, supi: String, to: SubscriptionStatus) -> ApiResult {
    let svc = st.svc.clone();
    let st2 = st.svc.clone();
    run(&svc, move |s| {
        let v = admin::set_status(s, &supi, to, "api", Timestamp::now())?;
        st2.metrics.revoked.inc_by(v.revoked_children.len() as u64);
        Ok(v)
    })
    .await
}

async fn suspend(State(st): State<HttpState>, Path(supi): Path<String>) -> ApiResult {
    status(st, supi, SubscriptionStatus::Suspended).await
}

async fn resume(State(st): State<HttpState>, Path(supi): Path<String>) -> ApiResult {
    status(st, supi, SubscriptionStatus::Active).await
}

async fn revoke(State(st): State<HttpState>, Path(supi): Path<String>) -> ApiResult {
    status(st, supi, SubscriptionStatus::Revoked).await
}

async fn show_child(State(st): State<HttpState>, Path(supi): Path<String>) -> ApiResult {
    run(&st.svc, move |s| {
        admin::show_child(s, &supi, Timestamp::now())
    })
    .await
}

async fn revoke_child(State(st): State<HttpState>, Path(supi): Path<String>) -> ApiResult {
    let svc = st.svc.clone();
    run(&st.svc, move |s| {
        let changed = admin::revoke_child(s, &supi, "api", Timestamp::now())?;
        if changed {
            svc.metrics.revoked.inc();
        }
        Ok(json!({ "supi": supi, "revoked": changed }))
    })
    .await
}

async fn list_roots(State(st): State<HttpState>) -> ApiResult {
    run(&st.svc, |s| admin::list_roots(s)).await
}

/// The body is the root's CA certificate, PEM or DER.
async fn add_root(State(st): State<HttpState>, Path(name): Path<String>, body: Bytes) -> ApiResult {
    let r = run(&st.svc, move |s| {
        admin::add_root(s, &name, body.as_ref(), Timestamp::now())
    })
    .await?;
    Ok((StatusCode::CREATED, r).into_response())
}

async fn remove_root(State(st): State<HttpState>, Path(name): Path<String>) -> ApiResult {
    run(&st.svc, move |s| {
        admin::remove_root(s, &name)?;
        Ok(json!({ "removed": name }))
    })
    .await
}

#[derive(Debug, Deserialize)]
struct AuditQuery {
    supi: Option<String>,
    #[serde(default)]
    limit: u32,
}

async fn audit(State(st): State<HttpState>, Query(q): Query<AuditQuery>) -> ApiResult {
    run(&st.svc, move |s| {
        admin::audit(s, q.supi.as_deref(), q.limit)
    })
    .await
}
