-- The audit events are built as text, not as JSONB printed: p0_relay_write writes its
-- deliveries' events by concatenation, and p0_relay_audit_text (new) writes events given as
-- their names and texts; p0_relay_event_texts (new) makes those of events given as JSON, which
-- p0_relay_audit and p0_relay_write now go through. A body's fields are in the order of the
-- relay's own (store::audit::Body). No table changes: the version says which relays know the
-- functions' bodies.
SELECT 1;
