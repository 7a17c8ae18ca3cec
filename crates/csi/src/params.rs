//! StorageClass parameters, volume capabilities and capacity ranges: everything a
//! CSI request carries that Ballast must check before it acts. Every refusal is an
//! `InvalidArgument` (or `OutOfRange`) naming the offending parameter.

use std::collections::HashMap;

use ballast_attach::fs::FsType;
use ballast_metaclient::pb as meta;
use ballast_types::units::parse_size;
use tonic::Status;

use crate::pb;
use crate::pb::volume_capability::access_mode::Mode;
use crate::pb::volume_capability::AccessType;

/// StorageClass parameter keys (see csi/README.md).
pub const REPLICAS: &str = "replicas";
pub const MIN_IN_SYNC: &str = "minInSync";
pub const CHUNK_SIZE: &str = "chunkSize";
pub const ZONE_SPREAD: &str = "zoneSpread";
/// The zones replicas may be placed in (comma-separated); absent: any zone.
pub const ZONES: &str = "zones";
/// The external-provisioner passes the StorageClass's fsType under this key.
pub const FS_TYPE: &str = "csi.storage.k8s.io/fstype";
/// Volume-context key for the filesystem type, read back by NodeStage.
pub const CONTEXT_FS_TYPE: &str = "fsType";

/// Default size of a volume created with no capacity range.
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// Ballast's block size: every volume size is a multiple of it.
pub const BLOCK: u64 = 4096;
const DEFAULT_CHUNK: u64 = 64 << 20;

/// A parsed StorageClass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeParams {
    pub replicas: u32,
    pub min_in_sync: u32,
    pub chunk_size: u64,
    pub zone_spread: meta::ZoneSpread,
    /// The only zones replicas may be placed in, sorted and without duplicates
    /// (meta keeps them as given and compares them on a retry); empty: any zone.
    /// Where replicas live only: the volume is reachable from every zone.
    pub zones: Vec<String>,
    pub fs_type: FsType,
}

fn invalid(param: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("invalid parameter {param}: {reason}"))
}

impl VolumeParams {
    /// Parses and checks `parameters`. Keys the provisioner adds on its own
    /// (`csi.storage.k8s.io/*`, with `--extra-create-metadata` the PVC's name and
    /// namespace) are accepted; any other unknown key is an error, so a typo in a
    /// StorageClass never silently falls back to a default.
    pub fn parse(parameters: &HashMap<String, String>) -> Result<VolumeParams, Status> {
        for key in parameters.keys() {
            let known = matches!(key.as_str(), REPLICAS | MIN_IN_SYNC | CHUNK_SIZE | ZONE_SPREAD | ZONES)
                || key.starts_with("csi.storage.k8s.io/");
            if !known {
                return Err(invalid(
                    key,
                    "unknown parameter (known: replicas, minInSync, chunkSize, zoneSpread, zones, csi.storage.k8s.io/fstype)",
                ));
            }
        }
        let get = |k: &str| parameters.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        let replicas = match get(REPLICAS) {
            None => 3,
            Some(v) => match v.parse::<u32>() {
                Ok(n @ 1..=5) => n,
                _ => return Err(invalid(REPLICAS, format!("{v:?} is not a whole number from 1 to 5"))),
            },
        };
        let min_in_sync = match get(MIN_IN_SYNC) {
            None => replicas / 2 + 1,
            Some(v) => match v.parse::<u32>() {
                Ok(n) if (1..=replicas).contains(&n) => n,
                _ => {
                    return Err(invalid(
                        MIN_IN_SYNC,
                        format!("{v:?} is not a whole number from 1 to replicas ({replicas})"),
                    ))
                }
            },
        };
        let chunk_size = match get(CHUNK_SIZE) {
            None => DEFAULT_CHUNK,
            Some(v) => match parse_size(v) {
                Ok(n) if (1 << 20..=1 << 32).contains(&n) && n.is_multiple_of(BLOCK) => n,
                Ok(n) => return Err(invalid(CHUNK_SIZE, format!("{n} bytes: must be 1Mi to 4Gi, a multiple of 4Ki"))),
                Err(e) => return Err(invalid(CHUNK_SIZE, e)),
            },
        };
        let zone_spread = match get(ZONE_SPREAD) {
            None | Some("preferred") => meta::ZoneSpread::Preferred,
            Some("required") => meta::ZoneSpread::Required,
            Some(v) => return Err(invalid(ZONE_SPREAD, format!("{v:?} is neither \"required\" nor \"preferred\""))),
        };
        // Not through `get`: a `zones` that names no zone is a mistake to report,
        // not "any zone" (which is what leaving the parameter out says).
        let zones = match parameters.get(ZONES) {
            None => Vec::new(),
            Some(v) => parse_zones(v)?,
        };
        let fs_type = match get(FS_TYPE) {
            None => FsType::Ext4,
            Some(v) => parse_fs_type(FS_TYPE, v)?,
        };
        Ok(VolumeParams { replicas, min_in_sync, chunk_size, zone_spread, zones, fs_type })
    }

