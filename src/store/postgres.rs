//! The shared store: PostgreSQL, for any number of relays on one database. A batch of
//! deliveries and attempt outcomes is one transaction and one round trip (the function
//! `p0_relay_write`, installed by the migrations, deduplicates, coalesces and records on the
//! server). Claims take rows with `FOR UPDATE SKIP LOCKED` under a lease and a claim token;
//! new work is announced with NOTIFY on commit.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tokio_postgres::AsyncMessage;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::location::PgLocation;
use super::{
    Accepted, AnswerJob, AnswerRecord, AnswerRow, AttemptRecord, AttemptRow, BoundRevocation,
    Candidate, Counts, DeliveryInfo, Job, JobDetail, JobRef, JobSummary, ListFilter, NewDelivery,
    Prune, Replay, Replayed, State, StoreError, Windows, now_ms, pg_tls,
};
use crate::domain::{Action, Expiration};

/// Each entry moves the schema one version forward; never edit one that has shipped.
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE deliveries (
    id          BIGSERIAL PRIMARY KEY,
    source      TEXT NOT NULL,
    dedup_key   TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    rule        TEXT NOT NULL,
    actor       TEXT,
    job_ids     BIGINT[] NOT NULL DEFAULT '{}',
    payload     BYTEA
);
CREATE INDEX deliveries_received ON deliveries (received_at);
-- One row per delivery key: the unique constraint is what makes a delivery accepted once
-- across every relay.
CREATE TABLE dedup (
    source      TEXT NOT NULL,
    dedup_key   TEXT NOT NULL,
    delivery_id BIGINT NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (source, dedup_key)
);
CREATE TABLE jobs (
    id              BIGSERIAL PRIMARY KEY,
    delivery_id     BIGINT NOT NULL REFERENCES deliveries (id),
    source          TEXT NOT NULL,
    org             TEXT NOT NULL,
    request_id      TEXT NOT NULL,
    action          TEXT NOT NULL,
    expiration      TEXT,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    window_start    BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    last_status     INTEGER,
    last_error      TEXT,
    claim_token     BIGINT NOT NULL DEFAULT 0,
    lease_until     BIGINT
);
CREATE INDEX jobs_due ON jobs (next_attempt_at, id) WHERE state = 'pending';
CREATE INDEX jobs_leased ON jobs (lease_until) WHERE state = 'sending';
CREATE INDEX jobs_decision ON jobs (org, request_id, id);
CREATE INDEX jobs_state ON jobs (state, updated_at);
CREATE TABLE attempts (
    id          BIGSERIAL PRIMARY KEY,
    job_id      BIGINT NOT NULL REFERENCES jobs (id),
    at          BIGINT NOT NULL,
    status      INTEGER,
    result      TEXT NOT NULL,
    error       TEXT,
    duration_ms BIGINT NOT NULL
);
CREATE INDEX attempts_job ON attempts (job_id);

-- p0_relay_write, the function every batch is one call of, is defined by the latest
-- migration that changes it (all pending migrations run in one transaction).
"#,
    r#"
-- Subjects, subject ends and answers back.
ALTER TABLE jobs ADD COLUMN subject TEXT, ADD COLUMN reply TEXT, ADD COLUMN ended_by BIGINT;
CREATE INDEX jobs_subject ON jobs (source, subject, id) WHERE subject IS NOT NULL;
CREATE TABLE answers (
    id              BIGSERIAL PRIMARY KEY,
    job_id          BIGINT NOT NULL REFERENCES jobs (id),
    via             TEXT NOT NULL,
    kind            TEXT NOT NULL,
    target          TEXT NOT NULL,
    body            TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    window_start    BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    last_status     INTEGER,
    last_error      TEXT,
    claim_token     BIGINT NOT NULL DEFAULT 0,
    lease_until     BIGINT
);
CREATE INDEX answers_due ON answers (next_attempt_at, id) WHERE state = 'pending';
CREATE INDEX answers_leased ON answers (lease_until) WHERE state = 'sending';
CREATE INDEX answers_job ON answers (job_id);
"#,
    r#"
-- Batches without savepoints (a batch that fails is retried one delivery at a time by the
-- relay, so no subtransaction is opened per delivery), a subject's lock shared by the
-- decisions on it and taken alone only by its end, each delivery written in one INSERT.
-- No foreign keys on the hot path: each was a lookup and a row lock on the parent per
-- child written, and p0_relay_write is the only writer of parents and children alike.
ALTER TABLE jobs DROP CONSTRAINT IF EXISTS jobs_delivery_id_fkey;
ALTER TABLE attempts DROP CONSTRAINT IF EXISTS attempts_job_id_fkey;
-- The jobs table is a queue: rows go pending, sending, done within seconds, so it is vacuumed
-- and analysed sooner than the defaults would (dead rows slow every claim's index scan).
ALTER TABLE jobs SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02);
-- A batch of deliveries and attempt outcomes in one call. Returns, per delivery in the order
-- given, {"jobs": [[id, coalesced], ...], "bound": [[id, org, request], ...]} or
-- {"dup": [job ids]}, and the records ignored because their claim was no longer held.
CREATE OR REPLACE FUNCTION p0_relay_write(deliveries JSONB, payloads BYTEA[], records JSONB,
                               now_ms BIGINT, dedup_since BIGINT, coalesce_since BIGINT)
RETURNS JSONB LANGUAGE plpgsql AS $fn$
DECLARE
    k          INTEGER;
    ending     BOOLEAN;
    d          RECORD;
    dcn        RECORD;
    outcome    JSONB;
    results    JSONB[] := array_fill(NULL::JSONB, ARRAY[jsonb_array_length(deliveries)]);
    ignored    BIGINT[] := '{}';
    del_id     BIGINT;
    taken      BIGINT;
    latest     RECORD;
    jid        BIGINT;
    job_list   JSONB;
    id_list    BIGINT[];
    created    BOOLEAN := false;
    g          RECORD;
    bound_list JSONB;
