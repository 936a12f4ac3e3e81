#![doc = include_str!("../README.md")]

//! A whole Murmur network on loopback, in this process.
//!
//! Three directory authorities, a ledger whose genesis funds the client, one gateway, three
//! mixes per layer and one exit whose policy allows loopback destinations (and, like Tor's
//! default, refuses port 25), each with its own keys and state in a temporary directory, each
//! the same code the daemons run (`murmur_directory::serve`, `murmur_ledger::serve`,
//! `murmur_relay::cli::run`). Every relay takes payments at the ledger, and it and the client
//! are given the ledger's identity key, so they believe only the ledger's signed answers. Epochs are short so
//! key rotation, and the redemption of winning tickets once their epoch retires, happen while
//! you watch.

pub mod cli;

use std::path::{Path, PathBuf};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use murmur_directory::config::{AuthorityEntry, Config as AuthorityConfig};
use murmur_ledger::{ChainSection, SettlementChoice};
use murmur_protocol::directory::path::PathRules;
use murmur_protocol::directory::{IdentityKey, bounds};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The shape and pace of the local network.
#[derive(Clone, Debug)]
pub struct DevnetOptions {
    pub mixes_per_layer: usize,
    pub epoch_length: Duration,
    /// Mean per-hop delay (1/μ). Zero means the shortest the directory accepts (μ at the top
    /// of `directory::bounds::MU`, a 10 µs mean).
    pub mean_hop_delay: Duration,
    /// λ_P, packets per second per client.
    pub lambda_p: f64,
    pub lambda_l: f64,
    pub lambda_d: f64,
    pub lambda_m: f64,
    /// Where the relays' Prometheus `/metrics` is served, if anywhere. The relays run in this
    /// process and share its one recorder, so the first relay serves every relay's counters
    /// together (drops by reason, queue depths, tabs).
    pub relay_metrics: Option<std::net::SocketAddr>,
    /// Where the relays redeem and the client's pot is: the devnet's ledger, or a local
    /// Anvil chain with the contract deployed (the `chain` feature).
    pub settlement: SettlementChoice,
}

impl Default for DevnetOptions {
    fn default() -> Self {
        DevnetOptions {
            mixes_per_layer: 3,
            epoch_length: Duration::from_secs(20),
            mean_hop_delay: Duration::from_millis(15),
            lambda_p: 100.0,
            lambda_l: 2.0,
            lambda_d: 2.0,
            lambda_m: 2.0,
            relay_metrics: None,
            settlement: SettlementChoice::Ledger,
        }
    }
}

impl DevnetOptions {
    /// μ for the mean hop delay: `1 / mean`, at most the directory's bound.
    pub fn mu(&self) -> f64 {
        let mean = self.mean_hop_delay.as_secs_f64();
        if mean > 0.0 {
            (1.0 / mean).min(bounds::MU.1)
        } else {
            bounds::MU.1
        }
    }
}

/// What the devnet's faucet credits the client's account with at genesis, in base units.
pub const FAUCET: u64 = 1_000_000_000_000;

/// On a chain, what each relay's wallet holds at the start for its redemptions' gas, in base
/// units (gwei): 10 ETH.
pub const RELAY_GAS_MONEY: u64 = 10_000_000_000;

/// The devnet chain's price per gas, in wei (1 gwei): Anvil's base fee, and what the relays
/// and the client pay.
pub const CHAIN_GAS_PRICE_WEI: u64 = 1_000_000_000;

/// The devnet chain's notice period for withdrawals.
#[cfg(feature = "chain")]
const CHAIN_NOTICE_S: u64 = 3600;

/// The local chain, when the devnet settles on one.
#[derive(Clone, Debug)]
pub struct DevnetChain {
    /// Anvil's JSON-RPC endpoint.
    pub rpc_url: String,
    /// The deployed contract, `0x…`.
    pub contract: String,
}

