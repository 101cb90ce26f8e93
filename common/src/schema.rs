//! The PostgreSQL schema: versioned migrations from `migrations/`, embedded at build time so a
//! container image carries them. Both binaries apply them at start; sqlx serialises concurrent
//! runs with an advisory lock, so several instances starting together are safe.

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// The check constraint `flare-storage partition-messages` puts on a plain `messages` table
/// while it moves it to monthly partitions ("timestamp" before the move's boundary); the
/// migration's `flare_partition_messages` attaches the table only when it is validated, and a
/// writer that meets a message it refuses removes it.
pub const PARTITIONING_CONSTRAINT: &str = "messages_before_partitioning";

/// The same check on `message_search` while it moves (`flare_partition_message_search`); the
/// search indexer, and a writer meeting a message past the boundary, remove it alike.
pub const SEARCH_PARTITIONING_CONSTRAINT: &str = "message_search_before_partitioning";

/// The migrations of `migrations/`, in version order.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Applies every migration not yet applied to the database.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// A connection pool that connects on first use, so a binary can start before its database;
/// a query waits at most five seconds for a connection.
pub fn lazy_pool(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect_lazy(url)
}
