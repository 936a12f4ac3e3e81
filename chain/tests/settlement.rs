//! One suite, two backends: every case runs through the `Settlement` trait against the
//! embedded ledger (redb) and against `MurmurLottery` on a local Anvil node. The refusals and
//! the conservation of money must be the same on both.
//!
//! The chain cases need Anvil: `chain/contract/build.sh --tools` installs it (pinned, from
//! npm); the harness runs that script itself if the binary is missing, and skips the chain
//! case with a message only if it still cannot be had.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use alloy::network::EthereumWallet;
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::{Provider, ProviderBuilder};
use ed25519_dalek::SigningKey;
use murmur_chain::anvil::{self, Anvil};
use murmur_chain::{ChainConfig, ChainSettlement, CoSignature, MurmurLottery, wallet_of};
use murmur_ledger::request::{Fund, Redeem, Signed, Warn, Withdraw};
use murmur_ledger::{Ledger, Params, Refusal, Settlement, unix_now};
use murmur_protocol::directory::IdentityKey;
use murmur_protocol::ticket::{Ticket, TicketFields, commitment_of};

/// Seconds between a warning and its withdrawal, on both backends.
const NOTICE_S: u64 = 5;
const PAYER: u8 = 1;
const RELAY: u8 = 2;
const OTHER_RELAY: u8 = 3;
/// A key whose pot nobody funds.
const NOBODY: u8 = 9;
/// A key with money of its own, which funds the payer's pot.
const FRIEND: u8 = 4;
const FRIEND_GENESIS: u64 = 5_000;
const GENESIS: u64 = 1_000_000;
/// The relay's reveal for its commitment.
const REVEAL: [u8; 32] = [7; 32];

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn id(seed: u8) -> IdentityKey {
    IdentityKey::of(&key(seed))
}

/// Every key the suite uses, and what it holds at the start.
fn genesis() -> Vec<(u8, u64)> {
    vec![
        (PAYER, GENESIS),
        (RELAY, 0),
        (OTHER_RELAY, 0),
        (NOBODY, 0),
        (FRIEND, FRIEND_GENESIS),
    ]
}

trait Harness: Sized {
    type S: Settlement;
    fn s(&self) -> &Self::S;
    /// What a payer hands the recipient with a ticket besides the ticket itself, and the
    /// recipient's check of it.
    async fn hand_over(&self, ticket: &Ticket, payer: &SigningKey) -> murmur_ledger::Result<()>;
    /// Escrow burned so far.
    async fn burned(&self) -> u64;
    /// Waits `secs` by this backend's clock.
    async fn let_pass(&self, secs: u64) {
        tokio::time::sleep(Duration::from_secs(secs)).await;
    }
}

struct Embedded {
    ledger: Ledger,
    _dir: tempfile::TempDir,
}

impl Embedded {
    fn new() -> Embedded {
        let dir = tempfile::tempdir().unwrap();
        let genesis: Vec<_> = genesis()
            .into_iter()
            .filter(|&(_, v)| v > 0)
            .map(|(k, v)| (id(k), v))
            .collect();
        let params = Params {
            notice_period_s: NOTICE_S,
            request_window_s: 60,
        };
        let ledger = Ledger::open(&dir.path().join("l.redb"), params, &genesis).unwrap();
        Embedded { ledger, _dir: dir }
    }
}

impl Harness for Embedded {
    type S = Ledger;
    fn s(&self) -> &Ledger {
        &self.ledger
    }
    async fn hand_over(&self, _ticket: &Ticket, _payer: &SigningKey) -> murmur_ledger::Result<()> {
        Ok(())
    }
    async fn burned(&self) -> u64 {
        self.ledger.audit().unwrap().burned
    }
}

struct Chain {
    s: ChainSettlement,
    url: String,
    contract: Address,
    node: Anvil,
}

/// Anvil's first development account (its well-known key), which deploys the contract.
const ANVIL_DEV_KEY: &str = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";

