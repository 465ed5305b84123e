-- Health by user or key across everyone without the model dimension
-- (bench/usage_scale.py, bench/RESULTS.md "Usage views at scale").
--
-- usage_hourly / usage_daily carry group and model: with 5,000 keys active every hour
-- a day of usage_hourly is ~124k rows and a week of usage_daily ~214k, which health by
-- user or key (summing over every model) read whole. These two hold one row per
-- (hour or UTC day, group, user, key): a key normally serves one group, so a day of
-- usage_daily_keys is one row per active key. Kept by the flusher in the same
-- statement as the others (accounting.ledger._ROLLUPS), upserted per batch group, not
-- per row. A view narrowed by model still reads usage_hourly / usage_daily.
CREATE TABLE usage_hourly_keys (
    hour                timestamptz NOT NULL,
    group_name          text        NOT NULL,
    user_id             bigint      NOT NULL,
    key_id              bigint      NOT NULL,
    requests            bigint      NOT NULL DEFAULT 0,
    errors              bigint      NOT NULL DEFAULT 0,
    input_tokens        bigint      NOT NULL DEFAULT 0,
    output_tokens       bigint      NOT NULL DEFAULT 0,
    cache_read_tokens   bigint      NOT NULL DEFAULT 0,
    cache_write_tokens  bigint      NOT NULL DEFAULT 0,
    reasoning_tokens    bigint      NOT NULL DEFAULT 0,
    cost_nano           bigint      NOT NULL DEFAULT 0,
    latency_ms_sum      bigint      NOT NULL DEFAULT 0,
    ttfb_ms_sum         bigint      NOT NULL DEFAULT 0,
    last_at             timestamptz NOT NULL,
    PRIMARY KEY (hour, group_name, user_id, key_id)
) WITH (fillfactor = 70);

CREATE TABLE usage_daily_keys (
    day                 timestamptz NOT NULL,   -- 00:00 UTC
    group_name          text        NOT NULL,
    user_id             bigint      NOT NULL,
    key_id              bigint      NOT NULL,
    requests            bigint      NOT NULL DEFAULT 0,
    errors              bigint      NOT NULL DEFAULT 0,
    input_tokens        bigint      NOT NULL DEFAULT 0,
    output_tokens       bigint      NOT NULL DEFAULT 0,
    cache_read_tokens   bigint      NOT NULL DEFAULT 0,
    cache_write_tokens  bigint      NOT NULL DEFAULT 0,
    reasoning_tokens    bigint      NOT NULL DEFAULT 0,
    cost_nano           bigint      NOT NULL DEFAULT 0,
    latency_ms_sum      bigint      NOT NULL DEFAULT 0,
    ttfb_ms_sum         bigint      NOT NULL DEFAULT 0,
    last_at             timestamptz NOT NULL,
    PRIMARY KEY (day, group_name, user_id, key_id)
) WITH (fillfactor = 70);

-- Existing figures, summed from the aggregates (they add up exactly). As in 007: rows a
-- flusher of the previous release commits while this runs reach the old tables only;
-- upgrade all workers together.
INSERT INTO usage_hourly_keys
SELECT hour, group_name, user_id, key_id, sum(requests), sum(errors), sum(input_tokens),
    sum(output_tokens), sum(cache_read_tokens), sum(cache_write_tokens),
    sum(reasoning_tokens), sum(cost_nano), sum(latency_ms_sum), sum(ttfb_ms_sum), max(last_at)
FROM usage_hourly GROUP BY 1, 2, 3, 4;

INSERT INTO usage_daily_keys
SELECT day, group_name, user_id, key_id, sum(requests), sum(errors), sum(input_tokens),
    sum(output_tokens), sum(cache_read_tokens), sum(cache_write_tokens),
    sum(reasoning_tokens), sum(cost_nano), sum(latency_ms_sum), sum(ttfb_ms_sum), max(last_at)
FROM usage_daily GROUP BY 1, 2, 3, 4;

ANALYZE usage_hourly_keys;
ANALYZE usage_daily_keys;

-- The request log of one user narrowed to one error status (reports.request_log walks
-- each of the user's keys): usage_log_error_idx (status, ts) AND-ed with the key index
-- read every error of a busy key before sorting them (0.4-1.3 s for a rare 429). With
-- (key_id, status, ts) each key's walk reads its newest rows of that status and stops.
-- Partial like usage_log_error_idx (errors are ~2 % of rows), so the flusher pays it on
-- error rows only.
CREATE INDEX IF NOT EXISTS usage_log_key_error_idx ON usage_log (key_id, status, ts)
    WHERE status >= 400 OR error_code <> '';
