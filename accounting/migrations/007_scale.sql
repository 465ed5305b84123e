-- Usage views at scale (bench/usage_scale.py: 10 million log rows, every view < 200 ms)
-- and a cheaper insert for the flusher.
--
-- 1. usage_log loses (user_id, ts). With (key_id, ts) it was ~70 % of the cost of
--    inserting a row (each row lands on a random leaf of both). A user's request log
--    now walks each of the user's keys on (key_id, ts) (reports.request_log): keys
--    never change owner, so the rows are the same. Measured in bench/RESULTS.md.
DROP INDEX IF EXISTS usage_log_user_idx;

-- 2. The request log narrowed to one error status (or to errors) walked the ts index
--    newest first and filtered: fine for a 1 % status, a full scan for one that is rare
--    or absent. Errors are ~2 % of rows, so this index costs ~2 % of an index on
--    inserts. reports.request_log repeats the predicate so a parameterised query can
--    use it.
CREATE INDEX IF NOT EXISTS usage_log_error_idx ON usage_log (status, ts)
    WHERE status >= 400 OR error_code <> '';

-- 3. Two more aggregates, kept by the flusher in the same statement as usage_hourly.
--    usage_hourly has one row per (hour, user, key, group, model): with thousands of
--    keys it holds about a third as many rows as the log, so a 30-day total or a 7-day
--    health view over everyone summed millions of rows.
--    - usage_hourly_models, per (hour, group, model): totals and series that are not
--      narrowed to a user or key (at most hours × groups × models rows);
--    - usage_daily, per (UTC day, user, key, group, model): health by user or key over
--      several days (whole days from here, the partial days at both ends from
--      usage_hourly).
--    A view narrowed to one user or key stays on usage_hourly through its indexes.
CREATE TABLE usage_hourly_models (
    hour                timestamptz NOT NULL,
    group_name          text        NOT NULL,
    model               text        NOT NULL,
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
    PRIMARY KEY (hour, group_name, model)
) WITH (fillfactor = 70);

CREATE TABLE usage_daily (
    day                 timestamptz NOT NULL,   -- 00:00 UTC
    user_id             bigint      NOT NULL,
    key_id              bigint      NOT NULL,
    group_name          text        NOT NULL,
    model               text        NOT NULL,
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
    PRIMARY KEY (day, user_id, key_id, group_name, model)
) WITH (fillfactor = 70);

-- Existing figures, summed from usage_hourly (aggregates add up exactly). Rows a
-- flusher of the previous release commits while this runs reach usage_hourly only;
-- upgrade all workers together.
INSERT INTO usage_hourly_models
SELECT hour, group_name, model, sum(requests), sum(errors), sum(input_tokens),
    sum(output_tokens), sum(cache_read_tokens), sum(cache_write_tokens),
    sum(reasoning_tokens), sum(cost_nano), sum(latency_ms_sum), sum(ttfb_ms_sum), max(last_at)
FROM usage_hourly GROUP BY 1, 2, 3;

INSERT INTO usage_daily
SELECT date_trunc('day', hour, 'UTC'), user_id, key_id, group_name, model, sum(requests),
    sum(errors), sum(input_tokens), sum(output_tokens), sum(cache_read_tokens),
    sum(cache_write_tokens), sum(reasoning_tokens), sum(cost_nano), sum(latency_ms_sum),
    sum(ttfb_ms_sum), max(last_at)
FROM usage_hourly GROUP BY 1, 2, 3, 4, 5;

-- Views narrowed by model alone now read usage_hourly_models; one narrowed by user or
-- key and model goes through the user or key index. One index fewer for the flusher's
-- new hourly rows.
DROP INDEX IF EXISTS usage_hourly_model_idx;
