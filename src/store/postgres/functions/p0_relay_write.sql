-- The batch's entry point, one call per transaction: a batch that ends or reopens a subject,
-- or repeats a delivery or a request, is written one delivery at a time
-- (p0_relay_write_each); any other in a few statements (p0_relay_write_distinct). Then the
-- attempt outcomes, each only under the claim it was made with, with its answers back. Last,
-- the audit events (p0_relay_audit_text): the deliveries' (as store::audit::accepted makes
-- them: per delivery in the order given, each decision `accepted` or `refused`, then its
-- end's `revoked`), those of the outcomes recorded (in job order), then `events`.
-- Returns {"results": [per delivery, in the order given: {"jobs": [[id, coalesced, refused],
-- ...], "bound": [[id, org, request], ...], "refused": ..., "reopened": ...} or {"dup": [job
-- ids]}], "ignored": [job ids whose claim was no longer held], "audit": [event bodies]}.
CREATE OR REPLACE FUNCTION p0_relay_write(deliveries JSONB, payloads BYTEA[], records JSONB,
                               events JSONB, now_ms BIGINT, dedup_since BIGINT,
                               coalesce_since BIGINT)
RETURNS JSONB LANGUAGE plpgsql AS $fn$
DECLARE
    each_one BOOLEAN;
    results  JSONB := '[]';
    ignored  JSONB := '[]';
    rec      RECORD;
    applied  INTEGER;
    kept     BIGINT[] := '{}';  -- the records applied, by their place in `records`
    made     JSONB := '[]';
    acc_names TEXT[];
    acc_tails TEXT[];
    t        RECORD;
