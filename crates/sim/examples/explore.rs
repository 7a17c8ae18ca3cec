//! Explores many seeds and prints the failing ones with their replay command.
//!
//! ```text
//! cargo run --release -p ballast-sim --example explore -- --seeds 0..100000 [--fault-rate 1.5] [--steps 300]
//! ```
//!
//! `--no-late-delivery` makes a request slower than the front end's deadline
//! vanish instead of applying late (late delivery is on by default: it is what
//! a request stuck in a replica's queue does); `--max-failures` stops early.

use std::process::ExitCode;
use std::time::Instant;

use ballast_sim::{replay_command, run_seed, FaultRates, SimConfig};

fn usage() -> ExitCode {
    eprintln!("usage: explore --seeds A..B [--fault-rate F] [--steps N] [--max-failures K] [--no-late-delivery]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut seeds, mut rate, mut steps, mut max_failures) = ((0u64, 1000u64), 1.0f64, 300usize, 20usize);
    let mut late_delivery = true;
    let mut i = 0;
    while i < args.len() {
        let val = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--no-late-delivery" => {
                late_delivery = false;
                i += 1;
                continue;
            }
            "--seeds" => {
                let Some((a, b)) = val.split_once("..") else { return usage() };
                match (a.parse(), b.parse()) {
                    (Ok(a), Ok(b)) if a < b => seeds = (a, b),
                    _ => return usage(),
                }
            }
            "--fault-rate" => match val.parse() {
                Ok(r) => rate = r,
                Err(_) => return usage(),
            },
            "--steps" => match val.parse() {
                Ok(s) => steps = s,
                Err(_) => return usage(),
            },
            "--max-failures" => match val.parse() {
                Ok(k) => max_failures = k,
                Err(_) => return usage(),
            },
            _ => return usage(),
        }
        i += 2;
    }
    let rates = FaultRates { late_delivery, ..FaultRates::default() };
    let cfg = SimConfig { steps, rates, fault_rate: rate, ..SimConfig::default() };
    let start = Instant::now();
    let mut failures = 0;
    let (mut acked, mut attaches) = (0u64, 0u64);
    for seed in seeds.0..seeds.1 {
        match run_seed(seed, &cfg) {
            Ok(r) => {
                acked += r.acked_writes;
                attaches += r.attaches;
            }
            Err(v) => {
                failures += 1;
                println!("FAIL seed {seed}: {} (block {}: expected {}, got {})", v.what, v.block, v.expected, v.got);
                println!("  replay: {}", replay_command(seed, &cfg));
                if failures >= max_failures {
                    println!("stopping after {failures} failures");
                    break;
                }
            }
        }
        let done = seed - seeds.0 + 1;
        if done % 1000 == 0 {
            eprintln!("{done} seeds, {failures} failures, {:.1?}", start.elapsed());
        }
    }
    println!(
        "seeds {}..{}: {failures} failures; {acked} acknowledged writes, {attaches} attaches checked in {:.1?} (fault rate x{rate}, {steps} steps)",
        seeds.0,
        seeds.1,
        start.elapsed()
    );
    if failures > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
