//! The `murmur-client` command line: `murmur-client --config client.toml` runs the proxy
//! against the authorities the file names. (The local network is `murmur-devnet`, which runs
//! this proxy with the pieces here marked for it.)

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ed25519_dalek::SigningKey;
use murmur_ledger::{ChainSection, SettlementChoice};
use murmur_protocol::directory::IdentityKey;
use murmur_protocol::directory::path::PathRules;
use murmur_protocol::payer::PayerConfig;
use murmur_protocol::stream::DEFAULT_STREAM_WINDOW;
use serde::Deserialize;

use crate::proxy::{self, ChainPayment, PaymentOptions, ProxyOptions};
use crate::stream::{Listener, SafeSocks, SocksLimits};
use crate::wallet::FundingPolicy;

#[derive(Parser, Debug)]
#[command(
    name = "murmur-client",
    version,
    about = "SOCKS5 and HTTP CONNECT proxy into the Murmur mixnet",
    after_help = "A local network to try it on: cargo run --release -p murmur-devnet"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The client configuration (authorities, limits).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    listeners: ListenerFlags,
    /// Where the control endpoint (status, /metrics) listens, on loopback, or `off`
    /// (overrides the config; default 127.0.0.1:1090).
    #[arg(long, value_parser = parse_control)]
    control: Option<ControlAddress>,
    #[command(flatten)]
    preferences: PathPreferences,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// What the running client is doing: gateway, consensus, streams, packets, what it paid
    /// to whom, the pot.
    Status {
        /// The running client's control address (default: the config's, else
        /// 127.0.0.1:1090).
        #[arg(long)]
        control: Option<SocketAddr>,
        /// The running client's config, to find its control address.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `--control`: an address, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlAddress(pub Option<SocketAddr>);

/// Parses `--control ADDR|off`.
pub fn parse_control(s: &str) -> Result<ControlAddress, String> {
    if s == "off" {
        return Ok(ControlAddress(None));
    }
    let addr: SocketAddr = s
        .parse()
        .map_err(|e| format!("{s}: not an address or `off`: {e}"))?;
    crate::control::check_address(addr).map_err(|e| e.to_string())?;
    Ok(ControlAddress(Some(addr)))
}

/// Where the proxies listen, on the command line (the client's and the devnet's). A flag
/// cannot allow a non-loopback address: only `allow_non_loopback = true` in the config can.
#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct ListenerFlags {
    /// Where the SOCKS5 proxy listens (overrides the config; loopback unless the config's
    /// [socks] allows otherwise).
    #[arg(long)]
    pub socks: Option<SocketAddr>,
    /// Serve an HTTP CONNECT proxy here too (overrides the config's [http] listen).
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// What to do with a target given as an IP address (the application resolved the name
    /// itself, leaking the lookup): warn (log it, without the address), refuse, or off
    /// (overrides the config's [socks] safe).
    #[arg(long, value_enum)]
    pub safe_socks: Option<SafeSocks>,
}

impl ListenerFlags {
    /// The listeners and the `safe` setting: the flags over `config`'s (or the defaults').
    pub fn apply(&self, config: Option<&ClientConfig>) -> (Listener, Option<Listener>, SafeSocks) {
        let socks = config.map_or_else(SocksTable::default, |c| c.socks.table());
        let http = config.and_then(|c| c.http.as_ref());
        let http = match (self.http, http) {
            (Some(addr), c) => Some(Listener {
                addr,
                allow_non_loopback: c.is_some_and(|c| c.allow_non_loopback),
            }),
            (None, Some(c)) => Some(Listener {
                addr: c.listen,
                allow_non_loopback: c.allow_non_loopback,
            }),
            (None, None) => None,
        };
        (
            Listener {
                addr: self.socks.unwrap_or(socks.listen),
                allow_non_loopback: socks.allow_non_loopback,
            },
            http,
            self.safe_socks.unwrap_or(socks.safe),
        )
    }
}

/// What the user asks of every path, on the command line (the client's and the devnet's).
#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct PathPreferences {
    /// Never route through a relay that charges more than this per packet (overrides the
    /// config's `max_price_per_hop`; the devnet's relays charge 1, 2 or 5).
    #[arg(long)]
    pub max_price_per_hop: Option<u64>,
    /// Never route through a relay whose measured performance (the share of the
    /// authorities' test packets it carried, 0 to 1) is below this (overrides the config).
    #[arg(long)]
    pub min_performance: Option<f64>,
}

/// What `murmur-client --devnet` answers: the local network has its own program.
pub const DEVNET_MOVED: &str = "the local network is its own program now: \
     cargo run --release -p murmur-devnet (or target/release/murmur-devnet), with the same flags";

