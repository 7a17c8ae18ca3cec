//! What people read: the tables and key-value text each command prints, the
//! names of the proto's enums, and sizes and ages in human units. Everything
//! reaches stdout through [`say`] (a closed pipe is an error, not a panic).

use std::collections::{BTreeMap, HashMap};

use ballast_metaclient::pb;
use serde_json::Value;

use crate::Output;

/// Prints the command's one result: the JSON document or the table text.
pub(crate) fn emit(out: Output, json: Value, table: impl FnOnce() -> String) -> anyhow::Result<()> {
    match out {
        Output::Json => say(&format!("{}\n", serde_json::to_string_pretty(&json)?)),
        Output::Table => say(&table()),
    }
}

/// Writes to stdout; unlike `print!`, a closed pipe is an error to return, not a panic.
pub(crate) fn say(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

// ---- enum names -------------------------------------------------------------

pub(crate) fn node_state(v: i32) -> String {
    match pb::NodeState::try_from(v) {
        Ok(pb::NodeState::Up) => "up".into(),
        Ok(pb::NodeState::Suspect) => "suspect".into(),
        Ok(pb::NodeState::Down) => "down".into(),
        Ok(pb::NodeState::Cordoned) => "cordoned".into(),
        Ok(pb::NodeState::Draining) => "draining".into(),
        Ok(pb::NodeState::Unspecified) | Err(_) => format!("unknown({v})"),
    }
}

/// A node's disk health; unspecified (a meta older than disk probing) is ok, as
/// meta itself treats it.
pub(crate) fn disk_health(v: i32) -> String {
    match pb::DiskHealth::try_from(v) {
        Ok(pb::DiskHealth::DiskOk | pb::DiskHealth::Unspecified) => "ok".into(),
        Ok(pb::DiskHealth::DiskFull) => "full".into(),
        Ok(pb::DiskHealth::DiskFailed) => "failed".into(),
        Err(_) => format!("unknown({v})"),
    }
}

/// The DISK column: the health, and why a failed disk failed.
fn disk_cell(n: &pb::Node) -> String {
    match disk_health(n.disk).as_str() {
        "failed" if !n.disk_error.is_empty() => format!("failed: {}", n.disk_error.replace('\n', " ")),
        h => h.to_string(),
    }
}

pub(crate) fn role(v: i32) -> String {
    match pb::ReplicaRole::try_from(v) {
        Ok(pb::ReplicaRole::InSync) => "in-sync".into(),
        Ok(pb::ReplicaRole::Rebuilding) => "rebuilding".into(),
        Ok(pb::ReplicaRole::Ejected) => "ejected".into(),
        Ok(pb::ReplicaRole::Unspecified) | Err(_) => format!("unknown({v})"),
    }
}

pub(crate) fn job_kind(v: i32) -> String {
    match pb::JobKind::try_from(v) {
        Ok(pb::JobKind::Rebuild) => "rebuild".into(),
        Ok(pb::JobKind::Resync) => "resync".into(),
        Ok(pb::JobKind::Unspecified) | Err(_) => format!("unknown({v})"),
    }
}

pub(crate) fn job_state(v: i32) -> String {
    match pb::JobState::try_from(v) {
        Ok(pb::JobState::Pending) => "pending".into(),
        Ok(pb::JobState::Running) => "running".into(),
        Ok(pb::JobState::Done) => "done".into(),
        Ok(pb::JobState::Failed) => "failed".into(),
        Ok(pb::JobState::Unspecified) | Err(_) => format!("unknown({v})"),
    }
}

// ---- tables ------------------------------------------------------------------

/// Aligned columns under a header; two spaces between columns, no trailing blanks.
struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&'static str]) -> Self {
        Table { header: header.to_vec(), rows: Vec::new() }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        let cols = self.header.len();
        let mut width: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.header.iter().map(|h| h.to_string()).collect();
        for r in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate().take(cols) {
                if i + 1 < cols {
                    line.push_str(&format!("{c:<w$}  ", w = width[i]));
                } else {
                    line.push_str(c);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Lines of "Key  value" with the keys aligned.
fn key_values(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs.iter().map(|(k, v)| format!("{k:<w$}  {v}\n")).collect()
}

pub(crate) fn status_table(s: &pb::StatusResponse) -> String {
    let leader = if s.leader == 0 { "none (election in progress?)".to_string() } else { s.leader.to_string() };
    let mut out = key_values(&[
        ("Answered by", format!("member {}", s.id)),
        ("Leader", leader),
        ("Term", s.term.to_string()),
        ("Log", format!("last index {}, applied {}", s.last_log_index, s.applied_index)),
        ("Nodes", format!("{} ({} up)", s.nodes, s.nodes_up)),
        ("Volumes", s.volumes.to_string()),
        ("Degraded chunks", s.degraded_chunks.to_string()),
        ("Active jobs", s.jobs_active.to_string()),
        ("Over-provisioning", format!("{}% of each node's capacity", s.over_provisioning_pct)),
    ]);
    out.push('\n');
    let mut t = Table::new(&["MEMBER", "ADDRESS", "ROLE"]);
    for m in &s.members {
        let mut role = if m.voter { "voter" } else { "learner" }.to_string();
        if m.id == s.leader {
            role.push_str(", leader");
        }
        t.row(vec![m.id.to_string(), m.addr.clone(), role]);
    }
    out.push_str(&t.render());
    out
}

pub(crate) fn nodes_table(nodes: &[pb::Node]) -> String {
    // ALLOCATED: the full size of its replicas (up to PROVISIONABLE); USED:
    // what they take on its disk; ROOM: what placement may still put there.
    let mut t = Table::new(&[
        "ID",
        "ZONE",
        "ADDRESS",
        "STATE",
        "DISK",
        "CAPACITY",
        "PROVISIONABLE",
        "ALLOCATED",
        "USED",
        "ROOM",
        "HEARTBEAT",
    ]);
    for n in nodes {
        t.row(vec![
            n.id.to_string(),
            n.zone.clone(),
            n.addr.clone(),
            node_state(n.state),
            disk_cell(n),
            format_size(n.capacity_bytes),
            format_size(n.provisionable_bytes),
            format_size(n.allocated_bytes),
            format_size(n.used_bytes),
            format_size(n.room_bytes),
            format_age(n.heartbeat_age_ms),
        ]);
    }
    t.render()
}

pub(crate) fn volumes_table(vols: &[pb::Volume]) -> String {
    let mut t = Table::new(&[
        "ID",
        "NAME",
        "SIZE",
        "CHUNK",
        "REPLICAS",
        "MIN-IN-SYNC",
        "ZONES",
        "EPOCH",
        "ATTACHED",
        "DEGRADED",
    ]);
    for v in vols {
        t.row(vec![
            v.id.to_string(),
            v.name.clone(),
            format_size(v.size_bytes),
            format_size(v.chunk_size_bytes),
            v.replicas.to_string(),
            v.min_in_sync.to_string(),
            zones_text(&v.zones),
            v.epoch.to_string(),
            if v.attached_to == 0 { "-".into() } else { format!("node {}", v.attached_to) },
            v.degraded_chunks.to_string(),
        ]);
    }
    t.render()
}

pub(crate) fn spread_text(z: i32) -> &'static str {
    match pb::ZoneSpread::try_from(z) {
        Ok(pb::ZoneSpread::Required) => "required",
        _ => "preferred",
    }
}

pub(crate) fn zones_text(z: &[String]) -> String {
    if z.is_empty() {
        "any".into()
    } else {
        z.join(",")
    }
}

/// One zone's share of a volume's replicas.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ZoneSpread {
    pub(crate) zone: String,
    pub(crate) nodes: usize,
    pub(crate) in_sync: usize,
    pub(crate) rebuilding: usize,
    pub(crate) ejected: usize,
}

pub(crate) fn zone_spread(l: &pb::VolumeLayout) -> Vec<ZoneSpread> {
    let zone_of: HashMap<u64, &str> = l.nodes.iter().map(|n| (n.id, n.zone.as_str())).collect();
    let mut by_zone: BTreeMap<String, ZoneSpread> = BTreeMap::new();
    let entry = |m: &mut BTreeMap<String, ZoneSpread>, z: &str| {
        m.entry(z.to_string()).or_insert_with(|| ZoneSpread {
            zone: z.to_string(),
            nodes: 0,
            in_sync: 0,
            rebuilding: 0,
            ejected: 0,
        });
    };
    for n in &l.nodes {
        entry(&mut by_zone, &n.zone);
        if let Some(z) = by_zone.get_mut(&n.zone) {
            z.nodes += 1;
        }
    }
    for c in &l.chunks {
        for r in &c.replicas {
            let zone = zone_of.get(&r.node).copied().unwrap_or("?");
            entry(&mut by_zone, zone);
            if let Some(z) = by_zone.get_mut(zone) {
                match pb::ReplicaRole::try_from(r.role) {
                    Ok(pb::ReplicaRole::InSync) => z.in_sync += 1,
                    Ok(pb::ReplicaRole::Rebuilding) => z.rebuilding += 1,
                    Ok(pb::ReplicaRole::Ejected) => z.ejected += 1,
                    Ok(pb::ReplicaRole::Unspecified) | Err(_) => {}
                }
            }
        }
    }
    by_zone.into_values().collect()
}

#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Health {
    pub(crate) chunks: usize,
    /// As many in-sync replicas as configured.
    pub(crate) full: usize,
    /// Fewer in-sync replicas than configured, still at least min-in-sync.
    pub(crate) degraded: usize,
    /// Fewer than min-in-sync: writes fail until rebuilt.
    pub(crate) below_min: usize,
    pub(crate) in_sync: usize,
    /// In-sync replicas that are not live: on a down or suspect node, or a failed disk.
    pub(crate) not_live: usize,
    pub(crate) rebuilding: usize,
    pub(crate) ejected: usize,
}

