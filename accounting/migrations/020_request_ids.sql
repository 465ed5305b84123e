-- One request, three ids: the gateway's (request_id), the client's (client_request_id)
-- and, new here, the channel's own id for it and the id of the response body the client
-- saw (chatcmpl-…, msg_…, resp_…), so an operator or a key holder can find the row from
-- whichever one they hold. Existing rows read '' (not recorded).
ALTER TABLE usage_log ADD COLUMN IF NOT EXISTS upstream_request_id text NOT NULL DEFAULT '';
ALTER TABLE usage_log ADD COLUMN IF NOT EXISTS response_id text NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS usage_log_response_id_idx ON usage_log (response_id)
    WHERE response_id <> '';
