//! The block-device conformance suite: one set of checks that every
//! [`BlockDev`] implementation must pass (the in-memory model, the replicated
//! front end, NBD through a real client). It is a test suite: a violation panics
//! with the step and the first differing block.
//!
//! ```text
//!   run(dev) ──► step ──► dev.write / trim / ... ──► shadow model (block → tag)
//!                  └────► dev.read ──► compare block by block with the model
//! ```
//!
//! Every written block carries its own identity in its first 16 bytes (write tag
//! and block number) followed by pseudo-random bytes derived from both, so a
//! misdirected or stale block is told apart from a corrupted one in the message.
//!
//! Requirements on the device: freshly created (reads zeroes everywhere), at
//! least 256 blocks, writable. The suite touches scattered ranges (start, end,
//! middle) and never reads the whole device, so it stays quick on large volumes.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use bytes::Bytes;

use crate::{BlockDev, BlockError};

/// Runs every check, in order, on a fresh device. Panics on the first violation.
pub async fn run<B: BlockDev>(dev: &B) {
    let mut s = Suite::new(dev);
    s.fresh_reads_zero().await;
    s.read_after_write().await;
    s.largest_request().await;
    s.overlapping_writes_last_wins().await;
    s.trim_reads_zero().await;
    s.write_zeroes_reads_zero().await;
    s.fua_and_flush().await;
    s.invalid_requests_change_nothing().await;
    s.concurrent_disjoint_writes().await;
    s.verify_everything_written("final").await;
}

/// Minimum device size, in blocks, the suite needs for its layout.
pub const MIN_BLOCKS: u64 = 256;

struct Suite<'a, B> {
    dev: &'a B,
    bs: u64,
    size: u64,
    /// Largest read / write the device takes (a block multiple).
    max: u64,
    /// Block number → write tag of the data it must hold; absent means zeroes.
    model: HashMap<u64, u64>,
    /// Every range any step changed, for the final sweep.
    touched: Vec<(u64, u64)>,
    next_tag: u64,
}

impl<'a, B: BlockDev> Suite<'a, B> {
    fn new(dev: &'a B) -> Self {
        let bs = u64::from(dev.block_size());
        let size = dev.size();
        assert!(
            bs.is_power_of_two() && bs >= 512,
            "conformance [geometry]: block size {bs} must be a power of two >= 512"
        );
        assert_eq!(size % bs, 0, "conformance [geometry]: size {size} is not a multiple of the block size {bs}");
        assert!(
            size / bs >= MIN_BLOCKS,
            "conformance [geometry]: the suite needs at least {MIN_BLOCKS} blocks, the device has {}",
            size / bs
        );
        let max = u64::from(dev.max_request()) / bs * bs;
        assert!(max >= bs, "conformance [geometry]: max_request {} is below one block", dev.max_request());
        Suite { dev, bs, size, max, model: HashMap::new(), touched: Vec::new(), next_tag: 1 }
    }

    fn blocks(&self) -> u64 {
        self.size / self.bs
    }

    /// New data for `[off, +len)`, recorded in the model as what must be read back
    /// once the write completes.
    fn make_data(&mut self, off: u64, len: u64) -> (Bytes, u64) {
        let tag = self.next_tag;
        self.next_tag += 1;
        let mut buf = vec![0u8; len as usize];
        for (i, block) in buf.chunks_mut(self.bs as usize).enumerate() {
            fill_block(block, off / self.bs + i as u64, tag);
        }
        (Bytes::from(buf), tag)
    }

    fn record(&mut self, off: u64, len: u64, tag: Option<u64>) {
        for b in off / self.bs..(off + len) / self.bs {
            match tag {
                Some(t) => self.model.insert(b, t),
                None => self.model.remove(&b),
            };
        }
        self.touched.push((off, len));
    }

    async fn write(&mut self, step: &str, off: u64, len: u64, fua: bool) {
        let (data, tag) = self.make_data(off, len);
        if let Err(e) = self.dev.write(off, data, fua).await {
            panic!("conformance [{step}]: write [{off}, +{len}) fua={fua} failed: {e}");
        }
        self.record(off, len, Some(tag));
    }

