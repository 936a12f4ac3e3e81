//! The command line: `run`, `sweep` and `plot`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::{Error, Result, plot, run_scenario, sweep, write_outputs};

/// Discrete-event simulator of a Murmur mixnet: anonymity, latency and cost.
#[derive(Debug, Parser)]
#[command(name = "murmur-sim", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one scenario and write its summary, CSVs and plots into --out.
    Run {
        scenario: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Run a scenario once per value of one parameter; write sweep.csv and sweep.svg.
    Sweep {
        scenario: PathBuf,
        /// The parameter, as a dotted key: `rates.mu`, `adversary.corrupt_mix_fraction`.
        #[arg(long)]
        param: String,
        /// Comma-separated values in TOML syntax: `1,2,4` or `true,false`.
        #[arg(long, value_delimiter = ',', required = true)]
        values: Vec<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Plot one column against another from CSV files (e.g. sweeps), one line per file.
    Plot {
        /// `FILE.csv` or `FILE.csv:LABEL`.
        #[arg(required = true)]
        inputs: Vec<String>,
        #[arg(long)]
        x: String,
        #[arg(long)]
        y: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "")]
        title: String,
        #[arg(long)]
        x_label: Option<String>,
        #[arg(long)]
        y_label: Option<String>,
        /// Plot log10 of x (for rates that span decades).
        #[arg(long)]
        log_x: bool,
    },
}

/// Options of `run` and `sweep`.
#[derive(Debug, Args)]
pub struct Common {
    /// Output directory (created if needed).
    #[arg(long)]
    pub out: PathBuf,
    /// Overrides the scenario's seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Overrides one scenario value, e.g. `--set rates.mu=4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

/// A progress bar on stderr that appears only once a run has taken a few seconds, and only
/// when stderr is a terminal.
struct Progress {
    started: Instant,
    bar: Option<ProgressBar>,
    enabled: bool,
}

impl Progress {
    const AFTER: Duration = Duration::from_secs(2);

    fn new() -> Self {
        Progress {
            started: Instant::now(),
            bar: None,
            enabled: std::io::stderr().is_terminal(),
        }
    }

    fn update(&mut self, label: &str, fraction: f64) {
        if !self.enabled || self.started.elapsed() < Self::AFTER {
            return;
        }
        let bar = self.bar.get_or_insert_with(|| {
            let bar = ProgressBar::new(1000).with_elapsed(self.started.elapsed());
            if let Ok(style) = ProgressStyle::with_template(
                "{msg} [{elapsed_precise}] {wide_bar} {percent}% simulated (eta {eta})",
            ) {
                bar.set_style(style);
            }
            bar
        });
        bar.set_message(label.to_string());
        bar.set_position((fraction * 1000.0) as u64);
    }

    fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

fn show(x: Option<f64>) -> String {
    x.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into())
}

/// Runs a parsed command line.
pub fn execute(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run {
            scenario,
            common: Common { out, seed, set },
        } => {
            let mut progress = Progress::new();
            let (result, timing) =
                run_scenario(&scenario, &set, seed, &mut |f| progress.update("run", f))?;
            progress.finish();
            write_outputs(&out, &result, &timing)?;
            let s = &result.summary;
            println!(
                "{} messages; latency mean {} s, p99 {} s; entropy {} bits, min-entropy {} bits; \
                 overhead {}; mean pool {:.2}; {} events in {:.2} s ({:.0} events/s); wrote {}",
                s.messages,
                show(s.latency_mean_s),
                show(s.latency_p99_s),
                show(s.entropy_mean_bits),
                show(s.min_entropy_mean_bits),
                show(s.overhead_ratio),
                s.mean_pool_size,
                timing.events,
                timing.wall_s,
                timing.events_per_s,
                out.display()
            );
        }
        Command::Sweep {
            scenario,
            param,
            values,
            common: Common { out, seed, set },
        } => {
            let mut progress = Progress::new();
            let n = values.len();
            let rows = sweep::sweep(&scenario, &set, &param, &values, seed, &mut |i, f| {
                progress.update(&format!("{param} {}/{n}", i + 1), f)
            })?;
            progress.finish();
            sweep::write_sweep(&out, &param, &rows)?;
            for (value, s) in &rows {
                println!(
                    "{param}={value}: entropy {} bits, min-entropy {} bits, latency {} s, overhead {}",
                    show(s.entropy_mean_bits),
                    show(s.min_entropy_mean_bits),
                    show(s.latency_mean_s),
                    show(s.overhead_ratio)
                );
            }
            println!("wrote {}", out.join("sweep.csv").display());
        }
        Command::Plot {
            inputs,
            x,
            y,
            out,
            title,
            x_label,
            y_label,
            log_x,
        } => {
            let series = inputs
                .iter()
                .map(|input| {
                    let (file, label) = match input.rsplit_once(':') {
                        Some((f, l)) if !l.contains('/') => (f, l.to_string()),
                        _ => (input.as_str(), input.clone()),
                    };
                    let text = std::fs::read_to_string(file).map_err(|source| Error::Io {
                        path: PathBuf::from(file),
                        source,
                    })?;
                    let mut points = sweep::csv_columns(&text, &x, &y)?;
                    if log_x {
                        points.retain(|p| p.0 > 0.0);
                        points.iter_mut().for_each(|p| p.0 = p.0.log10());
                    }
                    Ok((label, points))
                })
                .collect::<Result<Vec<_>>>()?;
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                    path: dir.to_path_buf(),
                    source,
                })?;
            }
            let x_label = x_label.unwrap_or_else(|| x.clone());
            let x_label = if log_x {
                format!("log10 {x_label}")
            } else {
                x_label
            };
            plot::lines(
                &out,
                &title,
                &x_label,
                y_label.as_deref().unwrap_or(&y),
                &series,
            )?;
            println!("wrote {}", out.display());
        }
    }
    Ok(())
}
