//! The control endpoint: the running client's status (`GET /v1/status`, JSON) and its
//! Prometheus metrics (`GET /metrics`) over HTTP on loopback, read-only; and the other end,
//! which `murmur-client status` uses.
//!
//! It only listens on a loopback address, and answers only requests whose `Host` is a
//! loopback address or `localhost`: a web page the user visits could otherwise read the
//! client's status through DNS rebinding (a name of the attacker's that resolves to
//! 127.0.0.1), learning its gateway and what it spends. Other local users of the machine can
//! read it, as they can see its connections; it changes nothing.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use murmur_service::{HttpLimits, RefusalCounter, serve_until};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::status::Status;

/// Where the control endpoint listens unless told otherwise.
pub fn default_control() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1090))
}

/// Bounds of the control listener: a person and a scraper or two.
pub const CONTROL_HTTP: HttpLimits = HttpLimits {
    max_connections: 16,
    max_connections_per_address: 16,
    header_timeout: Duration::from_secs(5),
    idle_timeout: Duration::from_secs(30),
};

/// The largest status answer `murmur-client status` reads (a status lists at most the
/// payer's accounts, a few hundred relays).
const MAX_STATUS_BYTES: usize = 4 << 20;

/// Builds a status on demand.
pub type StatusSource = Arc<dyn Fn() -> Status + Send + Sync>;

/// Requests the control endpoint refused, by reason.
#[derive(Default, Debug)]
pub struct ControlStats {
    /// A `Host` that is not loopback (DNS rebinding, or a mistake).
    pub foreign_host: AtomicU64,
    /// Connections refused or timed out by the serving loop (caps, header and idle timeouts).
    pub connections_refused: AtomicU64,
}

/// Refuses to listen anywhere but on loopback.
pub fn check_address(addr: SocketAddr) -> anyhow::Result<()> {
    if !addr.ip().is_loopback() {
        anyhow::bail!(
            "the control endpoint listens on loopback only (it tells what the client spends \
             and where it connects); {addr} is not a loopback address"
        );
    }
    Ok(())
}

/// Binds `addr` (loopback only) and serves the status until `shutdown`. Returns the bound
/// address once listening.
pub async fn start(
    addr: SocketAddr,
    status: StatusSource,
    stats: Arc<ControlStats>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<SocketAddr> {
    check_address(addr)?;
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen for the control endpoint on {addr}: {e} (set [control] listen, or \
             --control, to another port)"
        )
    })?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/v1/status", get(status_json))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(stats.clone(), loopback_host))
        .with_state(status);
    let refused: RefusalCounter = {
        let stats = stats.clone();
        Arc::new(move |_reason| {
            stats.connections_refused.fetch_add(1, Ordering::Relaxed);
        })
    };
    let token = shutdown.child_token();
    tracker.spawn(async move {
        let until = shutdown.clone();
        if let Err(e) = serve_until(
            listener,
            CONTROL_HTTP,
            app,
            refused,
            async move { until.cancelled().await },
            token,
            TaskTracker::new(),
        )
        .await
        {
            tracing::warn!(error = %e, "the control endpoint stopped");
        }
    });
    Ok(local)
}

async fn status_json(State(status): State<StatusSource>) -> Response {
    match serde_json::to_vec(&status()) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn metrics(State(status): State<StatusSource>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        status().render_prometheus(),
    )
        .into_response()
}

/// Answers only requests addressed to a loopback host (see the module documentation).
async fn loopback_host(
    State(stats): State<Arc<ControlStats>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    if host.is_some_and(|h| !is_loopback_host(h)) {
        stats.foreign_host.fetch_add(1, Ordering::Relaxed);
        return (
            StatusCode::FORBIDDEN,
            "the control endpoint answers only requests addressed to a loopback host\n",
        )
            .into_response();
    }
    next.run(request).await
}

/// Whether a `Host` header names a loopback address or `localhost` (with or without a port).
fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(name, _port)| name)
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Asks the client at `addr` for its status.
pub async fn fetch(addr: SocketAddr) -> anyhow::Result<Status> {
    let url = format!("http://{addr}/v1/status");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .no_proxy()
        .build()?;
    let mut resp = http.get(&url).send().await.map_err(|e| {
        anyhow::anyhow!(
            "no client answers on {addr} ({e}); is it running, with this control address?"
        )
    })?;
    let code = resp.status();
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > MAX_STATUS_BYTES {
            anyhow::bail!("{url}: the answer is over {MAX_STATUS_BYTES} bytes");
        }
        body.extend_from_slice(&chunk);
    }
    if !code.is_success() {
        anyhow::bail!("{url}: {code}: {}", String::from_utf8_lossy(&body).trim());
    }
    serde_json::from_slice(&body).map_err(|e| anyhow::anyhow!("{url}: not a status: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn only_loopback_hosts_pass() {
        for ok in [
            "127.0.0.1:1090",
            "127.0.0.1",
            "localhost:1090",
            "LOCALHOST",
            "[::1]:1090",
            "127.9.9.9:80",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "evil.example:1090",
            "evil.example",
            "10.0.0.1:1090",
            "localhost.evil.example",
            "[2001:db8::1]:1090",
            "",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn a_non_loopback_control_address_is_refused() {
        let err = check_address("0.0.0.0:1090".parse().unwrap()).unwrap_err();
        assert!(err.to_string().contains("loopback only"), "{err}");
        check_address("127.0.0.1:0".parse().unwrap()).unwrap();
    }

    /// A page that rebinds its own name to 127.0.0.1 cannot read the status: its requests
    /// carry its name as `Host`. Fails without the `Host` check.
    #[test]
    fn a_rebound_name_cannot_read_the_status() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let shutdown = CancellationToken::new();
            let tracker = TaskTracker::new();
            let stats = Arc::new(ControlStats::default());
            let source: StatusSource = Arc::new(|| Status {
                uptime_s: 7,
                ..Status::default()
            });
            let addr = start(
                "127.0.0.1:0".parse().unwrap(),
                source,
                stats.clone(),
                shutdown.clone(),
                &tracker,
            )
            .await
            .unwrap();
            assert_eq!(fetch(addr).await.unwrap().uptime_s, 7);
            let http = reqwest::Client::builder().no_proxy().build().unwrap();
            let resp = http
                .get(format!("http://{addr}/v1/status"))
                .header("Host", "rebind.evil.example")
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 403);
            assert_eq!(stats.foreign_host.load(Ordering::Relaxed), 1);
            let metrics = http
                .get(format!("http://{addr}/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            assert!(
                metrics.contains("murmur_client_uptime_seconds 7"),
                "{metrics}"
            );
            shutdown.cancel();
        });
    }
}
