-- The latest trigger actions, newest first.
-- params: limit
SELECT action_id, rule, user_id, channel, campaign, event_time
FROM {db:Identifier}.actions FINAL
ORDER BY event_time DESC, action_id
LIMIT {limit:UInt32}
