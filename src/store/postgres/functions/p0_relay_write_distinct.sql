-- A batch that ends no subject and whose deliveries and requests are all distinct (a storm of
-- different deliveries: the common case), in a few statements for the whole batch instead of
-- several per delivery: each statement run from PL/pgSQL costs its own executor start. The
-- same rules as p0_relay_write_each_locked; the contract tests feed both.
CREATE OR REPLACE FUNCTION p0_relay_write_distinct(deliveries JSONB, payloads BYTEA[],
                                        now_ms BIGINT, dedup_since BIGINT,
                                        coalesce_since BIGINT)
RETURNS JSONB LANGUAGE plpgsql AS $fn$
DECLARE
    results JSONB;
    created BOOLEAN;
    dup     RECORD;
    id_list BIGINT[];
BEGIN
    -- The same locks, in the same orders, as p0_relay_write_each takes (no end or reopening
    -- here, so every subject's lock is shared).
    PERFORM pg_advisory_xact_lock_shared(7002, k) FROM (
        SELECT DISTINCT hashtext((e ->> 'source') || '/' || (e ->> 'subject')) AS k
        FROM jsonb_array_elements(deliveries) e WHERE e ->> 'subject' IS NOT NULL ORDER BY 1) s;
    PERFORM pg_advisory_xact_lock(7001, k) FROM (
        SELECT DISTINCT hashtext((x ->> 'org') || '/' || (x ->> 'request_id')) AS k
        FROM jsonb_array_elements(deliveries) e, jsonb_array_elements(e -> 'decisions') x
        ORDER BY 1) s;
    -- One statement, one snapshot taken after the locks: the dedup rows, each delivery's
    -- subject end (a delivery asking to approve under an ended subject is refused whole),
    -- the latest job of each request (looked up by its index, one row each), the new jobs
    -- and the deliveries.
    WITH d AS (
        SELECT x.*, e.ordinality::INTEGER AS i
        FROM jsonb_array_elements(deliveries) WITH ORDINALITY e
        CROSS JOIN LATERAL jsonb_to_record(e.value) AS x(
            source TEXT, dedup_key TEXT, received_at BIGINT, rule TEXT, actor TEXT,
            subject TEXT, reply TEXT, gate TEXT, refused TEXT, decisions JSONB)
    ), taken AS (
        INSERT INTO dedup AS t (source, dedup_key, delivery_id, received_at)
        SELECT source, dedup_key, nextval('deliveries_id_seq'), received_at FROM d
        ORDER BY source COLLATE "C", dedup_key COLLATE "C"
        ON CONFLICT (source, dedup_key) DO UPDATE
            SET delivery_id = EXCLUDED.delivery_id, received_at = EXCLUDED.received_at
            WHERE t.received_at < dedup_since
        RETURNING t.source, t.dedup_key, t.delivery_id
    ), fresh AS (
        SELECT d.*, taken.delivery_id,
               (SELECT p0_relay_ended_reason(d.subject, se.ended_at) FROM subject_ends se
                WHERE d.subject IS NOT NULL AND se.source = d.source
                  AND se.subject = d.subject AND se.reopened_at IS NULL
                  AND EXISTS (SELECT 1 FROM jsonb_array_elements(d.decisions) y
                              WHERE y ->> 'action' = 'approve')) AS refusal
        FROM d JOIN taken USING (source, dedup_key)
    ), asked AS (
        SELECT f.i, y.j, f.delivery_id, f.source, f.subject, f.reply,
               COALESCE(f.refusal, CASE WHEN y.action = 'approve' THEN f.refused END) AS refusal,
               y.org, y.request_id, y.action, y.expiration,
               CASE WHEN y.action = 'approve' THEN f.gate END AS gate,
               l.id AS latest,
               COALESCE(f.refusal IS NULL
                        AND (y.action <> 'approve' OR f.refused IS NULL) AND l.refused IS NULL
                        AND l.action = y.action AND l.created_at >= coalesce_since
                        AND l.state IN ('pending', 'sending', 'succeeded', 'dry_run')
                        AND l.subject IS NOT DISTINCT FROM f.subject
                        AND l.gate IS NOT DISTINCT FROM
                            CASE WHEN y.action = 'approve' THEN f.gate END
                        AND (f.subject IS NULL OR l.source = f.source), false) AS coalesced
        FROM fresh f
        CROSS JOIN LATERAL ROWS FROM (jsonb_to_recordset(f.decisions)
            AS (org TEXT, request_id TEXT, action TEXT, expiration TEXT))
            WITH ORDINALITY AS y(org, request_id, action, expiration, j)
        LEFT JOIN LATERAL (SELECT jb.id, jb.action, jb.state, jb.created_at, jb.source,
                                  jb.subject, jb.refused, jb.gate
                           FROM jobs jb WHERE jb.org = y.org AND jb.request_id = y.request_id
                             AND jb.refused IS NULL
                           ORDER BY jb.id DESC LIMIT 1) l ON true
    ), numbered AS (
        SELECT a.*, CASE WHEN a.coalesced THEN a.latest ELSE nextval('jobs_id_seq') END AS jid
        FROM (SELECT * FROM asked ORDER BY i, j) a
    ), new_jobs AS (
        INSERT INTO jobs (id, delivery_id, source, org, request_id, action, expiration, state,
                          next_attempt_at, window_start, created_at, updated_at, subject, reply,
                          refused, gate)
        SELECT jid, delivery_id, source, org, request_id, action, expiration, 'pending',
               now_ms, now_ms, now_ms, now_ms, subject, reply, refusal, gate
        FROM numbered WHERE NOT coalesced
        RETURNING id
    ), per_delivery AS (
        SELECT i, array_agg(jid ORDER BY j) AS ids,
               jsonb_agg(jsonb_build_array(jid, coalesced, refusal) ORDER BY j) AS jobs
        FROM numbered GROUP BY i
    ), new_deliveries AS (
        INSERT INTO deliveries (id, source, dedup_key, received_at, rule, actor, payload, job_ids)
        SELECT f.delivery_id, f.source, f.dedup_key, f.received_at, f.rule, f.actor,
               payloads[f.i], COALESCE(p.ids, '{}')
        FROM fresh f LEFT JOIN per_delivery p ON p.i = f.i
    )
    SELECT jsonb_agg(CASE WHEN f.i IS NULL THEN NULL
                          ELSE jsonb_build_object('jobs', COALESCE(p.jobs, '[]'),
                                                  'bound', '[]'::JSONB, 'refused', f.refusal,
                                                  'reopened', false)
                     END ORDER BY d.i),
           (SELECT count(*) > 0 FROM new_jobs)
      INTO results, created
    FROM d LEFT JOIN fresh f ON f.i = d.i LEFT JOIN per_delivery p ON p.i = d.i;
    -- Deliveries seen before (rare: a sender's retry) are answered with the jobs they made,
    -- read in a snapshot of their own, which sees a delivery committed while this one waited.
    FOR dup IN
        SELECT d.ordinality::INTEGER AS i, d.value ->> 'source' AS source,
               d.value ->> 'dedup_key' AS dedup_key
        FROM jsonb_array_elements(deliveries) WITH ORDINALITY d
        WHERE results -> (d.ordinality::INTEGER - 1) = 'null'::JSONB
    LOOP
        SELECT dl.job_ids INTO id_list FROM dedup x JOIN deliveries dl ON dl.id = x.delivery_id
        WHERE x.source = dup.source AND x.dedup_key = dup.dedup_key;
        results := jsonb_set(results, ARRAY[(dup.i - 1)::TEXT],
                             jsonb_build_object('dup', to_jsonb(COALESCE(id_list, '{}'))));
    END LOOP;
    IF created THEN
        PERFORM pg_notify('p0_relay_jobs', '');
    END IF;
    RETURN results;
END
$fn$;
