-- Writes a batch one delivery at a time, its locks held (p0_relay_write_each takes them).
-- The rules it keeps, also kept in Rust by the SQLite store (`store::sqlite::jobs`), for one
-- round trip per batch: dedup by (source, key) within the window; an approve under an ended
-- subject refused whole; a stale approve refused; an end's named request revoked only if it
-- is granted under the subject; coalescing with the latest decision not refused; an end's
-- revocations of what is still granted under its subject. Outcomes are recorded by
-- p0_relay_write, which passes none here.
CREATE OR REPLACE FUNCTION p0_relay_write_each_locked(deliveries JSONB, payloads BYTEA[],
                               records JSONB, now_ms BIGINT, dedup_since BIGINT,
                               coalesce_since BIGINT)
RETURNS JSONB LANGUAGE plpgsql AS $fn$
DECLARE
    d            RECORD;
    dcn          RECORD;
    results      JSONB[] := array_fill(NULL::JSONB, ARRAY[jsonb_array_length(deliveries)]);
    del_id       BIGINT;
    taken        BIGINT;
    latest       RECORD;
    jid          BIGINT;
    job_list     JSONB;
    id_list      BIGINT[];
    created      BOOLEAN := false;
    g            RECORD;
    bound_list   JSONB;
    refusal      TEXT;
    dec_refusal  TEXT;
    was_reopened BOOLEAN;
    end_at       BIGINT;
