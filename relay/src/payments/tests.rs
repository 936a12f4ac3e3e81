//! Ticket acceptance (each refusal with its own error and counter), the winners' store
//! across a real crash, and redemption against the embedded ledger and over HTTP.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use murmur_ledger::request::{Fund, Redeem, Signed};
use murmur_ledger::{Ledger, Params, Settlement, unix_now};
use murmur_protocol::directory::{Epoch, IdentityKey};
use murmur_protocol::ticket::{Ticket, TicketFields};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use tempfile::TempDir;

use super::*;
use crate::keys::ReplaySizing;
use murmur_protocol::tab::TabConfig;
use std::collections::HashMap;

const SIZING: ReplaySizing = ReplaySizing {
    capacity: 10_000,
    fp_rate: 1e-6,
};
const EPOCH_LEN: u64 = 60;
/// Pays winners 100 each; wins always.
const FACE: u64 = 100;

fn relay_key() -> SigningKey {
    SigningKey::from_bytes(&[2; 32])
}
fn payer(i: u8) -> SigningKey {
    SigningKey::from_bytes(&[10 + i; 32])
}
fn id(k: &SigningKey) -> IdentityKey {
    IdentityKey::of(k)
}

fn params() -> PaymentsParams {
    PaymentsParams {
        me: id(&relay_key()),
        min_expected_value: 1,
        epoch_length_s: EPOCH_LEN,
        grace_epochs: 1,
        min_redeem_window_s: 600,
        max_tickets_per_epoch: 1000,
        max_pots: 100,
        max_pot_lookups: 10,
        max_pending_winners: 1000,
        max_face_value: 1 << 50,
        // Tests accept tickets from pots no lookup answered for; `junk_*` tests set it low.
        unverified_tickets_per_pot: 64,
        max_unverified_winners: 100,
        max_unverified_tickets_per_epoch: 500,
        max_pending_winners_per_pot: 1000,
        max_tickets_per_pot_per_epoch: 1000,
        pot_refresh_s: 60,
        redeem_backoff_max_s: 60,
        unpaid: UnpaidPolicy::Forward,
    }
}

/// The epoch the ring's current key belongs to, by the real clock (the ledger checks real
/// expiries).
fn current_epoch() -> Epoch {
    Epoch::try_from(unix_now() / EPOCH_LEN).unwrap()
}

struct Relay {
    keys: Arc<KeyRing>,
    payments: Arc<Payments>,
    epoch: Epoch,
}

impl Relay {
    /// Opens the relay's state in `dir`, creating keys for the current epoch if needed.
    fn open(dir: &Path, params: PaymentsParams) -> Relay {
        Relay::open_with(dir, params, None)
    }

    /// [`Relay::open`], checking co-signatures with `chain` if it is given.
    fn open_with(
        dir: &Path,
        params: PaymentsParams,
        chain: Option<Arc<dyn CoSignatureCheck>>,
    ) -> Relay {
        let keys = Arc::new(KeyRing::open(dir, SIZING).unwrap());
        let epoch = current_epoch();
        if keys.get(epoch).is_none() && keys.epochs().is_empty() {
            keys.rotate(&mut ChaCha20Rng::seed_from_u64(1), epoch, epoch)
                .unwrap();
        }
        let epoch = keys.epochs()[0];
        let mut payments = Payments::open(dir, params, keys.clone()).unwrap();
        if let Some(chain) = chain {
            payments = payments.with_cosignatures(chain);
        }
        let payments = Arc::new(payments);
        Relay {
            keys,
            payments,
            epoch,
        }
    }

    fn commitment(&self, epoch: Epoch) -> [u8; 32] {
        self.keys.get(epoch).unwrap().payment_commitment()
    }

    /// A ticket from `payer` to this relay for key epoch `self.epoch` that always wins.
    fn winner(&self, payer: &SigningKey, nonce: u16) -> Ticket {
        self.ticket(payer, nonce, |_| {})
    }

    fn ticket(
        &self,
        payer: &SigningKey,
        nonce: u16,
        edit: impl FnOnce(&mut TicketFields),
    ) -> Ticket {
        let now = unix_now();
        let mut n = [0u8; 16];
        n[..2].copy_from_slice(&nonce.to_be_bytes());
        let mut f = TicketFields {
            recipient: id(&relay_key()),
            face_value: FACE,
            win_ratio: u64::MAX,
            nonce: n,
            issued: now,
            expiry: now + 3600,
            commitment: self.commitment(self.epoch),
        };
        edit(&mut f);
        Ticket::sign(f, payer)
    }

    /// Drops every key of the ticket epochs (as rotation does once `key_grace` is over).
    fn retire(&self) {
        let later = self.epoch + 5;
        self.keys
            .rotate(&mut ChaCha20Rng::seed_from_u64(9), later, later)
            .unwrap();
        assert!(self.keys.get(self.epoch).is_none());
    }
}

/// A ledger where payers 0..3 have money; payers 0 and 1 have funded pots (payer 1's too
/// small for [`FACE`]: usable 50), payer 2 none.
async fn ledger(dir: &Path) -> Ledger {
    let genesis: Vec<_> = (0..3).map(|i| (id(&payer(i)), 1u64 << 50)).collect();
    let ledger = Ledger::open(
        &dir.join("ledger.redb"),
        Params {
            notice_period_s: 3600,
            request_window_s: 300,
        },
        &genesis,
    )
    .unwrap();
    for (i, balance, escrow) in [(0, 1u64 << 44, 1u64 << 46), (1, 50, 100)] {
        let k = payer(i);
        let fund = Fund {
            pot: id(&k),
            balance,
            escrow,
        };
        ledger
            .fund(Signed::new(fund, &k, unix_now()))
            .await
            .unwrap();
    }
    ledger
}

fn recorder() -> (
    metrics_exporter_prometheus::PrometheusRecorder,
    PrometheusHandle,
) {
    let r = PrometheusBuilder::new().build_recorder();
    let h = r.handle();
    (r, h)
}

