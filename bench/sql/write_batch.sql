-- One batch as a storm's relay writes it, for pgbench (bench/pg_write.sh): eight deliveries of
-- the bench's GitHub comment (each an approve of its own request, keys made unique by :n) and
-- eight `sent` events, each naming what its job is about, as the worker's do: as their names
-- and texts (postgres::audit::events_json) with `-D json=0`, or as JSON with `-D json=1`, as
-- earlier relays sent them (their functions read nothing else). The events come as `events`,
-- not inside outcomes (`records`): there are no claims to record them under, so the outcomes'
-- loop and the gathering of their events are not measured.
\set n random(1, 1000000000)
SELECT length(p0_relay_write(
  (SELECT jsonb_agg(jsonb_build_object(
     'source', 'github', 'dedup_key', 'comment:' || :n || '-' || g || '|created|2026-12-07T19:00:45Z',
     'received_at', 1796670045000, 'rule', 'comment-command', 'actor', 'octocat',
     'subject', '186853002#1', 'reply', NULL, 'ends_subject', false, 'reopens_subject', false,
     'gate', NULL, 'refused', NULL,
     'decisions', jsonb_build_array(jsonb_build_object('org', 'bench', 'request_id',
        'req-' || :n || '-' || g, 'action', 'approve', 'expiration', NULL))))
   FROM generate_series(1, 8) g),
  '{}'::BYTEA[], '[]'::JSONB,
  -- Both forms are made, whichever is sent, so that making them costs each run the same.
  (SELECT jsonb_agg(CASE WHEN :json = 1 THEN e ELSE t END)
   FROM (SELECT e, jsonb_build_array('sent', substr(
                   '{"event":"sent","job_id":' || (e ->> 'job_id')
                   || ',"source":"github","rule":"comment-command","actor":"octocat"'
                   || ',"action":"approve","request_id":' || to_json(e ->> 'request_id')::TEXT
                   || ',"org":"bench","subject":"186853002#1","delivery":'
                   || to_json(e ->> 'delivery')::TEXT || ',"outcome":"success","status":200}',
                   2)) AS t
         FROM (SELECT jsonb_build_object(
                 'event', 'sent', 'job_id', :n % 1000 + g, 'source', 'github',
                 'rule', 'comment-command', 'actor', 'octocat', 'action', 'approve',
                 'request_id', 'req-' || :n || '-' || g, 'org', 'bench',
                 'subject', '186853002#1',
                 'delivery', 'comment:' || :n || '-' || g || '|created|2026-12-07T19:00:45Z',
                 'outcome', 'success', 'status', 200) AS e
               FROM generate_series(1, 8) g) made
         OFFSET 0) ev),
  1796670045000, 0, 0)::TEXT);
