//! `MemDev`: the reference model of a block device, in memory. Tests run the
//! conformance suite against it and compare other devices' behaviour to it.

use std::sync::Mutex;

use bytes::Bytes;

use crate::{check_range, BlockDev, Result};

/// An in-memory block device. Durable means "in this process": `flush` is a no-op.
pub struct MemDev {
    block_size: u32,
    data: Mutex<Vec<u8>>,
}

impl MemDev {
    /// A zero-filled device of `size` bytes (rounded down to whole blocks).
    pub fn new(size: u64, block_size: u32) -> Self {
        let size = size - size % u64::from(block_size);
        MemDev { block_size, data: Mutex::new(vec![0; size as usize]) }
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size(), self.block_size, u64::from(self.max_request()))
    }

    fn fill(&self, offset: u64, len: u64, src: Option<&[u8]>) {
        let mut data = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let range = offset as usize..(offset + len) as usize;
        match src {
            Some(src) => data[range].copy_from_slice(src),
            None => data[range].fill(0),
        }
    }
}

impl BlockDev for MemDev {
    fn size(&self) -> u64 {
        self.data.lock().unwrap_or_else(|p| p.into_inner()).len() as u64
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes> {
        self.check(offset, u64::from(len))?;
        let data = self.data.lock().unwrap_or_else(|p| p.into_inner());
        Ok(Bytes::copy_from_slice(&data[offset as usize..offset as usize + len as usize]))
    }

    async fn write(&self, offset: u64, buf: Bytes, _fua: bool) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.fill(offset, buf.len() as u64, Some(&buf));
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        self.fill(offset, len, None);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> Result<()> {
        self.check(offset, len)?;
        self.fill(offset, len, None);
        Ok(())
    }
}