/// Chunks are counted by their live replicas (the service's rule: in-sync, on
/// a node that is not down or suspect, whose disk has not failed).
pub(crate) fn health(l: &pb::VolumeLayout) -> Health {
    let (replicas, min) = l.volume.as_ref().map_or((0, 0), |v| (v.replicas as usize, v.min_in_sync as usize));
    let mut h = Health { chunks: l.chunks.len(), ..Health::default() };
    for c in &l.chunks {
        let count = |want: pb::ReplicaRole| c.replicas.iter().filter(|r| r.role == want as i32).count();
        let in_sync = count(pb::ReplicaRole::InSync);
        let live = c.replicas.iter().filter(|r| ballast_metasvc::layout_replica_live(l, r)).count();
        h.in_sync += in_sync;
        h.not_live += in_sync - live;
        h.rebuilding += count(pb::ReplicaRole::Rebuilding);
        h.ejected += count(pb::ReplicaRole::Ejected);
        if live < min {
            h.below_min += 1;
        } else if live < replicas {
            h.degraded += 1;
        } else {
            h.full += 1;
        }
    }
    h
}

pub(crate) fn inspect_text(l: &pb::VolumeLayout, max_chunks: Option<usize>) -> String {
    let mut pairs = Vec::new();
    if let Some(v) = &l.volume {
        let size = format_size(v.size_bytes);
        pairs.push(("Volume", format!("{} (id {})", v.name, v.id)));
        pairs.push(("Size", format!("{size} in {} chunks of {}", l.chunks.len(), format_size(v.chunk_size_bytes))));
        pairs.push((
            "Replication",
            format!(
                "{} replicas per chunk, min-in-sync {}, zones {} (spread {})",
                v.replicas,
                v.min_in_sync,
                zones_text(&v.zones),
                spread_text(v.zone_spread)
            ),
        ));
        if v.published_node != 0 {
            pairs.push(("Published", format!("to node {}", v.published_node)));
        }
        pairs.push((
            "Attached",
            if v.attached_to == 0 {
                format!("no (epoch {})", v.epoch)
            } else if v.attached_to_fill {
                format!("to node {} (epoch {}), filling the clone in the background", v.attached_to, v.epoch)
            } else {
                format!("to node {} (epoch {})", v.attached_to, v.epoch)
            },
        ));
        pairs.push(("Layout gen", v.layout_gen.to_string()));
        if let Some(o) = &v.origin {
            let state = match v.unfilled_chunks {
                0 => "independent".to_string(),
                n => format!("{n} chunks still copying from it"),
            };
            let from = if o.from_volume {
                format!("volume {} (through snapshot {}, {state})", o.source_volume, o.snapshot_name)
            } else {
                format!("snapshot {} of volume {} ({state})", o.snapshot_name, o.source_volume)
            };
            pairs.push(("Cloned from", from));
        }
    }
    let h = health(l);
    pairs.push((
        "Chunks",
        format!("{} fully replicated, {} degraded, {} below min-in-sync", h.full, h.degraded, h.below_min),
    ));
    let lost = if h.not_live == 0 {
        String::new()
    } else {
        format!(" ({} on a down or suspect node or a failed disk)", h.not_live)
    };
    pairs
        .push(("Replicas", format!("{} in-sync{lost}, {} rebuilding, {} ejected", h.in_sync, h.rebuilding, h.ejected)));
    if !l.snapshots.is_empty() || l.snapshot_layers > 0 {
        // The nodes' last counts (each recounts every 15 s), over every replica.
        pairs.push((
            "Snapshots",
            format!(
                "{} ({} on disk in {} chunk layers over all replicas)",
                l.snapshots.len(),
                format_size(l.snapshot_bytes),
                l.snapshot_layers
            ),
        ));
    }
    let mut out = key_values(&pairs);
    out.push('\n');
    let mut t = Table::new(&["ZONE", "NODES", "IN-SYNC", "REBUILDING", "EJECTED"]);
    for z in zone_spread(l) {
        t.row(vec![
            z.zone,
            z.nodes.to_string(),
            z.in_sync.to_string(),
            z.rebuilding.to_string(),
            z.ejected.to_string(),
        ]);
    }
    out.push_str(&t.render());
    out.push('\n');
    if !l.snapshots.is_empty() {
        out.push_str(&snapshots_table(&l.snapshots));
        out.push('\n');
    }
    let shown = max_chunks.unwrap_or(usize::MAX).min(l.chunks.len());
    let mut t = Table::new(&["CHUNK", "VERSION", "REPLICAS"]);
    for c in &l.chunks[..shown] {
        let replicas: Vec<String> = c.replicas.iter().map(|r| format!("{}({})", r.node, role(r.role))).collect();
        t.row(vec![c.index.to_string(), c.version.to_string(), replicas.join(" ")]);
    }
    out.push_str(&t.render());
    if shown < l.chunks.len() {
        out.push_str(&format!("... {} more chunks (--chunks N shows more)\n", l.chunks.len() - shown));
    }
    out
}

