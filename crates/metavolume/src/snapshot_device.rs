//! [`SnapshotDevice`]: one ready snapshot as a read-only block device, read
//! from the volume's replicas without attaching the volume.
//!
//! No attach means no new epoch: the front end writing the volume (if any)
//! keeps writing, nobody is fenced. Every read carries the volume's current
//! epoch as meta's layout shows it, which a replica accepts without any change
//! to its state; a replica that knows a newer epoch answers Fenced, and the
//! device fetches the layout again and retries.
//!
//! How a piece of the snapshot at cut `C` is read, the volume at epoch `E`:
//! - `C = (E, MAX)` and the volume is detached: the snapshot of a detached
//!   volume, whose cut the replicas learn only at the next attach. Nothing can
//!   have been written above it (the next write is at `E + 1`), so the
//!   snapshot is exactly the live data: a plain read at `E`. The replica holds
//!   the read against the announcement of `E + 1`, so no later write slips in
//!   while a read is served;
//! - otherwise: ReadSnapshot at `C`, from the chunk's in-sync replicas in turn
//!   (a checksum mismatch or an unreachable replica: the next one). A chunk no
//!   replica held at the cut reads as zeros, as it did then.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use ballast_blockdev::{check_range, BlockDev, BlockError};
use ballast_frontend::{join_all, policy, VolumeLayout};
use ballast_metaclient::{pb, MetaClient, MetaClientError};
use ballast_replica::{ClientError, ClientOptions, ReplicaClient};
use ballast_types::{ChunkId, Epoch, NodeId, Seq, VolumeId, BLOCK_SIZE};
use bytes::{Bytes, BytesMut};
use tracing::{debug, info};

use crate::convert::layout_from_proto;

/// How many times a piece is retried after a layout refresh (a new attach
/// fenced the epoch read with, or announced one the replicas have not seen).
const ATTEMPTS: usize = 8;
const RETRY_PAUSE: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum SnapshotDeviceError {
    #[error("snapshot {0:?} not found")]
    NotFound(String),
    #[error("snapshot {0:?} is not ready yet (the volume's front end has not taken it)")]
    NotReady(String),
    #[error("snapshot {name:?}: {source}")]
    Meta { name: String, source: MetaClientError },
    #[error("snapshot {name:?}: volume layout: {reason}")]
    Layout { name: String, reason: String },
}

/// What a read needs of the volume, from one layout.
struct View {
    epoch: Epoch,
    detached: bool,
    layout: VolumeLayout,
}

/// A ready snapshot, read-only (see the module docs).
pub struct SnapshotDevice {
    meta: MetaClient,
    name: String,
    volume: VolumeId,
    volume_name: String,
    cut: Seq,
    size: u64,
    client_options: ClientOptions,
    view: Mutex<std::sync::Arc<View>>,
    clients: Mutex<HashMap<NodeId, ReplicaClient>>,
}

