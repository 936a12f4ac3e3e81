//! The `murmur-client` command line.
//!
//! - `murmur-client --devnet`: start a local network in this process, then the proxy.
//! - `murmur-client --config client.toml`: the proxy against the authorities the file names.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use murmur_protocol::directory::IdentityKey;
use murmur_protocol::directory::path::PathRules;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::devnet::{Devnet, DevnetOptions};
use crate::proxy::{self, ProxyOptions};
use crate::socks::SocksLimits;

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
    /// Paths never hold two relays of one IPv4 /16 or IPv6 /32; turn off only for a test
    /// network on one host.
    #[serde(default = "default_true")]
    pub distinct_subnets: bool,
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
        let devnet = Devnet::start(&options).await?;
        eprintln!(
            "devnet: 3 authorities, 1 gateway, {} mixes per layer, 1 exit (state in {})",
            options.mixes_per_layer,
            devnet.dir().display()
        );
        let proxy_options = ProxyOptions {
            socks: cli.socks.unwrap_or_else(default_socks),
            authorities: devnet.authorities.clone(),
            clock_skew: Duration::from_secs(5),
            path_rules: devnet.path_rules,
            socks_limits: socks_limits(None),
            refresh_every: Duration::from_secs(1),
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
        path_rules: PathRules {
            distinct_subnets: config.distinct_subnets,
        },
        socks_limits: socks_limits(Some(&config)),
        refresh_every: Duration::from_secs(30),
    };
    proxy::run(options, announce_ready, shutdown).await
}

fn announce_ready(addr: SocketAddr) {
    println!("murmur-client ready: SOCKS5 proxy on {addr}");
}
