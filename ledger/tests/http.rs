//! The ledger in-process on 127.0.0.1:0, driven through `LedgerClient`: every refusal over
//! HTTP with its own reason and no money moved, the same ticket redeemed concurrently (one
//! success), an overdraft, a withdrawal after its notice, metrics, graceful shutdown, and a
//! restart that keeps pots, accounts and the redeemed set. Answers are signed: through a
//! man in the middle, a tampered, replayed, unsigned or wrongly signed answer is refused as
//! unauthenticated, never taken for a refusal. Connections are capped per address, and idle
//! ones closed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use murmur_ledger::answer::{self, Exchange, SIGNATURE_HEADER};
use murmur_ledger::client::LedgerClient;
use murmur_ledger::config::GenesisEntry;
use murmur_ledger::request::{Fund, Redeem, Signed, Warn, Withdraw};
use murmur_ledger::{Account, Config, Error, Pot, Refusal, Settlement, unix_now};
use murmur_protocol::directory::IdentityKey;
use murmur_protocol::ticket::{Ticket, TicketFields, commitment_of};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const REVEAL: [u8; 32] = [7; 32];

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn id(seed: u8) -> IdentityKey {
    IdentityKey::of(&key(seed))
}

/// Key 1 is the payer (and its pot), key 2 the relay, key 3 another relay.
const PAYER: u8 = 1;
const RELAY: u8 = 2;
const OTHER: u8 = 3;

/// The ledger's key under `dir` (created on first use) and its identity.
fn ledger_key(dir: &Path) -> (std::path::PathBuf, IdentityKey) {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("ledger.key");
    if !path.exists() {
        murmur_service::keys::keygen(&path).unwrap();
    }
    let id = IdentityKey::of(&murmur_service::keys::load(&path).unwrap());
    (path, id)
}

fn config(dir: &Path) -> Config {
    let mut c = Config::with_defaults();
    c.key_file = ledger_key(dir).0;
    c.state_dir = dir.join("state");
    c.notice_period = Duration::from_secs(1);
    // This test network's relays redeem at once (none here holds a ticket long).
    c.redeem_window = Duration::from_secs(1);
    c.request_window = Duration::from_secs(60);
    c.genesis = vec![GenesisEntry {
        account: id(PAYER).to_hex(),
        amount: 1_000_000,
    }];
    c.validate().unwrap();
    c
}

struct Running {
    client: LedgerClient,
    url: String,
    identity: IdentityKey,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<murmur_ledger::Result<()>>,
}

async fn start(dir: &Path) -> Running {
    start_with(config(dir)).await
}

async fn start_with(config: Config) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let identity = IdentityKey::of(&config.signing_key().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(murmur_ledger::serve(config, listener, async move {
        let _ = stopped.await;
    }));
    Running {
        client: LedgerClient::new(&url, identity, Duration::from_secs(5)).unwrap(),
        url,
        identity,
        stop,
        task,
    }
}

async fn stop(r: Running) {
    r.stop.send(()).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), r.task)
        .await
        .expect("the ledger stops within 10 s of its shutdown future");
    result.unwrap().unwrap();
}

fn ticket(face_value: u64, win_ratio: u64, nonce: u8, expiry: u64) -> Ticket {
    // One issue time for the whole test process: a ticket is identified by all its signed
    // fields, so the same nonce issued a second later would be another ticket (and a test
    // that redeems "the same" ticket twice would fail when a second boundary passed between).
    static ISSUED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    Ticket::sign(
        TicketFields {
            recipient: id(RELAY),
            face_value,
            win_ratio,
            nonce: [nonce; 16],
            issued: *ISSUED.get_or_init(unix_now),
            expiry,
            commitment: commitment_of(&REVEAL),
        },
        &key(PAYER),
    )
}

fn redeem_by(t: Ticket, reveal: [u8; 32], signer: u8) -> Signed<Redeem> {
    Signed::new(Redeem { ticket: t, reveal }, &key(signer), unix_now())
}

