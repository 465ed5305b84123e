-- A group may opt in to having a request's output bound lowered to what its holder can
-- afford, instead of a 402 (relay.app: the client sees finish_reason "length").
ALTER TABLE groups ADD COLUMN fit_output boolean NOT NULL DEFAULT false;
