//! The CSI driver end to end, driven over its unix sockets the way the kubelet and
//! the sidecars drive it, on a real cluster of processes: three `ballast meta`
//! members, four `ballast node` storage nodes (each also the CSI Node plugin of its
//! "host") in three zones, and `ballast csi-controller`.
//!
//! - the whole life of a volume: CreateVolume → ControllerPublish → NodeStage (real
//!   mkfs and mount through a loop device over the FUSE volume file) → NodePublish →
//!   files written and fsynced → a storage node SIGKILLed → more files → unpublish,
//!   unstage (nothing left behind) → staged on another node: every file intact →
//!   ControllerExpandVolume + NodeExpandVolume: the filesystem is bigger →
//!   DeleteVolume: the chunks are gone from the replicas;
//! - raw block mode: the device bound on a file, a pattern written, read back
//!   from another node;
//! - a node process SIGKILLed while a volume is staged and published: restarted,
//!   it stages the volume again and the pod's target works again;
//! - topology: a requisite (one zone with `--strict-topology`) never narrows
//!   placement, `zoneSpread: required` still spreads 3 replicas over 3 zones, the
//!   volume is accessible from every zone; the `zones` parameter keeps replicas
//!   to some zones;
//! - every error path the spec names, with its exact code (and ListVolumes
//!   refusing tokens it did not issue).
//!
//! Needs root (mount, loop devices, FUSE) and mkfs.xfs; prints SKIP otherwise.
//! xfs because an ext4 filesystem grows online only with CAP_SYS_RESOURCE, which
//! some containers (this test machine's among them) do not grant.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ballast_csi::pb;
use ballast_csi::pb::controller_client::ControllerClient;
use ballast_csi::pb::identity_client::IdentityClient;
use ballast_csi::pb::node_client::NodeClient;
use ballast_testkit::{needs, random_bytes, run_ok, wait_until, Cluster, Proc};
use tonic::transport::Channel;
use tonic::Code;

const MIB: u64 = 1 << 20;
const NODES: [(u64, &str); 4] = [(1, "z1"), (2, "z2"), (3, "z3"), (4, "z1")];

fn skip(test: &str) -> bool {
    !needs(test)
        .root("mount, loop devices, FUSE")
        .paths(&["/dev/fuse", "/dev/loop-control"])
        .tools(&["mkfs.xfs", "xfs_growfs", "blkid"])
        .met()
}

fn socket(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("csi-node{id}.sock"))
}

/// Storage nodes with their CSI Node service on a socket of their own.
fn start_cluster(tag: &str) -> Cluster {
    Cluster::start_with(tag, &NODES, |id, dir| {
        vec![
            "--csi-endpoint".into(),
            format!("unix://{}", socket(dir, id).display()),
            "--csi-state".into(),
            dir.join(format!("csi-state{id}")).display().to_string(),
            // The snapshot tests check what is refused while a restore still
            // copies from its snapshot: nothing fills it in the background.
            "--fill-clones=false".into(),
        ]
    })
    .expect("start the cluster")
}

/// A gRPC channel over a unix socket, once something accepts on it (a socket
/// file left by a killed process does not count).
async fn channel(path: &Path) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let connected = ballast_csi::dial(path).await;
        match connected {
            Ok(ch) => return ch,
            Err(e) => assert!(Instant::now() < deadline, "nothing serves {}: {e}", path.display()),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Driver {
    controller: ControllerClient<Channel>,
    identity: IdentityClient<Channel>,
    nodes: HashMap<u64, NodeClient<Channel>>,
    _controller_proc: Proc,
}

impl Driver {
    async fn connect(c: &Cluster) -> Driver {
        let (p, sock) = c.csi_controller(&[]).expect("csi-controller ready");
        let ch = channel(&sock).await;
        // Whoever reaches a CSI socket provisions and deletes volumes: only
        // its own user may connect (the node plugins' sockets come from the
        // same ballast_csi::serve_with).
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&sock).expect("socket").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", sock.display());
        let mut nodes = HashMap::new();
        for (id, _) in NODES {
            nodes.insert(id, NodeClient::new(channel(&socket(c.dir(), id)).await));
        }
        Driver {
            controller: ControllerClient::new(ch.clone()),
            identity: IdentityClient::new(ch),
            nodes,
            _controller_proc: p,
        }
    }

    fn node(&self, id: u64) -> NodeClient<Channel> {
        self.nodes[&id].clone()
    }
}

fn mount_cap(fs: &str) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(pb::volume_capability::AccessType::Mount(pb::volume_capability::MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        })),
        access_mode: Some(pb::volume_capability::AccessMode {
            mode: pb::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

fn block_cap() -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(pb::volume_capability::AccessType::Block(pb::volume_capability::BlockVolume {})),
        access_mode: Some(pb::volume_capability::AccessMode {
            mode: pb::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

fn params(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// A CreateVolume topology requirement over Ballast's zone key.
fn requisite(requisite: &[&str], preferred: &[&str]) -> pb::TopologyRequirement {
    let topo = |z: &&str| pb::Topology { segments: params(&[("topology.ballast.io/zone", z)]) };
    pb::TopologyRequirement {
        requisite: requisite.iter().map(topo).collect(),
        preferred: preferred.iter().map(topo).collect(),
    }
}

/// The zones a volume says it is accessible from, in order.
fn topology_zones(v: &pb::Volume) -> Vec<String> {
    v.accessible_topology
        .iter()
        .map(|t| {
            assert_eq!(t.segments.len(), 1, "one key per segment: {t:?}");
            t.segments["topology.ballast.io/zone"].clone()
        })
        .collect()
}

/// Per chunk of `volume`, the zones of its replicas.
fn replica_zones(c: &Cluster, volume: &str) -> Vec<Vec<&'static str>> {
    let zone = |id: u64| NODES.iter().find(|(n, _)| *n == id).map(|(_, z)| *z).expect("a known node");
    c.inspect(volume).expect("volume inspect")["chunks"]
        .as_array()
        .expect("chunks")
        .iter()
        .map(|ch| {
            let replicas = ch["replicas"].as_array().expect("replicas");
            replicas.iter().map(|r| zone(r["node"].as_u64().expect("node id"))).collect()
        })
        .collect()
}

fn create_req(name: &str, bytes: i64, cap: pb::VolumeCapability, p: &[(&str, &str)]) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(pb::CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        volume_capabilities: vec![cap],
        parameters: params(p),
        ..Default::default()
    }
}

fn stage_req(
    id: &str,
    staging: &Path,
    cap: pb::VolumeCapability,
    ctx: &HashMap<String, String>,
) -> pb::NodeStageVolumeRequest {
    pb::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap),
        volume_context: ctx.clone(),
        ..Default::default()
    }
}

fn publish_req(id: &str, staging: &Path, target: &Path, cap: pb::VolumeCapability) -> pb::NodePublishVolumeRequest {
    pb::NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

/// Mount points at or under `dir` (from /proc/self/mountinfo).
fn mounts_under(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let d = dir.display().to_string();
    info.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.starts_with(&d)).map(String::from).collect()
}

/// Loop devices whose backing file is under `dir`.
fn loops_under(dir: &Path) -> Vec<String> {
    let d = dir.display().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/sys/block").expect("/sys/block").flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
            if b.trim().starts_with(&d) {
                out.push(name);
            }
        }
    }
    out
}

