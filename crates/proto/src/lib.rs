//! The metadata service's gRPC surface, generated from `proto/ballast/v1/meta.proto`
//! (tonic + prost): the member-to-member Raft transport, the node-facing API and the
//! admin API. Only the control plane links this crate; the data path never does.

// Generated code: not ours to lint (prost and tonic spell paths out in full).
#![allow(clippy::all, missing_docs, unused_qualifications)]

pub mod v1 {
    tonic::include_proto!("ballast.v1");
}
