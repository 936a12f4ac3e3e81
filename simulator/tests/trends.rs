//! The directions every anonymity result must show, on a small network: cover and a wider
//! view help the users; corrupt mixes, corrupt gateways and tickets seen by corrupt mixes hurt.
//! Runs share one seed, so the traffic is the same wherever the parameter allows it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use murmur_sim::{Loaded, Scenario, run_loaded};

const BASE: &str = r#"
    version = 1
    duration_s = 60
    warmup_s = 10
    [network]
    clients = 150
    gateways = 3
    layers = 3
    mixes_per_layer = 3
    [rates]
    lambda_p = 2
    lambda_l = 0.5
    lambda_d = 0.5
    lambda_m = 1
    mu = 2
    [traffic]
    model = "poisson"
    messages_per_s = 0.2
"#;

fn entropy(overrides: &[&str]) -> f64 {
    let loaded = Loaded::from_text(BASE, overrides).unwrap();
    let s = run_loaded(&loaded, None, &mut |_| {}).unwrap().0.summary;
    assert!(s.measured_messages > 500, "{}", s.measured_messages);
    s.entropy_mean_bits.unwrap()
}

#[test]
fn cover_and_longer_delays_raise_entropy() {
    let with = entropy(&[]);
    let without = entropy(&["rates.cover = false"]);
    assert!(with > without + 0.5, "cover {with} vs none {without}");
    let fast = entropy(&["rates.mu = 20"]);
    assert!(with > fast + 0.5, "μ=2 {with} vs μ=20 {fast}");
}

#[test]
fn corrupt_mixes_and_tickets_lower_entropy() {
    let honest = entropy(&["rates.mu = 20"]);
    let corrupt = entropy(&["rates.mu = 20", "adversary.corrupt_mix_fraction = 0.34"]);
    let most = entropy(&["rates.mu = 20", "adversary.corrupt_mix_fraction = 0.67"]);
    assert!(
        honest > corrupt && corrupt > most,
        "{honest} > {corrupt} > {most}"
    );
    let tickets = entropy(&[
        "rates.mu = 20",
        "adversary.corrupt_mix_fraction = 0.34",
        "tickets.rate = 0.5",
    ]);
    assert!(
        corrupt > tickets,
        "no tickets {corrupt} vs tickets {tickets}"
    );
    // Tickets seen only by honest mixes cost nothing.
    assert_eq!(honest, entropy(&["rates.mu = 20", "tickets.rate = 1"]));
}

#[test]
fn hiding_access_links_helps_until_the_gateway_is_corrupt() {
    let global = entropy(&["rates.mu = 20"]);
    let backbone = entropy(&["rates.mu = 20", "adversary.global_passive = false"]);
    assert!(backbone > global + 0.5, "{backbone} vs {global}");
    let gateway = entropy(&[
        "rates.mu = 20",
        "adversary.global_passive = false",
        "adversary.corrupt_gateways = 1",
    ]);
    assert!(
        backbone > gateway && gateway > global,
        "{backbone} > {gateway} > {global}"
    );
}

/// Every example scenario loads (and its trace, if it has one, parses).
#[test]
fn example_scenarios_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let loaded = Scenario::load::<&str>(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
            if let Some(file) = &loaded.scenario.traffic.file {
                murmur_sim::scenario::load_trace(
                    &loaded.base_dir.join(file),
                    loaded.scenario.network.clients,
                )
                .unwrap();
            }
            n += 1;
        }
    }
    assert!(n >= 3, "found {n} examples");
}