impl Chain {
    async fn new() -> Option<Chain> {
        if anvil::binary().is_none() {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/contract/build.sh");
            let status = std::process::Command::new("bash")
                .args([script, "--tools"])
                .status();
            eprintln!("anvil missing: ran {script} --tools: {status:?}");
        }
        if anvil::binary().is_none() {
            eprintln!(
                "SKIPPED: no Anvil binary (chain/contract/build.sh --tools could not install it)"
            );
            return None;
        }
        let node = Anvil::start().unwrap();
        let deployer = ANVIL_DEV_KEY.parse().unwrap();
        let contract = ChainSettlement::deploy(&node.url(), deployer, NOTICE_S)
            .await
            .unwrap();
        let keys: Vec<_> = genesis().into_iter().map(|(k, _)| key(k)).collect();
        let provider = ProviderBuilder::new().connect_http(node.url().parse().unwrap());
        for (k, units) in genesis() {
            let wei = U256::from(units) * U256::from(1_000_000_000u64);
            let () = provider
                .raw_request(
                    "anvil_setBalance".into(),
                    (wallet_of(&key(k)).address(), wei),
                )
                .await
                .unwrap();
        }
        let config = ChainConfig {
            gas_price_wei: Some(0),
            ..ChainConfig::new(node.url(), contract)
        };
        let s = ChainSettlement::connect(config, &keys).await.unwrap();
        Some(Chain {
            s,
            url: node.url(),
            contract,
            node,
        })
    }
}

impl Harness for Chain {
    type S = ChainSettlement;
    fn s(&self) -> &ChainSettlement {
        &self.s
    }
    async fn hand_over(&self, ticket: &Ticket, payer: &SigningKey) -> murmur_ledger::Result<()> {
        let recipient = self.s.address_of(&ticket.recipient).unwrap();
        let cosignature = self.s.cosign(ticket, payer, recipient).unwrap();
        self.s.accept_cosignature(ticket, cosignature).await
    }
    async fn burned(&self) -> u64 {
        self.s.burned().await.unwrap()
    }
    /// The chain's clock is its latest block's timestamp, and an idle Anvil mines no block:
    /// one is mined after the wait, as a live chain would have.
    async fn let_pass(&self, secs: u64) {
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let provider = ProviderBuilder::new().connect_http(self.url.parse().unwrap());
        let _: serde_json::Value = provider.raw_request("evm_mine".into(), ()).await.unwrap();
    }
}

fn refusal<T: std::fmt::Debug>(r: murmur_ledger::Result<T>) -> Refusal {
    match r {
        Ok(v) => panic!("expected a refusal, got {v:?}"),
        Err(e) => e.refusal().unwrap_or_else(|| panic!("not a refusal: {e}")),
    }
}

fn fields(recipient: u8, face_value: u64, nonce: u8) -> TicketFields {
    let now = unix_now();
    TicketFields {
        recipient: id(recipient),
        face_value,
        win_ratio: u64::MAX,
        nonce: [nonce; 16],
        issued: now,
        expiry: now + 600,
        commitment: commitment_of(&REVEAL),
    }
}

/// A ticket from `payer`'s pot, handed to its recipient.
async fn issue<H: Harness>(h: &H, payer: u8, fields: TicketFields) -> Ticket {
    let t = Ticket::sign(fields, &key(payer));
    h.hand_over(&t, &key(payer)).await.unwrap();
    t
}

fn redeem(t: Ticket, by: u8) -> Signed<Redeem> {
    Signed::new(
        Redeem {
            ticket: t,
            reveal: REVEAL,
        },
        &key(by),
        unix_now(),
    )
}

/// `by` funds the payer's pot.
fn funding(by: &SigningKey, balance: u64, escrow: u64) -> Signed<Fund> {
    let pot = id(PAYER);
    Signed::new(
        Fund {
            pot,
            balance,
            escrow,
        },
        by,
        unix_now(),
    )
}

async fn fund<H: Harness>(h: &H, balance: u64, escrow: u64) {
    let req = funding(&key(PAYER), balance, escrow);
    let t = h.s().fund(req).await.unwrap();
    assert_eq!((t.pot.balance, t.pot.escrow), (balance, escrow));
}

/// Accounts, pots and burned escrow: (each account, each pot's total, burned).
async fn holdings<H: Harness>(h: &H) -> (Vec<u64>, Vec<u64>, u64) {
    let mut accounts = Vec::new();
    let mut pots = Vec::new();
    for (k, _) in genesis() {
        accounts.push(h.s().account(id(k)).await.unwrap().balance);
        pots.push(match h.s().pot(id(k)).await {
            Ok(p) => p.balance + p.escrow,
            Err(e) => {
                assert_eq!(e.refusal(), Some(Refusal::UnknownPot));
                0
            }
        });
    }
    (accounts, pots, h.burned().await)
}

