//! The directory client the relay and client daemons use: upload a descriptor to every
//! authority, fetch the latest consensus and keep the last good one
//! ([`ConsensusStore`]). Every request has a timeout and every response a size bound.
//!
//! ```no_run
//! # async fn f(urls: Vec<String>, store: &mut murmur_protocol::directory::ConsensusStore,
//! #            desc: murmur_protocol::directory::SignedDescriptor) -> murmur_directory::Result<()> {
//! use murmur_directory::client::DirectoryClient;
//! let client = DirectoryClient::new(std::time::Duration::from_secs(5))?;
//! for (url, result) in urls.iter().zip(client.upload_descriptor(&urls, &desc).await) {
//!     if let Err(e) = result { eprintln!("{url}: {e}"); }
//! }
//! let now = murmur_directory::unix_now();
//! client.refresh(&urls, store, now).await?;
//! let consensus = &store.current(now)?.consensus;
//! # Ok(()) }
//! ```

use std::time::Duration;

use murmur_protocol::directory::prober::{ProberCard, SignedProberCard};
use murmur_protocol::directory::{
    AuthoritySet, ConsensusStore, Epoch, Offer, SignedConsensus, SignedDescriptor, UnixTime,
    decode, encode,
};

use crate::{Error, Result};

/// The largest consensus (or vote list) a client reads: 10,000 relays fit several times over.
pub const MAX_DOCUMENT_BYTES: usize = 32 << 20;

/// The largest error message read from a refusal.
const MAX_MESSAGE_BYTES: usize = 4096;

/// HTTP to directory authorities, with a per-request timeout.
#[derive(Clone, Debug)]
pub struct DirectoryClient {
    http: reqwest::Client,
}

