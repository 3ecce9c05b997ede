-- The audit events are built as text: p0_relay_write writes its deliveries' events by
-- concatenation, in the field order of the relay's own bodies (store::audit::Body), where it
-- built each as JSONB and printed it; p0_relay_audit_text (new) numbers and writes events
-- given as their names and texts; p0_relay_event_texts (new) takes events as the relay now
-- sends them (as [name, text] when nothing needs looking up, else as JSON completed from the
-- job they are about), and p0_relay_audit and p0_relay_write go through it. No table changes: the version says which
-- relays know the functions' bodies.
SELECT 1;
