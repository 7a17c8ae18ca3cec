//! Explores many seeds of the Raft-layer simulation ([`ballast_sim::raft`])
//! and prints the failing ones with their replay command.
//!
//! ```text
//! cargo run --release -p ballast-sim --example raft -- --seeds 0..2000 [--members 5] [--fault-rate 2] [--steps 60] [--max-failures 20]
//! ```

use std::process::ExitCode;
use std::time::Instant;

use ballast_sim::raft::{raft_replay_command, run_raft_seed, RaftSimConfig};

fn usage() -> ExitCode {
    eprintln!("usage: raft --seeds A..B [--members N] [--fault-rate F] [--steps N] [--max-failures K]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut cfg = RaftSimConfig::default();
    let (mut seeds, mut max_failures) = ((0u64, 100u64), 20usize);
    let mut i = 0;
    while i < args.len() {
        let val = args.get(i + 1).cloned().unwrap_or_default();
        let ok = match args[i].as_str() {
            "--seeds" => match val.split_once("..").map(|(a, b)| (a.parse(), b.parse())) {
                Some((Ok(a), Ok(b))) if a < b => {
                    seeds = (a, b);
                    true
                }
                _ => false,
            },
            "--members" => val.parse().map(|m| cfg.members = m).is_ok() && cfg.members >= 1,
            "--fault-rate" => val.parse().map(|r| cfg.fault_rate = r).is_ok(),
            "--steps" => val.parse().map(|s| cfg.steps = s).is_ok(),
            "--max-failures" => val.parse().map(|k| max_failures = k).is_ok(),
            _ => false,
        };
        if !ok {
            return usage();
        }
        i += 2;
    }
    let start = Instant::now();
    let mut failures = 0;
    let (mut acked, mut leaders, mut shared, mut crashes) = (0u64, 0u64, 0u64, 0u64);
    for seed in seeds.0..seeds.1 {
        match run_raft_seed(seed, &cfg) {
            Ok(r) => {
                acked += r.acked;
                leaders += r.leaders;
                shared += r.shared_terms;
                crashes += r.crashes;
            }
            Err(v) => {
                failures += 1;
                println!("FAIL seed {seed} step {}: {}", v.step, v.what);
                println!("  replay: {}", raft_replay_command(seed, &cfg));
                if failures >= max_failures {
                    println!("stopping after {failures} failures");
                    break;
                }
            }
        }
        let done = seed - seeds.0 + 1;
        if done % 100 == 0 {
            eprintln!("{done} seeds, {failures} failures, {:.1?}", start.elapsed());
        }
    }
    println!(
        "seeds {}..{}: {failures} failures; {acked} acknowledged writes, {leaders} leaders ({shared} terms with two), {crashes} crashes, in {:.1?} ({} members, fault rate x{}, {} steps)",
        seeds.0,
        seeds.1,
        start.elapsed(),
        cfg.members,
        cfg.fault_rate,
        cfg.steps
    );
    if failures > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
