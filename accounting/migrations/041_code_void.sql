-- A redemption code an operator voided (a batch sold by mistake, a leaked list): it can
-- no longer be redeemed. Voiding also ends its validity (expires_at), so redemption
-- refuses it by the same check as an expired code.
ALTER TABLE redemption_codes ADD COLUMN voided_at timestamptz NULL;
