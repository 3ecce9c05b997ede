-- The reason an approve under an ended subject is refused, as the relay words it
-- (`store::rules::ended_reason` says the same in Rust; the contract tests compare the two).
CREATE OR REPLACE FUNCTION p0_relay_ended_reason(subject TEXT, ended_at BIGINT) RETURNS TEXT
LANGUAGE sql STABLE AS $fn$
    SELECT 'subject ' || subject || ' ended at '
           || to_char(to_timestamp(ended_at / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
$fn$;
