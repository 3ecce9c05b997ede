-- Audit events given as JSON (store::audit::AuditEvent: the body but its ID and time) as
-- p0_relay_audit_text takes them: each event's name, and its body's text after the ID and
-- time. An event that names its `source` comes without nulls and its text is used as it is.
-- One without `source` is about the job its `job_id` names (and that job's delivery): those
-- fields are looked up by the job's key (a scalar subquery, run only for those: joined, it was
-- planned as a scan of every job) and written before the event's own, as text (building each
-- as JSONB and printing it cost more than the rest of the write).
CREATE OR REPLACE FUNCTION p0_relay_event_texts(events JSONB, OUT names TEXT[],
                                                OUT tails TEXT[])
LANGUAGE plpgsql AS $fn$
BEGIN
    SELECT array_agg(x.ev ->> 'event' ORDER BY x.i),
           array_agg(CASE WHEN x.ev ? 'source' THEN ''
                          ELSE COALESCE((
                              SELECT COALESCE('"source":' || to_json(j.source)::TEXT || ',', '')
                                     || COALESCE('"rule":' || to_json(d.rule)::TEXT || ',', '')
                                     || COALESCE('"actor":' || to_json(d.actor)::TEXT || ',', '')
                                     || COALESCE('"action":' || to_json(j.action)::TEXT || ',', '')
                                     || COALESCE('"request_id":' || to_json(j.request_id)::TEXT
                                                 || ',', '')
                                     || COALESCE('"org":' || to_json(j.org)::TEXT || ',', '')
                                     || COALESCE('"subject":' || to_json(j.subject)::TEXT || ',', '')
                                     || COALESCE('"delivery":' || to_json(d.dedup_key)::TEXT || ',',
                                                 '')
                              FROM jobs j LEFT JOIN deliveries d ON d.id = j.delivery_id
                              WHERE j.id = (x.ev ->> 'job_id')::BIGINT), '')
                     END || substr(x.ev::TEXT, 2) ORDER BY x.i)
      INTO names, tails
    FROM jsonb_array_elements(COALESCE(events, '[]')) WITH ORDINALITY AS x(ev, i);
END
$fn$;
