//! The conformance suite against the in-memory model, and proof that it catches
//! devices that break the contract on purpose.

use std::sync::atomic::{AtomicBool, Ordering};

use ballast_blockdev::{conformance, BlockDev, MemDev, Result};
use bytes::Bytes;

#[tokio::test]
async fn memdev_passes_with_4k_blocks() {
    // Larger than two maximum requests, so the pure "too large" case and the
    // largest-request round trip both run.
    let dev = MemDev::new(80 << 20, 4096);
    conformance::run(&dev).await;
}

#[tokio::test]
async fn memdev_passes_with_512_byte_blocks() {
    let dev = MemDev::new(4 << 20, 512);
    conformance::run(&dev).await;
}

#[tokio::test]
async fn memdev_passes_at_the_minimum_size() {
    let dev = MemDev::new(conformance::MIN_BLOCKS * 4096, 4096);
    conformance::run(&dev).await;
}

/// Breaks one part of the contract of an otherwise correct MemDev.
#[derive(Clone, Copy)]
enum Bug {
    /// trim succeeds but leaves the old data.
    TrimKeepsData,
    /// writes land one block after where they were asked to.
    MisdirectedWrite,
    /// a write straddling the end writes the part that fits, then fails.
    PartialWriteAtEnd,
    /// write_zeroes with FUA is silently ignored.
    FuaZeroesIgnored,
}

struct Buggy {
    inner: MemDev,
    bug: Bug,
    armed: AtomicBool,
}

impl Buggy {
    fn new(bug: Bug) -> Self {
        Buggy { inner: MemDev::new(2 << 20, 4096), bug, armed: AtomicBool::new(true) }
    }
}

impl BlockDev for Buggy {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes> {
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        match self.bug {
            Bug::MisdirectedWrite
                if offset > 0
                    && offset + data.len() as u64 + 4096 <= self.size()
                    && self.armed.swap(false, Ordering::Relaxed) =>
            {
                self.inner.write(offset + 4096, data, fua).await
            }
            Bug::PartialWriteAtEnd
                if offset.saturating_add(data.len() as u64) > self.size() && offset < self.size() =>
            {
                let fit = (self.size() - offset) as usize;
                self.inner.write(offset, data.slice(..fit), fua).await?;
                self.inner.write(offset, data, fua).await
            }
            _ => self.inner.write(offset, data, fua).await,
        }
    }
    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        match self.bug {
            Bug::TrimKeepsData => Ok(()),
            _ => self.inner.trim(offset, len).await,
        }
    }
    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        match self.bug {
            Bug::FuaZeroesIgnored if fua => Ok(()),
            _ => self.inner.write_zeroes(offset, len, fua).await,
        }
    }
}

fn run_buggy(bug: Bug) {
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    rt.block_on(conformance::run(&Buggy::new(bug)));
}

#[test]
#[should_panic(expected = "conformance [trim reads zeroes]")]
fn catches_trim_that_keeps_data() {
    run_buggy(Bug::TrimKeepsData);
}

#[test]
#[should_panic(expected = "conformance [read after write]: block")]
fn catches_misdirected_write() {
    run_buggy(Bug::MisdirectedWrite);
}

#[test]
#[should_panic(expected = "conformance [invalid requests]")]
fn catches_partial_write_past_the_end() {
    run_buggy(Bug::PartialWriteAtEnd);
}

#[test]
#[should_panic(expected = "conformance [write_zeroes reads zeroes]")]
fn catches_ignored_fua_write_zeroes() {
    run_buggy(Bug::FuaZeroesIgnored);
}