/// Everything the test's keys hold.
#[derive(Debug, PartialEq)]
struct Money {
    accounts: Vec<Account>,
    pot: Pot,
}

async fn money(c: &LedgerClient) -> Money {
    let mut accounts = Vec::new();
    for k in [PAYER, RELAY, OTHER] {
        accounts.push(c.account(id(k)).await.unwrap());
    }
    Money {
        accounts,
        pot: c.pot(id(PAYER)).await.unwrap(),
    }
}

async fn metrics(url: &str) -> String {
    reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn refusal<T: std::fmt::Debug>(r: murmur_ledger::Result<T>) -> Refusal {
    match r {
        Err(Error::Refused { refusal, .. }) => refusal,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_over_http_moves_no_money() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(&dir.path().join("ledger")).await;
    let c = &r.client;
    let far = unix_now() + 3600;

    let fund = Signed::new(
        Fund {
            pot: id(PAYER),
            balance: 10_000,
            escrow: 20_000,
        },
        &key(PAYER),
        unix_now(),
    );
    let t = c.fund(fund.clone()).await.unwrap();
    assert_eq!(
        (t.account.balance, t.pot.balance, t.pot.escrow),
        (970_000, 10_000, 20_000)
    );
    assert_eq!(t.pot.usable(), 10_000);

    // The same winning ticket, redeemed by eight tasks at once: exactly one is paid.
    let winner = ticket(1_000, u64::MAX, 1, far);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (c, req) = (c.clone(), redeem_by(winner, REVEAL, RELAY));
        tasks.spawn(async move { c.redeem(req).await });
    }
    let (mut paid, mut refused) = (0, 0);
    while let Some(result) = tasks.join_next().await {
        match result.unwrap() {
            Ok(redemption) => {
                assert_eq!(redemption.paid, 1_000);
                paid += 1;
            }
            Err(e) => {
                assert_eq!(e.refusal(), Some(Refusal::AlreadyRedeemed), "{e}");
                refused += 1;
            }
        }
    }
    assert_eq!((paid, refused), (1, 7));
    let before = money(c).await;
    assert_eq!(before.accounts[1].balance, 1_000);
    assert_eq!(before.pot.balance, 9_000);

    let loser = ticket(1_000, 0, 3, far);
    let mut forged = ticket(1_000, u64::MAX, 4, far);
    forged.face_value = 9_000;
    let orphan = Ticket::sign(ticket(1_000, u64::MAX, 5, far).fields(), &key(9));
    let mut bad_signature = redeem_by(ticket(1_000, u64::MAX, 6, far), REVEAL, RELAY);
    bad_signature.signature[10] ^= 1;
    let stale = Signed::new(
        Redeem {
            ticket: ticket(1_000, u64::MAX, 7, far),
            reveal: REVEAL,
        },
        &key(RELAY),
        unix_now() - 120,
    );
    let too_much = Signed::new(
        Fund {
            pot: id(PAYER),
            balance: 2_000_000,
            escrow: 0,
        },
        &key(PAYER),
        unix_now(),
    );
    let refusals: Vec<(Refusal, murmur_ledger::Result<()>)> = vec![
        (
            Refusal::AlreadyRedeemed,
            c.redeem(redeem_by(winner, REVEAL, RELAY)).await.map(drop),
        ),
        (
            Refusal::WrongRecipient,
            c.redeem(redeem_by(ticket(1_000, u64::MAX, 2, far), REVEAL, OTHER))
                .await
                .map(drop),
        ),
        (
            Refusal::TicketExpired,
            c.redeem(redeem_by(
                ticket(1_000, u64::MAX, 2, unix_now() - 10),
                REVEAL,
                RELAY,
            ))
            .await
            .map(drop),
        ),
        (
            Refusal::ForgedTicket,
            c.redeem(redeem_by(forged, REVEAL, RELAY)).await.map(drop),
        ),
        (
            Refusal::UnknownPot,
            c.redeem(redeem_by(orphan, REVEAL, RELAY)).await.map(drop),
        ),
        (
            Refusal::RevealMismatch,
            c.redeem(redeem_by(ticket(1_000, u64::MAX, 2, far), [8; 32], RELAY))
                .await
                .map(drop),
        ),
        (
            Refusal::NotAWinner,
            c.redeem(redeem_by(loser, REVEAL, RELAY)).await.map(drop),
        ),
        (
            Refusal::BadSignature,
            c.redeem(bad_signature).await.map(drop),
        ),
        (Refusal::StaleRequest, c.redeem(stale).await.map(drop)),
        (Refusal::ReplayedRequest, c.fund(fund).await.map(drop)),
        (Refusal::InsufficientFunds, c.fund(too_much).await.map(drop)),
        (
            Refusal::NotWarned,
            c.withdraw(Signed::new(Withdraw { amount: 1 }, &key(PAYER), unix_now()))
                .await
                .map(drop),
        ),
        (
            Refusal::UnknownPot,
            c.warn(Signed::new(Warn { amount: 1 }, &key(OTHER), unix_now()))
                .await
                .map(drop),
        ),
        (Refusal::UnknownPot, c.pot(id(OTHER)).await.map(drop)),
    ];
    for (expected, result) in refusals {
        assert_eq!(refusal(result), expected);
        assert_eq!(money(c).await, before, "{expected:?} moved money");
    }

    // Malformed and oversized bodies are refused before anything is read from them.
    let http = reqwest::Client::new();
    for (body, expected_status, reason) in [
        ("{\"signer\": 1}".to_owned(), 400, "malformed"),
        ("x".repeat(5_000), 413, "too_large"),
    ] {
        let resp = http
            .post(format!("{}/v1/redeem", r.url))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), expected_status);
        assert!(
            resp.headers().contains_key(SIGNATURE_HEADER),
            "refusals are signed"
        );
        let text = resp.text().await.unwrap();
        assert!(text.contains(reason), "{text}");
    }
    let resp = reqwest::get(format!("{}/v1/account/nothex", r.url))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);

    // Withdrawal: warned, refused before the notice is over, then allowed.
    let pot = c
        .warn(Signed::new(Warn { amount: 5_000 }, &key(PAYER), unix_now()))
        .await
        .unwrap();
    let unlock_at = pot.unlock_at.unwrap();
    assert!(unlock_at > unix_now().saturating_sub(1));
    let withdraw = |amount| Signed::new(Withdraw { amount }, &key(PAYER), unix_now());
    let mut during = money(c).await;
    during.pot.unlock_at = None;
    during.pot.warned = 0;
    assert_eq!(during, before);
    if unix_now() < unlock_at {
        assert_eq!(
            refusal(c.withdraw(withdraw(5_000)).await),
            Refusal::NoticeNotOver
        );
    }
    while unix_now() < unlock_at {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        refusal(c.withdraw(withdraw(5_001)).await),
        Refusal::ExceedsWarned
    );
    let t = c.withdraw(withdraw(5_000)).await.unwrap();
    assert_eq!(
        (t.pot.balance, t.pot.escrow, t.account.balance),
        (4_000, 20_000, 975_000)
    );

    // Overdraft: a 6,000 ticket against a 4,000 balance pays 4,000 and burns the escrow.
    let big = ticket(6_000, u64::MAX, 20, far);
    let r2 = c.redeem(redeem_by(big, REVEAL, RELAY)).await.unwrap();
    assert_eq!(
        (r2.paid, r2.burned, r2.account.balance),
        (4_000, 20_000, 5_000)
    );
    assert_eq!((r2.pot.balance, r2.pot.escrow), (0, 0));

    let text = metrics(&r.url).await;
    for line in [
        "murmur_ledger_requests_total{op=\"redeem\",result=\"already_redeemed\"} 8",
        "murmur_ledger_requests_total{op=\"redeem\",result=\"ok\"} 2",
        "murmur_ledger_requests_total{op=\"withdraw\",result=\"notice_not_over\"}",
        "murmur_ledger_requests_total{op=\"redeem\",result=\"too_large\"} 1",
        "murmur_ledger_money{held_in=\"burned\"} 20000",
        "murmur_ledger_money{held_in=\"genesis\"} 1000000",
        "murmur_ledger_conserved 1",
        "murmur_ledger_redeemed_tickets 2",
    ] {
        if line.contains("notice_not_over") && !text.contains("notice_not_over") {
            continue; // the notice may have run out before the first attempt
        }
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    let after = money(c).await;
    stop(r).await;

    // A restart keeps pots, accounts and the redeemed set.
    let r = start(&dir.path().join("ledger")).await;
    assert_eq!(money(&r.client).await, after);
    assert_eq!(
        refusal(r.client.redeem(redeem_by(winner, REVEAL, RELAY)).await),
        Refusal::AlreadyRedeemed
    );
    stop(r).await;
}

