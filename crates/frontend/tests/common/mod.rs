//! In-process fakes for front-end tests: `FakeReplica` (a `ReplicaIo` with an
//! in-memory chunk store and fault switches) and `FakeMembership`, both writing
//! into one shared event log so tests can assert the order of effects.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use ballast_frontend::{
    Attachment, EjectReason, Membership, MembershipError, Replica, ReplicaError, ReplicaIo, ReplicaSet, VolumeLayout,
};
use ballast_types::{BlockContext, BlockIdx, ChunkId, ChunkIdx, Epoch, NodeId, Seq, VolumeId, Zone, BLOCK_SIZE};
use bytes::Bytes;
use tokio::sync::Notify;

pub const VOL: VolumeId = VolumeId(7);
const BS: usize = BLOCK_SIZE as usize;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Write {
        node: NodeId,
        chunk: u32,
        offset: u64,
        len: usize,
        seq: Seq,
    },
    Read {
        node: NodeId,
        chunk: u32,
        offset: u64,
    },
    Create {
        node: NodeId,
        chunk: u32,
    },
    Flush {
        node: NodeId,
    },
    SetCuts {
        node: NodeId,
        cuts: Vec<Seq>,
    },
    /// The membership provider recorded the volume's snapshot cuts.
    Snapshots(Vec<Seq>),
    Eject {
        node: NodeId,
        chunk: u32,
        reason: EjectReason,
    },
    /// Pushed by a test when a client request returned.
    Ack(&'static str),
}

#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<Event>>>);

impl Log {
    pub fn push(&self, e: Event) {
        self.0.lock().unwrap().push(e);
    }
    pub fn events(&self) -> Vec<Event> {
        self.0.lock().unwrap().clone()
    }
    pub fn position(&self, f: impl Fn(&Event) -> bool) -> Option<usize> {
        self.events().iter().position(f)
    }
    pub fn count(&self, f: impl Fn(&Event) -> bool) -> usize {
        self.events().iter().filter(|e| f(e)).count()
    }
}

pub struct FakeChunk {
    pub data: Vec<u8>,
    pub ctx: Vec<BlockContext>,
    pub dirty: bool,
}

#[derive(Default)]
pub struct FakeState {
    pub chunks: HashMap<ChunkId, FakeChunk>,
    pub epochs: HashMap<VolumeId, Epoch>,
    /// Every request fails with this.
    pub fail_all: Option<ReplicaError>,
    /// Writes (and trims, zeroes) fail with this.
    pub fail_writes: Option<ReplicaError>,
    /// Flushes fail with this.
    pub fail_flush: Option<ReplicaError>,
    /// Every request hangs forever (the front end's deadline fires).
    pub hang: bool,
    /// Blocks whose stored copy is corrupt: reads covering them fail.
    pub corrupt: HashSet<(ChunkId, u32)>,
    /// The next read snapshots its data, signals `.0`, waits for `.1`, then replies.
    pub pause_next_read: Option<(Arc<Notify>, Arc<Notify>)>,
    /// The next write signals `.0`, waits for `.1`, then applies and replies.
    pub pause_next_write: Option<(Arc<Notify>, Arc<Notify>)>,
}

#[derive(Clone)]
pub struct FakeReplica {
    pub node: NodeId,
    pub state: Arc<Mutex<FakeState>>,
    log: Log,
}

