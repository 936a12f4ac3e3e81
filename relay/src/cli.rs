//! The `murmur-relay` command line: `keygen`, `run`, `check-config`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use murmur_directory::client::DirectoryClient;
use murmur_protocol::directory::{
    AuthoritySet, ConsensusStore, IdentityKey, Offer, SignedDescriptor,
};
use murmur_service::shutdown_signal;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::node::Node;

#[derive(Parser, Debug)]
#[command(
    name = "murmur-relay",
    version,
    about = "Murmur relay: gateway, mix and exit"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write a new Ed25519 identity key (refuses to overwrite) and print its public half.
    Keygen {
        /// Where to write the key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Run the relay until SIGINT or SIGTERM.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Override a config value: `-o mixing.workers=2`.
        #[arg(short = 'o', value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Check a configuration file and exit.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
        #[arg(short = 'o', value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    murmur_service::init_logging("info");
    match run_command(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("murmur-relay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(path: &PathBuf, overrides: &[String]) -> anyhow::Result<Config> {
    if overrides.is_empty() {
        return Ok(Config::load(path)?);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
    let base = path.parent().map(PathBuf::from).unwrap_or_default();
    Config::parse_with_overrides(&text, base, overrides)
        .map_err(|reason| anyhow::anyhow!("invalid config {}: {reason}", path.display()))
}

fn run_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Keygen { out } => {
            let identity = murmur_directory::keys::keygen(&out)?;
            // The link key goes beside the identity key, as the default config expects.
            let link_path = out.with_file_name("link.key");
            let link = murmur_directory::keys::link_keygen(&link_path)?;
            println!("{identity}");
            eprintln!("link key {link} written to {}", link_path.display());
            Ok(())
        }
        Command::CheckConfig { config, overrides } => {
            let c = load_config(&config, &overrides)?;
            println!(
                "{}: ok (roles {:?}, family {})",
                config.display(),
                c.relay.roles,
                c.relay.family
            );
            Ok(())
        }
        Command::Run { config, overrides } => {
            let config = load_config(&config, &overrides)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(run(config, shutdown_signal()))
        }
    }
}

/// Runs a relay until `shutdown` resolves: binds, registers with the authorities each
/// epoch, follows the consensus, rotates keys.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let identity = murmur_directory::keys::load(&config.resolve(&config.relay.identity_key))?;
    let token = CancellationToken::new();
    let metrics = match config.listen.metrics {
        Some(addr) => {
            let (bound, task) = crate::metrics::install(addr, token.clone()).await?;
            tracing::info!(%bound, "metrics on http://{bound}/metrics");
            Some(task)
        }
        None => None,
    };
    let node = match Node::start(config.clone(), identity.clone(), token.clone()).await {
        Ok(node) => node,
        Err(e) => {
            // Stops the metrics endpoint too (the devnet runs relays in one process).
            token.cancel();
            return Err(e.into());
        }
    };
    tracing::info!(
        identity = %node.identity(),
        mix = %node.mix_addr(),
        client = ?node.client_addr(),
        "relay started"
    );
    let directory = tokio::spawn(follow_directory(
        config.clone(),
        node.clone(),
        identity,
        token.clone(),
    ));
    shutdown.await;
    tracing::info!("shutting down");
    token.cancel();
    let _ = directory.await;
    node.join().await;
    if let Some(metrics) = metrics {
        let _ = metrics.await;
    }
    Ok(())
}

