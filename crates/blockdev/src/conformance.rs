//! The block-device conformance suite: one set of checks that every
//! [`BlockDev`](crate::BlockDev) implementation must pass (the in-memory model,
//! the replicated front end, NBD through a real client). Owned by the NBD work;
//! filled in there.
