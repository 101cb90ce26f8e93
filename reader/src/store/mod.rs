//! The stores the reader answers from.

pub mod postgres;
pub mod redis;
