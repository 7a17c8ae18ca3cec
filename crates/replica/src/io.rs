//! Socket helpers shared by the server and the client. I/O path: no blocking
//! calls, no info logs.

use std::io::{self, IoSlice};

use ballast_wire::{Frame, WireError, HEADER_LEN};
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// The most frames one vectored write carries (3 slices each, well under IOV_MAX).
pub(crate) const MAX_BATCH: usize = 64;

/// Writes `frames` back to back with as few `writev` calls as the socket allows.
/// Payloads are passed as they are (no copy); only the 64-byte headers and the
/// 4-byte trailers are materialised.
pub(crate) async fn write_frames<W>(w: &mut W, frames: &[Frame]) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut parts = Vec::with_capacity(frames.len());
    for f in frames {
        let p = f.wire_parts().map_err(|e: WireError| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        parts.push(p);
    }
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len() * 3);
    for (header, payload, trailer) in &parts {
        debug_assert_eq!(header.len(), HEADER_LEN);
        slices.push(IoSlice::new(header));
        if !payload.is_empty() {
            slices.push(IoSlice::new(payload));
            slices.push(IoSlice::new(trailer.as_slice()));
        }
    }
    let mut rest: &mut [IoSlice<'_>] = &mut slices;
    while !rest.is_empty() {
        let n = w.write_vectored(rest).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    // TLS keeps records it could not send yet; plain TCP has nothing to flush.
    w.flush().await
}
