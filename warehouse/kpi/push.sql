-- Push notifications per period and campaign: sent, delivered (push_delivered receipts), opened;
-- delivery rate = delivered / sent; open rate = opened / delivered, or opened / sent when the
-- provider sends no delivery receipts.
-- params: start end granularity campaign
SELECT t, campaign, sent, delivered, opened,
       if(delivered > 0, delivered / nullIf(sent, 0), NULL) AS delivery_rate,
       opened / nullIf(if(delivered > 0, delivered, sent), 0) AS open_rate
FROM (
    SELECT {bucket} AS t,
           campaign,
           sumIf(events, event_name = 'push_sent') AS sent,
           sumIf(events, event_name = 'push_delivered') AS delivered,
           sumIf(events, event_name = 'push_opened') AS opened
    FROM {db:Identifier}.{source:Identifier} FINAL
    WHERE ts >= toDateTime({start:Int64}) AND ts < toDateTime({end:Int64})
      AND event_name IN ('push_sent', 'push_delivered', 'push_opened')
      AND ({campaign:String} = '' OR campaign = {campaign:String})
    GROUP BY t, campaign
)
ORDER BY t, campaign