BEGIN
    -- The end of a subject is serialised against decisions on it across relays: an end takes
    -- the subject's lock alone and so waits for every approve under it still committing, and
    -- sees it. Decisions that end nothing share the lock: one busy incident or issue does
    -- not serialise its own commands.
    FOR k, ending IN
        SELECT hashtext((e ->> 'source') || '/' || (e ->> 'subject')),
               bool_or(COALESCE((e ->> 'ends_subject')::BOOLEAN, false))
        FROM jsonb_array_elements(deliveries) e
        WHERE e ->> 'subject' IS NOT NULL
        GROUP BY 1
        ORDER BY 1
    LOOP
        IF ending THEN
            PERFORM pg_advisory_xact_lock(7002, k);
        ELSE
            PERFORM pg_advisory_xact_lock_shared(7002, k);
        END IF;
    END LOOP;
    -- Coalescing is serialised per (org, request) across relays: every key this batch
    -- touches is locked first, in one global order, so two batches never wait on each other
    -- in a cycle.
    FOR k IN
        SELECT DISTINCT hashtext((x ->> 'org') || '/' || (x ->> 'request_id'))
        FROM jsonb_array_elements(deliveries) e, jsonb_array_elements(e -> 'decisions') x
        ORDER BY 1
    LOOP
        PERFORM pg_advisory_xact_lock(7001, k);
    END LOOP;
    -- Delivery keys are taken in one global order too (the unique index makes a second
    -- taker wait for the first to commit or roll back). Ends come after every other delivery
    -- of the batch, so an end sees the approves it shares a batch with.
    FOR d IN
        SELECT x.*, e.ordinality::INTEGER AS i
        FROM jsonb_array_elements(deliveries) WITH ORDINALITY e
        CROSS JOIN LATERAL jsonb_to_record(e.value) AS x(
            source TEXT, dedup_key TEXT, received_at BIGINT, rule TEXT, actor TEXT,
            subject TEXT, reply TEXT, ends_subject BOOLEAN, decisions JSONB)
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
        job_list := '[]';
        id_list := '{}';
        FOR dcn IN
            SELECT * FROM jsonb_to_recordset(d.decisions)
                AS y(org TEXT, request_id TEXT, action TEXT, expiration TEXT)
        LOOP
            -- The latest job for this request decides: the same action still pending or
            -- done recently is not sent again, but approve, revoke, approve is three calls.
            -- Only a decision asked on the same subject coalesces: one bound to another
            -- incident or alert is a job of its own, so that subject's end cannot take it.
            SELECT j.id, j.action, j.state, j.created_at, j.source, j.subject INTO latest FROM jobs j
            WHERE j.org = dcn.org AND j.request_id = dcn.request_id
            ORDER BY j.id DESC LIMIT 1;
            IF FOUND AND latest.action = dcn.action AND latest.created_at >= coalesce_since
               AND latest.state IN ('pending', 'sending', 'succeeded', 'dry_run')
               AND latest.subject IS NOT DISTINCT FROM d.subject
               AND (d.subject IS NULL OR latest.source = d.source) THEN
                jid := latest.id;
                job_list := job_list || jsonb_build_array(jsonb_build_array(jid, true));
            ELSE
                INSERT INTO jobs (delivery_id, source, org, request_id, action, expiration, state,
                                  next_attempt_at, window_start, created_at, updated_at,
                                  subject, reply)
                VALUES (del_id, d.source, dcn.org, dcn.request_id,
                        dcn.action, dcn.expiration, 'pending',
                        now_ms, now_ms, now_ms, now_ms, d.subject, d.reply)
                RETURNING id INTO jid;
                job_list := job_list || jsonb_build_array(jsonb_build_array(jid, false));
                created := true;
            END IF;
            id_list := id_list || jid;
        END LOOP;
        -- The end of a subject revokes every request still granted under it: the latest
        -- decision on it is an approve under this subject, pending, sending, succeeded or
        -- dry run. Each revoke is queued behind its approve.
        bound_list := '[]';
        IF d.ends_subject AND d.subject IS NOT NULL THEN
            FOR g IN
                SELECT j.org, j.request_id FROM jobs j
                WHERE j.source = d.source AND j.subject = d.subject
                  AND j.action = 'approve'
                  AND j.state IN ('pending', 'sending', 'succeeded', 'dry_run')
                  AND j.id = (SELECT MAX(x.id) FROM jobs x
                              WHERE x.org = j.org AND x.request_id = j.request_id)
                ORDER BY j.id
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
        results[d.i] := jsonb_build_object('jobs', job_list, 'bound', bound_list);
    END LOOP;
    -- An outcome counts only from the relay that holds the claim (its token, still sending).
    -- One statement per outcome, each found by its primary key: a set-based UPDATE ... FROM
    -- is planned from the table's statistics, and planned while the table was small it
    -- scans every row ever claimed.
    FOR outcome IN SELECT value FROM jsonb_array_elements(records) ORDER BY (value ->> 'job_id')::BIGINT LOOP
        UPDATE jobs SET state = outcome ->> 'state', attempts = (outcome ->> 'attempts')::INTEGER,
                        next_attempt_at = (outcome ->> 'next_attempt_at')::BIGINT,
                        last_status = (outcome ->> 'status')::INTEGER, last_error = outcome ->> 'error',
                        updated_at = (outcome ->> 'at')::BIGINT, lease_until = NULL
        WHERE id = (outcome ->> 'job_id')::BIGINT AND claim_token = (outcome ->> 'claim')::BIGINT
          AND state = 'sending';
        IF FOUND THEN
            INSERT INTO attempts (job_id, at, status, result, error, duration_ms)
            VALUES ((outcome ->> 'job_id')::BIGINT, (outcome ->> 'at')::BIGINT, (outcome ->> 'status')::INTEGER,
                    outcome ->> 'result', outcome ->> 'error', (outcome ->> 'duration_ms')::BIGINT);
            -- Answers back are created with P0's final answer, in the same transaction.
            INSERT INTO answers (job_id, via, kind, target, body, state, next_attempt_at,
                                 window_start, created_at, updated_at)
            SELECT (outcome ->> 'job_id')::BIGINT, a ->> 'via', a ->> 'kind', a ->> 'target',
                   a ->> 'body', 'pending', (outcome ->> 'at')::BIGINT, (outcome ->> 'at')::BIGINT,
                   (outcome ->> 'at')::BIGINT, (outcome ->> 'at')::BIGINT
            FROM jsonb_array_elements(COALESCE(outcome -> 'answers', '[]')) a;
        ELSE
            ignored := ignored || (outcome ->> 'job_id')::BIGINT;
        END IF;
    END LOOP;
    IF created THEN
        PERFORM pg_notify('p0_relay_jobs', '');
    END IF;
    RETURN jsonb_build_object('results', to_jsonb(results), 'ignored', to_jsonb(ignored));
END
$fn$;
"#,
    r#"
-- A batch that ends no subject and whose deliveries and requests are all distinct (a storm
-- of different deliveries: the common case) is written by p0_relay_write_distinct in a few
-- statements for the whole batch instead of several per delivery: each statement run from
-- PL/pgSQL costs its own executor start, which was most of the database's work per
-- delivery. Any other batch is
-- written one delivery at a time by the function migration 3 defined, renamed
-- p0_relay_write_each. Both give the same results. Outcomes are recorded here for every
-- batch, one statement each (the update, its attempt and its answers back together).
ALTER FUNCTION p0_relay_write(JSONB, BYTEA[], JSONB, BIGINT, BIGINT, BIGINT)
    RENAME TO p0_relay_write_each;
CREATE FUNCTION p0_relay_write_distinct(deliveries JSONB, payloads BYTEA[], now_ms BIGINT,
                                        dedup_since BIGINT, coalesce_since BIGINT)
RETURNS JSONB LANGUAGE plpgsql AS $fn$
DECLARE
    results JSONB;
    created BOOLEAN;
    dup     RECORD;
    id_list BIGINT[];
