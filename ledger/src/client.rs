//! The HTTP client relays and clients use to reach a `murmur-ledger`. It implements
//! [`Settlement`], so code written against the trait runs the same over HTTP as against the
//! embedded [`Ledger`](crate::Ledger); refusals come back as the same [`Refusal`] kinds.
//! Every request has a timeout and every answer a size bound.
//!
//! ```no_run
//! # async fn f(relay_key: ed25519_dalek::SigningKey, ticket: murmur_protocol::ticket::Ticket,
//! #            reveal: [u8; 32]) -> murmur_ledger::Result<()> {
//! use murmur_ledger::client::LedgerClient;
//! use murmur_ledger::request::{Redeem, Signed};
//! use murmur_ledger::{Settlement, unix_now};
//!
//! let ledger = LedgerClient::new("http://127.0.0.1:7080", std::time::Duration::from_secs(5))?;
//! let pot = ledger.pot(ticket.pot).await?;                 // before accepting tickets
//! let redeem = Signed::new(Redeem { ticket, reveal }, &relay_key, unix_now());
//! let redemption = ledger.redeem(redeem).await?;          // paid once, or a Refusal
//! println!("paid {}; balance {}", redemption.paid, redemption.account.balance);
//! # Ok(()) }
//! ```

use std::time::Duration;

use murmur_protocol::directory::IdentityKey;
use serde::de::DeserializeOwned;

use crate::ledger::{Account, Pot, Redemption, Transfer};
use crate::request::{Fund, Operation, Redeem, Signed, Warn, Withdraw};
use crate::server::ErrorBody;
use crate::{Error, Refusal, Result, Settlement};

/// The largest answer read (a pot or an account is a few hundred bytes).
pub const MAX_RESPONSE_BYTES: usize = 64 << 10;

/// HTTP to one ledger, with a per-request timeout.
#[derive(Clone, Debug)]
pub struct LedgerClient {
    http: reqwest::Client,
    base: String,
}

impl LedgerClient {
    /// A client of the ledger at `base_url` (e.g. `http://127.0.0.1:7080`) whose every
    /// request (connect, send, read) must finish within `timeout`.
    pub fn new(base_url: &str, timeout: Duration) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .no_proxy()
            .build()
            .map_err(|e| Error::Http {
                url: base_url.to_owned(),
                message: format!("cannot build HTTP client: {e}"),
            })?;
        Ok(LedgerClient {
            http,
            base: base_url.trim_end_matches('/').to_owned(),
        })
    }

    /// The ledger's base URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// Sends a signed operation (`POST /v1/{name}`).
    pub async fn submit<T: Operation>(&self, req: &Signed<T>) -> Result<T::Output> {
        let url = format!("{}/v1/{}", self.base, T::NAME);
        let body = serde_json::to_vec(req).map_err(|e| Error::Http {
            url: url.clone(),
            message: format!("cannot encode the request: {e}"),
        })?;
        let sent = self
            .http
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        answer(&url, sent).await
    }

    async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R> {
        let url = format!("{}{path}", self.base);
        let sent = self.http.get(&url).send().await;
        answer(&url, sent).await
    }
}

/// Reads a bounded answer: the JSON value on success, the refusal (or error) otherwise.
async fn answer<R: DeserializeOwned>(
    url: &str,
    sent: reqwest::Result<reqwest::Response>,
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
    let mut resp = sent.map_err(|e| failed("failed", e))?;
    let status = resp.status();
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| failed("read failed", e))? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(Error::Http {
                url: url.to_owned(),
                message: format!("answer larger than {MAX_RESPONSE_BYTES} bytes"),
            });
        }
        body.extend_from_slice(&chunk);
    }
    if status.is_success() {
        return serde_json::from_slice(&body).map_err(|e| Error::Http {
            url: url.to_owned(),
            message: format!("unreadable answer: {e}"),
        });
    }
    let parsed = serde_json::from_slice::<ErrorBody>(&body).ok();
    match parsed.as_ref().and_then(|b| Refusal::from_label(&b.reason)) {
        Some(refusal) => Err(refusal.because(parsed.map(|b| b.message).unwrap_or_default())),
        None => Err(Error::Status {
            url: url.to_owned(),
            status: status.as_u16(),
            message: parsed.map_or_else(
                || String::from_utf8_lossy(&body).trim().to_owned(),
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