pub(crate) fn progress(j: &pb::Job) -> String {
    let pct = if j.chunk_len == 0 { 0 } else { (u128::from(j.bytes_done) * 100 / u128::from(j.chunk_len)) as u64 };
    format!("{} / {} ({pct}%)", format_size(j.bytes_done), format_size(j.chunk_len))
}

pub(crate) fn jobs_table(jobs: &[pb::Job], names: &HashMap<u64, String>) -> String {
    let mut t =
        Table::new(&["ID", "KIND", "VOLUME", "CHUNK", "TARGET", "REPLACES", "STATE", "PROGRESS", "ATTEMPTS", "ERROR"]);
    for j in jobs {
        t.row(vec![
            j.id.to_string(),
            job_kind(j.kind),
            names.get(&j.volume).cloned().unwrap_or_else(|| j.volume.to_string()),
            j.chunk.to_string(),
            j.target.to_string(),
            if j.replaces == 0 { "-".into() } else { j.replaces.to_string() },
            job_state(j.state),
            progress(j),
            j.attempts.to_string(),
            if j.error.is_empty() { "-".into() } else { j.error.replace('\n', " ") },
        ]);
    }
    t.render()
}

pub(crate) fn what_if_table(r: &pb::WhatIfResponse) -> String {
    let mut t = Table::new(&["VOLUME", "NAME", "DEGRADED", "UNWRITABLE", "UNAVAILABLE"]);
    for v in &r.volumes {
        t.row(vec![
            v.volume.to_string(),
            v.name.clone(),
            v.chunks_degraded.to_string(),
            v.chunks_unwritable.to_string(),
            v.chunks_unavailable.to_string(),
        ]);
    }
    let mut out = if r.volumes.is_empty() { "no volume affected\n".to_string() } else { t.render() };
    out.push_str(&format!("{} volume(s) unaffected\n", r.unaffected));
    out
}

