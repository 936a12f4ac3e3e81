//! The command line: `run`, `sweep` and `plot`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::scenario::{Loaded, Mode, Scenario};
use crate::{
    Error, Result, crosscheck, fidelity, plot, run_fidelity, run_loaded, sweep, write_outputs,
};

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
        /// Run the shipping code on real packets (`mode = "fidelity"`): client sessions,
        /// payers, gateways' tabs, every relay's hop step, the exit.
        #[arg(long)]
        fidelity: bool,
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
        /// Each run in fidelity mode.
        #[arg(long)]
        fidelity: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Run a scenario in fidelity mode and in the fast mode (one message per page load) and
    /// compare their mean request latency with each other and with theory; writes
    /// crosscheck.json and fails when they differ by more than the tolerance.
    Crosscheck {
        scenario: PathBuf,
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
        /// One column, or several separated by commas (one line per file and column).
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
            fidelity,
            common: Common { out, seed, set },
        } => {
            let mut loaded = Scenario::load(&scenario, &set)?;
            if fidelity {
                loaded.scenario.mode = Mode::Fidelity;
                loaded.scenario = Scenario::checked(loaded.scenario)?;
            }
            if loaded.scenario.mode == Mode::Fidelity {
                return run_fidelity_cli(&loaded, seed, &out);
            }
            let mut progress = Progress::new();
            let (result, timing) = run_loaded(&loaded, seed, &mut |f| progress.update("run", f))?;
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
            fidelity,
            common: Common { out, seed, set },
        } => {
            let mut progress = Progress::new();
            let n = values.len();
            let rows = sweep::sweep(
                &scenario,
                &set,
                &param,
                &values,
                seed,
                fidelity,
                &mut |i, f| progress.update(&format!("{param} {}/{n}", i + 1), f),
            )?;
            progress.finish();
            sweep::write_sweep(&out, &param, &rows)?;
            for (value, f) in &rows {
                let get = |name: &str| show(sweep::field(f, name));
                println!(
                    "{param}={value}: entropy {} bits, min-entropy {} bits, latency {} s, \
                     overhead {}, completion {} s",
                    get("entropy_mean_bits"),
                    get("min_entropy_mean_bits"),
                    get("latency_mean_s"),
                    get("overhead_ratio"),
                    get("completion_mean_s"),
                );
            }
            println!("wrote {}", out.join("sweep.csv").display());
        }
        Command::Crosscheck {
            scenario,
            common: Common { out, seed, set },
        } => {
            let loaded = Scenario::load(&scenario, &set)?;
            let mut progress = Progress::new();
            let c =
                crosscheck::crosscheck(&loaded, seed, &mut |f| progress.update("crosscheck", f))?;
            progress.finish();
            std::fs::create_dir_all(&out).map_err(|source| Error::Io {
                path: out.clone(),
                source,
            })?;
            crate::report::write_json(&out.join("crosscheck.json"), &c)?;
            println!(
                "request latency: fidelity {:.4} s ({} requests; send wait {:.4} s), fast {:.4} s \
                 ({} messages), theory 3/mu + links + wait {:.4} s; differences {:.2}% and \
                 {:.2}% (tolerance {:.0}%); entropy fidelity {} bits, fast {} bits \
                 (tolerance {} bits): {}",
                c.fidelity_latency_mean_s,
                c.fidelity_requests,
                c.fidelity_send_wait_mean_s,
                c.fast_latency_mean_s,
                c.fast_messages,
                c.theory_latency_mean_s,
                100.0 * c.vs_fast,
                100.0 * c.vs_theory,
                100.0 * c.tolerance,
                show(c.entropy_fidelity_bits),
                show(c.entropy_fast_bits),
                c.entropy_tolerance_bits,
                if c.pass { "PASS" } else { "FAIL" }
            );
            if !c.pass {
                return Err(Error::Input("crosscheck: the modes disagree".into()));
            }
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
            let ys: Vec<&str> = y.split(',').collect();
            let mut series = Vec::new();
            for input in &inputs {
                let (file, label) = match input.rsplit_once(':') {
                    Some((f, l)) if !l.contains('/') => (f, Some(l.to_string())),
                    _ => (input.as_str(), None),
                };
                let text = std::fs::read_to_string(file).map_err(|source| Error::Io {
                    path: PathBuf::from(file),
                    source,
                })?;
                for column in &ys {
                    let mut points = sweep::csv_columns(&text, &x, column)?;
                    if log_x {
                        points.retain(|p| p.0 > 0.0);
                        points.iter_mut().for_each(|p| p.0 = p.0.log10());
                    }
                    let name = match (&label, ys.len()) {
                        (Some(l), 1) => l.clone(),
                        (Some(l), _) => format!("{l}: {column}"),
                        (None, 1) => input.clone(),
                        (None, _) => (*column).to_string(),
                    };
                    series.push((name, points));
                }
            }
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

/// `run` in fidelity mode: writes its files and prints its headline figures.
fn run_fidelity_cli(loaded: &Loaded, seed: Option<u64>, out: &std::path::Path) -> Result<()> {
    let mut progress = Progress::new();
    let (result, timing) = run_fidelity(loaded, seed, &mut |f| progress.update("fidelity", f))?;
    progress.finish();
    fidelity::report::write_outputs(out, &result, &timing)?;
    let s = &result.summary;
    println!(
        "{} pages ({} completed, {} failed, {} unfinished); ttfb mean {} s, completion mean {} s \
         p99 {} s; request latency mean {} s; goodput {:.0} B/s; retransmissions {}; \
         entropy {} bits; {} events in {:.2} s ({:.0} events/s); wrote {}",
        s.pages,
        s.pages_completed,
        s.pages_failed,
        s.pages_unfinished,
        show(s.ttfb_mean_s),
        show(s.completion_mean_s),
        show(s.completion_p99_s),
        show(s.latency_mean_s),
        s.goodput_bytes_per_s,
        s.retransmissions,
        show(s.entropy_mean_bits),
        timing.events,
        timing.wall_s,
        timing.events_per_s,
        out.display()
    );
    Ok(())
}
