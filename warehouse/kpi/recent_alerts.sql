-- The latest alerts, newest first: each alert's latest state (firing, or resolved).
-- params: limit
SELECT alert_id, rule, series, argMax(status, minute) AS status, max(minute) AS updated,
       any(first_seen) AS first_seen, argMax(value, minute) AS value, argMax(mu, minute) AS mu,
       argMax(sigma, minute) AS sigma, argMax(k, minute) AS k, argMax(z, minute) AS z,
       any(severity) AS severity, any(response) AS response
FROM {db:Identifier}.alerts FINAL
GROUP BY alert_id, rule, series
ORDER BY first_seen DESC, alert_id
LIMIT {limit:UInt32}