impl SnapshotDevice {
    /// Opens snapshot `name` (name or numeric id). Refused while it is pending.
    pub async fn open(
        meta: MetaClient,
        name: &str,
        client_options: ClientOptions,
    ) -> Result<SnapshotDevice, SnapshotDeviceError> {
        let meta_err = |source| SnapshotDeviceError::Meta { name: name.to_string(), source };
        let req = pb::ListSnapshotsRequest { volume: String::new(), snapshot: name.to_string() };
        let snap = meta
            .list_snapshots(req)
            .await
            .map_err(meta_err)?
            .snapshots
            .into_iter()
            .next()
            .ok_or_else(|| SnapshotDeviceError::NotFound(name.to_string()))?;
        let cut = match (&snap.cut, snap.ready) {
            (Some(c), true) => Seq::new(Epoch(c.epoch), c.counter),
            _ => return Err(SnapshotDeviceError::NotReady(name.to_string())),
        };
        let volume = VolumeId(snap.volume);
        let view = fetch_view(&meta, volume)
            .await
            .map_err(|reason| SnapshotDeviceError::Layout { name: name.to_string(), reason })?;
        // The snapshot's size: the volume's at the cut (a later grow is not in it).
        let size = snap.size_bytes.min(view.layout.size);
        info!(snapshot = %snap.name, volume = %snap.volume_name, %cut, size, "snapshot opened read-only");
        Ok(SnapshotDevice {
            meta,
            name: snap.name,
            volume,
            volume_name: snap.volume_name,
            cut,
            size,
            client_options,
            view: Mutex::new(std::sync::Arc::new(view)),
            clients: Mutex::new(HashMap::new()),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn volume_name(&self) -> &str {
        &self.volume_name
    }

    pub fn cut(&self) -> Seq {
        self.cut
    }

    fn view(&self) -> std::sync::Arc<View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn refresh(&self) -> Result<(), BlockError> {
        let view = fetch_view(&self.meta, self.volume).await.map_err(BlockError::Io)?;
        debug!(snapshot = %self.name, epoch = %view.epoch, "layout refreshed");
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(view);
        Ok(())
    }

    fn client(&self, view: &View, node: NodeId) -> Option<ReplicaClient> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&node) {
            return Some(c.clone());
        }
        let addr = view.layout.nodes.iter().find(|r| r.node == node)?.addr;
        let c = ReplicaClient::new(addr, self.client_options.clone());
        clients.insert(node, c.clone());
        Some(c)
    }

    async fn read_piece(&self, p: policy::Piece) -> Result<Bytes, BlockError> {
        let mut last = String::new();
        for _ in 0..ATTEMPTS {
            let view = self.view();
            match self.try_piece(&view, p).await {
                Ok(data) => return Ok(data),
                Err(Retry::Refresh(why)) => {
                    last = why;
                    tokio::time::sleep(RETRY_PAUSE).await;
                    self.refresh().await?;
                }
                Err(Retry::Fail(e)) => return Err(e),
            }
        }
        Err(BlockError::Io(format!(
            "snapshot {} chunk {}: gave up after {ATTEMPTS} layout refreshes (last: {last})",
            self.name, p.chunk
        )))
    }

    async fn try_piece(&self, view: &View, p: policy::Piece) -> Result<Bytes, Retry> {
        let set = view.layout.chunks.get(p.chunk.0 as usize).ok_or_else(|| {
            Retry::Fail(BlockError::Io(format!("snapshot {}: the layout has no chunk {}", self.name, p.chunk)))
        })?;
        let id = ChunkId::new(self.volume, p.chunk);
        let live = view.detached && self.cut == Seq::new(view.epoch, u64::MAX);
        let len = p.len as u32;
        let (mut missing, mut errors) = (0usize, Vec::new());
        for &node in &set.in_sync {
            let Some(client) = self.client(view, node) else {
                errors.push(format!("{node}: not in the layout's nodes"));
                continue;
            };
            let r = match live {
                true => client.read(id, p.offset, len, view.epoch).await,
                false => client.read_snapshot(id, self.cut, p.offset, len, view.epoch).await,
            };
            match r {
                Ok(d) if d.len() == len as usize => return Ok(d),
                Ok(d) => errors.push(format!("{node}: {} bytes, asked {len}", d.len())),
                Err(e) if e.is_fenced() || is_unannounced(&e) => {
                    return Err(Retry::Refresh(format!("{node}: {e}")));
                }
                Err(ClientError::Remote { status: ballast_wire::Status::NoSuchChunk, .. }) => missing += 1,
                Err(e) => errors.push(format!("{node}: {e}")),
            }
        }
        if errors.is_empty() {
            // Every in-sync replica says the chunk did not exist at the cut
            // (or a chunk without replicas: never written).
            debug!(snapshot = %self.name, chunk = %p.chunk, missing, "chunk absent at the cut: zeros");
            return Ok(Bytes::from(vec![0u8; p.len as usize]));
        }
        Err(Retry::Fail(BlockError::Io(format!(
            "snapshot {} chunk {}: no replica could serve the read: {}",
            self.name,
            p.chunk,
            errors.join("; ")
        ))))
    }
}

enum Retry {
    /// The epoch moved: read the layout again and retry.
    Refresh(String),
    Fail(BlockError),
}

fn is_unannounced(e: &ClientError) -> bool {
    matches!(e, ClientError::Remote { status: ballast_wire::Status::UnannouncedEpoch, .. })
}

async fn fetch_view(meta: &MetaClient, volume: VolumeId) -> Result<View, String> {
    let l = meta.get_layout(pb::GetLayoutRequest { volume: volume.0 }).await.map_err(|e| e.to_string())?;
    let v = l.volume.as_ref().ok_or("layout without a volume")?;
    let (epoch, detached) = (Epoch(v.epoch), v.attached_to == 0);
    let (_gen, layout) = layout_from_proto(&l).map_err(|e| e.to_string())?;
    Ok(View { epoch, detached, layout })
}

impl BlockDev for SnapshotDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        BLOCK_SIZE
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
        check_range(offset, u64::from(len), self.size, self.block_size(), u64::from(self.max_request()))?;
        let chunk_size = self.view().layout.chunk_size;
        let pieces = policy::split(offset, u64::from(len), chunk_size);
        let mut buf = BytesMut::with_capacity(len as usize);
        for part in join_all(pieces.into_iter().map(|p| self.read_piece(p))).await {
            buf.extend_from_slice(&part?);
        }
        Ok(buf.freeze())
    }

    async fn write(&self, _offset: u64, _data: Bytes, _fua: bool) -> Result<(), BlockError> {
        Err(BlockError::ReadOnly)
    }

    async fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }

    async fn trim(&self, _offset: u64, _len: u64) -> Result<(), BlockError> {
        Err(BlockError::ReadOnly)
    }

    async fn write_zeroes(&self, _offset: u64, _len: u64, _fua: bool) -> Result<(), BlockError> {
        Err(BlockError::ReadOnly)
    }
}
