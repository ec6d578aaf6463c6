-- Unique users (UV) and events per period, all channels together.
-- params: start end granularity channel campaign
SELECT {bucket} AS t,
       uniqExactMerge(users) AS uv,
       sum(events) AS events
FROM {db:Identifier}.{source:Identifier} FINAL
WHERE ts >= toDateTime({start:Int64}) AND ts < toDateTime({end:Int64})
  AND ({channel:String} = '' OR channel = {channel:String})
  AND ({campaign:String} = '' OR campaign = {campaign:String})
GROUP BY t
ORDER BY t