    /// Whether an existing volume was made with these parameters (CreateVolume's
    /// idempotency: same name and parameters is the same volume).
    pub fn matches(&self, v: &meta::Volume) -> bool {
        v.replicas == self.replicas
            && v.min_in_sync == self.min_in_sync
            && v.chunk_size_bytes == self.chunk_size
            && v.zone_spread == self.zone_spread as i32
            && v.zones == self.zones
    }
}

/// The `zones` parameter: comma-separated zone names (spaces around a name are
/// ignored), sorted and deduplicated. Every name must be a valid CSI topology
/// segment value, the form NodeGetInfo reports a zone in (and Kubernetes'
/// `topology.kubernetes.io/zone` label has): 1 to 63 characters of
/// `[A-Za-z0-9._-]`, beginning and ending with a letter or digit. An empty entry
/// (`"a,,b"`, a trailing comma, an empty value) is refused.
pub fn parse_zones(v: &str) -> Result<Vec<String>, Status> {
    let mut zones = std::collections::BTreeSet::new();
    for (i, z) in v.split(',').map(str::trim).enumerate() {
        if z.is_empty() {
            return Err(invalid(
                ZONES,
                format!("{v:?}: entry {} is empty (expected zone names, comma-separated)", i + 1),
            ));
        }
        if !is_segment_value(z) {
            return Err(invalid(
                ZONES,
                format!("{z:?} is not a zone name (1 to 63 of A-Z a-z 0-9 . _ -, a letter or digit first and last)"),
            ));
        }
        zones.insert(z.to_string());
    }
    Ok(zones.into_iter().collect())
}

