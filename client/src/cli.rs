//! The `murmur-client` command line.
//!
//! - `murmur-client --devnet`: start a local network in this process, then the proxy.
//! - `murmur-client --config client.toml`: the proxy against the authorities the file names.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ed25519_dalek::SigningKey;
use murmur_protocol::directory::IdentityKey;
use murmur_protocol::directory::path::PathRules;
use murmur_protocol::payer::PayerConfig;
use murmur_protocol::stream::DEFAULT_STREAM_WINDOW;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::devnet::{Devnet, DevnetOptions, FAUCET};
use crate::proxy::{self, PaymentOptions, ProxyOptions};
use crate::socks::SocksLimits;
use crate::wallet::FundingPolicy;

#[derive(Parser, Debug)]
#[command(
    name = "murmur-client",
    version,
    about = "SOCKS5 proxy into the Murmur mixnet",
    after_help = "Try it: murmur-client --devnet, then\n  curl --socks5-hostname 127.0.0.1:1080 http://example.com/"
)]
struct Cli {
    /// Start an embedded local network (3 authorities, a gateway, 3 mixes per layer, an exit
    /// that allows loopback) and use it.
    #[arg(long, conflicts_with = "config")]
    devnet: bool,
    /// The client configuration (authorities, limits).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where the SOCKS5 proxy listens (overrides the config).
    #[arg(long)]
    socks: Option<SocketAddr>,
    /// Devnet: mean per-hop delay, e.g. "15ms" or "0ms".
    #[arg(long, value_parser = humantime::parse_duration, requires = "devnet")]
    hop_delay: Option<Duration>,
    /// Devnet: λ_P, packets per second the client sends (real or cover).
    #[arg(long, requires = "devnet")]
    send_rate: Option<f64>,
    /// Devnet: λ_M, loop packets per second each relay sends (0: none).
    #[arg(long, requires = "devnet")]
    relay_loop_rate: Option<f64>,
    /// Devnet: the face value of the client's tickets, in base units (small values make
    /// many tickets win, so redemptions can be watched).
    #[arg(long, requires = "devnet")]
    ticket_face_value: Option<u64>,
    /// Devnet: packets each ticket to a mix or exit pays for.
    #[arg(long, requires = "devnet")]
    packets_per_ticket: Option<u64>,
    /// Never route through a relay that charges more than this per packet (overrides the
    /// config's `max_price_per_hop`; the devnet's relays charge 1, 2 or 5).
    #[arg(long)]
    max_price_per_hop: Option<u64>,
    /// Never route through a relay whose measured performance (the share of the
    /// authorities' test packets it carried, 0 to 1) is below this (overrides the config).
    #[arg(long)]
    min_performance: Option<f64>,
}

/// The path rules with the user's preferences: a price cap per hop and a performance floor
/// (0 to 1, as configured; per mille in the consensus).
fn path_rules(
    distinct_subnets: bool,
    max_price_per_hop: Option<u64>,
    min_performance: f64,
) -> anyhow::Result<PathRules> {
    if !(0.0..=1.0).contains(&min_performance) {
        anyhow::bail!("min_performance must lie in [0, 1], got {min_performance}");
    }
    Ok(PathRules {
        distinct_subnets,
        max_price_per_hop,
        // In [0, 1000] by the check above.
        min_performance: (min_performance * 1000.0).round() as u16,
    })
}

/// The client's configuration file.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub version: u32,
    #[serde(default = "default_socks")]
    pub socks: SocketAddr,
    pub authorities: Vec<AuthorityEntry>,
    #[serde(default = "default_skew", with = "humantime_serde")]
    pub clock_skew: Duration,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "default_open_timeout", with = "humantime_serde")]
    pub open_timeout: Duration,
    /// Bytes each stream may have in flight each way: the client's receive buffer per
    /// stream, announced to the exit, which grants at most its own maximum.
    #[serde(default = "default_stream_window")]
    pub stream_window: usize,
    /// Paths never hold two relays of one IPv4 /16 or IPv6 /32; turn off only for a test
    /// network on one host.
    #[serde(default = "default_true")]
    pub distinct_subnets: bool,
    /// Never route through a relay that charges more than this per packet.
    pub max_price_per_hop: Option<u64>,
    /// Never route through a relay whose performance score (0 to 1: the share of the
    /// authorities' test packets it carried) is below this.
    #[serde(default)]
    pub min_performance: f64,
    /// Paying relays; without it the client pays nothing (relays that charge may drop
    /// its traffic, and gateways cut it off).
    pub payments: Option<PaymentsConfig>,
}