    async fn trim(&mut self, step: &str, off: u64, len: u64) {
        if let Err(e) = self.dev.trim(off, len).await {
            panic!("conformance [{step}]: trim [{off}, +{len}) failed: {e}");
        }
        self.record(off, len, None);
    }

    async fn write_zeroes(&mut self, step: &str, off: u64, len: u64, fua: bool) {
        if let Err(e) = self.dev.write_zeroes(off, len, fua).await {
            panic!("conformance [{step}]: write_zeroes [{off}, +{len}) fua={fua} failed: {e}");
        }
        self.record(off, len, None);
    }

    async fn flush(&self, step: &str) {
        if let Err(e) = self.dev.flush().await {
            panic!("conformance [{step}]: flush failed: {e}");
        }
    }

    /// Reads `[off, +len)` (in requests of at most `max`) and compares every block
    /// with the model.
    async fn expect(&self, step: &str, off: u64, len: u64) {
        let mut at = off;
        while at < off + len {
            let n = (off + len - at).min(self.max);
            let data = match self.dev.read(at, n as u32).await {
                Ok(d) => d,
                Err(e) => panic!("conformance [{step}]: read [{at}, +{n}) failed: {e}"),
            };
            self.compare(step, at, n, &data);
            at += n;
        }
    }

    fn compare(&self, step: &str, off: u64, len: u64, data: &[u8]) {
        assert_eq!(data.len() as u64, len, "conformance [{step}]: read [{off}, +{len}) returned {} bytes", data.len());
        let mut expected = vec![0u8; self.bs as usize];
        for (i, got) in data.chunks(self.bs as usize).enumerate() {
            let block = off / self.bs + i as u64;
            let tag = self.model.get(&block).copied();
            match tag {
                Some(t) => fill_block(&mut expected, block, t),
                None => expected.fill(0),
            }
            if got != expected.as_slice() {
                let want = match tag {
                    Some(t) => format!("data of write #{t}"),
                    None => "zeroes".to_string(),
                };
                panic!(
                    "conformance [{step}]: block {block} (byte {}) should hold {want} but holds {}",
                    block * self.bs,
                    describe_block(got)
                );
            }
        }
    }

    /// Writes `[off, +len)` and checks it and one block on each side.
    async fn write_and_check(&mut self, step: &str, off: u64, len: u64, fua: bool) {
        self.write(step, off, len, fua).await;
        let lo = off.saturating_sub(self.bs);
        let hi = (off + len + self.bs).min(self.size);
        self.expect(step, lo, hi - lo).await;
    }

    async fn fresh_reads_zero(&mut self) {
        let step = "fresh device reads zeroes";
        let (bs, size) = (self.bs, self.size);
        self.expect(step, 0, bs).await;
        self.expect(step, size - bs, bs).await;
        self.expect(step, size / 2 / bs * bs, bs).await;
        let span = self.max.min(size).min(1 << 20);
        self.expect(step, 0, span).await;
    }

    async fn read_after_write(&mut self) {
        let step = "read after write";
        let bs = self.bs;
        let blocks = self.blocks();
        // The first and last blocks, alone and in runs: off-by-one errors live there.
        self.write_and_check(step, 0, bs, false).await;
        self.write_and_check(step, 0, 3 * bs, false).await;
        self.write_and_check(step, self.size - bs, bs, false).await;
        self.write_and_check(step, self.size - 3 * bs, 3 * bs, false).await;
        // Many sizes at unaligned-to-anything block positions in the middle.
        let max_blocks = self.max / bs;
        let mut at = blocks / 4 + 1;
        for n in [1u64, 2, 3, 5, 7, 8, 16, 31, 33, 64, 255] {
            let n = n.min(max_blocks);
            if at + n + 1 >= blocks - 4 {
                break;
            }
            self.write_and_check(step, at * bs, n * bs, false).await;
            at += n + 1;
        }
        // A re-read of everything so far: later writes did not disturb earlier ones.
        self.verify_everything_written(step).await;
    }

    async fn largest_request(&mut self) {
        let step = "largest request";
        // Only where it fits comfortably; a 32 MiB request on a 1 MiB device is checked
        // by the invalid-request step instead.
        if self.max * 2 > self.size || self.max > 64 << 20 {
            return;
        }
        let off = (self.size / 2 - self.max / 2) / self.bs * self.bs;
        let max = self.max;
        self.write_and_check(step, off, max, false).await;
    }