BEGIN
    -- The same locks, in the same orders, as p0_relay_write_each takes (no end here, so every
    -- subject's lock is shared).
    PERFORM pg_advisory_xact_lock_shared(7002, k) FROM (
        SELECT DISTINCT hashtext((e ->> 'source') || '/' || (e ->> 'subject')) AS k
        FROM jsonb_array_elements(deliveries) e WHERE e ->> 'subject' IS NOT NULL ORDER BY 1) s;
    PERFORM pg_advisory_xact_lock(7001, k) FROM (
        SELECT DISTINCT hashtext((x ->> 'org') || '/' || (x ->> 'request_id')) AS k
        FROM jsonb_array_elements(deliveries) e, jsonb_array_elements(e -> 'decisions') x
        ORDER BY 1) s;
    -- One statement, one snapshot taken after the locks: the dedup rows, the latest job of
    -- each request (looked up by its index, one row each), the new jobs and the deliveries.
    WITH d AS (
        SELECT x.*, e.ordinality::INTEGER AS i
        FROM jsonb_array_elements(deliveries) WITH ORDINALITY e
        CROSS JOIN LATERAL jsonb_to_record(e.value) AS x(
            source TEXT, dedup_key TEXT, received_at BIGINT, rule TEXT, actor TEXT,
            subject TEXT, reply TEXT, decisions JSONB)
    ), taken AS (
        INSERT INTO dedup AS t (source, dedup_key, delivery_id, received_at)
        SELECT source, dedup_key, nextval('deliveries_id_seq'), received_at FROM d
        ORDER BY source COLLATE "C", dedup_key COLLATE "C"
        ON CONFLICT (source, dedup_key) DO UPDATE
            SET delivery_id = EXCLUDED.delivery_id, received_at = EXCLUDED.received_at
            WHERE t.received_at < dedup_since
        RETURNING t.source, t.dedup_key, t.delivery_id
    ), fresh AS (
        SELECT d.*, taken.delivery_id FROM d JOIN taken USING (source, dedup_key)
    ), asked AS (
        SELECT f.i, y.j, f.delivery_id, f.source, f.subject, f.reply, y.org, y.request_id,
               y.action, y.expiration,
               l.id AS latest,
               COALESCE(l.action = y.action AND l.created_at >= coalesce_since
                        AND l.state IN ('pending', 'sending', 'succeeded', 'dry_run')
                        AND l.subject IS NOT DISTINCT FROM f.subject
                        AND (f.subject IS NULL OR l.source = f.source), false) AS coalesced
        FROM fresh f
        CROSS JOIN LATERAL ROWS FROM (jsonb_to_recordset(f.decisions)
            AS (org TEXT, request_id TEXT, action TEXT, expiration TEXT))
            WITH ORDINALITY AS y(org, request_id, action, expiration, j)
        LEFT JOIN LATERAL (SELECT jb.id, jb.action, jb.state, jb.created_at, jb.source,
                                  jb.subject
                           FROM jobs jb WHERE jb.org = y.org AND jb.request_id = y.request_id
                           ORDER BY jb.id DESC LIMIT 1) l ON true
    ), numbered AS (
        SELECT a.*, CASE WHEN a.coalesced THEN a.latest ELSE nextval('jobs_id_seq') END AS jid
        FROM (SELECT * FROM asked ORDER BY i, j) a
    ), new_jobs AS (
        INSERT INTO jobs (id, delivery_id, source, org, request_id, action, expiration, state,
                          next_attempt_at, window_start, created_at, updated_at, subject, reply)
        SELECT jid, delivery_id, source, org, request_id, action, expiration, 'pending',
               now_ms, now_ms, now_ms, now_ms, subject, reply
        FROM numbered WHERE NOT coalesced
        RETURNING id
    ), per_delivery AS (
        SELECT i, array_agg(jid ORDER BY j) AS ids,
               jsonb_agg(jsonb_build_array(jid, coalesced) ORDER BY j) AS jobs
        FROM numbered GROUP BY i
    ), new_deliveries AS (
        INSERT INTO deliveries (id, source, dedup_key, received_at, rule, actor, payload, job_ids)
        SELECT f.delivery_id, f.source, f.dedup_key, f.received_at, f.rule, f.actor,
               payloads[f.i], COALESCE(p.ids, '{}')
        FROM fresh f LEFT JOIN per_delivery p ON p.i = f.i
    )
    SELECT jsonb_agg(CASE WHEN f.i IS NULL THEN NULL
                          ELSE jsonb_build_object('jobs', COALESCE(p.jobs, '[]'), 'bound', '[]'::JSONB)
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
-- A batch of deliveries and attempt outcomes in one call. Returns, per delivery in the order
-- given, {"jobs": [[id, coalesced], ...], "bound": [[id, org, request], ...]} or
-- {"dup": [job ids]}, and the records ignored because their claim was no longer held.
CREATE FUNCTION p0_relay_write(deliveries JSONB, payloads BYTEA[], records JSONB,
                               now_ms BIGINT, dedup_since BIGINT, coalesce_since BIGINT)
RETURNS JSONB LANGUAGE plpgsql AS $fn$
DECLARE
    each_one BOOLEAN;
    results  JSONB := '[]';
    ignored  JSONB := '[]';
    rec      RECORD;
    applied  INTEGER;
BEGIN
    SELECT bool_or(COALESCE((e ->> 'ends_subject')::BOOLEAN, false))
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
        SELECT * FROM jsonb_to_recordset(records) AS x(
            job_id BIGINT, claim BIGINT, at BIGINT, state TEXT, attempts INTEGER,
            next_attempt_at BIGINT, status INTEGER, result TEXT, error TEXT, duration_ms BIGINT,
            answers JSONB)
        ORDER BY job_id
    LOOP
        WITH done AS (
            UPDATE jobs SET state = rec.state, attempts = rec.attempts,
                            next_attempt_at = rec.next_attempt_at, last_status = rec.status,
                            last_error = rec.error, updated_at = rec.at, lease_until = NULL
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
        END IF;
    END LOOP;
    RETURN jsonb_build_object('results', results, 'ignored', ignored);
END
$fn$;
"#,
    r#"
-- The end of a subject also locks every request it may revoke. Its subject's lock keeps new
-- approves under that subject out, but an approve of one of its requests under another
-- subject, committing on another relay at the same moment, could be read too late: the end
-- saw the request as still granted under its subject, the other saw the end's revoke not yet
-- committed, and the revoke was queued behind the new approve, taking away access the other
-- subject still asked for. Now the end takes each such request's coalescing lock (7001) as
-- well, so the two come out in one order or the other. The requests are read once the
-- subject's lock is held (no approve under it can be added meanwhile), every approve under
-- it whatever its state (one replayed meanwhile is pending again), and locked with the
-- batch's own in one ordered pass; the function that writes the batch, renamed, takes the
-- same locks again at no cost.
ALTER FUNCTION p0_relay_write_each(JSONB, BYTEA[], JSONB, BIGINT, BIGINT, BIGINT)
    RENAME TO p0_relay_write_each_locked;
CREATE FUNCTION p0_relay_write_each(deliveries JSONB, payloads BYTEA[], records JSONB,
                                    now_ms BIGINT, dedup_since BIGINT, coalesce_since BIGINT)
RETURNS JSONB LANGUAGE plpgsql AS $fn$
DECLARE
    k      INTEGER;
    ending BOOLEAN;
BEGIN
    FOR k, ending IN
        SELECT hashtext((e ->> 'source') || '/' || (e ->> 'subject')),
               bool_or(COALESCE((e ->> 'ends_subject')::BOOLEAN, false))
        FROM jsonb_array_elements(deliveries) e
        WHERE e ->> 'subject' IS NOT NULL
        GROUP BY 1
        ORDER BY 1
    LOOP
        IF ending THEN
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
"#,
    r#"
-- Subjects that ended stay ended. A delivery asking to approve under a subject that ended
-- and did not reopen (GitHub `reopened`, an alert firing again) is refused whole: its
-- decisions are stored with the reason in `refused`, which the worker records as rejected
-- and answers back without calling P0. A delivery that reopens its subject takes the
-- subject's lock alone, as an end does, and is written one at a time like an end. The
-- functions that write batches are defined again here with these rules.
-- An approve may also carry an on-call check (`gate`, JSON), which the worker runs before it
-- calls P0 and whose finding it records in `evidence`. A gated approve coalesces only into
-- one with the same check.
CREATE TABLE subject_ends (
    source      TEXT NOT NULL,
    subject     TEXT NOT NULL,
    ended_at    BIGINT NOT NULL,
    delivery_id BIGINT NOT NULL,
    reopened_at BIGINT,
    PRIMARY KEY (source, subject)
);
CREATE INDEX subject_ends_at ON subject_ends (ended_at);
ALTER TABLE jobs ADD COLUMN refused TEXT, ADD COLUMN gate TEXT, ADD COLUMN evidence TEXT;
-- The reason an approve under an ended subject is refused, as the relay words it.
CREATE FUNCTION p0_relay_ended_reason(subject TEXT, ended_at BIGINT) RETURNS TEXT
LANGUAGE sql STABLE AS $fn$
    SELECT 'subject ' || subject || ' ended at '
           || to_char(to_timestamp(ended_at / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
$fn$;
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
-- Writes a batch one delivery at a time, its locks held (p0_relay_write_each takes them).
-- Outcomes are recorded by p0_relay_write, which passes none here.
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
            gate TEXT, decisions JSONB)
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
            IF refusal IS NULL THEN
                SELECT j.id, j.action, j.state, j.created_at, j.source, j.subject, j.refused,
                       j.gate
                INTO latest FROM jobs j
                WHERE j.org = dcn.org AND j.request_id = dcn.request_id
                ORDER BY j.id DESC LIMIT 1;
                IF FOUND AND latest.action = dcn.action AND latest.created_at >= coalesce_since
                   AND latest.state IN ('pending', 'sending', 'succeeded', 'dry_run')
                   AND latest.refused IS NULL
                   AND latest.gate IS NOT DISTINCT FROM
                       (CASE WHEN dcn.action = 'approve' THEN d.gate END)
                   AND latest.subject IS NOT DISTINCT FROM d.subject
                   AND (d.subject IS NULL OR latest.source = d.source) THEN
                    jid := latest.id;
                    job_list := job_list || jsonb_build_array(jsonb_build_array(jid, true));
                END IF;
            END IF;
            IF jid IS NULL THEN
                INSERT INTO jobs (delivery_id, source, org, request_id, action, expiration, state,
                                  next_attempt_at, window_start, created_at, updated_at,
                                  subject, reply, refused, gate)
                VALUES (del_id, d.source, dcn.org, dcn.request_id,
                        dcn.action, dcn.expiration, 'pending',
                        now_ms, now_ms, now_ms, now_ms, d.subject, d.reply, refusal,
                        CASE WHEN dcn.action = 'approve' THEN d.gate END)
                RETURNING id INTO jid;
                job_list := job_list || jsonb_build_array(jsonb_build_array(jid, false));
                created := true;
            END IF;
            id_list := id_list || jid;
        END LOOP;
        -- The end of a subject is recorded, and revokes every request still granted under
        -- it: the latest decision on it is an approve under this subject, not refused,
        -- pending, sending, succeeded or dry run. Each revoke is queued behind its approve.
        bound_list := '[]';
        IF d.ends_subject AND d.subject IS NOT NULL THEN
            INSERT INTO subject_ends AS se (source, subject, ended_at, delivery_id)
            VALUES (d.source, d.subject, now_ms, del_id)
            ON CONFLICT (source, subject) DO UPDATE
                SET ended_at = EXCLUDED.ended_at, delivery_id = EXCLUDED.delivery_id,
                    reopened_at = NULL;
            FOR g IN
                SELECT j.org, j.request_id FROM jobs j
                WHERE j.source = d.source AND j.subject = d.subject
                  AND j.action = 'approve' AND j.refused IS NULL
                  AND j.state IN ('pending', 'sending', 'succeeded', 'dry_run')
                  AND j.id = (SELECT MAX(x.id) FROM jobs x
                              WHERE x.org = j.org AND x.request_id = j.request_id)
                ORDER BY j.id
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
            subject TEXT, reply TEXT, gate TEXT, decisions JSONB)
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
        SELECT f.i, y.j, f.delivery_id, f.source, f.subject, f.reply, f.refusal, y.org,
               y.request_id, y.action, y.expiration,
               CASE WHEN y.action = 'approve' THEN f.gate END AS gate,
               l.id AS latest,
               COALESCE(f.refusal IS NULL AND l.refused IS NULL
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
               jsonb_agg(jsonb_build_array(jid, coalesced) ORDER BY j) AS jobs
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
-- The batch's entry point: a batch that ends or reopens a subject, or repeats a delivery or
-- a request, is written one delivery at a time; any other in a few statements.
CREATE OR REPLACE FUNCTION p0_relay_write(deliveries JSONB, payloads BYTEA[], records JSONB,
                               now_ms BIGINT, dedup_since BIGINT, coalesce_since BIGINT)
RETURNS JSONB LANGUAGE plpgsql AS $fn$
DECLARE
    each_one BOOLEAN;
    results  JSONB := '[]';
    ignored  JSONB := '[]';
    rec      RECORD;
    applied  INTEGER;
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
        SELECT * FROM jsonb_to_recordset(records) AS x(
            job_id BIGINT, claim BIGINT, at BIGINT, state TEXT, attempts INTEGER,
            next_attempt_at BIGINT, status INTEGER, result TEXT, error TEXT, duration_ms BIGINT,
            evidence TEXT, answers JSONB)
        ORDER BY job_id
    LOOP
        WITH done AS (
            UPDATE jobs SET state = rec.state, attempts = rec.attempts,
                            next_attempt_at = rec.next_attempt_at, last_status = rec.status,
                            last_error = rec.error, updated_at = rec.at, lease_until = NULL,
                            evidence = COALESCE(rec.evidence, evidence)
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
        END IF;
    END LOOP;
    RETURN jsonb_build_object('results', results, 'ignored', ignored);
END
$fn$;
"#,
    r#"
-- Grants are refused for what the mapping says (a stale event: `refused` on the delivery,
-- applied to its approves), and an end revokes only what was approved under its subject: a
-- request it names that was not is stored refused (`p0_relay_unbound_reason`). Each job of
-- a batch's answer carries its own refusal. A job stored refused decides nothing, so it is
-- never a request's latest decision: not when an end looks for what is still granted, nor
-- when a new decision looks for one to coalesce with. `checked_at` is when a gated approve's on-call
-- check passed; outcomes record it. The functions that write batches are defined again here
-- with these rules.
ALTER TABLE jobs ADD COLUMN checked_at BIGINT;
CREATE FUNCTION p0_relay_unbound_reason(request_id TEXT, subject TEXT) RETURNS TEXT
LANGUAGE sql IMMUTABLE AS $fn$
    SELECT 'request ' || request_id || ' is not granted under subject ' || subject
           || ': an end revokes only what was approved under it'
$fn$;
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
                    SELECT 1 FROM jobs j
                    WHERE j.org = dcn.org AND j.request_id = dcn.request_id
                      AND j.source = d.source AND j.subject = d.subject
                      AND j.action = 'approve' AND j.refused IS NULL
                      AND j.state IN ('pending', 'sending', 'succeeded', 'dry_run')
                      AND j.id = (SELECT MAX(x.id) FROM jobs x
                                  WHERE x.org = j.org AND x.request_id = j.request_id
                                    AND x.refused IS NULL)) THEN
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
        -- it: the latest decision on it is an approve under this subject, not refused,
        -- pending, sending, succeeded or dry run. Each revoke is queued behind its approve.
        bound_list := '[]';
        IF d.ends_subject AND d.subject IS NOT NULL THEN
            INSERT INTO subject_ends AS se (source, subject, ended_at, delivery_id)
            VALUES (d.source, d.subject, now_ms, del_id)
            ON CONFLICT (source, subject) DO UPDATE
                SET ended_at = EXCLUDED.ended_at, delivery_id = EXCLUDED.delivery_id,
                    reopened_at = NULL;
            FOR g IN
                SELECT j.org, j.request_id FROM jobs j
                WHERE j.source = d.source AND j.subject = d.subject
                  AND j.action = 'approve' AND j.refused IS NULL
                  AND j.state IN ('pending', 'sending', 'succeeded', 'dry_run')
                  AND j.id = (SELECT MAX(x.id) FROM jobs x
                              WHERE x.org = j.org AND x.request_id = j.request_id
                                AND x.refused IS NULL)
                ORDER BY j.id
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
CREATE OR REPLACE FUNCTION p0_relay_write(deliveries JSONB, payloads BYTEA[], records JSONB,
                               now_ms BIGINT, dedup_since BIGINT, coalesce_since BIGINT)
RETURNS JSONB LANGUAGE plpgsql AS $fn$
DECLARE
    each_one BOOLEAN;
    results  JSONB := '[]';
    ignored  JSONB := '[]';
    rec      RECORD;
    applied  INTEGER;
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
        SELECT * FROM jsonb_to_recordset(records) AS x(
            job_id BIGINT, claim BIGINT, at BIGINT, state TEXT, attempts INTEGER,
            next_attempt_at BIGINT, status INTEGER, result TEXT, error TEXT, duration_ms BIGINT,
            evidence TEXT, checked_at BIGINT, answers JSONB)
        ORDER BY job_id
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
        END IF;
    END LOOP;
    RETURN jsonb_build_object('results', results, 'ignored', ignored);
END
$fn$;
"#,
];

/// Advisory lock keys (one 64-bit space; coalescing uses the separate two-key space).
const MIGRATE_LOCK: i64 = 0x7030_7265_6c61_7901;
const PRUNE_LOCK: i64 = 0x7030_7265_6c61_7902;
const STATISTICS_LOCK: i64 = 0x7030_7265_6c61_7903;
/// How often a relay looks at whether the jobs table's statistics need refreshing.
const STATISTICS_EVERY_MS: i64 = 5_000;
/// The channel new work is announced on.
pub const CHANNEL: &str = "p0_relay_jobs";

/// Connections per relay: batch writers, the worker's claims and renewals, gauges, probes.
const POOL_SIZE: usize = 10;
/// Batches committing at once per relay (each on its own connection). Two, not more: each
/// batch takes every write waiting when it starts, so fewer concurrent transactions carry
/// more each, and the database spends its CPU on rows rather than on transactions (one relay
/// storm on this 2-core machine: 6.4k accepted/s with three, 8.5k with two, 9.5k with one).
/// The second keeps accepts going while the first waits on a lock or a slow commit.
const WRITERS: usize = 2;
/// The longest any one operation may take before the database counts as unreachable.
const OP_TIMEOUT: Duration = Duration::from_secs(5);

/// What a claim lease is held on: a P0 call's job, or an answer back. Each is renewed while
/// its call is under way, so a call longer than the lease is not taken over and sent again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leased {
    Job,
    Answer,
}

impl Leased {
    fn renewal(self) -> &'static str {
        match self {
            Leased::Job => {
                "UPDATE jobs SET lease_until = $3
                 WHERE id = $1 AND claim_token = $2 AND state = 'sending'"
            }
            Leased::Answer => {
                "UPDATE answers SET lease_until = $3
                 WHERE id = $1 AND claim_token = $2 AND state = 'sending'"
            }
        }
    }
}
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A PostgreSQL store: a connection pool and the settings every relay on it must share.
pub struct PgStore {
    pool: Pool,
    location: PgLocation,
    tls: MakeRustlsConnect,
    windows: Windows,
    store_payloads: bool,
    lease: Duration,
    last_expiry_ms: AtomicI64,
    last_statistics_ms: AtomicI64,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("PostgreSQL {what}: {e}"))
}