/// When dropped (also when the test panics halfway), unmounts what is mounted
/// under the cluster's directory, deepest first and lazily (a killed node's
/// FUSE mounts no longer answer), and detaches the loop devices backed there:
/// a failed test leaves no mount or loop device behind, and the cluster's
/// directory can be removed after it. Declared after the cluster, so it runs
/// first.
struct Leftovers(PathBuf);

impl Drop for Leftovers {
    fn drop(&mut self) {
        let mut mounts = mounts_under(&self.0);
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            eprintln!("cleanup: umount -l {m}");
            let _ = std::process::Command::new("umount").args(["-l", &m]).status();
        }
        for l in loops_under(&self.0) {
            eprintln!("cleanup: losetup -d /dev/{l}");
            let _ = std::process::Command::new("losetup").args(["-d", &format!("/dev/{l}")]).status();
        }
    }
}

fn write_files(dir: &Path, seeds: std::ops::Range<u64>) {
    for s in seeds {
        let path = dir.join(format!("file{s}"));
        let mut f = std::fs::File::create(&path).expect("create a file");
        f.write_all(&random_bytes(512 * 1024 + s as usize * 4096, s)).expect("write");
        f.sync_all().expect("fsync");
    }
    std::fs::File::open(dir).expect("open dir").sync_all().expect("fsync dir");
}

fn check_files(dir: &Path, seeds: std::ops::Range<u64>) {
    for s in seeds {
        let path = dir.join(format!("file{s}"));
        let got = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        assert!(got == random_bytes(512 * 1024 + s as usize * 4096, s), "{} differs", path.display());
    }
}

fn statvfs_bytes(path: &Path) -> u64 {
    let out = run_ok("stat", &["-f", "-c", "%b %S", path.to_str().expect("utf8")]).expect("stat -f");
    let mut it = out.split_whitespace().map(|v| v.parse::<u64>().expect("number"));
    it.next().expect("blocks") * it.next().expect("block size")
}

async fn unstage_everything(n: &mut NodeClient<Channel>, id: &str, staging: &Path, target: &Path) {
    n.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
    })
    .await
    .expect("NodeUnpublish");
    n.node_unstage_volume(pb::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
    })
    .await
    .expect("NodeUnstage");
}