async fn assert_conserved<H: Harness>(h: &H) {
    let (accounts, pots, burned) = holdings(h).await;
    let total: u64 = accounts.iter().chain(&pots).sum::<u64>() + burned;
    let genesis: u64 = genesis().iter().map(|&(_, v)| v).sum();
    assert_eq!(
        total, genesis,
        "accounts {accounts:?} pots {pots:?} burned {burned}"
    );
}

/// Redeeming `req` is refused with `expected`, and no account, pot or burned total changes.
async fn refused<H: Harness>(h: &H, req: Signed<Redeem>, expected: Refusal) {
    let before = holdings(h).await;
    assert_eq!(refusal(h.s().redeem(req).await), expected);
    assert_eq!(holdings(h).await, before);
}

async fn redeem_once<H: Harness>(h: &H) {
    fund(h, 300, 400).await;
    let t = issue(h, PAYER, fields(RELAY, 100, 1)).await;
    let r = h.s().redeem(redeem(t, RELAY)).await.unwrap();
    assert_eq!((r.paid, r.burned, r.account.balance), (100, 0, 100));
    assert_eq!((r.pot.balance, r.pot.escrow), (200, 400));
    assert_eq!(
        refusal(h.s().redeem(redeem(t, RELAY)).await),
        Refusal::AlreadyRedeemed
    );
    assert_eq!(h.s().account(id(RELAY)).await.unwrap().balance, 100);
    assert_conserved(h).await;
}

async fn wrong_recipient<H: Harness>(h: &H) {
    fund(h, 300, 400).await;
    let t = issue(h, PAYER, fields(RELAY, 100, 1)).await;
    refused(h, redeem(t, OTHER_RELAY), Refusal::WrongRecipient).await;
}

async fn expired<H: Harness>(h: &H) {
    fund(h, 300, 400).await;
    let now = unix_now();
    let t = issue(
        h,
        PAYER,
        TicketFields {
            issued: now - 700,
            expiry: now - 100,
            ..fields(RELAY, 100, 1)
        },
    )
    .await;
    refused(h, redeem(t, RELAY), Refusal::TicketExpired).await;
}

async fn forged<H: Harness>(h: &H) {
    fund(h, 300, 400).await;
    let mut t = issue(h, PAYER, fields(RELAY, 100, 1)).await;
    t.signature[5] ^= 1;
    refused(h, redeem(t, RELAY), Refusal::ForgedTicket).await;
    // a ticket the payer never signed, for more than it did
    let honest = Ticket::sign(fields(RELAY, 100, 2), &key(PAYER));
    let mut raised = honest;
    raised.face_value = 300;
    h.hand_over(&honest, &key(PAYER)).await.unwrap();
    refused(h, redeem(raised, RELAY), Refusal::ForgedTicket).await;
}

async fn unknown_pot<H: Harness>(h: &H) {
    let t = Ticket::sign(fields(RELAY, 100, 1), &key(NOBODY));
    // the chain's relay refuses the co-signature of a pot that does not exist
    if let Err(e) = h.hand_over(&t, &key(NOBODY)).await {
        assert_eq!(e.refusal(), Some(Refusal::UnknownPot));
    }
    assert_eq!(
        refusal(h.s().redeem(redeem(t, RELAY)).await),
        Refusal::UnknownPot
    );
    assert_eq!(refusal(h.s().pot(id(NOBODY)).await), Refusal::UnknownPot);
}

async fn reveal_and_loss<H: Harness>(h: &H) {
    fund(h, 300, 400).await;
    let t = issue(h, PAYER, fields(RELAY, 100, 1)).await;
    let mut wrong = redeem(t, RELAY);
    wrong.op.reveal = [8; 32];
    let wrong = Signed::new(wrong.op, &key(RELAY), unix_now());
    refused(h, wrong, Refusal::RevealMismatch).await;
    let loser = issue(
        h,
        PAYER,
        TicketFields {
            win_ratio: 0,
            ..fields(RELAY, 100, 2)
        },
    )
    .await;
    refused(h, redeem(loser, RELAY), Refusal::NotAWinner).await;
}

async fn overdraft_burns_escrow<H: Harness>(h: &H) {
    fund(h, 50, 300).await;
    let t = issue(h, PAYER, fields(RELAY, 100, 1)).await;
    let r = h.s().redeem(redeem(t, RELAY)).await.unwrap();
    assert_eq!((r.paid, r.burned), (50, 300));
    assert_eq!((r.pot.balance, r.pot.escrow), (0, 0));
    assert_eq!(h.burned().await, 300);
    // an empty pot pays nothing more
    let t = issue(h, PAYER, fields(RELAY, 100, 2)).await;
    let r = h.s().redeem(redeem(t, RELAY)).await.unwrap();
    assert_eq!((r.paid, r.burned), (0, 0));
    assert_conserved(h).await;
}

