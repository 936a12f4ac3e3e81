//! The `murmur-devnet` command line: start the local network, then the client's proxy on it,
//! in this process; stop both on SIGINT or SIGTERM.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use murmur_client::cli::{
    ControlAddress, ListenerFlags, PathPreferences, announce_ready, parse_control, path_rules,
    payment_options, socks_limits,
};
use murmur_client::proxy::{self, ChainPayment, PaymentOptions, ProxyOptions};
use murmur_client::stream::check_listeners;
use murmur_ledger::SettlementChoice;
use murmur_protocol::payer::PayerConfig;
use murmur_protocol::stream::DEFAULT_STREAM_WINDOW;

use crate::{Devnet, DevnetOptions, FAUCET};

#[derive(Parser, Debug)]
#[command(
    name = "murmur-devnet",
    version,
    about = "A whole Murmur network on loopback (3 authorities, a ledger, a gateway, 3 mixes per \
             layer, an exit that allows loopback), then the SOCKS5 proxy (and, with --http, an \
             HTTP CONNECT proxy) on it",
    after_help = "Then: curl --socks5-hostname 127.0.0.1:1080 http://127.0.0.1:8000/ \
                  (the exit may reach loopback)"
)]
pub struct Cli {
    /// Where the proxies listen (loopback only: the devnet has no config to allow more).
    #[command(flatten)]
    listeners: ListenerFlags,
    /// Mean per-hop delay (1/μ), e.g. "15ms" or "0ms".
    #[arg(long, value_parser = humantime::parse_duration)]
    hop_delay: Option<Duration>,
    /// λ_P, packets per second the client sends (real or cover).
    #[arg(long)]
    send_rate: Option<f64>,
    /// λ_M, loop packets per second each relay sends (0: none).
    #[arg(long)]
    relay_loop_rate: Option<f64>,
    /// The face value of the client's tickets, in base units (small values make many tickets
    /// win, so redemptions can be watched).
    #[arg(long)]
    ticket_face_value: Option<u64>,
    /// Packets each ticket to a mix or exit pays for.
    #[arg(long)]
    packets_per_ticket: Option<u64>,
    /// No new stream opens once the client's tickets are worth this much (base units, in
    /// expected value; `murmur-client status` shows what it has spent).
    #[arg(long)]
    max_spend: Option<u64>,
    /// Where the client's control endpoint (`murmur-client status`, /metrics) listens, on
    /// loopback, or `off`.
    #[arg(long, value_parser = parse_control, default_value = "127.0.0.1:1090")]
    control: ControlAddress,
    /// Serve every relay's Prometheus `/metrics` (drops by reason, queues, tabs) on this
    /// loopback address.
    #[arg(long, value_parser = parse_loopback)]
    relay_metrics: Option<std::net::SocketAddr>,
    /// Where relays redeem and the client's pot is: `ledger` (the devnet's ledger) or
    /// `chain` (a local Anvil node with the contract deployed; a build with the `chain`
    /// feature, and Anvil from chain/contract/build.sh --tools).
    #[arg(long, value_parser = parse_settlement, default_value = "ledger")]
    settlement: SettlementChoice,
    #[command(flatten)]
    preferences: PathPreferences,
}

fn parse_settlement(text: &str) -> Result<SettlementChoice, String> {
    match text {
        "ledger" => Ok(SettlementChoice::Ledger),
        "chain" => Ok(SettlementChoice::Chain),
        other => Err(format!("{other:?}: ledger or chain")),
    }
}

/// A socket address on loopback (the devnet serves nothing beyond this host).
fn parse_loopback(text: &str) -> Result<std::net::SocketAddr, String> {
    let addr: std::net::SocketAddr = text.parse().map_err(|e| format!("{text}: {e}"))?;
    if addr.ip().is_loopback() {
        Ok(addr)
    } else {
        Err(format!("{addr} is not a loopback address"))
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    murmur_client::cli::init_logging();
    // The shutdown token's signal handler needs the runtime, so it is made inside it.
    murmur_service::block_on_main("murmur-devnet", async {
        run(
            cli,
            announce_ready("murmur-devnet"),
            murmur_service::shutdown_token(),
        )
        .await
    })
}

/// Runs the devnet as its command line `cli` says until `shutdown`; `ready` gets the proxies'
/// addresses once the first request can be served. The binary's `main`, and the throughput
/// benchmark's, which must measure exactly what the command runs.
pub async fn run(
    cli: Cli,
    ready: impl FnOnce(std::net::SocketAddr, Option<std::net::SocketAddr>) + Send,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
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
    options.relay_metrics = cli.relay_metrics;
    options.settlement = cli.settlement;
    // Checked before anything starts, so a bad value costs no network start-up.
    let rules = |distinct_subnets| {
        path_rules(
            distinct_subnets,
            cli.preferences.max_price_per_hop,
            cli.preferences.min_performance.unwrap_or(0.0),
        )
    };
    rules(false)?;
    let (socks, http, safe_socks) = cli.listeners.apply(None);
    // Before anything starts, as the path rules above.
    check_listeners(&socks, http.as_ref())?;
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
    if let Some(chain) = &devnet.chain {
        eprintln!(
            "devnet: chain {} contract {} (Anvil, {} wei per gas); relays redeem there and the \
             client's pot is there",
            chain.rpc_url,
            chain.contract,
            crate::CHAIN_GAS_PRICE_WEI
        );
    }
    for (name, identity) in &devnet.relays {
        eprintln!("devnet: relay {name:<9} {}", identity.to_hex());
    }
    let proxy_options = ProxyOptions {
        socks,
        http,
        safe_socks,
        authorities: devnet.authorities.clone(),
        clock_skew: Duration::from_secs(5),
        path_rules: rules(devnet.path_rules.distinct_subnets)?,
        socks_limits: socks_limits(None),
        stream_window: DEFAULT_STREAM_WINDOW,
        refresh_every: Duration::from_secs(1),
        payment: Some(devnet_payment(
            &devnet,
            cli.ticket_face_value,
            cli.packets_per_ticket,
            cli.max_spend,
        )),
        control: cli.control.0,
        // The devnet's relays are new at every start, so a guard kept across starts would
        // never be listed again: it lives with the rest of the network's state.
        state_dir: Some(devnet.dir().join("client")),
    };
    let result = proxy::run(proxy_options, ready, shutdown).await;
    devnet.stop().await;
    result
}

/// The devnet client pays from the faucet's account; the pot is funded on start.
fn devnet_payment(
    devnet: &Devnet,
    face_value: Option<u64>,
    packets_per_ticket: Option<u64>,
    max_spend: Option<u64>,
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
    options.max_spend = max_spend;
    options.chain = devnet.chain.as_ref().map(|c| ChainPayment {
        section: c.section(),
    });
    options
}