/// What a man in the middle between a `LedgerClient` and the ledger does to each answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Meddle {
    /// Passes request and answer through unchanged.
    Pass,
    /// Raises the balance in the answer (or, with none, turns it into `already_redeemed`),
    /// keeping the ledger's signature.
    Tamper,
    /// Answers with the first answer it passed, signature and all, without asking the ledger.
    Replay,
    /// Passes the answer on without its signature.
    Strip,
    /// Answers `already_redeemed` itself, correctly formed and signed by another key.
    Impostor,
}

#[derive(Clone, Debug)]
struct Captured {
    status: u16,
    signature: Option<String>,
    body: Vec<u8>,
}

#[derive(Clone)]
struct Mitm {
    url: String,
    mode: Arc<Mutex<Meddle>>,
    first: Arc<Mutex<Option<Captured>>>,
}

impl Mitm {
    /// Listens on 127.0.0.1 and forwards to `ledger`, meddling as told.
    async fn start(ledger: &str) -> Mitm {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let m = Mitm {
            url: format!("http://{}", listener.local_addr().unwrap()),
            mode: Arc::new(Mutex::new(Meddle::Pass)),
            first: Arc::default(),
        };
        let (this, ledger) = (m.clone(), ledger.to_owned());
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let (this, ledger) = (this.clone(), ledger.clone());
            async move {
                let method = req.method().as_str().to_owned();
                let target = req.uri().path_and_query().unwrap().as_str().to_owned();
                let body = axum::body::to_bytes(req.into_body(), 1 << 16)
                    .await
                    .unwrap();
                let a = this.answer(&ledger, &method, &target, body.to_vec()).await;
                let mut headers = axum::http::HeaderMap::new();
                headers.insert("content-type", "application/json".parse().unwrap());
                if let Some(sig) = &a.signature {
                    headers.insert(SIGNATURE_HEADER, sig.parse().unwrap());
                }
                let status = axum::http::StatusCode::from_u16(a.status).unwrap();
                (status, headers, a.body)
            }
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        m
    }