/// The path rules with the user's preferences: a price cap per hop and a performance floor
/// (0 to 1, as configured; per mille in the consensus).
pub fn path_rules(
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
    /// The SOCKS5 proxy: an address (`socks = "127.0.0.1:1080"`) or a `[socks]` table.
    #[serde(default)]
    pub socks: SocksConfig,
    /// `[http]`: an HTTP CONNECT proxy beside the SOCKS5 one; none without it.
    pub http: Option<HttpConfig>,
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
    /// Where the client keeps its guard (relative to the config file's directory); default
    /// `$XDG_STATE_HOME/murmur-client`, else `~/.local/state/murmur-client`.
    pub state_dir: Option<PathBuf>,
    #[serde(default)]
    pub control: ControlConfig,
}

/// `[control]`: the status and metrics endpoint.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// On loopback only.
    #[serde(default = "crate::control::default_control")]
    pub listen: SocketAddr,
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            listen: crate::control::default_control(),
            enabled: true,
        }
    }
}

impl ControlConfig {
    fn address(&self) -> Option<SocketAddr> {
        self.enabled.then_some(self.listen)
    }
}

/// The state directory when the config names none.
fn default_state_dir() -> Option<PathBuf> {
    let xdg = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let home = || std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state"));
    xdg.or_else(home).map(|d| d.join("murmur-client"))
}

/// The SOCKS5 proxy's settings: the older form, only its address, or the table.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum SocksConfig {
    Address(SocketAddr),
    Table(SocksTable),
}

impl Default for SocksConfig {
    fn default() -> Self {
        SocksConfig::Table(SocksTable::default())
    }
}

impl SocksConfig {
    /// The settings as a table (an address alone takes the defaults for the rest).
    pub fn table(&self) -> SocksTable {
        match self {
            SocksConfig::Address(listen) => SocksTable {
                listen: *listen,
                ..SocksTable::default()
            },
            SocksConfig::Table(t) => *t,
        }
    }
}

/// `[socks]`.
#[derive(Debug, Deserialize, PartialEq, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub struct SocksTable {
    #[serde(default = "default_socks")]
    pub listen: SocketAddr,
    /// What to do with a target given as an IP address (both proxies).
    #[serde(default)]
    pub safe: SafeSocks,
    /// Listen beyond loopback (an open proxy that spends the pot, unless firewalled).
    #[serde(default)]
    pub allow_non_loopback: bool,
}

impl Default for SocksTable {
    fn default() -> Self {
        SocksTable {
            listen: default_socks(),
            safe: SafeSocks::default(),
            allow_non_loopback: false,
        }
    }
}

/// `[http]`: the HTTP CONNECT proxy.
#[derive(Debug, Deserialize, PartialEq, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    #[serde(default)]
    pub allow_non_loopback: bool,
}

