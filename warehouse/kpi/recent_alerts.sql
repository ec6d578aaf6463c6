-- The latest alerts, newest first: each alert's latest message (firing, update or resolved).
-- params: limit
SELECT alert_id, rule, series, argMax(status, (minute, seq)) AS status, max(minute) AS updated,
       any(first_seen) AS first_seen, argMax(value, (minute, seq)) AS value,
       argMax(mu, (minute, seq)) AS mu, argMax(sigma, (minute, seq)) AS sigma,
       argMax(k, (minute, seq)) AS k, argMax(z, (minute, seq)) AS z,
       any(severity) AS severity, any(response) AS response, any(area) AS area,
       argMax(detail, (minute, seq)) AS detail, argMax(baseline, (minute, seq)) AS baseline
FROM {db:Identifier}.alerts FINAL
GROUP BY alert_id, rule, series
ORDER BY first_seen DESC, alert_id
LIMIT {limit:UInt32}
