//! The block-device contract.
//!
//! ```text
//!   NBD server ─┐                       ┌─ frontend::Volume (replicated chunks)
//!   FUSE export ┼──► trait BlockDev ◄───┼─ MemDev (the model, for tests)
//!   benches    ─┘                       └─ ...
//! ```
//!
//! Users of a volume (the NBD server, a FUSE export) speak only this trait; they know
//! nothing of chunks or replicas. Every offset and length is a multiple of
//! [`BlockDev::block_size`]; implementations reject anything else with
//! [`BlockError::Misaligned`], and anything past the end with
//! [`BlockError::OutOfRange`], before touching data (see [`check_range`]).
//!
//! The [`conformance`] module is one suite that every implementation must pass.

use std::future::Future;

use bytes::Bytes;

pub mod conformance;
mod mem;

pub use mem::MemDev;

/// Why a block request failed. Grouped by what the caller can do: the first
/// three are the caller's mistake (never retry), the rest are the device's state.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum BlockError {
    #[error("request [{offset}, +{len}) is past the end of the device ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("request [{offset}, +{len}) is not aligned to {block_size}-byte blocks")]
    Misaligned { offset: u64, len: u64, block_size: u32 },
    #[error("request of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: u64, max: u64 },
    #[error("no space left on the backing storage: {0}")]
    NoSpace(String),
    #[error("I/O error: {0}")]
    Io(String),
    #[error("device is read-only")]
    ReadOnly,
    #[error("device is shut down")]
    Shutdown,
}

impl BlockError {
    /// The errno this error is reported as to a block-device client (NBD's error
    /// field, a FUSE reply). One exhaustive mapping: a new variant does not compile
    /// until someone decides its code.
    pub fn errno(&self) -> i32 {
        match self {
            BlockError::OutOfRange { .. } => libc_errno::EINVAL,
            BlockError::Misaligned { .. } => libc_errno::EINVAL,
            BlockError::TooLarge { .. } => libc_errno::EOVERFLOW,
            BlockError::NoSpace(_) => libc_errno::ENOSPC,
            BlockError::Io(_) => libc_errno::EIO,
            BlockError::ReadOnly => libc_errno::EPERM,
            BlockError::Shutdown => libc_errno::ESHUTDOWN,
        }
    }
}

/// Linux errno values (stable ABI), kept here so this crate needs no libc.
mod libc_errno {
    pub const EPERM: i32 = 1;
    pub const EIO: i32 = 5;
    pub const EINVAL: i32 = 22;
    pub const ENOSPC: i32 = 28;
    pub const EOVERFLOW: i32 = 75;
    pub const ESHUTDOWN: i32 = 108;
}

pub type Result<T> = std::result::Result<T, BlockError>;

/// A block device: a fixed-size array of bytes addressed in whole blocks.
///
/// Contract (checked by [`conformance`]):
/// - a read returns what the last completed write (or zeroes / trim) put there,
///   or zeroes if nothing was ever written;
/// - `flush` completes only after every write completed before it was issued is
///   durable; a write with `fua` is durable when it completes;
/// - `trim` discards data: Ballast's devices read zeroes afterwards (stricter
///   than NBD requires; the suite checks it);
/// - `write_zeroes` makes the range read as zeroes;
/// - invalid requests fail without changing any data.
pub trait BlockDev: Send + Sync + 'static {
    /// Size in bytes; a multiple of `block_size`.
    fn size(&self) -> u64;
    /// The minimum I/O unit, in bytes (a power of two, at least 512).
    fn block_size(&self) -> u32;
    /// The largest single request this device accepts, in bytes.
    fn max_request(&self) -> u32 {
        32 << 20
    }
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = Result<Bytes>> + Send;
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> impl Future<Output = Result<()>> + Send;
    fn flush(&self) -> impl Future<Output = Result<()>> + Send;
    fn trim(&self, offset: u64, len: u64) -> impl Future<Output = Result<()>> + Send;
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> impl Future<Output = Result<()>> + Send;
}

/// Checks a request's range against a device's geometry: aligned, inside, not too
/// large. Every implementation calls this before touching data.
pub fn check_range(offset: u64, len: u64, size: u64, block_size: u32, max: u64) -> Result<()> {
    let bs = u64::from(block_size);
    if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
        return Err(BlockError::Misaligned { offset, len, block_size });
    }
    if len > max {
        return Err(BlockError::TooLarge { len, max });
    }
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}
