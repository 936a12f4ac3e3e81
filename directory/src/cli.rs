//! The command line: `keygen`, `run`, `check-config`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use murmur_protocol::directory::IdentityKey;

use crate::{Config, Error, Result, keys};

/// Murmur directory authority: collects relay descriptors, votes with the other authorities
/// and serves the signed consensus.
#[derive(Debug, Parser)]
#[command(name = "murmur-directory", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate the authority's Ed25519 identity key (mode 0600; never overwrites) and print
    /// its public identity for the other authorities' configs.
    Keygen {
        /// Where to write the key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Run the authority until SIGINT or SIGTERM.
    Run {
        /// The TOML config file (see authority.example.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Check a config file (and its key file, if present) and print a summary.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
}

/// Runs one command. Logs go to stderr, filtered by `RUST_LOG` (default `info`).
pub fn main(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Keygen { out } => {
            let id = keys::keygen(&out)?;
            println!("{id}");
            eprintln!(
                "wrote {}; list the identity above in every authority's config",
                out.display()
            );
            Ok(())
        }
        Command::CheckConfig { config } => {
            let c = Config::load(&config)?;
            let set = c.authority_set()?;
            println!(
                "config OK: {} authorities (a consensus needs {}), epochs of {}s, listening on {}",
                set.keys().len(),
                set.threshold(),
                c.schedule.epoch_length.as_secs(),
                c.listen
            );
            if c.key_file.exists() {
                let id = IdentityKey::of(&keys::load(&c.key_file)?);
                if !set.contains(&id) {
                    return Err(Error::Config(format!(
                        "the key in {} ({id}) is not among the configured authorities",
                        c.key_file.display()
                    )));
                }
                println!("key OK: this authority is {id}");
            } else {
                println!(
                    "note: key file {} does not exist yet (murmur-directory keygen --out FILE)",
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
