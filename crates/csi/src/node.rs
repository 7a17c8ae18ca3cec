//! CSI Node: a volume becomes a block device and a filesystem on this node.
//!
//! ```text
//!   NodeStage    attach (meta: new epoch, older front ends fenced)
//!                → FUSE file <state>/fuse/<volume>/volume → loop device (4 KiB sectors, direct I/O)
//!                → mount mode: mkfs if blank, mount on the staging path
//!   NodePublish  bind mount of the staging path (or, raw block, of the loop device) on the target
//!   NodeUnpublish / NodeUnstage   the reverse, leaving no mount, loop device, FUSE mount or lease
//! ```
//!
//! What is staged is recorded in `<state>/volumes/<volume>.json` before NodeStage
//! returns and removed when NodeUnstage is done. After a restart of this process
//! (the FUSE server of every staged volume dies with it, so their mounts fail with
//! ENOTCONN) [`NodeService::recover`] tears down what is left of each recorded
//! volume and stages it again, then binds its targets again: pods see I/O errors
//! for the moment the node is down and their mounts work again after it.
//!
//! Kernel NBD, where the module exists, would let the device outlive this process;
//! that path lives in `ballast_attach::nbd` and is not used by the node service yet.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ballast_attach::fs::{self, FsType};
use ballast_attach::{find_by_backing_file, FuseFile, LoopDevice, LoopOptions};
use ballast_blockdev::BlockDev;
use ballast_metaclient::MetaClient;
use ballast_metavolume::{AttachOptions, AttachedVolume, VolumeMetrics, LAYOUT_POLL};
use ballast_types::NodeId;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};
use tracing::{info, instrument, warn};

use crate::locks::VolumeLocks;
use crate::params::{self, required, required_capability, Access};
use crate::pb;
use crate::pb::node_service_capability::rpc::Type as Rpc;
use crate::TOPOLOGY_ZONE;

#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This storage node's Ballast id: the CSI node id, and the front end's local node.
    pub node_id: u64,
    pub zone: String,
    /// Where staged-volume records and FUSE mount points live (on the host, so a
    /// restarted plugin finds them).
    pub state_dir: PathBuf,
    /// NodeGetInfo's max_volumes_per_node (0: no limit).
    pub max_volumes: i64,
    /// Per-replica I/O timeout of the front ends this node runs.
    pub io_timeout: Duration,
    /// The process's front-end metric families: each staged volume's series
    /// (label `volume`) exist from NodeStage to NodeUnstage. None: no metrics.
    pub volume_metrics: Option<VolumeMetrics>,
}

/// What is staged, as recorded on disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct StageRecord {
    volume_id: String,
    staging_path: PathBuf,
    /// None: raw block; else the filesystem mounted on the staging path.
    fs_type: Option<String>,
    mount_flags: Vec<String>,
    read_only: bool,
    /// Published targets and whether each is read-only.
    targets: Vec<(PathBuf, bool)>,
}

/// A staged volume: the layers, outermost last.
struct Staged {
    record: StageRecord,
    attached: AttachedVolume,
    fuse: FuseFile,
    dev: LoopDevice,
}

#[derive(Clone)]
pub struct NodeService {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: NodeConfig,
    meta: MetaClient,
    locks: VolumeLocks,
    staged: tokio::sync::Mutex<HashMap<String, Staged>>,
}

/// Runs blocking work (mount, mkfs, FUSE and loop setup) off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Status::internal(format!("blocking task failed: {e}")))
}

fn internal(what: &str, e: impl std::fmt::Display) -> Status {
    Status::internal(format!("{what}: {e}"))
}

impl NodeService {
    pub fn new(cfg: NodeConfig, meta: MetaClient) -> Result<NodeService, std::io::Error> {
        std::fs::create_dir_all(cfg.state_dir.join("volumes"))?;
        std::fs::create_dir_all(cfg.state_dir.join("fuse"))?;
        Ok(NodeService {
            inner: Arc::new(Inner { cfg, meta, locks: VolumeLocks::default(), staged: Default::default() }),
        })
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.inner.cfg.state_dir.join("volumes").join(format!("{id}.json"))
    }

    fn fuse_dir(&self, id: &str) -> PathBuf {
        self.inner.cfg.state_dir.join("fuse").join(id)
    }