impl DevnetChain {
    /// The `[payments.chain]` section relays and the client use.
    pub fn section(&self) -> ChainSection {
        ChainSection {
            rpc_url: self.rpc_url.clone(),
            contract: self.contract.clone(),
            confirmations: 1,
            gas_price_wei: Some(CHAIN_GAS_PRICE_WEI),
            timeout_s: 60,
            retries: 3,
        }
    }
}

/// Anvil with the contract, the client's wallet funded with [`FAUCET`].
#[cfg(feature = "chain")]
async fn start_chain(payer: &SigningKey) -> anyhow::Result<murmur_chain::anvil::LocalChain> {
    use murmur_chain::anvil::{LocalChain, ensure_installed};
    if !ensure_installed() {
        anyhow::bail!(
            "--settlement chain needs Anvil: chain/contract/build.sh --tools installs it (npm), \
             or set MURMUR_ANVIL"
        );
    }
    let address = murmur_chain::wallet_of(payer).address();
    Ok(LocalChain::start(CHAIN_GAS_PRICE_WEI, CHAIN_NOTICE_S, &[(address, FAUCET)]).await?)
}

/// A running local network.
pub struct Devnet {
    pub authorities: Vec<(IdentityKey, String)>,
    /// The ledger's base URL.
    pub ledger_url: String,
    /// The ledger's identity key: every relay and the client believe only answers it signs.
    pub ledger_key: IdentityKey,
    /// The client's payer key: its account holds [`FAUCET`] from genesis.
    pub payer_key: SigningKey,
    pub path_rules: PathRules,
    /// The relays' names (their state lives under `dir()/<name>`) and identities.
    pub relays: Vec<(String, IdentityKey)>,
    /// The chain the relays redeem on, with `settlement = chain`.
    pub chain: Option<DevnetChain>,
    #[cfg(feature = "chain")]
    _anvil: Option<murmur_chain::anvil::LocalChain>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    _dir: tempfile::TempDir,
}

