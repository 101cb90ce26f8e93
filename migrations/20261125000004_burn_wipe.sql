-- Burned messages whose content has not been wiped yet, for the reader's background wipe.
CREATE INDEX IF NOT EXISTS messages_burn_due
    ON messages (burned_at)
    WHERE burned_at IS NOT NULL AND content IS NOT NULL;
