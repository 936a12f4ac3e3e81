//! `murmur-ledger`: parse the command line and hand over to the library.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    murmur_ledger::cli::main(murmur_ledger::cli::Cli::parse())?;
    Ok(())
}