    /// Writes the record durably (temp file, fsync, rename) before the call that
    /// made it returns, so a crash right after still finds it.
    fn save(&self, r: &StageRecord) -> Result<(), Status> {
        let path = self.record_path(&r.volume_id);
        let tmp = path.with_extension("json.tmp");
        let data = serde_json::to_vec_pretty(r).map_err(|e| internal("encode the stage record", e))?;
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&data)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(path.parent().unwrap_or(Path::new("/")))?.sync_all()
        };
        write().map_err(|e| internal(&format!("write {}", path.display()), e))
    }

    fn forget(&self, id: &str) -> Result<(), Status> {
        match std::fs::remove_file(self.record_path(id)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(internal("remove the stage record", e)),
        }
    }

    /// Attaches the volume and builds its device; mounts the filesystem for a
    /// mount-mode record. Undoes everything it did when a step fails.
    async fn stage(&self, record: StageRecord) -> Result<Staged, Status> {
        let id = record.volume_id.clone();
        let cfg = &self.inner.cfg;
        let options = AttachOptions {
            io_timeout: cfg.io_timeout,
            poll: LAYOUT_POLL,
            metrics: cfg.volume_metrics.clone(),
            to_fill: false,
        };
        let attached = AttachedVolume::attach_with(self.inner.meta.clone(), &id, NodeId(cfg.node_id), options)
            .await
            .map_err(|e| {
                if e.is_not_found() {
                    Status::not_found(format!("volume {id} does not exist"))
                } else if e.is_refused() {
                    // Published to another node (this node's pod moved on):
                    // a stage here must not fence that node's front end.
                    Status::failed_precondition(format!("attach {id}: {e}"))
                } else {
                    Status::unavailable(format!("attach {id}: {e}"))
                }
            })?
            .with_scrub(ballast_metavolume::ScrubConfig::default());
        let (volume, fuse_dir, rt) = (attached.volume().clone(), self.fuse_dir(&id), tokio::runtime::Handle::current());
        let read_only = record.read_only;
        let rec = record.clone();
        let built = blocking(move || -> Result<(FuseFile, LoopDevice), Status> {
            // Leftovers of a crashed run: a dead FUSE mount and loop devices on it.
            let file = fuse_dir.join(ballast_attach::FILE_NAME);
            clear_device_leftovers(&fuse_dir, &file);
            let fuse = FuseFile::mount(volume, &fuse_dir, rt).map_err(|e| internal("FUSE file", e))?;
            let opts = LoopOptions { read_only, ..LoopOptions::default() };
            let dev = match LoopDevice::attach(&fuse.file_path(), &opts) {
                Ok(d) => d,
                Err(e) => {
                    let _ = fuse.unmount();
                    return Err(internal("loop device", e));
                }
            };
            if let Some(fs_type) = &rec.fs_type {
                if let Err(e) = make_and_mount(&dev, fs_type, &rec) {
                    let _ = dev.detach();
                    let _ = fuse.unmount();
                    return Err(e);
                }
            }
            Ok((fuse, dev))
        })
        .await
        .and_then(|r| r);
        match built {
            Ok((fuse, dev)) => {
                info!(volume = %id, device = %dev.path().display(), staging = %record.staging_path.display(), fs = ?record.fs_type, "volume staged");
                Ok(Staged { record, attached, fuse, dev })
            }
            Err(e) => {
                let _ = attached.detach().await;
                Err(e)
            }
        }
    }

    /// Tears a staged volume down: targets, staging mount, loop device, FUSE
    /// file, front end (flushed; its lease released).
    async fn teardown(&self, s: Staged) -> Result<(), Status> {
        let Staged { record, attached, fuse, dev } = s;
        let rec = record.clone();
        blocking(move || -> Result<(), Status> {
            for (t, _) in &rec.targets {
                unmount_and_remove(t)?;
            }
            fs::unmount(&rec.staging_path).map_err(|e| internal("unmount the staging path", e))?;
            dev.detach().map_err(|e| internal("detach the loop device", e))?;
            fuse.unmount().map_err(|e| internal("unmount the FUSE file", e))?;
            Ok(())
        })
        .await??;
        attached.detach().await.map_err(|e| internal("final flush", e))?;
        info!(volume = %record.volume_id, "volume unstaged");
        Ok(())
    }

    /// Stages again every volume recorded as staged (after a restart of this
    /// process), and binds its targets again. Volumes that cannot be staged now
    /// (meta unreachable) are retried until `deadline` passes.
    pub async fn recover(&self, deadline: Duration) {
        let dir = self.inner.cfg.state_dir.join("volumes");
        let Ok(entries) = std::fs::read_dir(&dir) else { return };
        let mut records = Vec::new();
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_some_and(|x| x == "json") {
                let read = std::fs::read(&path).map_err(|e| e.to_string());
                match read.and_then(|d| serde_json::from_slice::<StageRecord>(&d).map_err(|e| e.to_string())) {
                    Ok(r) => records.push(r),
                    Err(err) => warn!(file = %path.display(), error = %err, "unreadable stage record; ignored"),
                }
            }
        }
        let until = tokio::time::Instant::now() + deadline;
        for record in records {
            let id = record.volume_id.clone();
            let Ok(_busy) = self.inner.locks.lock(&id) else { continue };
            // What the dead process left: pod targets and the staging mount.
            let rec = record.clone();
            let _ = blocking(move || {
                for (t, _) in &rec.targets {
                    if let Err(e) = fs::unmount(t) {
                        warn!(target = %t.display(), error = %e, "unmount a stale target");
                    }
                }
                if let Err(e) = fs::unmount(&rec.staging_path) {
                    warn!(path = %rec.staging_path.display(), error = %e, "unmount a stale staging path");
                }
            })
            .await;
            loop {
                match self.stage(record.clone()).await {
                    Ok(staged) => {
                        let (dev, rec) = (staged.dev.path().to_path_buf(), staged.record.clone());
                        let bound = blocking(move || -> Result<(), Status> {
                            for (t, ro) in &rec.targets {
                                publish_target(&rec, &dev, t, *ro)?;
                            }
                            Ok(())
                        })
                        .await
                        .and_then(|r| r);
                        if let Err(e) = bound {
                            warn!(volume = %id, error = %e, "re-binding a target failed");
                        }
                        info!(volume = %id, targets = record.targets.len(), "staged volume recovered after a restart");
                        self.inner.staged.lock().await.insert(id.clone(), staged);
                        break;
                    }
                    Err(e) if tokio::time::Instant::now() < until && e.code() == tonic::Code::Unavailable => {
                        warn!(volume = %id, error = %e, "recovering a staged volume; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(e) => {
                        warn!(volume = %id, error = %e, "could not recover a staged volume; the CO must stage it again");
                        let _ = self.forget(&id);
                        break;
                    }
                }
            }
        }
    }

    /// Unstages every staged volume (a clean stop of the node).
    pub async fn shutdown(&self) {
        let all: Vec<Staged> = self.inner.staged.lock().await.drain().map(|(_, s)| s).collect();
        for s in all {
            // The records stay: the next start stages these volumes again.
            let id = s.record.volume_id.clone();
            if let Err(e) = self.teardown(s).await {
                warn!(volume = %id, error = %e, "teardown at shutdown failed");
            }
        }
    }
}

