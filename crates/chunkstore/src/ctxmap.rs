//! I/O PATH. A chunk's context file, memory-mapped MAP_SHARED: a slot update is a
//! memory store that is in the page cache (and so survives a process crash) the
//! moment it is made; `fdatasync` of the file makes it survive power loss.
//!
//! The file is fully allocated (fallocate) when the chunk is created, so a store
//! into the mapping can never fault for lack of space (no SIGBUS on ENOSPC).
//!
//! Concurrency: slot stores for one block are serialized by the chunk's range lock
//! (a writer holds the block exclusively). Readers of a block hold it shared.
//! Slots are written with volatile byte copies, so no Rust reference to shared
//! mutable memory is ever formed.

use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;

use ballast_types::Seq;

use crate::layout::{self, Slot, BLOCK_CTX_LEN, DIRTY_OFFSET, SLOT_LEN};

pub struct CtxMap {
    ptr: NonNull<u8>,
    len: usize,
    blocks: u32,
}

// SAFETY: the mapping is plain shared memory; access discipline is documented above.
unsafe impl Send for CtxMap {}
// SAFETY: `&self` writes are volatile byte copies into shared memory, never through a
// Rust reference, and writers of one block are serialized by the chunk's range lock (above).
unsafe impl Sync for CtxMap {}

impl CtxMap {
    /// Maps `len` bytes of `fd` read-write, shared.
    pub fn map(fd: &OwnedFd, len: usize, blocks: u32) -> std::io::Result<CtxMap> {
        // SAFETY: mmap of a file we own, with a length equal to its size.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(p as *mut u8).ok_or_else(|| std::io::Error::other("mmap null"))?;
        debug_assert!(len >= layout::CTX_HEADER_LEN + blocks as usize * BLOCK_CTX_LEN);
        Ok(CtxMap { ptr, len, blocks })
    }

    fn read_bytes<const N: usize>(&self, off: usize) -> [u8; N] {
        assert!(off + N <= self.len);
        let mut out = [0u8; N];
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: in bounds (asserted); volatile because other threads store here.
            *b = unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(off + i)) };
        }
        out
    }

    fn write_bytes(&self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.len);
        for (i, b) in data.iter().enumerate() {
            // SAFETY: in bounds (asserted); writers of a region are serialized by
            // the caller (range lock / dirty-state mutex).
            unsafe { std::ptr::write_volatile(self.ptr.as_ptr().add(off + i), *b) };
        }
    }

    pub fn dirty(&self) -> bool {
        u64::from_le_bytes(self.read_bytes::<8>(DIRTY_OFFSET)) != 0
    }

    pub fn set_dirty(&self, dirty: bool) {
        let v = if dirty { layout::DIRTY_MARK } else { 0 };
        self.write_bytes(DIRTY_OFFSET, &v.to_le_bytes());
    }

    pub fn slots(&self, block: u32) -> (Slot, Slot) {
        debug_assert!(block < self.blocks);
        let s0 = self.read_bytes::<SLOT_LEN>(layout::slot_offset(block, 0));
        let s1 = self.read_bytes::<SLOT_LEN>(layout::slot_offset(block, 1));
        (Slot::decode(&s0), Slot::decode(&s1))
    }

    /// Writes a new context for `block` into its inactive slot (the older
    /// generation, or an invalid one) and returns that slot's index, so a failed
    /// data write can retract it.
    ///
    /// Invariant kept here: the current slot (the one the block's data matches) is
    /// never overwritten before the data write that replaces it has completed.
    pub fn write_inactive(&self, block: u32, seq: Seq, crc: u32) -> usize {
        let (s0, s1) = self.slots(block);
        let (target, gen) = match layout::current_slot(&s0, &s1) {
            Some(cur) => {
                let g = [s0, s1][cur].context().map(|c| c.2).unwrap_or(0);
                (1 - cur, g.wrapping_add(1))
            }
            None => (0, 1),
        };
        self.write_bytes(layout::slot_offset(block, target), &Slot::encode(seq, crc, gen));
        target
    }

    /// Makes `slot` of `block` invalid: its data write did not happen.
    pub fn retract(&self, block: u32, slot: usize) {
        self.write_bytes(layout::slot_offset(block, slot), &Slot::RETRACTED);
    }

    /// The current context of `block`: (seq, crc), or None if neither slot is usable.
    pub fn current(&self, block: u32) -> Option<(Seq, u32)> {
        let (s0, s1) = self.slots(block);
        let cur = layout::current_slot(&s0, &s1)?;
        [s0, s1][cur].context().map(|(seq, crc, _)| (seq, crc))
    }

    /// True if `crc` matches either usable slot of `block`.
    pub fn verifies(&self, block: u32, crc: u32) -> bool {
        let (s0, s1) = self.slots(block);
        [s0, s1].iter().any(|s| s.context().is_some_and(|c| c.1 == crc))
    }
}

impl Drop for CtxMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what map() mapped.
        unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len) };
    }
}
