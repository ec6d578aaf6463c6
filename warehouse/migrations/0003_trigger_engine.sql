-- Trigger engine (issue 13): an action says which message of which rule version it sends, at
-- which step, and what triggered it (an event id, or t<due time> for a timer).
ALTER TABLE {db}.actions
    ADD COLUMN IF NOT EXISTS message String,
    ADD COLUMN IF NOT EXISTS rule_version UInt32,
    ADD COLUMN IF NOT EXISTS step UInt16,
    ADD COLUMN IF NOT EXISTS trigger String,
    ADD COLUMN IF NOT EXISTS tags Array(String),
    ADD COLUMN IF NOT EXISTS properties String;

-- Every trigger decision with its reason: sent, shadow, deferred, quiet_hours, capped,
-- no_consent, exited, lower_priority, fallback_cancelled. A replay after a restart writes the
-- same rows again: they collapse on the sorting key.
CREATE TABLE IF NOT EXISTS {db}.trigger_audit (
    time DateTime64(3, '{tz}'),
    rule LowCardinality(String),
    rule_version UInt32,
    mode LowCardinality(String),
    user_id String,
    action_id String,
    step UInt16,
    channel LowCardinality(String),
    message String,
    decision LowCardinality(String),
    reason String
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (rule, user_id, time, action_id, decision)
TTL toDateTime(time) + INTERVAL 400 DAY;
