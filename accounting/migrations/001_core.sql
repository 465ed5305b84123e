-- Core schema: users, groups, keys, channels, the topup journal and the audit log.
--
-- Change feed: every row of a watched table carries `version`, stamped from one
-- sequence by a trigger on INSERT and UPDATE. Workers poll `WHERE version > $1`
-- (indexed) about twice a second and so see a disabled key, a topped-up balance or an
-- edited group within a second, without LISTEN/NOTIFY connections per worker.
-- Rows are never deleted from watched tables (keys go to status 'deleted'), so a
-- poller always sees the last state of a row. Money columns are bigint nano-USD.

CREATE SEQUENCE tollway_change_seq;

CREATE FUNCTION tollway_bump_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.version := nextval('tollway_change_seq');
    RETURN NEW;
END
$$;

CREATE TABLE users (
    id           bigserial PRIMARY KEY,
    name         text NOT NULL UNIQUE,
    status       text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    balance_nano bigint NOT NULL DEFAULT 0,
    concurrency  int NOT NULL DEFAULT 0 CHECK (concurrency >= 0),
    rpm          int NOT NULL DEFAULT 0 CHECK (rpm >= 0),
    tpm          int NOT NULL DEFAULT 0 CHECK (tpm >= 0),
    max_ips      int NOT NULL DEFAULT 0 CHECK (max_ips >= 0),
    created_at   timestamptz NOT NULL DEFAULT now(),
    version      bigint NOT NULL DEFAULT 0
);

CREATE TABLE groups (
    name       text PRIMARY KEY,
    multiplier text NOT NULL DEFAULT '1',   -- exact decimal or fraction, e.g. '0.8', '2/3'
    models     text[] NOT NULL DEFAULT '{*}',
    version    bigint NOT NULL DEFAULT 0
);

CREATE TABLE keys (
    id            bigserial PRIMARY KEY,
    user_id       bigint NOT NULL REFERENCES users (id),
    name          text NOT NULL DEFAULT '',
    key_hash      bytea NOT NULL UNIQUE,       -- sha256 of the secret; the secret is never stored
    key_prefix    text NOT NULL,               -- first 8 characters, for display only
    status        text NOT NULL DEFAULT 'active'
                  CHECK (status IN ('active', 'disabled', 'deleted')),
    expires_at    timestamptz NULL,
    models        text[] NULL,                 -- NULL: every model the group reaches
    group_name    text NOT NULL DEFAULT 'default' REFERENCES groups (name) ON UPDATE CASCADE,
    cap_nano      bigint NOT NULL DEFAULT 0 CHECK (cap_nano >= 0),   -- 0: no cap
    spent_nano    bigint NOT NULL DEFAULT 0,
    concurrency   int NOT NULL DEFAULT 0 CHECK (concurrency >= 0),
    rpm           int NOT NULL DEFAULT 0 CHECK (rpm >= 0),
    tpm           int NOT NULL DEFAULT 0 CHECK (tpm >= 0),
    allowed_cidrs text[] NOT NULL DEFAULT '{}',
    plan_id       bigint NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    version       bigint NOT NULL DEFAULT 0
);
CREATE INDEX keys_user_id ON keys (user_id);

CREATE TABLE channels (
    id              bigserial PRIMARY KEY,
    name            text NOT NULL UNIQUE,
    protocol        text NOT NULL CHECK (protocol IN ('openai', 'anthropic')),
    base_url        text NOT NULL,
    api_key_env     text NOT NULL DEFAULT '',  -- the variable's name; credentials stay out of the database
    models          text[] NOT NULL DEFAULT '{*}',
    model_map       jsonb NOT NULL DEFAULT '{}',
    headers         jsonb NOT NULL DEFAULT '{}',
    priority        int NOT NULL DEFAULT 0,
    weight          int NOT NULL DEFAULT 1 CHECK (weight >= 0),
    max_concurrency int NOT NULL DEFAULT 0 CHECK (max_concurrency >= 0),
    enabled         bool NOT NULL DEFAULT true,
    source          text NOT NULL DEFAULT 'admin' CHECK (source IN ('config', 'admin')),
    version         bigint NOT NULL DEFAULT 0
);

CREATE TRIGGER users_version BEFORE INSERT OR UPDATE ON users
    FOR EACH ROW EXECUTE FUNCTION tollway_bump_version();
CREATE TRIGGER groups_version BEFORE INSERT OR UPDATE ON groups
    FOR EACH ROW EXECUTE FUNCTION tollway_bump_version();
CREATE TRIGGER keys_version BEFORE INSERT OR UPDATE ON keys
    FOR EACH ROW EXECUTE FUNCTION tollway_bump_version();
CREATE TRIGGER channels_version BEFORE INSERT OR UPDATE ON channels
    FOR EACH ROW EXECUTE FUNCTION tollway_bump_version();

CREATE INDEX users_version ON users (version);
CREATE INDEX groups_version ON groups (version);
CREATE INDEX keys_version ON keys (version);
CREATE INDEX channels_version ON channels (version);

INSERT INTO groups (name) VALUES ('default');

-- Journal of credits: every change of a balance by an operator or a payment lands here
-- in the same transaction as the balance update. external_id makes a payment
-- provider's retry a no-op.
CREATE TABLE topups (
    id          bigserial PRIMARY KEY,
    user_id     bigint NOT NULL REFERENCES users (id),
    amount_nano bigint NOT NULL,
    external_id text NULL UNIQUE,
    note        text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX topups_user_id ON topups (user_id, created_at);

-- Who changed what. `detail` never holds a secret (no key material, no tokens).
CREATE TABLE audit_log (
    id     bigserial PRIMARY KEY,
    at     timestamptz NOT NULL DEFAULT now(),
    actor  text NOT NULL,
    action text NOT NULL,
    target text NOT NULL DEFAULT '',
    detail jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_at ON audit_log (at);