    fn set(&self, mode: Meddle) {
        *self.mode.lock().unwrap() = mode;
    }

    /// Forgets the answer `Replay` plays back; the next one passed is kept instead.
    fn forget(&self) {
        *self.first.lock().unwrap() = None;
    }

    /// What the middle answers to one request.
    async fn answer(&self, ledger: &str, method: &str, target: &str, body: Vec<u8>) -> Captured {
        let mode = *self.mode.lock().unwrap();
        match mode {
            Meddle::Replay => self.first.lock().unwrap().clone().unwrap(),
            Meddle::Impostor => {
                let refusal = serde_json::to_vec(&murmur_ledger::ErrorBody {
                    reason: "already_redeemed".into(),
                    message: "paid before".into(),
                })
                .unwrap();
                let signature = Exchange {
                    method,
                    target,
                    request_digest: answer::digest(&body),
                    status: 409,
                    answer_digest: answer::digest(&refusal),
                }
                .sign(&key(9));
                Captured {
                    status: 409,
                    signature: Some(signature),
                    body: refusal,
                }
            }
            _ => {
                let mut a = forward(ledger, method, target, body).await;
                self.first.lock().unwrap().get_or_insert_with(|| a.clone());
                match mode {
                    Meddle::Tamper => {
                        let text = String::from_utf8(a.body.clone()).unwrap();
                        let raised = text.replace("\"balance\":", "\"balance\":9");
                        if raised == text {
                            a.status = 409;
                            a.body = br#"{"reason":"already_redeemed","message":"x"}"#.to_vec();
                        } else {
                            a.body = raised.into_bytes();
                        }
                    }
                    Meddle::Strip => a.signature = None,
                    _ => {}
                }
                a
            }
        }
    }
}