/// Unmounts a dead FUSE mount and detaches loop devices over its file, so a new
/// stage starts clean after a crash.
fn clear_device_leftovers(fuse_dir: &Path, file: &Path) {
    if let Ok(devs) = find_by_backing_file(file) {
        for d in devs {
            warn!(device = %d.display(), file = %file.display(), "a loop device of a previous run is still bound; it clears itself once unmounted");
        }
    }
    match fs::unmount(fuse_dir) {
        Ok(fs::Unmounted::NotMounted) => {}
        Ok(how) => warn!(path = %fuse_dir.display(), ?how, "unmounted a FUSE mount left by a previous run"),
        Err(e) => warn!(path = %fuse_dir.display(), error = %e, "could not unmount a stale FUSE mount"),
    }
}

/// mkfs when the device is blank (never over existing data), then mount.
fn make_and_mount(dev: &LoopDevice, fs_type: &str, rec: &StageRecord) -> Result<(), Status> {
    let fs_type: FsType = params::parse_fs_type("fs_type", fs_type)?;
    let blank = fs::is_blank(dev.path()).map_err(|e| internal("probe the device", e))?;
    if blank {
        if rec.read_only {
            return Err(Status::failed_precondition("a read-only volume with no filesystem cannot be formatted"));
        }
        fs::mkfs(dev.path(), fs_type, &[]).map_err(|e| internal("mkfs", e))?;
        info!(device = %dev.path().display(), fs = %fs_type, "blank volume formatted");
    }
    std::fs::create_dir_all(&rec.staging_path).map_err(|e| internal("create the staging path", e))?;
    let flags: Vec<&str> = rec.mount_flags.iter().map(String::as_str).collect();
    fs::mount(dev.path(), &rec.staging_path, fs_type, &flags, rec.read_only).map_err(|e| {
        // A filesystem of another type than asked for is the user's mismatch.
        Status::failed_precondition(format!("mount {} as {fs_type}: {e}", dev.path().display()))
    })
}