/// `[payments]`: the ledger, the pot's key and how the client pays.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PaymentsConfig {
    /// The ledger's base URL.
    pub ledger: String,
    /// The ledger's identity key, 64 hex digits (what `murmur-ledger keygen` printed): only
    /// answers signed by it are believed.
    pub ledger_key: String,
    /// The pot's Ed25519 key (32 raw bytes or 64 hex characters, as `murmur-relay keygen`
    /// writes them); its ledger account funds the pot.
    pub key_file: PathBuf,
    #[serde(default = "default_face_value")]
    pub face_value: u64,
    #[serde(default = "default_packets_per_ticket")]
    pub packets_per_ticket: u64,
    #[serde(default = "default_gateway_frames_per_ticket")]
    pub gateway_frames_per_ticket: u64,
    /// The balance a top-up restores, and the balance below which the pot is topped up.
    #[serde(default = "default_target_balance")]
    pub target_balance: u64,
    #[serde(default = "default_low_water")]
    pub low_water: u64,
}

fn default_face_value() -> u64 {
    PayerConfig::default().face_value
}
fn default_packets_per_ticket() -> u64 {
    PayerConfig::default().packets_per_ticket
}
fn default_gateway_frames_per_ticket() -> u64 {
    PayerConfig::default().gateway_frames_per_ticket
}
fn default_target_balance() -> u64 {
    1_000 * PayerConfig::default().face_value
}
fn default_low_water() -> u64 {
    100 * PayerConfig::default().face_value
}

impl PaymentsConfig {
    /// The proxy's payment options, reading the key file.
    pub fn options(&self, base: &Path) -> anyhow::Result<PaymentOptions> {
        let path = base.join(&self.key_file);
        let key = murmur_directory::keys::load(&path)
            .map_err(|e| anyhow::anyhow!("pot key {}: {e}", path.display()))?;
        Ok(payment_options(
            self.ledger.clone(),
            self.ledger_identity()?,
            key,
            PayerConfig {
                face_value: self.face_value,
                packets_per_ticket: self.packets_per_ticket,
                gateway_frames_per_ticket: self.gateway_frames_per_ticket,
                ..PayerConfig::default()
            },
            self.target_balance,
            self.low_water,
        ))
    }
}

impl PaymentsConfig {
    /// The ledger's identity key, checked to be an Ed25519 public key.
    pub fn ledger_identity(&self) -> anyhow::Result<IdentityKey> {
        IdentityKey::from_hex(&self.ledger_key)
            .and_then(|k| k.verifying_key().map(|_| k))
            .map_err(|e| anyhow::anyhow!("payments.ledger_key {}: {e}", self.ledger_key))
    }
}

/// Payment options whose pot keeps an escrow of twice the face value (what relays require
/// for a ticket of that face value to be covered).
fn payment_options(
    ledger: String,
    ledger_key: IdentityKey,
    key: SigningKey,
    payer: PayerConfig,
    target_balance: u64,
    low_water: u64,
) -> PaymentOptions {
    PaymentOptions {
        ledger,
        ledger_key,
        key,
        funding: FundingPolicy {
            low_water,
            target_balance,
            escrow: payer.face_value.saturating_mul(2),
        },
        payer,
        check_every: Duration::from_secs(10),
    }
}

fn default_true() -> bool {
    true
}

/// One authority.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthorityEntry {
    pub identity: String,
    pub url: String,
}