    async fn overlapping_writes_last_wins(&mut self) {
        let step = "overlapping writes: last wins";
        let bs = self.bs;
        let x = (self.blocks() / 8) * bs;
        self.write(step, x, 8 * bs, false).await;
        self.write(step, x + 4 * bs, 8 * bs, false).await;
        self.write(step, x + 6 * bs, bs, false).await;
        self.expect(step, x - bs, 14 * bs).await;
        // A small write inside a large one, then the large one again.
        self.write(step, x + 2 * bs, 2 * bs, false).await;
        self.expect(step, x - bs, 14 * bs).await;
        self.write(step, x, 12 * bs, false).await;
        self.expect(step, x - bs, 14 * bs).await;
    }

    async fn trim_reads_zero(&mut self) {
        let step = "trim reads zeroes";
        let bs = self.bs;
        let y = (self.blocks() / 8 + 32) * bs;
        self.write(step, y, 16 * bs, false).await;
        self.trim(step, y + 4 * bs, 4 * bs).await;
        self.expect(step, y - bs, 18 * bs).await;
        self.trim(step, y, 16 * bs).await;
        self.expect(step, y - bs, 18 * bs).await;
        // Trimming never-written blocks is fine and keeps zeroes.
        self.trim(step, y + 32 * bs, 8 * bs).await;
        self.expect(step, y + 31 * bs, 10 * bs).await;
        // The device's last block.
        let last = self.size - bs;
        self.write(step, last, bs, false).await;
        self.trim(step, last, bs).await;
        self.expect(step, last - bs, 2 * bs).await;
    }

    async fn write_zeroes_reads_zero(&mut self) {
        let step = "write_zeroes reads zeroes";
        let bs = self.bs;
        let z = (self.blocks() / 8 + 80) * bs;
        self.write(step, z, 16 * bs, false).await;
        self.write_zeroes(step, z + 3 * bs, 5 * bs, false).await;
        self.expect(step, z - bs, 18 * bs).await;
        self.write_zeroes(step, z + 8 * bs, 8 * bs, true).await;
        self.expect(step, z - bs, 18 * bs).await;
        // The device's first blocks, then written again: zeroes are not sticky.
        self.write_zeroes(step, 0, 2 * bs, false).await;
        self.expect(step, 0, 4 * bs).await;
        self.write_and_check(step, 0, bs, false).await;
    }

    async fn fua_and_flush(&mut self) {
        let step = "fua and flush";
        let bs = self.bs;
        let f = (self.blocks() / 8 + 120) * bs;
        self.flush(step).await;
        self.write_and_check(step, f, 4 * bs, true).await;
        self.write(step, f + 8 * bs, 4 * bs, false).await;
        self.flush(step).await;
        self.write_zeroes(step, f + 9 * bs, bs, true).await;
        self.flush(step).await;
        self.expect(step, f - bs, 14 * bs).await;
    }

