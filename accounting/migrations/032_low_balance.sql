-- Low-balance alerts (accounting/alerts.py): a worker looks every minute for users whose
-- balance fell below the threshold they set on the Account page. Most users set none,
-- so the look goes through this partial index instead of reading every user.
CREATE INDEX IF NOT EXISTS users_low_balance ON users (id) WHERE low_balance_nano > 0;
