//! The front end's decisions as pure functions: replies in, a plan out. No I/O,
//! no clocks, no locks: the volume executes the plans, tests feed synthetic
//! replies (see the unit tests below).

use ballast_types::{BlockContext, BlockIdx, ChunkIdx, NodeId, Seq, BLOCK_SIZE_U64};

use crate::membership::{EjectReason, ReplicaSet};
use crate::replica_io::ReplicaError;

/// What the front end does about one failed replica request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reaction {
    /// A newer front end exists: fail the I/O, stop the volume, eject nobody.
    Stop(String),
    /// The request was wrong, not the replica: fail the I/O (EINVAL), eject nobody.
    Invalid(String),
    /// The replica's copy is corrupt here: read elsewhere and repair it.
    Repair,
    /// The chunk was never created on that replica.
    Missing,
    /// The replica failed: eject it before acknowledging anything without it.
    Eject(EjectReason),
}

pub fn classify(err: &ReplicaError) -> Reaction {
    match err {
        ReplicaError::Fenced(m) => Reaction::Stop(m.clone()),
        ReplicaError::Invalid(m) => Reaction::Invalid(m.clone()),
        ReplicaError::ChecksumMismatch(_) => Reaction::Repair,
        ReplicaError::NoSuchChunk => Reaction::Missing,
        ReplicaError::Timeout { .. } => Reaction::Eject(EjectReason::Timeout),
        ReplicaError::Transport(_) => Reaction::Eject(EjectReason::Transport),
        ReplicaError::ChunkExists | ReplicaError::Failed(_) | ReplicaError::NoSpace(_) => {
            Reaction::Eject(EjectReason::ReplicaError)
        }
    }
}

/// How a fanned-out write (or trim, write-zeroes) completes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WritePlan {
    /// Every replica the write went to has it.
    Ack,
    /// Eject these (durably, through membership) and only then acknowledge.
    /// In-sync and rebuilding replicas alike: a rebuilding replica that missed
    /// an acknowledged write must never be promoted.
    EjectThenAck(Vec<(NodeId, EjectReason)>),
    /// Fail the request.
    Fail(WriteFailure),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteFailure {
    Fenced(String),
    Invalid(String),
    /// Acknowledging would leave fewer than min-in-sync copies; no in-sync
    /// replica is ejected. `rebuilding_failed` still should be (best effort):
    /// they missed a write the in-sync replicas may have. `no_space`: every
    /// in-sync failure was a full disk (the client gets ENOSPC, not EIO).
    BelowMinInSync {
        failed: Vec<(NodeId, EjectReason)>,
        remaining: usize,
        rebuilding_failed: Vec<(NodeId, EjectReason)>,
        no_space: bool,
    },
}

/// Decides a write's completion from the replies of every replica it was sent
/// to: `replies` covers the whole snapshot (in-sync and rebuilding members);
/// `rebuilding` says which of them are rebuilding. A missing chunk has already
/// been created and retried by the caller, so here it counts as a failure.
///
/// Invariants kept:
/// - `Ack` only when every replica of the snapshot has the data;
/// - `EjectThenAck` only when at least `min_in_sync` in-sync replicas have it
///   (rebuilding replicas never count);
/// - a rebuilding replica's failure never fails the request: it is ejected.
///   (A fence is not the replica's failure: it proves another front end owns the
///   volume, whoever reports it.) A request that an in-sync replica accepted
///   cannot be invalid, so `Invalid` from a rebuilding replica ejects it.
pub fn plan_write(
    replies: &[(NodeId, Result<(), ReplicaError>)],
    rebuilding: &[NodeId],
    min_in_sync: usize,
) -> WritePlan {
    let mut failed = Vec::new();
    let mut rebuilding_failed = Vec::new();
    let mut invalid = None;
    let mut in_sync = 0;
    let mut no_space = true;
    for (node, reply) in replies {
        let is_rebuilding = rebuilding.contains(node);
        if !is_rebuilding {
            in_sync += 1;
        }
        let Err(e) = reply else { continue };
        let reason = match classify(e) {
            Reaction::Stop(m) => return WritePlan::Fail(WriteFailure::Fenced(m)),
            Reaction::Invalid(m) if !is_rebuilding => {
                invalid = Some(m);
                continue;
            }
            Reaction::Eject(reason) => reason,
            Reaction::Invalid(_) | Reaction::Repair | Reaction::Missing => EjectReason::ReplicaError,
        };
        if is_rebuilding {
            rebuilding_failed.push((*node, reason));
        } else {
            no_space &= matches!(e, ReplicaError::NoSpace(_));
            failed.push((*node, reason));
        }
    }
    if let Some(m) = invalid {
        return WritePlan::Fail(WriteFailure::Invalid(m));
    }
    let remaining = in_sync - failed.len();
    if remaining < min_in_sync {
        let no_space = no_space && !failed.is_empty();
        return WritePlan::Fail(WriteFailure::BelowMinInSync { failed, remaining, rebuilding_failed, no_space });
    }
    failed.extend(rebuilding_failed);
    if failed.is_empty() {
        return WritePlan::Ack;
    }
    WritePlan::EjectThenAck(failed)
}

