//! The coordinator's HTTP side (`status_listen`): the live status page
//! (`/`), its data (`/api/status`, the same JSON `coordinator status`
//! prints), Prometheus metrics (`/metrics`) and, once written, the report
//! (`/report.md`, `/report.json`).
//!
//! On a loopback address everything is open; elsewhere every request needs
//! the cluster token, as `Authorization: Bearer <token>` (Prometheus) or a
//! `?token=` query (a browser; the page passes it on to its own requests).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use proto::auth::Token;

use crate::job::SharedJob;
use crate::report::{REPORT_JSON, REPORT_MD};

/// The page itself: static HTML that renders `/api/status` every second.
const PAGE: &str = include_str!("status_page.html");

/// What the handlers share.
#[derive(Clone)]
pub struct StatusServer {
    /// The job (and its store, which holds the report files).
    pub shared: SharedJob,
    /// The Prometheus recorder's handle.
    pub metrics: PrometheusHandle,
    /// The token every request must carry, or `None` (loopback, or
    /// authentication off).
    pub token: Option<Token>,
}

impl StatusServer {
    /// The routes, behind the token check.
    pub fn router(self) -> Router {
        let state = Arc::new(self);
        Router::new()
            .route("/", get(page))
            .route("/api/status", get(status))
            .route("/metrics", get(metrics))
            .route("/report.md", get(report_md))
            .route("/report.json", get(report_json))
            .layer(axum::middleware::from_fn_with_state(
                state.clone(),
                require_token,
            ))
            .with_state(state)
    }
}

/// The token the status server requires on `addr`: none on loopback.
pub fn token_for(addr: &SocketAddr, token: Option<&Token>) -> Option<Token> {
    if addr.ip().is_loopback() {
        None
    } else {
        token.cloned()
    }
}

async fn require_token(
    State(server): State<Arc<StatusServer>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = &server.token else {
        return next.run(request).await;
    };
    let from_header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let from_query = request
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix("token=")));
    match from_header.or(from_query) {
        Some(sent) if expected.matches(sent) => next.run(request).await,
        _ => {
            tracing::warn!(path = %request.uri().path(), "status request refused: no or wrong token");
            (
                StatusCode::UNAUTHORIZED,
                "this status page needs the cluster token: Authorization: Bearer <token>, or ?token=<token>\n",
            )
                .into_response()
        }
    }
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn status(State(server): State<Arc<StatusServer>>) -> Response {
    let report = read_report(&server.shared, REPORT_MD).await;
    let snapshot = server.shared.status(report);
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(snapshot)).into_response()
}

async fn metrics(State(server): State<Arc<StatusServer>>) -> Response {
    server.shared.status(None).export_metrics();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        server.metrics.render(),
    )
        .into_response()
}

async fn report_md(State(server): State<Arc<StatusServer>>) -> Response {
    report_file(&server, REPORT_MD, "text/markdown; charset=utf-8").await
}

async fn report_json(State(server): State<Arc<StatusServer>>) -> Response {
    report_file(&server, REPORT_JSON, "application/json").await
}

async fn report_file(server: &StatusServer, name: &str, kind: &'static str) -> Response {
    match read_report(&server.shared, name).await {
        Some(text) => ([(header::CONTENT_TYPE, kind)], text).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            "no report yet: the job is not done\n",
        )
            .into_response(),
    }
}

/// A report file of a finished job, from the job's store (`None` while
/// the job runs).
async fn read_report(shared: &SharedJob, name: &str) -> Option<String> {
    let bytes = common::blob::get_bytes(&**shared.store(), name)
        .await
        .ok()?;
    String::from_utf8(bytes).ok()
}