impl Devnet {
    /// Starts everything; returns once every listener is bound and the relays are uploading.
    pub async fn start(options: &DevnetOptions) -> anyhow::Result<Devnet> {
        let dir = tempfile::Builder::new()
            .prefix("murmur-devnet-")
            .tempdir()?;
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let epoch = options.epoch_length.as_secs().max(4);

        // Authorities: bind first so every one knows every URL.
        let mut listeners = Vec::new();
        let mut entries = Vec::new();
        let mut keys = Vec::new();
        for i in 0..3 {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let url = format!("http://{}", listener.local_addr()?);
            let key_path = dir.path().join(format!("authority-{i}.key"));
            let identity = murmur_service::keys::keygen(&key_path)?;
            entries.push(AuthorityEntry {
                identity: identity.to_hex(),
                url: url.clone(),
            });
            keys.push((identity, url));
            listeners.push((listener, key_path));
        }
        for (i, (listener, key_path)) in listeners.into_iter().enumerate() {
            let mut config = AuthorityConfig::with_defaults();
            config.listen = listener.local_addr()?;
            config.key_file = key_path;
            config.state_dir = dir.path().join(format!("authority-{i}"));
            config.authorities = entries.clone();
            config.schedule.epoch_length = Duration::from_secs(epoch);
            config.schedule.vote_lead = Duration::from_secs(epoch * 6 / 10);
            config.schedule.compute_lead = Duration::from_secs((epoch * 4 / 10).max(1));
            config.network.lambda_p = options.lambda_p;
            config.network.lambda_l = options.lambda_l;
            config.network.lambda_d = options.lambda_d;
            config.network.lambda_m = options.lambda_m;
            config.network.mu = options.mu();
            config.policy.allow_private_addresses = true;
            // Every relay, the client and the other authorities connect from 127.0.0.1.
            config.limits.max_connections_per_address = config.limits.max_connections;
            config.limits.uploads_per_minute_per_address = 10_000;
            // Test relays often, so a relay is voted in (or out) within an epoch.
            config.probe.listen = "127.0.0.1:0".parse()?;
            config.probe.interval = Duration::from_secs(2);
            config.probe.timeout = Duration::from_secs(2);
            config.probe.packets = 8;
            // Checked before anything starts (every authority's parameters are the same).
            config
                .validate()
                .map_err(|e| anyhow::anyhow!("devnet options: {e}"))?;
            let stop = shutdown.clone();
            tracker.spawn(async move {
                if let Err(e) =
                    murmur_directory::serve(config, listener, async move { stop.cancelled().await })
                        .await
                {
                    tracing::error!(error = %e, "devnet authority stopped");
                }
            });
        }

        // The ledger, with the client's account as its faucet.
        let payer_key = SigningKey::generate(&mut rand::rng());
        let ledger_listener = TcpListener::bind("127.0.0.1:0").await?;
        let ledger_url = format!("http://{}", ledger_listener.local_addr()?);
        let ledger_key_file = dir.path().join("ledger.key");
        let ledger_key = murmur_service::keys::keygen(&ledger_key_file)?;
        {
            let mut config = murmur_ledger::Config::with_defaults();
            config.listen = ledger_listener.local_addr()?;
            config.key_file = ledger_key_file;
            config.state_dir = dir.path().join("ledger");
            // Every relay and the client connect from 127.0.0.1.
            config.limits.max_connections_per_address = config.limits.max_connections;
            config.genesis = vec![murmur_ledger::config::GenesisEntry {
                account: IdentityKey::of(&payer_key).to_hex(),
                amount: FAUCET,
            }];
            let stop = shutdown.clone();
            tracker.spawn(async move {
                let stopped = async move { stop.cancelled().await };
                if let Err(e) = murmur_ledger::serve(config, ledger_listener, stopped).await {
                    tracing::error!(error = %e, "devnet ledger stopped");
                }
            });
        }

        // The chain, if the devnet settles on one.
        #[cfg(feature = "chain")]
        let anvil = match options.settlement {
            SettlementChoice::Chain => Some(start_chain(&payer_key).await?),
            SettlementChoice::Ledger => None,
        };
        #[cfg(not(feature = "chain"))]
        if options.settlement == SettlementChoice::Chain {
            anyhow::bail!(
                "--settlement chain needs a murmur-devnet built with the `chain` feature \
                 (cargo run --release -p murmur-devnet --features chain -- --settlement chain)"
            );
        }
        #[cfg(feature = "chain")]
        let chain = anvil.as_ref().map(|a| DevnetChain {
            rpc_url: a.node.url(),
            contract: a.contract.to_string(),
        });
        #[cfg(not(feature = "chain"))]
        let chain: Option<DevnetChain> = None;

        // Relays.
        let authorities_toml: String = entries
            .iter()
            .map(|e| format!("{{ identity = \"{}\", url = \"{}\" }}", e.identity, e.url))
            .collect::<Vec<_>>()
            .join(", ");
        let mut roles: Vec<(String, &str)> = vec![("gateway".into(), "[\"gateway\"]")];
        for layer in 0..3 {
            for m in 0..options.mixes_per_layer {
                roles.push((format!("mix-{layer}-{m}"), "[\"mix\"]"));
            }
        }
        roles.push(("exit".into(), "[\"exit\"]"));
        let mut relays = Vec::new();
        for (i, (name, role)) in roles.into_iter().enumerate() {
            let rdir = dir.path().join(&name);
            std::fs::create_dir_all(&rdir)?;
            let identity = murmur_service::keys::keygen(&rdir.join("identity.key"))?;
            #[cfg(feature = "chain")]
            if let Some(anvil) = &anvil {
                // Gas money for its redemptions; its descriptor publishes the address.
                let key = murmur_service::keys::load(&rdir.join("identity.key"))?;
                let wallet = murmur_chain::wallet_of(&key).address();
                anvil.set_balance(wallet, RELAY_GAS_MONEY).await?;
            }
            let payments = match &chain {
                Some(c) => chain_payments_toml(&c.section()),
                None => format!("ledger = \"{ledger_url}\"\nledger_key = \"{ledger_key}\"\n"),
            };
            // Each relay on its own loopback address (all of 127.0.0.0/8 is local on Linux),
            // as separate hosts would be, so the authorities' per-address limit holds; and
            // prices that differ, so `--max-price` has something to choose from.
            let host = std::net::Ipv4Addr::new(127, 0, 0, 10 + u8::try_from(i).unwrap_or(0));
            let price = DEVNET_PRICES[i % DEVNET_PRICES.len()];
            let mut text = relay_config(
                &name,
                role,
                &authorities_toml,
                epoch,
                &payments,
                host,
                price,
            );
            if let (0, Some(addr)) = (i, options.relay_metrics) {
                text = text.replace("[listen]\n", &format!("[listen]\nmetrics = \"{addr}\"\n"));
            }
            let config = murmur_relay::Config::parse(&text, rdir.clone())
                .map_err(|e| anyhow::anyhow!("devnet relay config: {e}"))?;
            relays.push((name.clone(), identity));
            let stop = shutdown.clone();
            tracker.spawn(async move {
                if let Err(e) =
                    murmur_relay::cli::run(config, async move { stop.cancelled().await }).await
                {
                    tracing::error!(relay = name, error = %e, "devnet relay stopped");
                }
            });
        }
        Ok(Devnet {
            authorities: keys,
            ledger_url,
            ledger_key,
            payer_key,
            path_rules: PathRules {
                distinct_subnets: false,
                ..PathRules::default()
            },
            relays,
            chain,
            #[cfg(feature = "chain")]
            _anvil: anvil,
            shutdown,
            tracker,
            _dir: dir,
        })
    }