/// The replica set a volume uses for a chunk after the provider committed
/// `next`; see [`install_set`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Installed {
    /// The set to use: `next`'s version and ejections, the members as below.
    pub set: ReplicaSet,
    /// Members the provider calls in sync that this attachment writes to but
    /// does not read from (a subset of `set.rebuilding`).
    pub write_only: Vec<NodeId>,
    /// Members of `next` left out (only when `admit_new` is false).
    pub left_out: Vec<NodeId>,
}

/// Merges a newly committed set `next` into the one a volume uses (`cur`, with
/// its `write_only` members), keeping the rule that protects reads:
///
/// Invariant: a replica is read from (is in the resulting `in_sync`) only if it
/// has received every write this attachment sent to the chunk since it became
/// a member: it was in sync in `cur`, or it was rebuilding in `cur` (so it has
/// received every write since it was installed) and the provider has now
/// promoted it (so the background copy has filled in the rest). A replica the
/// provider calls in sync that was not a member of `cur` (a new node, or one
/// this attachment ejected earlier, which then missed writes) is written to but
/// not read from (`write_only`), until a later version lists it as rebuilding
/// and then promotes it again.
///
/// Every member of `next` receives writes, except that with `admit_new` false
/// (an ejection's answer: no connection set up, no epoch announced, no ordering
/// with in-flight writes) members that `cur` lacks are left out and reported in
/// `left_out`; the caller must install `next` again through the full path.
pub fn install_set(cur: &ReplicaSet, write_only: &[NodeId], next: &ReplicaSet, admit_new: bool) -> Installed {
    let mut set = ReplicaSet {
        version: next.version,
        in_sync: Vec::with_capacity(next.in_sync.len()),
        rebuilding: Vec::new(),
        ejected: next.ejected.clone(),
    };
    let mut wo = Vec::new();
    let mut left_out = Vec::new();
    for &n in &next.in_sync {
        if cur.contains(n) || (cur.is_rebuilding(n) && !write_only.contains(&n)) {
            set.in_sync.push(n);
        } else if admit_new || cur.is_member(n) {
            set.rebuilding.push(n);
            wo.push(n);
        } else {
            left_out.push(n);
        }
    }
    for &n in &next.rebuilding {
        if admit_new || cur.is_member(n) {
            set.rebuilding.push(n);
            // Demoted to write-only earlier and still not provider-promoted
            // through an announced rebuild: an ejection's answer changes
            // nothing about that; a full install of a version that names it
            // rebuilding means a new copy runs, whose promotion is trusted.
            if !admit_new && write_only.contains(&n) {
                wo.push(n);
            }
        } else {
            left_out.push(n);
        }
    }
    Installed { set, write_only: wo, left_out }
}

/// The order in which to try replicas for a read: the local node first (data
/// locality), then the others rotated by `rr` so load spreads.
pub fn read_order(in_sync: &[NodeId], local: Option<NodeId>, rr: usize) -> Vec<NodeId> {
    let mut order = Vec::with_capacity(in_sync.len());
    if let Some(l) = local.filter(|l| in_sync.contains(l)) {
        order.push(l);
    }
    let others: Vec<NodeId> = in_sync.iter().copied().filter(|n| Some(*n) != local).collect();
    if !others.is_empty() {
        let start = rr % others.len();
        order.extend(others[start..].iter().chain(&others[..start]));
    }
    order
}

/// One piece of a volume request inside one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub chunk: ChunkIdx,
    /// Byte offset inside the chunk.
    pub offset: u64,
    pub len: u64,
    /// Byte offset of this piece inside the request's buffer.
    pub buf_offset: u64,
}

