-- Self-service accounts and console sessions (relay/console, accounting/accounts.py,
-- accounting/sessions.py).
--
-- A user who signs in to the console has an email and an argon2id password hash; users
-- created by an admin have neither until they follow a one-time setup link. Sign-up
-- credits wait for the email's verification (`pending_invite` keeps the invite code
-- until then). Console sessions store only the SHA-256 of their token; a session ended
-- by the device limit, a password change or a revocation keeps its row with the reason,
-- so the browser holding it is told why it was signed out.

ALTER TABLE users
    ADD COLUMN email            text NULL,
    ADD COLUMN password_hash    text NULL,
    ADD COLUMN email_verified   bool NOT NULL DEFAULT false,
    ADD COLUMN role             text NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
    ADD COLUMN lang             text NOT NULL DEFAULT 'en',
    ADD COLUMN tz               text NOT NULL DEFAULT 'UTC',
    ADD COLUMN max_devices      int NULL CHECK (max_devices IS NULL OR max_devices >= 1),
    ADD COLUMN totp_secret      text NULL,
    ADD COLUMN totp_enabled     bool NOT NULL DEFAULT false,
    ADD COLUMN pending_invite   text NULL,
    ADD COLUMN credits_granted  bool NOT NULL DEFAULT true,
    ADD COLUMN low_balance_nano bigint NOT NULL DEFAULT 0 CHECK (low_balance_nano >= 0),
    ADD COLUMN low_balance_sent_at timestamptz NULL;
CREATE UNIQUE INDEX users_email ON users (lower(email)) WHERE email IS NOT NULL;

CREATE TABLE console_sessions (
    id          bigserial PRIMARY KEY,
    user_id     bigint NOT NULL REFERENCES users (id),
    token_hash  bytea NOT NULL UNIQUE,
    csrf        text NOT NULL,
    mfa_pending bool NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,                 -- the absolute expiry
    ip          text NOT NULL DEFAULT '',
    user_agent  text NOT NULL DEFAULT '',
    ended_at    timestamptz NULL,
    ended_why   text NOT NULL DEFAULT ''             -- logout, device_limit, password, revoked, 2fa
);
CREATE INDEX console_sessions_user ON console_sessions (user_id, created_at) WHERE ended_at IS NULL;

-- Short codes sent by email (verification, password reset) and one-time setup links:
-- only their hash is kept; each allows a few attempts.
CREATE TABLE account_codes (
    id         bigserial PRIMARY KEY,
    user_id    bigint NOT NULL REFERENCES users (id),
    purpose    text NOT NULL CHECK (purpose IN ('verify', 'reset', 'setup')),
    code_hash  bytea NOT NULL,
    attempts   int NOT NULL DEFAULT 0,
    expires_at timestamptz NOT NULL,
    used_at    timestamptz NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX account_codes_user ON account_codes (user_id, purpose, created_at);

CREATE TABLE recovery_codes (
    user_id   bigint NOT NULL REFERENCES users (id),
    code_hash bytea NOT NULL,
    used_at   timestamptz NULL,
    PRIMARY KEY (user_id, code_hash)
);

-- Balance transfers between users: each is one row, keyed by the sender's idempotency
-- token, so a repeated submission moves the money once.
CREATE TABLE transfers (
    id          bigserial PRIMARY KEY,
    from_user   bigint NOT NULL REFERENCES users (id),
    to_user     bigint NOT NULL REFERENCES users (id),
    amount_nano bigint NOT NULL CHECK (amount_nano > 0),
    idem        text NOT NULL UNIQUE,
    note        text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX transfers_from ON transfers (from_user, created_at);
CREATE INDEX transfers_to ON transfers (to_user, created_at);

CREATE TABLE announcements (
    id         bigserial PRIMARY KEY,
    title      text NOT NULL,
    body       text NOT NULL DEFAULT '',
    starts_at  timestamptz NOT NULL DEFAULT now(),
    ends_at    timestamptz NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
