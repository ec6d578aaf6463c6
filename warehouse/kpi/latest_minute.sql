-- The newest minute with aggregates (event time): "now" for dashboards, also in a replay.
-- params:
SELECT toUnixTimestamp(max(ts)) AS t, count() AS rows FROM {db:Identifier}.events_minute