/// An error with its causes (a TLS handshake failure says why: an untrusted certificate...).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = c.source();
    }
    text
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl PgStore {
    /// Connects (lazily, through the pool) and migrates the schema under an advisory lock,
    /// so any number of relays may start at once.
    pub async fn open(
        location: &PgLocation,
        windows: Windows,
        store_payloads: bool,
        lease: Duration,
    ) -> Result<PgStore, StoreError> {
        let tls = pg_tls::connector(&location.verify).map_err(StoreError::Invalid)?;
        let mut config = location.connect_config();
        config.connect_timeout(CONNECT_TIMEOUT);
        if config.get_application_name().is_none() {
            config.application_name("p0-relay");
        }
        // A relay cut off mid-transaction must not hold its locks (delivery keys, coalescing
        // locks) until the server notices the dead connection: it gives them up after this.
        const SESSION: &str = "-c idle_in_transaction_session_timeout=15s";
        let options = match config.get_options() {
            Some(o) => format!("{o} {SESSION}"),
            None => SESSION.to_owned(),
        };
        config.options(options);
        let manager = Manager::from_config(
            config,
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(OP_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Invalid(format!("PostgreSQL pool: {e}")))?;
        let store = PgStore {
            pool,
            location: location.clone(),
            tls,
            windows,
            store_payloads,
            lease,
            last_expiry_ms: AtomicI64::new(i64::MIN),
            last_statistics_ms: AtomicI64::new(i64::MIN),
        };
        store.migrate().await?;
        Ok(store)
    }

    pub fn location(&self) -> &PgLocation {
        &self.location
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    pub(super) async fn client(&self) -> Result<Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| unavailable("unreachable", chain(&e)))
    }

    /// Runs `work` on a pooled connection within `limit`; a connection that timed out is
    /// closed rather than returned to the pool with a statement still running on it.
    async fn run<T>(
        &self,
        what: &str,
        limit: Duration,
        work: impl AsyncFnOnce(&mut Object) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, StoreError> {
        let mut client = self.client().await?;
        match tokio::time::timeout(limit, work(&mut client)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if e.is_closed() || e.as_db_error().is_none() {
                    drop(Object::take(client));
                    Err(unavailable(what, e))
                } else {
                    Err(StoreError::Postgres(e))
                }
            }
            Err(_) => {
                drop(Object::take(client));
                Err(unavailable(
                    what,
                    format!("no answer within {}s", limit.as_secs_f64()),
                ))
            }
        }
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let known = MIGRATIONS.len() as i32;
        let version = self
            .run("migration", Duration::from_secs(60), async |c| {
                let tx = c.transaction().await?;
                // Ten relays starting together: one migrates, the others wait and find it done.
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
                    .await?;
                tx.batch_execute(
                    "CREATE TABLE IF NOT EXISTS p0_relay_schema (
                         version    INTEGER PRIMARY KEY,
                         applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
                )
                .await?;
                let version: i32 = tx
                    .query_one("SELECT COALESCE(MAX(version), 0) FROM p0_relay_schema", &[])
                    .await?
                    .try_get(0)?;
                if version > known {
                    return Ok(version);
                }
                for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
                    tx.batch_execute(sql).await?;
                    tx.execute(
                        "INSERT INTO p0_relay_schema (version) VALUES ($1)",
                        &[&(i as i32 + 1)],
                    )
                    .await?;
                }
                tx.commit().await?;
                Ok(version)
            })
            .await?;
        if version > known {
            return Err(StoreError::Invalid(format!(
                "the database has schema version {version}, newer than this relay knows ({known})"
            )));
        }
        Ok(())
    }

    /// Commits deliveries and attempt outcomes in one transaction (see `Store::write`): per
    /// delivery, its result. The transaction opens no savepoint per delivery (each would be
    /// a subtransaction, and past 64 of them every other session's snapshots get slower), so
    /// when the database refuses the batch it is written again in parts: the outcomes
    /// together first (if they fail, nothing is written and the whole batch fails, as when
    /// the database is unreachable), then each delivery alone, in `batch_order`. A delivery
    /// that fails is then left out whole and fails only its sender.
    pub async fn write(
        &self,
        deliveries: &[NewDelivery],
        records: &[AttemptRecord],
        now_ms: i64,
    ) -> Result<Vec<Result<Accepted, StoreError>>, StoreError> {
        match self.write_batch(deliveries, records, now_ms).await {
            Err(StoreError::Postgres(e))
                if deliveries.len() + usize::from(!records.is_empty()) > 1 =>
            {
                tracing::warn!(error = %e, "a batch was refused; writing its parts one by one");
                if !records.is_empty() {
                    self.write_batch(&[], records, now_ms).await?;
                }
                let order = super::batch_order(deliveries);
                let mut results = Vec::with_capacity(deliveries.len());
                for &i in &order {
                    let d = &deliveries[i];
                    let one = match self.write_batch(std::slice::from_ref(d), &[], now_ms).await {
                        Err(StoreError::Postgres(e)) => {
                            Err(StoreError::Invalid(format!("store: {}", chain(&e))))
                        }
                        other => other,
                    };
                    results.push(one.and_then(|mut r| match r.pop() {
                        Some(result) if r.is_empty() => result,
                        _ => Err(StoreError::Invalid(
                            "p0_relay_write answered other than one result".into(),
                        )),
                    }));
                }
                Ok(super::in_arrival_order(&order, results))
            }
            other => other,
        }
    }

    async fn write_batch(
        &self,
        deliveries: &[NewDelivery],
        records: &[AttemptRecord],
        now_ms: i64,
    ) -> Result<Vec<Result<Accepted, StoreError>>, StoreError> {
        let batch = Value::Array(
            deliveries
                .iter()
                .map(|d| {
                    json!({
                        "source": d.source, "dedup_key": d.dedup_key,
                        "received_at": d.received_at_ms, "rule": d.rule, "actor": d.actor,
                        "subject": d.binding.subject, "reply": d.reply_json(),
                        "ends_subject": d.binding.ends_subject,
                        "reopens_subject": d.binding.reopens_subject,
                        "gate": d.gate_json(),
                        "refused": d.refused,
                        "decisions": d.decisions.iter().map(|x| json!({
                            "org": x.org.as_str(), "request_id": x.request_id.as_str(),
                            "action": x.action.as_str(), "expiration": x.expiration.as_ref().map(Expiration::as_str),
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect(),
        );
        let payloads: Vec<Option<&[u8]>> = deliveries
            .iter()
            .map(|d| d.payload.as_deref().filter(|_| self.store_payloads))
            .collect();
        let recs = Value::Array(
            records
                .iter()
                .map(|r| {
                    json!({
                        "job_id": r.job_id, "claim": r.claim, "at": r.at_ms,
                        "state": r.state.as_str(), "attempts": r.attempts,
                        "next_attempt_at": r.next_attempt_at_ms, "status": r.status,
                        "result": r.result, "error": r.error, "duration_ms": r.duration_ms,
                        "evidence": r.evidence, "checked_at": r.checked_at_ms,
                        "answers": r.answers.iter().map(|a| json!({
                            "via": a.via, "kind": a.kind, "target": a.target, "body": a.body,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect(),
        );
        let (mut batch, mut recs) = (batch, recs);
        without_nul(&mut batch);
        without_nul(&mut recs);
        let dedup_since = now_ms.saturating_sub(ms(self.windows.dedup));
        let coalesce_since = now_ms.saturating_sub(ms(self.windows.coalesce));
        let out: Value = self
            .run("write", OP_TIMEOUT, async |c| {
                // One statement is its own transaction: no BEGIN and COMMIT round trips.
                let stmt = c
                    .prepare_cached("SELECT p0_relay_write($1, $2, $3, $4, $5, $6)")
                    .await?;
                let row = c
                    .query_one(
                        &stmt,
                        &[
                            &batch,
                            &payloads,
                            &recs,
                            &now_ms,
                            &dedup_since,
                            &coalesce_since,
                        ],
                    )
                    .await?;
                row.try_get(0)
            })
            .await?;
        if let Some(ignored) = out["ignored"].as_array().filter(|a| !a.is_empty()) {
            tracing::warn!(
                job_ids = ?ignored,
                "outcomes ignored: the claim had expired and another relay holds the decision now"
            );
        }
        let results = out["results"].as_array().cloned().unwrap_or_default();
        if results.len() != deliveries.len() {
            return Err(StoreError::Invalid(format!(
                "p0_relay_write answered {} results for {} deliveries",
                results.len(),
                deliveries.len()
            )));
        }
        Ok(results.iter().map(parse_result).collect())
    }

    /// Claims up to `limit` due jobs: each becomes `sending` under a lease with a new claim
    /// token. Leases that expired (a relay killed mid-call) are returned to pending first.
    pub async fn claim_due(&self, now_ms: i64, limit: usize) -> Result<Vec<Job>, StoreError> {
        let last = self.last_expiry_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) >= 1000 {
            self.last_expiry_ms.store(now_ms, Ordering::Relaxed);
            self.expire_leases(now_ms).await?;
        }
        let lease_until = now_ms.saturating_add(ms(self.lease));
        let limit = limit as i64;
        let rows = self
            .run("claim", OP_TIMEOUT, async |c| {
                let stmt = c
                    .prepare_cached(
                        "UPDATE jobs SET state = 'sending', claim_token = claim_token + 1,
                                lease_until = $3, updated_at = $1
                         WHERE id IN (SELECT id FROM jobs
                                      WHERE state = 'pending' AND next_attempt_at <= $1
                                        AND NOT EXISTS (SELECT 1 FROM jobs e
                                            WHERE e.org = jobs.org AND e.request_id = jobs.request_id
                                              AND e.id < jobs.id AND e.state IN ('pending', 'sending'))
                                      ORDER BY next_attempt_at, id LIMIT $2
                                      FOR UPDATE SKIP LOCKED)
                         RETURNING id, source, org, request_id, action, expiration, attempts,
                                   created_at, window_start, claim_token, subject, reply,
                                   ended_by IS NOT NULL, refused, gate, evidence, checked_at,
                                   (SELECT d.rule FROM deliveries d WHERE d.id = jobs.delivery_id),
                                   (SELECT d.actor FROM deliveries d WHERE d.id = jobs.delivery_id)",
                    )
                    .await?;
                c.query(&stmt, &[&now_ms, &limit, &lease_until]).await
            })
            .await?;
        let mut jobs = Vec::with_capacity(rows.len());
        for r in rows {
            let action: String = r.try_get(4)?;
            let id: i64 = r.try_get(0)?;
            jobs.push(Job {
                id,
                source: r.try_get(1)?,
                org: r.try_get(2)?,
                request_id: r.try_get(3)?,
                action: Action::parse(&action).ok_or_else(|| {
                    StoreError::Invalid(format!("job {id}: unknown action `{action}`"))
                })?,
                expiration: r.try_get(5)?,
                attempts: r.try_get::<_, i32>(6)?.max(0) as u32,
                accepted_at_ms: r.try_get(7)?,
                window_start_ms: r.try_get(8)?,
                claim: r.try_get(9)?,
                subject: r.try_get(10)?,
                reply: r.try_get(11)?,
                bound: r.try_get(12)?,
                refused: r.try_get(13)?,
                gate: r.try_get(14)?,
                evidence: r.try_get(15)?,
                checked_at_ms: r.try_get(16)?,
                rule: r.try_get(17)?,
                actor: r.try_get(18)?,
            });
        }
        jobs.sort_by_key(|j| j.id);
        Ok(jobs)
    }

    /// Returns jobs whose lease ran out to pending, whichever relay claimed them.
    pub async fn expire_leases(&self, now_ms: i64) -> Result<usize, StoreError> {
        let ids: Vec<i64> = self
            .run("lease expiry", OP_TIMEOUT, async |c| {
                let stmt = c
                    .prepare_cached(
                        "UPDATE jobs SET state = 'pending', lease_until = NULL, updated_at = $1
                         WHERE id IN (SELECT id FROM jobs WHERE state = 'sending' AND lease_until < $1
                                      FOR UPDATE SKIP LOCKED)
                         RETURNING id",
                    )
                    .await?;
                let rows = c.query(&stmt, &[&now_ms]).await?;
                rows.iter().map(|r| r.try_get(0)).collect()
            })
            .await?;
        if !ids.is_empty() {
            tracing::warn!(
                job_ids = ?ids,
                "claims whose lease expired (a relay stopped mid-call) are queued again"
            );
        }
        Ok(ids.len())
    }

    /// Extends the lease on a claimed job; `false` when the claim is no longer this one.
    pub async fn renew(
        &self,
        what: Leased,
        id: i64,
        claim: i64,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let until = now_ms.saturating_add(ms(self.lease));
        let limit = (self.lease / 3).clamp(Duration::from_millis(200), OP_TIMEOUT);
        let n = self
            .run("lease renewal", limit, async |c| {
                let stmt = c.prepare_cached(what.renewal()).await?;
                c.execute(&stmt, &[&id, &claim, &until]).await
            })
            .await?;
        Ok(n == 1)
    }

    /// Keeps the planner's statistics of the jobs table current (one relay at a time, at most
    /// every 5 s, only once more than 1,000 rows and a tenth of it have changed). The table is a queue that grows and
    /// churns within seconds, far faster than autovacuum's minute: plans made from statistics
    /// of a nearly empty table (a scan of every row ever claimed) would otherwise stay.
    pub async fn refresh_statistics(&self, now_ms: i64) -> Result<bool, StoreError> {
        let last = self.last_statistics_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) < STATISTICS_EVERY_MS {
            return Ok(false);
        }
        self.last_statistics_ms.store(now_ms, Ordering::Relaxed);
        self.run("statistics", Duration::from_secs(30), async |c| {
            let tx = c.transaction().await?;
            let mine: bool = tx
                .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&STATISTICS_LOCK])
                .await?
                .get(0);
            let due = mine
                && tx
                    .query_one(
                        "SELECT COALESCE(n_mod_since_analyze > 1000
                                 AND n_mod_since_analyze * 10 > n_live_tup, false)
                         FROM pg_stat_user_tables WHERE relid = 'jobs'::regclass",
                        &[],
                    )
                    .await?
                    .get::<_, bool>(0);
            if due {
                // SKIP_LOCKED: never wait on (and so cancel) an autovacuum of the table.
                tx.batch_execute("ANALYZE (SKIP_LOCKED) jobs").await?;
            }
            tx.commit().await?;
            Ok(due)
        })
        .await
    }

    /// A cheap "can I reach the database" check: `SELECT 1` on a pooled connection.
    pub async fn probe(&self) -> Result<(), StoreError> {
        let get = tokio::time::timeout(PROBE_TIMEOUT, self.client())
            .await
            .map_err(|_| unavailable("unreachable", "no connection within 2s"))??;
        match tokio::time::timeout(PROBE_TIMEOUT, get.simple_query("SELECT 1")).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                drop(Object::take(get));
                Err(unavailable("unreachable", e))
            }
            Err(_) => {
                drop(Object::take(get));
                Err(unavailable("unreachable", "no answer within 2s"))
            }
        }
    }

    pub async fn next_due(&self) -> Result<Option<i64>, StoreError> {
        self.run("next due", OP_TIMEOUT, async |c| {
            let stmt = c
                .prepare_cached(
                    // In the index's order (`jobs_due`), so it stops at the first job in turn
                    // instead of weighing every pending one.
                    "SELECT next_attempt_at FROM jobs WHERE state = 'pending'
                       AND NOT EXISTS (SELECT 1 FROM jobs e
                           WHERE e.org = jobs.org AND e.request_id = jobs.request_id
                             AND e.id < jobs.id AND e.state IN ('pending', 'sending'))
                     ORDER BY next_attempt_at, id LIMIT 1",
                )
                .await?;
            c.query_opt(&stmt, &[])
                .await?
                .map(|r| r.try_get(0))
                .transpose()
        })
        .await
    }

    /// The jobs in flight at any relay that a pending job of the same request waits behind
    /// (`Store::followed`; a relay looks again only when one of its own ends): the jobs in
    /// flight (`jobs_leased`), each looked up in `jobs_decision`.
    pub async fn followed(&self) -> Result<Vec<i64>, StoreError> {
        self.run("followed", OP_TIMEOUT, async |c| {
            let stmt = c
                .prepare_cached(
                    "SELECT s.id FROM jobs s WHERE s.state = 'sending' AND EXISTS (
                         SELECT 1 FROM jobs p WHERE p.org = s.org AND p.request_id = s.request_id
                            AND p.id > s.id AND p.state = 'pending')",
                )
                .await?;
            c.query(&stmt, &[])
                .await?
                .iter()
                .map(|r| r.try_get(0))
                .collect()
        })
        .await
    }

    /// At start: leases that ran out are returned to pending (claims of live relays stay).
    pub async fn recover(&self, now_ms: i64) -> Result<usize, StoreError> {
        self.expire_leases(now_ms).await
    }

    pub async fn counts(&self) -> Result<Counts, StoreError> {
        let rows = self
            .run("counts", OP_TIMEOUT, async |c| {
                let stmt = c
                    .prepare_cached(
                        "SELECT state, COUNT(*) FROM jobs
                         WHERE state IN ('pending', 'sending', 'dead') GROUP BY state",
                    )
                    .await?;
                c.query(&stmt, &[]).await
            })
            .await?;
        let mut counts = Counts::default();
        for r in rows {
            let (state, n): (String, i64) = (r.try_get(0)?, r.try_get(1)?);
            match state.as_str() {
                "dead" => counts.dead += n as u64,
                _ => counts.pending += n as u64,
            }
        }
        Ok(counts)
    }

    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<JobSummary>, StoreError> {
        let state = filter.state.map(State::as_str);
        let source = filter.source.clone();
        let subject = filter.subject.clone();
        let limit = if filter.limit == 0 { 100 } else { filter.limit } as i64;
        let sql = format!(
            "SELECT {SUMMARY} FROM jobs
             WHERE ($1::TEXT IS NULL OR state = $1) AND ($2::TEXT IS NULL OR source = $2)
               AND ($4::TEXT IS NULL OR subject = $4)
             ORDER BY id DESC LIMIT $3"
        );
        let rows = self
            .run("list", OP_TIMEOUT, async |c| {
                c.query(&sql, &[&state, &source, &limit, &subject]).await
            })
            .await?;
        Ok(rows.iter().map(summary).collect::<Result<_, _>>()?)
    }

    pub async fn show(&self, id: i64) -> Result<Option<JobDetail>, StoreError> {
        let sql = format!("SELECT {SUMMARY}, delivery_id, gate, evidence FROM jobs WHERE id = $1");
        self.run("show", OP_TIMEOUT, async |c| {
            let Some(row) = c.query_opt(&sql, &[&id]).await? else {
                return Ok(None);
            };
            let job = summary(&row)?;
            let delivery_id: i64 = row.try_get(15)?;
            let (gate, evidence) = (row.try_get(16)?, row.try_get(17)?);
            let d = c
                .query_one(
                    "SELECT id, source, dedup_key, received_at, rule, actor FROM deliveries
                     WHERE id = $1",
                    &[&delivery_id],
                )
                .await?;
            let attempts = c
                .query(
                    "SELECT at, status, result, error, duration_ms FROM attempts
                     WHERE job_id = $1 ORDER BY id",
                    &[&id],
                )
                .await?
                .iter()
                .map(|r| {
                    Ok(AttemptRow {
                        at_ms: r.try_get(0)?,
                        status: r
                            .try_get::<_, Option<i32>>(1)?
                            .map(|s| s.clamp(0, 999) as u16),
                        result: r.try_get(2)?,
                        error: r.try_get(3)?,
                        duration_ms: r.try_get(4)?,
                    })
                })
                .collect::<Result<_, tokio_postgres::Error>>()?;
            let answers = c
                .query(
                    "SELECT id, via, kind, body, state, attempts, updated_at, last_status, last_error
                     FROM answers WHERE job_id = $1 ORDER BY id",
                    &[&id],
                )
                .await?
                .iter()
                .map(|r| {
                    Ok(AnswerRow {
                        id: r.try_get(0)?,
                        via: r.try_get(1)?,
                        kind: r.try_get(2)?,
                        body: r.try_get(3)?,
                        state: r.try_get(4)?,
                        attempts: r.try_get::<_, i32>(5)?.max(0) as u32,
                        updated_at_ms: r.try_get(6)?,
                        last_status: r
                            .try_get::<_, Option<i32>>(7)?
                            .map(|s| s.clamp(0, 999) as u16),
                        last_error: r.try_get(8)?,
                    })
                })
                .collect::<Result<_, tokio_postgres::Error>>()?;
            Ok(Some(JobDetail {
                job,
                gate,
                evidence,
                delivery: DeliveryInfo {
                    id: d.try_get(0)?,
                    source: d.try_get(1)?,
                    dedup_key: d.try_get(2)?,
                    received_at_ms: d.try_get(3)?,
                    rule: d.try_get(4)?,
                    actor: d.try_get(5)?,
                },
                attempts,
                answers,
            }))
        })
        .await
    }

    /// Claims up to `limit` due answers, and up to `limit` answers whose claim lease ran out
    /// (a relay stopped while sending them), each under a new claim token. Two index scans,
    /// one per partial index, rather than one scan of the whole table.
    pub async fn claim_answers(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<AnswerJob>, StoreError> {
        let lease_until = now_ms.saturating_add(ms(self.lease));
        let limit = limit as i64;
        let rows = self
            .run("answer claim", OP_TIMEOUT, async |c| {
                let stmt = c
                    .prepare_cached(
                        "UPDATE answers SET state = 'sending', claim_token = claim_token + 1,
                                lease_until = $3, updated_at = $1
                         WHERE id IN (SELECT id FROM answers
                                      WHERE state = 'pending' AND next_attempt_at <= $1
                                      ORDER BY next_attempt_at, id LIMIT $2
                                      FOR UPDATE SKIP LOCKED)
                            OR id IN (SELECT id FROM answers
                                      WHERE state = 'sending' AND lease_until < $1
                                      LIMIT $2 FOR UPDATE SKIP LOCKED)
                         RETURNING id, job_id, via, kind, target, body, attempts, window_start,
                                   claim_token",
                    )
                    .await?;
                c.query(&stmt, &[&now_ms, &limit, &lease_until]).await
            })
            .await?;
        let mut out: Vec<AnswerJob> = rows
            .iter()
            .map(|r| AnswerJob {
                id: r.get(0),
                job_id: r.get(1),
                via: r.get(2),
                kind: r.get(3),
                target: r.get(4),
                body: r.get(5),
                attempts: r.get::<_, i32>(6).max(0) as u32,
                window_start_ms: r.get(7),
                claim: r.get(8),
            })
            .collect();
        out.sort_by_key(|a| a.id);
        Ok(out)
    }

    /// Records an answer attempt, only under the claim it was made with.
    pub async fn record_answer(&self, rec: &AnswerRecord) -> Result<(), StoreError> {
        let status = rec.status.map(i32::from);
        let attempts = rec.attempts as i32;
        let state = rec.state.as_str();
        self.run("answer record", OP_TIMEOUT, async |c| {
            let stmt = c
                .prepare_cached(
                    "UPDATE answers SET state = $2, attempts = $3, next_attempt_at = $4,
                            last_status = $5, last_error = $6, updated_at = $7, lease_until = NULL
                     WHERE id = $1 AND claim_token = $8 AND state = 'sending'",
                )
                .await?;
            c.execute(
                &stmt,
                &[
                    &rec.id,
                    &state,
                    &attempts,
                    &rec.next_attempt_at_ms,
                    &status,
                    &rec.error,
                    &rec.at_ms,
                    &rec.claim,
                ],
            )
            .await
        })
        .await?;
        Ok(())
    }

    pub async fn next_answer_due(&self) -> Result<Option<i64>, StoreError> {
        self.run("next answer due", OP_TIMEOUT, async |c| {
            let stmt = c
                .prepare_cached("SELECT MIN(next_attempt_at) FROM answers WHERE state = 'pending'")
                .await?;
            c.query_one(&stmt, &[]).await?.try_get(0)
        })
        .await
    }

    /// Makes dead (or rejected, when named) jobs pending again and announces them: each only
    /// while it is its request's latest decision, and an approve only while its subject has
    /// not ended since it was asked (`Candidate::sort`). The locks the writes take on each
    /// candidate's subject (shared) and request are taken first, in the same order, so an
    /// end or a later decision committing on another relay comes either before the replay,
    /// and is seen, or after it, and sees the job pending again.
    pub async fn replay(&self, which: Replay, now_ms: i64) -> Result<Replayed, StoreError> {
        let (which, named) = match which {
            Replay::One(id) => ("j.id = $1 AND j.state IN ('dead', 'rejected')", Some(id)),
            Replay::AllDead => ("j.state = 'dead' AND $1::BIGINT IS NULL", None),
        };
        self.run("replay", OP_TIMEOUT, async |c| {
            let tx = c.transaction().await?;
            let keys = format!(
                "SELECT j.source || '/' || j.subject, j.org || '/' || j.request_id
                 FROM jobs j WHERE {which}"
            );
            let rows = tx.query(&keys, &[&named]).await?;
            let subjects: Vec<Option<String>> = rows
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            let requests: Vec<String> = rows
                .iter()
                .map(|r| r.try_get(1))
                .collect::<Result<_, _>>()?;
            tx.execute(
                "SELECT pg_advisory_xact_lock_shared(7002, k) FROM (
                     SELECT DISTINCT hashtext(s) AS k FROM unnest($1::TEXT[]) s
                     WHERE s IS NOT NULL ORDER BY 1) x",
                &[&subjects],
            )
            .await?;
            tx.execute(
                "SELECT pg_advisory_xact_lock(7001, k) FROM (
                     SELECT DISTINCT hashtext(r) AS k FROM unnest($1::TEXT[]) r ORDER BY 1) x",
                &[&requests],
            )
            .await?;
            // Each candidate (read again, now that the locks are held), locked, with the
            // latest job on its request (`jobs_decision`) and its subject's end.
            let sql = format!(
                "SELECT j.id, j.action, l.id, l.action, j.subject, j.created_at, e.ended_at,
                        e.reopened_at IS NOT NULL
                 FROM jobs j
                 JOIN jobs l ON l.id = (SELECT MAX(k.id) FROM jobs k
                                        WHERE k.org = j.org AND k.request_id = j.request_id)
                 LEFT JOIN subject_ends e ON e.source = j.source AND e.subject = j.subject
                 WHERE {which} ORDER BY j.id FOR UPDATE OF j"
            );
            let mut replayed = Replayed::default();
            let mut queued = Vec::new();
            for row in tx.query(&sql, &[&named]).await? {
                let candidate = Candidate {
                    id: row.try_get(0)?,
                    action: row.try_get(1)?,
                    latest: row.try_get(2)?,
                    latest_action: row.try_get(3)?,
                    subject: row.try_get(4)?,
                    created_at: row.try_get(5)?,
                    ended_at: row.try_get(6)?,
                    reopened: row.try_get(7)?,
                };
                match candidate.sort(&mut replayed) {
                    Ok(true) => queued.push(candidate.id),
                    Ok(false) => {}
                    Err(e) => return Ok(Err(e)),
                }
            }
            if !queued.is_empty() {
                tx.execute(
                    "UPDATE jobs SET state = 'pending', attempts = 0, next_attempt_at = $1,
                            window_start = $1, updated_at = $1, refused = NULL, evidence = NULL, checked_at = NULL
                     WHERE id = ANY($2)",
                    &[&now_ms, &queued],
                )
                .await?;
                tx.execute("SELECT pg_notify($1, '')", &[&CHANNEL]).await?;
            }
            tx.commit().await?;
            Ok(Ok(replayed))
        })
        .await?
    }

    /// Forgets finished jobs, deliveries and subject ends past their windows (`Prune`). One
    /// relay at a time: the others find the lock taken and skip this round.
    pub async fn prune(&self, before: Prune) -> Result<usize, StoreError> {
        let older_than_ms = before.finished_before_ms;
        self.run("prune", Duration::from_secs(300), async |c| {
            let tx = c.transaction().await?;
            let mine: bool = tx
                .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&PRUNE_LOCK])
                .await?
                .get(0);
            if !mine {
                return Ok(0);
            }
            // A finished job that overtook a dead one on its request is kept while that one
            // is: gone, it would let a replay of the dead one undo it.
            let finished = "SELECT id FROM jobs WHERE state IN ('succeeded', 'rejected', 'dry_run')
                            AND updated_at < $1
                            AND NOT EXISTS (SELECT 1 FROM jobs d WHERE d.org = jobs.org
                                AND d.request_id = jobs.request_id AND d.id < jobs.id
                                AND d.state = 'dead')";
            tx.execute(
                &format!("DELETE FROM attempts WHERE job_id IN ({finished})"),
                &[&older_than_ms],
            )
            .await?;
            tx.execute(
                &format!("DELETE FROM answers WHERE job_id IN ({finished})"),
                &[&older_than_ms],
            )
            .await?;
            let jobs = tx
                .execute(
                    &format!("DELETE FROM jobs WHERE id IN ({finished})"),
                    &[&older_than_ms],
                )
                .await?;
            let deliveries = tx
                .execute(
                    "DELETE FROM deliveries d WHERE received_at < $1
                     AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.delivery_id = d.id)",
                    &[&older_than_ms],
                )
                .await?;
            tx.execute(
                "DELETE FROM dedup WHERE received_at < $1",
                &[&older_than_ms],
            )
            .await?;
            // An end is kept while a job under its subject could still be replayed.
            let ends = tx
                .execute(
                    "DELETE FROM subject_ends e WHERE ended_at < $1
                     AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.source = e.source
                                         AND j.subject = e.subject
                                         AND j.state IN ('dead', 'rejected'))",
                    &[&before.ends_before_ms],
                )
                .await?;
            tx.commit().await?;
            Ok((jobs + deliveries + ends) as usize)
        })
        .await
    }

    /// Wakes `wake` whenever any relay commits new work (LISTEN), reconnecting with backoff;
    /// also once after each (re)connection, for anything committed while not listening.
    pub fn spawn_listener(&self, wake: Arc<Notify>) -> tokio::task::JoinHandle<()> {
        let mut config = self.location.connect_config();
        config.connect_timeout(CONNECT_TIMEOUT);
        let tls = self.tls.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let (listened, error) = listen(&config, tls.clone(), &wake).await;
                if listened {
                    backoff = Duration::from_millis(100);
                }
                tracing::warn!(error = %error, retry_in_ms = backoff.as_millis() as u64,
                    "PostgreSQL listener disconnected; reconnecting");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        })
    }
}

