-- Retention (STORAGE_RETENTION_DAYS) deletes by time across all tenants. A BRIN index finds
-- old rows of an append-mostly, time-ordered table at a tiny fraction of a B-tree's size and
-- insert cost. (On TimescaleDB, retention drops whole chunks instead.)
CREATE INDEX IF NOT EXISTS messages_time_brin ON messages USING BRIN ("timestamp");