async fn early_withdrawal_refused<H: Harness>(h: &H) {
    fund(h, 300, 400).await;
    let payer = key(PAYER);
    let withdraw = |amount| Signed::new(Withdraw { amount }, &payer, unix_now());
    let before = holdings(h).await;
    assert_eq!(
        refusal(h.s().withdraw(withdraw(100)).await),
        Refusal::NotWarned
    );
    assert_eq!(
        refusal(
            h.s()
                .warn(Signed::new(Warn { amount: 800 }, &payer, unix_now()))
                .await
        ),
        Refusal::InsufficientFunds
    );
    let pot = h
        .s()
        .warn(Signed::new(Warn { amount: 500 }, &payer, unix_now()))
        .await
        .unwrap();
    assert_eq!(pot.warned, 500);
    assert_eq!(
        refusal(h.s().withdraw(withdraw(500)).await),
        Refusal::NoticeNotOver
    );
    assert_eq!(holdings(h).await, before);
    h.let_pass(NOTICE_S + 1).await;
    assert_eq!(
        refusal(h.s().withdraw(withdraw(600)).await),
        Refusal::ExceedsWarned
    );
    let t = h.s().withdraw(withdraw(500)).await.unwrap();
    // the balance first, then the escrow
    assert_eq!((t.pot.balance, t.pot.escrow, t.pot.warned), (0, 200, 0));
    assert_eq!(t.account.balance, GENESIS - 200);
    assert_conserved(h).await;
}

async fn money_conserved<H: Harness>(h: &H) {
    let too_much = funding(&key(PAYER), GENESIS, 1);
    assert_eq!(
        refusal(h.s().fund(too_much).await),
        Refusal::InsufficientFunds
    );
    fund(h, 250, 300).await;
    // one nonce for two relays is two tickets, each paid once; the second overdraws
    for (relay, face, paid, burned) in [(RELAY, 200, 200, 0), (OTHER_RELAY, 200, 50, 300)] {
        let t = issue(h, PAYER, fields(relay, face, 9)).await;
        let r = h.s().redeem(redeem(t, relay)).await.unwrap();
        assert_eq!((r.paid, r.burned), (paid, burned));
        assert_conserved(h).await;
    }
    let (accounts, pots, burned) = holdings(h).await;
    assert_eq!(accounts, [GENESIS - 550, 200, 50, 0, FRIEND_GENESIS]);
    assert_eq!(pots, [0, 0, 0, 0, 0]);
    assert_eq!(burned, 300);
}

async fn replayed_and_stale_requests<H: Harness>(h: &H) {
    let payer = key(PAYER);
    let req = funding(&payer, 300, 400);
    h.s().fund(req.clone()).await.unwrap();
    let before = holdings(h).await;
    assert_eq!(refusal(h.s().fund(req).await), Refusal::ReplayedRequest);
    let stale = Signed::new(Warn { amount: 1 }, &payer, unix_now() - 1_000);
    assert_eq!(refusal(h.s().warn(stale).await), Refusal::StaleRequest);
    let mut forged = Signed::new(Warn { amount: 1 }, &payer, unix_now());
    forged.signature[0] ^= 1;
    assert_eq!(refusal(h.s().warn(forged).await), Refusal::BadSignature);
    // a refused request is not remembered: sent again, it is decided again
    let too_much = Signed::new(Warn { amount: 701 }, &payer, unix_now());
    for _ in 0..2 {
        assert_eq!(
            refusal(h.s().warn(too_much.clone()).await),
            Refusal::InsufficientFunds
        );
    }
    assert_eq!(holdings(h).await, before);
}

async fn anyone_funds_a_pot_only_its_key_withdraws<H: Harness>(h: &H) {
    fund(h, 300, 400).await;
    let friend = key(FRIEND);
    let gift = funding(&friend, 1_000, 2_000);
    let t = h.s().fund(gift).await.unwrap();
    assert_eq!((t.pot.balance, t.pot.escrow), (1_300, 2_400));
    assert_eq!(t.account.balance, FRIEND_GENESIS - 3_000);
    // the friend has no pot of its own to warn about or withdraw from
    let warn = Signed::new(Warn { amount: 100 }, &friend, unix_now());
    assert_eq!(refusal(h.s().warn(warn).await), Refusal::UnknownPot);
    let withdraw = Signed::new(Withdraw { amount: 100 }, &friend, unix_now());
    assert_eq!(refusal(h.s().withdraw(withdraw).await), Refusal::UnknownPot);
    assert_eq!(h.s().pot(id(PAYER)).await.unwrap().warned, 0);
    assert_conserved(h).await;
}

