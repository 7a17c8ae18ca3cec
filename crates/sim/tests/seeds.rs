//! The simulation's entry points as tests: the CI seed set, determinism, and
//! the replay of one seed (`BALLAST_SIM_SEED`).

use ballast_sim::{replay_command, run_seed, FaultRates, SimConfig};

/// Seeds `0..CI_SEEDS` run in CI with the default fault rates.
const CI_SEEDS: u64 = 300;

fn fail(v: &ballast_sim::Violation) -> ! {
    panic!("invariant violated: {v}")
}

#[test]
fn ci_seed_set() {
    let cfg = SimConfig::default();
    let (mut acked, mut attaches, mut fenced, mut faults, mut reads) = (0, 0, 0, 0, 0);
    let (mut snapshots, mut snapshot_blocks, mut clones, mut source_blocks) = (0, 0, 0, 0);
    for seed in 0..CI_SEEDS {
        let r = run_seed(seed, &cfg).unwrap_or_else(|v| fail(&v));
        acked += r.acked_writes;
        attaches += r.attaches;
        fenced += r.fenced_attempts;
        faults += r.replica_faults;
        reads += r.reads_checked;
        snapshots += r.snapshots;
        snapshot_blocks += r.snapshot_blocks_checked;
        clones += u64::from(r.clone_source_blocks > 0);
        source_blocks += r.clone_source_blocks;
    }
    eprintln!("{CI_SEEDS} seeds: {acked} acknowledged writes, {reads} reads checked, {attaches} attaches, {fenced} fenced writes, {faults} replica faults, {snapshots} snapshots taken, {snapshot_blocks} snapshot blocks checked at the end, {clones} seeds on a clone ({source_blocks} blocks from its source)");
    // The workload must actually exercise the protocol (not a vacuous pass).
    assert!(acked > CI_SEEDS * 50, "too few acknowledged writes: {acked}");
    assert!(attaches > CI_SEEDS, "no re-attaches: {attaches}");
    assert!(fenced > 0 && faults > CI_SEEDS, "faults not exercised: {fenced} fenced, {faults} replica faults");
    assert!(
        snapshots > CI_SEEDS && snapshot_blocks > CI_SEEDS * 64,
        "snapshots not exercised: {snapshots}, {snapshot_blocks} blocks"
    );
    assert!(clones > CI_SEEDS / 5 && source_blocks > clones * 16, "clones not exercised: {clones}, {source_blocks}");
}

#[test]
fn heavy_faults_seed_set() {
    let cfg = SimConfig { fault_rate: 3.0, steps: 200, ..SimConfig::default() };
    for seed in 10_000..10_050 {
        run_seed(seed, &cfg).unwrap_or_else(|v| fail(&v));
    }
}

#[test]
fn no_faults_every_write_is_acknowledged() {
    let cfg = SimConfig { rates: FaultRates::none(), ..SimConfig::default() };
    let r = run_seed(5, &cfg).unwrap_or_else(|v| fail(&v));
    assert_eq!(r.failed_ops, 0);
    assert_eq!(r.attaches, 2, "the first attach and the final one");
    assert!(r.acked_writes > 100);
    assert!(r.snapshots > 0 && r.snapshot_blocks_checked > 0, "{} snapshots", r.snapshots);
}

#[test]
fn same_seed_same_trace() {
    let cfg = SimConfig { keep_trace: true, ..SimConfig::default() };
    for seed in [3, 77, 1234] {
        let a = run_seed(seed, &cfg).unwrap_or_else(|v| fail(&v));
        let b = run_seed(seed, &cfg).unwrap_or_else(|v| fail(&v));
        assert_eq!(a.trace, b.trace, "seed {seed} replays differently");
        assert_eq!(a.trace_hash, b.trace_hash);
        assert!(a.events > 1000, "seed {seed}: only {} events", a.events);
    }
}

#[test]
fn different_seeds_different_traces() {
    let cfg = SimConfig::default();
    let hashes: std::collections::BTreeSet<u64> =
        (0..8).map(|s| run_seed(s, &cfg).unwrap_or_else(|v| fail(&v)).trace_hash).collect();
    assert_eq!(hashes.len(), 8);
}

/// `BALLAST_SIM_SEED=<seed> cargo test --release -p ballast-sim replay -- --nocapture`
/// runs one seed with its trace printed (seed 0 without the variable).
#[test]
fn replay() {
    let seed = std::env::var("BALLAST_SIM_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let cfg = SimConfig { keep_trace: true, ..SimConfig::from_env() };
    match run_seed(seed, &cfg) {
        Ok(r) => {
            for line in &r.trace {
                println!("{line}");
            }
            println!(
                "seed {seed}: ok; {} events, trace hash {:016x}, {} acknowledged writes, {} reads checked, {} attaches, {:?} virtual",
                r.events, r.trace_hash, r.acked_writes, r.reads_checked, r.attaches, r.virtual_time
            );
        }
        Err(v) => {
            for line in &v.trace {
                println!("{line}");
            }
            panic!("invariant violated: {v}\n(replay with {})", replay_command(seed, &cfg))
        }
    }
}

/// KNOWN VIOLATION (front end + store), excluded from the CI set: a write
/// whose request to an in-sync replica outlives the front end's deadline can
/// apply there AFTER a later acknowledged write to the same blocks.
///
/// Seed 7 with late delivery (trace excerpt, chunk 3, block 57):
/// ```text
///   8558ms fault: node-1 partitioned
///   8558ms op: write blocks 54..+4 (block 57 version 2), seq 4.21
///   8560ms node-3 applies 4.21; node-1 never gets it; node-2's copy is slow
///   9560ms done: write 54..+4 -> Err("2 in-sync replicas failed, 1 left")   (nobody ejected)
///   9560ms op: write blocks 57..+3 (block 57 version 3), seq 4.22, fua
///   9561ms node-3 applies 4.22;  9563ms node-2 applies 4.22
///   9582ms node-2 applies the late 4.21: block 57 back to version 2
///  10562ms node-1 ejected; write 57..+3 acknowledged (flushed)
///  12608ms read of block 57 from node-2 (in sync) -> version 2
/// ```
/// The timed-out replica stays in sync because ejecting it would go below
/// min-in-sync (the failing write is refused instead), and the store applied
/// writes in arrival order. Fixed in the store: a block only moves to a newer
/// seq, so the late 4.21 keeps block 57 at 4.22 (`ChunkStore::begin_mutation`).
#[test]
fn late_write_after_timeout_keeps_the_newer_block() {
    let cfg = SimConfig { rates: FaultRates { late_delivery: true, ..FaultRates::default() }, ..SimConfig::default() };
    run_seed(7, &cfg).unwrap_or_else(|v| fail(&v));
}
