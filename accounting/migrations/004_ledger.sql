-- Ledger round two: the multiplier each row was priced with, and a leaner usage_log.
--
-- `multiplier` is the exact fraction (as text, e.g. '4/5') the request's cost was
-- multiplied by, so `usage show` reproduces an old bill even after the group's
-- multiplier changed. Rows written before this migration read '' ("not recorded":
-- reports fall back to the group's multiplier); rows inserted without one read '1'.
-- Both steps are catalog-only (a constant default), even on a large partitioned table.
ALTER TABLE usage_log ADD COLUMN multiplier text NOT NULL DEFAULT '';
ALTER TABLE usage_log ALTER COLUMN multiplier SET DEFAULT '1';

-- Every index on usage_log is paid on each of the flusher's rows. Per-model figures
-- come from usage_hourly (usage_hourly_model_idx); the request log narrowed by model
-- walks usage_log_ts_idx newest first and filters, which stays cheap for any model
-- that has traffic. Kept: the primary key (idempotency), ts (request log order),
-- key and user (request log filters), the partial client request id index.
DROP INDEX IF EXISTS usage_log_model_idx;

-- The flusher updates each (hour, user, key, group, model) row of usage_hourly many
-- times an hour; free space on the page lets those updates be HOT (no index writes).
-- Applies to pages written from now on.
ALTER TABLE usage_hourly SET (fillfactor = 70);

-- The flusher adds to keys.spent_nano for every key charged in a batch (thousands per
-- transaction). Through the change-feed trigger each of those updates also drew a
-- sequence value and changed the indexed `version`, so none could be a HOT update
-- (four index entries written per key per batch) and every worker's key cache then
-- re-read every charged key on its next poll, although nothing it caches had changed.
-- Spend is not part of the feed: workers read keys.spent_nano by id on every sync
-- (relay.worker._sync_once). So the flusher marks its transaction, and a key update
-- made there does not bump `version`. Any other update of keys, including one of
-- spent_nano by an operator, still does.
DROP TRIGGER keys_version ON keys;
CREATE TRIGGER keys_version BEFORE INSERT OR UPDATE ON keys
    FOR EACH ROW
    WHEN (current_setting('tollway.ledger_charge', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION tollway_bump_version();
-- Room on each page for those HOT updates (applies to pages written from now on).
ALTER TABLE keys SET (fillfactor = 70);