/// Several winners at once through `redeem_all` (on the chain: one `redeemBatch` per
/// recipient): each paid once, a second request for a paid ticket refused, every result in
/// its request's place.
async fn redeem_all_pays_each_once<H: Harness>(h: &H) {
    fund(h, 1_000, 2_000).await;
    let mut reqs = Vec::new();
    for nonce in 0..6 {
        let relay = if nonce % 3 == 0 { OTHER_RELAY } else { RELAY };
        reqs.push(redeem(
            issue(h, PAYER, fields(relay, 10 + u64::from(nonce), nonce)).await,
            relay,
        ));
    }
    // the same ticket again, in a request of its own
    reqs.push(Signed::new(reqs[1].op, &key(RELAY), unix_now()));
    let results = h.s().redeem_all(reqs.clone()).await;
    assert_eq!(results.len(), reqs.len());
    for (i, (req, result)) in reqs.iter().zip(&results).take(6).enumerate() {
        if i == 1 {
            continue;
        }
        let r = result.as_ref().unwrap();
        assert_eq!((r.paid, r.burned), (req.op.ticket.face_value, 0));
    }
    // one of the ticket's two requests is paid, the other refused
    let twice: Vec<_> = [&results[1], &results[6]]
        .iter()
        .map(|r| r.as_ref().err().and_then(|e| e.refusal()))
        .collect();
    assert!(
        twice == [None, Some(Refusal::AlreadyRedeemed)]
            || twice == [Some(Refusal::AlreadyRedeemed), None],
        "{results:?}"
    );
    assert_eq!(
        h.s().account(id(RELAY)).await.unwrap().balance,
        11 + 12 + 14 + 15
    );
    assert_eq!(
        h.s().account(id(OTHER_RELAY)).await.unwrap().balance,
        10 + 13
    );
    assert!(h.s().redeem_all(Vec::new()).await.is_empty());
    assert_conserved(h).await;
}

macro_rules! both {
    ($($case:ident),* $(,)?) => { $(
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$case(&super::Embedded::new()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn chain() {
                if let Some(h) = super::Chain::new().await {
                    super::$case(&h).await;
                }
            }
        }
    )* };
}

both!(
    redeem_once,
    wrong_recipient,
    expired,
    forged,
    unknown_pot,
    reveal_and_loss,
    overdraft_burns_escrow,
    early_withdrawal_refused,
    money_conserved,
    replayed_and_stale_requests,
    anyone_funds_a_pot_only_its_key_withdraws,
    redeem_all_pays_each_once,
);

/// The contract's own checks, which the off-chain checks in front of them hide, called
/// directly; and the relay's check of a co-signature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_contract_refuses_on_its_own() {
    let Some(h) = Chain::new().await else { return };
    fund(&h, 300, 400).await;
    let t = Ticket::sign(fields(RELAY, 100, 1), &key(PAYER));
    let relay = h.s.address_of(&id(RELAY)).unwrap();
    let other = h.s.address_of(&id(OTHER_RELAY)).unwrap();
    let good = h.s.cosign(&t, &key(PAYER), relay).unwrap();
    let not_the_owners = h.s.cosign(&t, &key(OTHER_RELAY), relay).unwrap();
    let for_another = h.s.cosign(&t, &key(PAYER), other).unwrap();
    for bad in [not_the_owners, for_another] {
        assert_eq!(
            refusal(h.s.accept_cosignature(&t, bad).await),
            Refusal::ForgedTicket
        );
    }

    let mut wallet = EthereumWallet::new(wallet_of(&key(RELAY)));
    wallet.register_signer(wallet_of(&key(OTHER_RELAY)));
    let provider = ProviderBuilder::new()
        .wallet(wallet)
        .connect_http(h.url.parse().unwrap());
    let c = MurmurLottery::new(h.contract, provider);
    let reason = |e: alloy::contract::Error| {
        e.as_decoded_error::<alloy::sol_types::Revert>()
            .unwrap()
            .reason
    };
    let call = |cosig: CoSignature, recipient: Address, from: Address| {
        c.redeem(
            Bytes::copy_from_slice(&t.encode()),
            B256::from(REVEAL),
            recipient,
            B256::from_slice(&cosig.0[..32]),
            B256::from_slice(&cosig.0[32..]),
        )
        .from(from)
        .max_fee_per_gas(0)
        .max_priority_fee_per_gas(0)
    };
    let refused = |cosig, recipient, from| {
        let call = call(cosig, recipient, from);
        async move { reason(call.call().await.unwrap_err()) }
    };
    assert_eq!(refused(not_the_owners, relay, relay).await, "forged_ticket");
    assert_eq!(refused(for_another, relay, relay).await, "forged_ticket");
    assert_eq!(refused(good, relay, other).await, "wrong_recipient");
    assert_eq!(refused(good, other, other).await, "forged_ticket");
    let mut tampered = good;
    tampered.0[40] ^= 0x10;
    assert_eq!(refused(tampered, relay, relay).await, "forged_ticket");
    let receipt = call(good, relay, relay)
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    assert!(receipt.status());
    assert_eq!(refused(good, relay, relay).await, "already_redeemed");
    // the co-signed hash the payer signs is the contract's
    let digest = B256::from(t.digest());
    assert_eq!(
        c.cosignedHash(digest, relay).call().await.unwrap(),
        h.s.cosigned_hash(&t, relay)
    );
}

