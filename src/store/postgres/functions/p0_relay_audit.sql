-- Writes audit events (store::audit), as the last statement of a transaction: the IDs come
-- from audit_head, whose row lock is then held until the transaction commits, so IDs follow
-- commit order without gaps, whichever relay writes. An event without `source` is about the
-- job its `job_id` names (and that job's delivery). Its body is the event's JSON with its ID
-- and time first, nulls left out (an event that names its `source` comes with none, and its
-- text is used as it is: rebuilding it as JSONB cost more than the rest of the write); its
-- digest is SHA-256 over the ID and time (8 bytes each,
-- big-endian), the event's name, a zero byte and the body, as the Rust side computes it.
-- Returns the bodies written, in ID order.
CREATE OR REPLACE FUNCTION p0_relay_audit(events JSONB, now_ms BIGINT)
RETURNS JSONB LANGUAGE plpgsql AS $fn$
DECLARE
    n        INTEGER := COALESCE(jsonb_array_length(events), 0);
    first_id BIGINT;
    stamp    TEXT;
    written  JSONB;
BEGIN
    IF n = 0 THEN
        RETURN '[]'::JSONB;
    END IF;
    UPDATE audit_head SET last_id = last_id + n RETURNING last_id - n INTO first_id;
    stamp := to_char(to_timestamp(now_ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
             || '.' || lpad((now_ms % 1000)::TEXT, 3, '0') || 'Z';
    WITH e AS (
        SELECT first_id + x.i AS id, x.ev
        FROM jsonb_array_elements(events) WITH ORDINALITY AS x(ev, i)
    ), bodies AS (
        -- What an event without `source` is about, looked up by its job's key (a scalar
        -- subquery, run only for those: joined, it was planned as a scan of every job).
        SELECT e.id, e.ev ->> 'event' AS event,
               '{"id":' || e.id || ',"time":"' || stamp || '",'
               || substr(CASE WHEN e.ev ? 'source' THEN e.ev
                              ELSE jsonb_strip_nulls(COALESCE((
                                  SELECT jsonb_build_object(
                                             'source', j.source, 'rule', d.rule,
                                             'actor', d.actor, 'action', j.action,
                                             'request_id', j.request_id, 'org', j.org,
                                             'subject', j.subject, 'delivery', d.dedup_key)
                                  FROM jobs j LEFT JOIN deliveries d ON d.id = j.delivery_id
                                  WHERE j.id = (e.ev ->> 'job_id')::BIGINT), '{}'::JSONB)
                                  || e.ev)
                         END::TEXT, 2) AS body
        FROM e
    ), written_rows AS (
        INSERT INTO audit_events (id, at, event, body, digest)
        SELECT id, now_ms, event, body,
               sha256(int8send(id) || int8send(now_ms) || convert_to(event, 'UTF8')
                      || '\x00'::BYTEA || convert_to(body, 'UTF8'))
        FROM bodies
        RETURNING id, body
    )
    SELECT jsonb_agg(body ORDER BY id) INTO written FROM written_rows;
    RETURN COALESCE(written, '[]'::JSONB);
END
$fn$;
