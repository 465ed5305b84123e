-- Usage log (one metadata row per request, partitioned by day), hourly aggregates,
-- and redemption codes. Depends on nothing but itself: usage rows carry user/key ids
-- without foreign keys, because the flusher must never fail a batch (and lose its place)
-- over a row whose user was deleted meanwhile, and FK checks would cost on every insert.
--
-- "group" is a reserved word; the column is `group_name` everywhere so queries never
-- need quoting.

CREATE TABLE usage_log (
    request_id          text        NOT NULL,
    ts                  timestamptz NOT NULL,   -- admission time: fixed, so a replay hits the same partition
    user_id             bigint      NOT NULL,
    key_id              bigint      NOT NULL,
    group_name          text        NOT NULL DEFAULT '',
    model               text        NOT NULL,
    upstream_model      text        NOT NULL DEFAULT '',
    channel             text        NOT NULL DEFAULT '',
    protocol            text        NOT NULL DEFAULT '',
    route               text        NOT NULL DEFAULT '',
    stream              boolean     NOT NULL DEFAULT false,
    status              integer     NOT NULL,
    error_code          text        NOT NULL DEFAULT '',
    input_tokens        bigint      NOT NULL DEFAULT 0,
    output_tokens       bigint      NOT NULL DEFAULT 0,
    cache_read_tokens   bigint      NOT NULL DEFAULT 0,
    cache_write_tokens  bigint      NOT NULL DEFAULT 0,
    reasoning_tokens    bigint      NOT NULL DEFAULT 0,
    usage_source        text        NOT NULL DEFAULT 'none',
    cost_nano           bigint      NOT NULL DEFAULT 0,
    price_version       bigint      NOT NULL DEFAULT 0,
    latency_ms          integer     NOT NULL DEFAULT 0,
    ttfb_ms             integer     NOT NULL DEFAULT 0,
    attempts            integer     NOT NULL DEFAULT 1,
    channels_tried      text        NOT NULL DEFAULT '',
    client_request_id   text        NOT NULL DEFAULT '',
    client_ip           text        NOT NULL DEFAULT '',
    plan_id             bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (request_id, ts)
) PARTITION BY RANGE (ts);

-- Request-log views: newest first, optionally narrowed by key, user or model.
CREATE INDEX usage_log_ts_idx    ON usage_log (ts);
CREATE INDEX usage_log_key_idx   ON usage_log (key_id, ts);
CREATE INDEX usage_log_user_idx  ON usage_log (user_id, ts);
CREATE INDEX usage_log_model_idx ON usage_log (model, ts);
-- `usage show` by the client's own id; most rows have none, so keep the index small.
CREATE INDEX usage_log_client_rid_idx ON usage_log (client_request_id) WHERE client_request_id <> '';

-- A row whose day partition does not exist yet lands here instead of failing the batch;
-- usage_log_ensure_partitions() moves such rows into their day when it creates it.
CREATE TABLE usage_log_default PARTITION OF usage_log DEFAULT;

