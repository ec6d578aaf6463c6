-- Events and unique users per period and channel.
-- params: start end granularity channel campaign
SELECT {bucket} AS t,
       channel,
       sum(events) AS events,
       uniqExactMerge(users) AS users
FROM {db:Identifier}.{source:Identifier} FINAL
WHERE ts >= toDateTime({start:Int64}) AND ts < toDateTime({end:Int64})
  AND ({channel:String} = '' OR channel = {channel:String})
  AND ({campaign:String} = '' OR campaign = {campaign:String})
GROUP BY t, channel
ORDER BY t, channel
