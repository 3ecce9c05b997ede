-- Why a request an ending event names is not revoked: it was not granted under the subject
-- that ends (`store::rules::unbound_reason` in Rust; the contract tests compare the two).
CREATE OR REPLACE FUNCTION p0_relay_unbound_reason(request_id TEXT, subject TEXT) RETURNS TEXT
LANGUAGE sql IMMUTABLE AS $fn$
    SELECT 'request ' || request_id || ' is not granted under subject ' || subject
           || ': an end revokes only what was approved under it'
$fn$;
