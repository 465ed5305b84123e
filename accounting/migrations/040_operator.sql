-- The operator's console (relay/console/admin, relay/ops): roles, the owner's first
-- set-up, the audit log's before/after, live settings, announcements' unread marks,
-- support tickets, and price versions scheduled for a future time.

-- Roles: an owner (everything, including other operators' roles), an admin (every
-- operator action), a viewer (every operator page, no change) and a user (none).
ALTER TABLE users DROP CONSTRAINT IF EXISTS users_role_check;
ALTER TABLE users ADD CONSTRAINT users_role_check
    CHECK (role IN ('owner', 'admin', 'viewer', 'user'));
CREATE INDEX users_operators ON users (role) WHERE role <> 'user';
ALTER TABLE users ADD COLUMN announcements_seen_at timestamptz NOT NULL DEFAULT '-infinity';
CREATE INDEX users_name_lower ON users (lower(name) text_pattern_ops);
CREATE INDEX users_email_prefix ON users (lower(email) text_pattern_ops) WHERE email IS NOT NULL;

-- The first owner's set-up link: one row at most, only the token's hash. Made at start
-- while no owner exists (the token is printed to the log), spent by the set-up page.
CREATE TABLE owner_setup (
    one        bool PRIMARY KEY DEFAULT true CHECK (one),
    token_hash bytea NOT NULL,
    expires_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- What a change replaced (`detail` keeps what it set). Neither ever holds a secret.
ALTER TABLE audit_log ADD COLUMN before jsonb NULL;
CREATE INDEX audit_log_actor ON audit_log (actor, id);
CREATE INDEX audit_log_action ON audit_log (action, id);
CREATE INDEX audit_log_target ON audit_log (target, id);

-- Settings an operator changes from the console, over config.toml's [accounts]/[growth]
-- values. Every worker re-reads them when `version` moved (checked at most once a second).
CREATE TABLE site_settings (
    name       text PRIMARY KEY,
    value      jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by text NOT NULL DEFAULT ''
);
CREATE SEQUENCE site_settings_version;

-- Announcements: Markdown source (rendered and sanitised when shown), who wrote it.
ALTER TABLE announcements ADD COLUMN created_by text NOT NULL DEFAULT '';
ALTER TABLE announcements ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX announcements_live ON announcements (starts_at DESC);

-- Support tickets: a thread between a key holder and the operators, optionally about
-- one logged request (its id, as the key holder's log shows it).
CREATE TABLE tickets (
    id         bigserial PRIMARY KEY,
    user_id    bigint NOT NULL REFERENCES users (id),
    subject    text NOT NULL CHECK (subject <> ''),
    request_id text NOT NULL DEFAULT '',
    state      text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'waiting', 'closed')),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tickets_user ON tickets (user_id, id DESC);
CREATE INDEX tickets_state ON tickets (state, updated_at DESC);

CREATE TABLE ticket_messages (
    id         bigserial PRIMARY KEY,
    ticket_id  bigint NOT NULL REFERENCES tickets (id),
    author_id  bigint NULL REFERENCES users (id),
    staff      bool NOT NULL,
    body       text NOT NULL CHECK (body <> ''),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ticket_messages_ticket ON ticket_messages (ticket_id, id);

-- A price version may take effect later than it is written: workers load it at once
-- (polling by id, as before) and switch to it at `effective_at`, each on its own clock.
-- A request keeps the version it was admitted with.
ALTER TABLE prices ADD COLUMN effective_at timestamptz NULL;
