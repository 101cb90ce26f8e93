//! The PostgreSQL schema: versioned migrations from `migrations/`, embedded at build time so a
//! container image carries them. Both binaries apply them at start; sqlx serialises concurrent
//! runs with an advisory lock, so several instances starting together are safe.

use sqlx::PgPool;

/// The migrations of `migrations/`, in version order.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Applies every migration not yet applied to the database.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}