#[test]
fn volume_lifecycle_through_csi_survives_a_lost_node_and_moves_between_nodes() {
    let test = "volume_lifecycle_through_csi_survives_a_lost_node_and_moves_between_nodes";
    if skip(test) {
        return;
    }
    let mut c = start_cluster("csi-life");
    let _leftovers = Leftovers(c.dir().to_path_buf());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut d = Driver::connect(&c).await;
        let info = d.identity.get_plugin_info(pb::GetPluginInfoRequest {}).await.expect("info").into_inner();
        assert_eq!(info.name, "csi.ballast.io");
        let probe = d.identity.probe(pb::ProbeRequest {}).await.expect("probe").into_inner();
        assert_eq!(probe.ready, Some(true));
        let ni = d.node(1).node_get_info(pb::NodeGetInfoRequest {}).await.expect("info").into_inner();
        assert_eq!(ni.node_id, "1");
        assert_eq!(ni.accessible_topology.expect("topology").segments["topology.ballast.io/zone"], "z1");

        // CreateVolume: replicas 3 over the 3 zones, xfs; a retry is the same volume.
        let sc = [
            ("replicas", "3"),
            ("minInSync", "2"),
            ("chunkSize", "64Mi"),
            ("zoneSpread", "required"),
            ("csi.storage.k8s.io/fstype", "xfs"),
        ];
        let req = create_req("pvc-life", 512 * MIB as i64, mount_cap(""), &sc);
        let vol =
            d.controller.create_volume(req.clone()).await.expect("CreateVolume").into_inner().volume.expect("volume");
        assert_eq!((vol.volume_id.as_str(), vol.capacity_bytes), ("pvc-life", 512 * MIB as i64));
        assert_eq!(vol.volume_context["fsType"], "xfs");
        let again = d.controller.create_volume(req.clone()).await.expect("retry").into_inner().volume.expect("volume");
        assert_eq!(again.volume_id, vol.volume_id);
        let bigger = create_req("pvc-life", 1024 * MIB as i64, mount_cap(""), &sc);
        assert_eq!(code(d.controller.create_volume(bigger).await), Code::AlreadyExists);
        let layout = c.inspect("pvc-life").expect("volume inspect");
        for chunk in layout["chunks"].as_array().expect("chunks") {
            let nodes: Vec<u64> = chunk["replicas"]
                .as_array()
                .expect("replicas")
                .iter()
                .map(|r| r["node"].as_u64().expect("id"))
                .collect();
            assert!(nodes.contains(&3), "zone spread required: z3's only node holds every chunk ({nodes:?})");
        }

        // ControllerPublish to node 1; a second node is refused while it holds it.
        let publish = |node: &str| pb::ControllerPublishVolumeRequest {
            volume_id: "pvc-life".into(),
            node_id: node.into(),
            volume_capability: Some(mount_cap("")),
            ..Default::default()
        };
        d.controller.controller_publish_volume(publish("1")).await.expect("publish to node 1");
        d.controller.controller_publish_volume(publish("1")).await.expect("publish again (idempotent)");
        assert_eq!(code(d.controller.controller_publish_volume(publish("2")).await), Code::FailedPrecondition);

        // NodeStage + NodePublish on node 1: mkfs.xfs through a real loop device.
        let host1 = c.path("host1");
        let (staging1, target1) = (host1.join("staging/pvc-life"), host1.join("pods/a/mount"));
        std::fs::create_dir_all(&staging1).expect("staging dir");
        std::fs::create_dir_all(target1.parent().expect("parent")).expect("pod dir");
        let mut n1 = d.node(1);
        n1.node_stage_volume(stage_req("pvc-life", &staging1, mount_cap(""), &vol.volume_context))
            .await
            .expect("NodeStage");
        n1.node_stage_volume(stage_req("pvc-life", &staging1, mount_cap(""), &vol.volume_context))
            .await
            .expect("NodeStage retry");
        let fstype =
            run_ok("findmnt", &["-n", "-o", "FSTYPE,SOURCE", staging1.to_str().expect("utf8")]).expect("findmnt");
        assert!(fstype.starts_with("xfs") && fstype.contains("/dev/loop"), "staging mount: {fstype}");
        n1.node_publish_volume(publish_req("pvc-life", &staging1, &target1, mount_cap(""))).await.expect("NodePublish");
        n1.node_publish_volume(publish_req("pvc-life", &staging1, &target1, mount_cap("")))
            .await
            .expect("NodePublish retry");
        write_files(&target1, 0..16);

        // A storage node holding a replica of every chunk dies; writes go on (2 of 3 in sync).
        c.kill_node(3).expect("kill node 3");
        write_files(&target1, 16..32);
        check_files(&target1, 0..32);
        let stats = n1
            .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                volume_id: "pvc-life".into(),
                volume_path: target1.display().to_string(),
                ..Default::default()
            })
            .await
            .expect("stats")
            .into_inner();
        let bytes = stats.usage.iter().find(|u| u.unit == pb::volume_usage::Unit::Bytes as i32).expect("bytes");
        assert!(bytes.used >= 16 * 512 * 1024 && bytes.total > 400 * MIB as i64, "{bytes:?}");
        assert!(!stats.volume_condition.expect("condition").abnormal);

        // Off node 1: nothing left behind (no mount, no loop device, no FUSE mount).
        unstage_everything(&mut n1, "pvc-life", &staging1, &target1).await;
        assert_eq!(mounts_under(&host1), Vec::<String>::new());
        assert_eq!(mounts_under(&c.path("csi-state1")), Vec::<String>::new(), "FUSE file unmounted");
        assert_eq!(loops_under(&c.path("csi-state1")), Vec::<String>::new(), "loop device detached");
        assert!(!target1.exists(), "the target is removed");
        unstage_everything(&mut n1, "pvc-life", &staging1, &target1).await; // idempotent

        // Onto node 2: every file intact.
        d.controller
            .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
                volume_id: "pvc-life".into(),
                node_id: "1".into(),
            })
            .await
            .expect("ControllerUnpublish");
        d.controller.controller_publish_volume(publish("2")).await.expect("publish to node 2");
        let host2 = c.path("host2");
        let (staging2, target2) = (host2.join("staging/pvc-life"), host2.join("pods/b/mount"));
        std::fs::create_dir_all(&staging2).expect("staging dir");
        std::fs::create_dir_all(target2.parent().expect("parent")).expect("pod dir");
        let mut n2 = d.node(2);
        n2.node_stage_volume(stage_req("pvc-life", &staging2, mount_cap(""), &vol.volume_context))
            .await
            .expect("NodeStage on 2");
        n2.node_publish_volume(publish_req("pvc-life", &staging2, &target2, mount_cap("")))
            .await
            .expect("NodePublish on 2");
        check_files(&target2, 0..32);

        // Expansion: controller (meta grows the volume), then node (front end, loop, xfs).
        // With z3's only node gone (once meta notices), new chunks cannot have
        // their three replicas in three zones: RESOURCE_EXHAUSTED, nothing grown.
        let expand = pb::ControllerExpandVolumeRequest {
            volume_id: "pvc-life".into(),
            capacity_range: Some(pb::CapacityRange { required_bytes: 1024 * MIB as i64, limit_bytes: 0 }),
            volume_capability: Some(mount_cap("")),
        };
        let ctl = c.ctl().expect("ctl");
        ballast_testkit::try_wait_until("meta notices node 3 is gone", Duration::from_secs(30), || {
            Ok(ctl.json(&["status"])?["nodes_up"].as_u64() == Some(3))
        })
        .expect("node 3 no longer up");
        let refused = d.controller.controller_expand_volume(expand.clone()).await;
        assert_eq!(code(refused), Code::ResourceExhausted, "a required zone spread with a zone lost");
        assert_eq!(c.inspect("pvc-life").expect("inspect")["volume"]["size_bytes"], 512 * MIB, "nothing grown");
        c.start_node(3).expect("restart node 3");
        ballast_testkit::try_wait_until("node 3 back up", Duration::from_secs(30), || {
            Ok(ctl.json(&["status"])?["nodes_up"].as_u64() == Some(4))
        })
        .expect("node 3 up");
        let before = statvfs_bytes(&target2);
        let exp = d.controller.controller_expand_volume(expand).await.expect("ControllerExpandVolume").into_inner();
        assert_eq!(exp.capacity_bytes, 1024 * MIB as i64);
        assert!(exp.node_expansion_required);
        let nexp = n2
            .node_expand_volume(pb::NodeExpandVolumeRequest {
                volume_id: "pvc-life".into(),
                volume_path: target2.display().to_string(),
                capacity_range: Some(pb::CapacityRange { required_bytes: 1024 * MIB as i64, limit_bytes: 0 }),
                staging_target_path: staging2.display().to_string(),
                volume_capability: Some(mount_cap("")),
            })
            .await
            .expect("NodeExpandVolume")
            .into_inner();
        assert_eq!(nexp.capacity_bytes, 1024 * MIB as i64);
        let after = statvfs_bytes(&target2);
        assert!(after > before + 400 * MIB, "the filesystem grew: {before} -> {after}");
        write_files(&target2, 32..40);
        check_files(&target2, 0..40);

        // Done with it: unstage, unpublish, delete; the chunks leave every live node.
        unstage_everything(&mut n2, "pvc-life", &staging2, &target2).await;
        assert_eq!(mounts_under(&host2), Vec::<String>::new());
        assert_eq!(loops_under(&c.path("csi-state2")), Vec::<String>::new());
        let delete = pb::DeleteVolumeRequest { volume_id: "pvc-life".into() };
        assert_eq!(code(d.controller.delete_volume(delete.clone()).await), Code::FailedPrecondition, "still published");
        d.controller
            .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
                volume_id: "pvc-life".into(),
                node_id: String::new(),
            })
            .await
            .expect("ControllerUnpublish from every node");
        d.controller.delete_volume(delete.clone()).await.expect("DeleteVolume");
        d.controller.delete_volume(delete).await.expect("DeleteVolume again (idempotent)");
        let chunk_files = |c: &Cluster| -> usize {
            [1u64, 2, 4]
                .iter()
                .map(|n| std::fs::read_dir(c.path(&format!("node{n}")).join("chunks")).map_or(0, |d| d.count()))
                .sum()
        };
        wait_until("chunk files reclaimed", Duration::from_secs(60), || chunk_files(&c) == 0).unwrap();
    });
}

#[test]
fn raw_block_volume_is_a_device_on_the_target() {
    let test = "raw_block_volume_is_a_device_on_the_target";
    if skip(test) {
        return;
    }
    let c = start_cluster("csi-block");
    let _leftovers = Leftovers(c.dir().to_path_buf());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut d = Driver::connect(&c).await;
        let req = create_req("blk", 128 * MIB as i64, block_cap(), &[("replicas", "3"), ("chunkSize", "16Mi")]);
        d.controller.create_volume(req).await.expect("CreateVolume");
        let publish = |node: &str| pb::ControllerPublishVolumeRequest {
            volume_id: "blk".into(),
            node_id: node.into(),
            volume_capability: Some(block_cap()),
            ..Default::default()
        };
        d.controller.controller_publish_volume(publish("4")).await.expect("publish");
        let host = c.path("host4");
        let (staging, target) = (host.join("staging/blk"), host.join("pods/dev/blk"));
        std::fs::create_dir_all(&staging).expect("staging");
        std::fs::create_dir_all(target.parent().expect("parent")).expect("pod dir");
        let mut n4 = d.node(4);
        n4.node_stage_volume(stage_req("blk", &staging, block_cap(), &HashMap::new())).await.expect("stage");
        n4.node_publish_volume(publish_req("blk", &staging, &target, block_cap())).await.expect("publish");
        // The target is a block device of the volume's size; write through it (direct I/O).
        let size = run_ok("blockdev", &["--getsize64", target.to_str().expect("utf8")]).expect("blockdev");
        assert_eq!(size.trim(), (128 * MIB).to_string());
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc_o_direct())
                .open(&target)
                .expect("open device");
            let buf = aligned(random_bytes(4 * MIB as usize, 7));
            f.seek(SeekFrom::Start(100 * MIB)).expect("seek");
            f.write_all(&buf).expect("write");
            f.sync_all().expect("fsync");
        }
        assert!(mounts_under(&staging).is_empty(), "raw block: nothing mounted on the staging path");
        unstage_everything(&mut n4, "blk", &staging, &target).await;
        assert_eq!(loops_under(&c.path("csi-state4")), Vec::<String>::new());

        // Read back on node 2.
        d.controller
            .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
                volume_id: "blk".into(),
                node_id: "4".into(),
            })
            .await
            .expect("unpublish");
        d.controller.controller_publish_volume(publish("2")).await.expect("publish on 2");
        let host = c.path("host2");
        let (staging, target) = (host.join("staging/blk"), host.join("pods/dev/blk"));
        std::fs::create_dir_all(&staging).expect("staging");
        std::fs::create_dir_all(target.parent().expect("parent")).expect("pod dir");
        let mut n2 = d.node(2);
        n2.node_stage_volume(stage_req("blk", &staging, block_cap(), &HashMap::new())).await.expect("stage on 2");
        n2.node_publish_volume(publish_req("blk", &staging, &target, block_cap())).await.expect("publish on 2");
        let mut got = vec![0u8; 4 * MIB as usize];
        let mut f = std::fs::File::open(&target).expect("open device");
        f.seek(SeekFrom::Start(100 * MIB)).expect("seek");
        f.read_exact(&mut got).expect("read");
        assert!(got == random_bytes(4 * MIB as usize, 7), "the pattern written on node 4 reads back on node 2");
        drop(f);
        unstage_everything(&mut n2, "blk", &staging, &target).await;
    });
}

