//! [`Settlement`] over an Ethereum node's JSON-RPC, against a deployed `MurmurLottery`.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use alloy::network::{EthereumWallet, TransactionBuilder};
use alloy::primitives::{Address, B256, Bytes, Signature, U256, keccak256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::{TransactionReceipt, TransactionRequest};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::{Revert, SolCall, SolConstructor, SolEvent};
use alloy::transports::http::reqwest::Url;
use ed25519_dalek::SigningKey;
use murmur_ledger::request::{Fund, Operation, Redeem, Signed, Warn, Withdraw};
use murmur_ledger::{
    Account, Error, Pot, Redemption, Refusal, Result, Settlement, Transfer, unix_now,
};
use murmur_protocol::directory::{ChainAddress, IdentityKey, UnixTime};
use murmur_protocol::ticket::Ticket;
use serde::{Deserialize, Serialize};

use crate::{BYTECODE_HEX, MurmurLottery, wallet_of};

/// Wei in one base unit of the ledger (1 gwei).
const UNIT_WEI: u64 = 1_000_000_000;
const COSIGN_DOMAIN: &[u8] = b"murmur/chain-ticket/v1\0";

/// Where the chain is and how to wait for it (`[payments.chain]` in a relay's or client's
/// config).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainConfig {
    /// The node's JSON-RPC endpoint (`http://…`).
    pub rpc_url: String,
    /// The deployed `MurmurLottery`.
    pub contract: Address,
    /// Blocks a transaction must be under (1: its own block) before its effect counts.
    #[serde(default = "defaults::confirmations")]
    pub confirmations: u64,
    /// How long to wait for a transaction's confirmations, seconds.
    #[serde(default = "defaults::timeout_s")]
    pub timeout_s: u64,
    /// How often a read, or a redemption (which the contract carries out at most once), is
    /// tried again after the node could not be reached.
    #[serde(default = "defaults::retries")]
    pub retries: u32,
    /// Co-signatures of accepted tickets kept for their redemption; more are refused.
    #[serde(default = "defaults::max_cosignatures")]
    pub max_cosignatures: usize,
    /// A signed request's timestamp may differ from this clock by this many seconds, and its
    /// nonce is remembered this long (the embedded ledger's `request_window`).
    #[serde(default = "defaults::request_window_s")]
    pub request_window_s: u64,
    /// Requests remembered in the window; beyond, new ones are refused `rate_limited`.
    #[serde(default = "defaults::max_remembered_requests")]
    pub max_remembered_requests: usize,
    /// A fixed fee per gas in wei (max fee and priority fee both), for a private chain or a
    /// test node (0: free); unset, the node's estimate.
    #[serde(default)]
    pub gas_price_wei: Option<u128>,
}

mod defaults {
    pub fn confirmations() -> u64 {
        1
    }
    pub fn timeout_s() -> u64 {
        120
    }
    pub fn retries() -> u32 {
        3
    }
    pub fn max_cosignatures() -> usize {
        65_536
    }
    pub fn request_window_s() -> u64 {
        300
    }
    pub fn max_remembered_requests() -> usize {
        65_536
    }
}

impl ChainConfig {
    /// The config a relay's or client's `[payments.chain]` section describes (checked by
    /// [`murmur_ledger::choice::check_choice`]), with the defaults for the rest.
    pub fn from_section(section: &murmur_ledger::ChainSection) -> Result<ChainConfig> {
        let contract: Address = section.contract.parse().map_err(|e| {
            Error::Config(format!("payments.chain.contract {}: {e}", section.contract))
        })?;
        Ok(ChainConfig {
            confirmations: section.confirmations,
            timeout_s: section.timeout_s,
            retries: section.retries,
            gas_price_wei: section.gas_price_wei.map(u128::from),
            ..ChainConfig::new(section.rpc_url.clone(), contract)
        })
    }

    /// A config with the defaults.
    pub fn new(rpc_url: impl Into<String>, contract: Address) -> ChainConfig {
        ChainConfig {
            rpc_url: rpc_url.into(),
            contract,
            confirmations: defaults::confirmations(),
            timeout_s: defaults::timeout_s(),
            retries: defaults::retries(),
            max_cosignatures: defaults::max_cosignatures(),
            request_window_s: defaults::request_window_s(),
            max_remembered_requests: defaults::max_remembered_requests(),
            gas_price_wei: None,
        }
    }
}

/// A pot owner's EIP-2098 signature (`r ‖ yParity·2^255 + s`) of
/// `keccak256("murmur/chain-ticket/v1\0" ‖ chain id (32) ‖ contract (20) ‖ ticket digest (32)
/// ‖ recipient address (20))`: what lets the recipient redeem the ticket on this chain. The
/// protocol carries it as opaque bytes (beside a gateway's ticket, or in a hop's slot).
pub use murmur_protocol::ticket::CoSignature;

