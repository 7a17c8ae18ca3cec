//! What a checker knows about each block of a volume, and the rule a read is
//! held to.
//!
//! The invariant (docs/DESIGN.md, 7 "Invariants"): a read of block `b` returns `b`'s own
//! data at a version `v` with `floor <= v <= issued`, where `floor` is the last
//! acknowledged write when the read started (Ballast acknowledges a write only
//! once min-in-sync replicas hold it, so an acknowledged write survives even
//! unflushed, short of losing power on every replica at once), and `issued` the
//! newest write attempted (a failed or in-flight write may or may not have
//! landed). Never a version written by a fenced front end, never another
//! block's data, never garbage.

use std::collections::BTreeSet;

use crate::pattern::Seen;

/// One block's history as the workload saw it.
#[derive(Clone, Debug, Default)]
pub struct BlockModel {
    /// Version of the last acknowledged write (0: none).
    pub acked: u64,
    /// Version of the last acknowledged write known flushed.
    pub flushed: u64,
    /// Highest version issued.
    pub issued: u64,
    /// Versions written (attempted) by a fenced front end: never to be seen.
    pub forbidden: BTreeSet<u64>,
    /// A write to the block is in flight (workloads never overlap writes to one
    /// block, so "the last acknowledged" is well defined).
    pub busy: bool,
}

/// A read that broke the invariant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// What went wrong, e.g. "an acknowledged, flushed write was lost".
    pub what: String,
    /// What the ledger allowed.
    pub expected: String,
    /// What the read returned.
    pub got: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: expected {}, got {}", self.what, self.expected, self.got)
    }
}

impl BlockModel {
    /// Issues the next version of this block and marks it busy.
    pub fn issue(&mut self) -> u64 {
        self.issued += 1;
        self.busy = true;
        self.issued
    }

    /// A write of `version` completed; `ok` if it was acknowledged, `durable`
    /// if it was also flushed (FUA).
    pub fn completed(&mut self, version: u64, ok: bool, durable: bool) {
        self.busy = false;
        if ok {
            self.acked = self.acked.max(version);
            if durable {
                self.flushed = self.flushed.max(version);
            }
        }
    }

    /// Checks what a read returned, against `floor` (the last acknowledged
    /// version when the read started). `what` names the read in the message.
    pub fn check(&self, floor: u64, seen: &Seen, what: &str) -> Result<(), Mismatch> {
        let expected = || {
            let later =
                if self.issued > floor { format!(" or a later one up to {}", self.issued) } else { String::new() };
            format!("version {floor}{later} (last acknowledged {}, last flushed {})", self.acked, self.flushed)
        };
        let fail = |kind: String| Err(Mismatch { what: kind, expected: expected(), got: seen.to_string() });
        let Some(v) = seen.version() else {
            return fail(format!("{what} returned data never written to this block"));
        };
        if self.forbidden.contains(&v) {
            return fail(format!("{what} returned a fenced front end's write"));
        }
        if v < floor {
            let kind = if v < self.flushed {
                "an acknowledged, flushed write was lost"
            } else {
                "an acknowledged write was lost"
            };
            return fail(format!("{what}: {kind}"));
        }
        if v > self.issued {
            return fail(format!("{what} returned a version never issued"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> BlockModel {
        let mut m = BlockModel::default();
        for ok in [true, true, false] {
            let v = m.issue();
            m.completed(v, ok, v == 1);
        }
        m
    }

    #[test]
    fn accepts_the_last_acknowledged_and_any_later_attempt() {
        let m = model();
        assert_eq!((m.acked, m.flushed, m.issued, m.busy), (2, 1, 3, false));
        assert_eq!(m.check(2, &Seen::Version(2), "read"), Ok(()));
        assert_eq!(m.check(2, &Seen::Version(3), "read"), Ok(()));
        // A read that started before write 2 was acknowledged may see 1.
        assert_eq!(m.check(1, &Seen::Version(1), "read"), Ok(()));
    }

    #[test]
    fn names_each_kind_of_violation() {
        let mut m = model();
        let what = |r: Result<(), Mismatch>| r.expect_err("must fail").what;
        assert_eq!(what(m.check(2, &Seen::Version(1), "read")), "read: an acknowledged write was lost");
        assert_eq!(what(m.check(2, &Seen::Zeros, "read")), "read: an acknowledged, flushed write was lost");
        assert_eq!(what(m.check(2, &Seen::Version(4), "read")), "read returned a version never issued");
        assert_eq!(what(m.check(2, &Seen::Garbage, "read")), "read returned data never written to this block");
        assert_eq!(
            what(m.check(2, &Seen::Foreign { block: 9, version: 2 }, "read")),
            "read returned data never written to this block"
        );
        m.forbidden.insert(3);
        let e = m.check(2, &Seen::Version(3), "final read").expect_err("fenced");
        assert_eq!(e.what, "final read returned a fenced front end's write");
        assert_eq!(e.expected, "version 2 or a later one up to 3 (last acknowledged 2, last flushed 1)");
        assert_eq!(e.got, "version 3");
    }
}
