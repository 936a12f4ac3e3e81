#!/usr/bin/env bash
# Regenerates the fidelity-loss result: page-load time to first byte and completion, and
# sender entropy, against the loss rate of every link, from the shipping client sessions,
# payers, gateways, relays and exit on real packets (murmur-sim's fidelity mode). About
# 5 minutes on the 2-core development machine. Run from the repository root:
#   bash papers/fidelity-loss/run.sh
set -euo pipefail
cargo build --release -p murmur-sim
sim=./target/release/murmur-sim
here=papers/fidelity-loss
nice -n 19 $sim sweep $here/base.toml --fidelity --param links.loss \
  --values 0,0.01,0.02,0.03,0.05 --out $here/data
cp $here/data/sweep.csv $here/loss.csv
$sim plot $here/loss.csv --x links.loss \
  --y ttfb_mean_s,completion_mean_s,completion_p50_s,completion_p99_s \
  --out $here/completion-vs-loss.svg --title "Page loads against link loss (fidelity mode)" \
  --x-label "loss per link crossing" --y-label "seconds"
$sim plot $here/loss.csv --x links.loss --y entropy_mean_bits,min_entropy_mean_bits \
  --out $here/entropy-vs-loss.svg --title "Sender anonymity against link loss (fidelity mode)" \
  --x-label "loss per link crossing" --y-label "bits"
