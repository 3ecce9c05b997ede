-- Audit events as p0_relay_audit_text takes them: each event's name, and its body's text after
-- the ID and time. The relay sends an event that needs nothing looked up as [name, text]
-- (postgres::audit::events_json: written as the relay writes a body, the same bytes as on
-- SQLite), used as it is; one about a stored job as the JSON of store::audit::AuditEvent (the
-- body but its ID and time, without nulls): that job's and its delivery's fields are looked
-- up by the job's key (a scalar subquery, run only for those: joined, it was planned as a
-- scan of every job), merged under the event's own, nulls left out, and printed from JSONB.
CREATE OR REPLACE FUNCTION p0_relay_event_texts(events JSONB, OUT names TEXT[],
                                                OUT tails TEXT[])
LANGUAGE plpgsql AS $fn$
BEGIN
    SELECT array_agg(CASE WHEN jsonb_typeof(x.ev) = 'array' THEN x.ev ->> 0
                          ELSE x.ev ->> 'event' END ORDER BY x.i),
           array_agg(CASE WHEN jsonb_typeof(x.ev) = 'array' THEN x.ev ->> 1
                          ELSE substr(jsonb_strip_nulls(COALESCE((
                                   SELECT jsonb_build_object(
                                              'source', j.source, 'rule', d.rule,
                                              'actor', d.actor, 'action', j.action,
                                              'request_id', j.request_id, 'org', j.org,
                                              'subject', j.subject, 'delivery', d.dedup_key)
                                   FROM jobs j LEFT JOIN deliveries d ON d.id = j.delivery_id
                                   WHERE j.id = (x.ev ->> 'job_id')::BIGINT), '{}'::JSONB)
                                   || x.ev)::TEXT, 2) END ORDER BY x.i)
      INTO names, tails
    FROM jsonb_array_elements(COALESCE(events, '[]')) WITH ORDINALITY AS x(ev, i);
END
$fn$;