fn libc_o_direct() -> i32 {
    0o40000 // O_DIRECT on x86_64 and aarch64 Linux
}

/// `data` in a 4 KiB-aligned buffer (O_DIRECT needs one).
fn aligned(data: Vec<u8>) -> AlignedBuf {
    AlignedBuf::from(data)
}

struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl From<Vec<u8>> for AlignedBuf {
    fn from(data: Vec<u8>) -> Self {
        let mut storage = vec![0u8; data.len() + 4096];
        let start = storage.as_ptr().align_offset(4096);
        storage[start..start + data.len()].copy_from_slice(&data);
        AlignedBuf { storage, start, len: data.len() }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

#[test]
fn a_restarted_node_stages_its_volumes_again() {
    let test = "a_restarted_node_stages_its_volumes_again";
    if skip(test) {
        return;
    }
    let mut c = start_cluster("csi-restart");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut d = Driver::connect(&c).await;
        let req = create_req("pvc-r", 512 * MIB as i64, mount_cap("xfs"), &[("replicas", "3"), ("minInSync", "2")]);
        d.controller.create_volume(req).await.expect("create");
        d.controller
            .controller_publish_volume(pb::ControllerPublishVolumeRequest {
                volume_id: "pvc-r".into(),
                node_id: "2".into(),
                volume_capability: Some(mount_cap("xfs")),
                ..Default::default()
            })
            .await
            .expect("publish");
        let host = c.path("host2");
        let (staging, target) = (host.join("staging/pvc-r"), host.join("pods/r/mount"));
        std::fs::create_dir_all(&staging).expect("staging");
        std::fs::create_dir_all(target.parent().expect("parent")).expect("pod dir");
        let mut n2 = d.node(2);
        n2.node_stage_volume(stage_req("pvc-r", &staging, mount_cap("xfs"), &HashMap::new())).await.expect("stage");
        n2.node_publish_volume(publish_req("pvc-r", &staging, &target, mount_cap("xfs"))).await.expect("publish");
        write_files(&target, 0..8);

        // The node process dies (its FUSE server with it) and comes back.
        c.kill_node(2).expect("kill node 2");
        c.start_node(2).expect("restart node 2");
        let sock = socket(c.dir(), 2);
        let mut n2 = NodeClient::new(channel(&sock).await);
        // The target works again once the node has staged the volume again.
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if std::fs::read(target.join("file0")).is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "the target never came back");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        check_files(&target, 0..8);
        write_files(&target, 8..12);
        unstage_everything(&mut n2, "pvc-r", &staging, &target).await;
        assert_eq!(mounts_under(&host), Vec::<String>::new());
        assert_eq!(mounts_under(&c.path("csi-state2")), Vec::<String>::new());
        assert_eq!(loops_under(&c.path("csi-state2")), Vec::<String>::new());
    });
}

