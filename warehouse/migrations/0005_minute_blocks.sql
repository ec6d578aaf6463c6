-- Multi-minute blocks (issue 15): while the stream is behind, complete minutes reach
-- events_minute_in as one insert per aligned window (flows/minutes.BlockGrouper), deduplicated by
-- the block's token. Each row names its block, and the ledger below keeps, per minute, the block
-- that brought it: a later run that groups the same minutes differently (a restart, a replay of
-- the topic) sends each minute again under the token it was first inserted with, so the token
-- deduplicates it in every table the views feed (connectors/clickhouse.py reconciles).
ALTER TABLE {db}.events_minute_in ADD COLUMN IF NOT EXISTS block String DEFAULT '';

CREATE TABLE IF NOT EXISTS {db}.minute_blocks (
    minute DateTime('{tz}'),
    block String
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY minute
SETTINGS non_replicated_deduplication_window = 100000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.minute_blocks_mv TO {db}.minute_blocks AS
SELECT DISTINCT ts AS minute, block
FROM {db}.events_minute_in;
