-- Grants are refused for what the mapping says (a stale event: `refused` on the delivery,
-- applied to its approves), and an end revokes only what was approved under its subject: a
-- request it names that was not is stored refused (`p0_relay_unbound_reason`). Each job of
-- a batch's answer carries its own refusal. A job stored refused decides nothing, so it is
-- never a request's latest decision: not when an end looks for what is still granted, nor
-- when a new decision looks for one to coalesce with. `checked_at` is when a gated approve's on-call
-- check passed; outcomes record it.
ALTER TABLE jobs ADD COLUMN checked_at BIGINT;
