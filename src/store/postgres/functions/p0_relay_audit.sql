-- Writes audit events given as p0_relay_event_texts takes them (postgres::audit::events_json),
-- as the last statement of a transaction (p0_relay_event_texts, then p0_relay_audit_text).
-- Returns the bodies written, in ID order.
CREATE OR REPLACE FUNCTION p0_relay_audit(events JSONB, now_ms BIGINT)
RETURNS JSONB LANGUAGE plpgsql AS $fn$
DECLARE
    t RECORD;
BEGIN
    IF COALESCE(jsonb_array_length(events), 0) = 0 THEN
        RETURN '[]'::JSONB;
    END IF;
    t := p0_relay_event_texts(events);
    RETURN p0_relay_audit_text(t.names, t.tails, now_ms);
END
$fn$;