impl DirectoryClient {
    /// A client whose every request (connect, send, read) must finish within `timeout`.
    pub fn new(timeout: Duration) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            // Below the servers' default header timeout (5 s), which also closes a kept-alive
            // connection idle that long: reusing one as it closes would fail a request.
            .pool_idle_timeout(murmur_service::IDLE_CONNECTION)
            .no_proxy()
            .build()
            .map_err(|e| Error::Http {
                url: String::new(),
                message: format!("cannot build HTTP client: {e}"),
            })?;
        Ok(DirectoryClient { http })
    }

    /// Uploads `descriptor` to every authority at once; one result per URL, same order.
    pub async fn upload_descriptor(
        &self,
        authority_urls: &[String],
        descriptor: &SignedDescriptor,
    ) -> Vec<Result<()>> {
        let body = match encode(descriptor) {
            Ok(b) => b,
            Err(e) => {
                return authority_urls
                    .iter()
                    .map(|_| Err(e.clone().into()))
                    .collect();
            }
        };
        let mut tasks = tokio::task::JoinSet::new();
        for (i, base) in authority_urls.iter().enumerate() {
            let (client, body) = (self.clone(), body.clone());
            let url = format!("{}/v1/descriptor", base.trim_end_matches('/'));
            tasks.spawn(async move { (i, client.post(&url, body).await.map(|_| ())) });
        }
        let mut out: Vec<Result<()>> = authority_urls
            .iter()
            .map(|u| {
                Err(Error::Http {
                    url: u.clone(),
                    message: "upload task did not finish".into(),
                })
            })
            .collect();
        while let Some(joined) = tasks.join_next().await {
            if let Ok((i, r)) = joined
                && let Some(slot) = out.get_mut(i)
            {
                *slot = r;
            }
        }
        out
    }

    /// Fetches every authority's prober card, each verified against `authorities`; an
    /// authority that does not answer, does not test, or sends a card that does not verify
    /// is left out (the error is returned alongside, per URL, for logging).
    pub async fn fetch_prober_cards(
        &self,
        authority_urls: &[String],
        authorities: &AuthoritySet,
    ) -> (Vec<ProberCard>, Vec<Error>) {
        let (mut cards, mut errors) = (Vec::new(), Vec::new());
        for base in authority_urls {
            let url = format!("{}/v1/prober", base.trim_end_matches('/'));
            let card = self
                .get(&url, MAX_MESSAGE_BYTES)
                .await
                .and_then(|bytes| Ok(decode::<SignedProberCard>(&bytes)?))
                .and_then(|signed| Ok(signed.verify(authorities)?));
            match card {
                Ok(c) => cards.push(c),
                Err(e) => errors.push(e),
            }
        }
        (cards, errors)
    }

    /// Fetches the latest consensus from one authority (not verified: offer it to a
    /// [`ConsensusStore`], or verify it yourself).
    pub async fn fetch_consensus(&self, authority_url: &str) -> Result<SignedConsensus> {
        self.fetch_document(authority_url, "latest").await
    }

    /// Fetches the consensus for `epoch` from one authority (not verified).
    pub async fn fetch_consensus_for(
        &self,
        authority_url: &str,
        epoch: Epoch,
    ) -> Result<SignedConsensus> {
        self.fetch_document(authority_url, &epoch.to_string()).await
    }

    async fn fetch_document(&self, base: &str, which: &str) -> Result<SignedConsensus> {
        let url = format!("{}/v1/consensus/{which}", base.trim_end_matches('/'));
        let bytes = self.get(&url, MAX_DOCUMENT_BYTES).await?;
        Ok(decode(&bytes)?)
    }

    /// Asks the authorities in turn for the latest consensus and offers each answer to
    /// `store` until one verifies. Returns what the store did with it; if none verified,
    /// the store keeps what it held and the last error is returned.
    pub async fn refresh(
        &self,
        authority_urls: &[String],
        store: &mut ConsensusStore,
        now: UnixTime,
    ) -> Result<Offer> {
        let mut last = Error::Http {
            url: String::new(),
            message: "no authority URLs given".into(),
        };
        for url in authority_urls {
            match self.fetch_consensus(url).await {
                Ok(doc) => match store.offer(doc, now) {
                    Ok(offer) => return Ok(offer),
                    Err(e) => last = e.into(),
                },
                Err(e) => last = e,
            }
        }
        Err(Error::NoConsensus(Box::new(last)))
    }

    /// GETs `url` and reads at most `limit` bytes of a successful answer.
    pub(crate) async fn get(&self, url: &str, limit: usize) -> Result<Vec<u8>> {
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| http_error(url, e))?;
        read_success(url, resp, limit).await
    }

    /// POSTs `body` to `url`; a success status returns its (short) answer.
    pub(crate) async fn post(&self, url: &str, body: Vec<u8>) -> Result<Vec<u8>> {
        let resp = self
            .http
            .post(url)
            .header("content-type", "application/octet-stream")
            .body(body)
            .send()
            .await
            .map_err(|e| http_error(url, e))?;
        read_success(url, resp, MAX_MESSAGE_BYTES).await
    }
}

fn http_error(url: &str, e: reqwest::Error) -> Error {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "failed"
    };
    Error::Http {
        url: url.to_owned(),
        message: format!("{what}: {e}"),
    }
}

/// Reads a response body of at most `limit` bytes; an error status becomes
/// [`Error::Status`] with the server's message.
async fn read_success(url: &str, mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>> {
    let status = resp.status();
    let limit = if status.is_success() {
        limit
    } else {
        MAX_MESSAGE_BYTES
    };
    if resp.content_length().is_some_and(|n| n > limit as u64) && status.is_success() {
        return Err(Error::TooLarge {
            url: url.to_owned(),
            limit,
        });
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| http_error(url, e))? {
        if body.len() + chunk.len() > limit {
            if !status.is_success() {
                break; // an error message, cut short
            }
            return Err(Error::TooLarge {
                url: url.to_owned(),
                limit,
            });
        }
        body.extend_from_slice(&chunk);
    }
    if !status.is_success() {
        return Err(Error::Status {
            url: url.to_owned(),
            status: status.as_u16(),
            message: String::from_utf8_lossy(&body).trim().to_owned(),
        });
    }
    Ok(body)
}
