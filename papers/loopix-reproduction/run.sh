#!/usr/bin/env bash
# Regenerates every figure of this directory (about two minutes on a 2-core machine).
# Run from the repository root: bash papers/loopix-reproduction/run.sh
set -euo pipefail
cargo build --release -p murmur-sim
sim=./target/release/murmur-sim
here=papers/loopix-reproduction
base=$here/base.toml

# Figure 1: entropy against λ/μ (μ swept), with and without cover.
mus=0.25,0.5,1,2,4,8,16,32
$sim sweep $base --param rates.mu --values $mus --out $here/data/mu-cover
$sim sweep $base --param rates.mu --values $mus --set rates.cover=false --out $here/data/mu-nocover
$sim plot $here/data/mu-cover/sweep.csv:cover $here/data/mu-nocover/sweep.csv:"no cover" \
  --x lambda_over_mu --log-x --y entropy_mean_bits --out $here/entropy-vs-lambda-over-mu.svg \
  --title "Sender entropy against λ/μ (μ swept)" --x-label "λ/μ (packets per mix)" \
  --y-label "entropy (bits)"
$sim plot $here/data/mu-cover/sweep.csv:cover $here/data/mu-nocover/sweep.csv:"no cover" \
  --x latency_mean_s --y entropy_mean_bits --out $here/entropy-vs-latency.svg \
  --title "Anonymity against latency (μ swept)" --x-label "mean end-to-end latency (s)" \
  --y-label "entropy (bits)"

# Figure 2: entropy against the number of clients, with and without cover.
clients=100,200,500,1000,2000,4000
$sim sweep $base --param network.clients --values $clients --out $here/data/clients-cover
$sim sweep $base --param network.clients --values $clients --set rates.cover=false \
  --out $here/data/clients-nocover
$sim plot $here/data/clients-cover/sweep.csv:cover $here/data/clients-nocover/sweep.csv:"no cover" \
  --x network.clients --log-x --y entropy_mean_bits --out $here/entropy-vs-clients.svg \
  --title "Sender entropy against the number of clients" --x-label clients \
  --y-label "entropy (bits)"

# Figure 3: entropy against the fraction of corrupt mixes (global observer as well).
$sim sweep $base --param adversary.corrupt_mix_fraction --values 0,0.17,0.34,0.5,0.67,0.84 \
  --set rates.mu=8 --out $here/data/corrupt
$sim plot $here/data/corrupt/sweep.csv:entropy --x adversary.corrupt_mix_fraction \
  --y entropy_mean_bits --out $here/entropy-vs-corrupt.svg \
  --title "Sender entropy against corrupt mixes (μ = 8/s)" --x-label "fraction of mixes corrupt" \
  --y-label "entropy (bits)"

# Cost of cover: overhead against λ_P at a fixed message rate.
$sim sweep $base --param rates.lambda_p --values 0.2,0.5,1,2,4 --out $here/data/lambda-p
$sim plot $here/data/lambda-p/sweep.csv:entropy --x overhead_ratio --y entropy_mean_bits \
  --out $here/entropy-vs-overhead.svg --title "Anonymity against cover overhead (λ_P swept)" \
  --x-label "cover packets per real packet" --y-label "entropy (bits)"
