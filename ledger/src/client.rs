//! The HTTP client relays and clients use to reach a `murmur-ledger`. It implements
//! [`Settlement`], so code written against the trait runs the same over HTTP as against the
//! embedded `Ledger` (the `server` feature); refusals come back as the same [`Refusal`] kinds.
//! Every request has a timeout and every answer a size bound, and every answer must be signed
//! by the ledger's key ([`crate::answer`]): one that is not is [`Error::Unauthenticated`],
//! never a refusal, whatever it says.
//!
//! ```no_run
//! # async fn f(relay_key: ed25519_dalek::SigningKey, ticket: murmur_protocol::ticket::Ticket,
//! #            reveal: [u8; 32], ledger_key: murmur_protocol::directory::IdentityKey)
//! #            -> murmur_ledger::Result<()> {
//! use murmur_ledger::client::LedgerClient;
//! use murmur_ledger::request::{Redeem, Signed};
//! use murmur_ledger::{Settlement, unix_now};
//!
//! let ledger = LedgerClient::new("http://127.0.0.1:7080", ledger_key,
//!                                std::time::Duration::from_secs(5))?;
//! let pot = ledger.pot(ticket.pot).await?;                 // before accepting tickets
//! let redeem = Signed::new(Redeem { ticket, reveal }, &relay_key, unix_now());
//! let redemption = ledger.redeem(redeem).await?;          // paid once, or a Refusal
//! println!("paid {}; balance {}", redemption.paid, redemption.account.balance);
//! # Ok(()) }
//! ```

use std::time::Duration;

use ed25519_dalek::VerifyingKey;
use murmur_protocol::directory::IdentityKey;
use murmur_service::IDLE_CONNECTION;
use serde::de::DeserializeOwned;

use crate::answer::{self, ErrorBody, Exchange, SIGNATURE_HEADER};
use crate::records::{Account, Pot, Redemption, Transfer};
use crate::request::{Fund, Operation, Redeem, Signed, Warn, Withdraw};
use crate::{Error, Refusal, Result, Settlement};

/// The largest answer read (a pot or an account is a few hundred bytes).
pub const MAX_RESPONSE_BYTES: usize = 64 << 10;

/// HTTP to one ledger, with a per-request timeout, believing only answers signed by the
/// ledger's key.
#[derive(Clone, Debug)]
pub struct LedgerClient {
    http: reqwest::Client,
    base: String,
    ledger: VerifyingKey,
}

impl LedgerClient {
    /// A client of the ledger at `base_url` (e.g. `http://127.0.0.1:7080`) whose identity
    /// key is `ledger` (what `murmur-ledger keygen` printed), and whose every request
    /// (connect, send, read) must finish within `timeout`.
    pub fn new(base_url: &str, ledger: IdentityKey, timeout: Duration) -> Result<Self> {
        let ledger = ledger.verifying_key().map_err(|e| {
            Error::Config(format!(
                "ledger key {ledger} is not an Ed25519 public key: {e}"
            ))
        })?;
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            // Below the servers' default header timeout (5 s), which also closes a kept-alive
            // connection idle that long: reusing one as it closes would fail a request.
            .pool_idle_timeout(IDLE_CONNECTION)
            .no_proxy()
            .build()
            .map_err(|e| Error::Http {
                url: base_url.to_owned(),
                message: format!("cannot build HTTP client: {e}"),
            })?;
        Ok(LedgerClient {
            http,
            base: base_url.trim_end_matches('/').to_owned(),
            ledger,
        })
    }

    /// The ledger's base URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// The ledger's identity key, which must sign every answer.
    pub fn ledger_key(&self) -> IdentityKey {
        IdentityKey(self.ledger.to_bytes())
    }

    /// Sends a signed operation (`POST /v1/{name}`).
    pub async fn submit<T: Operation>(&self, req: &Signed<T>) -> Result<T::Output> {
        let url = format!("{}/v1/{}", self.base, T::NAME);
        let body = serde_json::to_vec(req).map_err(|e| Error::Http {
            url: url.clone(),
            message: format!("cannot encode the request: {e}"),
        })?;
        let request = self
            .http
            .post(&url)
            .header("content-type", "application/json")
            .body(body.clone());
        self.exchange(&url, request, &body).await
    }

