#![doc = include_str!("../README.md")]

pub mod anonymity;
pub mod cli;
pub mod crosscheck;
pub mod engine;
pub mod error;
pub mod fidelity;
pub mod plot;
pub mod queue;
pub mod report;
pub mod scenario;
pub mod sweep;
pub mod topology;

use std::path::Path;

pub use error::{Error, Result};
pub use report::{RunResult, Summary, Timing};
pub use scenario::{Loaded, Scenario};

/// Loads a scenario (with `KEY=VALUE` overrides) and runs it; `seed` overrides the file's.
pub fn run_scenario(
    path: &Path,
    overrides: &[String],
    seed: Option<u64>,
    progress: &mut dyn FnMut(f64),
) -> Result<(RunResult, Timing)> {
    let loaded = Scenario::load(path, overrides)?;
    run_loaded(&loaded, seed, progress)
}

/// Runs a loaded scenario, timing it with the wall clock (the timing is not part of the result).
pub fn run_loaded(
    loaded: &Loaded,
    seed: Option<u64>,
    progress: &mut dyn FnMut(f64),
) -> Result<(RunResult, Timing)> {
    let seed = seed.unwrap_or(loaded.scenario.seed);
    timed(|| engine::run(loaded, seed, progress), |r| r.summary.events)
}

/// Runs `f`, timing it with the wall clock; `events` reads the run's event count.
fn timed<T>(f: impl FnOnce() -> Result<T>, events: impl Fn(&T) -> u64) -> Result<(T, Timing)> {
    let started = std::time::Instant::now();
    let result = f()?;
    let wall_s = started.elapsed().as_secs_f64();
    let events = events(&result);
    let timing = Timing {
        wall_s,
        events,
        events_per_s: events as f64 / wall_s.max(1e-9),
    };
    Ok((result, timing))
}

/// Runs a loaded scenario in fidelity mode ([`fidelity`]), timing it with the wall clock.
pub fn run_fidelity(
    loaded: &Loaded,
    seed: Option<u64>,
    progress: &mut dyn FnMut(f64),
) -> Result<(fidelity::report::FidelityResult, Timing)> {
    let seed = seed.unwrap_or(loaded.scenario.seed);
    timed(
        || fidelity::run(loaded, seed, progress),
        |r| r.summary.events,
    )
}

/// Writes a run's files into `dir` (created if needed): `summary.json` (deterministic),
/// `timing.json` (wall clock), `messages.csv`, `mixes.csv`, `latency_cdf.svg`,
/// `entropy_hist.svg`.
pub fn write_outputs(dir: &Path, result: &RunResult, timing: &Timing) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    report::write_json(&dir.join("summary.json"), &result.summary)?;
    report::write_json(&dir.join("timing.json"), timing)?;
    report::write_file(
        &dir.join("messages.csv"),
        report::messages_csv(&result.messages).as_bytes(),
    )?;
    report::write_file(
        &dir.join("mixes.csv"),
        report::mixes_csv(&result.mixes).as_bytes(),
    )?;
    plot::lines(
        &dir.join("latency_cdf.svg"),
        "End-to-end latency",
        "latency (s)",
        "fraction of messages",
        &[("latency".into(), plot::cdf(&result.latencies, 400))],
    )?;
    let entropies: Vec<f64> = result
        .messages
        .iter()
        .filter_map(|m| m.entropy_bits)
        .collect();
    plot::histogram(
        &dir.join("entropy_hist.svg"),
        "Sender entropy per message",
        "entropy (bits)",
        &entropies,
        40,
    )
}
