//! A 4096-aligned heap buffer for O_DIRECT I/O. Read results leave the store as
//! `Bytes::from_owner(buf)`: no copy between the kernel's DMA target and the caller.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

use ballast_types::BLOCK_SIZE;

pub const ALIGN: usize = BLOCK_SIZE as usize;

/// An owned, 4096-aligned byte buffer of fixed capacity. `len` bytes of it are
/// initialized and visible through `AsRef<[u8]>`.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: the buffer is uniquely owned heap memory; no interior sharing.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only read the buffer (`&self` methods never write).
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn layout(cap: usize) -> Layout {
        // cap is rounded up to ALIGN and non-zero; ALIGN is a power of two.
        Layout::from_size_align(cap, ALIGN).expect("aligned buffer layout")
    }

    fn round(len: usize) -> usize {
        len.max(1).div_ceil(ALIGN) * ALIGN
    }

    /// A zero-filled buffer of `len` visible bytes.
    pub fn zeroed(len: usize) -> AlignedBuf {
        let cap = Self::round(len);
        // SAFETY: layout has non-zero size.
        let p = unsafe { alloc::alloc_zeroed(Self::layout(cap)) };
        let ptr = NonNull::new(p).unwrap_or_else(|| alloc::handle_alloc_error(Self::layout(cap)));
        AlignedBuf { ptr, len, cap }
    }

    /// A buffer with capacity for `cap` bytes and nothing visible yet: the target
    /// of a read, made visible with [`AlignedBuf::set_len`] once the kernel filled it.
    pub fn for_read(cap: usize) -> AlignedBuf {
        let c = Self::round(cap);
        // SAFETY: layout has non-zero size.
        let p = unsafe { alloc::alloc(Self::layout(c)) };
        let ptr = NonNull::new(p).unwrap_or_else(|| alloc::handle_alloc_error(Self::layout(c)));
        AlignedBuf { ptr, len: 0, cap: c }
    }

    /// A copy of `data` in aligned memory.
    pub fn copy_from(data: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::for_read(data.len());
        // SAFETY: capacity >= data.len(), regions do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), b.ptr.as_ptr(), data.len()) };
        b.len = data.len();
        b
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// # Safety
    /// The first `len` bytes must have been initialized (e.g. filled by a read).
    pub unsafe fn set_len(&mut self, len: usize) {
        debug_assert!(len <= self.cap);
        self.len = len;
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: len bytes are initialized (constructor / set_len contract).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold &mut.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in a constructor with this exact layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
    }
}

/// True when `p` may be handed to O_DIRECT as is.
pub fn is_aligned(p: *const u8, len: usize) -> bool {
    (p as usize).is_multiple_of(ALIGN) && len.is_multiple_of(ALIGN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_and_copy() {
        let b = AlignedBuf::copy_from(&[7u8; 5000]);
        assert!(is_aligned(b.as_ptr(), 4096));
        assert_eq!(b.capacity(), 8192);
        assert_eq!(b.as_ref().len(), 5000);
        assert!(b.as_ref().iter().all(|&x| x == 7));
        let z = AlignedBuf::zeroed(4096);
        assert!(z.as_ref().iter().all(|&x| x == 0));
        let bytes = bytes::Bytes::from_owner(z);
        assert_eq!(bytes.len(), 4096);
    }
}