pub fn crc(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

impl FakeReplica {
    pub fn new(node: NodeId, log: Log) -> Self {
        FakeReplica { node, state: Arc::default(), log }
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    /// Raw bytes of a chunk range (zeros when absent).
    pub fn raw(&self, chunk: u32, offset: u64, len: usize) -> Vec<u8> {
        self.with(|s| match s.chunks.get(&ChunkId::new(VOL, ChunkIdx(chunk))) {
            Some(c) => c.data[offset as usize..offset as usize + len].to_vec(),
            None => vec![0; len],
        })
    }

    pub fn ctx(&self, chunk: u32, block: u32) -> Option<BlockContext> {
        self.with(|s| s.chunks.get(&ChunkId::new(VOL, ChunkIdx(chunk))).map(|c| c.ctx[block as usize]))
    }

    /// Puts data straight into the store, as a previous front end would have.
    pub fn seed(&self, chunk: u32, size: u64, offset: u64, data: &[u8], seq: Seq, dirty: bool) {
        self.with(|s| {
            let c = s.chunks.entry(ChunkId::new(VOL, ChunkIdx(chunk))).or_insert_with(|| FakeChunk {
                data: vec![0; size as usize],
                ctx: vec![BlockContext::default(); size as usize / BS],
                dirty: false,
            });
            apply(c, offset, Some(data), data.len(), seq);
            c.dirty |= dirty;
        })
    }

    async fn gate(&self) -> Result<(), ReplicaError> {
        let (hang, fail) = self.with(|s| (s.hang, s.fail_all.clone()));
        if hang {
            std::future::pending::<()>().await;
        }
        match fail {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn check_epoch(s: &FakeState, volume: VolumeId, epoch: Epoch) -> Result<(), ReplicaError> {
        match s.epochs.get(&volume) {
            Some(cur) if epoch < *cur => Err(ReplicaError::Fenced(format!("epoch {epoch} < {cur}"))),
            Some(_) => Ok(()),
            None => Err(ReplicaError::Failed("UnannouncedEpoch".into())),
        }
    }

    fn range(c: &FakeChunk, offset: u64, len: u64) -> Result<(), ReplicaError> {
        if !ballast_types::is_block_aligned(offset) || !ballast_types::is_block_aligned(len) {
            return Err(ReplicaError::Invalid("misaligned".into()));
        }
        if offset + len > c.data.len() as u64 {
            return Err(ReplicaError::Invalid("out of range".into()));
        }
        Ok(())
    }

    fn mutate(&self, id: ChunkId, offset: u64, data: Option<&[u8]>, len: u64, seq: Seq) -> Result<(), ReplicaError> {
        self.with(|s| {
            Self::check_epoch(s, id.volume, seq.epoch)?;
            if let Some(e) = &s.fail_writes {
                return Err(e.clone());
            }
            let c = s.chunks.get_mut(&id).ok_or(ReplicaError::NoSuchChunk)?;
            Self::range(c, offset, len)?;
            c.dirty = true;
            // As the chunk store: a block only moves to a newer seq; a write
            // overtaken on the way succeeds but keeps the newer blocks.
            let first = offset as usize / BS;
            for b in first..first + len as usize / BS {
                if c.ctx[b].seq >= seq {
                    continue;
                }
                let at = b * BS;
                let block = data.map(|d| &d[at - offset as usize..at - offset as usize + BS]);
                apply(c, at as u64, block, BS, seq);
                s.corrupt.remove(&(id, b as u32));
            }
            Ok(())
        })
    }
}

fn apply(c: &mut FakeChunk, offset: u64, data: Option<&[u8]>, len: usize, seq: Seq) {
    let o = offset as usize;
    match data {
        Some(d) => c.data[o..o + len].copy_from_slice(d),
        None => c.data[o..o + len].fill(0),
    }
    for b in o / BS..(o + len) / BS {
        c.ctx[b] = BlockContext { crc: crc(&c.data[b * BS..(b + 1) * BS]), seq };
    }
}

impl ReplicaIo for FakeReplica {
    async fn write(&self, id: ChunkId, offset: u64, data: Bytes, seq: Seq, _fua: bool) -> Result<(), ReplicaError> {
        self.gate().await?;
        if let Some((entered, release)) = self.with(|s| s.pause_next_write.take()) {
            entered.notify_one();
            release.notified().await;
        }
        self.mutate(id, offset, Some(&data), data.len() as u64, seq)?;
        self.log.push(Event::Write { node: self.node, chunk: id.chunk.0, offset, len: data.len(), seq });
        Ok(())
    }

    async fn set_cuts(&self, volume: VolumeId, epoch: Epoch, cuts: &[Seq]) -> Result<(), ReplicaError> {
        self.gate().await?;
        self.with(|s| Self::check_epoch(s, volume, epoch))?;
        self.log.push(Event::SetCuts { node: self.node, cuts: cuts.to_vec() });
        Ok(())
    }

    async fn read(&self, id: ChunkId, offset: u64, len: u32, epoch: Epoch) -> Result<Bytes, ReplicaError> {
        self.gate().await?;
        self.log.push(Event::Read { node: self.node, chunk: id.chunk.0, offset });
        let (result, pause) = self.with(|s| {
            let r = (|| {
                Self::check_epoch(s, id.volume, epoch)?;
                let c = s.chunks.get(&id).ok_or(ReplicaError::NoSuchChunk)?;
                Self::range(c, offset, u64::from(len))?;
                let first = (offset / BS as u64) as u32;
                if (first..first + len / BLOCK_SIZE).any(|b| s.corrupt.contains(&(id, b))) {
                    return Err(ReplicaError::ChecksumMismatch(format!("{id} near block {first}")));
                }
                Ok(Bytes::copy_from_slice(&c.data[offset as usize..offset as usize + len as usize]))
            })();
            (r, s.pause_next_read.take())
        });
        if let Some((entered, release)) = pause {
            entered.notify_one();
            release.notified().await;
        }
        result
    }

    async fn flush(&self, volume: VolumeId, epoch: Epoch) -> Result<(), ReplicaError> {
        self.gate().await?;
        self.with(|s| {
            Self::check_epoch(s, volume, epoch)?;
            if let Some(e) = &s.fail_flush {
                return Err(e.clone());
            }
            s.chunks.iter_mut().filter(|(id, _)| id.volume == volume).for_each(|(_, c)| c.dirty = false);
            Ok(())
        })?;
        self.log.push(Event::Flush { node: self.node });
        Ok(())
    }

    async fn flush_chunk(&self, id: ChunkId, epoch: Epoch) -> Result<(), ReplicaError> {
        self.gate().await?;
        self.with(|s| {
            Self::check_epoch(s, id.volume, epoch)?;
            s.chunks.get_mut(&id).ok_or(ReplicaError::NoSuchChunk)?.dirty = false;
            Ok(())
        })
    }

    async fn trim(&self, id: ChunkId, offset: u64, len: u64, seq: Seq) -> Result<(), ReplicaError> {
        self.gate().await?;
        self.mutate(id, offset, None, len, seq)
    }

    async fn write_zeroes(&self, id: ChunkId, offset: u64, len: u64, seq: Seq) -> Result<(), ReplicaError> {
        self.gate().await?;
        self.mutate(id, offset, None, len, seq)
    }

    async fn context_table(
        &self,
        id: ChunkId,
        first: BlockIdx,
        count: u32,
        epoch: Epoch,
    ) -> Result<Vec<BlockContext>, ReplicaError> {
        self.gate().await?;
        self.with(|s| {
            Self::check_epoch(s, id.volume, epoch)?;
            let c = s.chunks.get(&id).ok_or(ReplicaError::NoSuchChunk)?;
            let (a, b) = (first.0 as usize, first.0 as usize + count as usize);
            c.ctx.get(a..b).map(|t| t.to_vec()).ok_or(ReplicaError::Invalid("table range".into()))
        })
    }

    async fn create_chunk(&self, id: ChunkId, size: u64, epoch: Epoch) -> Result<(), ReplicaError> {
        self.gate().await?;
        self.with(|s| {
            Self::check_epoch(s, id.volume, epoch)?;
            if s.chunks.contains_key(&id) {
                return Err(ReplicaError::ChunkExists);
            }
            s.chunks.insert(
                id,
                FakeChunk {
                    data: vec![0; size as usize],
                    ctx: vec![BlockContext::default(); size as usize / BS],
                    dirty: false,
                },
            );
            Ok(())
        })?;
        self.log.push(Event::Create { node: self.node, chunk: id.chunk.0 });
        Ok(())
    }

    async fn delete_chunk(&self, id: ChunkId, epoch: Epoch) -> Result<(), ReplicaError> {
        self.gate().await?;
        self.with(|s| {
            Self::check_epoch(s, id.volume, epoch)?;
            s.chunks.remove(&id);
            Ok(())
        })
    }

    async fn announce_epoch(&self, volume: VolumeId, epoch: Epoch) -> Result<Epoch, ReplicaError> {
        self.gate().await?;
        self.with(|s| {
            let cur = s.epochs.entry(volume).or_default();
            if epoch < *cur {
                return Err(ReplicaError::Fenced(format!("epoch {epoch} < {cur}")));
            }
            *cur = epoch;
            Ok(epoch)
        })
    }

    async fn list_dirty(&self, volume: VolumeId, epoch: Epoch) -> Result<Vec<ChunkIdx>, ReplicaError> {
        self.gate().await?;
        self.with(|s| {
            Self::check_epoch(s, volume, epoch)?;
            let mut v: Vec<ChunkIdx> =
                s.chunks.iter().filter(|(id, c)| id.volume == volume && c.dirty).map(|(id, _)| id.chunk).collect();
            v.sort();
            Ok(v)
        })
    }

    async fn ping(&self) -> Result<(), ReplicaError> {
        self.gate().await
    }
}

/// An in-memory membership provider that records ejections in the log.
pub struct FakeMembership {
    pub layout: Mutex<VolumeLayout>,
    pub epoch: Mutex<Epoch>,
    pub fail_eject: Mutex<bool>,
    pub snapshots: Mutex<Vec<Seq>>,
    log: Log,
}

impl FakeMembership {
    pub fn new(layout: VolumeLayout, log: Log) -> Arc<Self> {
        Arc::new(FakeMembership {
            layout: Mutex::new(layout),
            epoch: Mutex::new(Epoch(0)),
            fail_eject: Mutex::new(false),
            snapshots: Mutex::new(Vec::new()),
            log,
        })
    }
}

impl Membership for FakeMembership {
    async fn attach(&self, volume: VolumeId) -> Result<Attachment, MembershipError> {
        let layout = self.layout.lock().unwrap().clone();
        if layout.volume != volume {
            return Err(MembershipError::UnknownVolume(volume));
        }
        let mut e = self.epoch.lock().unwrap();
        e.0 += 1;
        Ok(Attachment { epoch: *e, layout, snapshots: self.snapshots.lock().unwrap().clone(), unfilled: Vec::new() })
    }

    async fn set_snapshots(&self, _volume: VolumeId, epoch: Epoch, cuts: Vec<Seq>) -> Result<(), MembershipError> {
        tokio::task::yield_now().await;
        if *self.epoch.lock().unwrap() != epoch {
            return Err(MembershipError::Refused("a newer front end attached".into()));
        }
        *self.snapshots.lock().unwrap() = cuts.clone();
        self.log.push(Event::Snapshots(cuts));
        Ok(())
    }

    async fn eject(
        &self,
        _volume: VolumeId,
        chunk: ChunkIdx,
        version: u64,
        node: NodeId,
        reason: EjectReason,
    ) -> Result<ReplicaSet, MembershipError> {
        tokio::task::yield_now().await;
        if *self.fail_eject.lock().unwrap() {
            return Err(MembershipError::Unavailable("fake membership down".into()));
        }
        let mut l = self.layout.lock().unwrap();
        let min = l.min_in_sync;
        let set = &mut l.chunks[chunk.0 as usize];
        if set.version != version || !set.is_member(node) {
            return Ok(set.clone());
        }
        if set.contains(node) && set.in_sync.len() - 1 < min {
            return Err(MembershipError::BelowMinInSync { chunk, node, remaining: set.in_sync.len() - 1, min });
        }
        set.in_sync.retain(|n| *n != node);
        set.rebuilding.retain(|n| *n != node);
        set.ejected.push((node, reason));
        set.version += 1;
        self.log.push(Event::Eject { node, chunk: chunk.0, reason });
        Ok(set.clone())
    }
}

pub fn layout(nodes: u64, size: u64, chunk_size: u64, min_in_sync: usize) -> VolumeLayout {
    let replicas: Vec<Replica> = (1..=nodes)
        .map(|i| Replica {
            node: NodeId(i),
            addr: SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)),
            zone: Zone(format!("z{i}")),
        })
        .collect();
    let chunks = size.div_ceil(chunk_size);
    VolumeLayout {
        volume: VOL,
        name: "test".into(),
        size,
        chunk_size,
        min_in_sync,
        chunks: (0..chunks)
            .map(|_| ReplicaSet {
                version: 0,
                in_sync: replicas.iter().map(|r| r.node).collect(),
                rebuilding: vec![],
                ejected: vec![],
            })
            .collect(),
        nodes: replicas,
    }
}

/// A volume's fakes: one replica per node, the membership, the shared log.
pub struct Cluster {
    pub log: Log,
    pub replicas: Vec<FakeReplica>,
    pub membership: Arc<FakeMembership>,
}

impl Cluster {
    pub fn new(nodes: u64, size: u64, chunk_size: u64, min_in_sync: usize) -> Self {
        let log = Log::default();
        let replicas = (1..=nodes).map(|i| FakeReplica::new(NodeId(i), log.clone())).collect();
        let membership = FakeMembership::new(layout(nodes, size, chunk_size, min_in_sync), log.clone());
        Cluster { log, replicas, membership }
    }

    pub fn replica(&self, node: u64) -> &FakeReplica {
        &self.replicas[node as usize - 1]
    }

    pub fn connector(&self) -> impl Fn(&Replica) -> FakeReplica {
        let replicas = self.replicas.clone();
        move |r: &Replica| replicas[r.node.0 as usize - 1].clone()
    }
}
