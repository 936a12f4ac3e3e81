//! The HTTP API and the daemon around it. Bodies are JSON, read with a size bound and a
//! deadline; connections are capped in total and per address, and closed when a request head
//! is slow or the connection idle; every refusal is a 4xx with a JSON body
//! `{"reason": …, "message": …}` counted under its reason; every answer under `/v1/` is
//! signed by the ledger's key ([`crate::answer`]); nothing logs a client's address.
//!
//! | route | body → answer |
//! |---|---|
//! | `POST /v1/fund` | `Signed<Fund>` → `Transfer` |
//! | `POST /v1/warn` | `Signed<Warn>` → `Pot` |
//! | `POST /v1/withdraw` | `Signed<Withdraw>` → `Transfer` |
//! | `POST /v1/redeem` | `Signed<Redeem>` → `Redemption` |
//! | `GET /v1/pot/{key}` | → `Pot` (404 `unknown_pot`) |
//! | `GET /v1/account/{key}` | → `Account` |
//! | `GET /metrics` | Prometheus text |

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ed25519_dalek::SigningKey;
use futures_util::StreamExt;
use murmur_protocol::directory::IdentityKey;
use murmur_service::{RefusalCounter, serve_until};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::answer::{self, ErrorBody, Exchange, SIGNATURE_HEADER};
use crate::client::MAX_RESPONSE_BYTES;
use crate::config::Config;
use crate::ledger::{Apply, Ledger};
use crate::metrics::Metrics;
use crate::request::{Fund, Redeem, Signed, Warn, Withdraw};
use crate::{Error, Refusal, Result, unix_now};

/// The largest request body read (a redemption is about 1 KiB of JSON).
pub const MAX_REQUEST_BYTES: usize = 4096;

struct Ctx {
    ledger: Ledger,
    metrics: Metrics,
    config: Config,
    /// Signs every answer.
    key: SigningKey,
}

fn router(ctx: Arc<Ctx>) -> Router {
    Router::new()
        .route("/v1/fund", post(post_op::<Fund>))
        .route("/v1/warn", post(post_op::<Warn>))
        .route("/v1/withdraw", post(post_op::<Withdraw>))
        .route("/v1/redeem", post(post_op::<Redeem>))
        .route("/v1/pot/{key}", get(get_pot))
        .route("/v1/account/{key}", get(get_account))
        .route("/metrics", get(get_metrics))
        // Around every route and the fallback (404, 405), so every answer is signed.
        .layer(middleware::from_fn_with_state(ctx.clone(), sign_answers))
        .with_state(ctx)
}

/// Signs the answer to every request but `/metrics` ([`crate::answer`]): hashes the request
/// body as the handler reads it, then the answer, and adds the signature header.
async fn sign_answers(State(ctx): State<Arc<Ctx>>, req: Request, next: Next) -> Response {
    if req.uri().path() == "/metrics" {
        return next.run(req).await;
    }
    let method = req.method().as_str().to_owned();
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned());
    let hasher = Arc::new(Mutex::new(Sha256::new()));
    let (parts, body) = req.into_parts();
    let seen = hasher.clone();
    // The handler reads the body with its own bound and deadline; this only watches it go by.
    let body = Body::from_stream(body.into_data_stream().map(move |chunk| {
        if let Ok(bytes) = &chunk {
            seen.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .update(bytes);
        }
        chunk
    }));
    let answer = next.run(Request::from_parts(parts, body)).await;
    let request_digest: [u8; 32] = hasher
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
        .finalize()
        .into();
    let (mut parts, body) = answer.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_RESPONSE_BYTES).await {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::error!("cannot sign an answer: {e}");
            parts.status = StatusCode::INTERNAL_SERVER_ERROR;
            parts.headers.remove(header::CONTENT_LENGTH);
            Bytes::from(error_json(
                "internal",
                &"the answer could not be read to be signed",
            ))
        }
    };
    let signature = Exchange {
        method: &method,
        target: &target,
        request_digest,
        status: parts.status.as_u16(),
        answer_digest: answer::digest(&bytes),
    }
    .sign(&ctx.key);
    // Hex is always a valid header value.
    if let Ok(value) = HeaderValue::from_str(&signature) {
        parts.headers.insert(SIGNATURE_HEADER, value);
    }
    Response::from_parts(parts, Body::from(bytes))
}