BEGIN
    -- Delivery keys are taken in one global order (the unique index makes a second taker
    -- wait for the first to commit or roll back). Ends come after every other delivery of
    -- the batch, so an end sees the approves it shares a batch with.
    FOR d IN
        SELECT x.*, e.ordinality::INTEGER AS i
        FROM jsonb_array_elements(deliveries) WITH ORDINALITY e
        CROSS JOIN LATERAL jsonb_to_record(e.value) AS x(
            source TEXT, dedup_key TEXT, received_at BIGINT, rule TEXT, actor TEXT,
            subject TEXT, reply TEXT, ends_subject BOOLEAN, reopens_subject BOOLEAN,
            gate TEXT, refused TEXT, decisions JSONB)
        ORDER BY COALESCE(x.ends_subject, false), x.source COLLATE "C",
                 x.dedup_key COLLATE "C", e.ordinality
    LOOP
        del_id := nextval('deliveries_id_seq');
        taken := NULL;
        INSERT INTO dedup AS x (source, dedup_key, delivery_id, received_at)
        VALUES (d.source, d.dedup_key, del_id, d.received_at)
        ON CONFLICT (source, dedup_key) DO UPDATE
            SET delivery_id = EXCLUDED.delivery_id, received_at = EXCLUDED.received_at
            WHERE x.received_at < dedup_since
        RETURNING x.delivery_id INTO taken;
        IF taken IS NULL THEN
            SELECT dl.job_ids INTO id_list FROM dedup x JOIN deliveries dl ON dl.id = x.delivery_id
            WHERE x.source = d.source AND x.dedup_key = d.dedup_key;
            results[d.i] := jsonb_build_object('dup', to_jsonb(COALESCE(id_list, '{}')));
            CONTINUE;
        END IF;
        -- A subject that ended stays ended: a delivery asking to approve under it is refused
        -- whole, unless the delivery itself reopens it.
        refusal := NULL;
        was_reopened := false;
        IF d.subject IS NOT NULL THEN
            IF COALESCE(d.reopens_subject, false) THEN
                UPDATE subject_ends se SET reopened_at = now_ms
                WHERE se.source = d.source AND se.subject = d.subject AND se.reopened_at IS NULL;
                was_reopened := FOUND;
            ELSIF NOT COALESCE(d.ends_subject, false) AND EXISTS (
                    SELECT 1 FROM jsonb_array_elements(d.decisions) y
                    WHERE y ->> 'action' = 'approve') THEN
                SELECT se.ended_at INTO end_at FROM subject_ends se
                WHERE se.source = d.source AND se.subject = d.subject AND se.reopened_at IS NULL;
                IF FOUND THEN
                    refusal := p0_relay_ended_reason(d.subject, end_at);
                END IF;
            END IF;
        END IF;
        job_list := '[]';
        id_list := '{}';
        FOR dcn IN
            SELECT * FROM jsonb_to_recordset(d.decisions)
                AS y(org TEXT, request_id TEXT, action TEXT, expiration TEXT)
        LOOP
            -- The latest job for this request decides: the same action still pending or
            -- done recently is not sent again, but approve, revoke, approve is three calls.
            -- Only a decision asked on the same subject coalesces, and never into one that
            -- was refused; a refused one is a job of its own.
            jid := NULL;
            -- Why this decision is stored refused: its subject ended, its approve is stale,
            -- or (an end naming a request) it was not granted under the subject that ends.
            dec_refusal := refusal;
            IF dec_refusal IS NULL AND dcn.action = 'approve' THEN
                dec_refusal := d.refused;
            ELSIF dec_refusal IS NULL AND dcn.action = 'revoke'
                  AND COALESCE(d.ends_subject, false) AND NOT EXISTS (
                    SELECT 1 FROM p0_relay_still_granted(d.source, d.subject) sg
                    WHERE sg.org = dcn.org AND sg.request_id = dcn.request_id) THEN
                dec_refusal := p0_relay_unbound_reason(dcn.request_id, COALESCE(d.subject, ''));
            END IF;
            IF dec_refusal IS NULL THEN
                SELECT j.id, j.action, j.state, j.created_at, j.source, j.subject, j.refused,
                       j.gate
                INTO latest FROM jobs j
                WHERE j.org = dcn.org AND j.request_id = dcn.request_id AND j.refused IS NULL
                ORDER BY j.id DESC LIMIT 1;
                IF FOUND AND latest.action = dcn.action AND latest.created_at >= coalesce_since
                   AND latest.state IN ('pending', 'sending', 'succeeded', 'dry_run')
                   AND latest.refused IS NULL
                   AND latest.gate IS NOT DISTINCT FROM
                       (CASE WHEN dcn.action = 'approve' THEN d.gate END)
                   AND latest.subject IS NOT DISTINCT FROM d.subject
                   AND (d.subject IS NULL OR latest.source = d.source) THEN
                    jid := latest.id;
                    job_list := job_list || jsonb_build_array(jsonb_build_array(jid, true, NULL));
                END IF;
            END IF;
            IF jid IS NULL THEN
                INSERT INTO jobs (delivery_id, source, org, request_id, action, expiration, state,
                                  next_attempt_at, window_start, created_at, updated_at,
                                  subject, reply, refused, gate)
                VALUES (del_id, d.source, dcn.org, dcn.request_id,
                        dcn.action, dcn.expiration, 'pending',
                        now_ms, now_ms, now_ms, now_ms, d.subject, d.reply, dec_refusal,
                        CASE WHEN dcn.action = 'approve' THEN d.gate END)
                RETURNING id INTO jid;
                job_list := job_list || jsonb_build_array(jsonb_build_array(jid, false, dec_refusal));
                created := true;
            END IF;
            id_list := id_list || jid;
        END LOOP;
        -- The end of a subject is recorded, and revokes every request still granted under
        -- it (p0_relay_still_granted). Each revoke is queued behind its approve.
        bound_list := '[]';
        IF d.ends_subject AND d.subject IS NOT NULL THEN
            INSERT INTO subject_ends AS se (source, subject, ended_at, delivery_id)
            VALUES (d.source, d.subject, now_ms, del_id)
            ON CONFLICT (source, subject) DO UPDATE
                SET ended_at = EXCLUDED.ended_at, delivery_id = EXCLUDED.delivery_id,
                    reopened_at = NULL;
            FOR g IN
                SELECT sg.org, sg.request_id FROM p0_relay_still_granted(d.source, d.subject) sg
                ORDER BY sg.id
            LOOP
                INSERT INTO jobs (delivery_id, source, org, request_id, action, state,
                                  next_attempt_at, window_start, created_at, updated_at,
                                  subject, reply, ended_by)
                VALUES (del_id, d.source, g.org, g.request_id, 'revoke', 'pending',
                        now_ms, now_ms, now_ms, now_ms, d.subject, d.reply, del_id)
                RETURNING id INTO jid;
                bound_list := bound_list || jsonb_build_array(jsonb_build_array(jid, g.org, g.request_id));
                id_list := id_list || jid;
                created := true;
            END LOOP;
        END IF;
        -- Written once its jobs are known (no foreign key orders it before them).
        INSERT INTO deliveries (id, source, dedup_key, received_at, rule, actor, payload, job_ids)
        VALUES (del_id, d.source, d.dedup_key, d.received_at,
                d.rule, d.actor, payloads[d.i], id_list);
        results[d.i] := jsonb_build_object('jobs', job_list, 'bound', bound_list,
                                           'refused', refusal, 'reopened', was_reopened);
    END LOOP;
    IF created THEN
        PERFORM pg_notify('p0_relay_jobs', '');
    END IF;
    RETURN jsonb_build_object('results', to_jsonb(results), 'ignored', '[]'::JSONB);
END
$fn$;
