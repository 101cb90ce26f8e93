//! The stores the writer persists into. Each is idempotent on (tenant_id, message_id), so a
//! redelivered batch can be written again without effect.

pub mod mongo;
pub mod postgres;
pub mod redis;
