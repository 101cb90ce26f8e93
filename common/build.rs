//! Generates the wire contract from `proto/` with protox, so no system `protoc` is needed.
//! The encoded descriptor set is also written to OUT_DIR for gRPC server reflection.
//!
//! A second copy of the storage package is generated for the reader's server (`OUT_DIR/serving`):
//! there every `Message` is an `EncodedMessage` (already encoded bytes, see `proto.rs`) and only
//! the types holding one are generated anew; every other type is the client's own.

use std::collections::HashSet;
use std::path::PathBuf;

use prost::Message;

const STORAGE_PACKAGE: &str = ".flare.storage.v1";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let files = [proto_root.join("flare/common/v1/common.proto"), proto_root.join("flare/storage/v1/storage.proto")];
    println!("cargo:rerun-if-changed={}", proto_root.display());
    // The migrations are embedded by `sqlx::migrate!`; rebuild when one is added.
    println!("cargo:rerun-if-changed=../migrations");

    let descriptors = protox::compile(&files, [&proto_root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("flare_descriptor.bin"), descriptors.encode_to_vec())?;

    let serving_dir = out_dir.join("serving");
    std::fs::create_dir_all(&serving_dir)?;
    let mut serving = tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .out_dir(&serving_dir)
        .extern_path(".flare.common.v1", "crate::proto::common")
        .extern_path(format!("{STORAGE_PACKAGE}.Message"), "crate::proto::EncodedMessage");
    let holding = holding_message(&descriptors);
    for file in descriptors.file.iter().filter(|file| file.package() == &STORAGE_PACKAGE[1..]) {
        for name in
            file.message_type.iter().map(|message| message.name()).chain(file.enum_type.iter().map(|e| e.name()))
        {
            if name != "Message" && !holding.contains(name) {
                serving =
                    serving.extern_path(format!("{STORAGE_PACKAGE}.{name}"), format!("crate::proto::storage::{name}"));
            }
        }
    }
    serving.compile_fds(descriptors.clone())?;

    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;
    Ok(())
}

/// Names of the storage package's top-level messages that hold a `Message`, directly, in a
/// nested type, or through another such message.
fn holding_message(descriptors: &prost_types::FileDescriptorSet) -> HashSet<String> {
    let messages: Vec<_> = descriptors
        .file
        .iter()
        .filter(|file| file.package() == &STORAGE_PACKAGE[1..])
        .flat_map(|file| file.message_type.iter())
        .collect();
    let mut holding = HashSet::from([format!("{STORAGE_PACKAGE}.Message")]);
    loop {
        let before = holding.len();
        for message in &messages {
            if refers_to(message, &holding) {
                holding.insert(format!("{STORAGE_PACKAGE}.{}", message.name()));
            }
        }
        if holding.len() == before {
            break;
        }
    }
    holding.iter().filter_map(|name| name.strip_prefix(&format!("{STORAGE_PACKAGE}.")).map(str::to_owned)).collect()
}

/// Whether a message or one of its nested types has a field of one of these types.
fn refers_to(message: &prost_types::DescriptorProto, types: &HashSet<String>) -> bool {
    message.field.iter().any(|field| types.contains(field.type_name()))
        || message.nested_type.iter().any(|nested| refers_to(nested, types))
}
