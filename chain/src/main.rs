//! `murmur-chain`: parse the command line and hand over to the library.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    murmur_chain::cli::main(murmur_chain::cli::Cli::parse())
}
