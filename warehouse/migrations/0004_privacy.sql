-- Privacy (issue 14): the audit of erasures, and time to live on every table holding a user id.
-- The retention of each table is set from privacy.retention at every start
-- (warehouse/migrate.py apply_retention); the TTLs here are the defaults.

-- One row per erasure request, pass (1: at the request, 2: the sweep for rows in flight) and
-- store: who asked, when, what was removed and how much. The person is a subject hash (HMAC of
-- the id under the PII key), never the id.
CREATE TABLE IF NOT EXISTS {db}.erasure_audit (
    request_id String,
    subject String,
    kind LowCardinality(String),
    requested_by String,
    source LowCardinality(String),
    requested_at DateTime64(3, '{tz}'),
    completed_at DateTime64(3, '{tz}'),
    pass UInt8,
    store LowCardinality(String),
    removed UInt64
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(requested_at)
ORDER BY (request_id, pass, store);

-- Retention counts from when a row was stored (stored_at), not from its event time: a replay of
-- old history is kept as long as live data, and nothing is dropped on the way in.
ALTER TABLE {db}.events_raw ADD COLUMN IF NOT EXISTS stored_at DateTime DEFAULT now();
ALTER TABLE {db}.events_raw MODIFY TTL stored_at + INTERVAL 15 DAY;
ALTER TABLE {db}.actions ADD COLUMN IF NOT EXISTS stored_at DateTime DEFAULT now();
ALTER TABLE {db}.actions MODIFY TTL stored_at + INTERVAL 400 DAY;
ALTER TABLE {db}.alerts ADD COLUMN IF NOT EXISTS stored_at DateTime DEFAULT now();
ALTER TABLE {db}.alerts MODIFY TTL stored_at + INTERVAL 400 DAY;
ALTER TABLE {db}.user_days ADD COLUMN IF NOT EXISTS stored_at DateTime DEFAULT now();
ALTER TABLE {db}.user_days MODIFY TTL stored_at + INTERVAL 400 DAY;
ALTER TABLE {db}.users_first_seen ADD COLUMN IF NOT EXISTS stored_at SimpleAggregateFunction(max, DateTime) DEFAULT now();
ALTER TABLE {db}.users_first_seen MODIFY TTL stored_at + INTERVAL 400 DAY;
ALTER TABLE {db}.trigger_audit ADD COLUMN IF NOT EXISTS stored_at DateTime DEFAULT now();
ALTER TABLE {db}.trigger_audit MODIFY TTL stored_at + INTERVAL 400 DAY;
