//! `murmur-chain`: an identity's chain address, deploying the contract, reading a pot.

use std::path::PathBuf;
use std::time::Duration;

use alloy::primitives::Address;
use anyhow::Context;
use clap::{Parser, Subcommand};
use murmur_ledger::Settlement;
use murmur_protocol::directory::IdentityKey;

use crate::{ChainConfig, ChainSettlement, wallet_of};

/// Murmur's settlement contract on an Ethereum chain.
#[derive(Debug, Parser)]
#[command(name = "murmur-chain", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Prints an identity and its chain wallet's address (where its ETH goes: fund it to pay
    /// gas and pots).
    Address {
        /// The identity key file (`murmur-relay keygen`, `murmur-ledger keygen`).
        #[arg(long)]
        key: PathBuf,
    },
    /// Deploys `MurmurLottery`, paid by the identity's chain wallet, and prints its address.
    Deploy {
        #[arg(long)]
        rpc_url: String,
        #[arg(long)]
        key: PathBuf,
        /// Between a warning and the withdrawal it allows (e.g. `24h`); at least the relays'
        /// redeem window, as for the embedded ledger.
        #[arg(long, value_parser = humantime::parse_duration)]
        notice: Duration,
    },
    /// Prints a pot's state as JSON.
    Pot {
        #[arg(long)]
        rpc_url: String,
        #[arg(long)]
        contract: Address,
        /// The pot's key, 64 hex digits.
        pot: String,
    },
}

/// Runs a command, printing its answer on standard output.
pub fn main(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(run(cli.command))
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Address { key } => {
            let key = murmur_service::keys::load(&key)?;
            println!("identity {}", IdentityKey::of(&key));
            println!("address {}", wallet_of(&key).address());
        }
        Command::Deploy {
            rpc_url,
            key,
            notice,
        } => {
            let key = murmur_service::keys::load(&key)?;
            let address = ChainSettlement::deploy(&rpc_url, wallet_of(&key), notice.as_secs())
                .await
                .context("deploying the contract")?;
            println!("contract {address}");
        }
        Command::Pot {
            rpc_url,
            contract,
            pot,
        } => {
            let pot = IdentityKey::from_hex(&pot).context("the pot's key")?;
            let chain = ChainSettlement::connect(ChainConfig::new(rpc_url, contract), &[]).await?;
            let pot = chain.pot(pot).await?;
            println!("{}", serde_json::to_string(&pot)?);
        }
    }
    Ok(())
}
