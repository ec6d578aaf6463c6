-- New-user retention: for each day's cohort of new users (first seen that day), the share
-- active again on the next day (day 1) and on the seventh day after (day 7). NULL while that day
-- is not yet in the data.
-- params: start end
SELECT toUnixTimestamp(toDateTime(first_day, {tz:String})) AS t,
       count() AS new_users,
       countIf(has(days, first_day + 1)) AS retained_d1,
       countIf(has(days, first_day + 7)) AS retained_d7,
       if(any(last_day) >= first_day + 1, retained_d1 / new_users, NULL) AS retention_d1,
       if(any(last_day) >= first_day + 7, retained_d7 / new_users, NULL) AS retention_d7
FROM (
    SELECT c.user_id AS user_id, c.first_day AS first_day, groupArray(d.day) AS days,
           (SELECT max(day) FROM {db:Identifier}.user_days) AS last_day
    FROM (SELECT user_id, toDate(min(first_seen)) AS first_day
          FROM {db:Identifier}.users_first_seen GROUP BY user_id
          HAVING first_day >= toDate(toDateTime({start:Int64}), {tz:String})
             AND first_day < toDate(toDateTime({end:Int64}), {tz:String})) AS c
    LEFT JOIN (SELECT DISTINCT day, user_id FROM {db:Identifier}.user_days
               WHERE day > toDate(toDateTime({start:Int64}), {tz:String})) AS d
        ON d.user_id = c.user_id
    GROUP BY c.user_id, c.first_day
)
GROUP BY first_day
ORDER BY first_day
