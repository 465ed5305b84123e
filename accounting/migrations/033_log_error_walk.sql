-- A user's request log narrowed to errors (the console's Logs page, "errors only"):
-- reports.request_log walks each of the user's keys newest first. usage_log_key_error_idx
-- (key_id, status, ts) gives a key's errors in status order, so the walk read and sorted
-- every error of a busy key in the window (0.1-0.3 s for 30 days, bench/RESULTS.md
-- "Console pages at scale"); this one gives them in time order and the walk stops at
-- the page's end. Partial like the other error indexes (errors are ~2 % of rows): the
-- flusher pays it on error rows only.
CREATE INDEX IF NOT EXISTS usage_log_key_error_ts_idx ON usage_log (key_id, ts)
    WHERE status >= 400 OR error_code <> '';
