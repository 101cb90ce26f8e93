//! Code generated from `proto/` at build time (see `build.rs`). Modules nest like the protobuf
//! packages because prost refers to other packages by relative paths.

#[allow(clippy::all, clippy::unwrap_used, missing_docs)]
pub mod flare {
    pub mod common {
        pub mod v1 {
            tonic::include_proto!("flare.common.v1");
        }
    }
    pub mod storage {
        pub mod v1 {
            tonic::include_proto!("flare.storage.v1");
        }
    }
}

pub use flare::common::v1 as common;
pub use flare::storage::v1 as storage;

/// Encoded `FileDescriptorSet` of every proto file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/flare_descriptor.bin"));