    async fn invalid_requests_change_nothing(&mut self) {
        let step = "invalid requests";
        let (bs, size, max) = (self.bs, self.size, self.max);
        // Known data at both ends, so a stray partial effect is visible.
        self.write(step, 0, 2 * bs, false).await;
        self.write(step, size - 2 * bs, 2 * bs, false).await;
        let half = bs / 2;
        let block = |this: &mut Self| this.make_data(0, bs).0;

        let misaligned = |r: &Result<(), BlockError>| matches!(r, Err(BlockError::Misaligned { .. }));
        let out_of_range = |r: &Result<(), BlockError>| matches!(r, Err(BlockError::OutOfRange { .. }));
        let too_large = |r: &Result<(), BlockError>| matches!(r, Err(BlockError::TooLarge { .. }));
        let check = |what: &str, r: Result<(), BlockError>, ok: &dyn Fn(&Result<(), BlockError>) -> bool| {
            assert!(ok(&r), "conformance [{step}]: {what} returned {r:?}");
        };

        // Misaligned offsets and lengths.
        check("read at a half block", self.dev.read(half, bs as u32).await.map(drop), &misaligned);
        check("read of a half block", self.dev.read(0, half as u32).await.map(drop), &misaligned);
        let data = block(self);
        check("write at a half block", self.dev.write(half, data, false).await, &misaligned);
        let short = Bytes::from(vec![0xa5u8; (bs + half) as usize]);
        check("write of 1.5 blocks", self.dev.write(0, short, true).await, &misaligned);
        check("trim at a half block", self.dev.trim(half, bs).await, &misaligned);
        check("trim of a half block", self.dev.trim(0, half).await, &misaligned);
        check("write_zeroes at a half block", self.dev.write_zeroes(half, bs, false).await, &misaligned);
        check("write_zeroes of a half block", self.dev.write_zeroes(bs, half, false).await, &misaligned);

        // Past the end, straddling the end, and offsets that overflow u64.
        check("read at the end", self.dev.read(size, bs as u32).await.map(drop), &out_of_range);
        check("read across the end", self.dev.read(size - bs, 2 * bs as u32).await.map(drop), &out_of_range);
        let data = Bytes::from(vec![0x5au8; 2 * bs as usize]);
        check("write across the end", self.dev.write(size - bs, data, false).await, &out_of_range);
        let data = block(self);
        check("write at the end", self.dev.write(size, data, false).await, &out_of_range);
        check("trim across the end", self.dev.trim(size - bs, 2 * bs).await, &out_of_range);
        check("write_zeroes at the end", self.dev.write_zeroes(size, bs, false).await, &out_of_range);
        let far = u64::MAX / bs * bs;
        check("read at u64::MAX", self.dev.read(far, bs as u32).await.map(drop), &out_of_range);
        let data = block(self);
        check("write at u64::MAX", self.dev.write(far, data, false).await, &out_of_range);
        check("trim at u64::MAX", self.dev.trim(far, bs).await, &out_of_range);
        check("write_zeroes at u64::MAX", self.dev.write_zeroes(far, bs, true).await, &out_of_range);

        // Larger than max_request. Where the request would also pass the end, either
        // error is right (the contract checks size limits before the range).
        if let Some(big) = max.checked_add(bs).filter(|b| *b <= u64::from(u32::MAX)) {
            let fits = big <= size;
            let large: &dyn Fn(&Result<(), BlockError>) -> bool =
                if fits { &too_large } else { &|r| too_large(r) || out_of_range(r) };
            check("read above max_request", self.dev.read(0, big as u32).await.map(drop), large);
            let data = Bytes::from(vec![0x3cu8; big as usize]);
            check("write above max_request", self.dev.write(0, data, false).await, large);
        }

        // Nothing above may have changed a byte.
        self.expect(step, 0, 4 * bs).await;
        self.expect(step, size - 4 * bs, 4 * bs).await;
        self.verify_everything_written(step).await;
    }

    async fn concurrent_disjoint_writes(&mut self) {
        let step = "concurrent disjoint writes";
        let bs = self.bs;
        // A band after the fixed regions above, inside the device's first half.
        let start = self.blocks() / 2 + 8;
        let room = self.blocks() - 8 - start;
        let mut regions = Vec::new();
        let mut at = start;
        for i in 0..64u64 {
            let n = 1 + i % 4;
            if at + n + 1 > start + room {
                break;
            }
            regions.push((at * bs, n * bs));
            at += n + 1;
        }
        let mut writes = Vec::with_capacity(regions.len());
        for &(off, len) in &regions {
            let (data, tag) = self.make_data(off, len);
            writes.push((off, len, data, tag));
        }
        let dev = self.dev;
        let results = join_all(
            writes.iter().enumerate().map(|(i, (off, _, data, _))| dev.write(*off, data.clone(), i % 5 == 0)).collect(),
        )
        .await;
        for ((off, len, _, tag), r) in writes.iter().zip(results) {
            if let Err(e) = r {
                panic!("conformance [{step}]: write [{off}, +{len}) failed: {e}");
            }
            self.record(*off, *len, Some(*tag));
        }
        // Concurrent reads of the same regions, interleaved with flushes.
        let reads = join_all(regions.iter().map(|&(off, len)| dev.read(off, len as u32)).collect());
        let flushes = join_all((0..4).map(|_| dev.flush()).collect());
        let (reads, flushes) = join2(reads, flushes).await;
        for r in flushes {
            if let Err(e) = r {
                panic!("conformance [{step}]: flush during reads failed: {e}");
            }
        }
        for (&(off, len), r) in regions.iter().zip(reads) {
            match r {
                Ok(data) => self.compare(step, off, len, &data),
                Err(e) => panic!("conformance [{step}]: read [{off}, +{len}) failed: {e}"),
            }
        }
        // Gaps between the regions were never written.
        let (first, _) = regions.first().copied().unwrap_or((start * bs, 0));
        let end = regions.last().map(|&(o, l)| o + l).unwrap_or(first);
        self.expect(step, first, end - first).await;
    }

