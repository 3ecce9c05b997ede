-- Takes a batch's locks in one order: each subject's (7002), alone where the batch ends or
-- reopens it, shared otherwise; then each request's (7001): the batch's own and every request
-- approved under a subject it ends. Then writes the batch (p0_relay_write_each_locked).
CREATE OR REPLACE FUNCTION p0_relay_write_each(deliveries JSONB, payloads BYTEA[], records JSONB,
                                    now_ms BIGINT, dedup_since BIGINT, coalesce_since BIGINT)
RETURNS JSONB LANGUAGE plpgsql AS $fn$
DECLARE
    k      INTEGER;
    alone  BOOLEAN;
BEGIN
    -- A subject's lock is taken alone by what changes whether it is ended (its end, its
    -- reopening), shared by the decisions on it.
    FOR k, alone IN
        SELECT hashtext((e ->> 'source') || '/' || (e ->> 'subject')),
               bool_or(COALESCE((e ->> 'ends_subject')::BOOLEAN, false)
                       OR COALESCE((e ->> 'reopens_subject')::BOOLEAN, false))
        FROM jsonb_array_elements(deliveries) e
        WHERE e ->> 'subject' IS NOT NULL
        GROUP BY 1
        ORDER BY 1
    LOOP
        IF alone THEN
            PERFORM pg_advisory_xact_lock(7002, k);
        ELSE
            PERFORM pg_advisory_xact_lock_shared(7002, k);
        END IF;
    END LOOP;
    FOR k IN
        SELECT hashtext((x ->> 'org') || '/' || (x ->> 'request_id'))
        FROM jsonb_array_elements(deliveries) e, jsonb_array_elements(e -> 'decisions') x
        UNION
        SELECT hashtext(j.org || '/' || j.request_id)
        FROM jsonb_array_elements(deliveries) e
        JOIN jobs j ON j.source = e ->> 'source' AND j.subject = e ->> 'subject'
        WHERE COALESCE((e ->> 'ends_subject')::BOOLEAN, false) AND j.action = 'approve'
        ORDER BY 1
    LOOP
        PERFORM pg_advisory_xact_lock(7001, k);
    END LOOP;
    RETURN p0_relay_write_each_locked(deliveries, payloads, records, now_ms, dedup_since,
                                      coalesce_since);
END
$fn$;
