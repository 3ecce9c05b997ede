-- The requests still granted under a subject, which its end revokes: each request whose latest
-- decision (refused ones decide nothing) is an approve under this subject, pending, sending,
-- succeeded or recorded in a dry run. An end names a request it may revoke only if it is here.
-- The same rule as the SQLite store's (`store/sqlite/ends.rs`); `p0-relay explain` reads it.
-- Plain SQL, so the planner inlines it where it is used.
CREATE OR REPLACE FUNCTION p0_relay_still_granted(of_source TEXT, of_subject TEXT)
RETURNS TABLE (id BIGINT, org TEXT, request_id TEXT, state TEXT)
LANGUAGE sql STABLE AS $fn$
    SELECT j.id, j.org, j.request_id, j.state FROM jobs j
    WHERE j.source = of_source AND j.subject = of_subject AND j.action = 'approve'
      AND j.state IN ('pending', 'sending', 'succeeded', 'dry_run') AND j.refused IS NULL
      AND j.id = (SELECT MAX(k.id) FROM jobs k
                  WHERE k.org = j.org AND k.request_id = j.request_id AND k.refused IS NULL)
$fn$;