// ---- units ---------------------------------------------------------------------

/// Snapshots: a pending one shows `pending` for its cut (the attached front
/// end has not taken it yet).
pub(crate) fn snapshots_table(list: &[pb::Snapshot]) -> String {
    let mut t = Table::new(&["ID", "SNAPSHOT", "VOLUME", "SIZE", "READY", "CUT", "CREATED"]);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    for s in list {
        let cut = match (&s.cut, s.ready) {
            (Some(c), true) if c.counter == u64::MAX => format!("end of epoch {}", c.epoch),
            (Some(c), true) => format!("{}:{}", c.epoch, c.counter),
            _ => "pending".into(),
        };
        t.row(vec![
            s.id.to_string(),
            s.name.clone(),
            if s.volume_name.is_empty() { s.volume.to_string() } else { s.volume_name.clone() },
            format_size(s.size_bytes),
            if s.ready { "yes".into() } else { "no".into() },
            cut,
            format_age(now.saturating_sub(s.created_ms)),
        ]);
    }
    t.render()
}

/// `0 B`, `512 B`, `4 KiB`, `1.5 GiB`: the largest unit that keeps the number ≥ 1,
/// one decimal when it is not whole.
pub(crate) fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >= 1u64 << (10 * (unit + 1)) {
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    let scale = 1u64 << (10 * unit);
    // Tenths, rounded half up, computed in integers.
    let tenths = (u128::from(bytes) * 10 + u128::from(scale) / 2) / u128::from(scale);
    if tenths % 10 == 0 {
        format!("{} {}", tenths / 10, UNITS[unit])
    } else {
        format!("{}.{} {}", tenths / 10, tenths % 10, UNITS[unit])
    }
}

