//! `murmur-sim`: parse the command line, hand it to the library.

fn main() -> anyhow::Result<()> {
    murmur_sim::cli::execute(clap::Parser::parse())?;
    Ok(())
}
