-- The baseline an alert's value was judged against (issue 17), in words: "level", "time of
-- day", "time of week", "cycle of 7.25 h", "shift from time of day", "static threshold". With
-- mu, sigma, k and z it says what was crossed (SPEC section 7).
ALTER TABLE {db}.alerts ADD COLUMN IF NOT EXISTS baseline LowCardinality(String) DEFAULT '';