/// A batch pays each winner once, in one transaction, and skips what the contract refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_pays_each_winner_once_and_skips_refusals() {
    let Some(h) = Chain::new().await else { return };
    fund(&h, 1_000, 2_000).await;
    let mut reqs = Vec::new();
    for nonce in 0..10 {
        reqs.push(redeem(
            issue(&h, PAYER, fields(RELAY, 10, nonce)).await,
            RELAY,
        ));
    }
    // redeemed before the batch: refused off-chain
    let early = Signed::new(reqs[0].op, &key(RELAY), unix_now());
    h.s.redeem(early).await.unwrap();
    // a wrong reveal: refused by the contract, inside the batch
    let t = issue(&h, PAYER, fields(RELAY, 10, 50)).await;
    let mut wrong = redeem(t, RELAY);
    wrong.op.reveal = [8; 32];
    reqs.push(Signed::new(wrong.op, &key(RELAY), unix_now()));
    // another relay's ticket: not for this batch
    reqs.push(redeem(
        issue(&h, PAYER, fields(OTHER_RELAY, 10, 51)).await,
        OTHER_RELAY,
    ));
    // the same ticket twice in one batch: paid once; the same request twice: refused as such
    reqs.push(Signed::new(reqs[1].op, &key(RELAY), unix_now()));
    reqs.push(reqs[2].clone());
    let results = h.s.redeem_batch(id(RELAY), &reqs).await;
    let refusals: Vec<_> = results
        .iter()
        .map(|r| r.as_ref().err().and_then(|e| e.refusal()))
        .collect();
    let mut expected = vec![Some(Refusal::AlreadyRedeemed)];
    expected.extend([None; 9]);
    expected.extend([
        Some(Refusal::RevealMismatch),
        Some(Refusal::Malformed),
        Some(Refusal::AlreadyRedeemed),
        Some(Refusal::ReplayedRequest),
    ]);
    assert_eq!(refusals, expected, "{results:?}");
    for r in results.iter().flatten() {
        assert_eq!((r.paid, r.burned), (10, 0));
    }
    assert_eq!(h.s.account(id(RELAY)).await.unwrap().balance, 100);
    assert_conserved(&h).await;
}