/// Splits `[offset, offset + len)` at chunk boundaries, in order.
pub fn split(offset: u64, len: u64, chunk_size: u64) -> Vec<Piece> {
    let mut pieces = Vec::with_capacity(1);
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let chunk = pos / chunk_size;
        let in_chunk = pos % chunk_size;
        let n = (chunk_size - in_chunk).min(end - pos);
        pieces.push(Piece { chunk: ChunkIdx(chunk as u32), offset: in_chunk, len: n, buf_offset: pos - offset });
        pos += n;
    }
    pieces
}

/// A run of consecutive blocks to copy during reconciliation: all written by
/// the same write (`seq`), all found intact on `sources`, all different on
/// `targets`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyRun {
    pub first: BlockIdx,
    pub count: u32,
    pub seq: Seq,
    pub sources: Vec<NodeId>,
    pub targets: Vec<NodeId>,
}

impl CopyRun {
    pub fn byte_offset(&self) -> u64 {
        u64::from(self.first.0) * BLOCK_SIZE_U64
    }
    pub fn byte_len(&self) -> u64 {
        u64::from(self.count) * BLOCK_SIZE_U64
    }
}

/// Plans the reconciliation of one stretch of a dirty chunk: for every block
/// whose contexts differ between replicas, the copy with the highest seq wins
/// and is copied to every replica that differs from it (the executor writes
/// it under a fresh seq to sources and targets alike, so contexts match).
/// `tables[i].1[k]` is replica i's context of block `first + k`; all tables
/// have the same length.
///
/// Among equal seqs (a block at seq 0 whose content differs, e.g. left torn
/// by a crash mid-write on one replica, and absent on another) a written
/// context wins over the default one of a replica that lacks the chunk:
/// either is allowed (the write was never acknowledged) and only the written
/// one can be read back.
///
/// Why the highest seq: a front end that crashed mid-write may have reached
/// some replicas and not others; the write was never acknowledged, so either
/// outcome is allowed, but all replicas must agree, and the newest one is the
/// only choice that cannot undo an acknowledged write (an acknowledged write is
/// on every in-sync replica, so nothing older than it can win).
pub fn plan_reconcile(first: BlockIdx, tables: &[(NodeId, Vec<BlockContext>)]) -> Vec<CopyRun> {
    let mut runs: Vec<CopyRun> = Vec::new();
    let blocks = tables.iter().map(|(_, t)| t.len()).min().unwrap_or(0);
    for k in 0..blocks {
        // Ties at the highest seq go to a context that is not the default one
        // (what a replica missing the chunk, or a block never written, has):
        // a replica without the chunk is never a source.
        let best = tables.iter().map(|(_, t)| t[k]).max_by_key(|c| (c.seq, *c != BlockContext::default()));
        let Some(best) = best else { continue };
        let (sources, targets): (Vec<_>, Vec<_>) = tables.iter().partition(|(_, t)| t[k] == best);
        if targets.is_empty() {
            continue;
        }
        let sources: Vec<NodeId> = sources.iter().map(|(n, _)| *n).collect();
        let targets: Vec<NodeId> = targets.iter().map(|(n, _)| *n).collect();
        let block = BlockIdx(first.0 + k as u32);
        match runs.last_mut() {
            Some(r)
                if r.first.0 + r.count == block.0
                    && r.seq == best.seq
                    && r.sources == sources
                    && r.targets == targets =>
            {
                r.count += 1
            }
            _ => runs.push(CopyRun { first: block, count: 1, seq: best.seq, sources, targets }),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_types::Epoch;
    use proptest::prelude::*;

    const A: NodeId = NodeId(1);
    const B: NodeId = NodeId(2);
    const C: NodeId = NodeId(3);

    fn timeout() -> ReplicaError {
        ReplicaError::Timeout { op: "write" }
    }

    #[test]
    fn write_all_ok_acks() {
        assert_eq!(plan_write(&[(A, Ok(())), (B, Ok(())), (C, Ok(()))], &[], 2), WritePlan::Ack);
    }

    #[test]
    fn write_one_failed_ejects_then_acks() {
        let plan = plan_write(&[(A, Ok(())), (B, Err(timeout())), (C, Ok(()))], &[], 2);
        assert_eq!(plan, WritePlan::EjectThenAck(vec![(B, EjectReason::Timeout)]));
        let plan = plan_write(&[(A, Ok(())), (B, Err(ReplicaError::Transport("reset".into())))], &[], 1);
        assert_eq!(plan, WritePlan::EjectThenAck(vec![(B, EjectReason::Transport)]));
    }

    #[test]
    fn write_below_min_fails_without_ejecting() {
        let plan = plan_write(&[(A, Ok(())), (B, Err(timeout())), (C, Err(ReplicaError::Failed("io".into())))], &[], 2);
        assert_eq!(
            plan,
            WritePlan::Fail(WriteFailure::BelowMinInSync {
                failed: vec![(B, EjectReason::Timeout), (C, EjectReason::ReplicaError)],
                remaining: 1,
                rebuilding_failed: vec![],
                no_space: false,
            })
        );
    }

    #[test]
    fn full_disks_fail_the_write_with_no_space_only_when_every_failure_is_one() {
        let full = || Err(ReplicaError::NoSpace("write".into()));
        // One full disk within the margin: ejected, acknowledged.
        let plan = plan_write(&[(A, Ok(())), (B, full()), (C, Ok(()))], &[], 2);
        assert_eq!(plan, WritePlan::EjectThenAck(vec![(B, EjectReason::ReplicaError)]));
        // Too many full disks: the write fails as ENOSPC, nobody is ejected.
        let plan = plan_write(&[(A, Ok(())), (B, full()), (C, full())], &[], 2);
        assert!(matches!(plan, WritePlan::Fail(WriteFailure::BelowMinInSync { no_space: true, remaining: 1, .. })));
        // One of the failures is not a full disk: EIO as before.
        let plan = plan_write(&[(A, Ok(())), (B, full()), (C, Err(timeout()))], &[], 2);
        assert!(matches!(plan, WritePlan::Fail(WriteFailure::BelowMinInSync { no_space: false, .. })));
        // A full rebuilding replica is ejected and does not decide the answer.
        let plan = plan_write(&[(A, Err(timeout())), (R, full())], &[R], 1);
        assert!(matches!(plan, WritePlan::Fail(WriteFailure::BelowMinInSync { no_space: false, .. })));
    }

    #[test]
    fn a_replica_missing_the_chunk_is_never_a_source() {
        let missing = vec![BlockContext::default(); 2];
        let present =
            vec![BlockContext { crc: 7, seq: Seq::ZERO }, BlockContext { crc: 0, seq: Seq::new(Epoch(2), 1) }];
        for tables in
            [vec![(A, missing.clone()), (B, present.clone())], vec![(B, present.clone()), (A, missing.clone())]]
        {
            let runs = plan_reconcile(BlockIdx(0), &tables);
            assert_eq!(runs.len(), 2, "{runs:?}");
            for r in &runs {
                assert_eq!((r.sources.as_slice(), r.targets.as_slice()), ([B].as_slice(), [A].as_slice()), "{runs:?}");
            }
        }
    }

    #[test]
    fn fenced_wins_over_everything() {
        let plan = plan_write(&[(A, Err(timeout())), (B, Err(ReplicaError::Fenced("e5".into()))), (C, Ok(()))], &[], 1);
        assert_eq!(plan, WritePlan::Fail(WriteFailure::Fenced("e5".into())));
    }

    #[test]
    fn invalid_request_ejects_nobody() {
        let plan = plan_write(&[(A, Err(ReplicaError::Invalid("range".into()))), (B, Err(timeout()))], &[], 1);
        assert_eq!(plan, WritePlan::Fail(WriteFailure::Invalid("range".into())));
    }

    const R: NodeId = NodeId(4);

    #[test]
    fn rebuilding_failure_ejects_it_and_never_fails_the_write() {
        // Every in-sync replica has it: the rebuilding one is ejected, then ack.
        let plan = plan_write(&[(A, Ok(())), (B, Ok(())), (R, Err(timeout()))], &[R], 2);
        assert_eq!(plan, WritePlan::EjectThenAck(vec![(R, EjectReason::Timeout)]));
        // Even an answer that would fail the request from an in-sync replica.
        let plan = plan_write(&[(A, Ok(())), (R, Err(ReplicaError::Invalid("size".into())))], &[R], 1);
        assert_eq!(plan, WritePlan::EjectThenAck(vec![(R, EjectReason::ReplicaError)]));
        let plan = plan_write(&[(A, Ok(())), (R, Err(ReplicaError::NoSuchChunk))], &[R], 1);
        assert_eq!(plan, WritePlan::EjectThenAck(vec![(R, EjectReason::ReplicaError)]));
        // A fence still stops the volume, whoever reports it.
        let plan = plan_write(&[(A, Ok(())), (R, Err(ReplicaError::Fenced("e9".into())))], &[R], 1);
        assert_eq!(plan, WritePlan::Fail(WriteFailure::Fenced("e9".into())));
        // Success of every member acks.
        assert_eq!(plan_write(&[(A, Ok(())), (R, Ok(()))], &[R], 1), WritePlan::Ack);
    }

    #[test]
    fn rebuilding_replicas_do_not_count_towards_min_in_sync() {
        // Two in-sync, min 2, one in-sync failed: the healthy rebuilding replica
        // does not make up for it.
        let plan = plan_write(&[(A, Ok(())), (B, Err(timeout())), (R, Ok(()))], &[R], 2);
        assert_eq!(
            plan,
            WritePlan::Fail(WriteFailure::BelowMinInSync {
                failed: vec![(B, EjectReason::Timeout)],
                remaining: 1,
                rebuilding_failed: vec![],
                no_space: false,
            })
        );
        let plan = plan_write(&[(A, Err(timeout())), (R, Err(timeout()))], &[R], 1);
        assert_eq!(
            plan,
            WritePlan::Fail(WriteFailure::BelowMinInSync {
                failed: vec![(A, EjectReason::Timeout)],
                remaining: 0,
                rebuilding_failed: vec![(R, EjectReason::Timeout)],
                no_space: false,
            })
        );
        // In-sync failure within the margin plus a rebuilding failure: both ejected.
        let plan = plan_write(&[(A, Ok(())), (B, Err(timeout())), (C, Ok(())), (R, Err(timeout()))], &[R], 2);
        assert_eq!(plan, WritePlan::EjectThenAck(vec![(B, EjectReason::Timeout), (R, EjectReason::Timeout)]));
    }

    fn set(version: u64, in_sync: &[NodeId], rebuilding: &[NodeId]) -> ReplicaSet {
        ReplicaSet { version, in_sync: in_sync.to_vec(), rebuilding: rebuilding.to_vec(), ejected: vec![] }
    }

    #[test]
    fn install_adds_rebuilding_and_promotes_only_what_was_written_to() {
        let cur = set(1, &[A, B], &[]);
        // A new rebuilding replica on a new node: written to, not read.
        let i = install_set(&cur, &[], &set(2, &[A, B], &[R]), true);
        assert_eq!((i.set.clone(), i.write_only.clone(), i.left_out.clone()), (set(2, &[A, B], &[R]), vec![], vec![]));
        // Promoted after this attachment wrote to it: read from.
        let p = install_set(&i.set, &i.write_only, &set(3, &[A, B, R], &[]), true);
        assert_eq!(p.set, set(3, &[A, B, R], &[]));
        // In sync in the provider's eyes but never written to by us (we missed
        // the rebuilding version): write-only.
        let skip = install_set(&cur, &[], &set(3, &[A, B, R], &[]), true);
        assert_eq!((skip.set.clone(), skip.write_only.clone()), (set(3, &[A, B], &[R]), vec![R]));
        // ... and an ejection's answer does not promote it either.
        let e = install_set(&skip.set, &skip.write_only, &set(4, &[A, R], &[]), false);
        assert_eq!((e.set, e.write_only), (set(4, &[A], &[R]), vec![R]));
        // A full install that names it rebuilding again resets it: a later
        // promotion is trusted.
        let r = install_set(&skip.set, &skip.write_only, &set(5, &[A, B], &[R]), true);
        assert_eq!((r.set.clone(), r.write_only.clone()), (set(5, &[A, B], &[R]), vec![]));
        assert_eq!(install_set(&r.set, &r.write_only, &set(6, &[A, B, R], &[]), true).set, set(6, &[A, B, R], &[]));
    }

    #[test]
    fn an_ejection_answer_never_admits_a_replica_without_a_full_install() {
        // B was ejected by us (cur lacks it); the provider since re-added it.
        let cur = set(3, &[A, C], &[]);
        let i = install_set(&cur, &[], &set(5, &[A], &[B]), false);
        assert_eq!((i.set, i.left_out), (set(5, &[A], &[]), vec![B]));
        // A promotion seen in an ejection's answer is kept: it got every write.
        let cur = set(3, &[A, C], &[R]);
        let i = install_set(&cur, &[], &set(5, &[A, R], &[]), false);
        assert_eq!((i.set, i.left_out), (set(5, &[A, R], &[]), vec![]));
    }

    #[test]
    fn read_order_prefers_local_then_rotates() {
        assert_eq!(read_order(&[A, B, C], Some(C), 0), vec![C, A, B]);
        assert_eq!(read_order(&[A, B, C], Some(C), 1), vec![C, B, A]);
        assert_eq!(read_order(&[A, B, C], None, 1), vec![B, C, A]);
        // A local node that is not in sync is not read.
        assert_eq!(read_order(&[A, B], Some(C), 0), vec![A, B]);
    }

    fn ctx(epoch: u64, counter: u64, crc: u32) -> BlockContext {
        BlockContext { crc, seq: Seq::new(Epoch(epoch), counter) }
    }

    #[test]
    fn reconcile_copies_highest_seq_and_coalesces() {
        let z = BlockContext::default();
        let tables = vec![
            (A, vec![ctx(1, 5, 7), ctx(1, 5, 8), z, ctx(1, 9, 1), ctx(2, 1, 3)]),
            (B, vec![ctx(1, 5, 7), ctx(1, 4, 2), z, ctx(1, 9, 1), ctx(1, 1, 3)]),
            (C, vec![ctx(1, 5, 7), ctx(1, 4, 2), z, ctx(1, 9, 1), ctx(2, 1, 3)]),
        ];
        let runs = plan_reconcile(BlockIdx(100), &tables);
        assert_eq!(
            runs,
            vec![
                CopyRun {
                    first: BlockIdx(101),
                    count: 1,
                    seq: Seq::new(Epoch(1), 5),
                    sources: vec![A],
                    targets: vec![B, C]
                },
                CopyRun {
                    first: BlockIdx(104),
                    count: 1,
                    seq: Seq::new(Epoch(2), 1),
                    sources: vec![A, C],
                    targets: vec![B]
                },
            ]
        );
        let tables = vec![(A, vec![ctx(3, 1, 1); 4]), (B, vec![z; 4])];
        let runs = plan_reconcile(BlockIdx(0), &tables);
        assert_eq!(runs.len(), 1);
        assert_eq!((runs[0].count, runs[0].byte_len()), (4, 4 * BLOCK_SIZE_U64));
    }

    proptest! {
        #[test]
        fn split_covers_the_range_in_chunk_bounds(offset in 0u64..1 << 30, len in 1u64..1 << 26, cs_blocks in 1u64..2048) {
            let cs = cs_blocks * 4096;
            let pieces = split(offset, len, cs);
            let mut pos = offset;
            for p in &pieces {
                prop_assert_eq!(u64::from(p.chunk.0) * cs + p.offset, pos);
                prop_assert_eq!(p.buf_offset, pos - offset);
                prop_assert!(p.len > 0 && p.offset + p.len <= cs);
                pos += p.len;
            }
            prop_assert_eq!(pos, offset + len);
        }

        #[test]
        fn reconcile_makes_every_replica_agree(
            raw in proptest::collection::vec(proptest::collection::vec((0u64..3, 0u64..4), 8), 2..4)
        ) {
            // Contexts derived from seq, so equal seqs carry equal content.
            let tables: Vec<(NodeId, Vec<BlockContext>)> = raw.iter().enumerate().map(|(i, t)| {
                (NodeId(i as u64), t.iter().map(|(e, c)| ctx(*e, *c, (*e * 10 + *c) as u32)).collect())
            }).collect();
            let runs = plan_reconcile(BlockIdx(0), &tables);
            let mut after = tables.clone();
            for r in &runs {
                prop_assert!(!r.sources.is_empty());
                for k in r.first.0..r.first.0 + r.count {
                    let src = tables.iter().find(|(n, _)| *n == r.sources[0]).unwrap().1[k as usize];
                    prop_assert_eq!(src.seq, r.seq);
                    for t in &r.targets {
                        after.iter_mut().find(|(n, _)| n == t).unwrap().1[k as usize] = src;
                    }
                }
            }
            for k in 0..8 {
                let max = tables.iter().map(|(_, t)| t[k].seq).max().unwrap();
                for (_, t) in &after {
                    prop_assert_eq!(t[k].seq, max);
                }
            }
        }
    }
}