/// What a co-signature says of the pot's owner, as far as this settlement knows it now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoSigner {
    /// It recovers to the pot's owner.
    Owner,
    /// It does not recover, or recovers to another address than the owner's.
    NotOwner,
    /// It recovers, but the pot's owner is not known here yet (the pot was not read).
    OwnerUnknown,
}

/// What a payer needs to co-sign its tickets for this chain, without a connection: the
/// chain, the contract, its wallet, and the chain addresses of the relays it pays.
#[derive(Clone)]
pub struct TicketCoSigner {
    chain_id: u64,
    contract: Address,
    wallet: PrivateKeySigner,
}

impl std::fmt::Debug for TicketCoSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketCoSigner")
            .field("chain_id", &self.chain_id)
            .field("contract", &self.contract)
            .field("owner", &self.wallet.address())
            .finish_non_exhaustive()
    }
}

impl TicketCoSigner {
    /// Co-signs `ticket` for its recipient, paid at `recipient` (the chain address its
    /// descriptor publishes); `None` only if signing fails.
    pub fn cosign(&self, ticket: &Ticket, recipient: &ChainAddress) -> Option<CoSignature> {
        let hash = cosigned_hash(
            self.chain_id,
            self.contract,
            ticket,
            Address::from(*recipient),
        );
        let signature = self.wallet.sign_hash_sync(&hash).ok()?;
        Some(CoSignature(signature.as_erc2098()))
    }

    /// The pot owner's address: its wallet's.
    pub fn owner(&self) -> Address {
        self.wallet.address()
    }
}

/// The most tickets one `redeemBatch` transaction carries (about 2.1 million gas at 41,447
/// each, well inside a 30-million-gas block).
pub const MAX_BATCH: usize = 50;

/// One result per request, from slots each filled when its request was decided; a slot left
/// empty (a bug) is an error, not a panic.
fn every_outcome(slots: Vec<Option<Result<Redemption>>>) -> Vec<Result<Redemption>> {
    slots
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Error::Storage("no outcome".into()))))
        .collect()
}

/// Owners remembered from pot reads ([`ChainSettlement::cosigner_of`]); when full, the map is
/// cleared and refilled by the next reads.
const MAX_OWNERS: usize = 65_536;

fn cosigned_hash(chain_id: u64, contract: Address, ticket: &Ticket, recipient: Address) -> B256 {
    let mut msg = Vec::with_capacity(COSIGN_DOMAIN.len() + 104);
    msg.extend_from_slice(COSIGN_DOMAIN);
    msg.extend_from_slice(&U256::from(chain_id).to_be_bytes::<32>());
    msg.extend_from_slice(contract.as_slice());
    msg.extend_from_slice(&ticket.digest());
    msg.extend_from_slice(recipient.as_slice());
    keccak256(msg)
}

/// One redemption the contract recorded, and what its transaction cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedeemedOnChain {
    pub pot: IdentityKey,
    pub recipient: Address,
    /// Base units paid to the recipient.
    pub paid: u64,
    /// The transaction that paid it (a batch's pays several).
    pub transaction: B256,
    /// Gas its transaction used (all of a batch's, for a batch), and the price per gas paid.
    pub gas_used: u64,
    pub gas_price_wei: u128,
}

/// Gas used by the last transaction of each kind, and the fees paid in all (wei).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GasUsed {
    pub fund: u64,
    pub warn: u64,
    pub withdraw: u64,
    pub redeem: u64,
    pub fees_wei: u128,
    /// Co-signatures refused because `max_cosignatures` were held.
    pub cosignatures_refused: u64,
}

#[derive(Clone, Copy)]
enum Op {
    Fund,
    Warn,
    Withdraw,
    Redeem,
}

/// Settlement on the chain. Holds the chain wallets of the identities it acts for
/// ([`wallet_of`] their Ed25519 keys): a signed request is carried out by its signer's wallet.
pub struct ChainSettlement {
    contract: MurmurLottery::MurmurLotteryInstance<DynProvider>,
    config: ChainConfig,
    chain_id: u64,
    wallets: HashMap<IdentityKey, Address>,
    /// Co-signatures by ticket digest, until the ticket is redeemed.
    cosignatures: Mutex<HashMap<[u8; 32], CoSignature>>,
    /// Pots' owners as last read (at most [`MAX_OWNERS`]).
    owners: Mutex<HashMap<IdentityKey, Address>>,
    gas: Mutex<GasUsed>,
    sending: tokio::sync::Mutex<()>,
    /// Admitted requests by `(signer, nonce)`, with their timestamps.
    seen: Mutex<HashMap<(IdentityKey, [u8; 16]), UnixTime>>,
}

