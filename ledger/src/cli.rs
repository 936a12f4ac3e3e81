//! The command line: `keygen`, `run`, `check-config`. The ledger's own key only signs its
//! answers ([`crate::answer`]); accounts and pots are identified by their owners' Ed25519
//! keys (relays' identity keys, clients' payment keys), and every request that moves money is
//! signed by its owner.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use murmur_protocol::directory::IdentityKey;

use crate::{Config, Error, Result};

/// Murmur ledger: holds pots and accounts and redeems winning nanopayment tickets once.
#[derive(Debug, Parser)]
#[command(name = "murmur-ledger", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate the ledger's Ed25519 identity key (mode 0600; never overwrites) and print its
    /// public identity, which relays and clients are configured with (`ledger_key`).
    Keygen {
        /// Where to write the key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Run the ledger until SIGINT or SIGTERM.
    Run {
        /// The TOML config file (see ledger.example.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Check a config file (and its key file) and print a summary.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
}

/// Runs one command. Logs go to stderr, filtered by `RUST_LOG` (default `info`).
pub fn main(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Keygen { out } => {
            let id = murmur_service::keys::keygen(&out).map_err(|e| Error::Key {
                path: out.clone(),
                message: e.to_string(),
            })?;
            println!("{id}");
            eprintln!(
                "wrote {}; set key_file to it, and give the identity above to every relay and \
                 client as [payments] ledger_key",
                out.display()
            );
            Ok(())
        }
        Command::CheckConfig { config } => {
            let c = Config::load(&config)?;
            let genesis = c.genesis()?;
            let total: u64 = genesis.iter().map(|(_, a)| *a).sum();
            println!(
                "config OK: {} genesis accounts holding {total}, notice period {}s, \
                 listening on {}, database {}",
                genesis.len(),
                c.params().notice_period_s,
                c.listen,
                c.database_path().display()
            );
            if c.key_file.exists() {
                let id = IdentityKey::of(&c.signing_key()?);
                println!("key OK: this ledger is {id}");
            } else {
                println!(
                    "note: key file {} does not exist yet (murmur-ledger keygen --out FILE); \
                     the ledger does not start without it",
                    c.key_file.display()
                );
            }
            Ok(())
        }
        Command::Run { config } => {
            let c = Config::load(&config)?;
            murmur_service::init_logging("info");
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(Error::Runtime)?;
            runtime.block_on(crate::run(c, murmur_service::shutdown_signal()))
        }
    }
}