pub(crate) fn format_age(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms}ms ago"),
        1_000..=119_999 => format!("{}.{}s ago", ms / 1000, ms % 1000 / 100),
        _ => format!("{}m ago", ms / 60_000),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::json::node_json;

    #[test]
    fn snapshots_show_their_cut_or_pending() {
        let snap = |name: &str, cut: Option<(u64, u64)>| pb::Snapshot {
            name: name.into(),
            volume_name: "pg".into(),
            size_bytes: 1 << 30,
            ready: cut.is_some(),
            cut: cut.map(|(epoch, counter)| pb::Seq { epoch, counter }),
            ..Default::default()
        };
        let t = snapshots_table(&[snap("a", Some((2, 77))), snap("b", Some((3, u64::MAX))), snap("c", None)]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[1].contains("a") && lines[1].contains("2:77") && lines[1].contains("1 GiB"), "{t}");
        assert!(lines[2].contains("end of epoch 3"), "a detached volume's cut: {t}");
        assert!(lines[3].contains("pending") && lines[3].contains(" no "), "{t}");
    }

    #[test]
    fn sizes_format_human_readable() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(4096), "4 KiB");
        assert_eq!(format_size(64 << 20), "64 MiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size((10 << 30) - 1), "10 GiB");
        assert_eq!(format_size(1 << 40), "1 TiB");
    }

    #[test]
    fn tables_align_columns_without_trailing_blanks() {
        let mut t = Table::new(&["ID", "NAME", "SIZE"]);
        t.row(vec!["1".into(), "pg-data".into(), "10 GiB".into()]);
        t.row(vec!["12".into(), "x".into(), "".into()]);
        assert_eq!(t.render(), "ID  NAME     SIZE\n1   pg-data  10 GiB\n12  x\n");
    }

    /// A volume of three chunks: one fully replicated, one degraded, one below min-in-sync.
    pub(crate) fn layout() -> pb::VolumeLayout {
        let r = |node, role: pb::ReplicaRole| pb::ChunkReplica { node, role: role as i32 };
        use pb::ReplicaRole::*;
        pb::VolumeLayout {
            snapshots: vec![],
            unfilled: vec![],
            snapshot_layers: 3,
            snapshot_bytes: 12 << 20,
            volume: Some(pb::Volume {
                id: 3,
                name: "pg".into(),
                size_bytes: 3 << 20,
                chunk_size_bytes: 1 << 20,
                replicas: 3,
                min_in_sync: 2,
                epoch: 4,
                attached_to: 1,
                layout_gen: 7,
                degraded_chunks: 2,
                ..Default::default()
            }),
            chunks: vec![
                pb::Chunk { index: 0, version: 1, replicas: vec![r(1, InSync), r(2, InSync), r(3, InSync)] },
                pb::Chunk {
                    index: 1,
                    version: 3,
                    replicas: vec![r(1, InSync), r(2, InSync), r(4, Rebuilding), r(3, Ejected)],
                },
                pb::Chunk { index: 2, version: 5, replicas: vec![r(1, InSync), r(3, Ejected), r(2, Ejected)] },
            ],
            nodes: (1..=4)
                .map(|id| pb::Node {
                    id,
                    addr: format!("10.0.0.{id}:7001"),
                    zone: if id == 4 { "z1".into() } else { format!("z{id}") },
                    state: pb::NodeState::Up as i32,
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn inspect_counts_health_and_zone_spread() {
        let l = layout();
        assert_eq!(
            health(&l),
            Health {
                chunks: 3,
                full: 1,
                degraded: 1,
                below_min: 1,
                in_sync: 6,
                not_live: 0,
                rebuilding: 1,
                ejected: 3
            }
        );
        let z = zone_spread(&l);
        assert_eq!(z[0], ZoneSpread { zone: "z1".into(), nodes: 2, in_sync: 3, rebuilding: 1, ejected: 0 });
        assert_eq!(z[2], ZoneSpread { zone: "z3".into(), nodes: 1, in_sync: 1, rebuilding: 0, ejected: 2 });
        let text = inspect_text(&l, Some(2));
        assert!(text.starts_with("Volume       pg (id 3)\nSize         3 MiB in 3 chunks of 1 MiB\n"), "{text}");
        assert!(text.contains("\nChunks       1 fully replicated, 1 degraded, 1 below min-in-sync\n"), "{text}");
        assert!(text.contains("\nz1    2      3        1           0\n"), "{text}");
        assert!(text.contains("\n1      3        1(in-sync) 2(in-sync) 4(rebuilding) 3(ejected)\n"), "{text}");
        assert!(text.ends_with("... 1 more chunks (--chunks N shows more)\n"), "{text}");
        assert!(!text.contains("2(ejected)"), "the third chunk is cut: {text}");
        assert!(text.contains("\nReplicas     6 in-sync, 1 rebuilding, 3 ejected\n"), "{text}");
        // Snapshots deleted, the nodes' layers not recounted yet: still shown.
        assert!(text.contains("\nSnapshots    0 (12 MiB on disk in 3 chunk layers over all replicas)\n"), "{text}");
    }

    #[test]
    fn inspect_counts_a_replica_on_a_down_node_as_missing() {
        // Node 3 is down: its in-sync replica of chunk 0 is still listed in-sync,
        // but the chunk has two live replicas, not three.
        let mut l = layout();
        l.nodes[2].state = pb::NodeState::Down as i32;
        assert_eq!(
            health(&l),
            Health {
                chunks: 3,
                full: 0,
                degraded: 2,
                below_min: 1,
                in_sync: 6,
                not_live: 1,
                rebuilding: 1,
                ejected: 3
            }
        );
        let text = inspect_text(&l, None);
        assert!(text.contains("\nChunks       0 fully replicated, 2 degraded, 1 below min-in-sync\n"), "{text}");
        let replicas =
            "\nReplicas     6 in-sync (1 on a down or suspect node or a failed disk), 1 rebuilding, 3 ejected\n";
        assert!(text.contains(replicas), "{text}");
        // A suspect node and a failed disk count the same; cordoned and draining serve.
        for (state, disk, full) in [
            (pb::NodeState::Suspect, pb::DiskHealth::DiskOk, 0),
            (pb::NodeState::Up, pb::DiskHealth::DiskFailed, 0),
            (pb::NodeState::Cordoned, pb::DiskHealth::DiskFull, 1),
            (pb::NodeState::Draining, pb::DiskHealth::DiskOk, 1),
        ] {
            l.nodes[2].state = state as i32;
            l.nodes[2].disk = disk as i32;
            assert_eq!(health(&l).full, full, "{state:?} {disk:?}");
        }
    }

    #[test]
    fn node_list_shows_disk_health() {
        let node = |id, disk: pb::DiskHealth, error: &str| pb::Node {
            id,
            zone: "z1".into(),
            state: pb::NodeState::Up as i32,
            disk: disk as i32,
            disk_error: error.into(),
            ..Default::default()
        };
        let nodes = vec![
            node(1, pb::DiskHealth::DiskOk, ""),
            node(2, pb::DiskHealth::DiskFull, ""),
            node(3, pb::DiskHealth::DiskFailed, "write DATA/.probe: Input/output error\n(os error 5)"),
        ];
        let text = nodes_table(&nodes);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains(" STATE  DISK "), "{text}");
        assert!(lines[1].contains(" up     ok "), "{text}");
        assert!(lines[2].contains(" up     full "), "{text}");
        assert!(lines[3].contains(" up     failed: write DATA/.probe: Input/output error (os error 5) "), "{text}");
        let j = node_json(&nodes[2]);
        assert_eq!(j["disk"], "failed");
        assert_eq!(j["disk_error"], "write DATA/.probe: Input/output error\n(os error 5)");
        assert_eq!(node_json(&nodes[1])["disk"], "full");
        assert_eq!(disk_health(9), "unknown(9)");
    }
}
