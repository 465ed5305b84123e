-- Subscription plans, subscriptions, plan codes, and the growth tables (invite codes).
--
-- A plan is what an operator sells; a subscription is one user's purchase of it. The
-- terms that decide money (credit, validity, periodic credit and its reset cycle) are
-- copied onto the subscription when it is bought, so editing a plan never changes what
-- someone already paid for. A key draws on a subscription when keys.plan_id holds the
-- subscription's id (the column's name predates subscriptions: it is the id of the
-- subscription, not of the plan).
--
-- The ledger flusher adds to subscriptions.used_nano / period_used_nano in its own
-- transaction (accounting.plans.charge); like its key updates, those do not bump the
-- change-feed version (migration 004), so workers re-read plan keys only when an
-- operator or the owner changed the subscription itself (renewal, cancellation...).

CREATE TABLE plans (
    id               bigserial PRIMARY KEY,
    name             text NOT NULL UNIQUE CHECK (name <> ''),
    price_nano       bigint NOT NULL DEFAULT 0 CHECK (price_nano >= 0),
    credit_nano      bigint NOT NULL CHECK (credit_nano >= 0),        -- per term
    validity         text NOT NULL CHECK (validity IN ('day', 'week', 'month', 'custom')),
    validity_s       bigint NOT NULL DEFAULT 0 CHECK (validity_s >= 0), -- 'custom' only
    periodic_nano    bigint NOT NULL DEFAULT 0 CHECK (periodic_nano >= 0), -- 0: none
    reset            text NOT NULL DEFAULT 'none'
                     CHECK (reset IN ('none', 'daily', 'weekly', 'monthly', 'custom')),
    reset_s          bigint NOT NULL DEFAULT 0 CHECK (reset_s >= 0),   -- 'custom' only
    models           text[] NULL,                                       -- NULL: every model
    groups           text[] NOT NULL DEFAULT '{default}',
    renewal_window_s bigint NOT NULL DEFAULT 259200 CHECK (renewal_window_s >= 0),
    status           text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'archived')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    version          bigint NOT NULL DEFAULT 0
);

CREATE TABLE subscriptions (
    id               bigserial PRIMARY KEY,
    user_id          bigint NOT NULL REFERENCES users (id),
    plan_id          bigint NOT NULL REFERENCES plans (id),
    status           text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'cancelled')),
    started_at       timestamptz NOT NULL,   -- anchor of the reset cycle
    expires_at       timestamptz NOT NULL,
    cancelled_at     timestamptz NULL,
    credit_nano      bigint NOT NULL CHECK (credit_nano >= 0),  -- every term's credit so far
    used_nano        bigint NOT NULL DEFAULT 0,
    periodic_nano    bigint NOT NULL DEFAULT 0,
    reset            text NOT NULL DEFAULT 'none',
    reset_s          bigint NOT NULL DEFAULT 0,
    period_index     bigint NOT NULL DEFAULT 0,  -- the cycle period_used_nano belongs to
    period_used_nano bigint NOT NULL DEFAULT 0,
    periodic_enabled bool NOT NULL DEFAULT true,  -- the owner may draw on the total instead
    balance_fallback bool NOT NULL DEFAULT true,  -- plan first, then the user's balance
    renewals         int NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    version          bigint NOT NULL DEFAULT 0
);
CREATE INDEX subscriptions_user ON subscriptions (user_id);
CREATE INDEX subscriptions_version ON subscriptions (version);
CREATE INDEX keys_plan_id ON keys (plan_id) WHERE plan_id <> 0;

CREATE TRIGGER plans_version BEFORE INSERT OR UPDATE ON plans
    FOR EACH ROW EXECUTE FUNCTION tollway_bump_version();
CREATE TRIGGER subscriptions_version BEFORE INSERT OR UPDATE ON subscriptions
    FOR EACH ROW
    WHEN (current_setting('tollway.ledger_charge', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION tollway_bump_version();
ALTER TABLE subscriptions SET (fillfactor = 70);

-- Plan codes: like redemption codes (hash only, display prefix), but they grant a plan.
CREATE TABLE plan_codes (
    code_hash       bytea       PRIMARY KEY,
    prefix          text        NOT NULL,
    plan_id         bigint      NOT NULL REFERENCES plans (id),
    batch_id        bigint      NOT NULL,
    expires_at      timestamptz NULL,
    redeemed_by     bigint      NULL,
    redeemed_at     timestamptz NULL,
    subscription_id bigint      NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX plan_codes_batch ON plan_codes (batch_id);

-- Invite codes are meant to be shared, so they are stored as they are.
CREATE TABLE invite_codes (
    code       text PRIMARY KEY,
    inviter_id bigint NOT NULL REFERENCES users (id),
    max_uses   int NOT NULL DEFAULT 0 CHECK (max_uses >= 0),  -- 0: unlimited
    uses       int NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX invite_codes_inviter ON invite_codes (inviter_id);

-- One row per invited user. reward_topup_id is set once, by the invitee's first top-up:
-- the conditional UPDATE that sets it is what makes the inviter's reward happen once.
CREATE TABLE invites (
    invitee_id      bigint PRIMARY KEY REFERENCES users (id),
    inviter_id      bigint NOT NULL REFERENCES users (id),
    code            text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    reward_topup_id bigint NULL,
    reward_nano     bigint NOT NULL DEFAULT 0
);
CREATE INDEX invites_inviter ON invites (inviter_id);