/// Gas of each operation and redemptions per second against Anvil (sequential: one relay's
/// wallet sends one transaction after another). Prints the figures the ledger README quotes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gas_and_redemptions_per_second() {
    let Some(h) = Chain::new().await else { return };
    const N: u64 = 200;
    let payer = key(PAYER);
    h.s.fund(funding(&payer, 10_000, 20_000)).await.unwrap();
    let fund_new = h.s.gas().fund;
    h.s.fund(funding(&payer, 1_000, 1_000)).await.unwrap();
    let fund_top_up = h.s.gas().fund;
    h.s.warn(Signed::new(Warn { amount: 100 }, &payer, unix_now()))
        .await
        .unwrap();
    let warn = h.s.gas().warn;
    let mut tickets = Vec::new();
    for i in 0..N {
        let mut f = fields(RELAY, 10, 0);
        f.nonce[..8].copy_from_slice(&i.to_be_bytes());
        tickets.push(issue(&h, PAYER, f).await);
    }
    let mut gas = Vec::new();
    let started = std::time::Instant::now();
    for t in tickets {
        let r = h.s.redeem(redeem(t, RELAY)).await.unwrap();
        assert_eq!(r.paid, 10);
        gas.push(h.s.gas().redeem);
    }
    let elapsed = started.elapsed();
    h.let_pass(NOTICE_S + 1).await;
    h.s.withdraw(Signed::new(Withdraw { amount: 100 }, &payer, unix_now()))
        .await
        .unwrap();
    let withdraw = h.s.gas().withdraw;
    // batches: one transaction of B winners
    let mut batches = Vec::new();
    for b in [10u64, 50] {
        let mut reqs = Vec::new();
        for i in 0..b {
            let mut f = fields(RELAY, 10, 1);
            f.nonce[..8].copy_from_slice(&(1_000 * b + i).to_be_bytes());
            reqs.push(redeem(issue(&h, PAYER, f).await, RELAY));
        }
        let started = std::time::Instant::now();
        let results = h.s.redeem_batch(id(RELAY), &reqs).await;
        let elapsed = started.elapsed();
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        batches.push((b, h.s.gas().redeem, elapsed));
    }
    // an overdraft: the face value beyond the balance burns the escrow
    let t = issue(&h, PAYER, fields(RELAY, 1_000_000, 1)).await;
    let r = h.s.redeem(redeem(t, RELAY)).await.unwrap();
    assert!(r.burned > 0);
    let overdraft = h.s.gas().redeem;
    let (min, max) = (gas.iter().min().unwrap(), gas.iter().max().unwrap());
    let per_s = N as f64 / elapsed.as_secs_f64();
    println!(
        "gas: fund (new pot) {fund_new}, fund (top up) {fund_top_up}, warn {warn}, withdraw {withdraw}"
    );
    println!("gas: redeem {min}..{max} (a winning ticket paid in full), overdraft {overdraft}");
    println!(
        "redemptions: {N} in {elapsed:.2?} = {per_s:.0}/s (sequential, one wallet, 1 confirmation)"
    );
    for (b, gas, elapsed) in &batches {
        println!(
            "gas: a batch of {b} winners {gas} = {} per ticket; {:.0} redemptions/s",
            gas / b,
            *b as f64 / elapsed.as_secs_f64()
        );
    }
    println!("fees paid: {} wei", h.s.gas().fees_wei);
    assert!(
        *max < 100_000,
        "a redemption should cost under 100k gas: {max}"
    );
    assert_eq!(h.s.gas().fees_wei, 0, "the test node charges no fees");
}

/// Winners the crash test's relay redeems, and what each pays.
const CRASH_TICKETS: u64 = 200;
const CRASH_FACE: u64 = 10;

/// The crash test's tickets: the same in the relay process and after its restart.
fn crash_tickets(issued: u64) -> Vec<Ticket> {
    (0..CRASH_TICKETS)
        .map(|i| {
            let mut f = fields(RELAY, CRASH_FACE, 0);
            f.nonce[..8].copy_from_slice(&i.to_be_bytes());
            f.issued = issued;
            f.expiry = issued + 600;
            Ticket::sign(f, &key(PAYER))
        })
        .collect()
}

/// The relay of `a_relay_killed_while_redeeming_is_paid_for_each_winner_once`: connects to
/// the node and contract its parent names and redeems the winners one after another until
/// it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of the kill -9 test, which runs it"]
async fn crash_relay() {
    let spec = std::env::var("MURMUR_CHAIN_CRASH").unwrap();
    let [url, contract, issued] = spec.split(' ').collect::<Vec<_>>().try_into().unwrap();
    let config = ChainConfig {
        gas_price_wei: Some(0),
        ..ChainConfig::new(url, contract.parse().unwrap())
    };
    let s = ChainSettlement::connect(config, &[key(RELAY), key(PAYER)])
        .await
        .unwrap();
    for t in crash_tickets(issued.parse().unwrap()) {
        let relay = s.address_of(&id(RELAY)).unwrap();
        s.accept_cosignature(&t, s.cosign(&t, &key(PAYER), relay).unwrap())
            .await
            .unwrap();
        s.redeem(redeem(t, RELAY)).await.unwrap();
    }
}