async fn forward(ledger: &str, method: &str, target: &str, body: Vec<u8>) -> Captured {
    let http = reqwest::Client::new();
    let url = format!("{ledger}{target}");
    let req = match method {
        "GET" => http.get(url),
        _ => http
            .post(url)
            .header("content-type", "application/json")
            .body(body),
    };
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let signature = resp
        .headers()
        .get(SIGNATURE_HEADER)
        .map(|v| v.to_str().unwrap().to_owned());
    let body = resp.bytes().await.unwrap().to_vec();
    Captured {
        status,
        signature,
        body,
    }
}

#[track_caller]
fn unauthenticated<T: std::fmt::Debug>(r: murmur_ledger::Result<T>) {
    match r {
        Err(e @ Error::Unauthenticated { .. }) => {
            assert_eq!(e.refusal(), None);
            assert_eq!(e.label(), "unauthenticated");
        }
        other => panic!("expected an unauthenticated answer, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_not_signed_by_the_ledger_are_refused_as_unauthenticated() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(&dir.path().join("ledger")).await;
    let fund = Fund {
        pot: id(PAYER),
        balance: 10_000,
        escrow: 20_000,
    };
    r.client
        .fund(Signed::new(fund, &key(PAYER), unix_now()))
        .await
        .unwrap();
    let far = unix_now() + 3600;
    let winner = |nonce| redeem_by(ticket(100, u64::MAX, nonce, far), REVEAL, RELAY);
    let m = Mitm::start(&r.url).await;
    let c = LedgerClient::new(&m.url, r.identity, Duration::from_secs(5)).unwrap();

    // A faithful middle passes the ledger's signed answers, refusals included.
    assert_eq!(c.pot(id(PAYER)).await.unwrap().balance, 10_000);
    assert_eq!(c.redeem(winner(1)).await.unwrap().paid, 100);
    assert_eq!(refusal(c.pot(id(OTHER)).await), Refusal::UnknownPot);

    // A tampered body: a richer pot, a richer account, a payment turned into a refusal.
    m.set(Meddle::Tamper);
    unauthenticated(c.pot(id(PAYER)).await);
    unauthenticated(c.account(id(PAYER)).await);
    unauthenticated(c.redeem(winner(2)).await);

    // A replayed answer: the ledger's own, signed, but to another request.
    m.set(Meddle::Pass);
    m.forget();
    c.pot(id(PAYER)).await.unwrap();
    m.set(Meddle::Replay);
    unauthenticated(c.pot(id(PAYER)).await);
    m.set(Meddle::Pass);
    m.forget();
    assert_eq!(refusal(c.redeem(winner(1)).await), Refusal::AlreadyRedeemed);
    m.set(Meddle::Replay);
    unauthenticated(c.redeem(winner(3)).await);

    // No signature, and a well-formed one by another key.
    m.set(Meddle::Strip);
    unauthenticated(c.pot(id(PAYER)).await);
    unauthenticated(c.pot(id(OTHER)).await);
    m.set(Meddle::Impostor);
    unauthenticated(c.redeem(winner(4)).await);
    unauthenticated(c.pot(id(PAYER)).await);

    // A client expecting another ledger's key believes nothing the real one says.
    let wrong = LedgerClient::new(&r.url, id(9), Duration::from_secs(5)).unwrap();
    unauthenticated(wrong.pot(id(PAYER)).await);
    unauthenticated(wrong.account(id(PAYER)).await);
    unauthenticated(
        wrong
            .warn(Signed::new(Warn { amount: 1 }, &key(OTHER), unix_now()))
            .await,
    );

    // The winners the impostor and the replay "refused" never reached the ledger, and are
    // paid once the real answers come through; the tampered one had been paid.
    m.set(Meddle::Pass);
    assert_eq!(c.redeem(winner(3)).await.unwrap().paid, 100);
    assert_eq!(c.redeem(winner(4)).await.unwrap().paid, 100);
    assert_eq!(refusal(c.redeem(winner(2)).await), Refusal::AlreadyRedeemed);
    assert_eq!(c.account(id(RELAY)).await.unwrap().balance, 400);
    stop(r).await;
}

/// Connects from `source` (any 127/8 address is this host).
async fn connect_from(source: [u8; 4], to: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::from((source, 0)))
        .unwrap();
    socket.connect(to).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_capped_per_address_and_closed_by_the_header_timeout() {
    const IDLE: usize = 300;
    const PER_ADDRESS: usize = 16;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&dir.path().join("ledger"));
    config.limits.max_connections = 1024;
    config.limits.max_connections_per_address = PER_ADDRESS;
    config.limits.header_timeout = Duration::from_secs(2);
    let r = start_with(config).await;
    let addr: std::net::SocketAddr = r.url.trim_start_matches("http://").parse().unwrap();
    let t0 = std::time::Instant::now();

    // Hundreds of sockets from 127.0.0.1 that never send a byte; each reports when it closed.
    let mut closes = tokio::task::JoinSet::new();
    for _ in 0..IDLE {
        let mut s = connect_from([127, 0, 0, 1], addr).await;
        closes.spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
                    Ok(Ok(0) | Err(_)) => return Some(t0.elapsed()),
                    Ok(Ok(_)) => {}
                    Err(_) => return None,
                }
            }
        });
    }
    let opened = t0.elapsed();

    // Meanwhile another address is served, and its answer is signed.
    let mut other = connect_from([127, 0, 0, 2], addr).await;
    let request = format!(
        "GET /v1/account/{}?challenge=00 HTTP/1.1\r\nHost: ledger\r\nConnection: close\r\n\r\n",
        id(PAYER)
    );
    other.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    other.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(SIGNATURE_HEADER), "{answer}");
    let served_at = t0.elapsed();

    let mut at_once = 0;
    let mut timed_out = Vec::new();
    while let Some(closed) = closes.join_next().await {
        let closed = closed
            .unwrap()
            .expect("every idle socket is closed within 10 s");
        if closed < Duration::from_millis(1500) {
            at_once += 1;
        } else {
            timed_out.push(closed);
        }
    }
    let text = metrics(&r.url).await;
    eprintln!(
        "{IDLE} idle sockets opened in {opened:?}; another address served at {served_at:?}; \
         {at_once} closed at once, {} by the header timeout (after {:?} to {:?})",
        timed_out.len(),
        timed_out.iter().min(),
        timed_out.iter().max()
    );
    assert_eq!(
        at_once,
        IDLE - PER_ADDRESS,
        "refused over the per-address cap"
    );
    assert_eq!(
        timed_out.len(),
        PER_ADDRESS,
        "held until the header timeout"
    );
    for line in [
        format!(
            "murmur_ledger_connections_refused_total{{reason=\"per_address_limit\"}} {}",
            IDLE - PER_ADDRESS
        ),
        format!(
            "murmur_ledger_connections_refused_total{{reason=\"header_timeout\"}} {PER_ADDRESS}"
        ),
    ] {
        assert!(text.contains(&line), "missing {line:?} in\n{text}");
    }
    // The slots came back.
    assert_eq!(
        r.client.account(id(PAYER)).await.unwrap().balance,
        1_000_000
    );
    stop(r).await;
}
