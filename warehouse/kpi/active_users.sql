-- Active users per day, week or month (DAU / WAU / MAU), and the users first seen in it.
-- params: start end granularity
-- coarsest table: user_days (granularity day or coarser)
SELECT t, active_users, new_users
FROM (
    SELECT toUnixTimestamp(toDateTime(multiIf(
               {granularity:String} = 'week', toMonday(day),
               {granularity:String} = 'month', toStartOfMonth(day),
               day), {tz:String})) AS t,
           uniqExact(user_id) AS active_users
    FROM {db:Identifier}.user_days FINAL
    WHERE day >= toDate(toDateTime({start:Int64}), {tz:String})
      AND day < toDate(toDateTime({end:Int64}), {tz:String})
    GROUP BY t
) AS a
LEFT JOIN (
    SELECT toUnixTimestamp(toDateTime(multiIf(
               {granularity:String} = 'week', toMonday(first_day),
               {granularity:String} = 'month', toStartOfMonth(first_day),
               first_day), {tz:String})) AS t,
           count() AS new_users
    FROM (SELECT user_id, toDate(min(first_seen)) AS first_day
          FROM {db:Identifier}.users_first_seen GROUP BY user_id)
    WHERE first_day >= toDate(toDateTime({start:Int64}), {tz:String})
      AND first_day < toDate(toDateTime({end:Int64}), {tz:String})
    GROUP BY t
) AS n USING t
ORDER BY t
