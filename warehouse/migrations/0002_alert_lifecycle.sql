-- Alert lifecycle (issue 5): every message of an alert is kept (firing, updates, resolved),
-- numbered by seq; the window is a duration ("60m"); the rule's area, the breach direction, the
-- detector's score in [0, 1], the sample size behind a ratio and a detail (e.g. the offending IP).
-- One statement: ClickHouse only lets a sorting key take a column added in the same ALTER.
ALTER TABLE {db}.alerts
    ADD COLUMN IF NOT EXISTS seq UInt32 AFTER status,
    ADD COLUMN IF NOT EXISTS area LowCardinality(String),
    ADD COLUMN IF NOT EXISTS direction LowCardinality(String),
    ADD COLUMN IF NOT EXISTS score Float64,
    ADD COLUMN IF NOT EXISTS n Nullable(Float64),
    ADD COLUMN IF NOT EXISTS detail String,
    MODIFY COLUMN window String,
    MODIFY ORDER BY (alert_id, status, seq);
