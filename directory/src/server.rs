//! The HTTP API. Bodies are read with a size bound and a deadline, connections are capped,
//! every refusal is a clear 4xx counted under a reason, and nothing here logs a client's
//! address (the server never asks for it).
//!
//! | route | body / answer |
//! |---|---|
//! | `POST /v1/descriptor` | postcard `SignedDescriptor` |
//! | `POST /v1/vote` | postcard `SignedVote` (authorities) |
//! | `GET /v1/votes/{epoch}` | postcard `Vec<SignedVote>`: the votes held (authorities) |
//! | `POST /v1/signature` | postcard [`SignatureUpload`](crate::SignatureUpload) (authorities) |
//! | `GET /v1/consensus/latest` | postcard `SignedConsensus`, the newest valid now |
//! | `GET /v1/consensus/{epoch}` | postcard `SignedConsensus` for that epoch |
//! | `GET /v1/consensus/latest.json` | the newest consensus, readable |
//! | `GET /v1/prober` | postcard `SignedProberCard`: where this authority's prober listens |
//! | `GET /metrics` | Prometheus text |

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use murmur_protocol::directory::{
    Consensus, Roles, SignedConsensus, SignedDescriptor, address_key, decode, encode,
};
use murmur_service::ConnectedPeer;
use serde::Serialize;

use crate::authority::{Accepted, Refusal};
use crate::daemon::Ctx;
use crate::metrics::{
    DESCRIPTORS_ACCEPTED, DESCRIPTORS_REJECTED, REQUESTS_REFUSED, SIGNATURES_RECEIVED,
    VOTES_RECEIVED,
};
use crate::{SignatureUpload, unix_now};

/// Largest descriptor upload.
pub const MAX_DESCRIPTOR_BYTES: usize = 64 << 10;
/// Largest vote (10,000 descriptors with long exit policies).
pub const MAX_VOTE_BYTES: usize = 32 << 20;
/// Largest signature upload.
pub const MAX_SIGNATURE_BYTES: usize = 1024;

pub(crate) fn router(ctx: Arc<Ctx>) -> Router {
    Router::new()
        .route("/v1/descriptor", post(post_descriptor))
        .route("/v1/vote", post(post_vote))
        .route("/v1/votes/{epoch}", get(get_votes))
        .route("/v1/signature", post(post_signature))
        .route("/v1/consensus/latest", get(get_latest))
        .route("/v1/consensus/latest.json", get(get_latest_json))
        .route("/v1/consensus/{epoch}", get(get_epoch))
        .route("/v1/prober", get(get_prober))
        .route("/metrics", get(get_metrics))
        .with_state(ctx)
}

/// A plain-text answer with a status: what every handler returns on failure.
struct Reply(StatusCode, String);

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        (self.0, self.1).into_response()
    }
}

impl From<&Refusal> for Reply {
    fn from(r: &Refusal) -> Self {
        let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST);
        Reply(status, format!("{}\n", r.message))
    }
}

fn ok(message: &str) -> Response {
    Reply(StatusCode::OK, format!("{message}\n")).into_response()
}

fn internal(e: impl std::fmt::Display) -> Reply {
    Reply(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
}

/// A document in its canonical encoding.
fn postcard<T: Serialize>(doc: &T) -> Result<Response, Reply> {
    let bytes = encode(doc).map_err(internal)?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// Reads at most `limit` bytes within the configured deadline; refusals are counted.
async fn read_body(ctx: &Ctx, body: Body, limit: usize) -> Result<Bytes, Reply> {
    let deadline = ctx.config.limits.body_timeout;
    match tokio::time::timeout(deadline, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(_)) => {
            ctx.metrics.inc(REQUESTS_REFUSED, "too_large");
            Err(Reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body larger than {limit} bytes, or cut off\n"),
            ))
        }
        Err(_) => {
            ctx.metrics.inc(REQUESTS_REFUSED, "body_timeout");
            Err(Reply(
                StatusCode::REQUEST_TIMEOUT,
                format!("body did not arrive within {deadline:?}\n"),
            ))
        }
    }
}

fn parse_epoch(ctx: &Ctx, text: &str) -> Result<u32, Reply> {
    text.parse().map_err(|_| {
        ctx.metrics.inc(REQUESTS_REFUSED, "bad_epoch");
        Reply(
            StatusCode::BAD_REQUEST,
            format!("{text:?} is not an epoch number\n"),
        )
    })
}

