//! The simulator against theory: M/M/∞ pools, 3/μ path latency, Danezis's entropy of one
//! exponential mix, and byte-identical output for one seed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use murmur_sim::{Loaded, Summary, run_loaded, write_outputs};

/// A network without cover whose clients send Poisson messages; `overrides` adjust it.
const BASE: &str = r#"
    version = 1
    duration_s = 100
    warmup_s = 10
    [network]
    clients = 100
    layers = 1
    mixes_per_layer = 1
    [rates]
    lambda_p = 0
    lambda_l = 0
    lambda_d = 0
    lambda_m = 0
    mu = 4
    cover = false
    [traffic]
    model = "poisson"
    messages_per_s = 1
    [measure]
    anonymity = false
"#;

fn run(overrides: &[&str]) -> Summary {
    let loaded = Loaded::from_text(BASE, overrides).unwrap();
    run_loaded(&loaded, None, &mut |_| {}).unwrap().0.summary
}

fn assert_within(measured: f64, expected: f64, rel: f64, what: &str) {
    let err = (measured - expected).abs() / expected;
    assert!(
        err < rel,
        "{what}: measured {measured}, expected {expected} (error {:.3}%)",
        err * 100.0
    );
}

/// One mix, Poisson arrivals at λ = 200/s, Exp(μ = 4) delays: the pool holds λ/μ = 50 on
/// average (M/M/∞). The time average over T = 500 s has relative sd √(2/(ρμT)) ≈ 0.45%, so 2%
/// is 4.5 sd.
#[test]
fn one_mix_holds_lambda_over_mu_packets() {
    let s = run(&[
        "duration_s = 520",
        "warmup_s = 20",
        "traffic.messages_per_s = 2",
    ]);
    assert_within(s.mix_arrival_rate_per_s, 200.0, 0.02, "arrival rate");
    assert_within(s.mean_pool_size, 50.0, 0.02, "mean pool (M/M/∞)");
    eprintln!("mean pool {} (λ/μ = 50)", s.mean_pool_size);
}

/// Three layers at μ = 10/s: mean latency 3/μ = 0.3 s. 50,000 messages give a relative sd of
/// √3/3/√50000 ≈ 0.26%, so 2% is 7.7 sd.
#[test]
fn three_layer_latency_is_three_over_mu() {
    let s = run(&[
        "duration_s = 510",
        "network.layers = 3",
        "network.mixes_per_layer = 3",
        "rates.mu = 10",
    ]);
    assert!(s.messages > 45_000, "{}", s.messages);
    assert_within(s.latency_mean_s.unwrap(), 0.3, 0.02, "mean latency");
    eprintln!("mean latency {:?} s (3/μ = 0.3)", s.latency_mean_s);
    // Without cover, a message leaves at once: end to end is the network latency.
    assert_within(
        s.network_latency_mean_s.unwrap(),
        s.latency_mean_s.unwrap(),
        1e-9,
        "network latency",
    );
}

/// Danezis (PET 2004): the sender entropy of an exponential mix with Poisson arrivals from
/// distinct senders approaches ln(λe/μ) = 1 + ln(λ/μ) nats for large λ/μ. Here λ/μ = 20
/// (5.765 bits), with 5,000 clients so that senders rarely repeat within a pool's memory.
#[test]
fn one_mix_entropy_approaches_danezis() {
    let s = run(&[
        "duration_s = 220",
        "warmup_s = 20",
        "network.clients = 5000",
        "traffic.messages_per_s = 0.02",
        "rates.mu = 5",
        "measure.anonymity = true",
        "measure.sample = 0.25",
    ]);
    let expected_bits = (1.0 + 20f64.ln()) / 2f64.ln();
    let h = s.entropy_mean_bits.unwrap();
    eprintln!("entropy {h} bits, Danezis {expected_bits} bits");
    assert!(s.measured_messages > 4_000, "{}", s.measured_messages);
    assert_within(h, expected_bits, 0.02, "entropy of one mix");
}

/// The same seed writes byte-identical summary.json and messages.csv; another seed does not.
#[test]
fn same_seed_same_bytes() {
    let scenario = Loaded::from_text(
        BASE,
        &[
            "network.clients = 60",
            "network.layers = 3",
            "network.mixes_per_layer = 2",
            "rates.cover = true",
            "rates.lambda_p = 2",
            "rates.lambda_l = 0.5",
            "rates.lambda_d = 0.5",
            "rates.lambda_m = 1",
            "traffic.messages_per_s = 0.5",
            "measure.anonymity = true",
            "adversary.corrupt_mix_fraction = 0.34",
            "tickets.rate = 0.5",
        ],
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let files = |name: &str, seed: u64| {
        let out = dir.path().join(name);
        let (result, timing) = run_loaded(&scenario, Some(seed), &mut |_| {}).unwrap();
        write_outputs(&out, &result, &timing).unwrap();
        ["summary.json", "messages.csv", "mixes.csv"].map(|f| std::fs::read(out.join(f)).unwrap())
    };
    let a = files("a", 7);
    let b = files("b", 7);
    let c = files("c", 8);
    assert!(a[1].len() > 1000, "messages were measured");
    assert_eq!(a, b);
    assert_ne!(a[0], c[0]);
}
