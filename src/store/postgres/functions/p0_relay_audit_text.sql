-- Writes audit events given as text (store::audit), as the last statement of a transaction:
-- `names[i]` is the i-th event's name and `tails[i]` its body's JSON text after the ID and
-- time, up to and with the closing brace. The IDs come from audit_head, whose row lock is then held until the
-- transaction commits, so IDs follow commit order without gaps, whichever relay writes. Each
-- body is `{"id":ID,"time":"TIME",` and its tail; its digest SHA-256 over the ID and time
-- (8 bytes each, big-endian), the name, a zero byte and the body, as the Rust side computes
-- it. Returns the bodies written, in ID order.
CREATE OR REPLACE FUNCTION p0_relay_audit_text(names TEXT[], tails TEXT[], now_ms BIGINT)
RETURNS JSONB LANGUAGE plpgsql AS $fn$
DECLARE
    n        INTEGER := COALESCE(cardinality(names), 0);
    first_id BIGINT;
    head     TEXT;
    written  JSONB;
BEGIN
    IF n = 0 THEN
        RETURN '[]'::JSONB;
    END IF;
    UPDATE audit_head SET last_id = last_id + n RETURNING last_id - n INTO first_id;
    head := ',"time":"'
            || to_char(to_timestamp(now_ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
            || '.' || lpad((now_ms % 1000)::TEXT, 3, '0') || 'Z",';
    WITH written_rows AS (
        INSERT INTO audit_events (id, at, event, body, digest)
        SELECT b.id, now_ms, b.name, b.body,
               sha256(int8send(b.id) || int8send(now_ms) || convert_to(b.name, 'UTF8')
                      || '\x00'::BYTEA || convert_to(b.body, 'UTF8'))
        FROM (SELECT first_id + u.i AS id, u.name,
                     '{"id":' || (first_id + u.i) || head || u.tail AS body
              FROM unnest(names, tails) WITH ORDINALITY AS u(name, tail, i)) b
        RETURNING id, body
    )
    SELECT jsonb_agg(body ORDER BY id) INTO written FROM written_rows;
    RETURN COALESCE(written, '[]'::JSONB);
END
$fn$;