#[test]
fn every_error_path_answers_with_the_spec_code() {
    let test = "every_error_path_answers_with_the_spec_code";
    if skip(test) {
        return;
    }
    let c = start_cluster("csi-errors");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut d = Driver::connect(&c).await;
        let ctl = &mut d.controller;
        let ok = [("replicas", "2")];

        // CreateVolume.
        assert_eq!(
            code(ctl.create_volume(create_req("", MIB as i64, mount_cap(""), &ok)).await),
            Code::InvalidArgument
        );
        let mut no_caps = create_req("v", MIB as i64, mount_cap(""), &ok);
        no_caps.volume_capabilities.clear();
        assert_eq!(code(ctl.create_volume(no_caps).await), Code::InvalidArgument);
        for (k, v) in [
            ("replicas", "9"),
            ("minInSync", "3"),
            ("chunkSize", "3k"),
            ("zoneSpread", "x"),
            ("zones", "z1,,z2"),
            ("zones", ""),
            ("colour", "blue"),
            ("csi.storage.k8s.io/fstype", "ntfs"),
        ] {
            let e = ctl
                .create_volume(create_req("v", MIB as i64, mount_cap(""), &[("replicas", "2"), (k, v)]))
                .await
                .expect_err(k);
            assert_eq!(e.code(), Code::InvalidArgument, "{k}={v}");
            assert!(e.message().contains(k.rsplit('/').next().unwrap_or(k)), "{k}: {}", e.message());
        }
        let mut multi = mount_cap("");
        multi.access_mode = Some(pb::volume_capability::AccessMode {
            mode: pb::volume_capability::access_mode::Mode::MultiNodeMultiWriter as i32,
        });
        assert_eq!(
            code(ctl.create_volume(create_req("v", MIB as i64, multi.clone(), &ok)).await),
            Code::InvalidArgument
        );
        let mut bad_range = create_req("v", 10 * MIB as i64, mount_cap(""), &ok);
        bad_range.capacity_range = Some(pb::CapacityRange { required_bytes: 10, limit_bytes: 5 });
        assert_eq!(code(ctl.create_volume(bad_range).await), Code::InvalidArgument);
        let mut tight = create_req("v", 5000, mount_cap(""), &ok);
        tight.capacity_range = Some(pb::CapacityRange { required_bytes: 5000, limit_bytes: 6000 });
        assert_eq!(code(ctl.create_volume(tight).await), Code::OutOfRange);
        let huge = create_req("huge", 1 << 50, mount_cap(""), &ok);
        assert_eq!(code(ctl.create_volume(huge).await), Code::ResourceExhausted);
        let mut clone = create_req("v", MIB as i64, mount_cap(""), &ok);
        clone.volume_content_source = Some(pb::VolumeContentSource {
            r#type: Some(pb::volume_content_source::Type::Volume(pb::volume_content_source::VolumeSource {
                volume_id: "x".into(),
            })),
        });
        // CLONE_VOLUME: an unknown source volume is NOT_FOUND (the spec's code).
        assert_eq!(code(ctl.create_volume(clone).await), Code::NotFound);
        // Replicas kept to z2 by the StorageClass; the requisite (z1) does not move them.
        let mut zoned = create_req("zoned", 64 * MIB as i64, mount_cap(""), &[("replicas", "1"), ("zones", "z2")]);
        zoned.accessibility_requirements = Some(requisite(&["z1"], &["z1"]));
        let v = ctl.create_volume(zoned).await.expect("zoned create").into_inner().volume.expect("volume");
        assert_eq!(topology_zones(&v), ["z1", "z2", "z3"], "reachable from every zone");
        let layout = c.inspect("zoned").expect("volume inspect");
        assert!(
            layout["chunks"].as_array().expect("chunks").iter().all(|ch| ch["replicas"][0]["node"].as_u64() == Some(2)),
            "placed in z2 only"
        );
        let required3 =
            create_req("spread", 64 * MIB as i64, mount_cap(""), &[("replicas", "4"), ("zoneSpread", "required")]);
        assert_eq!(
            code(ctl.create_volume(required3).await),
            Code::ResourceExhausted,
            "4 replicas cannot spread over 3 zones"
        );

        // Delete, publish, unpublish, validate, expand, get.
        assert_eq!(
            code(ctl.delete_volume(pb::DeleteVolumeRequest { volume_id: String::new() }).await),
            Code::InvalidArgument
        );
        ctl.delete_volume(pb::DeleteVolumeRequest { volume_id: "never-was".into() }).await.expect("missing volume: OK");
        let publish = |v: &str, n: &str, cap: Option<pb::VolumeCapability>| pb::ControllerPublishVolumeRequest {
            volume_id: v.into(),
            node_id: n.into(),
            volume_capability: cap,
            ..Default::default()
        };
        assert_eq!(
            code(ctl.controller_publish_volume(publish("", "1", Some(mount_cap("")))).await),
            Code::InvalidArgument
        );
        assert_eq!(
            code(ctl.controller_publish_volume(publish("zoned", "", Some(mount_cap("")))).await),
            Code::InvalidArgument
        );
        assert_eq!(code(ctl.controller_publish_volume(publish("zoned", "1", None)).await), Code::InvalidArgument);
        assert_eq!(
            code(ctl.controller_publish_volume(publish("never-was", "1", Some(mount_cap("")))).await),
            Code::NotFound
        );
        assert_eq!(
            code(ctl.controller_publish_volume(publish("zoned", "999", Some(mount_cap("")))).await),
            Code::NotFound
        );
        assert_eq!(
            code(ctl.controller_publish_volume(publish("zoned", "node-a", Some(mount_cap("")))).await),
            Code::NotFound
        );
        ctl.controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
            volume_id: "never-was".into(),
            node_id: "1".into(),
        })
        .await
        .expect("unpublish a missing volume: OK");
        let validate = |v: &str, caps: Vec<pb::VolumeCapability>| pb::ValidateVolumeCapabilitiesRequest {
            volume_id: v.into(),
            volume_capabilities: caps,
            ..Default::default()
        };
        assert_eq!(
            code(ctl.validate_volume_capabilities(validate("never-was", vec![mount_cap("")])).await),
            Code::NotFound
        );
        assert_eq!(code(ctl.validate_volume_capabilities(validate("zoned", vec![])).await), Code::InvalidArgument);
        let yes = ctl
            .validate_volume_capabilities(validate("zoned", vec![mount_cap("ext4")]))
            .await
            .expect("validate")
            .into_inner();
        assert!(yes.confirmed.is_some());
        let no = ctl.validate_volume_capabilities(validate("zoned", vec![multi])).await.expect("validate").into_inner();
        assert!(no.confirmed.is_none() && !no.message.is_empty());
        let expand = |v: &str, req: i64, limit: i64| pb::ControllerExpandVolumeRequest {
            volume_id: v.into(),
            capacity_range: Some(pb::CapacityRange { required_bytes: req, limit_bytes: limit }),
            volume_capability: None,
        };
        assert_eq!(code(ctl.controller_expand_volume(expand("never-was", 1 << 30, 0)).await), Code::NotFound);
        assert_eq!(
            code(ctl.controller_expand_volume(expand("zoned", 100 * MIB as i64, 100 * MIB as i64)).await),
            Code::OutOfRange
        );
        assert_eq!(
            code(ctl.controller_get_volume(pb::ControllerGetVolumeRequest { volume_id: "never-was".into() }).await),
            Code::NotFound
        );

        // ListVolumes pages in name order; an unknown token is ABORTED.
        for name in ["list-a", "list-b", "list-c"] {
            ctl.create_volume(create_req(
                name,
                16 * MIB as i64,
                mount_cap(""),
                &[("replicas", "1"), ("chunkSize", "16Mi")],
            ))
            .await
            .expect("create");
        }
        let mut names = Vec::new();
        let mut token = String::new();
        loop {
            let page = ctl
                .list_volumes(pb::ListVolumesRequest { max_entries: 2, starting_token: token.clone() })
                .await
                .expect("list")
                .into_inner();
            assert!(page.entries.len() <= 2);
            names.extend(page.entries.iter().map(|e| e.volume.as_ref().expect("volume").volume_id.clone()));
            if page.next_token.is_empty() {
                break;
            }
            token = page.next_token;
        }
        assert_eq!(names, ["list-a", "list-b", "list-c", "zoned"]);
        // Only tokens the plugin issued: not a volume name (what tokens used to be),
        // nor an issued one cut short or edited, nor garbage.
        let issued = ctl
            .list_volumes(pb::ListVolumesRequest { max_entries: 1, starting_token: String::new() })
            .await
            .expect("list")
            .into_inner()
            .next_token;
        let edited = format!("{}{}", &issued[..issued.len() - 1], if issued.ends_with('0') { '1' } else { '0' });
        for forged in ["$$$", "list-a", "zoned", &issued[..issued.len() - 1], &edited, &issued.to_uppercase()] {
            assert_eq!(
                code(ctl.list_volumes(pb::ListVolumesRequest { max_entries: 2, starting_token: forged.into() }).await),
                Code::Aborted,
                "{forged:?}"
            );
        }
        let rest = ctl
            .list_volumes(pb::ListVolumesRequest { max_entries: 0, starting_token: issued })
            .await
            .expect("an issued token")
            .into_inner();
        let rest: Vec<&str> =
            rest.entries.iter().map(|e| e.volume.as_ref().expect("volume").volume_id.as_str()).collect();
        assert_eq!(rest, ["list-b", "list-c", "zoned"]);
        assert_eq!(
            code(ctl.list_volumes(pb::ListVolumesRequest { max_entries: -1, starting_token: String::new() }).await),
            Code::InvalidArgument
        );
        // Capacity: the topology does not narrow it (replicas go to every zone), the
        // zones parameter does. Four nodes of 20G, thin at the default 200%
        // over-provisioning: 40G of room each, less what is placed.
        let capacity = |p: &[(&str, &str)], zone: &str| pb::GetCapacityRequest {
            parameters: params(p),
            accessible_topology: Some(pb::Topology { segments: params(&[("topology.ballast.io/zone", zone)]) }),
            ..Default::default()
        };
        let cap = ctl.get_capacity(capacity(&[("replicas", "2")], "z3")).await.expect("capacity").into_inner();
        assert!(cap.available_capacity > 60 << 30 && cap.available_capacity <= 80 << 30, "{cap:?}");
        let only_z3 = capacity(&[("replicas", "1"), ("zones", "z3")], "z1");
        let cap = ctl.get_capacity(only_z3).await.expect("capacity").into_inner();
        assert!(cap.available_capacity > 20 << 30 && cap.available_capacity <= 40 << 30, "{cap:?}");
        assert_eq!(
            code(
                ctl.get_capacity(pb::GetCapacityRequest {
                    parameters: params(&[("replicas", "0")]),
                    ..Default::default()
                })
                .await
            ),
            Code::InvalidArgument
        );

        // Node service.
        let mut n1 = d.node(1);
        let staging = c.path("host1/staging/x");
        let target = c.path("host1/pods/x/mount");
        std::fs::create_dir_all(&staging).expect("staging");
        let mut no_path = stage_req("zoned", &staging, mount_cap(""), &HashMap::new());
        no_path.staging_target_path.clear();
        assert_eq!(code(n1.node_stage_volume(no_path).await), Code::InvalidArgument);
        let mut no_cap = stage_req("zoned", &staging, mount_cap(""), &HashMap::new());
        no_cap.volume_capability = None;
        assert_eq!(code(n1.node_stage_volume(no_cap).await), Code::InvalidArgument);
        assert_eq!(
            code(n1.node_stage_volume(stage_req("", &staging, mount_cap(""), &HashMap::new())).await),
            Code::InvalidArgument
        );
        assert_eq!(
            code(n1.node_stage_volume(stage_req("never-was", &staging, mount_cap(""), &HashMap::new())).await),
            Code::NotFound
        );
        assert_eq!(
            code(n1.node_publish_volume(publish_req("zoned", &staging, &target, mount_cap(""))).await),
            Code::FailedPrecondition,
            "not staged"
        );
        assert_eq!(
            code(n1.node_publish_volume(publish_req("zoned", &staging, Path::new(""), mount_cap(""))).await),
            Code::InvalidArgument
        );
        let stats = pb::NodeGetVolumeStatsRequest {
            volume_id: "zoned".into(),
            volume_path: target.display().to_string(),
            ..Default::default()
        };
        assert_eq!(code(n1.node_get_volume_stats(stats).await), Code::NotFound);
        let expand = pb::NodeExpandVolumeRequest {
            volume_id: "zoned".into(),
            volume_path: target.display().to_string(),
            ..Default::default()
        };
        assert_eq!(code(n1.node_expand_volume(expand).await), Code::NotFound);
        n1.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: "zoned".into(),
            target_path: target.display().to_string(),
        })
        .await
        .expect("unpublish what was never published: OK");
        n1.node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: "zoned".into(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .expect("unstage what was never staged: OK");
        assert!(mounts_under(&c.path("csi-state1")).is_empty(), "a failed stage leaves no FUSE mount");
    });
}