/// A CSI topology segment value (the spec's rule, which is also that of a
/// Kubernetes label value, minus the empty one).
fn is_segment_value(s: &str) -> bool {
    let b = s.as_bytes();
    let edge = |c: &u8| c.is_ascii_alphanumeric();
    (1..=63).contains(&b.len())
        && b.first().is_some_and(edge)
        && b.last().is_some_and(edge)
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

pub fn parse_fs_type(param: &str, v: &str) -> Result<FsType, Status> {
    v.parse::<FsType>().map_err(|_| invalid(param, format!("{v:?}: Ballast formats ext4 or xfs")))
}

/// The size to create for `range`: the required bytes (or 1 GiB) rounded up to
/// whole chunks, so the volume can grow later; when that exceeds the limit, to
/// whole 4 KiB blocks (such a volume cannot grow). OutOfRange when no size fits.
pub fn create_size(range: Option<&pb::CapacityRange>, chunk: u64) -> Result<u64, Status> {
    let (required, limit) = bounds(range)?;
    let want = if required == 0 { DEFAULT_SIZE.min(limit.unwrap_or(u64::MAX)) } else { required };
    let whole_chunks = want.div_ceil(chunk).saturating_mul(chunk);
    let whole_blocks = want.div_ceil(BLOCK).saturating_mul(BLOCK);
    let size = match limit {
        None => whole_chunks,
        Some(l) if whole_chunks <= l => whole_chunks,
        Some(l) if whole_blocks <= l && whole_blocks > 0 => whole_blocks,
        Some(l) => {
            return Err(Status::out_of_range(format!(
                "capacity_range: no size of whole 4 KiB blocks between {required} and {l} bytes"
            )))
        }
    };
    if size == 0 {
        return Err(Status::out_of_range("capacity_range: the limit leaves no room for one 4 KiB block"));
    }
    Ok(size)
}

/// The size to grow to for `range` (whole chunks), or None when `current` already
/// satisfies it. OutOfRange when the limit is below what growth needs.
pub fn expand_size(range: Option<&pb::CapacityRange>, current: u64, chunk: u64) -> Result<Option<u64>, Status> {
    if range.is_none() {
        return Err(Status::invalid_argument("capacity_range is required"));
    }
    let (required, limit) = bounds(range)?;
    if required <= current {
        return Ok(None);
    }
    let size = required.div_ceil(chunk).saturating_mul(chunk);
    match limit {
        Some(l) if size > l => Err(Status::out_of_range(format!(
            "capacity_range: growing to {required} bytes needs whole {chunk}-byte chunks ({size} bytes), above the limit of {l}"
        ))),
        _ => Ok(Some(size)),
    }
}

/// (required, limit) from a capacity range; a zero limit means none.
fn bounds(range: Option<&pb::CapacityRange>) -> Result<(u64, Option<u64>), Status> {
    let Some(r) = range else { return Ok((0, None)) };
    if r.required_bytes < 0 || r.limit_bytes < 0 {
        return Err(Status::invalid_argument("capacity_range: bytes must not be negative"));
    }
    let (required, limit) = (r.required_bytes as u64, (r.limit_bytes > 0).then_some(r.limit_bytes as u64));
    if let Some(l) = limit {
        if required > l {
            return Err(Status::invalid_argument(format!(
                "capacity_range: required_bytes {required} exceeds limit_bytes {l}"
            )));
        }
    }
    Ok((required, limit))
}

/// How a capability wants the volume: a raw block device, or a filesystem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    Block,
    Mount { fs_type: Option<FsType>, flags: Vec<String> },
}

/// Checks one capability: an access type and a single-node access mode.
/// Ballast volumes are attached by one front end at a time (the epoch fences any
/// other), so multi-node modes are refused.
pub fn check_capability(c: &pb::VolumeCapability) -> Result<Access, String> {
    let mode = c.access_mode.as_ref().map(|m| m.mode()).unwrap_or(Mode::Unknown);
    match mode {
        // Kubernetes' ReadWriteOnce is SINGLE_NODE_MULTI_WRITER (several pods of one
        // node), ReadWriteOncePod SINGLE_NODE_SINGLE_WRITER: both one node.
        Mode::SingleNodeWriter
        | Mode::SingleNodeReaderOnly
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter => {}
        Mode::Unknown => return Err("access_mode is missing".into()),
        other => {
            return Err(format!("access mode {} is not supported: a volume has one writer node", other.as_str_name()))
        }
    }
    match &c.access_type {
        Some(AccessType::Block(_)) => Ok(Access::Block),
        Some(AccessType::Mount(m)) => {
            let fs_type = match m.fs_type.trim() {
                "" => None,
                v => Some(v.parse::<FsType>().map_err(|_| format!("fs_type {v:?} is not supported (ext4, xfs)"))?),
            };
            if !m.volume_mount_group.is_empty() {
                return Err("volume_mount_group is not supported".into());
            }
            Ok(Access::Mount { fs_type, flags: m.mount_flags.clone() })
        }
        None => Err("access_type (block or mount) is missing".into()),
    }
}

