-- The online models' quality per model and label minute (model_metrics): rolling ROC AUC (exact,
-- over the last labels), log loss, calibration (mean score minus the observed rate), the labels
-- of the minute and their mean delay. A metric the minute did not have is NULL.
-- params: start end
SELECT toUnixTimestamp(ts) AS t, model,
       if(countIf(metric = 'auc') > 0, maxIf(value, metric = 'auc'), NULL) AS auc,
       if(countIf(metric = 'log_loss') > 0, maxIf(value, metric = 'log_loss'), NULL) AS log_loss,
       if(countIf(metric = 'calibration') > 0, maxIf(value, metric = 'calibration'), NULL) AS calibration,
       toUInt64(maxIf(value, metric = 'labels')) AS labels,
       if(countIf(metric = 'label_delay_s') > 0, maxIf(value, metric = 'label_delay_s'), NULL) AS label_delay_s
FROM {db:Identifier}.model_metrics FINAL
WHERE ts >= toDateTime({start:Int64}) AND ts < toDateTime({end:Int64})
GROUP BY ts, model
ORDER BY model, t