/// Each tick: rotate keys into the current epoch, (re)upload the descriptor, and refresh the
/// consensus when due.
async fn follow_directory(
    config: Config,
    node: Arc<Node>,
    identity: ed25519_dalek::SigningKey,
    shutdown: CancellationToken,
) {
    let urls: Vec<String> = config
        .directory
        .authorities
        .iter()
        .map(|a| a.url.clone())
        .collect();
    let keys: Vec<IdentityKey> = config
        .directory
        .authorities
        .iter()
        .filter_map(|a| IdentityKey::from_hex(&a.identity).ok())
        .collect();
    let (client, authorities) = match (
        DirectoryClient::new(Duration::from_secs(5)),
        AuthoritySet::new(keys),
    ) {
        (Ok(c), Ok(a)) => (c, a),
        (Err(e), _) => {
            tracing::error!(error = %e, "cannot build the directory client");
            return;
        }
        (_, Err(e)) => {
            tracing::error!(error = %e, "no usable authority keys; the relay cannot join");
            return;
        }
    };
    let skew = config.directory.clock_skew.as_secs();
    let mut store = ConsensusStore::new(authorities, skew);
    let epoch_len = config.directory.epoch_length.as_secs().max(1);
    // Upload a few times per epoch so a restarted authority learns of us quickly.
    let upload_every = Duration::from_secs((epoch_len / 4).clamp(1, 120));
    let tick = Duration::from_secs((epoch_len / 10).clamp(1, 10));
    let mut last_upload: Option<(u32, std::time::Instant)> = None;
    let mut listen_for_wanted = tokio::time::Instant::now();
    let mut wanted = false;
    loop {
        let now = murmur_directory::unix_now();
        let epoch = u32::try_from(now / epoch_len).unwrap_or(u32::MAX);
        if let Err(e) = node.rotate_keys(epoch) {
            tracing::error!(error = %e, "cannot rotate Sphinx keys");
        }
        let due = last_upload.is_none_or(|(e, at)| e != epoch || at.elapsed() >= upload_every);
        if due {
            // The authorities' probers first: they test us as soon as they hold our
            // descriptor, and we must let them in and deliver their packets.
            let (cards, errors) = client.fetch_prober_cards(&urls, store.authorities()).await;
            for e in errors {
                tracing::debug!(error = %e, "no prober card from an authority");
            }
            node.set_probers(cards);
            match node
                .descriptor(epoch, now)
                .and_then(|d| Ok(SignedDescriptor::sign(&d, &identity)?))
            {
                Ok(signed) => {
                    let results = client.upload_descriptor(&urls, &signed).await;
                    let ok = results.iter().filter(|r| r.is_ok()).count();
                    for (url, r) in urls.iter().zip(&results) {
                        if let Err(e) = r {
                            tracing::debug!(%url, error = %e, "descriptor upload failed");
                        }
                    }
                    tracing::debug!(epoch, accepted = ok, of = urls.len(), "descriptor uploaded");
                    last_upload = Some((epoch, std::time::Instant::now()));
                }
                Err(e) => tracing::error!(error = %e, "cannot build descriptor"),
            }
        }
        // Asked for by a client's packet: a newer consensus may already be out if it is due
        // within the clock skew we allow, which is how early a client may take it.
        if store.needs_refresh(now)
            || (std::mem::take(&mut wanted) && store.needs_refresh(now.saturating_add(skew)))
        {
            match client.refresh(&urls, &mut store, now).await {
                Ok(Offer::Installed { .. }) => {
                    if let Ok(v) = store.current(now) {
                        tracing::info!(
                            epoch = v.consensus.epoch,
                            relays = v.consensus.relays.len(),
                            "new consensus"
                        );
                        node.apply_consensus(Arc::new(v.consensus.clone()));
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "consensus refresh failed; keeping the last good one")
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
            // A client of ours holds a consensus we do not: fetch now, but at most once a
            // second however often clients ask (one request waits in the `Notify`).
            () = async {
                tokio::time::sleep_until(listen_for_wanted).await;
                node.consensus_wanted().await;
            } => {
                listen_for_wanted = tokio::time::Instant::now() + WANTED_CONSENSUS_PAUSE;
                wanted = true;
            }
        }
    }
}

/// The least time between two fetches a gateway's clients asked for.
const WANTED_CONSENSUS_PAUSE: Duration = Duration::from_secs(1);