async fn post_descriptor(
    State(ctx): State<Arc<Ctx>>,
    peer: Option<Extension<ConnectedPeer>>,
    body: Body,
) -> Result<Response, Reply> {
    if let Some(Extension(ConnectedPeer(addr))) = peer {
        let allowed = ctx
            .uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .allow(&address_key(addr.ip()), std::time::Instant::now());
        if !allowed {
            ctx.metrics.inc(DESCRIPTORS_REJECTED, "rate_limited");
            return Err(Reply(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "more than {} descriptor uploads a minute from this address\n",
                    ctx.config.limits.uploads_per_minute_per_address
                ),
            ));
        }
    }
    let bytes = read_body(&ctx, body, MAX_DESCRIPTOR_BYTES).await?;
    let mut evicted = Vec::new();
    let result = decode::<SignedDescriptor>(&bytes)
        .map_err(Refusal::from)
        .and_then(|d| {
            let mut state = ctx.lock();
            let untested = state.probe_history(&d.signature.signer).is_none();
            let accepted = state.accept_descriptor(d.clone(), unix_now())?;
            evicted = state.take_evicted();
            if accepted == Accepted::Stored && untested {
                ctx.new_relay.notify_one();
            }
            Ok((accepted, d))
        });
    for id in evicted {
        ctx.metrics.inc(DESCRIPTORS_REJECTED, "evicted_untested");
        if let Err(e) = ctx.storage.remove_descriptor(&id).await {
            tracing::warn!(error = %e, "cannot remove an evicted descriptor");
        }
    }
    match result {
        Ok((Accepted::Stored, d)) => {
            ctx.metrics.inc(DESCRIPTORS_ACCEPTED, "");
            if let Err(e) = ctx.storage.save_descriptor(&d).await {
                tracing::error!(error = %e, "cannot store descriptor");
            }
            Ok(ok("accepted"))
        }
        Ok(_) => Ok(ok("already held")),
        Err(r) => {
            ctx.metrics.inc(DESCRIPTORS_REJECTED, r.reason);
            tracing::debug!(reason = r.reason, "descriptor refused: {}", r.message);
            Err((&r).into())
        }
    }
}

async fn post_vote(State(ctx): State<Arc<Ctx>>, body: Body) -> Result<Response, Reply> {
    let bytes = read_body(&ctx, body, MAX_VOTE_BYTES).await?;
    match ctx.take_vote(decode(&bytes)).await {
        Ok(Accepted::Stored) => Ok(ok("accepted")),
        Ok(_) => Ok(ok("already held")),
        Err(r) => Err((&r).into()),
    }
}

async fn get_votes(
    State(ctx): State<Arc<Ctx>>,
    Path(epoch): Path<String>,
) -> Result<Response, Reply> {
    let epoch = parse_epoch(&ctx, &epoch)?;
    let votes = ctx.lock().votes_for(epoch);
    postcard(&votes)
}

async fn post_signature(State(ctx): State<Arc<Ctx>>, body: Body) -> Result<Response, Reply> {
    let bytes = read_body(&ctx, body, MAX_SIGNATURE_BYTES).await?;
    let result = decode::<SignatureUpload>(&bytes)
        .map_err(Refusal::from)
        .and_then(|up| {
            let mut state = ctx.lock();
            let accepted = state.accept_signature(up.epoch, up.signature, unix_now())?;
            let threshold = state.authorities().threshold();
            let doc = state.signed(up.epoch).cloned();
            Ok((accepted, up.epoch, doc, threshold))
        });
    match result {
        Ok((Accepted::Stored, epoch, Some(doc), threshold)) => {
            ctx.metrics.inc(SIGNATURES_RECEIVED, "accepted");
            if doc.signatures.len() == threshold {
                tracing::info!(epoch, signatures = threshold, "consensus published");
            }
            if let Err(e) = ctx.storage.save_consensus(epoch, &doc).await {
                tracing::error!(error = %e, "cannot store consensus");
            }
            Ok(ok("accepted"))
        }
        Ok((Accepted::Pending, ..)) => {
            ctx.metrics.inc(SIGNATURES_RECEIVED, "pending");
            Ok(Reply(
                StatusCode::ACCEPTED,
                "held until this authority computes\n".into(),
            )
            .into_response())
        }
        Ok(_) => {
            ctx.metrics.inc(SIGNATURES_RECEIVED, "duplicate");
            Ok(ok("already held"))
        }
        Err(r) => {
            ctx.metrics.inc(SIGNATURES_RECEIVED, r.reason);
            tracing::warn!(reason = r.reason, "signature refused: {}", r.message);
            Err((&r).into())
        }
    }
}

fn latest(ctx: &Ctx) -> Result<SignedConsensus, Reply> {
    ctx.lock()
        .latest(unix_now())
        .cloned()
        .ok_or_else(|| Reply(StatusCode::NOT_FOUND, "no consensus is valid now\n".into()))
}