/// Counts the result under `op` and answers: 200 with the JSON value, or the refusal's
/// status with an [`ErrorBody`].
fn respond<T: Serialize>(ctx: &Ctx, op: &'static str, result: Result<T>) -> Response {
    let label = result.as_ref().map_or_else(Error::label, |_| "ok");
    ctx.metrics.inc(op, label);
    let (status, body) = match result {
        Ok(value) => match serde_json::to_string(&value) {
            Ok(text) => (StatusCode::OK, text),
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                error_json("internal", &e),
            ),
        },
        Err(e) => {
            let status = match e.refusal() {
                Some(r) => {
                    tracing::debug!(op, reason = label, "refused: {e}");
                    StatusCode::from_u16(r.status()).unwrap_or(StatusCode::BAD_REQUEST)
                }
                None => {
                    tracing::error!(op, "request failed: {e}");
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            };
            let message = match &e {
                Error::Refused { message, .. } => message.clone(),
                other => other.to_string(),
            };
            (status, error_json(label, &message))
        }
    };
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn error_json(reason: &str, message: &dyn std::fmt::Display) -> String {
    let body = ErrorBody {
        reason: reason.to_owned(),
        message: message.to_string(),
    };
    serde_json::to_string(&body).unwrap_or_default()
}

/// Reads at most [`MAX_REQUEST_BYTES`] within the configured deadline.
async fn read_body(ctx: &Ctx, body: Body) -> Result<Bytes> {
    let deadline = ctx.config.limits.body_timeout;
    match tokio::time::timeout(deadline, axum::body::to_bytes(body, MAX_REQUEST_BYTES)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(_)) => Err(Refusal::TooLarge.because(format!(
            "body larger than {MAX_REQUEST_BYTES} bytes, or cut off"
        ))),
        Err(_) => {
            Err(Refusal::BodyTimeout.because(format!("body did not arrive within {deadline:?}")))
        }
    }
}

async fn post_op<T: Apply>(State(ctx): State<Arc<Ctx>>, body: Body) -> Response {
    let result = async {
        let bytes = read_body(&ctx, body).await?;
        let req: Signed<T> = serde_json::from_slice(&bytes).map_err(|e| {
            Refusal::Malformed.because(format!("not a signed {} request: {e}", T::NAME))
        })?;
        ctx.ledger.apply_now(req).await
    }
    .await;
    respond(&ctx, T::NAME, result)
}

fn parse_key(text: &str) -> Result<IdentityKey> {
    IdentityKey::from_hex(text).map_err(|e| Refusal::Malformed.because(e.to_string()))
}

async fn get_pot(State(ctx): State<Arc<Ctx>>, Path(key): Path<String>) -> Response {
    let result = match parse_key(&key) {
        Ok(key) => ctx.ledger.blocking(move |l| l.read_pot(&key)).await,
        Err(e) => Err(e),
    };
    respond(&ctx, "pot", result)
}

async fn get_account(State(ctx): State<Arc<Ctx>>, Path(key): Path<String>) -> Response {
    let result = match parse_key(&key) {
        Ok(key) => ctx.ledger.blocking(move |l| l.read_account(&key)).await,
        Err(e) => Err(e),
    };
    respond(&ctx, "account", result)
}

/// From counters in memory: a scrape reads no table.
async fn get_metrics(State(ctx): State<Arc<Ctx>>) -> Response {
    let totals = ctx.ledger.totals();
    let text = ctx.metrics.render(Some(&totals));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Binds `config.listen` and runs the ledger until `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Listen {
            addr: config.listen,
            source,
        })?;
    serve(config, listener, shutdown).await
}

/// Opens the database and serves the API on an already bound listener (tests bind
/// `127.0.0.1:0`) until `shutdown` completes; then stops accepting, finishes open requests
/// and the pruning task, and returns (the database closes when the last request is done).
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    std::fs::create_dir_all(&config.state_dir).map_err(|source| Error::State {
        path: config.state_dir.clone(),
        source,
    })?;
    let genesis = config.genesis()?;
    let key = config.signing_key()?;
    let ledger = Ledger::open(&config.database_path(), config.params(), &genesis)?
        .with_rate_limits(config.limits.rate());
    let addr = listener.local_addr().map_err(|source| Error::Listen {
        addr: config.listen,
        source,
    })?;
    tracing::info!(
        %addr,
        identity = %IdentityKey::of(&key),
        database = %config.database_path().display(),
        notice_period_s = config.params().notice_period_s,
        genesis_accounts = genesis.len(),
        "ledger listening"
    );
    let ctx = Arc::new(Ctx {
        ledger,
        metrics: Metrics::default(),
        config,
        key,
    });

    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(prune_periodically(ctx.clone(), token.clone()));
    let counter = ctx.clone();
    let refused: RefusalCounter = Arc::new(move |reason| counter.metrics.refused(reason));
    serve_until(
        listener,
        ctx.config.limits.http(),
        router(ctx.clone()),
        refused,
        shutdown,
        token,
        tracker,
    )
    .await
    .map_err(Error::Serve)
}

async fn prune_periodically(ctx: Arc<Ctx>, token: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(ctx.config.prune_interval) => {}
            () = token.cancelled() => return,
        }
        match ctx.ledger.blocking(|l| l.prune(unix_now())).await {
            Ok(p) => tracing::debug!(
                redeemed_tickets = p.redeemed_tickets,
                requests = p.requests,
                "pruned expired records"
            ),
            Err(e) => tracing::error!("cannot prune the ledger: {e}"),
        }
        // The kept totals against a full count, now and then rather than at every scrape.
        if let Err(e) = ctx.ledger.blocking(|l| l.check_totals()).await {
            tracing::error!("cannot count the ledger's totals: {e}");
        }
    }
}
