-- When a gated approve's on-call check passed: an approve not sent within
-- `answers.oncall_recheck_after` of it is checked again.
ALTER TABLE jobs ADD COLUMN checked_at INTEGER;
