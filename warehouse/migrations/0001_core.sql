-- surgeflow's ClickHouse schema, version 1.
--
-- {db} is the configured database and {tz} the reporting time zone (clickhouse.timezone); both
-- are validated identifiers filled in by warehouse/migrate.py, never user values. Every statement
-- runs unchanged on a ClickHouse server and on chDB.
--
-- Idempotency (a replay after a crash must not double-count):
--   * The flow inserts each complete minute of aggregates as one block whose
--     insert_deduplication_token is the minute. The tables fed from that block by materialized
--     views deduplicate it too (deduplicate_blocks_in_dependent_materialized_views), so a minute
--     that was already inserted, or half-inserted before a failure, is counted exactly once.
--     non_replicated_deduplication_window keeps the last 100,000 tokens per table (69 days of
--     minutes), far beyond any replay from a snapshot.
--   * Tables keyed by what they hold also collapse duplicates: ReplacingMergeTree on the minute,
--     event id, alert, action, user day; min() for a user's first day.

CREATE DATABASE IF NOT EXISTS {db};

-- Landing table: one row per (minute, channel, campaign, creative, event name) with the users of
-- that minute as ids. Null engine: nothing is stored; the views below turn it into states.
CREATE TABLE IF NOT EXISTS {db}.events_minute_in (
    ts DateTime('{tz}'),
    channel LowCardinality(String),
    campaign String,
    creative String,
    event_name LowCardinality(String),
    events UInt64,
    revenue Float64,
    cost Float64,
    orders UInt64,
    users Array(String)
) ENGINE = Null;

