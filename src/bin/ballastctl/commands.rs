//! One function per command: the calls to meta (through [`MetaClient`]), and
//! which JSON document and which table each answer becomes.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

use anyhow::bail;
use ballast_metaclient::{pb, MetaClient};
use serde_json::json;

use crate::json::{job_json, layout_json, node_json, snapshot_json, status_json, volume_json, what_if_json};
use crate::progress::{Bars, JobsView, Lines};
use crate::render::{
    emit, inspect_text, jobs_table, node_state, nodes_table, say, snapshots_table, status_table, volumes_table,
    what_if_table,
};
use crate::{DownArgs, JobsArgs, MemberCommand, NodeCommand, Output, SettingsCommand, SnapshotCommand, VolumeCommand};

pub(crate) async fn status(client: &MetaClient, out: Output) -> anyhow::Result<()> {
    let s = client.status().await?;
    emit(out, status_json(&s), || status_table(&s))
}

pub(crate) async fn settings(client: &MetaClient, out: Output, cmd: SettingsCommand) -> anyhow::Result<()> {
    let SettingsCommand::OverProvisioning { pct } = cmd;
    let s = client.set_over_provisioning(pct).await?;
    emit(out, status_json(&s), || {
        format!("over-provisioning set to {}% of each node's capacity\n", s.over_provisioning_pct)
    })
}

pub(crate) async fn node(client: &MetaClient, out: Output, cmd: NodeCommand) -> anyhow::Result<()> {
    let set = |node, state: pb::NodeState| pb::SetNodeStateRequest { node, state: state as i32 };
    let req = match cmd {
        NodeCommand::List => {
            let nodes = client.list_nodes().await?.nodes;
            return emit(out, json!({ "nodes": nodes.iter().map(node_json).collect::<Vec<_>>() }), || {
                nodes_table(&nodes)
            });
        }
        NodeCommand::Remove { id } => {
            client.remove_node(pb::RemoveNodeRequest { node: id }).await?;
            return emit(out, json!({ "removed": id }), || format!("node {id} removed\n"));
        }
        NodeCommand::Cordon { id } => set(id, pb::NodeState::Cordoned),
        NodeCommand::Uncordon { id } => set(id, pb::NodeState::Up),
        NodeCommand::Drain { id } => set(id, pb::NodeState::Draining),
    };
    let n = client.set_node_state(req).await?;
    emit(out, node_json(&n), || format!("node {} is now {}\n", n.id, node_state(n.state)))
}

pub(crate) async fn volume(
    client: &MetaClient,
    out: Output,
    cmd: VolumeCommand,
    timeout: Duration,
) -> anyhow::Result<()> {
    match cmd {
        VolumeCommand::Create(a) => {
            let req = pb::CreateVolumeRequest {
                name: a.name,
                size_bytes: a.size,
                chunk_size_bytes: a.chunk_size.unwrap_or(0),
                replicas: a.replicas.unwrap_or(0),
                min_in_sync: a.min_in_sync.unwrap_or(0),
                zones: a.zones,
                zone_spread: if a.zone_spread == "required" {
                    pb::ZoneSpread::Required
                } else {
                    pb::ZoneSpread::Preferred
                } as i32,
                source_snapshot: a.from_snapshot.unwrap_or_default(),
                source_volume: a.from_volume.unwrap_or_default(),
            };
            let mut v = client.create_volume(req).await?;
            // A clone of an attached volume: usable once the source's front
            // end has taken the snapshot made for it.
            if let Some(o) = v.origin.clone().filter(|o| o.from_volume && v.unfilled_chunks > 0) {
                if let Some(s) = client.wait_snapshot_ready(&o.snapshot_name, timeout).await? {
                    if !s.ready {
                        bail!(
                            "volume {:?} created, but snapshot {:?} of its source is not taken after {timeout:?}: \
                             is the source's front end running? (the clone attaches once it is)",
                            v.name,
                            o.snapshot_name
                        );
                    }
                }
                v = client.list_volumes().await?.volumes.into_iter().find(|x| x.id == v.id).unwrap_or(v);
            }
            emit(out, volume_json(&v), || volumes_table(std::slice::from_ref(&v)))
        }
        VolumeCommand::List => {
            let vols = client.list_volumes().await?.volumes;
            emit(out, json!({ "volumes": vols.iter().map(volume_json).collect::<Vec<_>>() }), || volumes_table(&vols))
        }
        VolumeCommand::Inspect { name, chunks } => {
            let l = client.inspect_volume(pb::InspectVolumeRequest { volume: name }).await?;
            emit(out, layout_json(&l), || inspect_text(&l, chunks))
        }
        VolumeCommand::Grow { name, size } => {
            let v = client.grow_volume(pb::GrowVolumeRequest { volume: name, size_bytes: size }).await?;
            emit(out, volume_json(&v), || volumes_table(std::slice::from_ref(&v)))
        }
        VolumeCommand::Delete { name, yes } => {
            if !yes {
                bail!("refusing to delete volume {name:?} without --yes");
            }
            let r = client.delete_volume(pb::DeleteVolumeRequest { volume: name.clone() }).await?;
            emit(out, json!({ "deleted": name, "chunk_replicas": r.chunk_replicas }), || {
                format!("volume {name:?} deleted; {} chunk replicas to reclaim on the nodes\n", r.chunk_replicas)
            })
        }
    }
}

