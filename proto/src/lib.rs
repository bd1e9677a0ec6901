//! The gRPC API between the coordinator and its workers, generated from
//! `proto/cluster.proto` at build time, the chunking rule both sides
//! follow for large payloads, and the shared-secret authentication of every
//! call ([`auth`]).

pub mod auth;

/// Generated messages, the `Coordinator` client and server.
pub mod pb {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("distill.cluster.v1");
}

/// The API's encoded protobuf descriptors, for gRPC server reflection
/// (`grpcurl` and similar tools discover the services with it).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/cluster_descriptor.bin"));

/// Largest payload per streamed message (1 MiB): well under gRPC's 4 MiB
/// default message limit, large enough to keep per-message overhead small.
pub const CHUNK_BYTES: usize = 1 << 20;