-- Minute aggregates. ts = start of the minute. users = exact unique users, mergeable.
CREATE TABLE IF NOT EXISTS {db}.events_minute (
    ts DateTime('{tz}'),
    channel LowCardinality(String),
    campaign String,
    creative String,
    event_name LowCardinality(String),
    events UInt64,
    revenue Float64,
    cost Float64,
    orders UInt64,
    users AggregateFunction(uniqExact, String)
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (ts, channel, campaign, creative, event_name)
SETTINGS non_replicated_deduplication_window = 100000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.events_minute_mv TO {db}.events_minute AS
SELECT ts, channel, campaign, creative, event_name, events, revenue, cost, orders,
       arrayReduce('uniqExactState', users) AS users
FROM {db}.events_minute_in;

-- Hourly and daily rollups (ts = start of the hour / day in {tz}).
CREATE TABLE IF NOT EXISTS {db}.events_hour (
    ts DateTime('{tz}'),
    channel LowCardinality(String),
    campaign String,
    creative String,
    event_name LowCardinality(String),
    events SimpleAggregateFunction(sum, UInt64),
    revenue SimpleAggregateFunction(sum, Float64),
    cost SimpleAggregateFunction(sum, Float64),
    orders SimpleAggregateFunction(sum, UInt64),
    users AggregateFunction(uniqExact, String)
) ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (ts, channel, campaign, creative, event_name)
SETTINGS non_replicated_deduplication_window = 100000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.events_hour_mv TO {db}.events_hour AS
SELECT toStartOfHour(ts) AS ts, channel, campaign, creative, event_name,
       sum(events) AS events, sum(revenue) AS revenue, sum(cost) AS cost, sum(orders) AS orders,
       uniqExactMergeState(arrayReduce('uniqExactState', users)) AS users
FROM {db}.events_minute_in
GROUP BY ts, channel, campaign, creative, event_name;

CREATE TABLE IF NOT EXISTS {db}.events_day (
    ts DateTime('{tz}'),
    channel LowCardinality(String),
    campaign String,
    creative String,
    event_name LowCardinality(String),
    events SimpleAggregateFunction(sum, UInt64),
    revenue SimpleAggregateFunction(sum, Float64),
    cost SimpleAggregateFunction(sum, Float64),
    orders SimpleAggregateFunction(sum, UInt64),
    users AggregateFunction(uniqExact, String)
) ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (ts, channel, campaign, creative, event_name)
SETTINGS non_replicated_deduplication_window = 100000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.events_day_mv TO {db}.events_day AS
SELECT toStartOfDay(ts) AS ts, channel, campaign, creative, event_name,
       sum(events) AS events, sum(revenue) AS revenue, sum(cost) AS cost, sum(orders) AS orders,
       uniqExactMergeState(arrayReduce('uniqExactState', users)) AS users
FROM {db}.events_minute_in
GROUP BY ts, channel, campaign, creative, event_name;

-- Funnel per hour, campaign and channel: the users who reached each step (product_viewed ->
-- add_to_cart -> checkout_started -> order_completed) and how often.
CREATE TABLE IF NOT EXISTS {db}.funnel_hour (
    ts DateTime('{tz}'),
    channel LowCardinality(String),
    campaign String,
    viewed AggregateFunction(uniqExact, String),
    carted AggregateFunction(uniqExact, String),
    checked_out AggregateFunction(uniqExact, String),
    ordered AggregateFunction(uniqExact, String),
    views SimpleAggregateFunction(sum, UInt64),
    carts SimpleAggregateFunction(sum, UInt64),
    checkouts SimpleAggregateFunction(sum, UInt64),
    orders SimpleAggregateFunction(sum, UInt64),
    revenue SimpleAggregateFunction(sum, Float64)
) ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (ts, channel, campaign)
SETTINGS non_replicated_deduplication_window = 100000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.funnel_hour_mv TO {db}.funnel_hour AS
SELECT toStartOfHour(ts) AS ts, channel, campaign,
       uniqExactMergeIfState(arrayReduce('uniqExactState', users), event_name = 'product_viewed') AS viewed,
       uniqExactMergeIfState(arrayReduce('uniqExactState', users), event_name = 'add_to_cart') AS carted,
       uniqExactMergeIfState(arrayReduce('uniqExactState', users), event_name = 'checkout_started') AS checked_out,
       uniqExactMergeIfState(arrayReduce('uniqExactState', users), event_name = 'order_completed') AS ordered,
       sumIf(events, event_name = 'product_viewed') AS views,
       sumIf(events, event_name = 'add_to_cart') AS carts,
       sumIf(events, event_name = 'checkout_started') AS checkouts,
       sumIf(events, event_name = 'order_completed') AS orders,
       sumIf(revenue, event_name = 'order_completed') AS revenue
FROM {db}.events_minute_in
WHERE event_name IN ('product_viewed', 'add_to_cart', 'checkout_started', 'order_completed')
GROUP BY ts, channel, campaign;

-- Active users per day, and each user's first day: DAU, new users, retention.
CREATE TABLE IF NOT EXISTS {db}.user_days (
    day Date,
    user_id String
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (day, user_id)
SETTINGS non_replicated_deduplication_window = 100000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.user_days_mv TO {db}.user_days AS
SELECT DISTINCT toDate(ts) AS day, arrayJoin(users) AS user_id
FROM {db}.events_minute_in;

CREATE TABLE IF NOT EXISTS {db}.users_first_seen (
    user_id String,
    first_seen SimpleAggregateFunction(min, DateTime('{tz}'))
) ENGINE = AggregatingMergeTree
ORDER BY user_id;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.users_first_seen_mv TO {db}.users_first_seen AS
SELECT arrayJoin(users) AS user_id, min(ts) AS first_seen
FROM {db}.events_minute_in
GROUP BY user_id;

-- Raw events for drill-down, kept 30 days. IP masked (IPv4 last octet, IPv6 to /48); e-mail and
-- phone only as keyed hashes; user ids are the pseudonymous ids of the stream.
CREATE TABLE IF NOT EXISTS {db}.events_raw (
    event_time DateTime64(3, '{tz}'),
    event_id String,
    type LowCardinality(String),
    event_name LowCardinality(String),
    user_id String,
    anonymous_id String,
    channel LowCardinality(String),
    campaign String,
    creative String,
    revenue Float64,
    cost Float64,
    ip_masked String,
    country LowCardinality(String),
    properties String
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMMDD(event_time)
ORDER BY (event_name, event_time, event_id)
TTL toDateTime(event_time) + INTERVAL 30 DAY
SETTINGS ttl_only_drop_parts = 1;

CREATE TABLE IF NOT EXISTS {db}.alerts (
    alert_id String,
    rule LowCardinality(String),
    series String,
    status LowCardinality(String),
    minute DateTime('{tz}'),
    value Float64,
    mu Float64,
    sigma Float64,
    k Float64,
    z Float64,
    window UInt32,
    severity LowCardinality(String),
    first_seen DateTime('{tz}'),
    response String
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(first_seen)
ORDER BY (alert_id, status);

CREATE TABLE IF NOT EXISTS {db}.actions (
    action_id String,
    rule LowCardinality(String),
    user_id String,
    channel LowCardinality(String),
    campaign String,
    session_id String,
    event_time DateTime64(3, '{tz}')
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY action_id;

-- Online model quality per minute and profile shard (rolling ROC AUC and log loss).
CREATE TABLE IF NOT EXISTS {db}.model_metrics (
    ts DateTime('{tz}'),
    model LowCardinality(String),
    shard UInt16,
    metric LowCardinality(String),
    value Float64,
    examples UInt64
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (model, metric, shard, ts);
