-- The Kafka record (topic, partition, offset) that stored each message, beside its id: a record
-- carrying a stored message's id is a redelivery of that record only when its origin is this
-- one, otherwise a second sending (ACKed `duplicate`). It replaces the writer's per-message
-- Redis done markers, so Redis keeps no key per message. Rows stored before have none, and a
-- record finding one without an origin is taken for its redelivery, as after a marker expired.
-- Adding nullable columns without a default rewrites nothing.
ALTER TABLE message_ids
    ADD COLUMN IF NOT EXISTS origin_topic text,
    ADD COLUMN IF NOT EXISTS origin_partition int4,
    ADD COLUMN IF NOT EXISTS origin_offset int8;