/// A relay process killed (SIGKILL) while it redeems winners on the chain, restarted with the
/// same tickets, redeems them all again: each is paid exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_while_redeeming_is_paid_for_each_winner_once() {
    let Some(h) = Chain::new().await else { return };
    fund(&h, 100_000, 200_000).await;
    let issued = unix_now();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "crash_relay", "--nocapture"])
        .env(
            "MURMUR_CHAIN_CRASH",
            format!("{} {} {issued}", h.url, h.contract),
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while h.s.account(id(RELAY)).await.unwrap().balance < 20 * CRASH_FACE {
        assert!(
            std::time::Instant::now() < deadline,
            "the relay redeemed nothing"
        );
        assert!(child.try_wait().unwrap().is_none(), "the relay exited");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before = h.s.account(id(RELAY)).await.unwrap().balance / CRASH_FACE;
    assert!(
        before < CRASH_TICKETS,
        "killed too late: all {before} were redeemed"
    );

    // the restarted relay: the same tickets (kept with their co-signatures), redeemed in batches
    let tickets = crash_tickets(issued);
    let relay = h.s.address_of(&id(RELAY)).unwrap();
    let mut reqs = Vec::new();
    for t in tickets {
        let cosignature = h.s.cosign(&t, &key(PAYER), relay).unwrap();
        h.s.accept_cosignature(&t, cosignature).await.unwrap();
        reqs.push(redeem(t, RELAY));
    }
    let (mut paid, mut again) = (0, 0);
    for chunk in reqs.chunks(50) {
        for r in h.s.redeem_batch(id(RELAY), chunk).await {
            match r {
                Ok(r) => {
                    assert_eq!(r.paid, CRASH_FACE);
                    paid += 1;
                }
                Err(e) => {
                    assert_eq!(e.refusal(), Some(Refusal::AlreadyRedeemed), "{e}");
                    again += 1;
                }
            }
        }
    }
    println!(
        "killed after {before} redemptions; after the restart {paid} paid, {again} refused already_redeemed"
    );
    assert_eq!((again, paid + again), (before, CRASH_TICKETS));
    assert_eq!(
        h.s.account(id(RELAY)).await.unwrap().balance,
        CRASH_TICKETS * CRASH_FACE
    );
    assert_conserved(&h).await;
}

/// With `confirmations = 3` an operation returns only once two more blocks are on top of
/// its transaction's; a node that cannot be reached is a network error after the retries,
/// never a refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmation_depth_and_an_unreachable_node() {
    let Some(mut h) = Chain::new().await else {
        return;
    };
    let config = ChainConfig {
        gas_price_wei: Some(0),
        confirmations: 3,
        timeout_s: 30,
        retries: 2,
        ..ChainConfig::new(h.url.clone(), h.contract)
    };
    let deep = ChainSettlement::connect(config, &[key(PAYER)])
        .await
        .unwrap();
    let provider = ProviderBuilder::new().connect_http(h.url.parse().unwrap());
    let miner = {
        let provider = provider.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let _: Result<serde_json::Value, _> =
                    provider.raw_request("evm_mine".into(), ()).await;
            }
        })
    };
    let before = provider.get_block_number().await.unwrap();
    let req = funding(&key(PAYER), 10, 20);
    deep.fund(req).await.unwrap();
    let after = provider.get_block_number().await.unwrap();
    miner.abort();
    // its own block and two on top (the miner's blocks may come before it, too)
    assert!(after >= before + 3, "blocks {before} -> {after}");

    h.node.kill();
    let started = std::time::Instant::now();
    let e = deep.pot(id(PAYER)).await.unwrap_err();
    assert!(matches!(e, murmur_ledger::Error::Http { .. }), "{e:?}");
    assert!(e.refusal().is_none());
    println!("unreachable node: {e} after {:.2?}", started.elapsed());
}

/// Without a fixed gas price the node's fee estimate is used, and the wallet pays the fees:
/// the account holds what funding left less the fees, rounded down to whole base units.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wallet_pays_the_estimated_fees() {
    let Some(h) = Chain::new().await else { return };
    let config = ChainConfig::new(h.url.clone(), h.contract);
    let paying = ChainSettlement::connect(config, &[key(PAYER)])
        .await
        .unwrap();
    let t = paying.fund(funding(&key(PAYER), 100, 200)).await.unwrap();
    let fees = paying.gas().fees_wei;
    assert!(fees > 0, "the node charges priority fees");
    let fee_units = u64::try_from(fees.div_ceil(1_000_000_000)).unwrap();
    assert_eq!(t.account.balance, GENESIS - 300 - fee_units);
    println!(
        "funding a new pot at the node's estimate: {} gas, {fees} wei in fees",
        paying.gas().fund
    );
}