/// The value of `name{label}` in Prometheus text (0 if absent).
fn metric(text: &str, name: &str, label: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

#[tokio::test]
async fn each_refusal_has_its_own_error_and_counter() {
    let dir = TempDir::new().unwrap();
    let ledger = ledger(dir.path()).await;
    let r = Relay::open(dir.path(), params());
    let p = &r.payments;
    let now = unix_now();
    let (rich, poor, potless) = (payer(0), payer(1), payer(2));
    let (rec, handle) = recorder();

    // Pots not yet known are accepted while they are looked up.
    metrics::with_local_recorder(&rec, || {
        for (k, nonce) in [(&rich, 1), (&poor, 1), (&potless, 1)] {
            let a = p.accept(&r.winner(k, nonce), r.epoch, now).unwrap();
            assert_eq!(
                a,
                Accepted {
                    expected_value: FACE,
                    winner: true,
                    pot_verified: false,
                }
            );
        }
    });
    assert_eq!(p.refresh_pots(&ledger, now).await, 3);

    let other_relay = id(&SigningKey::from_bytes(&[3; 32]));
    let next = r.epoch + 1;
    // A losing ticket worth 1 in expectation: wins with probability 2^-40.
    let loser = r.ticket(&rich, 2, |f| {
        f.face_value = 1 << 40;
        f.win_ratio = (1 << 24) - 1;
    });
    let mut forged = r.winner(&rich, 3);
    forged.face_value += 1;
    let mut forged_reused = r.winner(&rich, 1);
    forged_reused.face_value += 1;
    let mut forged_other_epoch = r.ticket(&rich, 4, |f| f.commitment = r.commitment(next));
    forged_other_epoch.face_value += 1;
    let mut forged_potless = r.winner(&potless, 2);
    forged_potless.face_value += 1;

    let cases: Vec<(Ticket, Epoch, PaymentRefusal)> = vec![
        (
            r.ticket(&rich, 10, |f| f.recipient = other_relay),
            r.epoch,
            PaymentRefusal::WrongRecipient,
        ),
        (
            r.ticket(&rich, 11, |f| f.expiry = now - 1),
            r.epoch,
            PaymentRefusal::Expired {
                expiry: now - 1,
                now,
            },
        ),
        (
            r.ticket(&rich, 12, |f| f.issued = now + 31),
            r.epoch,
            PaymentRefusal::NotYetValid {
                issued: now + 31,
                now,
            },
        ),
        (
            r.ticket(&rich, 13, |f| f.win_ratio = 0),
            r.epoch,
            PaymentRefusal::TooSmall {
                expected_value: 0,
                min: 1,
            },
        ),
        (
            r.winner(&rich, 14),
            12345,
            PaymentRefusal::UnknownEpoch(12345),
        ),
        (
            r.ticket(&rich, 15, |f| f.commitment = r.commitment(next)),
            r.epoch,
            PaymentRefusal::WrongCommitment(r.epoch),
        ),
        (
            r.winner(&rich, 16),
            next,
            PaymentRefusal::WrongCommitment(next),
        ),
        (
            r.ticket(&rich, 17, |f| f.expiry = now + 300),
            r.epoch,
            PaymentRefusal::ExpiresTooSoon {
                expiry: now + 300,
                redeemable_from: params().retires_at(r.epoch),
            },
        ),
        (r.winner(&rich, 1), r.epoch, PaymentRefusal::NonceReused),
        (
            r.winner(&potless, 3),
            r.epoch,
            PaymentRefusal::PotUnknown(id(&potless)),
        ),
        (
            r.winner(&poor, 2),
            r.epoch,
            // Usable 50, less the 100 its first winner (accepted while it was looked up)
            // already owes this relay.
            PaymentRefusal::PotInsufficient {
                usable: 0,
                face_value: FACE,
            },
        ),
        // The signature is checked last: a forged ticket that fails another check is
        // refused for that.
        (forged_reused, r.epoch, PaymentRefusal::NonceReused),
        (
            forged_other_epoch,
            r.epoch,
            PaymentRefusal::WrongCommitment(r.epoch),
        ),
        (
            forged_potless,
            r.epoch,
            PaymentRefusal::PotUnknown(id(&potless)),
        ),
        (forged, r.epoch, PaymentRefusal::Forged),
    ];
    metrics::with_local_recorder(&rec, || {
        for (ticket, epoch, want) in &cases {
            assert_eq!(&p.accept(ticket, *epoch, now).unwrap_err(), want);
        }
        // A forged ticket did not use up its nonce; a loser pays in expectation only.
        assert!(p.accept(&r.winner(&rich, 3), r.epoch, now).unwrap().winner);
        assert_eq!(
            p.accept(&loser, r.epoch, now).unwrap(),
            Accepted {
                expected_value: 1,
                winner: false,
                pot_verified: true,
            }
        );
    });

    let text = handle.render();
    let mut labels: Vec<&str> = cases.iter().map(|(_, _, r)| r.label()).collect();
    labels.sort_unstable();
    labels.dedup();
    assert_eq!(labels.len(), 11, "distinct labels: {labels:?}");
    for label in labels {
        let expected = cases.iter().filter(|(_, _, r)| r.label() == label).count() as u64;
        let got = metric(&text, m::TICKETS_REFUSED, &format!("reason=\"{label}\""));
        assert_eq!(got, expected, "{label}: {text}");
    }
    assert_eq!(metric(&text, m::TICKETS_ACCEPTED, ""), 5);
    assert_eq!(metric(&text, m::TICKETS_WON, ""), 4);
    assert_eq!(metric(&text, m::TICKET_VALUE_EARNED, ""), 4 * FACE + 1);
    assert_eq!(p.flush().unwrap(), 4);
    assert_eq!(p.flush().unwrap(), 0, "nothing queued twice");
}

#[tokio::test]
async fn every_set_and_queue_is_bounded() {
    let dir = TempDir::new().unwrap();
    let ledger = ledger(dir.path()).await;
    let r = Relay::open(
        dir.path(),
        PaymentsParams {
            max_tickets_per_epoch: 4,
            max_pots: 2,
            max_pot_lookups: 1,
            max_pending_winners: 3,
            ..params()
        },
    );
    let p = &r.payments;
    let now = unix_now();
    let (rec, handle) = recorder();
    metrics::with_local_recorder(&rec, || {
        p.accept(&r.winner(&payer(0), 1), r.epoch, now).unwrap();
        assert_eq!(
            p.accept(&r.winner(&payer(1), 1), r.epoch, now),
            Err(PaymentRefusal::PotLookupsFull)
        );
    });
    p.refresh_pots(&ledger, now).await;
    metrics::with_local_recorder(&rec, || {
        // Payer 0's pot is known now; payer 1's is looked up (and accepted meanwhile): the
        // cache is full.
        p.accept(&r.winner(&payer(1), 1), r.epoch, now).unwrap();
        assert_eq!(
            p.accept(&r.winner(&payer(2), 1), r.epoch, now),
            Err(PaymentRefusal::PotCacheFull)
        );
        p.accept(&r.winner(&payer(0), 2), r.epoch, now).unwrap();
        assert_eq!(
            p.accept(&r.winner(&payer(0), 3), r.epoch, now),
            Err(PaymentRefusal::WinnersFull),
            "three winners wait already"
        );
        let loser = r.ticket(&payer(0), 4, |f| {
            f.face_value = 1 << 40;
            f.win_ratio = (1 << 24) - 1;
        });
        p.accept(&loser, r.epoch, now).unwrap();
        assert_eq!(
            p.accept(&r.winner(&payer(0), 5), r.epoch, now),
            Err(PaymentRefusal::TooManyTickets(r.epoch))
        );
    });
    let text = handle.render();
    for label in [
        "pot_lookups_full",
        "pot_cache_full",
        "winners_full",
        "nonce_set_full",
    ] {
        assert_eq!(
            metric(&text, m::TICKETS_REFUSED, &format!("reason=\"{label}\"")),
            1,
            "{label}"
        );
    }
    // Flushed winners still count against the bound until they are settled.
    assert_eq!(p.flush().unwrap(), 3);
    r.retire();
    p.forget_retired_epochs();
    assert!(
        p.seen.lock().unwrap().is_empty(),
        "retired nonces forgotten"
    );
}

const CRASH_CHILD: &str = "MURMUR_TEST_PAYMENTS_CRASH_DIR";
const CRASH_N: u16 = 20;

/// In a child process: accept `CRASH_N` winners, flush, accept one more, then abort (no
/// destructor runs, as under `kill -9`).
fn crash_child(dir: &Path) -> ! {
    let r = Relay::open(dir, params());
    let now = unix_now();
    for nonce in 0..CRASH_N {
        let a = r.payments.accept(&r.winner(&payer(0), nonce), r.epoch, now);
        assert!(a.unwrap().winner);
    }
    assert_eq!(r.payments.flush().unwrap(), usize::from(CRASH_N));
    // Accepted but never flushed: its packet was never released.
    r.payments
        .accept(&r.winner(&payer(0), CRASH_N), r.epoch, now)
        .unwrap();
    std::process::abort()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn winners_flushed_before_a_crash_are_paid_exactly_once() {
    if let Some(dir) = std::env::var_os(CRASH_CHILD) {
        crash_child(Path::new(&dir));
    }
    let dir = TempDir::new().unwrap();
    let ledger = ledger(dir.path()).await;
    // The relay's keys exist before the child starts.
    drop(Relay::open(dir.path(), params()));
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "payments::tests::winners_flushed_before_a_crash_are_paid_exactly_once",
            "--test-threads=1",
        ])
        .env(CRASH_CHILD, dir.path())
        .status()
        .unwrap();
    assert!(!status.success(), "the child crashes on purpose");

    let r = Relay::open(dir.path(), params());
    let p = &r.payments;
    let pending = p.pending_winners().unwrap();
    assert_eq!(
        pending.len(),
        usize::from(CRASH_N),
        "every flushed winner survives"
    );
    assert!(pending.iter().all(|w| w.epoch == r.epoch));
    let me = id(&relay_key());
    let relay = relay_key();
    // The child accepted nonces 0..=CRASH_N: all remembered but the unflushed one.
    assert_eq!(
        p.accept(&r.winner(&payer(0), 0), r.epoch, unix_now()),
        Err(PaymentRefusal::NonceReused)
    );

    // Not redeemed while the epoch's key is held.
    let round = p.redeem_due(&ledger, &relay, unix_now()).await.unwrap();
    assert_eq!(round.waiting, usize::from(CRASH_N));
    assert_eq!(round.paid, 0);
    assert_eq!(ledger.account(me).await.unwrap().balance, 0);

    // As if an earlier run had crashed after the ledger paid winner 0 but before it was
    // recorded: the ledger already redeemed it.
    let first = pending
        .iter()
        .find(|w| w.ticket.nonce[..2] == [0, 0])
        .unwrap();
    let op = Redeem {
        ticket: first.ticket,
        reveal: *first.reveal,
    };
    ledger
        .redeem(Signed::new(op, &relay, unix_now()))
        .await
        .unwrap();

    r.retire();
    let (a, b) = tokio::join!(
        p.redeem_due(&ledger, &relay, unix_now()),
        p.redeem_due(&ledger, &relay, unix_now())
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.paid + b.paid, usize::from(CRASH_N) - 1, "{a:?} {b:?}");
    assert_eq!(a.settled_unpaid + b.settled_unpaid, 1, "{a:?} {b:?}");
    let total = u64::from(CRASH_N) * FACE;
    assert_eq!(ledger.account(me).await.unwrap().balance, total);
    assert!(p.pending_winners().unwrap().is_empty());
    let settled = p.settled().unwrap();
    assert_eq!(settled.len(), usize::from(CRASH_N));
    assert_eq!(
        settled.iter().filter(|s| s.outcome == "paid").count(),
        usize::from(CRASH_N) - 1
    );
    assert!(settled.iter().any(|s| s.outcome == "already_redeemed"));

    // Again, and after another restart: nothing is paid twice.
    let again = p.redeem_due(&ledger, &relay, unix_now()).await.unwrap();
    assert_eq!(again, RedeemRound::default());
    drop(r);
    let r = Relay::open(dir.path(), params());
    let again = r
        .payments
        .redeem_due(&ledger, &relay, unix_now())
        .await
        .unwrap();
    assert_eq!(again, RedeemRound::default());
    assert_eq!(ledger.account(me).await.unwrap().balance, total);
    assert!(ledger.audit().unwrap().conserved());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redeemer_retries_until_the_ledger_answers() {
    let dir = TempDir::new().unwrap();
    // A port with nothing listening (yet).
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("http://{addr}");
    let (key_file, ledger_id) = ledger_key(dir.path());
    let client =
        murmur_ledger::client::LedgerClient::new(&url, ledger_id, Duration::from_secs(2)).unwrap();
    let r = Relay::open(dir.path(), params());
    let p = r.payments.clone();
    let relay = relay_key();
    let now = unix_now();
    p.accept(&r.winner(&payer(0), 1), r.epoch, now).unwrap();
    p.flush().unwrap();
    r.retire();

    let round = p.redeem_due(&client, &relay, now).await.unwrap();
    assert_eq!(round.retrying, 1, "{round:?}");
    let round = p.redeem_due(&client, &relay, now).await.unwrap();
    assert_eq!(round.deferred, 1, "backing off: {round:?}");
    assert_eq!(p.pending_winners().unwrap().len(), 1, "the winner is kept");

    // The redeemer task keeps trying while the ledger is down...
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(run_redeemer(
        p.clone(),
        client.clone(),
        relay.clone(),
        Duration::from_secs(3600),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(p.pending_winners().unwrap().len(), 1);

    // ...and is paid once it is up.
    let config = ledger_config(dir.path(), key_file);
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let server_stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(murmur_ledger::serve(
        config,
        listener,
        server_stop.clone().cancelled_owned(),
    ));
    let fund = Fund {
        pot: id(&payer(0)),
        balance: 1 << 44,
        escrow: 1 << 46,
    };
    client
        .fund(Signed::new(fund, &payer(0), unix_now()))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !p.pending_winners().unwrap().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "not paid in 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let balance = client.account(id(&relay)).await.unwrap().balance;
    assert_eq!(balance, FACE);
    let settled = p.settled().unwrap();
    assert_eq!((settled.len(), settled[0].paid), (1, FACE));
    stop.cancel();
    task.await.unwrap();
    server_stop.cancel();
    server.await.unwrap().unwrap();
}

/// A ledger key under `dir` and its identity.
fn ledger_key(dir: &Path) -> (std::path::PathBuf, IdentityKey) {
    let path = dir.join("ledger.key");
    let identity = if path.exists() {
        IdentityKey::of(&murmur_directory::keys::load(&path).unwrap())
    } else {
        murmur_directory::keys::keygen(&path).unwrap()
    };
    (path, identity)
}

/// A ledger daemon's config under `dir` whose genesis funds payer 0.
fn ledger_config(dir: &Path, key_file: std::path::PathBuf) -> murmur_ledger::Config {
    let mut config = murmur_ledger::Config::with_defaults();
    config.key_file = key_file;
    config.state_dir = dir.join("ledger");
    config.genesis = vec![murmur_ledger::config::GenesisEntry {
        account: id(&payer(0)).to_hex(),
        amount: 1 << 50,
    }];
    config
}

/// Something answering on a ledger's address that is not the ledger: every redemption is
/// "already redeemed" and every pot unknown, the ledger's own error bodies, either unsigned or
/// signed by another key (alternately). Counts the requests it answered.
async fn impostor_ledger() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use axum::http::StatusCode;
    use murmur_ledger::answer::{Exchange, SIGNATURE_HEADER, digest};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = answered.clone();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let n = count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        async move {
            let method = req.method().as_str().to_owned();
            let target = req.uri().path_and_query().unwrap().as_str().to_owned();
            let request = axum::body::to_bytes(req.into_body(), 1 << 16)
                .await
                .unwrap();
            let (status, reason) = if method == "GET" {
                (StatusCode::NOT_FOUND, "unknown_pot")
            } else {
                (StatusCode::CONFLICT, "already_redeemed")
            };
            // The ledger's error body (`murmur_ledger::ErrorBody`).
            let body = format!(r#"{{"reason":"{reason}","message":"not the ledger"}}"#);
            let mut headers = axum::http::HeaderMap::new();
            if n % 2 == 1 {
                // A well-formed signature over the right message, by the wrong key.
                let sig = Exchange {
                    method: &method,
                    target: &target,
                    request_digest: digest(&request),
                    status: status.as_u16(),
                    answer_digest: digest(body.as_bytes()),
                }
                .sign(&SigningKey::from_bytes(&[99; 32]));
                headers.insert(SIGNATURE_HEADER, sig.parse().unwrap());
            }
            (status, headers, body)
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, answered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_ledger_neither_settles_a_winner_nor_makes_a_pot_unknown() {
    let dir = TempDir::new().unwrap();
    let (key_file, ledger_id) = ledger_key(dir.path());
    let (fake_url, answered) = impostor_ledger().await;
    let fake =
        murmur_ledger::client::LedgerClient::new(&fake_url, ledger_id, Duration::from_secs(2))
            .unwrap();
    // Retries a second after each failure.
    let quick = PaymentsParams {
        redeem_backoff_max_s: 1,
        ..params()
    };
    let r = Relay::open(dir.path(), quick);
    let p = r.payments.clone();
    let relay = relay_key();
    let now = unix_now();
    p.accept(&r.winner(&payer(0), 1), r.epoch, now).unwrap();
    p.flush().unwrap();

    // "Unknown pot", unsigned or wrongly signed: the pot stays being looked up, and its
    // tickets are still taken.
    for _ in 0..2 {
        assert_eq!(p.refresh_pots(&fake, now).await, 1);
    }
    p.accept(&r.winner(&payer(0), 2), r.epoch, now).unwrap();
    p.flush().unwrap();
    r.retire();

    // "Already redeemed", twice (unsigned, then signed by another key): both winners stay
    // pending, to be retried.
    for _ in 0..2 {
        let round = p.redeem_due(&fake, &relay, unix_now()).await.unwrap();
        assert_eq!((round.paid, round.settled_unpaid), (0, 0), "{round:?}");
        assert_eq!(round.retrying, 2, "{round:?}");
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    assert_eq!(p.pending_winners().unwrap().len(), 2);
    assert!(p.settled().unwrap().is_empty());
    assert!(answered.load(std::sync::atomic::Ordering::Relaxed) >= 6);

    // The real ledger pays each once.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(murmur_ledger::serve(
        ledger_config(dir.path(), key_file),
        listener,
        stop.clone().cancelled_owned(),
    ));
    let real =
        murmur_ledger::client::LedgerClient::new(&url, ledger_id, Duration::from_secs(5)).unwrap();
    let fund = Fund {
        pot: id(&payer(0)),
        balance: 1 << 44,
        escrow: 1 << 46,
    };
    real.fund(Signed::new(fund, &payer(0), unix_now()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let round = p.redeem_due(&real, &relay, unix_now()).await.unwrap();
    assert_eq!((round.paid, round.settled_unpaid), (2, 0), "{round:?}");
    assert!(p.pending_winners().unwrap().is_empty());
    assert_eq!(real.account(id(&relay)).await.unwrap().balance, 2 * FACE);
    let again = p.redeem_due(&real, &relay, unix_now()).await.unwrap();
    assert_eq!(again, RedeemRound::default());
    stop.cancel();
    server.await.unwrap().unwrap();
}

/// A relay's Sphinx pipeline with payments, fed two-hop packets [relay, elsewhere].
struct PipelineRig {
    pipeline: Option<crate::pipeline::Pipeline>,
    submit: Option<crate::pipeline::Submitter>,
    released: tokio::sync::mpsc::Receiver<crate::pipeline::Processed>,
    route: [murmur_protocol::packet::RouteHop; 2],
    epoch: Epoch,
    rng: ChaCha20Rng,
}

impl PipelineRig {
    fn start(r: &Relay) -> PipelineRig {
        use crate::pipeline::{Pipeline, PipelineConfig};
        use murmur_protocol::packet::{Address, PublicKey, RouteHop, StaticSecret};
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let next = StaticSecret::random_from_rng(&mut rng);
        let route = [
            RouteHop {
                address: Address(id(&relay_key()).0),
                sphinx_key: r.keys.get(r.epoch).unwrap().public,
            },
            RouteHop {
                address: Address([9; 32]),
                sphinx_key: PublicKey::from(&next),
            },
        ];
        let (release, released) = tokio::sync::mpsc::channel(16);
        let config = PipelineConfig {
            workers: 1,
            input_queue: 16,
            max_hop_delay: Duration::from_secs(1),
        };
        let pipeline =
            Pipeline::start(config, r.keys.clone(), Some(r.payments.clone()), release).unwrap();
        PipelineRig {
            submit: Some(pipeline.submitter()),
            pipeline: Some(pipeline),
            released,
            route,
            epoch: r.epoch,
            rng,
        }
    }

    /// Submits a packet whose envelope carries `ticket` for the relay.
    fn send(&mut self, ticket: Option<murmur_protocol::envelope::SlotTicket>) {
        use murmur_protocol::packet::{Address, build_packet_with_envelope};
        let (packet, envelope) = build_packet_with_envelope(
            &mut self.rng,
            &self.route,
            &[Duration::ZERO; 2],
            Address([9; 32]),
            [0; 16],
            b"x",
            &[ticket, None],
        )
        .unwrap();
        if let Some(submit) = &self.submit {
            submit.submit(crate::pipeline::Inbound {
                key_epoch: self.epoch,
                packet,
                envelope,
                received: std::time::Instant::now(),
            });
        }
    }

    /// Stops the workers; then returns how many packets were released in all.
    fn finish(mut self) -> usize {
        self.submit = None;
        if let Some(p) = self.pipeline.take() {
            p.shutdown();
        }
        let mut n = 0;
        while self.released.try_recv().is_ok() {
            n += 1;
        }
        n
    }
}

/// The flusher stores a worker's winner before it releases the packets that follow it.
#[test]
fn the_pipeline_stores_winners_before_releasing_the_batch() {
    use murmur_protocol::envelope::SlotTicket;
    let dir = TempDir::new().unwrap();
    let r = Relay::open(dir.path(), params());
    let mut rig = PipelineRig::start(&r);
    for nonce in 0..3 {
        // The packet carries a winning ticket for this hop; the worker accepts it.
        rig.send(Some(
            SlotTicket::from_ticket(&r.winner(&payer(0), nonce)).unwrap(),
        ));
        rig.released.blocking_recv().unwrap();
        assert_eq!(
            r.payments.pending_winners().unwrap().len(),
            usize::from(nonce) + 1,
            "released before its winner was stored"
        );
    }
    rig.finish();
}

/// Packets without a ticket always go on; a packet whose ticket is refused goes on under
/// `unpaid = "forward"` and is dropped under `unpaid = "drop"`.
#[test]
fn the_unpaid_policy_decides_what_a_refused_ticket_costs_its_packet() {
    use murmur_protocol::envelope::SlotTicket;
    for (policy, forged_released) in [(UnpaidPolicy::Forward, 1), (UnpaidPolicy::Drop, 0)] {
        let dir = TempDir::new().unwrap();
        let r = Relay::open(
            dir.path(),
            PaymentsParams {
                unpaid: policy,
                ..params()
            },
        );
        let mut rig = PipelineRig::start(&r);
        rig.send(None);
        // Signed by another key than the pot's: forged.
        let mut forged = SlotTicket::from_ticket(&r.winner(&payer(0), 1)).unwrap();
        forged.pot = id(&payer(1));
        rig.send(Some(forged));
        rig.send(Some(
            SlotTicket::from_ticket(&r.winner(&payer(0), 2)).unwrap(),
        ));
        let released = rig.finish();
        assert_eq!(released, 2 + forged_released, "{policy:?}");
        assert_eq!(r.payments.pending_winners().unwrap().len(), 1, "{policy:?}");
    }
}

#[tokio::test]
async fn a_relay_configured_with_a_ledger_takes_payments_and_publishes_commitments() {
    let dir = TempDir::new().unwrap();
    let text = format!(
        "version = 1\n[relay]\nfamily = \"op\"\nroles = [\"mix\"]\nstate_dir = \"{}\"\n\
         [listen]\nmix = \"127.0.0.1:0\"\n[payments]\nledger = \"http://127.0.0.1:9\"\n\
         ledger_key = \"{}\"\n",
        dir.path().join("state").display(),
        id(&SigningKey::from_bytes(&[4; 32]))
    );
    let config = crate::Config::parse(&text, dir.path().to_path_buf()).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let node = crate::Node::start(config.clone(), relay_key(), stop.clone())
        .await
        .unwrap();
    let payments = node.payments().expect("payments are on");
    assert_eq!(payments.params().me, id(&relay_key()));
    assert_eq!(payments.unpaid_policy(), UnpaidPolicy::Forward);
    let epoch = current_epoch();
    node.rotate_keys(epoch).unwrap();
    let d = node.descriptor(epoch, unix_now()).unwrap();
    assert_eq!(d.sphinx_keys.len(), 2);
    for k in &d.sphinx_keys {
        let held = node.keys().get(k.epoch).unwrap();
        assert_eq!(k.payment_commitment, held.payment_commitment());
        assert_eq!(
            k.payment_commitment,
            murmur_protocol::ticket::commitment_of(held.payment_reveal())
        );
    }
    stop.cancel();
    node.join().await;

    // Without a ledger, no payments.
    let mut off = config;
    off.payments.ledger = None;
    off.payments.ledger_key = None;
    off.relay.state_dir = dir.path().join("state2");
    let stop = tokio_util::sync::CancellationToken::new();
    let node = crate::Node::start(off, relay_key(), stop.clone())
        .await
        .unwrap();
    assert!(node.payments().is_none());
    stop.cancel();
    node.join().await;
}

/// A client's tickets under the defaults (`PayerConfig::default`) are redeemable under a
/// relay's defaults wherever in the key epoch they are issued: they outlive the key's
/// retirement by `min_redeem_window`.
#[test]
fn the_payers_default_lifetime_fits_the_relays_default_redeem_window() {
    let text = "version = 1\n[relay]\nfamily = \"op\"\nroles = [\"mix\"]\n";
    let config = crate::Config::parse(text, std::path::PathBuf::new()).unwrap();
    let p = PaymentsParams::from_config(&config, id(&relay_key()));
    let lifetime = murmur_protocol::payer::PayerConfig::default().ticket_lifetime_s;
    let epoch: Epoch = 1_000_000;
    let start = u64::from(epoch) * p.epoch_length_s;
    for issued in [start, start + p.epoch_length_s - 1] {
        assert!(
            issued + lifetime >= p.retires_at(epoch) + p.min_redeem_window_s,
            "a ticket issued at {issued} expires before it may be redeemed"
        );
    }
}

/// Sends `frames` Forward frames to a gateway session (paying a ticket worth 16 frames every
/// 16 frames when `pay`), then waits a moment; returns the control messages the gateway sent
/// and whether it closed the session.
async fn gateway_client(
    addr: std::net::SocketAddr,
    gateway_key: murmur_protocol::link::LinkPublic,
    frames: usize,
    pay: Option<(&SigningKey, IdentityKey, [u8; 32])>,
) -> (Vec<murmur_protocol::control::Control>, bool) {
    let key = murmur_protocol::link::LinkSecret::generate(&mut rand::rng());
    client_session(addr, gateway_key, &key, frames, |i| {
        let (pot, gateway, commitment) = pay?;
        (i % 16 == 15).then(|| ticket_worth(pot, gateway, commitment, 16, i as u64))
    })
    .await
}

/// A ticket from `pot` for the gateway `to` worth `expected_value` base units.
fn ticket_worth(
    pot: &SigningKey,
    to: IdentityKey,
    commitment: [u8; 32],
    expected_value: u64,
    nonce: u64,
) -> Ticket {
    let terms =
        murmur_protocol::ticket::Terms::for_expected_value(expected_value, 1_000_000).unwrap();
    gateway_ticket(
        pot,
        to,
        commitment,
        terms.face_value,
        terms.win_ratio,
        nonce,
    )
}

/// A client with link key `key`: sends `frames` Forward frames to the gateway at `addr`, each
/// followed by the payment `pay(i)` gives, if any, then waits a moment; the control messages
/// the gateway sent and whether it closed the session.
async fn client_session(
    addr: std::net::SocketAddr,
    gateway_key: murmur_protocol::link::LinkPublic,
    key: &murmur_protocol::link::LinkSecret,
    frames: usize,
    mut pay: impl FnMut(usize) -> Option<Ticket>,
) -> (Vec<murmur_protocol::control::Control>, bool) {
    use murmur_client_link::{ClientLink, LinkFailure};
    use murmur_protocol::control::Control;
    use murmur_protocol::envelope::Envelope;
    use murmur_protocol::frame::Frame;
    use murmur_protocol::packet::{Address, Packet};

    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut ws = ClientLink::open(stream, &gateway_key, key).await.unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    for i in 0..frames {
        let forward = Frame::Forward {
            next_hop: Address([1; 32]),
            key_epoch: 0,
            packet: Packet::from_slice(&[0; murmur_protocol::PACKET_SIZE]).unwrap(),
            envelope: Envelope::random(&mut rng),
        };
        if ws.send(&forward).await.is_err() {
            break;
        }
        if let Some(ticket) = pay(i) {
            let payment = Frame::Control(Control::Payment { ticket }.encode());
            if ws.send(&payment).await.is_err() {
                break;
            }
        }
    }
    let mut controls = Vec::new();
    let mut closed = false;
    loop {
        match tokio::time::timeout(Duration::from_millis(500), ws.recv()).await {
            Ok(Ok(Frame::Control(c))) => controls.push(Control::decode(&c).unwrap()),
            Ok(Ok(_)) => {}
            Ok(Err(LinkFailure::Closed)) => {
                closed = true;
                break;
            }
            Ok(Err(e)) => panic!("link failed: {e:?}"),
            Err(_) => break,
        }
    }
    (controls, closed)
}

/// A ledger daemon on loopback whose genesis funds payer 0, with payer 0's pot funded; its
/// URL, identity and a client, and what stops it.
async fn http_ledger(
    dir: &Path,
) -> (
    String,
    IdentityKey,
    murmur_ledger::client::LedgerClient,
    tokio_util::sync::CancellationToken,
) {
    let (key_file, ledger_id) = ledger_key(dir);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(murmur_ledger::serve(
        ledger_config(dir, key_file),
        listener,
        stop.clone().cancelled_owned(),
    ));
    let client =
        murmur_ledger::client::LedgerClient::new(&url, ledger_id, Duration::from_secs(5)).unwrap();
    let fund = Fund {
        pot: id(&payer(0)),
        balance: 1 << 44,
        escrow: 1 << 46,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while client
        .fund(Signed::new(fund, &payer(0), unix_now()))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ledger did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (url, ledger_id, client, stop)
}

/// A gateway relay taking payments at `ledger`, with keys for the current epoch; the node,
/// its epoch's commitment, and what stops it.
/// A consensus of one mix per layer (for a gateway that needs one in force).
pub(crate) fn any_consensus() -> murmur_protocol::directory::Consensus {
    use murmur_protocol::directory::synthetic::{SyntheticNetwork, generate};
    use rand::SeedableRng;
    generate(
        &mut rand_chacha::ChaCha20Rng::seed_from_u64(1),
        &SyntheticNetwork {
            mixes_per_layer: 1,
            gateways: 0,
            exits: 0,
            params: murmur_protocol::directory::NetworkParams::nym_like(),
            epoch: 1,
        },
    )
    .0
}

async fn paid_gateway(
    dir: &Path,
    ledger: &str,
    ledger_id: IdentityKey,
    extra: &str,
) -> (
    Arc<crate::Node>,
    [u8; 32],
    tokio_util::sync::CancellationToken,
) {
    let text = format!(
        "version = 1\n[relay]\nfamily = \"op\"\nroles = [\"gateway\"]\nstate_dir = \"{}\"\n\
         [listen]\nmix = \"127.0.0.1:0\"\nclient = \"127.0.0.1:0\"\n\
         [payments]\nledger = \"{ledger}\"\nledger_key = \"{ledger_id}\"\npot_refresh = \"1s\"\n{extra}",
        dir.join("state").display(),
    );
    let config = crate::Config::parse(&text, dir.to_path_buf()).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let node = crate::Node::start(config, relay_key(), stop.clone())
        .await
        .unwrap();
    // A gateway takes clients once a consensus is in force: any will do here, the clients'
    // packets are only charged (and dropped, their first hops unknown).
    node.apply_consensus(Arc::new(any_consensus()));
    // The key epoch by the relay's own epoch length (the default, 20 minutes).
    let epoch_length = node.payments().unwrap().params().epoch_length_s;
    let epoch = Epoch::try_from(unix_now() / epoch_length).unwrap();
    node.rotate_keys(epoch).unwrap();
    let commitment = node.keys().get(epoch).unwrap().payment_commitment();
    (node, commitment, stop)
}

/// A gateway that takes payments serves a client that pays as it goes, and cuts off one
/// that does not: 64 frames of credit, 64 of arrears, then its frames are refused (an
/// honest client's ticket may be on its way), and once 64 were refused the next cuts it off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_cuts_off_a_client_that_does_not_pay() {
    use murmur_protocol::control::Control;
    let dir = TempDir::new().unwrap();
    let (url, ledger_id, _client, ledger_stop) = http_ledger(dir.path()).await;
    let (node, commitment, stop) = paid_gateway(dir.path(), &url, ledger_id, "").await;
    let addr = node.client_addr().unwrap();

    // Paying 16 frames' worth every 16 frames: served throughout.
    let pot = payer(0);
    let paying = Some((&pot, id(&relay_key()), commitment));
    let gateway_key = node.link_public();
    let (controls, closed) = gateway_client(addr, gateway_key, 400, paying).await;
    assert!(controls.is_empty(), "a paying client was told {controls:?}");
    assert!(!closed, "a paying client was disconnected");

    // Paying nothing: 64 frames on credit, 64 in arrears, 64 refused, and the 193rd cuts it
    // off, with a Cutoff first. (Exactly 193 frames: frames the gateway never reads would
    // make its close a reset, which can discard the Cutoff before the client reads it.)
    let (controls, closed) = gateway_client(addr, gateway_key, 193, None).await;
    assert_eq!(controls, vec![Control::Cutoff]);
    assert!(closed, "a client in arrears stays connected");
    stop.cancel();
    node.join().await;
    ledger_stop.cancel();
}

/// A client whose tickets lag behind what the gateway charged (under load, a round trip
/// holds more deliveries than the grace) reaches the arrears limit: its next frames are
/// refused, not a cut-off, and its late ticket brings it back, served from then on. The
/// gateway used to cut it off at the first frame past the limit; the client, back in debt
/// for the deliveries lost with the session, was cut off again at each reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_ticket_is_late_is_refused_a_moment_not_cut_off() {
    let dir = TempDir::new().unwrap();
    let (url, ledger_id, _client, ledger_stop) = http_ledger(dir.path()).await;
    let (node, commitment, stop) = paid_gateway(dir.path(), &url, ledger_id, "").await;
    let addr = node.client_addr().unwrap();
    let pot = payer(0);
    let gateway = id(&relay_key());
    let key = murmur_protocol::link::LinkSecret::generate(&mut rand::rng());
    // 128 frames on credit and arrears, 12 refused, then a ticket for 64 frames (the most
    // one ticket credits), then 16 frames' worth every 16 frames.
    let (controls, closed) = client_session(addr, node.link_public(), &key, 240, |i| {
        let value = match i {
            139 => 64,
            i if i > 139 && i % 16 == 15 => 16,
            _ => return None,
        };
        Some(ticket_worth(&pot, gateway, commitment, value, i as u64))
    })
    .await;
    assert!(
        !controls.contains(&murmur_protocol::control::Control::Cutoff),
        "{controls:?}"
    );
    assert!(!closed, "a client that paid late was disconnected");
    let address = murmur_protocol::link::session_address(&key.public());
    let stats = node.gateway().unwrap().tab_stats(&address).unwrap();
    assert_eq!(stats.unpaid_frames, 12, "{stats:?}");
    assert_eq!(stats.frames, 228, "{stats:?}");
    stop.cancel();
    node.join().await;
    ledger_stop.cancel();
}

/// A ticket for the gateway `to` (commitment `commitment`) from `pot` with `face_value`
/// that always wins, unless `win_ratio` says otherwise.
fn gateway_ticket(
    pot: &SigningKey,
    to: IdentityKey,
    commitment: [u8; 32],
    face_value: u64,
    win_ratio: u64,
    nonce: u64,
) -> Ticket {
    let now = unix_now();
    let mut n = [0u8; 16];
    n[..8].copy_from_slice(&nonce.to_be_bytes());
    Ticket::sign(
        TicketFields {
            recipient: to,
            face_value,
            win_ratio,
            nonce: n,
            issued: now,
            expiry: now + 7_200,
            commitment,
        },
        pot,
    )
}

/// Issue 13's first attack: a client paying from an unfunded pot with sure-win tickets of
/// face value `u64::MAX` (refused: above the cap), or of the largest face value accepted
/// (accepted while the pot is looked up, its credit held, then refused: the ledger knows no
/// such pot), gets no more frames than a new tab's grace and is cut off; the gateway holds
/// one lookup per junk pot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfunded_pot_gets_only_the_grace_and_is_cut_off() {
    use murmur_protocol::control::Control;
    use murmur_protocol::link::{LinkSecret, session_address};
    let dir = TempDir::new().unwrap();
    let (url, ledger_id, _client, ledger_stop) = http_ledger(dir.path()).await;
    let (node, commitment, stop) = paid_gateway(dir.path(), &url, ledger_id, "").await;
    let (addr, gateway_key) = (node.client_addr().unwrap(), node.link_public());
    let gw = node.gateway().unwrap().clone();
    let me = id(&relay_key());
    let max_face = node.payments().unwrap().params().max_face_value;
    let grace = TabConfig::for_price(1);
    let grace_frames = (grace.initial_credit + grace.max_arrears) / grace.price;

    for (face, what) in [(u64::MAX, "face u64::MAX"), (max_face, "face at the cap")] {
        let pot = SigningKey::generate(&mut ChaCha20Rng::seed_from_u64(face % 1000));
        let key = LinkSecret::generate(&mut rand::rng());
        let (controls, closed) = client_session(addr, gateway_key, &key, 1_000, |i| {
            (i % 4 == 0).then(|| gateway_ticket(&pot, me, commitment, face, u64::MAX, i as u64))
        })
        .await;
        let stats = gw.tab_stats(&session_address(&key.public())).unwrap();
        println!(
            "unfunded pot, {what}: {} frames served (grace {grace_frames}), {} refused, {} \
             tickets credited, {} refused; cut off: {}",
            stats.frames,
            stats.unpaid_frames,
            stats.payments,
            stats.refused_tickets,
            controls.contains(&Control::Cutoff)
        );
        assert!(controls.contains(&Control::Cutoff), "{what}: {controls:?}");
        assert!(closed, "{what}: not disconnected");
        assert!(stats.frames <= grace_frames + 1, "{what}: {stats:?}");
        assert_eq!(stats.payments, 0, "{what}: a junk ticket was credited");
    }
    // The sure winners accepted from the unknown pot were settled unpaid, and counted.
    let p = node.payments().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !p.pending_winners().unwrap().is_empty() || p.settled().unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "junk winners still pending"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let settled = p.settled().unwrap();
    assert!(
        settled
            .iter()
            .all(|s| s.outcome == "pot_unknown" && s.paid == 0)
    );
    // At most the allowance of the one pot that got past the face-value cap.
    assert!(settled.len() <= 8, "{}", settled.len());
    println!(
        "junk winners settled unpaid as pot_unknown: {}",
        settled.len()
    );
    stop.cancel();
    node.join().await;
    ledger_stop.cancel();
}

/// A client that reconnects 100 times with its key (as Murmur's client does) gets one grace
/// in all; one that uses 100 fresh keys from the same address gets `grace_per_address` (2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_clients_get_no_more_free_frames_than_their_address_grace() {
    use murmur_protocol::link::{LinkSecret, session_address};
    let dir = TempDir::new().unwrap();
    let (url, ledger_id, _client, ledger_stop) = http_ledger(dir.path()).await;
    let (node, _commitment, stop) = paid_gateway(dir.path(), &url, ledger_id, "").await;
    let (addr, gateway_key) = (node.client_addr().unwrap(), node.link_public());
    let gw = node.gateway().unwrap().clone();
    let grace = TabConfig::for_price(1);
    let grace_frames = (grace.initial_credit + grace.max_arrears) / grace.price;

    let key = LinkSecret::generate(&mut rand::rng());
    for _ in 0..100 {
        client_session(addr, gateway_key, &key, 40, |_| None).await;
    }
    let one_key = gw
        .tab_stats(&session_address(&key.public()))
        .unwrap()
        .frames;
    let mut fresh = 0;
    for _ in 0..100 {
        let key = LinkSecret::generate(&mut rand::rng());
        client_session(addr, gateway_key, &key, 40, |_| None).await;
        fresh += gw
            .tab_stats(&session_address(&key.public()))
            .unwrap()
            .frames;
    }
    println!(
        "100 reconnects with one key: {one_key} free frames; 100 fresh keys from one address: \
         {fresh} (one grace: {grace_frames} frames, 2 per address per window)"
    );
    assert!(one_key <= grace_frames + 1, "{one_key}");
    // The first key used one of the address's two graces.
    assert!(fresh <= grace_frames + 1, "{fresh}");
    stop.cancel();
    node.join().await;
    ledger_stop.cancel();
}

/// Issue 13's crowding attack: 100,000 junk tickets (all sure winners) from 10,000 fresh,
/// unfunded keys at one relay while an honest payer pays: every honest winner is accepted,
/// stored and redeemed; the junk takes no more than its pools, and its winners are settled
/// unpaid (counted) as soon as the ledger says their pots do not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_from_fresh_keys_does_not_crowd_out_an_honest_payers_winners() {
    let dir = TempDir::new().unwrap();
    // The relay redeems its 1,000 winners at once: above the ledger's default per-key rate
    // (20/s, tested in the ledger's flood test), which would only spread them over 50 s.
    let ledger = ledger(dir.path())
        .await
        .with_rate_limits(murmur_ledger::guard::RateLimits {
            per_key_per_second: 100_000,
            per_key_burst: 100_000,
            writes_per_second: 100_000,
            write_burst: 100_000,
            ..Default::default()
        });
    let params = PaymentsParams {
        unverified_tickets_per_pot: 8,
        max_tickets_per_epoch: 200_000,
        max_unverified_tickets_per_epoch: 50_000,
        max_pots: 2_000,
        max_pot_lookups: 256,
        max_pending_winners: 5_000,
        max_unverified_winners: 1_000,
        max_pending_winners_per_pot: 5_000,
        max_tickets_per_pot_per_epoch: 200_000,
        ..params()
    };
    let r = Relay::open(dir.path(), params);
    let p = &r.payments;
    let honest = payer(0);
    let t = std::time::Instant::now();
    let junk_keys: Vec<SigningKey> = (0..10_000u32)
        .map(|i| {
            let mut seed = [0u8; 32];
            seed[..4].copy_from_slice(&i.to_be_bytes());
            seed[31] = 0xee;
            SigningKey::from_bytes(&seed)
        })
        .collect();
    let (mut honest_sent, mut honest_won, mut junk_accepted, mut junk_refused) = (0, 0, 0, 0);
    let mut refusals: HashMap<&'static str, u64> = HashMap::new();
    let mut nonce = 0u16;
    for round in 0..10u16 {
        for (k, key) in junk_keys.iter().enumerate() {
            let ticket = r.ticket(key, round, |_| {});
            match p.accept(&ticket, r.epoch, unix_now()) {
                Ok(_) => junk_accepted += 1,
                Err(e) => {
                    junk_refused += 1;
                    *refusals.entry(e.label()).or_default() += 1;
                }
            }
            // The honest payer pays a winner every 100 junk tickets.
            if k % 100 == 0 {
                nonce += 1;
                honest_sent += 1;
                let a = p.accept(&r.winner(&honest, nonce), r.epoch, unix_now());
                assert!(
                    matches!(a, Ok(a) if a.winner),
                    "an honest winner was refused: {a:?}"
                );
                honest_won += 1;
            }
            // The refresher answers lookups as they come.
            if k % 500 == 0 {
                p.flush().unwrap();
                p.refresh_pots(&ledger, unix_now()).await;
            }
        }
    }
    p.flush().unwrap();
    p.refresh_pots(&ledger, unix_now()).await;
    let pending = p.pending_winners().unwrap();
    let honest_pending = pending
        .iter()
        .filter(|w| w.ticket.pot == id(&honest))
        .count();
    println!(
        "100,000 junk tickets from 10,000 keys in {:?}: {junk_accepted} accepted (within the \
         pots' allowance), {junk_refused} refused {refusals:?}; honest winners {honest_won}/\
         {honest_sent}, pending {honest_pending}, junk pending {}",
        t.elapsed(),
        pending.len() - honest_pending
    );
    assert_eq!(honest_pending, honest_sent);
    assert_eq!(pending.len(), honest_pending, "junk winners still pending");
    let junk_settled = p
        .settled()
        .unwrap()
        .iter()
        .filter(|s| s.outcome == "pot_unknown")
        .count();
    assert_eq!(
        junk_settled, junk_accepted,
        "every accepted junk ticket won and was settled"
    );
    // Each junk key got at most its allowance while its pot was looked up.
    assert!(junk_accepted <= 8 * 10_000);

    // The honest winners are all redeemed once the epoch retires.
    r.retire();
    let relay = relay_key();
    let mut paid = 0;
    for _ in 0..10 {
        let round = p.redeem_due(&ledger, &relay, unix_now()).await.unwrap();
        paid += round.paid;
        if p.pending_winners().unwrap().is_empty() {
            break;
        }
    }
    println!("honest winners redeemed: {paid}");
    assert_eq!(paid, honest_sent);
    let a = ledger.audit().unwrap();
    assert!(a.conserved(), "{a:?}");
}

const GATEWAY_CRASH_CHILD: &str = "MURMUR_TEST_GATEWAY_CRASH_DIR";

/// In a child process: a paying gateway credits a client's sure-winning ticket, and the
/// process aborts at once (no destructor runs, as under `kill -9`).
async fn gateway_crash_child(dir: &Path) -> ! {
    use murmur_protocol::link::{LinkSecret, session_address};
    let (url, ledger_id, _client, _ledger_stop) = http_ledger(dir).await;
    let (node, commitment, _stop) = paid_gateway(dir, &url, ledger_id, "").await;
    let (addr, gateway_key) = (node.client_addr().unwrap(), node.link_public());
    let gw = node.gateway().unwrap().clone();
    let key = LinkSecret::generate(&mut rand::rng());
    let address = session_address(&key.public());
    let me = id(&relay_key());
    // A sure winner of face FACE: its credit is held until the pot is looked up, and given
    // once the winner is on disk.
    let pot = payer(0);
    let _client = tokio::spawn(async move {
        client_session(addr, gateway_key, &key, 64, |i| {
            (i == 0).then(|| gateway_ticket(&pot, me, commitment, FACE, u64::MAX, 2))
        })
        .await
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let paid = gw.tab_stats(&address).map_or(0, |s| s.payments);
        if paid >= 1 {
            std::process::abort();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never credited: {paid}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Issue 21: a gateway killed right after it credited a client's winning ticket redeems the
/// ticket after a restart (the winner was on disk before the credit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_after_crediting_a_winner_redeems_it_after_restart() {
    if let Some(dir) = std::env::var_os(GATEWAY_CRASH_CHILD) {
        gateway_crash_child(Path::new(&dir)).await;
    }
    let dir = TempDir::new().unwrap();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "payments::tests::a_gateway_killed_after_crediting_a_winner_redeems_it_after_restart",
            "--test-threads=1",
        ])
        .env(GATEWAY_CRASH_CHILD, dir.path())
        .status()
        .unwrap();
    assert!(!status.success(), "the child crashes on purpose");

    // The gateway's state after the crash: the credited winner is pending.
    let state = dir.path().join("state");
    let keys = Arc::new(KeyRing::open(&state, SIZING).unwrap());
    let epoch_length = crate::Config::parse(
        "version = 1\n[relay]\nfamily = \"op\"\nroles = [\"gateway\"]\n",
        dir.path().to_path_buf(),
    )
    .unwrap()
    .directory
    .epoch_length
    .as_secs();
    let p = Arc::new(
        Payments::open(
            &state,
            PaymentsParams {
                epoch_length_s: epoch_length,
                ..params()
            },
            keys.clone(),
        )
        .unwrap(),
    );
    let pending = p.pending_winners().unwrap();
    println!("after kill: {} winner(s) pending", pending.len());
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].ticket.face_value, FACE);

    // The ledger comes back (same database), the key epoch retires, the winner is paid.
    let (_url, _ledger_id, client, ledger_stop) = http_ledger(dir.path()).await;
    let later = pending[0].epoch + 5;
    keys.rotate(&mut ChaCha20Rng::seed_from_u64(9), later, later)
        .unwrap();
    let round = p
        .redeem_due(&client, &relay_key(), unix_now())
        .await
        .unwrap();
    println!("after restart: {round:?}");
    assert_eq!(round.paid, 1, "{round:?}");
    assert_eq!(
        client.account(id(&relay_key())).await.unwrap().balance,
        FACE
    );
    ledger_stop.cancel();
}

/// A relay that redeems on a chain (Anvil, the real contract): a ticket without its pot
/// owner's co-signature is refused `cosignature_missing`, one co-signed by another key or
/// for other terms `cosignature_not_owner`, each counted; a co-signed ticket beside its
/// Ed25519 signature (a gateway's) and one whose slot carries the co-signature in the
/// signature's place (a hop's) are accepted, stored with their co-signatures, and redeemed
/// on the chain once their epoch retires, with a fresh settlement as after a restart.
#[cfg(feature = "chain")]
#[tokio::test]
async fn on_a_chain_tickets_need_their_pot_owners_cosignature_and_winners_are_redeemed_there() {
    use murmur_chain::anvil::{LocalChain, ensure_installed};
    use murmur_chain::{ChainConfig, ChainSettlement, wallet_of};
    use murmur_protocol::envelope::SlotTicket;

    if !ensure_installed() {
        eprintln!(
            "SKIPPED: no Anvil binary (chain/contract/build.sh --tools could not install it)"
        );
        return;
    }
    let (payer_key, stranger) = (payer(0), payer(1));
    let relay = relay_key();
    let eth = 1u64 << 40;
    let chain = LocalChain::start(
        0,
        3600,
        &[
            (wallet_of(&payer_key).address(), eth),
            (wallet_of(&relay).address(), eth),
        ],
    )
    .await
    .unwrap();
    let config = ChainConfig {
        gas_price_wei: Some(0),
        ..ChainConfig::new(chain.node.url(), chain.contract)
    };
    let payer_side = ChainSettlement::connect(config.clone(), std::slice::from_ref(&payer_key))
        .await
        .unwrap();
    payer_side
        .fund(Signed::new(
            Fund {
                pot: id(&payer_key),
                balance: 1 << 20,
                escrow: 1 << 22,
            },
            &payer_key,
            unix_now(),
        ))
        .await
        .unwrap();
    // Where the relay's descriptor says it is paid.
    let paid_at = crate::chain::address_of(&relay);
    let cosigner = payer_side.ticket_cosigner(&payer_key);
    let impostor = payer_side.ticket_cosigner(&stranger);

    let dir = TempDir::new().unwrap();
    let relay_side = Arc::new(
        ChainSettlement::connect(config.clone(), std::slice::from_ref(&relay))
            .await
            .unwrap(),
    );
    let r = Relay::open_with(dir.path(), params(), Some(relay_side.clone()));
    let p = r.payments.clone();
    assert!(p.on_chain());
    let now = unix_now();
    let (rec, handle) = recorder();
    let cosigned =
        |t: &Ticket| TicketSignatures::WithCoSignature(cosigner.cosign(t, &paid_at).unwrap());

    // Before the pot is read its owner is not known: a co-signed ticket is accepted within
    // the pot's allowance (the contract checks the co-signature again before paying).
    let first = r.winner(&payer_key, 1);
    metrics::with_local_recorder(&rec, || {
        p.accept_signed(&first, cosigned(&first), r.epoch, now)
            .unwrap();
    });
    assert_eq!(p.refresh_pots(relay_side.as_ref(), now).await, 1);

    let plain = r.winner(&payer_key, 2);
    let by_stranger = r.winner(&payer_key, 3);
    let stranger_cosig = impostor.cosign(&by_stranger, &paid_at).unwrap();
    // Co-signed for a face value of FACE, presented with another (its Ed25519 signature
    // re-made, as a payer could): the co-signature is for other terms.
    let honest = r.winner(&payer_key, 4);
    let raised = r.ticket(&payer_key, 4, |f| f.face_value = FACE + 1);
    // A hop's slot: the co-signature in the signature's place.
    let hop = r.winner(&payer_key, 5);
    let slot = SlotTicket::cosigned(&hop, cosigner.cosign(&hop, &paid_at).unwrap()).unwrap();
    let hop_ticket = slot.into_ticket(id(&relay), r.commitment(r.epoch));
    assert_ne!(hop_ticket.signature, hop.signature);
    let mut forged = r.winner(&payer_key, 6);
    let forged_cosig = cosigner.cosign(&forged, &paid_at).unwrap();
    forged.signature[0] ^= 1;

    metrics::with_local_recorder(&rec, || {
        assert_eq!(
            p.accept_signed(&plain, TicketSignatures::Ed25519, r.epoch, now),
            Err(PaymentRefusal::CoSignatureMissing)
        );
        assert_eq!(
            p.accept(&plain, r.epoch, now),
            Err(PaymentRefusal::CoSignatureMissing)
        );
        assert_eq!(
            p.accept_signed(
                &by_stranger,
                TicketSignatures::WithCoSignature(stranger_cosig),
                r.epoch,
                now
            ),
            Err(PaymentRefusal::CoSignatureNotOwner)
        );
        assert_eq!(
            p.accept_signed(
                &raised,
                TicketSignatures::WithCoSignature(cosigner.cosign(&honest, &paid_at).unwrap()),
                r.epoch,
                now
            ),
            Err(PaymentRefusal::CoSignatureNotOwner)
        );
        assert_eq!(
            p.accept_signed(
                &hop_ticket,
                TicketSignatures::CoSignatureOnly(CoSignature([5; 64])),
                r.epoch,
                now
            ),
            Err(PaymentRefusal::CoSignatureNotOwner)
        );
        assert_eq!(
            p.accept_signed(
                &forged,
                TicketSignatures::WithCoSignature(forged_cosig),
                r.epoch,
                now
            ),
            Err(PaymentRefusal::Forged)
        );
        let a = p
            .accept_signed(&hop_ticket, TicketSignatures::of_slot(&slot), r.epoch, now)
            .unwrap();
        assert!(a.winner && a.pot_verified);
    });
    let text = handle.render();
    assert_eq!(
        metric(&text, m::TICKETS_REFUSED, "reason=\"cosignature_missing\""),
        2
    );
    assert_eq!(
        metric(
            &text,
            m::TICKETS_REFUSED,
            "reason=\"cosignature_not_owner\""
        ),
        3
    );
    assert_eq!(p.flush().unwrap(), 2);
    let stored = p.pending_winners().unwrap();
    assert_eq!(stored.len(), 2);
    assert!(stored.iter().all(|w| w.cosignature.is_some()));

    // Redeemed on the chain once the epoch retires, by a settlement that holds none of the
    // co-signatures yet (as after a restart): the store hands them over.
    r.retire();
    drop((p, r));
    let fresh = Arc::new(
        ChainSettlement::connect(config, std::slice::from_ref(&relay))
            .await
            .unwrap(),
    );
    let r = Relay::open_with(dir.path(), params(), Some(fresh.clone()));
    let p = r.payments.clone();
    let before = fresh.account(id(&relay)).await.unwrap().balance;
    let round = p
        .redeem_due(fresh.as_ref(), &relay, unix_now())
        .await
        .unwrap();
    assert_eq!(round.paid, 2, "{round:?}");
    assert_eq!(round.paid_value, 2 * FACE);
    assert_eq!(
        fresh.account(id(&relay)).await.unwrap().balance,
        before + 2 * FACE
    );
    assert!(p.pending_winners().unwrap().is_empty());
    // Both in one `redeemBatch` transaction, which shares its base cost and the transfer.
    let onchain = fresh.redemptions().await.unwrap();
    assert_eq!(onchain.len(), 2, "{onchain:?}");
    assert_eq!(
        onchain[0].transaction, onchain[1].transaction,
        "{onchain:?}"
    );
    assert!(onchain.iter().all(|r| r.recipient == paid_at));
    // Redeemed once: the contract refuses the same tickets again.
    for t in [&first, &hop_ticket] {
        let again = fresh
            .redeem(Signed::new(
                Redeem {
                    ticket: *t,
                    reveal: [0; 32],
                },
                &relay,
                unix_now(),
            ))
            .await;
        assert!(again.is_err());
    }
    drop(chain);
}
