//! Sweeps: one scenario run once per value of one parameter, one CSV row per value.

use std::fmt::Write as _;
use std::path::Path;

use crate::report::{cell, write_file};
use crate::scenario::{Mode, Scenario};
use crate::{Error, Result, plot, run_fidelity, run_loaded};

/// A run's figures by name, as in its `summary.json` (numbers only).
pub type Fields = Vec<(String, Option<f64>)>;

/// The value of the figure `name` in `fields`.
pub fn field(fields: &Fields, name: &str) -> Option<f64> {
    fields.iter().find(|(k, _)| k == name).and_then(|(_, v)| *v)
}

/// Runs `scenario` with `param=value` for each value (TOML syntax), all with the same seed so
/// the values are compared on the same traffic where the parameter allows it; in fidelity
/// mode when the scenario says so or `fidelity` is set. `progress(i, fraction)` hears which
/// run is going and how far it is.
pub fn sweep(
    path: &Path,
    overrides: &[String],
    param: &str,
    values: &[String],
    seed: Option<u64>,
    fidelity: bool,
    progress: &mut dyn FnMut(usize, f64),
) -> Result<Vec<(String, Fields)>> {
    let mut rows = Vec::with_capacity(values.len());
    for (i, value) in values.iter().enumerate() {
        let mut all = overrides.to_vec();
        if fidelity {
            all.push("mode=\"fidelity\"".into());
        }
        all.push(format!("{param}={value}"));
        let loaded = Scenario::load(path, &all)?;
        let fields = if loaded.scenario.mode == Mode::Fidelity {
            run_fidelity(&loaded, seed, &mut |f| progress(i, f))?
                .0
                .summary
                .fields()?
        } else {
            run_loaded(&loaded, seed, &mut |f| progress(i, f))?
                .0
                .summary
                .fields()?
        };
        rows.push((value.clone(), fields));
    }
    Ok(rows)
}

/// The sweep table: the parameter's value, then every figure of `summary.json`.
pub fn sweep_csv(param: &str, rows: &[(String, Fields)]) -> String {
    let mut out = String::new();
    for (i, (value, fields)) in rows.iter().enumerate() {
        if i == 0 {
            let names: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
            let _ = writeln!(out, "{param},{}", names.join(","));
        }
        let cells: Vec<String> = fields.iter().map(|(_, v)| cell(*v)).collect();
        let _ = writeln!(out, "{value},{}", cells.join(","));
    }
    out
}

/// Writes `sweep.csv` and `sweep.svg` (entropy and min-entropy against the value) into `dir`.
pub fn write_sweep(dir: &Path, param: &str, rows: &[(String, Fields)]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let csv = sweep_csv(param, rows);
    let csv_path = dir.join("sweep.csv");
    write_file(&csv_path, csv.as_bytes())?;
    let series = ["entropy_mean_bits", "min_entropy_mean_bits"]
        .iter()
        .map(|y| Ok(((*y).to_string(), csv_columns(&csv, param, y)?)))
        .collect::<Result<Vec<_>>>()?;
    plot::lines(
        &dir.join("sweep.svg"),
        &format!("Sender anonymity against {param}"),
        param,
        "bits",
        &series,
    )
}

/// The (x, y) pairs of two columns of a CSV text; a value that is not a number (`true`,
/// `false`) is plotted as 1 or 0, and rows with an empty cell are skipped.
pub fn csv_columns(csv: &str, x: &str, y: &str) -> Result<Vec<(f64, f64)>> {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
    let find = |name: &str| {
        header.iter().position(|h| *h == name).ok_or_else(|| {
            Error::Input(format!(
                "no column `{name}` (columns: {})",
                header.join(", ")
            ))
        })
    };
    let (xi, yi) = (find(x)?, find(y)?);
    let number = |s: &str| match s {
        "true" => Some(1.0),
        "false" => Some(0.0),
        s => s.parse::<f64>().ok(),
    };
    Ok(lines
        .filter_map(|line| {
            let cells: Vec<&str> = line.split(',').collect();
            Some((number(cells.get(xi)?)?, number(cells.get(yi)?)?))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_found_by_name_and_booleans_plot() {
        let csv = "cover,x,entropy\ntrue,1,3.5\nfalse,2,\n";
        assert_eq!(
            csv_columns(csv, "cover", "x").unwrap(),
            vec![(1.0, 1.0), (0.0, 2.0)]
        );
        assert_eq!(csv_columns(csv, "x", "entropy").unwrap(), vec![(1.0, 3.5)]);
        assert!(
            csv_columns(csv, "x", "nope")
                .unwrap_err()
                .to_string()
                .contains("nope")
        );
    }
}
