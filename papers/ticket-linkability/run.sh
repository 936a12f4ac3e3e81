#!/usr/bin/env bash
# Regenerates the ticket-linkability figures (about a minute on a 2-core machine).
# Run from the repository root: bash papers/ticket-linkability/run.sh
set -euo pipefail
cargo build --release -p murmur-sim
sim=./target/release/murmur-sim
here=papers/ticket-linkability
base=papers/loopix-reproduction/base.toml
rates=0,0.1,0.25,0.5,0.75,1

# μ = 8/s (125 ms per hop) so that mixing alone does not hide everyone from everyone.
for f in 0.17 0.34 0.5; do
  $sim sweep $base --param tickets.rate --values $rates --set rates.mu=8 \
    --set adversary.corrupt_mix_fraction=$f --out $here/data/corrupt-$f
done
for y in entropy_mean_bits min_entropy_mean_bits; do
  $sim plot $here/data/corrupt-0.17/sweep.csv:"2 of 12 mixes corrupt" \
    $here/data/corrupt-0.34/sweep.csv:"4 of 12" $here/data/corrupt-0.5/sweep.csv:"6 of 12" \
    --x tickets.rate --y $y --out $here/$y-vs-ticket-rate.svg \
    --title "Anonymity against the per-hop ticket rate" \
    --x-label "probability a packet carries a ticket for a hop" --y-label "$y"
done