fn default_socks() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1080))
}
fn default_skew() -> Duration {
    Duration::from_secs(60)
}
fn default_max_connections() -> usize {
    1024
}
fn default_open_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_stream_window() -> usize {
    DEFAULT_STREAM_WINDOW
}
/// The largest stream window a client may configure (a stream's window travels as 32 bits;
/// this keeps a misconfigured client from promising buffers it cannot hold).
pub const MAX_STREAM_WINDOW: usize = 64 << 20;

impl ClientConfig {
    /// Parses and checks a configuration.
    pub fn parse(text: &str) -> anyhow::Result<ClientConfig> {
        let c: ClientConfig = toml::from_str(text)?;
        if c.version != 1 {
            anyhow::bail!("config version {} is not supported (expected 1)", c.version);
        }
        if c.authorities.is_empty() {
            anyhow::bail!("the config lists no authorities");
        }
        for a in &c.authorities {
            IdentityKey::from_hex(&a.identity)?;
        }
        if let Some(p) = &c.payments {
            p.ledger_identity()?;
        }
        if c.stream_window == 0 || c.stream_window > MAX_STREAM_WINDOW {
            anyhow::bail!(
                "stream_window {} must be between 1 and {MAX_STREAM_WINDOW} bytes",
                c.stream_window
            );
        }
        Ok(c)
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,murmur_client=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("murmur-client: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("murmur-client: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            murmur_relay::cli::shutdown_signal().await;
            shutdown.cancel();
        });
    }
    let socks_limits = |c: Option<&ClientConfig>| SocksLimits {
        max_connections: c.map_or(1024, |c| c.max_connections),
        handshake_timeout: Duration::from_secs(10),
        open_timeout: c.map_or(Duration::from_secs(60), |c| c.open_timeout),
    };
    if cli.devnet {
        let mut options = DevnetOptions::default();
        if let Some(d) = cli.hop_delay {
            options.mean_hop_delay = d;
        }
        if let Some(r) = cli.send_rate {
            options.lambda_p = r;
        }
        if let Some(r) = cli.relay_loop_rate {
            options.lambda_m = r;
        }
        let devnet = Devnet::start(&options).await?;
        eprintln!(
            "devnet: 3 authorities, 1 gateway, {} mixes per layer, 1 exit (state in {})",
            options.mixes_per_layer,
            devnet.dir().display()
        );
        eprintln!(
            "devnet: ledger {url} (identity {key}); a relay's earnings: \
             curl -s {url}/v1/account/<identity>",
            url = devnet.ledger_url,
            key = devnet.ledger_key
        );
        for (name, identity) in &devnet.relays {
            eprintln!("devnet: relay {name:<9} {}", identity.to_hex());
        }
        let proxy_options = ProxyOptions {
            socks: cli.socks.unwrap_or_else(default_socks),
            authorities: devnet.authorities.clone(),
            clock_skew: Duration::from_secs(5),
            path_rules: path_rules(
                devnet.path_rules.distinct_subnets,
                cli.max_price_per_hop,
                cli.min_performance.unwrap_or(0.0),
            )?,
            socks_limits: socks_limits(None),
            stream_window: DEFAULT_STREAM_WINDOW,
            refresh_every: Duration::from_secs(1),
            payment: Some(devnet_payment(
                &devnet,
                cli.ticket_face_value,
                cli.packets_per_ticket,
            )),
        };
        let result = proxy::run(proxy_options, announce_ready, shutdown.clone()).await;
        devnet.stop().await;
        return result;
    }
    let Some(path) = cli.config else {
        anyhow::bail!("give --devnet for a local network, or --config FILE (see --help)");
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let config = ClientConfig::parse(&text)
        .map_err(|e| anyhow::anyhow!("invalid config {}: {e}", path.display()))?;
    let authorities = config
        .authorities
        .iter()
        .map(|a| Ok((IdentityKey::from_hex(&a.identity)?, a.url.clone())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let options = ProxyOptions {
        socks: cli.socks.unwrap_or(config.socks),
        authorities,
        clock_skew: config.clock_skew,
        path_rules: path_rules(
            config.distinct_subnets,
            cli.max_price_per_hop.or(config.max_price_per_hop),
            cli.min_performance.unwrap_or(config.min_performance),
        )?,
        socks_limits: socks_limits(Some(&config)),
        stream_window: config.stream_window,
        // How often the held consensus is checked; the directory is asked only once it is no
        // longer fresh, so this bounds how late the client moves to a new epoch's keys.
        refresh_every: Duration::from_secs(2),
        payment: match &config.payments {
            Some(p) => Some(p.options(path.parent().unwrap_or(Path::new(".")))?),
            None => None,
        },
    };
    proxy::run(options, announce_ready, shutdown).await
}

/// The devnet client pays from the faucet's account; the pot is funded on start.
fn devnet_payment(
    devnet: &Devnet,
    face_value: Option<u64>,
    packets_per_ticket: Option<u64>,
) -> PaymentOptions {
    let defaults = PayerConfig::default();
    let payer = PayerConfig {
        face_value: face_value.unwrap_or(defaults.face_value).max(1),
        packets_per_ticket: packets_per_ticket
            .unwrap_or(defaults.packets_per_ticket)
            .max(1),
        ..defaults
    };
    let mut options = payment_options(
        devnet.ledger_url.clone(),
        devnet.ledger_key,
        devnet.payer_key.clone(),
        payer,
        FAUCET / 10,
        FAUCET / 100,
    );
    options.check_every = Duration::from_secs(2);
    options
}

fn announce_ready(addr: SocketAddr) {
    println!("murmur-client ready: SOCKS5 proxy on {addr}");
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    const AUTHORITY: &str = "authorities = [ { identity = \"0101010101010101010101010101010101010101010101010101010101010101\", url = \"http://127.0.0.1:7070\" } ]\n";

    #[test]
    fn payments_are_optional_and_read_their_key() {
        let plain = ClientConfig::parse(&format!("version = 1\n{AUTHORITY}")).unwrap();
        assert_eq!(plain.payments, None);

        let dir = tempfile::tempdir().unwrap();
        let identity = murmur_directory::keys::keygen(&dir.path().join("pot.key")).unwrap();
        let ledger = IdentityKey::of(&SigningKey::from_bytes(&[3; 32]));
        let text = format!(
            "version = 1\n{AUTHORITY}[payments]\nledger = \"http://127.0.0.1:7080\"\n\
             ledger_key = \"{ledger}\"\nkey_file = \"pot.key\"\nface_value = 500\n\
             packets_per_ticket = 8\n"
        );
        let config = ClientConfig::parse(&text).unwrap();
        let options = config.payments.unwrap().options(dir.path()).unwrap();
        assert_eq!(IdentityKey::of(&options.key), identity);
        assert_eq!(options.ledger_key, ledger);
        assert_eq!(options.payer.face_value, 500);
        assert_eq!(options.payer.packets_per_ticket, 8);
        assert_eq!(
            options.payer.gateway_frames_per_ticket,
            PayerConfig::default().gateway_frames_per_ticket
        );
        // The escrow lets the pot cover the face value (the ledger's usable is escrow / 2).
        assert_eq!(options.funding.escrow, 1_000);

        let missing = ClientConfig::parse(&text.replace("pot.key", "nope.key"))
            .unwrap()
            .payments
            .unwrap()
            .options(dir.path());
        assert!(missing.unwrap_err().to_string().contains("nope.key"));
        let typo = text.replace("face_value", "face_valu");
        assert!(
            ClientConfig::parse(&typo).is_err(),
            "unknown keys are refused"
        );
        // The ledger's key is required, and must be a key.
        let unkeyed = text.replace(&format!("ledger_key = \"{ledger}\"\n"), "");
        let err = ClientConfig::parse(&unkeyed).unwrap_err().to_string();
        assert!(err.contains("ledger_key"), "{err}");
        let bad = text.replace(&ledger.to_hex(), "00");
        let err = ClientConfig::parse(&bad).unwrap_err().to_string();
        assert!(err.contains("payments.ledger_key"), "{err}");
    }
}