/// Checks one capability of a request; InvalidArgument naming the field.
pub fn capability_arg(field: &str, c: &pb::VolumeCapability) -> Result<Access, Status> {
    check_capability(c).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

/// A capability the request must carry, checked; InvalidArgument naming the field.
pub fn required_capability<'a>(
    field: &str,
    c: Option<&'a pb::VolumeCapability>,
) -> Result<(&'a pb::VolumeCapability, Access), Status> {
    let c = c.ok_or_else(|| Status::invalid_argument(format!("{field} is required")))?;
    Ok((c, capability_arg(field, c)?))
}

/// Checks a request's capability list; InvalidArgument naming the field.
pub fn check_capabilities(field: &str, caps: &[pb::VolumeCapability]) -> Result<Vec<Access>, Status> {
    if caps.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    caps.iter().map(|c| capability_arg(field, c)).collect()
}

/// A request field that must be present and non-empty.
pub fn required<'a>(field: &str, v: &'a str) -> Result<&'a str, Status> {
    if v.is_empty() {
        Err(Status::invalid_argument(format!("{field} is required")))
    } else {
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn names_param(r: Result<VolumeParams, Status>, param: &str) {
        let e = r.expect_err("must be refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains(param), "{} does not name {param}", e.message());
    }

    #[test]
    fn defaults_and_full_classes() {
        let d = VolumeParams::parse(&HashMap::new()).unwrap();
        assert_eq!((d.replicas, d.min_in_sync, d.chunk_size), (3, 2, 64 << 20));
        assert_eq!((d.zone_spread, d.fs_type), (meta::ZoneSpread::Preferred, FsType::Ext4));
        let p = VolumeParams::parse(&params(&[
            ("replicas", "2"),
            ("minInSync", "1"),
            ("chunkSize", "16Mi"),
            ("zoneSpread", "required"),
            ("csi.storage.k8s.io/fstype", "xfs"),
            ("csi.storage.k8s.io/pvc/name", "data-pg-0"),
        ]))
        .unwrap();
        assert_eq!((p.replicas, p.min_in_sync, p.chunk_size), (2, 1, 16 << 20));
        assert_eq!((p.zone_spread, p.fs_type), (meta::ZoneSpread::Required, FsType::Xfs));
    }

    #[test]
    fn every_bad_parameter_is_named() {
        names_param(VolumeParams::parse(&params(&[("replica", "3")])), "replica");
        names_param(VolumeParams::parse(&params(&[("replicas", "0")])), "replicas");
        names_param(VolumeParams::parse(&params(&[("replicas", "six")])), "replicas");
        names_param(VolumeParams::parse(&params(&[("replicas", "2"), ("minInSync", "3")])), "minInSync");
        names_param(VolumeParams::parse(&params(&[("chunkSize", "12345")])), "chunkSize");
        names_param(VolumeParams::parse(&params(&[("chunkSize", "lots")])), "chunkSize");
        names_param(VolumeParams::parse(&params(&[("zoneSpread", "always")])), "zoneSpread");
        names_param(VolumeParams::parse(&params(&[("csi.storage.k8s.io/fstype", "btrfs")])), "fstype");
        for bad in ["", " ", ",", "z1,", ",z1", "z1,,z2", "z1, ,z2", "-z1", "z1-", "zone a", "z/1", &"z".repeat(64)] {
            names_param(VolumeParams::parse(&params(&[("zones", bad)])), "zones");
        }
    }

    #[test]
    fn zones_are_sorted_and_deduplicated() {
        assert!(VolumeParams::parse(&HashMap::new()).unwrap().zones.is_empty(), "absent: any zone");
        let p = VolumeParams::parse(&params(&[("zones", " zone-b ,zone-a,zone-b,us-east-1.c_2")])).unwrap();
        assert_eq!(p.zones, ["us-east-1.c_2", "zone-a", "zone-b"].map(String::from));
        assert_eq!(parse_zones("a").unwrap(), ["a"]);
        assert_eq!(parse_zones(&"z".repeat(63)).unwrap(), ["z".repeat(63)]);
        // A retry with the zones in another order is the same volume.
        let v = meta::Volume {
            replicas: p.replicas,
            min_in_sync: p.min_in_sync,
            chunk_size_bytes: p.chunk_size,
            zone_spread: p.zone_spread as i32,
            zones: vec!["us-east-1.c_2".into(), "zone-a".into(), "zone-b".into()],
            ..Default::default()
        };
        assert!(p.matches(&v));
        assert!(VolumeParams::parse(&params(&[("zones", "zone-b,us-east-1.c_2,zone-a")])).unwrap().matches(&v));
        assert!(!VolumeParams::parse(&params(&[("zones", "zone-a,zone-b")])).unwrap().matches(&v));
        assert!(!VolumeParams::parse(&HashMap::new()).unwrap().matches(&v), "unrestricted is another volume");
    }

    fn range(required: i64, limit: i64) -> pb::CapacityRange {
        pb::CapacityRange { required_bytes: required, limit_bytes: limit }
    }

    #[test]
    fn sizes_honour_the_range() {
        let chunk = 64 << 20;
        assert_eq!(create_size(None, chunk).unwrap(), 1 << 30);
        assert_eq!(create_size(Some(&range(100 << 20, 0)), chunk).unwrap(), 128 << 20, "whole chunks");
        assert_eq!(create_size(Some(&range(100 << 20, 100 << 20)), chunk).unwrap(), 100 << 20, "limit: whole blocks");
        assert_eq!(create_size(Some(&range(1, 4096)), chunk).unwrap(), 4096);
        assert_eq!(create_size(Some(&range(0, 10 << 20)), chunk).unwrap(), 10 << 20, "default capped by the limit");
        assert_eq!(create_size(Some(&range(5000, 6000)), chunk).unwrap_err().code(), tonic::Code::OutOfRange);
        assert_eq!(create_size(Some(&range(2, 1)), chunk).unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(create_size(Some(&range(-1, 0)), chunk).unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(expand_size(Some(&range(1 << 30, 0)), 1 << 30, chunk).unwrap(), None, "already that big");
        assert_eq!(expand_size(Some(&range(1_100_000_000, 0)), 1 << 30, chunk).unwrap(), Some(1088 << 20));
        assert_eq!(
            expand_size(Some(&range(1_100_000_000, 1_100_000_000)), 1 << 30, chunk).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(expand_size(None, 1 << 30, chunk).unwrap_err().code(), tonic::Code::InvalidArgument);
    }

    fn cap(mode: Mode, access: Option<AccessType>) -> pb::VolumeCapability {
        pb::VolumeCapability {
            access_type: access,
            access_mode: Some(pb::volume_capability::AccessMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn capabilities() {
        let mount = |fs: &str| {
            Some(AccessType::Mount(pb::volume_capability::MountVolume { fs_type: fs.into(), ..Default::default() }))
        };
        let block = Some(AccessType::Block(pb::volume_capability::BlockVolume {}));
        assert_eq!(check_capability(&cap(Mode::SingleNodeWriter, block.clone())).unwrap(), Access::Block);
        assert_eq!(
            check_capability(&cap(Mode::SingleNodeWriter, mount("xfs"))).unwrap(),
            Access::Mount { fs_type: Some(FsType::Xfs), flags: vec![] }
        );
        assert!(check_capability(&cap(Mode::MultiNodeMultiWriter, block.clone())).is_err());
        assert!(check_capability(&cap(Mode::Unknown, block)).is_err());
        assert!(check_capability(&cap(Mode::SingleNodeWriter, None)).is_err());
        assert!(check_capability(&cap(Mode::SingleNodeWriter, mount("zfs"))).is_err());
        assert_eq!(check_capabilities("volume_capabilities", &[]).unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}
