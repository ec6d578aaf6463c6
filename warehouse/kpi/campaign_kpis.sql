-- Campaign KPIs per period, campaign and channel. clicks = ad clicks + SMS clicks;
-- CTR = ad clicks / ad impressions; CVR = orders / clicks; ROI = (revenue - cost) / cost;
-- CPC = cost / clicks; CPA = cost / orders; AOV = revenue / orders. A ratio whose denominator is
-- zero is NULL (not 0, not infinity). Rows without a campaign are organic traffic ('').
-- Each period also has a row per campaign over all its channels (all_channels = 1, channel '')
-- and a total row (is_total = 1, campaign and channel empty); unique users are exact in both.
-- Granularity 'total' gives one period for the whole range (read from the hourly table).
-- params: start end granularity channel campaign
SELECT t, campaign, channel, is_total, all_channels, impressions, clicks, orders, revenue, cost, users,
       clicks_ad / nullIf(impressions, 0) AS ctr,
       orders / nullIf(clicks, 0) AS cvr,
       (revenue - cost) / nullIf(cost, 0) AS roi,
       cost / nullIf(clicks, 0) AS cpc,
       cost / nullIf(orders, 0) AS cpa,
       revenue / nullIf(orders, 0) AS aov
FROM (
    SELECT {bucket} AS t,
           campaign, channel, grouping(campaign, channel) = 3 AS is_total,
           grouping(channel) = 1 AS all_channels,
           sumIf(events, event_name = 'ad_impression') AS impressions,
           sumIf(events, event_name = 'ad_click') AS clicks_ad,
           sumIf(events, event_name IN ('ad_click', 'sms_clicked')) AS clicks,
           sum(orders) AS orders,
           round(sum(revenue), 2) AS revenue,
           round(sum(cost), 2) AS cost,
           uniqExactMerge(users) AS users
    FROM {db:Identifier}.{source:Identifier} FINAL
    WHERE ts >= toDateTime({start:Int64}) AND ts < toDateTime({end:Int64})
      AND ({channel:String} = '' OR channel = {channel:String})
      AND ({campaign:String} = '' OR campaign = {campaign:String})
    GROUP BY GROUPING SETS ((t, campaign, channel), (t, campaign), (t))
)
ORDER BY t, is_total, campaign, all_channels, channel
