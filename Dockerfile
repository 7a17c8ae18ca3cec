# syntax=docker/dockerfile:1
#
# The Ballast image: `ballast` (meta, node, csi-controller, ...) and `ballastctl`.
#   docker build -t ghcr.io/ballast-io/ballast:0.1.0 .
# Only the sources below are sent to the builder (BuildKit), not target/.

# --- build -------------------------------------------------------------------
# The toolchain the project is developed and tested with (the crates' MSRV is
# lower: rust-version in Cargo.toml).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY crates crates
COPY proto proto
COPY src src
# Declared [[bench]] targets of the root package: cargo wants their files even for --bins.
COPY benches benches
# protoc comes vendored (protoc-bin-vendored); io_uring needs no system library.
# The caches keep the registry and the build between image builds; the binaries
# are copied out of the cache mount in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
    && install -D -m 0755 target/release/ballast /out/ballast \
    && install -D -m 0755 target/release/ballastctl /out/ballastctl

# --- runtime -----------------------------------------------------------------
FROM debian:bookworm-slim
# What `ballast node` runs on the host's devices: mkfs.ext4/resize2fs
# (e2fsprogs), mkfs.xfs/xfs_growfs (xfsprogs), losetup/blkid/findmnt
# (util-linux), mount/umount (mount), FUSE for the FUSE + loop attach (fuse3),
# modprobe for nbd/loop (kmod).
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates e2fsprogs xfsprogs util-linux mount fuse3 kmod \
    && rm -rf /var/lib/apt/lists/*
# meta and csi-controller run as this user (the manifests set it); the node
# plugin runs as root, privileged.
RUN groupadd --system --gid 65532 ballast \
    && useradd --system --uid 65532 --gid 65532 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin ballast
COPY --from=build /out/ballast /out/ballastctl /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["ballast"]
CMD ["--help"]
