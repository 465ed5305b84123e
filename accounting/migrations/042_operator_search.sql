-- The operator's key search by prefix (relay/console/admin/keys.py): a prefix match
-- walks this index instead of every key.
CREATE INDEX keys_prefix ON keys (key_prefix text_pattern_ops);
