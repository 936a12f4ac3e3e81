//! `murmur-directory`: parse the command line and hand over to the library.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    murmur_directory::cli::main(murmur_directory::cli::Cli::parse())?;
    Ok(())
}