async fn get_latest(State(ctx): State<Arc<Ctx>>) -> Result<Response, Reply> {
    postcard(&latest(&ctx)?)
}

async fn get_epoch(
    State(ctx): State<Arc<Ctx>>,
    Path(epoch): Path<String>,
) -> Result<Response, Reply> {
    let epoch = parse_epoch(&ctx, &epoch)?;
    let doc = ctx.lock().published(epoch).cloned();
    let doc = doc.ok_or_else(|| {
        Reply(
            StatusCode::NOT_FOUND,
            format!("no consensus for epoch {epoch}\n"),
        )
    })?;
    postcard(&doc)
}

/// The readable view of a consensus.
#[derive(Serialize)]
struct ConsensusView {
    epoch: u32,
    valid_after: u64,
    fresh_until: u64,
    valid_until: u64,
    params: murmur_protocol::directory::NetworkParams,
    signers: Vec<String>,
    relays: Vec<RelayView>,
}

#[derive(Serialize)]
struct RelayView {
    identity: String,
    family: String,
    mix_address: SocketAddr,
    client_address: Option<SocketAddr>,
    roles: Roles,
    layer: Option<u8>,
    sphinx_keys: Vec<(u32, String)>,
    exit_policy: String,
    price_per_packet: u64,
    bandwidth: u32,
    weight: u32,
    performance: u16,
    family_members: Vec<String>,
}

fn view(doc: &SignedConsensus) -> Result<ConsensusView, murmur_protocol::Error> {
    let c: Consensus = decode(&doc.body)?;
    Ok(ConsensusView {
        epoch: c.epoch,
        valid_after: c.valid_after,
        fresh_until: c.fresh_until,
        valid_until: c.valid_until,
        params: c.params,
        signers: doc.signatures.iter().map(|s| s.signer.to_hex()).collect(),
        relays: c
            .relays
            .iter()
            .map(|r| RelayView {
                identity: r.identity.to_hex(),
                family: r.family.clone(),
                mix_address: r.addresses.mix,
                client_address: r.addresses.client,
                roles: r.roles,
                layer: r.layer,
                sphinx_keys: r
                    .sphinx_keys
                    .iter()
                    .map(|k| (k.epoch, crate::hex(&k.key)))
                    .collect(),
                exit_policy: r.exit_policy.to_string(),
                price_per_packet: r.price_per_packet,
                bandwidth: r.bandwidth,
                weight: r.weight,
                performance: r.performance,
                family_members: r.family_members.iter().map(|m| m.to_hex()).collect(),
            })
            .collect(),
    })
}

async fn get_latest_json(State(ctx): State<Arc<Ctx>>) -> Result<Response, Reply> {
    let doc = latest(&ctx)?;
    let text = serde_json::to_string_pretty(&view(&doc).map_err(internal)?).map_err(internal)?;
    Ok(([(header::CONTENT_TYPE, "application/json")], text).into_response())
}

async fn get_prober(State(ctx): State<Arc<Ctx>>) -> Result<Response, Reply> {
    match &ctx.prober_card {
        Some(card) => postcard(card),
        None => Err(Reply(
            StatusCode::NOT_FOUND,
            "this authority does not test relays\n".into(),
        )),
    }
}

async fn get_metrics(State(ctx): State<Arc<Ctx>>) -> Response {
    let (descriptors, epoch, signatures) = {
        let state = ctx.lock();
        let latest = state.latest(unix_now());
        let epoch = latest
            .and_then(|d| decode::<Consensus>(&d.body).ok())
            .map_or(0, |c| u64::from(c.epoch));
        (
            state.descriptor_count() as u64,
            epoch,
            latest.map_or(0, |d| d.signatures.len() as u64),
        )
    };
    let text = ctx.metrics.render(&[
        (
            "murmur_directory_descriptors_held",
            "Relay descriptors held.",
            descriptors,
        ),
        (
            "murmur_directory_latest_consensus_epoch",
            "Epoch of the newest consensus served (0: none).",
            epoch,
        ),
        (
            "murmur_directory_latest_consensus_signatures",
            "Signatures on the newest consensus served.",
            signatures,
        ),
    ]);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Counts a vote's fate (used by the server and by the schedule's vote fetching).
pub(crate) fn count_vote(ctx: &Ctx, result: &Result<Accepted, Refusal>) {
    let label = match result {
        Ok(Accepted::Stored) => "accepted",
        Ok(_) => "duplicate",
        Err(r) => r.reason,
    };
    ctx.metrics.inc(VOTES_RECEIVED, label);
}
