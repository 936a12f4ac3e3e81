//! The command line: `run`, `check-config`. The ledger holds no secret key of its own, so
//! there is no `keygen`: accounts and pots are identified by their owners' Ed25519 keys
//! (relays' identity keys, clients' payment keys), and every request that moves money is
//! signed by its owner.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use murmur_directory::cli::{init_logging, shutdown_signal};

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
    /// Run the ledger until SIGINT or SIGTERM.
    Run {
        /// The TOML config file (see ledger.example.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Check a config file and print a summary.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
}

/// Runs one command. Logs go to stderr, filtered by `RUST_LOG` (default `info`).
pub fn main(cli: Cli) -> Result<()> {
    match cli.command {
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
            Ok(())
        }
        Command::Run { config } => {
            let c = Config::load(&config)?;
            init_logging();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(Error::Runtime)?;
            runtime.block_on(crate::run(c, shutdown_signal()))
        }
    }
}