/// One listening connection, until it fails: whether LISTEN took, and why it ended.
async fn listen(
    config: &tokio_postgres::Config,
    tls: MakeRustlsConnect,
    wake: &Arc<Notify>,
) -> (bool, String) {
    let (client, mut connection) = match config.connect(tls).await {
        Ok(c) => c,
        Err(e) => return (false, e.to_string()),
    };
    let waker = wake.clone();
    let mut driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => waker.notify_one(),
                Some(Ok(_)) => {}
                Some(Err(e)) => return e.to_string(),
                None => return "connection closed".to_owned(),
            }
        }
    });
    let sql = format!("LISTEN {CHANNEL}");
    let listened = tokio::select! {
        r = client.batch_execute(&sql) => r,
        _ = tokio::time::sleep(OP_TIMEOUT) => {
            driver.abort();
            return (false, "LISTEN not answered".into());
        }
    };
    if let Err(e) = listened {
        driver.abort();
        return (false, e.to_string());
    }
    wake.notify_one();
    // A connection that silently stopped answering is found by a periodic query.
    let reason = loop {
        tokio::select! {
            r = &mut driver => break r.unwrap_or_else(|e| e.to_string()),
            _ = tokio::time::sleep(Duration::from_secs(10)) => {
                match tokio::time::timeout(OP_TIMEOUT, client.simple_query("SELECT 1")).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => break e.to_string(),
                    Err(_) => break "no answer to a keepalive query".into(),
                }
            }
        }
    };
    driver.abort();
    (true, reason)
}

