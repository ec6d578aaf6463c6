-- Funnel per period, campaign and channel: unique users at each step (product_viewed ->
-- add_to_cart -> checkout_started -> order_completed) and the conversion of each step from the
-- one before (NULL when the step before has no users).
-- Each period also has a total row (is_total = 1, campaign and channel empty), exact for unique
-- users too. Granularity 'total' gives one period for the whole range (read from the hourly table).
-- params: start end granularity channel campaign
-- coarsest table: funnel_hour (granularity hour or coarser)
SELECT t, campaign, channel, is_total, viewed, carted, checked_out, ordered,
       carted / nullIf(viewed, 0) AS view_to_cart,
       checked_out / nullIf(carted, 0) AS cart_to_checkout,
       ordered / nullIf(checked_out, 0) AS checkout_to_order,
       ordered / nullIf(viewed, 0) AS view_to_order
FROM (
    SELECT {bucket} AS t,
           campaign, channel, grouping(campaign, channel) = 3 AS is_total,
           uniqExactMerge(viewed) AS viewed,
           uniqExactMerge(carted) AS carted,
           uniqExactMerge(checked_out) AS checked_out,
           uniqExactMerge(ordered) AS ordered
    FROM {db:Identifier}.funnel_hour
    WHERE ts >= toDateTime({start:Int64}) AND ts < toDateTime({end:Int64})
      AND ({channel:String} = '' OR channel = {channel:String})
      AND ({campaign:String} = '' OR campaign = {campaign:String})
    GROUP BY GROUPING SETS ((t, campaign, channel), (t))
)
ORDER BY t, is_total, campaign, channel