/// Binds the staged volume on `target`: the staging mount, or the device.
fn publish_target(rec: &StageRecord, dev: &Path, target: &Path, read_only: bool) -> Result<(), Status> {
    if fs::is_mount_point(target).map_err(|e| internal("read mountinfo", e))? {
        return Ok(());
    }
    let src = if rec.fs_type.is_some() { rec.staging_path.as_path() } else { dev };
    fs::bind_mount(src, target, read_only).map_err(|e| internal("bind mount the target", e))
}

fn unmount_and_remove(target: &Path) -> Result<(), Status> {
    fs::unmount(target).map_err(|e| internal("unmount the target", e))?;
    match std::fs::metadata(target) {
        Ok(m) if m.is_dir() => std::fs::remove_dir(target).or_else(ignore_missing),
        Ok(_) => std::fs::remove_file(target).or_else(ignore_missing),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
    .map_err(|e| internal("remove the target", e))
}

fn ignore_missing(e: std::io::Error) -> std::io::Result<()> {
    if e.kind() == std::io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

#[tonic::async_trait]
impl pb::node_server::Node for NodeService {
    #[instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn node_stage_volume(
        &self,
        req: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = required("volume_id", &r.volume_id)?.to_string();
        let staging = PathBuf::from(required("staging_target_path", &r.staging_target_path)?);
        let (cap, access) = required_capability("volume_capability", r.volume_capability.as_ref())?;
        let read_only = cap
            .access_mode
            .as_ref()
            .is_some_and(|m| m.mode() == pb::volume_capability::access_mode::Mode::SingleNodeReaderOnly);
        let (fs_type, mount_flags) = match access {
            Access::Block => (None, vec![]),
            Access::Mount { fs_type, flags } => {
                let fs = match fs_type {
                    Some(f) => f,
                    None => match r.volume_context.get(params::CONTEXT_FS_TYPE).filter(|v| !v.is_empty()) {
                        Some(v) => params::parse_fs_type("volume_context fsType", v)?,
                        None => FsType::Ext4,
                    },
                };
                (Some(fs.as_str().to_string()), flags)
            }
        };
        let _busy = self.inner.locks.lock(&id)?;
        let staged = self.inner.staged.lock().await;
        if let Some(s) = staged.get(&id) {
            let same =
                s.record.staging_path == staging && s.record.fs_type == fs_type && s.record.read_only == read_only;
            return if same {
                Ok(Response::new(pb::NodeStageVolumeResponse {}))
            } else {
                Err(Status::already_exists(format!(
                    "volume {id} is staged at {} with another capability",
                    s.record.staging_path.display()
                )))
            };
        }
        let max = self.inner.cfg.max_volumes;
        if max > 0 && staged.len() as i64 >= max {
            return Err(Status::resource_exhausted(format!("this node stages at most {max} volumes")));
        }
        drop(staged);
        let record = StageRecord {
            volume_id: id.clone(),
            staging_path: staging,
            fs_type,
            mount_flags,
            read_only,
            targets: vec![],
        };
        let staged = self.stage(record.clone()).await?;
        if let Err(e) = self.save(&record) {
            let _ = self.teardown(staged).await;
            return Err(e);
        }
        self.inner.staged.lock().await.insert(id, staged);
        Ok(Response::new(pb::NodeStageVolumeResponse {}))
    }

    #[instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn node_unstage_volume(
        &self,
        req: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = required("volume_id", &r.volume_id)?.to_string();
        let staging = PathBuf::from(required("staging_target_path", &r.staging_target_path)?);
        let _busy = self.inner.locks.lock(&id)?;
        let staged = self.inner.staged.lock().await.remove(&id);
        match staged {
            Some(s) => {
                if let Err(e) = self.teardown(s).await {
                    // What is left is torn down by the next start's recovery.
                    warn!(volume = %id, error = %e, "unstage failed");
                    return Err(e);
                }
            }
            // Not staged (a retry, or staged by a process that is gone): make sure
            // nothing is mounted there.
            None => {
                let path = staging.clone();
                blocking(move || fs::unmount(&path)).await?.map_err(|e| internal("unmount the staging path", e))?;
            }
        }
        self.forget(&id)?;
        Ok(Response::new(pb::NodeUnstageVolumeResponse {}))
    }

    #[instrument(skip_all, fields(volume = %req.get_ref().volume_id, target = %req.get_ref().target_path))]
    async fn node_publish_volume(
        &self,
        req: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = required("volume_id", &r.volume_id)?.to_string();
        let staging = PathBuf::from(required("staging_target_path", &r.staging_target_path)?);
        let target = PathBuf::from(required("target_path", &r.target_path)?);
        let (_, access) = required_capability("volume_capability", r.volume_capability.as_ref())?;
        let _busy = self.inner.locks.lock(&id)?;
        let mut staged = self.inner.staged.lock().await;
        let s = staged
            .get_mut(&id)
            .ok_or_else(|| Status::failed_precondition(format!("volume {id} is not staged on this node")))?;
        if s.record.staging_path != staging {
            return Err(Status::failed_precondition(format!(
                "volume {id} is staged at {}, not {}",
                s.record.staging_path.display(),
                staging.display()
            )));
        }
        if matches!(access, Access::Block) != s.record.fs_type.is_none() {
            return Err(Status::failed_precondition(format!("volume {id} was staged with another access type")));
        }
        let read_only = r.readonly || s.record.read_only;
        if let Some((_, ro)) = s.record.targets.iter().find(|(t, _)| *t == target) {
            return if *ro == read_only {
                Ok(Response::new(pb::NodePublishVolumeResponse {}))
            } else {
                Err(Status::already_exists(format!("{} is published with another read-only flag", target.display())))
            };
        }
        let (rec, dev, t) = (s.record.clone(), s.dev.path().to_path_buf(), target.clone());
        blocking(move || publish_target(&rec, &dev, &t, read_only)).await??;
        s.record.targets.push((target.clone(), read_only));
        self.save(&s.record)?;
        info!(volume = %id, target = %target.display(), read_only, "volume published");
        Ok(Response::new(pb::NodePublishVolumeResponse {}))
    }

    #[instrument(skip_all, fields(volume = %req.get_ref().volume_id, target = %req.get_ref().target_path))]
    async fn node_unpublish_volume(
        &self,
        req: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = required("volume_id", &r.volume_id)?.to_string();
        let target = PathBuf::from(required("target_path", &r.target_path)?);
        let _busy = self.inner.locks.lock(&id)?;
        let t = target.clone();
        blocking(move || unmount_and_remove(&t)).await??;
        let mut staged = self.inner.staged.lock().await;
        if let Some(s) = staged.get_mut(&id) {
            s.record.targets.retain(|(p, _)| *p != target);
            self.save(&s.record)?;
        }
        info!(volume = %id, target = %target.display(), "volume unpublished");
        Ok(Response::new(pb::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        use pb::volume_usage::Unit;
        let r = req.into_inner();
        let id = required("volume_id", &r.volume_id)?.to_string();
        let path = PathBuf::from(required("volume_path", &r.volume_path)?);
        let staged = self.inner.staged.lock().await;
        let s = staged.get(&id).ok_or_else(|| Status::not_found(format!("volume {id} is not staged on this node")))?;
        if !path.exists() {
            return Err(Status::not_found(format!("volume path {} does not exist", path.display())));
        }
        let volume = s.attached.volume();
        let condition = if volume.is_stopped() {
            pb::VolumeCondition {
                abnormal: true,
                message: "the front end stopped: another node attached the volume (fenced), or it was closed".into(),
            }
        } else {
            pb::VolumeCondition { abnormal: false, message: "attached".into() }
        };
        let usage = if s.record.fs_type.is_none() {
            vec![pb::VolumeUsage { total: volume.size() as i64, unit: Unit::Bytes as i32, ..Default::default() }]
        } else {
            let st = blocking(move || fs::stats(&path)).await?.map_err(|e| internal("statvfs", e))?;
            vec![
                pb::VolumeUsage {
                    available: st.bytes_available as i64,
                    total: st.bytes_total as i64,
                    used: st.bytes_used as i64,
                    unit: Unit::Bytes as i32,
                },
                pb::VolumeUsage {
                    available: st.inodes_free as i64,
                    total: st.inodes_total as i64,
                    used: st.inodes_used as i64,
                    unit: Unit::Inodes as i32,
                },
            ]
        };
        Ok(Response::new(pb::NodeGetVolumeStatsResponse { usage, volume_condition: Some(condition) }))
    }

    /// Follows the grown size: the front end (a fresh layout, retried while a
    /// meta member lags), the FUSE file, the loop device, then the filesystem.
    #[instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn node_expand_volume(
        &self,
        req: Request<pb::NodeExpandVolumeRequest>,
    ) -> Result<Response<pb::NodeExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = required("volume_id", &r.volume_id)?.to_string();
        required("volume_path", &r.volume_path)?;
        let want = r.capacity_range.as_ref().map_or(0, |c| c.required_bytes.max(0) as u64);
        let _busy = self.inner.locks.lock(&id)?;
        let staged = self.inner.staged.lock().await;
        let s = staged.get(&id).ok_or_else(|| Status::not_found(format!("volume {id} is not staged on this node")))?;
        let volume = s.attached.volume().clone();
        for _ in 0..40 {
            if volume.size() >= want {
                break;
            }
            if let Err(e) = s.attached.refresh().await {
                warn!(volume = %id, error = %e, "reading the grown layout failed; retrying");
            }
            if volume.size() < want {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        let size = volume.size();
        if size < want {
            return Err(Status::unavailable(format!(
                "volume {id} is {size} bytes, not yet the {want} asked for: has ControllerExpandVolume run?"
            )));
        }
        // The kernel asks this process's FUSE server about the new size while
        // these run: never on a worker the FUSE requests need (block_in_place
        // hands this worker's other tasks to the rest of the runtime).
        tokio::task::block_in_place(|| -> Result<(), Status> {
            s.fuse.set_size(size).map_err(|e| internal("resize the FUSE file", e))?;
            s.dev.set_capacity().map_err(|e| internal("resize the loop device", e))
        })?;
        if let Some(fs_type) = &s.record.fs_type {
            let fs_type = params::parse_fs_type("fs_type", fs_type)?;
            let (dev, mnt) = (s.dev.path().to_path_buf(), s.record.staging_path.clone());
            blocking(move || fs::grow(fs_type, &dev, &mnt)).await?.map_err(|e| internal("grow the filesystem", e))?;
        }
        info!(volume = %id, size, "volume expanded on the node");
        Ok(Response::new(pb::NodeExpandVolumeResponse { capacity_bytes: size as i64 }))
    }

    async fn node_get_capabilities(
        &self,
        _req: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        let rpc = |t: Rpc| pb::NodeServiceCapability {
            r#type: Some(pb::node_service_capability::Type::Rpc(pb::node_service_capability::Rpc { r#type: t as i32 })),
        };
        let capabilities = [
            Rpc::StageUnstageVolume,
            Rpc::GetVolumeStats,
            Rpc::ExpandVolume,
            Rpc::VolumeCondition,
            Rpc::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(rpc)
        .collect();
        Ok(Response::new(pb::NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _req: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        let cfg = &self.inner.cfg;
        Ok(Response::new(pb::NodeGetInfoResponse {
            node_id: cfg.node_id.to_string(),
            max_volumes_per_node: cfg.max_volumes,
            accessible_topology: Some(pb::Topology {
                segments: HashMap::from([(TOPOLOGY_ZONE.to_string(), cfg.zone.clone())]),
            }),
        }))
    }
}