fn parse_result(v: &Value) -> Result<Accepted, StoreError> {
    let ids = |v: &Value| -> Vec<i64> {
        v.as_array()
            .map(|a| a.iter().filter_map(Value::as_i64).collect())
            .unwrap_or_default()
    };
    if let Some(dup) = v.get("dup") {
        return Ok(Accepted::Duplicate { job_ids: ids(dup) });
    }
    let jobs = v["jobs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|pair| {
                    Some(JobRef {
                        job_id: pair.get(0)?.as_i64()?,
                        coalesced: pair.get(1)?.as_bool()?,
                        refused: pair.get(2).and_then(Value::as_str).map(str::to_owned),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let bound = v["bound"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| {
                    Some(BoundRevocation {
                        job_id: b.get(0)?.as_i64()?,
                        org: b.get(1)?.as_str()?.to_owned(),
                        request_id: b.get(2)?.as_str()?.to_owned(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Accepted::New {
        jobs,
        bound,
        refused: v["refused"].as_str().map(str::to_owned),
        reopened: v["reopened"].as_bool().unwrap_or(false),
    })
}

const SUMMARY: &str = "id, source, org, request_id, action, expiration, state, attempts,
    created_at, updated_at, next_attempt_at, last_status, last_error, subject, ended_by";

fn summary(r: &tokio_postgres::Row) -> Result<JobSummary, tokio_postgres::Error> {
    Ok(JobSummary {
        id: r.try_get(0)?,
        source: r.try_get(1)?,
        org: r.try_get(2)?,
        request_id: r.try_get(3)?,
        action: r.try_get(4)?,
        expiration: r.try_get(5)?,
        state: r.try_get(6)?,
        attempts: r.try_get::<_, i32>(7)?.max(0) as u32,
        created_at_ms: r.try_get(8)?,
        updated_at_ms: r.try_get(9)?,
        next_attempt_at_ms: r.try_get(10)?,
        last_status: r
            .try_get::<_, Option<i32>>(11)?
            .map(|s| s.clamp(0, 999) as u16),
        last_error: r.try_get(12)?,
        subject: r.try_get(13)?,
        ended_by: r.try_get(14)?,
    })
}

/// A write for the batch writer.
pub(super) enum Write {
    Accept(NewDelivery, oneshot::Sender<Result<Accepted, StoreError>>),
    Record(AttemptRecord, oneshot::Sender<Result<(), StoreError>>),
}

/// The shared state behind a PostgreSQL `StoreHandle`.
pub(super) struct Shared {
    pub store: Arc<PgStore>,
    pub writes: mpsc::Sender<Write>,
    listener: std::sync::Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Ok(mut slot) = self.listener.lock()
            && let Some(h) = slot.take()
        {
            h.abort();
        }
    }
}

impl Shared {
    /// Starts the batch writer; it ends once every handle is gone and the queue is drained.
    pub fn spawn(
        store: PgStore,
        max_batch: usize,
        queue: usize,
    ) -> (Shared, tokio::task::JoinHandle<()>) {
        let store = Arc::new(store);
        let (tx, rx) = mpsc::channel(queue);
        let task = tokio::spawn(writer(store.clone(), rx, max_batch));
        (
            Shared {
                store,
                writes: tx,
                listener: std::sync::Mutex::new(None),
            },
            task,
        )
    }

    pub fn listen(&self, wake: Arc<Notify>) {
        let handle = self.store.spawn_listener(wake);
        if let Ok(mut slot) = self.listener.lock()
            && let Some(old) = slot.replace(handle.abort_handle())
        {
            old.abort();
        }
    }

    /// Keeps the lease on `what` `id` (claimed as `claim`) alive; returns only when the claim
    /// is lost (taken over, or not renewable for as long as the lease lasts), after which its
    /// call must be dropped.
    pub async fn hold_claim(&self, what: Leased, id: i64, claim: i64) {
        let lease = self.store.lease;
        let margin = lease / 6;
        let mut deadline = Instant::now() + lease - margin;
        // Logged as the rest of the relay names them.
        let job_id = (what == Leased::Job).then_some(id);
        let answer_id = (what == Leased::Answer).then_some(id);
        loop {
            tokio::time::sleep(lease / 3).await;
            match self.store.renew(what, id, claim, now_ms()).await {
                Ok(true) => deadline = Instant::now() + lease - margin,
                Ok(false) => {
                    tracing::warn!(
                        job_id,
                        answer_id,
                        "claim taken over by another relay; this relay drops its call"
                    );
                    return;
                }
                Err(e) if Instant::now() >= deadline => {
                    tracing::warn!(job_id, answer_id, error = %e,
                        "claim lease could not be renewed before it ran out; this relay drops its call");
                    return;
                }
                Err(e) => {
                    tracing::warn!(job_id, answer_id, error = %e, "cannot renew a claim lease")
                }
            }
        }
    }
}

async fn writer(store: Arc<PgStore>, mut rx: mpsc::Receiver<Write>, max_batch: usize) {
    let slots = Arc::new(Semaphore::new(WRITERS));
    let mut running = tokio::task::JoinSet::new();
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let Some(first) = rx.recv().await else {
            break;
        };
        // Everything waiting now goes into one transaction (group commit).
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let store = store.clone();
        running.spawn(async move {
            commit(&store, batch).await;
            drop(slot);
        });
        while running.try_join_next().is_some() {}
    }
    while running.join_next().await.is_some() {}
}

async fn commit(store: &PgStore, batch: Vec<Write>) {
    let mut deliveries = Vec::new();
    let mut accept_replies = Vec::new();
    let mut records = Vec::new();
    let mut record_replies = Vec::new();
    for w in batch {
        match w {
            Write::Accept(d, r) => {
                deliveries.push(d);
                accept_replies.push(r);
            }
            Write::Record(rec, r) => {
                records.push(rec);
                record_replies.push(r);
            }
        }
    }
    match store.write(&deliveries, &records, now_ms()).await {
        Ok(results) => {
            for (reply, result) in accept_replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
            for reply in record_replies {
                let _ = reply.send(Ok(()));
            }
        }
        Err(e) => {
            let text = e.to_string();
            let err = || match &e {
                StoreError::Unavailable(_) => StoreError::Unavailable(text.clone()),
                _ => StoreError::Invalid(text.clone()),
            };
            for reply in accept_replies {
                let _ = reply.send(Err(err()));
            }
            for reply in record_replies {
                let _ = reply.send(Err(err()));
            }
        }
    }
}

/// PostgreSQL refuses U+0000 in text and JSONB, so one sender's NUL (in an actor, a subject, a
/// dedup key part, P0's error text) would fail the whole batch it shares with others: it is
/// stored as U+FFFD instead.
fn without_nul(value: &mut Value) {
    match value {
        Value::String(s) if s.contains('\0') => *s = s.replace('\0', "\u{fffd}"),
        Value::Array(items) => items.iter_mut().for_each(without_nul),
        Value::Object(map) => map.values_mut().for_each(without_nul),
        _ => {}
    }
}

#[cfg(test)]
mod nul {
    #[test]
    fn nul_characters_become_replacement_characters() {
        let mut v = serde_json::json!({"a": ["x\u{0}y", {"b": "\u{0}"}], "c": 1});
        super::without_nul(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"a": ["x\u{fffd}y", {"b": "\u{fffd}"}], "c": 1})
        );
    }
}