    /// Where the network keeps its keys and state.
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// Stops every authority and relay and waits for them.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Relay prices per packet, in turn: most relays cost 1, some 2 and 5.
pub const DEVNET_PRICES: [u64; 4] = [1, 2, 1, 5];

/// The `[payments]` lines that point a relay at a chain (the section's header is the
/// relay config's; these come last in it).
fn chain_payments_toml(c: &ChainSection) -> String {
    format!(
        "settlement = \"chain\"\n[payments.chain]\nrpc_url = \"{}\"\ncontract = \"{}\"\n\
         confirmations = {}\ngas_price_wei = {}\ntimeout_s = {}\n",
        c.rpc_url,
        c.contract,
        c.confirmations,
        c.gas_price_wei.unwrap_or(CHAIN_GAS_PRICE_WEI),
        c.timeout_s
    )
}

/// A devnet relay's config; `payments` are its `[payments]` lines that say where it redeems.
fn relay_config(
    name: &str,
    roles: &str,
    authorities: &str,
    epoch: u64,
    payments: &str,
    host: std::net::Ipv4Addr,
    price: u64,
) -> String {
    let state: PathBuf = PathBuf::from("state");
    format!(
        r#"version = 1
[relay]
family = "devnet-{name}"
roles = {roles}
state_dir = "{state}"
price_per_packet = {price}
[listen]
mix = "{host}:0"
client = "{host}:0"
[directory]
authorities = [{authorities}]
epoch_length = "{epoch}s"
key_grace = "{epoch}s"
[mixing]
workers = 1
replay_capacity = 1000000
# Every devnet relay is in 127.0.0.0/16.
distinct_subnets = false
[exit]
# Like Tor's default, refuse SMTP, so a policy refusal can be seen; loopback is allowed,
# and so is 127.0.0.1, the exit's own address.
policy = "reject *:25, accept *:*"
allow_private = true
allow_own_addresses = true
connect_timeout = "3s"
[payments]
# Redeem soon after an epoch's key retires, so earnings show within a minute or two.
redeem_interval = "5s"
pot_refresh = "5s"
{payments}"#,
        state = state.display()
    )
}