    /// `GET {path}` with a fresh challenge, so that no earlier answer passes for this one.
    async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R> {
        let url = format!("{}{path}?challenge={}", self.base, answer::challenge());
        let request = self.http.get(&url);
        self.exchange(&url, request, b"").await
    }

    /// Sends `request` (whose body is `body`) and reads its bounded, signed answer: the JSON
    /// value on success, the refusal (or error) otherwise.
    async fn exchange<R: DeserializeOwned>(
        &self,
        url: &str,
        request: reqwest::RequestBuilder,
        body: &[u8],
    ) -> Result<R> {
        let failed = |what: &str, e: reqwest::Error| {
            let kind = if e.is_timeout() {
                "timed out"
            } else if e.is_connect() {
                "cannot connect"
            } else {
                what
            };
            Error::Http {
                url: url.to_owned(),
                message: format!("{kind}: {e}"),
            }
        };
        let request = request
            .build()
            .map_err(|e| failed("cannot build the request", e))?;
        let method = request.method().as_str().to_owned();
        // The target exactly as sent: what the ledger signs.
        let target = match request.url().query() {
            Some(q) => format!("{}?{q}", request.url().path()),
            None => request.url().path().to_owned(),
        };
        let mut resp = self
            .http
            .execute(request)
            .await
            .map_err(|e| failed("failed", e))?;
        let status = resp.status();
        let signature = resp
            .headers()
            .get(SIGNATURE_HEADER)
            .map(|v| v.as_bytes().to_vec());
        let mut answer = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| failed("read failed", e))? {
            if answer.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(Error::Http {
                    url: url.to_owned(),
                    message: format!("answer larger than {MAX_RESPONSE_BYTES} bytes"),
                });
            }
            answer.extend_from_slice(&chunk);
        }
        // Nothing in the answer is read before its signature is checked.
        Exchange {
            method: &method,
            target: &target,
            request_digest: answer::digest(body),
            status: status.as_u16(),
            answer_digest: answer::digest(&answer),
        }
        .verify(&self.ledger, signature.as_deref())
        .map_err(|why| Error::Unauthenticated {
            url: url.to_owned(),
            message: format!("{why}; status {}", status.as_u16()),
        })?;
        interpret(url, status, &answer)
    }
}

/// An authenticated answer: the JSON value on success, the refusal (or error) otherwise.
fn interpret<R: DeserializeOwned>(
    url: &str,
    status: reqwest::StatusCode,
    body: &[u8],
) -> Result<R> {
    if status.is_success() {
        return serde_json::from_slice(body).map_err(|e| Error::Http {
            url: url.to_owned(),
            message: format!("unreadable answer: {e}"),
        });
    }
    let parsed = serde_json::from_slice::<ErrorBody>(body).ok();
    match parsed.as_ref().and_then(|b| Refusal::from_label(&b.reason)) {
        Some(refusal) => Err(refusal.because(parsed.map(|b| b.message).unwrap_or_default())),
        None => Err(Error::Status {
            url: url.to_owned(),
            status: status.as_u16(),
            message: parsed.map_or_else(
                || String::from_utf8_lossy(body).trim().to_owned(),
                |b| b.message,
            ),
        }),
    }
}

impl Settlement for LedgerClient {
    async fn fund(&self, req: Signed<Fund>) -> Result<Transfer> {
        self.submit(&req).await
    }

    async fn warn(&self, req: Signed<Warn>) -> Result<Pot> {
        self.submit(&req).await
    }

    async fn withdraw(&self, req: Signed<Withdraw>) -> Result<Transfer> {
        self.submit(&req).await
    }

    async fn redeem(&self, req: Signed<Redeem>) -> Result<Redemption> {
        self.submit(&req).await
    }

    async fn pot(&self, key: IdentityKey) -> Result<Pot> {
        self.get(&format!("/v1/pot/{key}")).await
    }

    async fn account(&self, key: IdentityKey) -> Result<Account> {
        self.get(&format!("/v1/account/{key}")).await
    }
}
