-- A measurement, not the store's SQL: p0_relay_audit_text (as of 829ebb1) taking its event
-- IDs from a sequence under a shared advisory lock, instead of audit_head's row lock held to
-- commit, for `bench/pg_variant.sh BINARY bench/sql/audit_ids_from_a_sequence.sql`
-- (BENCHMARKS, 2026-12-08). Only the writers change: readers, seals and `audit verify` still
-- expect IDs without gaps, so a database written through this is for storms only.
-- Far above any ID written before the variant was applied (a seal, say).
CREATE SEQUENCE IF NOT EXISTS audit_seq_bench START 1000000;
CREATE OR REPLACE FUNCTION p0_relay_audit_text(names TEXT[], tails TEXT[], now_ms BIGINT)
RETURNS JSONB LANGUAGE plpgsql AS $fn$
DECLARE
    n        INTEGER := COALESCE(cardinality(names), 0);
    head     TEXT;
    written  JSONB;
BEGIN
    IF n = 0 THEN
        RETURN '[]'::JSONB;
    END IF;
    PERFORM pg_advisory_xact_lock_shared(4242);
    head := ',"time":"'
            || to_char(to_timestamp(now_ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
            || '.' || lpad((now_ms % 1000)::TEXT, 3, '0') || 'Z",';
    WITH written_rows AS (
        INSERT INTO audit_events (id, at, event, body, digest)
        SELECT b.id, now_ms, b.name, b.body,
               sha256(int8send(b.id) || int8send(now_ms) || convert_to(b.name, 'UTF8')
                      || '\x00'::BYTEA || convert_to(b.body, 'UTF8'))
        FROM (SELECT q.id, q.name, '{"id":' || q.id || head || q.tail AS body
              FROM (SELECT nextval('audit_seq_bench') AS id, u.name, u.tail
                    FROM unnest(names, tails) WITH ORDINALITY AS u(name, tail, i) OFFSET 0) q) b
        RETURNING id, body
    )
    SELECT jsonb_agg(body ORDER BY id) INTO written FROM written_rows;
    RETURN COALESCE(written, '[]'::JSONB);
END
$fn$;