BEGIN
    SELECT bool_or(COALESCE((e ->> 'ends_subject')::BOOLEAN, false)
                   OR COALESCE((e ->> 'reopens_subject')::BOOLEAN, false))
           OR count(*) <> count(DISTINCT (e ->> 'source', e ->> 'dedup_key'))
      INTO each_one FROM jsonb_array_elements(deliveries) e;
    IF NOT COALESCE(each_one, true) THEN
        SELECT count(*) <> count(DISTINCT (x ->> 'org', x ->> 'request_id')) INTO each_one
        FROM jsonb_array_elements(deliveries) e, jsonb_array_elements(e -> 'decisions') x;
    END IF;
    IF jsonb_array_length(deliveries) = 0 THEN
        NULL;
    ELSIF each_one THEN
        results := p0_relay_write_each(deliveries, payloads, '[]', now_ms, dedup_since,
                                       coalesce_since) -> 'results';
    ELSE
        results := p0_relay_write_distinct(deliveries, payloads, now_ms, dedup_since,
                                           coalesce_since);
    END IF;
    -- An outcome counts only from the relay that holds the claim (its token, still sending),
    -- in job order; each is found by its primary key.
    FOR rec IN
        SELECT x.*, r.n FROM jsonb_array_elements(records) WITH ORDINALITY r(v, n)
        CROSS JOIN LATERAL jsonb_to_record(r.v) AS x(
            job_id BIGINT, claim BIGINT, at BIGINT, state TEXT, attempts INTEGER,
            next_attempt_at BIGINT, status INTEGER, result TEXT, error TEXT, duration_ms BIGINT,
            evidence TEXT, checked_at BIGINT, answers JSONB, audit JSONB)
        ORDER BY x.job_id, r.n
    LOOP
        WITH done AS (
            UPDATE jobs SET state = rec.state, attempts = rec.attempts,
                            next_attempt_at = rec.next_attempt_at, last_status = rec.status,
                            last_error = rec.error, updated_at = rec.at, lease_until = NULL,
                            evidence = COALESCE(rec.evidence, evidence),
                            checked_at = COALESCE(rec.checked_at, checked_at)
            WHERE id = rec.job_id AND claim_token = rec.claim AND state = 'sending'
            RETURNING id
        ), attempt AS (
            INSERT INTO attempts (job_id, at, status, result, error, duration_ms)
            SELECT id, rec.at, rec.status, rec.result, rec.error, rec.duration_ms FROM done
        ), answered AS (
            -- Answers back are created with P0's final answer, in the same transaction.
            INSERT INTO answers (job_id, via, kind, target, body, state, next_attempt_at,
                                 window_start, created_at, updated_at)
            SELECT done.id, a ->> 'via', a ->> 'kind', a ->> 'target', a ->> 'body', 'pending',
                   rec.at, rec.at, rec.at, rec.at
            FROM done, jsonb_array_elements(COALESCE(rec.answers, '[]')) a
        )
        SELECT count(*) INTO applied FROM done;
        IF applied = 0 THEN
            ignored := ignored || to_jsonb(rec.job_id);
        ELSE
            kept := kept || rec.n;
        END IF;
    END LOOP;
    -- The recorded outcomes' events, in job order, gathered once (not appended one record
    -- at a time, which copies the growing array each time).
    SELECT COALESCE(jsonb_agg(a.v ORDER BY (r.v ->> 'job_id')::BIGINT, r.n, a.k), '[]') INTO made
    FROM jsonb_array_elements(records) WITH ORDINALITY r(v, n)
    CROSS JOIN LATERAL jsonb_array_elements(COALESCE(r.v -> 'audit', '[]')) WITH ORDINALITY a(v, k)
    WHERE r.n = ANY(kept);
    made := made || COALESCE(events, '[]');
    -- The deliveries' events as text (building each as JSONB and printing it cost more than
    -- the rest of the write), fields in the order of store::audit::Body, those unset left
    -- out: per delivery in the order given, each decision `accepted` or `refused`, then its
    -- end's `revoked`.
    WITH d AS (
        SELECT e.i, e.v,
               COALESCE(',"source":' || to_json(e.v ->> 'source')::TEXT, '')
               || COALESCE(',"rule":' || to_json(e.v ->> 'rule')::TEXT, '')
               || COALESCE(',"actor":' || to_json(e.v ->> 'actor')::TEXT, '') AS about,
               COALESCE(',"subject":' || to_json(e.v ->> 'subject')::TEXT, '')
               || COALESCE(',"delivery":' || to_json(e.v ->> 'dedup_key')::TEXT, '') AS about_end
        FROM jsonb_array_elements(deliveries) WITH ORDINALITY e(v, i)
    )
    SELECT array_agg(name ORDER BY i, k), array_agg(tail ORDER BY i, k) INTO acc_names, acc_tails
    FROM (
        SELECT d.i, x.j AS k, o.name,
               '"event":"' || o.name || '","job_id":' || (r.job ->> 0) || d.about
               || COALESCE(',"action":' || to_json(x.v ->> 'action')::TEXT, '')
               || COALESCE(',"request_id":' || to_json(x.v ->> 'request_id')::TEXT, '')
               || COALESCE(',"org":' || to_json(x.v ->> 'org')::TEXT, '') || d.about_end
               || ',"outcome":"' || o.outcome || '"'
               || COALESCE(',"reason":' || to_json(r.job ->> 2)::TEXT, '') || '}' AS tail
        FROM d
        CROSS JOIN LATERAL jsonb_array_elements(d.v -> 'decisions') WITH ORDINALITY x(v, j)
        CROSS JOIN LATERAL (SELECT results -> (d.i::INTEGER - 1) -> 'jobs'
                                           -> (x.j::INTEGER - 1) AS job) r
        CROSS JOIN LATERAL (SELECT
                CASE WHEN r.job ->> 2 IS NOT NULL THEN 'refused' ELSE 'accepted' END AS name,
                CASE WHEN r.job ->> 2 IS NOT NULL THEN 'refused'
                     WHEN (r.job ->> 1)::BOOLEAN THEN 'coalesced'
                     ELSE 'queued' END AS outcome) o
        WHERE r.job IS NOT NULL
        UNION ALL
        SELECT d.i, 1000000 + b.k, 'revoked',
               '"event":"revoked","job_id":' || (b.v ->> 0) || d.about || ',"action":"revoke"'
               || COALESCE(',"request_id":' || to_json(b.v ->> 2)::TEXT, '')
               || COALESCE(',"org":' || to_json(b.v ->> 1)::TEXT, '') || d.about_end
               || ',"outcome":"queued","reason":"its subject ended"}'
        FROM d
        CROSS JOIN LATERAL jsonb_array_elements(COALESCE(results -> (d.i::INTEGER - 1) -> 'bound',
                                                         '[]')) WITH ORDINALITY b(v, k)
    ) accepted;
    t := p0_relay_event_texts(made);
    RETURN jsonb_build_object('results', results, 'ignored', ignored,
                              'audit', p0_relay_audit_text(
                                  COALESCE(acc_names, '{}') || COALESCE(t.names, '{}'),
                                  COALESCE(acc_tails, '{}') || COALESCE(t.tails, '{}'), now_ms));
END
$fn$;
-- The previous release's call (its relays go on writing through it during an upgrade): the
-- same, with no events of its own.
CREATE OR REPLACE FUNCTION p0_relay_write(deliveries JSONB, payloads BYTEA[], records JSONB,
                               now_ms BIGINT, dedup_since BIGINT, coalesce_since BIGINT)
RETURNS JSONB LANGUAGE sql AS $fn$
    SELECT p0_relay_write(deliveries, payloads, records, '[]'::JSONB, now_ms, dedup_since,
                          coalesce_since)
$fn$;