/// CreateVolume as the external-provisioner calls it with WaitForFirstConsumer:
/// the requisite is where the volume must be reachable from (with
/// `--strict-topology`, just the selected node's zone, as NodeGetInfo reported
/// it), which never limits where meta puts the replicas; the StorageClass's
/// `zones` does. The volume is accessible from every zone, so its PV's node
/// affinity lets the pod move to another zone.
#[test]
fn topology_says_where_a_volume_is_reachable_from_and_zones_where_it_lives() {
    let test = "topology_says_where_a_volume_is_reachable_from_and_zones_where_it_lives";
    if skip(test) {
        return;
    }
    let c = start_cluster("csi-topology");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut d = Driver::connect(&c).await;
        let all = ["z1", "z2", "z3"];
        let spread = [("replicas", "3"), ("zoneSpread", "required"), ("chunkSize", "16Mi")];
        let spread_over_three = |c: &Cluster, name: &str| {
            let chunks = replica_zones(c, name);
            assert_eq!(chunks.len(), 4, "64 MiB in 16 MiB chunks");
            for zones in chunks {
                let distinct: std::collections::BTreeSet<&str> = zones.iter().copied().collect();
                assert_eq!((zones.len(), distinct.len()), (3, 3), "{name}: one replica per zone: {zones:?}");
            }
        };

        // --strict-topology: the requisite is the pod's node's topology, verbatim.
        let ni = d.node(4).node_get_info(pb::NodeGetInfoRequest {}).await.expect("NodeGetInfo").into_inner();
        let node_topology = ni.accessible_topology.expect("NodeGetInfo reports a topology");
        assert_eq!(node_topology.segments, params(&[("topology.ballast.io/zone", "z1")]));
        let mut strict = create_req("pvc-strict", 64 * MIB as i64, mount_cap(""), &spread);
        strict.accessibility_requirements =
            Some(pb::TopologyRequirement { requisite: vec![node_topology.clone()], preferred: vec![node_topology] });
        let v = d
            .controller
            .create_volume(strict.clone())
            .await
            .expect("strict topology")
            .into_inner()
            .volume
            .expect("volume");
        assert_eq!(topology_zones(&v), all, "accessible from every zone, not only the pod's");
        spread_over_three(&c, "pvc-strict");
        // A retry after the scheduler picked a node elsewhere is the same volume.
        strict.accessibility_requirements = Some(requisite(&["z3"], &["z3"]));
        let again =
            d.controller.create_volume(strict).await.expect("retry, another zone").into_inner().volume.expect("volume");
        assert_eq!((again.volume_id.as_str(), topology_zones(&again)), ("pvc-strict", all.map(String::from).to_vec()));

        // Without --strict-topology: every zone with nodes, the selected one first.
        let mut loose = create_req("pvc-loose", 64 * MIB as i64, mount_cap(""), &spread);
        loose.accessibility_requirements = Some(requisite(&["z2", "z1", "z3"], &["z2", "z1", "z3"]));
        let v = d.controller.create_volume(loose).await.expect("loose topology").into_inner().volume.expect("volume");
        assert_eq!(topology_zones(&v), all);
        spread_over_three(&c, "pvc-loose");
        // A zone the CO has a node of this plugin in that meta has no storage node in
        // is reachable too (over the network), and must be among the answer.
        let mut new_zone = create_req("pvc-z9", 64 * MIB as i64, mount_cap(""), &spread);
        new_zone.accessibility_requirements = Some(requisite(&["z9"], &[]));
        let v = d.controller.create_volume(new_zone).await.expect("requisite z9").into_inner().volume.expect("volume");
        assert_eq!(topology_zones(&v), ["z1", "z2", "z3", "z9"]);
        spread_over_three(&c, "pvc-z9");
        // A requisite without Ballast's key cannot be met.
        let mut foreign = create_req("pvc-foreign", 64 * MIB as i64, mount_cap(""), &spread);
        foreign.accessibility_requirements = Some(pb::TopologyRequirement {
            requisite: vec![pb::Topology { segments: params(&[("topology.kubernetes.io/zone", "z1")]) }],
            preferred: vec![],
        });
        assert_eq!(code(d.controller.create_volume(foreign).await), Code::InvalidArgument);

        // `zones` keeps the replicas to z1 and z2 (never z3's node 3), one per zone;
        // the volume is still reachable from z3.
        let kept = [("replicas", "2"), ("zoneSpread", "required"), ("chunkSize", "16Mi"), ("zones", "z2, z1")];
        let mut req = create_req("pvc-kept", 64 * MIB as i64, mount_cap(""), &kept);
        req.accessibility_requirements = Some(requisite(&["z3"], &["z3"]));
        let v =
            d.controller.create_volume(req.clone()).await.expect("zones z1,z2").into_inner().volume.expect("volume");
        assert_eq!(topology_zones(&v), all);
        for zones in replica_zones(&c, "pvc-kept") {
            let mut zones = zones.clone();
            zones.sort();
            assert_eq!(zones, ["z1", "z2"]);
        }
        let same = [("replicas", "2"), ("zoneSpread", "required"), ("chunkSize", "16Mi"), ("zones", "z1,z2")];
        d.controller
            .create_volume(create_req("pvc-kept", 64 * MIB as i64, mount_cap(""), &same))
            .await
            .expect("the same zones in another order: the same volume");
        let other = [("replicas", "2"), ("zoneSpread", "required"), ("chunkSize", "16Mi"), ("zones", "z1,z3")];
        assert_eq!(
            code(d.controller.create_volume(create_req("pvc-kept", 64 * MIB as i64, mount_cap(""), &other)).await),
            Code::AlreadyExists
        );
        let got = d
            .controller
            .controller_get_volume(pb::ControllerGetVolumeRequest { volume_id: "pvc-kept".into() })
            .await
            .expect("ControllerGetVolume")
            .into_inner();
        assert_eq!(topology_zones(got.volume.as_ref().expect("volume")), all);
        // Two replicas in distinct zones with only z3 allowed: refused, and the
        // message says which zones it looked in.
        let one_zone = [("replicas", "2"), ("zoneSpread", "required"), ("zones", "z3")];
        let e = d
            .controller
            .create_volume(create_req("pvc-one-zone", 64 * MIB as i64, mount_cap(""), &one_zone))
            .await
            .expect_err("one zone for two replicas");
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains("z3"), "{}", e.message());
        let e = d
            .controller
            .create_volume(create_req("pvc-bad-zones", 64 * MIB as i64, mount_cap(""), &[("zones", "z1,")]))
            .await
            .expect_err("an empty entry");
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("zones"), "{}", e.message());
    });
}

