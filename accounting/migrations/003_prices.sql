-- Price versions: one row per (model, price) change, append-only.
--
-- id is the version id a usage row points to (usage_log.price_version), so a row is
-- never updated or deleted: an old request must stay explainable with the exact price
-- it was charged at. The current price of a model is its row with the highest id.
-- Money is int64 nano-USD per 1M tokens, never numeric or float.
--
-- Workers poll `id > last seen id` about once a second (accounting.pricing.load_since).
-- That is only safe if ids become visible in increasing order: two writers could take
-- ids 10 and 11 and commit 11 first, and a poller that saw 11 would skip 10 forever.
-- A statement-level trigger therefore takes a transaction-scoped advisory lock BEFORE
-- any id is drawn, so writers draw and commit ids one transaction at a time. Each new
-- row is also announced on channel `tollway_prices` for listeners that want it sooner.

CREATE TABLE prices (
    id          bigserial PRIMARY KEY,
    model       text        NOT NULL CHECK (model <> ''),
    input       bigint      NOT NULL CHECK (input >= 0),
    output      bigint      NOT NULL CHECK (output >= 0),
    cache_read  bigint      NOT NULL CHECK (cache_read >= 0),
    cache_write bigint      NOT NULL CHECK (cache_write >= 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  text        NOT NULL DEFAULT ''
);

CREATE INDEX prices_model_id ON prices (model, id DESC);

CREATE FUNCTION prices_serialize_writers() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- 0x70726963 = "pric": any constant private to this table.
    PERFORM pg_advisory_xact_lock(1886546275);
    RETURN NULL;
END $$;

CREATE TRIGGER prices_serialize_writers
    BEFORE INSERT ON prices
    FOR EACH STATEMENT EXECUTE FUNCTION prices_serialize_writers();

CREATE FUNCTION prices_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tollway_prices', NEW.id::text);
    RETURN NULL;
END $$;

CREATE TRIGGER prices_notify
    AFTER INSERT ON prices
    FOR EACH ROW EXECUTE FUNCTION prices_notify();

CREATE FUNCTION prices_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'prices is append-only: set a new price version instead of changing version %', OLD.id;
END $$;

CREATE TRIGGER prices_append_only
    BEFORE UPDATE OR DELETE ON prices
    FOR EACH ROW EXECUTE FUNCTION prices_append_only();
