#![doc = include_str!("../README.md")]

pub mod http;
pub mod keys;
pub mod rate;

use std::future::Future;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use murmur_protocol::directory::UnixTime;
use tokio_util::sync::CancellationToken;

pub use http::{ConnectedPeer, HttpLimits, IDLE_CONNECTION, RefusalCounter, serve_until};
pub use keys::KeyError;

/// Logs to stderr, filtered by `RUST_LOG`, else by `default_filter` (e.g. `info`); colours
/// only when stderr is a terminal. A second call changes nothing (the devnet runs several
/// daemons in one process).
pub fn init_logging(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// A token cancelled on SIGINT or SIGTERM, for programs that stop many tasks at once (call
/// inside the runtime).
pub fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        cancel.cancel();
    });
    token
}

/// Runs `main` on a multi-threaded runtime; an error (or a runtime that cannot start) is
/// printed to stderr as `name: error`, with its causes, and the process exits with failure.
pub fn block_on_main<E: std::fmt::Display>(
    name: &str,
    main: impl Future<Output = Result<(), E>>,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Seconds since the Unix epoch by this machine's clock (0 if the clock is before 1970).
pub fn unix_now() -> UnixTime {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An example config with every setting uncommented: settings are commented out with one
/// `#`, prose with `##`. Each daemon's example-config test parses both forms and compares
/// them with the defaults.
pub fn uncomment_example(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if !rest.starts_with('#') => rest.strip_prefix(' ').unwrap_or(rest),
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncommenting_keeps_prose_and_opens_settings() {
        let text = "## prose\n#key = 1\n# other = \"x\"\nplain = 2";
        assert_eq!(
            uncomment_example(text),
            "## prose\nkey = 1\nother = \"x\"\nplain = 2"
        );
    }
}
