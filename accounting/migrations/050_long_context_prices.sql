-- The long-context price tier (issue 19, Build item 8): part of each immutable price
-- version. A request whose input (input + cache read + cache write tokens) exceeds
-- long_context_threshold is billed entirely at the long_context_* prices (nano-USD per
-- 1M tokens, like the base ones); 0 means the version has no tier, and then its
-- long-context prices are 0 too. Existing versions get no tier: an old request stays
-- explained by exactly the prices it was charged at. Adding columns with a constant
-- default rewrites nothing and fires no row trigger (prices stays append-only).
ALTER TABLE prices
    ADD COLUMN long_context_threshold   bigint NOT NULL DEFAULT 0
        CHECK (long_context_threshold >= 0 AND long_context_threshold <= 100000000),
    ADD COLUMN long_context_input       bigint NOT NULL DEFAULT 0 CHECK (long_context_input >= 0),
    ADD COLUMN long_context_output      bigint NOT NULL DEFAULT 0 CHECK (long_context_output >= 0),
    ADD COLUMN long_context_cache_read  bigint NOT NULL DEFAULT 0 CHECK (long_context_cache_read >= 0),
    ADD COLUMN long_context_cache_write bigint NOT NULL DEFAULT 0 CHECK (long_context_cache_write >= 0),
    ADD CONSTRAINT prices_long_context_tier CHECK (
        long_context_threshold > 0
        OR (long_context_input = 0 AND long_context_output = 0
            AND long_context_cache_read = 0 AND long_context_cache_write = 0));