fn snapshot_req(name: &str, volume: &str) -> pb::CreateSnapshotRequest {
    pb::CreateSnapshotRequest { source_volume_id: volume.into(), name: name.into(), parameters: HashMap::new() }
}

fn list_req(volume: &str, snapshot: &str, max: i32, token: &str) -> pb::ListSnapshotsRequest {
    pb::ListSnapshotsRequest {
        max_entries: max,
        starting_token: token.into(),
        source_volume_id: volume.into(),
        snapshot_id: snapshot.into(),
    }
}

/// The CSI snapshot RPCs against the real controller process and meta: of a
/// detached volume (ready at once) and of one attached through `ballast
/// export` (its front end takes it within a layout poll, while CreateSnapshot
/// waits); idempotency, listing by id and by source with paging, and every
/// refusal with the spec's code.
#[test]
fn snapshots_through_csi_answer_with_the_spec_codes() {
    if skip("snapshots_through_csi_answer_with_the_spec_codes") {
        return;
    }
    let c = start_cluster("csi-snap");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut d = Driver::connect(&c).await;
        let ctl = &mut d.controller;
        let caps = ctl
            .controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {})
            .await
            .expect("capabilities")
            .into_inner();
        let rpcs: Vec<i32> = caps
            .capabilities
            .iter()
            .filter_map(|c| c.r#type.as_ref().map(|pb::controller_service_capability::Type::Rpc(r)| r.r#type))
            .collect();
        use pb::controller_service_capability::rpc::Type as Rpc;
        for want in [Rpc::CreateDeleteSnapshot, Rpc::ListSnapshots] {
            assert!(rpcs.contains(&(want as i32)), "{want:?} advertised: {rpcs:?}");
        }
        let sc = [("replicas", "3"), ("minInSync", "2"), ("chunkSize", "16Mi")];
        for name in ["pvc-snap", "pvc-other"] {
            ctl.create_volume(create_req(name, 64 * MIB as i64, mount_cap(""), &sc)).await.expect("CreateVolume");
        }

        // Detached: ready in the first answer; a retry is the same snapshot.
        let a = ctl.create_snapshot(snapshot_req("snap-a", "pvc-snap")).await.expect("CreateSnapshot");
        let a = a.into_inner().snapshot.expect("snapshot");
        assert_eq!((a.snapshot_id.as_str(), a.source_volume_id.as_str()), ("snap-a", "pvc-snap"));
        assert_eq!((a.size_bytes, a.ready_to_use), (64 * MIB as i64, true));
        assert!(a.creation_time.is_some_and(|t| t.seconds > 1_700_000_000), "{a:?}");
        let again = ctl.create_snapshot(snapshot_req("snap-a", "pvc-snap")).await.expect("retry").into_inner();
        assert_eq!(again.snapshot.as_ref(), Some(&a), "a retry answers the same snapshot");

        // Attached through a front end: CreateSnapshot waits for it.
        let (_export, _uri) = c.export("pvc-snap", 1).expect("export");
        let t = Instant::now();
        let b = ctl.create_snapshot(snapshot_req("snap-b", "pvc-snap")).await.expect("CreateSnapshot attached");
        let b = b.into_inner().snapshot.expect("snapshot");
        assert!(b.ready_to_use, "taken by the front end within CreateSnapshot's wait ({:?}): {b:?}", t.elapsed());
        eprintln!("CreateSnapshot of an attached volume: ready after {:?}", t.elapsed());
        let other = ctl.create_snapshot(snapshot_req("snap-c", "pvc-other")).await.expect("another volume's");
        assert!(other.into_inner().snapshot.expect("snapshot").ready_to_use);

        // Refusals, each with the spec's code, nothing created.
        assert_eq!(code(ctl.create_snapshot(snapshot_req("snap-a", "pvc-other")).await), Code::AlreadyExists);
        assert_eq!(code(ctl.create_snapshot(snapshot_req("snap-x", "never-was")).await), Code::NotFound);
        assert_eq!(code(ctl.create_snapshot(snapshot_req("", "pvc-snap")).await), Code::InvalidArgument);
        assert_eq!(code(ctl.create_snapshot(snapshot_req("snap-x", "")).await), Code::InvalidArgument);
        let mut params = snapshot_req("snap-x", "pvc-snap");
        params.parameters.insert("incremental".into(), "true".into());
        assert_eq!(code(ctl.create_snapshot(params).await), Code::InvalidArgument);
        let mut theirs = snapshot_req("snap-d", "pvc-snap");
        theirs.parameters.insert("csi.storage.k8s.io/volumesnapshot/name".into(), "daily".into());
        ctl.create_snapshot(theirs).await.expect("the snapshotter's own parameters are accepted");

        // ListSnapshots: all, by source, by id, paged; unknowns list nothing.
        let ids = |r: pb::ListSnapshotsResponse| -> Vec<String> {
            r.entries.into_iter().filter_map(|e| e.snapshot).map(|s| s.snapshot_id).collect()
        };
        let all = ids(ctl.list_snapshots(list_req("", "", 0, "")).await.expect("list").into_inner());
        assert_eq!(all, ["snap-a", "snap-b", "snap-c", "snap-d"]);
        let of = ids(ctl.list_snapshots(list_req("pvc-snap", "", 0, "")).await.expect("by source").into_inner());
        assert_eq!(of, ["snap-a", "snap-b", "snap-d"]);
        let one = ids(ctl.list_snapshots(list_req("", "snap-c", 0, "")).await.expect("by id").into_inner());
        assert_eq!(one, ["snap-c"]);
        let (mut paged, mut token) = (Vec::new(), String::new());
        loop {
            let page = ctl.list_snapshots(list_req("", "", 1, &token)).await.expect("page").into_inner();
            assert!(page.entries.len() <= 1);
            token = page.next_token.clone();
            paged.extend(ids(page));
            if token.is_empty() {
                break;
            }
        }
        assert_eq!(paged, all, "paging one at a time lists each once");
        for (v, s) in [("never-was", ""), ("", "never-was")] {
            assert!(ctl.list_snapshots(list_req(v, s, 0, "")).await.expect("unknown").into_inner().entries.is_empty());
        }
        assert_eq!(code(ctl.list_snapshots(list_req("", "", -1, "")).await), Code::InvalidArgument);
        assert_eq!(code(ctl.list_snapshots(list_req("", "", 0, "garbage")).await), Code::Aborted);

        // CreateVolume from a snapshot (a restore): the snapshot's size when
        // none is asked, larger on request; the source echoed; OUT_OF_RANGE
        // when capped below the snapshot, NOT_FOUND for an unknown one.
        use pb::volume_content_source::{SnapshotSource, Type, VolumeSource};
        let from = |name: &str, bytes: i64, limit: i64, source: Type| {
            let mut r = create_req(name, bytes, mount_cap(""), &sc);
            r.capacity_range = Some(pb::CapacityRange { required_bytes: bytes, limit_bytes: limit });
            r.volume_content_source = Some(pb::VolumeContentSource { r#type: Some(source) });
            r
        };
        let snap = |id: &str| Type::Snapshot(SnapshotSource { snapshot_id: id.into() });
        let restored = ctl.create_volume(from("pvc-restored", 0, 0, snap("snap-a"))).await.expect("restore");
        let restored = restored.into_inner().volume.expect("volume");
        assert_eq!(restored.capacity_bytes, 64 * MIB as i64, "the snapshot's size");
        assert_eq!(restored.content_source.and_then(|s| s.r#type), Some(snap("snap-a")), "the source is echoed");
        let again = ctl.create_volume(from("pvc-restored", 0, 0, snap("snap-a"))).await.expect("retry");
        assert_eq!(again.into_inner().volume.map(|v| v.volume_id), Some("pvc-restored".into()));
        assert_eq!(code(ctl.create_volume(from("pvc-restored", 0, 0, snap("snap-b"))).await), Code::AlreadyExists);
        let larger = ctl.create_volume(from("pvc-larger", 128 * MIB as i64, 0, snap("snap-b"))).await.expect("larger");
        assert_eq!(larger.into_inner().volume.map(|v| v.capacity_bytes), Some(128 * MIB as i64));
        assert_eq!(
            code(ctl.create_volume(from("pvc-small", 0, 32 * MIB as i64, snap("snap-a"))).await),
            Code::OutOfRange
        );
        assert_eq!(code(ctl.create_volume(from("pvc-x", 0, 0, snap("never-was"))).await), Code::NotFound);
        assert_eq!(code(ctl.create_volume(from("pvc-x", 0, 0, snap(""))).await), Code::InvalidArgument);
        // CreateVolume from a volume (CLONE_VOLUME), here an attached one:
        // answered once the snapshot meta makes of it is taken; the source
        // echoed; the same codes; that snapshot is not listed.
        assert!(rpcs.contains(&(Rpc::CloneVolume as i32)), "CLONE_VOLUME advertised: {rpcs:?}");
        let vol = |id: &str| Type::Volume(VolumeSource { volume_id: id.into() });
        let t = Instant::now();
        let cloned = ctl.create_volume(from("pvc-clone", 0, 0, vol("pvc-snap"))).await.expect("clone");
        eprintln!("CreateVolume from an attached volume: answered after {:?}", t.elapsed());
        let cloned = cloned.into_inner().volume.expect("volume");
        assert_eq!(cloned.capacity_bytes, 64 * MIB as i64, "the source's size");
        assert_eq!(cloned.content_source.and_then(|s| s.r#type), Some(vol("pvc-snap")), "the source is echoed");
        let again = ctl.create_volume(from("pvc-clone", 0, 0, vol("pvc-snap"))).await.expect("retry");
        assert_eq!(again.into_inner().volume.map(|v| v.volume_id), Some("pvc-clone".into()));
        assert_eq!(code(ctl.create_volume(from("pvc-clone", 0, 0, snap("snap-a"))).await), Code::AlreadyExists);
        assert_eq!(code(ctl.create_volume(from("pvc-x", 0, 32 * MIB as i64, vol("pvc-snap"))).await), Code::OutOfRange);
        assert_eq!(code(ctl.create_volume(from("pvc-x", 0, 0, vol("never-was"))).await), Code::NotFound);
        assert_eq!(code(ctl.create_volume(from("pvc-x", 0, 0, vol(""))).await), Code::InvalidArgument);
        let listed = ids(ctl.list_snapshots(list_req("", "", 0, "")).await.expect("list").into_inner());
        assert_eq!(listed, all, "the clone's snapshot is meta's, not listed");
        // A clone that is not needed any more goes, and its snapshot with it.
        ctl.delete_volume(pb::DeleteVolumeRequest { volume_id: "pvc-clone".into() }).await.expect("delete the clone");
        // A snapshot a restore still copies from is not deleted (nothing has
        // attached the restores yet, and these nodes fill no clone in the
        // background); the restores go, then it can.
        let dels = |id: &str| pb::DeleteSnapshotRequest { snapshot_id: id.into() };
        assert_eq!(code(ctl.delete_snapshot(dels("snap-a")).await), Code::FailedPrecondition);
        let del = |id: &str| pb::DeleteVolumeRequest { volume_id: id.into() };
        for id in ["pvc-restored", "pvc-larger"] {
            ctl.delete_volume(del(id)).await.expect("delete a restore");
        }

        // A volume with snapshots is not deleted: they are layers of its chunks.
        assert_eq!(code(ctl.delete_volume(del("pvc-other")).await), Code::FailedPrecondition);

        // DeleteSnapshot: idempotent; then the volume goes.
        assert_eq!(code(ctl.delete_snapshot(dels("")).await), Code::InvalidArgument);
        for id in ["snap-c", "snap-c", "never-was"] {
            ctl.delete_snapshot(dels(id)).await.expect("DeleteSnapshot (idempotent)");
        }
        ctl.delete_volume(del("pvc-other")).await.expect("DeleteVolume once its snapshots are gone");
        for id in ["snap-a", "snap-b", "snap-d"] {
            ctl.delete_snapshot(dels(id)).await.expect("DeleteSnapshot");
        }
        assert!(ctl.list_snapshots(list_req("", "", 0, "")).await.expect("list").into_inner().entries.is_empty());
    });
}