impl std::fmt::Debug for ChainSettlement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainSettlement")
            .field("rpc_url", &self.config.rpc_url)
            .field("contract", &self.config.contract)
            .field("chain_id", &self.chain_id)
            .finish_non_exhaustive()
    }
}

fn url_of(rpc_url: &str) -> Result<Url> {
    rpc_url
        .parse()
        .map_err(|e| Error::Config(format!("chain rpc_url {rpc_url:?}: {e}")))
}

fn rpc_error(url: &str, e: impl std::fmt::Display) -> Error {
    Error::Http {
        url: url.to_owned(),
        message: e.to_string(),
    }
}

/// A failed contract call: the contract's refusal (its revert reason is the refusal's label),
/// or the node's failure.
fn call_error(url: &str, e: &alloy::contract::Error) -> Error {
    match e.as_decoded_error::<Revert>() {
        Some(revert) => match Refusal::from_label(&revert.reason) {
            Some(refusal) => refusal.because(format!("the contract refused: {}", revert.reason)),
            None => Error::Storage(format!("the contract reverted: {}", revert.reason)),
        },
        None => rpc_error(url, e),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ChainSettlement {
    /// Deploys a `MurmurLottery` with this notice period (seconds), paid by `deployer`, and
    /// returns its address.
    pub async fn deploy(
        rpc_url: &str,
        deployer: PrivateKeySigner,
        notice_s: u64,
    ) -> Result<Address> {
        let from = deployer.address();
        let provider = ProviderBuilder::new()
            .wallet(EthereumWallet::new(deployer))
            .connect_http(url_of(rpc_url)?);
        let mut code = alloy::hex::decode(BYTECODE_HEX.trim())
            .map_err(|e| Error::Config(format!("the contract's bytecode: {e}")))?;
        code.extend(MurmurLottery::constructorCall { notice: notice_s }.abi_encode());
        let tx = TransactionRequest::default()
            .with_from(from)
            .with_deploy_code(code);
        let receipt = provider
            .send_transaction(tx)
            .await
            .map_err(|e| rpc_error(rpc_url, e))?
            .get_receipt()
            .await
            .map_err(|e| rpc_error(rpc_url, e))?;
        receipt
            .contract_address
            .filter(|_| receipt.status())
            .ok_or_else(|| Error::Storage("the contract's deployment failed".into()))
    }

    /// Connects to the contract, acting for the identities of `keys` (their chain wallets).
    pub async fn connect(config: ChainConfig, keys: &[SigningKey]) -> Result<ChainSettlement> {
        let url = url_of(&config.rpc_url)?;
        let mut wallets = HashMap::new();
        let mut wallet: Option<EthereumWallet> = None;
        for key in keys {
            let signer = wallet_of(key);
            wallets.insert(IdentityKey::of(key), signer.address());
            match wallet.as_mut() {
                Some(w) => w.register_signer(signer),
                None => wallet = Some(EthereumWallet::new(signer)),
            }
        }
        let provider = match wallet {
            Some(w) => ProviderBuilder::new().wallet(w).connect_http(url).erased(),
            None => ProviderBuilder::new().connect_http(url).erased(),
        };
        let chain_id = provider
            .get_chain_id()
            .await
            .map_err(|e| rpc_error(&config.rpc_url, e))?;
        let code = provider
            .get_code_at(config.contract)
            .await
            .map_err(|e| rpc_error(&config.rpc_url, e))?;
        if code.is_empty() {
            return Err(Error::Config(format!(
                "no contract at {} on chain {chain_id}",
                config.contract
            )));
        }
        Ok(ChainSettlement {
            contract: MurmurLottery::new(config.contract, provider),
            config,
            chain_id,
            wallets,
            cosignatures: Mutex::new(HashMap::new()),
            owners: Mutex::new(HashMap::new()),
            gas: Mutex::new(GasUsed::default()),
            sending: tokio::sync::Mutex::new(()),
            seen: Mutex::new(HashMap::new()),
        })
    }

    /// The chain address of an identity this settlement acts for.
    pub fn address_of(&self, key: &IdentityKey) -> Option<Address> {
        self.wallets.get(key).copied()
    }

    /// Gas figures so far.
    pub fn gas(&self) -> GasUsed {
        *lock(&self.gas)
    }

    /// Escrow burned by overdrafts (base units), as the contract counts it.
    pub async fn burned(&self) -> Result<u64> {
        let burned = self
            .read(|| async { self.contract.burned().call().await })
            .await?;
        u64::try_from(burned).map_err(|_| Error::Storage("burned exceeds 64 bits".into()))
    }

    /// The hash a pot's owner co-signs for `recipient` to redeem `ticket` here.
    pub fn cosigned_hash(&self, ticket: &Ticket, recipient: Address) -> B256 {
        cosigned_hash(self.chain_id, self.config.contract, ticket, recipient)
    }

    /// Every redemption the contract recorded (its `Redeemed` events), with what its
    /// transaction cost: what a relay's earnings cost in gas.
    pub async fn redemptions(&self) -> Result<Vec<RedeemedOnChain>> {
        let url = &self.config.rpc_url;
        let events = self
            .contract
            .Redeemed_filter()
            .from_block(0)
            .query()
            .await
            .map_err(|e| rpc_error(url, e))?;
        let mut out = Vec::with_capacity(events.len());
        for (event, log) in events {
            let Some(hash) = log.transaction_hash else {
                continue;
            };
            let receipt = self
                .contract
                .provider()
                .get_transaction_receipt(hash)
                .await
                .map_err(|e| rpc_error(url, e))?
                .ok_or_else(|| Error::Storage(format!("no receipt for {hash}")))?;
            out.push(RedeemedOnChain {
                pot: IdentityKey(event.pot.0),
                recipient: event.recipient,
                paid: event.paid,
                transaction: hash,
                gas_used: receipt.gas_used,
                gas_price_wei: receipt.effective_gas_price,
            });
        }
        Ok(out)
    }

    /// The chain id the node reported.
    pub fn chain_id(&self) -> u64 {
        self.chain_id
    }

    /// A co-signer for the pot of `payer`, on this chain and contract.
    pub fn ticket_cosigner(&self, payer: &SigningKey) -> TicketCoSigner {
        TicketCoSigner {
            chain_id: self.chain_id,
            contract: self.config.contract,
            wallet: wallet_of(payer),
        }
    }

    /// Whose co-signature of `ticket` this is, against the owner of its pot as last read
    /// (by [`Settlement::pot`] or [`ChainSettlement::accept_cosignature`]). Local: no call to
    /// the node, so a relay can check every ticket it accepts.
    pub fn cosigner_of(&self, ticket: &Ticket, cosignature: &CoSignature) -> CoSigner {
        let Ok(recipient) = self.wallet(&ticket.recipient) else {
            return CoSigner::NotOwner;
        };
        let hash = self.cosigned_hash(ticket, recipient);
        let Ok(signer) =
            Signature::from_erc2098(&cosignature.0).recover_address_from_prehash(&hash)
        else {
            return CoSigner::NotOwner;
        };
        match lock(&self.owners).get(&ticket.pot) {
            Some(owner) if *owner == signer => CoSigner::Owner,
            Some(_) => CoSigner::NotOwner,
            None => CoSigner::OwnerUnknown,
        }
    }

    /// Keeps a ticket's co-signature for its redemption without checking it (a relay that
    /// checked it with [`ChainSettlement::cosigner_of`], or that stored it and restarted;
    /// the contract checks it again and refuses a bad one before any gas is spent): at most
    /// `max_cosignatures`, beyond refused and counted.
    pub fn hold_cosignature(&self, ticket: &Ticket, cosignature: CoSignature) -> Result<()> {
        let mut held = lock(&self.cosignatures);
        if held.len() >= self.config.max_cosignatures && !held.contains_key(&ticket.digest()) {
            drop(held);
            lock(&self.gas).cosignatures_refused += 1;
            return Err(Refusal::RateLimited.because(format!(
                "{} co-signatures held for redemption already",
                self.config.max_cosignatures
            )));
        }
        held.insert(ticket.digest(), cosignature);
        Ok(())
    }

    /// The payer's side: co-signs a ticket with the pot key's chain wallet, for the recipient
    /// whose chain address is `recipient`.
    pub fn cosign(
        &self,
        ticket: &Ticket,
        payer: &SigningKey,
        recipient: Address,
    ) -> Result<CoSignature> {
        let signature = wallet_of(payer)
            .sign_hash_sync(&self.cosigned_hash(ticket, recipient))
            .map_err(|e| Error::Storage(format!("co-signing failed: {e}")))?;
        Ok(CoSignature(signature.as_erc2098()))
    }

    /// The recipient's side: checks the co-signature that came with an accepted ticket (it is
    /// the pot owner's, for this identity's address) and keeps it until the ticket is redeemed
    /// (at most `max_cosignatures`; beyond, refused and counted).
    pub async fn accept_cosignature(
        &self,
        ticket: &Ticket,
        cosignature: CoSignature,
    ) -> Result<()> {
        let recipient = self.wallet(&ticket.recipient)?;
        let hash = self.cosigned_hash(ticket, recipient);
        let signer = Signature::from_erc2098(&cosignature.0)
            .recover_address_from_prehash(&hash)
            .map_err(|_| Refusal::ForgedTicket.because("the co-signature does not recover"))?;
        let (owner, _) = self
            .read_pot(ticket.pot)
            .await?
            .ok_or_else(|| Refusal::UnknownPot.because(format!("no pot has key {}", ticket.pot)))?;
        if signer != owner {
            return Err(Refusal::ForgedTicket.because(format!(
                "the co-signature is {signer}'s, not the pot owner's ({owner})"
            )));
        }
        self.hold_cosignature(ticket, cosignature)
    }

    /// Admits a signed request as the embedded ledger does: its timestamp within
    /// `request_window_s` of this clock, its signature, and its `(signer, nonce)` not seen in
    /// the window (remembered from here on, forgotten again if it is refused).
    fn admit<T: Operation>(&self, req: &Signed<T>) -> Result<()> {
        let now = unix_now();
        let window = self.config.request_window_s;
        if req.timestamp.abs_diff(now) > window {
            return Err(Refusal::StaleRequest.because(format!(
                "the request is stamped {}, this clock says {now}; at most {window} s apart \
                 are accepted",
                req.timestamp
            )));
        }
        req.verify()?;
        let mut seen = lock(&self.seen);
        if seen.len() >= self.config.max_remembered_requests {
            seen.retain(|_, stamped| stamped.saturating_add(window) >= now);
        }
        if seen.len() >= self.config.max_remembered_requests {
            return Err(Refusal::RateLimited.because(format!(
                "{} requests remembered in the window already",
                seen.len()
            )));
        }
        match seen.entry((req.signer, req.nonce)) {
            Entry::Occupied(_) => Err(Refusal::ReplayedRequest
                .because(format!("this {} request was already decided", T::NAME))),
            Entry::Vacant(v) => {
                v.insert(req.timestamp);
                Ok(())
            }
        }
    }

    /// A refused request may be sent again (within its window), as at the embedded ledger.
    fn forget_if_refused<T, O>(&self, req: &Signed<T>, outcome: &Result<O>) {
        if let Err(e) = outcome
            && e.refusal().is_some()
        {
            lock(&self.seen).remove(&(req.signer, req.nonce));
        }
    }

    /// Runs an admitted request.
    async fn once<T: Operation, O>(
        &self,
        req: &Signed<T>,
        run: impl Future<Output = Result<O>>,
    ) -> Result<O> {
        self.admit(req)?;
        let outcome = run.await;
        self.forget_if_refused(req, &outcome);
        outcome
    }

    /// For a warning or a withdrawal: the signer's pot and wallet.
    fn own_pot<T: Operation>(&self, req: &Signed<T>) -> Result<(B256, Address)> {
        Ok((B256::from(req.signer.0), self.wallet(&req.signer)?))
    }

    fn wallet(&self, key: &IdentityKey) -> Result<Address> {
        self.address_of(key)
            .ok_or_else(|| Refusal::BadSignature.because(format!("no chain wallet for {key} here")))
    }

    /// Runs a read, again after a failure to reach the node (up to `retries` more times).
    async fn read<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = std::result::Result<T, alloy::contract::Error>>,
    {
        let mut attempt = 0;
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let error = call_error(&self.config.rpc_url, &e);
                    if error.refusal().is_some() || attempt >= self.config.retries {
                        return Err(error);
                    }
                }
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(100 << attempt.min(6))).await;
        }
    }

    /// Sends a call as a transaction and waits for its confirmations. A call the contract
    /// would refuse is refused when its gas is estimated, before anything is sent.
    async fn transact<C: SolCall>(
        &self,
        call: alloy::contract::SolCallBuilder<&DynProvider, C>,
        op: Op,
        retry: bool,
    ) -> Result<TransactionReceipt> {
        let url = &self.config.rpc_url;
        let call = match self.config.gas_price_wei {
            Some(price) => call.max_fee_per_gas(price).max_priority_fee_per_gas(price),
            None => call,
        };
        // Estimated first, so that a refused call takes no nonce from the wallet's sequence;
        // one transaction at a time is estimated and sent from this settlement.
        let sending = self.sending.lock().await;
        let mut attempt = 0;
        let pending = loop {
            let sent = match call.estimate_gas().await {
                Ok(gas) => {
                    let call = call.clone().gas(gas.saturating_add(gas / 5));
                    call.send().await
                }
                Err(e) => Err(e),
            };
            match sent {
                Ok(p) => break p,
                Err(e) => {
                    let error = call_error(url, &e);
                    if !retry || error.refusal().is_some() || attempt >= self.config.retries {
                        return Err(error);
                    }
                }
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(100 << attempt.min(6))).await;
        };
        drop(sending);
        let receipt = pending
            .with_required_confirmations(self.config.confirmations)
            .with_timeout(Some(Duration::from_secs(self.config.timeout_s)))
            .get_receipt()
            .await
            .map_err(|e| rpc_error(url, e))?;
        {
            let mut gas = lock(&self.gas);
            gas.fees_wei += u128::from(receipt.gas_used) * receipt.effective_gas_price;
            let slot = match op {
                Op::Fund => &mut gas.fund,
                Op::Warn => &mut gas.warn,
                Op::Withdraw => &mut gas.withdraw,
                Op::Redeem => &mut gas.redeem,
            };
            *slot = receipt.gas_used;
        }
        if !receipt.status() {
            // Refused in its block though not when estimated (another transaction came first,
            // e.g. the same ticket's redemption): the call now says why.
            return Err(match call.call().await {
                Err(e) => call_error(url, &e),
                Ok(_) => {
                    Error::Storage(format!("transaction {} reverted", receipt.transaction_hash))
                }
            });
        }
        Ok(receipt)
    }

    /// A redemption's off-chain checks, those the contract cannot afford (the ticket's
    /// Ed25519 signature, the signer is the recipient; the request's was checked when it was
    /// admitted), and its claim with the
    /// co-signature [`ChainSettlement::accept_cosignature`] kept; and the wallet to send it.
    async fn claim(&self, req: &Signed<Redeem>) -> Result<(MurmurLottery::Claim, Address)> {
        let t = &req.op.ticket;
        let digest = t.digest();
        let held = lock(&self.cosignatures).get(&digest).copied();
        // A ticket that came in a co-signed envelope slot carries the co-signature in its
        // signature's place: the contract checks that, and there is no Ed25519 signature.
        let in_slot = held.is_some_and(|c| c.0 == t.signature);
        t.check_recipient(&req.signer)
            .and_then(|()| {
                if in_slot {
                    Ok(())
                } else {
                    t.verify_signature()
                }
            })
            .map_err(|e| {
                let refusal = match e {
                    murmur_protocol::Error::TicketWrongRecipient { .. } => Refusal::WrongRecipient,
                    _ => Refusal::ForgedTicket,
                };
                refusal.because(e.to_string())
            })?;
        let from = self.wallet(&req.signer)?;
        let cosignature = match held {
            Some(c) => c,
            // the co-signature is let go once the ticket is redeemed
            None if self.is_redeemed(digest).await? => {
                return Err(Refusal::AlreadyRedeemed.because(format!(
                    "ticket {} of pot {} was already redeemed",
                    B256::from(digest),
                    t.pot
                )));
            }
            None if self.read_pot(t.pot).await?.is_none() => {
                return Err(Refusal::UnknownPot.because(format!("no pot has key {}", t.pot)));
            }
            None => {
                return Err(Refusal::ForgedTicket
                    .because("no co-signature by the pot's owner for this ticket"));
            }
        };
        let (r, vs) = cosignature.0.split_at(32);
        let claim = MurmurLottery::Claim {
            ticket: Bytes::copy_from_slice(&t.encode()),
            reveal: B256::from(req.op.reveal),
            r: B256::from_slice(r),
            vs: B256::from_slice(vs),
        };
        Ok((claim, from))
    }

    /// Redeems several winning tickets in one transaction (`redeemBatch`, one payment), all
    /// for `recipient`: one result per request, in order. A request refused off-chain is not
    /// sent; one the contract refuses is skipped by it and comes back refused.
    pub async fn redeem_batch(
        &self,
        recipient: IdentityKey,
        reqs: &[Signed<Redeem>],
    ) -> Vec<Result<Redemption>> {
        let mut results: Vec<Option<Result<Redemption>>> = Vec::with_capacity(reqs.len());
        let mut claims = Vec::new();
        let mut sent = Vec::new();
        let mut admitted = Vec::new();
        for (i, req) in reqs.iter().enumerate() {
            if req.signer != recipient {
                results.push(Some(Err(Refusal::Malformed.because(format!(
                    "a batch for {recipient} holds a request signed by {}",
                    req.signer
                )))));
                continue;
            }
            if let Err(e) = self.admit(req) {
                results.push(Some(Err(e)));
                continue;
            }
            admitted.push(i);
            match self.claim(req).await {
                Ok((claim, _)) => {
                    claims.push(claim);
                    sent.push(i);
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        if !claims.is_empty() {
            let outcome = match self.wallet(&recipient) {
                Ok(from) => {
                    let call = self.contract.redeemBatch(claims).from(from);
                    self.transact(call, Op::Redeem, true).await
                }
                Err(e) => Err(e),
            };
            let settled = match outcome {
                Ok(receipt) => self.batch_outcome(recipient, reqs, &sent, &receipt).await,
                Err(e) => Err(e),
            };
            match settled {
                Ok(each) => {
                    for (&i, result) in sent.iter().zip(each) {
                        results[i] = Some(result);
                    }
                }
                Err(e) => {
                    for &i in &sent {
                        results[i] = Some(Err(Error::Storage(format!("the batch failed: {e}"))));
                    }
                }
            }
        }
        let results = every_outcome(results);
        for i in admitted {
            self.forget_if_refused(&reqs[i], &results[i]);
        }
        results
    }

    /// Each sent request's outcome, from the batch's logs.
    async fn batch_outcome(
        &self,
        recipient: IdentityKey,
        reqs: &[Signed<Redeem>],
        sent: &[usize],
        receipt: &TransactionReceipt,
    ) -> Result<Vec<Result<Redemption>>> {
        let mut paid = HashMap::new();
        let mut refused = HashMap::new();
        for log in receipt.logs() {
            if log.address() != self.config.contract {
                continue;
            }
            if let Ok(e) = MurmurLottery::Redeemed::decode_log(log.as_ref()) {
                paid.insert(e.data.digest.0, (e.data.paid, e.data.burned));
            } else if let Ok(e) = MurmurLottery::Refused::decode_log(log.as_ref()) {
                refused.insert(e.data.index, e.data.reason.clone());
            }
        }
        let account = self.account(recipient).await?;
        // each pot as the batch left it, read once
        let mut pots = HashMap::new();
        let mut out = Vec::with_capacity(sent.len());
        for (j, &i) in sent.iter().enumerate() {
            let t = &reqs[i].op.ticket;
            let digest = t.digest();
            // the contract logs a refusal by the claim's index; a ticket twice in one batch
            // is paid for the first and refused for the second
            let result = match (refused.get(&U256::from(j)), paid.get(&digest)) {
                (Some(reason), _) => Err(match Refusal::from_label(reason) {
                    Some(r) => r.because(format!("the contract refused: {reason}")),
                    None => Error::Storage(format!("the contract refused: {reason}")),
                }),
                (None, Some(&(paid, burned))) => {
                    let pot = match pots.get(&t.pot) {
                        Some(&pot) => pot,
                        None => *pots.entry(t.pot).or_insert(self.pot(t.pot).await?),
                    };
                    Ok(Redemption {
                        paid,
                        burned,
                        account,
                        pot,
                    })
                }
                (None, None) => Err(Error::Storage("the batch logged nothing for it".into())),
            };
            self.let_go(digest, &result);
            out.push(result);
        }
        Ok(out)
    }

    /// Forgets a ticket's co-signature once the ticket is redeemed, by this or an earlier try.
    fn let_go<T>(&self, digest: [u8; 32], outcome: &Result<T>) {
        let settled = match outcome {
            Ok(_) => true,
            Err(e) => e.refusal() == Some(Refusal::AlreadyRedeemed),
        };
        if settled {
            lock(&self.cosignatures).remove(&digest);
        }
    }

    async fn is_redeemed(&self, digest: [u8; 32]) -> Result<bool> {
        self.read(|| async { self.contract.redeemed(B256::from(digest)).call().await })
            .await
    }

    async fn read_pot(&self, key: IdentityKey) -> Result<Option<(Address, Pot)>> {
        let p = self
            .read(|| async { self.contract.pots(B256::from(key.0)).call().await })
            .await?;
        if p.owner == Address::ZERO {
            return Ok(None);
        }
        {
            let mut owners = lock(&self.owners);
            if owners.len() >= MAX_OWNERS && !owners.contains_key(&key) {
                owners.clear();
            }
            owners.insert(key, p.owner);
        }
        let pot = Pot {
            key,
            balance: p.balance,
            escrow: p.escrow,
            warned: p.warned,
            unlock_at: (p.unlockAt != 0).then_some(p.unlockAt),
        };
        Ok(Some((p.owner, pot)))
    }
}

/// The operations, once admitted ([`ChainSettlement::admit`]).
impl ChainSettlement {
    async fn fund_admitted(&self, req: &Signed<Fund>) -> Result<Transfer> {
        let from = self.wallet(&req.signer)?;
        let Fund {
            pot,
            balance,
            escrow,
        } = req.op;
        pot.verifying_key().map_err(|_| {
            Refusal::Malformed.because(format!("{pot} is not an Ed25519 public key"))
        })?;
        let total = match balance.checked_add(escrow) {
            None | Some(0) => {
                return Err(Refusal::Malformed
                    .because("balance + escrow must be positive and fit in 64 bits"));
            }
            Some(total) => total,
        };
        let owner = match self.read_pot(pot).await? {
            Some((owner, _)) => owner,
            None => self.address_of(&pot).ok_or_else(|| {
                Refusal::Malformed.because(format!(
                    "pot {pot} is new and its owner's chain address is not known here"
                ))
            })?,
        };
        let held = self.account(req.signer).await?.balance;
        if held < total {
            return Err(Refusal::InsufficientFunds.because(format!(
                "account {} holds {held}; funding needs {total}",
                req.signer
            )));
        }
        let call = self
            .contract
            .fund(B256::from(pot.0), owner, balance, escrow)
            .value(U256::from(total) * U256::from(UNIT_WEI))
            .from(from);
        self.transact(call, Op::Fund, false).await?;
        Ok(Transfer {
            account: self.account(req.signer).await?,
            pot: self.pot(pot).await?,
        })
    }

    async fn warn_admitted(&self, req: &Signed<Warn>) -> Result<Pot> {
        let (pot, from) = self.own_pot(req)?;
        let call = self.contract.warn(pot, req.op.amount).from(from);
        self.transact(call, Op::Warn, false).await?;
        self.pot(req.signer).await
    }

    async fn withdraw_admitted(&self, req: &Signed<Withdraw>) -> Result<Transfer> {
        let (pot, from) = self.own_pot(req)?;
        let call = self.contract.withdraw(pot, req.op.amount).from(from);
        self.transact(call, Op::Withdraw, false).await?;
        Ok(Transfer {
            account: self.account(req.signer).await?,
            pot: self.pot(req.signer).await?,
        })
    }

    /// Checks off-chain what the contract cannot afford to (the request's and the ticket's
    /// Ed25519 signatures, and that the signer is the recipient), then redeems on chain with the
    /// co-signature [`ChainSettlement::accept_cosignature`] kept.
    async fn redeem_admitted(&self, req: &Signed<Redeem>) -> Result<Redemption> {
        let (claim, from) = self.claim(req).await?;
        let call = self
            .contract
            .redeem(claim.ticket, claim.reveal, from, claim.r, claim.vs)
            .from(from);
        let outcome = self.transact(call, Op::Redeem, true).await;
        self.let_go(req.op.ticket.digest(), &outcome);
        let receipt = outcome?;
        let event = receipt
            .decoded_log::<MurmurLottery::Redeemed>()
            .ok_or_else(|| Error::Storage("the redemption logged no Redeemed event".into()))?;
        Ok(Redemption {
            paid: event.data.paid,
            burned: event.data.burned,
            account: self.account(req.signer).await?,
            pot: self.pot(req.op.ticket.pot).await?,
        })
    }
}

impl Settlement for ChainSettlement {
    async fn fund(&self, req: Signed<Fund>) -> Result<Transfer> {
        self.once(&req, self.fund_admitted(&req)).await
    }

    async fn warn(&self, req: Signed<Warn>) -> Result<Pot> {
        self.once(&req, self.warn_admitted(&req)).await
    }

    async fn withdraw(&self, req: Signed<Withdraw>) -> Result<Transfer> {
        self.once(&req, self.withdraw_admitted(&req)).await
    }

    async fn redeem(&self, req: Signed<Redeem>) -> Result<Redemption> {
        self.once(&req, self.redeem_admitted(&req)).await
    }

    /// Each recipient's tickets in `redeemBatch` transactions of at most [`MAX_BATCH`]
    /// (a lone ticket by `redeem`, which costs less than a batch of one).
    async fn redeem_all(&self, reqs: Vec<Signed<Redeem>>) -> Vec<Result<Redemption>> {
        if let [one] = reqs.as_slice() {
            return vec![self.redeem(one.clone()).await];
        }
        let mut by_recipient: BTreeMap<IdentityKey, Vec<usize>> = BTreeMap::new();
        for (i, req) in reqs.iter().enumerate() {
            by_recipient.entry(req.signer).or_default().push(i);
        }
        let mut results: Vec<Option<Result<Redemption>>> = (0..reqs.len()).map(|_| None).collect();
        for (recipient, indices) in by_recipient {
            for chunk in indices.chunks(MAX_BATCH) {
                let batch: Vec<Signed<Redeem>> = chunk.iter().map(|&i| reqs[i].clone()).collect();
                let outcomes = self.redeem_batch(recipient, &batch).await;
                for (&i, outcome) in chunk.iter().zip(outcomes) {
                    results[i] = Some(outcome);
                }
            }
        }
        every_outcome(results)
    }

    async fn pot(&self, key: IdentityKey) -> Result<Pot> {
        self.read_pot(key)
            .await?
            .map(|(_, pot)| pot)
            .ok_or_else(|| Refusal::UnknownPot.because(format!("no pot has key {key}")))
    }

    /// The balance of the identity's chain wallet in whole base units (0 for an identity
    /// whose wallet is not known here).
    async fn account(&self, key: IdentityKey) -> Result<Account> {
        let Some(address) = self.address_of(&key) else {
            return Ok(Account { key, balance: 0 });
        };
        let provider = self.contract.provider();
        let mut attempt = 0;
        let wei = loop {
            match provider.get_balance(address).await {
                Ok(wei) => break wei,
                Err(e) if attempt >= self.config.retries => {
                    return Err(rpc_error(&self.config.rpc_url, e));
                }
                Err(_) => {}
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(100 << attempt.min(6))).await;
        };
        let units = wei / U256::from(UNIT_WEI);
        let balance = u64::try_from(units).unwrap_or(u64::MAX);
        Ok(Account { key, balance })
    }
}