    /// Re-reads every range any step touched.
    async fn verify_everything_written(&self, step: &str) {
        let mut ranges = self.touched.clone();
        ranges.sort_unstable();
        // Merge overlapping ranges so each block is read once.
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (off, len) in ranges {
            match merged.last_mut() {
                Some((o, l)) if off <= *o + *l => *l = (*l).max(off + len - *o),
                _ => merged.push((off, len)),
            }
        }
        for (off, len) in merged {
            self.expect(step, off, len).await;
        }
    }
}

/// Fills one block: write tag and block number (for diagnostics), then bytes from
/// a generator seeded by both.
fn fill_block(block: &mut [u8], number: u64, tag: u64) {
    let mut state = splitmix(number ^ tag.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15);
    for (i, word) in block.chunks_mut(8).enumerate() {
        let v = match i {
            0 => tag,
            1 => number,
            _ => {
                state = splitmix(state);
                state
            }
        };
        word.copy_from_slice(&v.to_le_bytes()[..word.len()]);
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What a block that failed the comparison holds, in words a human can act on.
fn describe_block(got: &[u8]) -> String {
    if got.iter().all(|&b| b == 0) {
        return "zeroes".into();
    }
    if got.len() >= 16 {
        let tag = u64::from_le_bytes(got[0..8].try_into().unwrap_or_default());
        let number = u64::from_le_bytes(got[8..16].try_into().unwrap_or_default());
        let mut intact = vec![0u8; got.len()];
        fill_block(&mut intact, number, tag);
        if intact == got {
            return format!("data of write #{tag} meant for block {number} (stale or misdirected)");
        }
    }
    let first: Vec<String> = got.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("unrecognised bytes starting {}", first.join(" "))
}

/// Polls every future in one task until all finish: concurrency without spawning,
/// so the futures may borrow the device.
async fn join_all<F: Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(move |cx| {
        let mut pending = false;
        for (f, slot) in futs.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *slot = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(out.drain(..).flatten().collect())
        }
    })
    .await
}

async fn join2<A: Future, C: Future>(a: A, c: C) -> (A::Output, C::Output) {
    let mut a = Box::pin(a);
    let mut c = Box::pin(c);
    let (mut ra, mut rc) = (None, None);
    std::future::poll_fn(move |cx| {
        if ra.is_none() {
            if let Poll::Ready(v) = a.as_mut().poll(cx) {
                ra = Some(v);
            }
        }
        if rc.is_none() {
            if let Poll::Ready(v) = c.as_mut().poll(cx) {
                rc = Some(v);
            }
        }
        match (ra.take(), rc.take()) {
            (Some(x), Some(y)) => Poll::Ready((x, y)),
            (x, y) => {
                ra = x;
                rc = y;
                Poll::Pending
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_identify_themselves() {
        let mut b = vec![0u8; 4096];
        fill_block(&mut b, 7, 3);
        assert_eq!(describe_block(&b), "data of write #3 meant for block 7 (stale or misdirected)");
        b[100] ^= 1;
        assert!(describe_block(&b).starts_with("unrecognised bytes starting 03 00"));
        assert_eq!(describe_block(&[0u8; 512]), "zeroes");
        let mut other = vec![0u8; 4096];
        fill_block(&mut other, 8, 3);
        fill_block(&mut b, 7, 3);
        assert_ne!(b, other, "distinct blocks of one write differ");
    }
}
