//! What the writer and the reader of flare-storage share: the generated wire contract, the
//! normalised message model, the Redis key layout, the database schema, and process plumbing (telemetry, the
//! metrics/health HTTP endpoint, shutdown).
//!
//! `tonic` and `prost` are re-exported so both binaries build against the exact versions the
//! generated code was made with.

pub mod export;
pub mod keys;
pub mod message;
pub mod message_document;
pub mod ops;
pub mod pools;
pub mod proto;
pub mod redis_connection;
pub mod schema;
pub mod scripts;
pub mod settings;
pub mod stored_text;
pub mod telemetry;
pub mod text_search;

pub use prost;
pub use prost_types;
pub use tonic;
