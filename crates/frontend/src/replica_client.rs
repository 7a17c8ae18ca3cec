//! [`ReplicaIo`] for the real thing: `ballast_replica::ReplicaClient` over TCP.
//! The one mapping from the client's errors (wire status codes) to the front
//! end's reactions lives here, as an exhaustive match.

use std::sync::Arc;

use ballast_replica::{ClientError, ClientOptions, ReplicaClient, ResyncEntry, ResyncKind, Status};
use ballast_types::{BlockContext, BlockIdx, ChunkId, ChunkIdx, Epoch, Seq, VolumeId, BLOCK_SIZE};

use bytes::Bytes;

use crate::membership::Replica;
use crate::replica_io::{ReplicaError, ReplicaIo};

impl From<ClientError> for ReplicaError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Timeout { op } => ReplicaError::Timeout { op: op.name() },
            ClientError::Disconnected => ReplicaError::Transport("connection lost with the request in flight".into()),
            ClientError::Connect { addr, source } => ReplicaError::Transport(format!("connect to {addr}: {source}")),
            ClientError::Protocol(w) => ReplicaError::Transport(format!("protocol error: {w}")),
            ClientError::Remote { status, message } => match status {
                Status::Fenced => ReplicaError::Fenced(message),
                Status::NoSuchChunk => ReplicaError::NoSuchChunk,
                Status::ChunkExists => ReplicaError::ChunkExists,
                Status::OutOfRange | Status::Misaligned | Status::BadRequest => {
                    ReplicaError::Invalid(format!("{status:?}: {message}"))
                }
                Status::ChecksumMismatch => ReplicaError::ChecksumMismatch(message),
                // The replica lost or never got the epoch (e.g. a wiped store):
                // it cannot be trusted as in sync.
                Status::NoSpace => ReplicaError::NoSpace(message),
                Status::UnannouncedEpoch | Status::Io | Status::Shutdown => {
                    ReplicaError::Failed(format!("{status:?}: {message}"))
                }
                Status::Ok => ReplicaError::Failed(format!("error reply with status Ok: {message}")),
            },
        }
    }
}

/// A `connect` function for [`crate::Volume::attach`]: one pipelining TCP
/// client per replica node.
pub fn tcp_connector(options: ClientOptions) -> impl Fn(&Replica) -> ReplicaClient {
    let options = Arc::new(options);
    move |r: &Replica| ReplicaClient::new(r.addr, (*options).clone())
}

impl ReplicaIo for ReplicaClient {
    async fn write(&self, id: ChunkId, offset: u64, data: Bytes, seq: Seq, fua: bool) -> Result<(), ReplicaError> {
        Ok(ReplicaClient::write(self, id, offset, data, seq, fua).await?)
    }
    async fn read(&self, id: ChunkId, offset: u64, len: u32, epoch: Epoch) -> Result<Bytes, ReplicaError> {
        Ok(ReplicaClient::read(self, id, offset, len, epoch).await?)
    }
    async fn flush(&self, volume: VolumeId, epoch: Epoch) -> Result<(), ReplicaError> {
        Ok(ReplicaClient::flush(self, volume, epoch).await?)
    }
    async fn flush_chunk(&self, id: ChunkId, epoch: Epoch) -> Result<(), ReplicaError> {
        Ok(ReplicaClient::flush_chunk(self, id, epoch).await?)
    }
    async fn trim(&self, id: ChunkId, offset: u64, len: u64, seq: Seq) -> Result<(), ReplicaError> {
        Ok(ReplicaClient::trim(self, id, offset, len, seq).await?)
    }
    async fn write_zeroes(&self, id: ChunkId, offset: u64, len: u64, seq: Seq) -> Result<(), ReplicaError> {
        Ok(ReplicaClient::write_zeroes(self, id, offset, len, seq).await?)
    }
    async fn context_table(
        &self,
        id: ChunkId,
        first: BlockIdx,
        count: u32,
        epoch: Epoch,
    ) -> Result<Vec<BlockContext>, ReplicaError> {
        Ok(ReplicaClient::context_table(self, id, first, count, epoch).await?)
    }
    async fn create_chunk(&self, id: ChunkId, size: u64, epoch: Epoch) -> Result<(), ReplicaError> {
        Ok(ReplicaClient::create_chunk(self, id, size, epoch).await?)
    }
    async fn delete_chunk(&self, id: ChunkId, epoch: Epoch) -> Result<(), ReplicaError> {
        Ok(ReplicaClient::delete_chunk(self, id, epoch).await?)
    }
    async fn announce_epoch(&self, volume: VolumeId, epoch: Epoch) -> Result<Epoch, ReplicaError> {
        Ok(ReplicaClient::announce_epoch(self, volume, epoch).await?)
    }
    async fn list_dirty(&self, volume: VolumeId, epoch: Epoch) -> Result<Vec<ChunkIdx>, ReplicaError> {
        Ok(ReplicaClient::list_dirty(self, volume, epoch).await?)
    }
    async fn ping(&self) -> Result<(), ReplicaError> {
        Ok(ReplicaClient::ping(self).await?)
    }
    async fn set_cuts(&self, volume: VolumeId, epoch: Epoch, cuts: &[Seq]) -> Result<(), ReplicaError> {
        Ok(ReplicaClient::set_cuts(self, volume, epoch, cuts).await?)
    }
    async fn read_snapshot(
        &self,
        id: ChunkId,
        cut: Seq,
        offset: u64,
        len: u32,
        epoch: Epoch,
    ) -> Result<Bytes, ReplicaError> {
        Ok(ReplicaClient::read_snapshot(self, id, cut, offset, len, epoch).await?)
    }
    async fn context_table_at(
        &self,
        id: ChunkId,
        cut: Seq,
        first: BlockIdx,
        count: u32,
        epoch: Epoch,
    ) -> Result<Vec<BlockContext>, ReplicaError> {
        Ok(ReplicaClient::context_table_at(self, id, cut, first, count, epoch).await?)
    }
    async fn repair_snapshot(
        &self,
        id: ChunkId,
        cut: Seq,
        offset: u64,
        contexts: &[BlockContext],
        data: Bytes,
        epoch: Epoch,
    ) -> Result<(), ReplicaError> {
        let bs = BLOCK_SIZE as usize;
        if data.len() != contexts.len() * bs {
            return Err(ReplicaError::Invalid(format!(
                "snapshot repair of {} blocks carries {} bytes",
                contexts.len(),
                data.len()
            )));
        }
        // A ResyncWriteAt whose protect-from boundary is the cut itself (or
        // the start of this epoch, for a cut of an older one): every version
        // of the view lies below it, so each written block is replaced by the
        // source's version, same seq, even where this copy has that seq and
        // only its bytes rotted. Blocks the source never wrote: Keep.
        let mut entries = Vec::with_capacity(contexts.len());
        let mut pieces: Vec<&[u8]> = Vec::new();
        for (i, c) in contexts.iter().enumerate() {
            if c.seq == Seq::ZERO {
                entries.push(ResyncEntry::KEEP);
            } else {
                entries.push(ResyncEntry { kind: ResyncKind::Data, seq: c.seq });
                pieces.push(&data[i * bs..(i + 1) * bs]);
            }
        }
        let protect_from = if cut.epoch == epoch { cut.counter } else { 0 };
        ReplicaClient::resync_write_at(self, id, cut, offset, &entries, &pieces, epoch, protect_from).await?;
        Ok(())
    }
}