/// `[payments]`: the ledger, the pot's key and how the client pays.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PaymentsConfig {
    /// Where the pot is: `"ledger"` (the default; `ledger` and `ledger_key`) or `"chain"`
    /// (`[payments.chain]`; a build with the `chain` feature).
    #[serde(default)]
    pub settlement: SettlementChoice,
    /// The node and contract, for `settlement = "chain"`.
    pub chain: Option<ChainSection>,
    /// The ledger's base URL (with `settlement = "ledger"`).
    #[serde(default)]
    pub ledger: String,
    /// The ledger's identity key, 64 hex digits (what `murmur-ledger keygen` printed): only
    /// answers signed by it are believed.
    #[serde(default)]
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
    /// No new stream opens once the tickets signed since the client started are worth this
    /// much (base units, in expected value); absent: no cap.
    pub max_spend: Option<u64>,
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
        let key = murmur_service::keys::load(&path)
            .map_err(|e| anyhow::anyhow!("pot key {}: {e}", path.display()))?;
        let chain = self.chain_payment()?;
        let ledger_key = match chain {
            // Not used: the chain has no ledger key.
            Some(_) => IdentityKey([0; 32]),
            None => self.ledger_identity()?,
        };
        let mut options = payment_options(
            self.ledger.clone(),
            ledger_key,
            key,
            PayerConfig {
                face_value: self.face_value,
                packets_per_ticket: self.packets_per_ticket,
                gateway_frames_per_ticket: self.gateway_frames_per_ticket,
                ..PayerConfig::default()
            },
            self.target_balance,
            self.low_water,
        );
        options.max_spend = self.max_spend;
        options.chain = chain;
        Ok(options)
    }

    /// The chain pot's settings, if `settlement = "chain"`; checks that the choice, the
    /// section and the ledger fields agree.
    pub fn chain_payment(&self) -> anyhow::Result<Option<ChainPayment>> {
        murmur_ledger::choice::check_choice("payments", self.settlement, self.chain.as_ref())
            .map_err(|e| anyhow::anyhow!(e))?;
        let Some(section) = &self.chain else {
            return Ok(None);
        };
        if !self.ledger.is_empty() || !self.ledger_key.is_empty() {
            anyhow::bail!(
                "payments.ledger and ledger_key are set but payments.settlement is \"chain\": \
                 the pot is at one of them; remove ledger and ledger_key"
            );
        }
        Ok(Some(ChainPayment {
            section: section.clone(),
        }))
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
pub fn payment_options(
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
        max_spend: None,
        chain: None,
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

/// The SOCKS5 proxy's address unless told otherwise.
pub fn default_socks() -> SocketAddr {
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
        if let Some(p) = &c.payments
            && p.chain_payment()?.is_none()
        {
            p.ledger_identity()?;
        }
        if c.control.enabled {
            crate::control::check_address(c.control.listen)
                .map_err(|e| anyhow::anyhow!("control.listen: {e}"))?;
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

/// Logs to stderr, filtered by `RUST_LOG` (default: warnings, and the client's own news).
pub fn init_logging() {
    murmur_service::init_logging("warn,murmur_client=info");
}

/// Bounds of the proxies: the config's, or the defaults.
pub fn socks_limits(config: Option<&ClientConfig>) -> SocksLimits {
    SocksLimits {
        max_connections: config.map_or_else(default_max_connections, |c| c.max_connections),
        handshake_timeout: Duration::from_secs(10),
        open_timeout: config.map_or_else(default_open_timeout, |c| c.open_timeout),
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    // Before parsing, so an old command line with the devnet's flags gets this answer too.
    if std::env::args_os().skip(1).any(|a| a == "--devnet") {
        eprintln!("murmur-client: {DEVNET_MOVED}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    init_logging();
    if let Some(Command::Status {
        control,
        config,
        json,
    }) = cli.command
    {
        return murmur_service::block_on_main(
            "murmur-client status",
            status(control, config, json),
        );
    }
    murmur_service::block_on_main("murmur-client", run(cli))
}

/// `murmur-client status`: asks the running client, prints what it says.
async fn status(
    control: Option<SocketAddr>,
    config: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<()> {
    let addr = match (control, config) {
        (Some(a), _) => a,
        (None, Some(path)) => {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
            let config = ClientConfig::parse(&text)
                .map_err(|e| anyhow::anyhow!("invalid config {}: {e}", path.display()))?;
            config
                .control
                .address()
                .ok_or_else(|| anyhow::anyhow!("{}: the control endpoint is off", path.display()))?
        }
        (None, None) => crate::control::default_control(),
    };
    let status = crate::control::fetch(addr).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", status.render_text());
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let Some(path) = cli.config else {
        anyhow::bail!(
            "give --config FILE (see --help); for a local network: \
             cargo run --release -p murmur-devnet"
        );
    };
    let shutdown = murmur_service::shutdown_token();
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let config = ClientConfig::parse(&text)
        .map_err(|e| anyhow::anyhow!("invalid config {}: {e}", path.display()))?;
    let authorities = config
        .authorities
        .iter()
        .map(|a| Ok((IdentityKey::from_hex(&a.identity)?, a.url.clone())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let base = path.parent().unwrap_or_else(|| Path::new("."));
    let (socks, http, safe_socks) = cli.listeners.apply(Some(&config));
    let options = ProxyOptions {
        socks,
        http,
        safe_socks,
        authorities,
        clock_skew: config.clock_skew,
        path_rules: path_rules(
            config.distinct_subnets,
            cli.preferences
                .max_price_per_hop
                .or(config.max_price_per_hop),
            cli.preferences
                .min_performance
                .unwrap_or(config.min_performance),
        )?,
        socks_limits: socks_limits(Some(&config)),
        stream_window: config.stream_window,
        // How often the held consensus is checked; the directory is asked only once it is no
        // longer fresh, so this bounds how late the client moves to a new epoch's keys.
        refresh_every: Duration::from_secs(2),
        payment: match &config.payments {
            Some(p) => Some(p.options(base)?),
            None => None,
        },
        control: match cli.control {
            Some(ControlAddress(a)) => a,
            None => config.control.address(),
        },
        state_dir: match &config.state_dir {
            Some(d) => Some(base.join(d)),
            None => {
                let d = default_state_dir();
                if d.is_none() {
                    tracing::warn!(
                        "no state_dir and no HOME: the gateway (guard) is not kept across restarts"
                    );
                }
                d
            }
        },
    };
    proxy::run(options, announce_ready("murmur-client"), shutdown).await
}

/// Prints the line that says the proxy serves (scripts and tests wait for `ready`).
pub fn announce_ready(program: &'static str) -> impl FnOnce(SocketAddr, Option<SocketAddr>) + Send {
    move |socks, http| match http {
        Some(http) => {
            println!("{program} ready: SOCKS5 proxy on {socks}, HTTP CONNECT proxy on {http}")
        }
        None => println!("{program} ready: SOCKS5 proxy on {socks}"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    const AUTHORITY: &str = "authorities = [ { identity = \"0101010101010101010101010101010101010101010101010101010101010101\", url = \"http://127.0.0.1:7070\" } ]\n";

    #[test]
    fn socks_is_an_address_or_a_table_and_http_is_optional() {
        let flags = ListenerFlags::default();
        let old = ClientConfig::parse(&format!(
            "version = 1\nsocks = \"127.0.0.1:1081\"\n{AUTHORITY}"
        ))
        .unwrap();
        let (socks, http, safe) = flags.apply(Some(&old));
        assert_eq!(socks.addr, "127.0.0.1:1081".parse().unwrap());
        assert!(!socks.allow_non_loopback);
        assert_eq!((http, safe), (None, SafeSocks::Warn));

        let table = ClientConfig::parse(&format!(
            "version = 1\n{AUTHORITY}[socks]\nlisten = \"0.0.0.0:1082\"\nsafe = \"refuse\"\n\
             allow_non_loopback = true\n[http]\nlisten = \"127.0.0.1:8118\"\n"
        ))
        .unwrap();
        let (socks, http, safe) = flags.apply(Some(&table));
        assert_eq!(socks.addr, "0.0.0.0:1082".parse().unwrap());
        assert!(socks.allow_non_loopback);
        assert!(socks.check("socks").is_ok());
        assert_eq!(safe, SafeSocks::Refuse);
        let http = http.unwrap();
        assert_eq!(http.addr, "127.0.0.1:8118".parse().unwrap());
        assert!(!http.allow_non_loopback);

        // The flags win, but cannot allow what the config does not.
        let flags = ListenerFlags {
            socks: None,
            http: Some("0.0.0.0:8119".parse().unwrap()),
            safe_socks: Some(SafeSocks::Off),
        };
        let (_, http, safe) = flags.apply(Some(&table));
        assert_eq!(safe, SafeSocks::Off);
        assert!(http.unwrap().check("http").is_err());
        let (socks, http, _) = flags.apply(None);
        assert_eq!(socks.addr, default_socks());
        assert!(http.unwrap().check("http").is_err());

        for bad in [
            "[socks]\nsafe = \"loud\"\n",
            "[socks]\nlisten = \"127.0.0.1:1\"\nlisen = 1\n",
            "[http]\n",
            "[http]\nlisten = \"127.0.0.1:1\"\nsafe = \"warn\"\n",
        ] {
            let text = format!("version = 1\n{AUTHORITY}{bad}");
            assert!(ClientConfig::parse(&text).is_err(), "{bad}");
        }
    }

    #[test]
    fn payments_are_optional_and_read_their_key() {
        let plain = ClientConfig::parse(&format!("version = 1\n{AUTHORITY}")).unwrap();
        assert_eq!(plain.payments, None);

        let dir = tempfile::tempdir().unwrap();
        let identity = murmur_service::keys::keygen(&dir.path().join("pot.key")).unwrap();
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

    #[test]
    fn a_pot_on_a_chain_needs_its_section_and_no_ledger() {
        let dir = tempfile::tempdir().unwrap();
        murmur_service::keys::keygen(&dir.path().join("pot.key")).unwrap();
        let text = format!(
            "version = 1\n{AUTHORITY}[payments]\nsettlement = \"chain\"\nkey_file = \"pot.key\"\n\
             [payments.chain]\nrpc_url = \"http://127.0.0.1:8545\"\n\
             contract = \"0x5FbDB2315678afecb367f032d93F642f64180aa3\"\ngas_price_wei = 7\n"
        );
        let config = ClientConfig::parse(&text).unwrap();
        let options = config.payments.unwrap().options(dir.path()).unwrap();
        let chain = options.chain.unwrap();
        assert_eq!(chain.section.gas_price_wei, Some(7));

        for (bad, expected) in [
            (text.replace("rpc_url", "rpc"), "unknown field"),
            (
                text.replace("settlement = \"chain\"\n", ""),
                "settlement is \"ledger\"",
            ),
            (
                text.replace("[payments.chain]", "[payments.other]"),
                "unknown field",
            ),
            (
                text.replace("key_file", "ledger = \"http://l\"\nkey_file"),
                "remove ledger and ledger_key",
            ),
            // Relays' chain addresses come from their descriptors, never from the config.
            (
                format!("{text}[payments.chain_payees]\n"),
                "unknown field `chain_payees`",
            ),
        ] {
            let err = ClientConfig::parse(&bad).unwrap_err().to_string();
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }
}
