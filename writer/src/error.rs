//! The writer's errors. Every one of them means the same to the pipeline — the stage failed,
//! the batch is retried with backoff, nothing is skipped — so they carry the [`Stage`] that
//! failed (the metric label and the crash-test hook) and the store's own error as the cause.
//! What a store refuses for good is not an error: it is a refusal the pipeline dead-letters
//! (`store::Written::refused`).

use std::fmt;

/// A step of the pipeline, as metrics, logs and `WRITER_CRASH_AFTER_STAGE` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The databases' stored ids (its latency; a failed lookup counts against the database's
    /// own stage).
    Idempotency,
    /// Per-session seq assignment.
    Seq,
    /// Seeding a missing seq counter from the databases.
    SeqSeed,
    Postgres,
    Mongo,
    /// Hot windows, session states and WAL removal: one Redis pipeline.
    Cache,
    /// ACK events.
    Ack,
    /// Copying a record to the dead-letter topic.
    DeadLetter,
    /// The search indexer's batch (`search_index.rs`), off the pipeline's path.
    SearchIndex,
}

impl Stage {
    pub const ALL: [Stage; 9] = [
        Stage::Idempotency,
        Stage::Seq,
        Stage::SeqSeed,
        Stage::Postgres,
        Stage::Mongo,
        Stage::Cache,
        Stage::Ack,
        Stage::DeadLetter,
        Stage::SearchIndex,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Idempotency => "idempotency",
            Stage::Seq => "seq",
            Stage::SeqSeed => "seq_seed",
            Stage::Postgres => "postgres",
            Stage::Mongo => "mongo",
            Stage::Cache => "cache",
            Stage::Ack => "ack",
            Stage::DeadLetter => "dead_letter",
            Stage::SearchIndex => "search_index",
        }
    }

    /// The stage of that name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|stage| stage.name() == name)
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What failed underneath a stage.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Postgres(#[from] sqlx::Error),
    #[error(transparent)]
    Mongo(#[from] mongodb::error::Error),
    #[error(transparent)]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A seq counter was behind the stored messages (Redis restored from an old snapshot); it
    /// has been raised, and the retry hands out new seqs.
    #[error("{0} message(s) hit a seq already in use; counters reseeded")]
    SeqConflict(usize),
    #[error("no seq assigned to message {0}")]
    NoSeq(String),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A stage failed; the batch is retried.
    #[error("stage {stage} failed: {cause}")]
    Stage {
        stage: Stage,
        #[source]
        cause: Cause,
    },
    /// Shutdown came before the batch was done; none of it may be committed.
    #[error("shutdown before the batch was done")]
    Interrupted,
}

impl Error {
    /// `cause`, as the failure of `stage`: `.map_err(Error::at(Stage::Postgres))`.
    pub fn at<E: Into<Cause>>(stage: Stage) -> impl FnOnce(E) -> Self {
        move |cause| Error::Stage { stage, cause: cause.into() }
    }

    pub fn stage(&self) -> Option<Stage> {
        match self {
            Error::Stage { stage, .. } => Some(*stage),
            Error::Interrupted => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_are_found_by_name() {
        for stage in Stage::ALL {
            assert_eq!(Stage::from_name(stage.name()), Some(stage));
        }
        assert_eq!(Stage::from_name("cursors"), None);
    }
}