-- Create day partitions [p_from, p_from + p_days) (UTC days). Returns how many were created.
CREATE FUNCTION usage_log_ensure_partitions(p_from date, p_days integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    d date;
    lo timestamptz;
    hi timestamptz;
    part text;
    created integer := 0;
BEGIN
    FOR i IN 0 .. p_days - 1 LOOP
        d := p_from + i;
        part := 'usage_log_p' || to_char(d, 'YYYYMMDD');
        CONTINUE WHEN to_regclass(part) IS NOT NULL;
        lo := d::timestamp AT TIME ZONE 'UTC';
        hi := (d + 1)::timestamp AT TIME ZONE 'UTC';
        -- Rows of that day may sit in the default partition; attaching a partition
        -- over them would fail, so move them first while no one can add more.
        LOCK TABLE usage_log_default IN ACCESS EXCLUSIVE MODE;
        EXECUTE format('CREATE TABLE %I (LIKE usage_log INCLUDING DEFAULTS)', part);
        EXECUTE format(
            'WITH moved AS (DELETE FROM usage_log_default WHERE ts >= %L AND ts < %L RETURNING *) '
            'INSERT INTO %I SELECT * FROM moved', lo, hi, part);
        EXECUTE format('ALTER TABLE usage_log ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                       part, lo, hi);
        created := created + 1;
    END LOOP;
    RETURN created;
END $$;

-- Drop day partitions that end on or before p_before (and default-partition rows older
-- than it). Returns how many partitions were dropped.
CREATE FUNCTION usage_log_drop_before(p_before date)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    r record;
    dropped integer := 0;
BEGIN
    FOR r IN
        SELECT c.relname
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'usage_log'::regclass
          AND c.relname ~ '^usage_log_p[0-9]{8}$'
          AND to_date(substr(c.relname, 12), 'YYYYMMDD') + 1 <= p_before
    LOOP
        EXECUTE format('DROP TABLE %I', r.relname);
        dropped := dropped + 1;
    END LOOP;
    DELETE FROM usage_log_default WHERE ts < (p_before::timestamp AT TIME ZONE 'UTC');
    RETURN dropped;
END $$;

-- What the flusher calls on start and hourly: today .. +3 days exist, older than the
-- retention are gone. Several workers call it at once; one does the work, the others
-- skip (DDL on a hot partitioned table should not queue up behind itself).
CREATE FUNCTION usage_log_maintain(p_retention_days integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    n integer := 0;
BEGIN
    IF NOT pg_try_advisory_xact_lock(7370601) THEN
        RETURN 0;
    END IF;
    n := usage_log_ensure_partitions(today, 4);
    IF p_retention_days > 0 THEN
        PERFORM usage_log_drop_before(today - p_retention_days);
    END IF;
    RETURN n;
END $$;

SELECT usage_log_ensure_partitions((now() AT TIME ZONE 'UTC')::date, 4);

-- Hourly aggregates, upserted by the flusher in the same transaction as the rows they
-- summarise, so usage and health views never scan the log itself.
CREATE TABLE usage_hourly (
    hour                timestamptz NOT NULL,
    user_id             bigint      NOT NULL,
    key_id              bigint      NOT NULL,
    group_name          text        NOT NULL,
    model               text        NOT NULL,
    requests            bigint      NOT NULL DEFAULT 0,
    errors              bigint      NOT NULL DEFAULT 0,   -- status >= 400 or an error code
    input_tokens        bigint      NOT NULL DEFAULT 0,
    output_tokens       bigint      NOT NULL DEFAULT 0,
    cache_read_tokens   bigint      NOT NULL DEFAULT 0,
    cache_write_tokens  bigint      NOT NULL DEFAULT 0,
    reasoning_tokens    bigint      NOT NULL DEFAULT 0,
    cost_nano           bigint      NOT NULL DEFAULT 0,
    latency_ms_sum      bigint      NOT NULL DEFAULT 0,
    ttfb_ms_sum         bigint      NOT NULL DEFAULT 0,
    last_at             timestamptz NOT NULL,
    PRIMARY KEY (hour, user_id, key_id, group_name, model)
);
CREATE INDEX usage_hourly_user_idx  ON usage_hourly (user_id, hour);
CREATE INDEX usage_hourly_key_idx   ON usage_hourly (key_id, hour);
CREATE INDEX usage_hourly_model_idx ON usage_hourly (model, hour);

-- Redemption codes are bearer secrets: only their SHA-256 is stored (they carry 80
-- random bits, so a fast hash is enough), plus a short prefix to recognise one in a list.
CREATE SEQUENCE redemption_batch_seq;
CREATE TABLE redemption_codes (
    code_hash    bytea       PRIMARY KEY,
    prefix       text        NOT NULL,
    amount_nano  bigint      NOT NULL CHECK (amount_nano > 0),
    batch_id     bigint      NOT NULL,
    expires_at   timestamptz NULL,
    redeemed_by  bigint      NULL,
    redeemed_at  timestamptz NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX redemption_codes_batch_idx ON redemption_codes (batch_id);