pub(crate) async fn snapshot(
    client: &MetaClient,
    out: Output,
    cmd: SnapshotCommand,
    timeout: Duration,
) -> anyhow::Result<()> {
    match cmd {
        SnapshotCommand::Create { volume, name, no_wait } => {
            let mut s = client.create_snapshot(pb::CreateSnapshotRequest { volume, name: name.clone() }).await?;
            if !s.ready && !no_wait {
                s = match client.wait_snapshot_ready(&name, timeout).await? {
                    Some(s) if s.ready => s,
                    Some(_) => bail!(
                        "snapshot {name:?} requested but not ready after {timeout:?}: is the volume's front end \
                         running? (it takes the snapshot; `ballastctl snapshot list` shows it when it is)"
                    ),
                    None => bail!("snapshot {name:?} was deleted while it was being taken"),
                };
            }
            emit(out, snapshot_json(&s), || snapshots_table(std::slice::from_ref(&s)))
        }
        SnapshotCommand::List { volume } => {
            let req = pb::ListSnapshotsRequest { volume: volume.unwrap_or_default(), snapshot: String::new() };
            let list = client.list_snapshots(req).await?.snapshots;
            emit(out, json!({ "snapshots": list.iter().map(snapshot_json).collect::<Vec<_>>() }), || {
                snapshots_table(&list)
            })
        }
        SnapshotCommand::Delete { name } => {
            client.delete_snapshot(pb::DeleteSnapshotRequest { snapshot: name.clone() }).await?;
            emit(out, json!({ "deleted": name }), || format!("snapshot {name:?} deleted\n"))
        }
    }
}

pub(crate) async fn jobs(client: &MetaClient, out: Output, args: JobsArgs) -> anyhow::Result<()> {
    let names = volume_names(client).await?;
    let list = client.list_jobs(pb::ListJobsRequest { all: args.all }).await?.jobs;
    if !args.watch {
        return emit(out, json!({ "jobs": list.iter().map(job_json).collect::<Vec<_>>() }), || {
            jobs_table(&list, &names)
        });
    }
    if std::io::stdout().is_terminal() {
        watch(client, list, Bars::new(names)?).await
    } else {
        watch(client, list, Lines::new(names)).await
    }
}

const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Shows the jobs every [`WATCH_EVERY`] until none is active, then says so.
async fn watch(client: &MetaClient, mut list: Vec<pb::Job>, mut view: impl JobsView) -> anyhow::Result<()> {
    loop {
        if !view.show(&list)? {
            return say("no active jobs\n");
        }
        tokio::time::sleep(WATCH_EVERY).await;
        // All jobs, so that the ones that just ended show how.
        list = client.list_jobs(pb::ListJobsRequest { all: true }).await?.jobs;
    }
}

async fn volume_names(client: &MetaClient) -> anyhow::Result<HashMap<u64, String>> {
    Ok(client.list_volumes().await?.volumes.into_iter().map(|v| (v.id, v.name)).collect())
}

pub(crate) async fn what_if_down(client: &MetaClient, out: Output, args: DownArgs) -> anyhow::Result<()> {
    let (target, target_json) = match (args.node, args.zone) {
        (Some(n), _) => (pb::what_if_request::Target::Node(n), json!({ "node": n })),
        (None, Some(z)) => (pb::what_if_request::Target::Zone(z.clone()), json!({ "zone": z })),
        (None, None) => bail!("what-if down needs --node ID or --zone NAME"),
    };
    let r = client.what_if(pb::WhatIfRequest { target: Some(target) }).await?;
    emit(out, what_if_json(target_json, &r), || what_if_table(&r))
}

pub(crate) async fn member(client: &MetaClient, out: Output, cmd: MemberCommand) -> anyhow::Result<()> {
    let s = match cmd {
        MemberCommand::Add { id, addr } => client.add_member(pb::AddMemberRequest { id, addr }).await?,
        MemberCommand::Remove { id } => client.remove_member(pb::RemoveMemberRequest { id }).await?,
    };
    emit(out, status_json(&s), || status_table(&s))
}
