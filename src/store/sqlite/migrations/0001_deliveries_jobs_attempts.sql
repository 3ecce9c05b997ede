-- The first schema: deliveries (deduplicated by source and dedup key), the decisions (jobs) they
-- carry, and the attempts made at each.
CREATE TABLE deliveries (
    id          INTEGER PRIMARY KEY,
    source      TEXT NOT NULL,
    dedup_key   TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    rule        TEXT NOT NULL,
    actor       TEXT,
    job_ids     TEXT NOT NULL DEFAULT '',
    payload     BLOB
);
CREATE INDEX deliveries_dedup ON deliveries (source, dedup_key, received_at);
CREATE TABLE jobs (
    id              INTEGER PRIMARY KEY,
    delivery_id     INTEGER NOT NULL REFERENCES deliveries (id),
    source          TEXT NOT NULL,
    org             TEXT NOT NULL,
    request_id      TEXT NOT NULL,
    action          TEXT NOT NULL,
    expiration      TEXT,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    window_start    INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    last_status     INTEGER,
    last_error      TEXT
);
CREATE INDEX jobs_due ON jobs (state, next_attempt_at);
CREATE INDEX jobs_decision ON jobs (org, request_id, id);
CREATE TABLE attempts (
    job_id      INTEGER NOT NULL REFERENCES jobs (id),
    at          INTEGER NOT NULL,
    status      INTEGER,
    result      TEXT NOT NULL,
    error       TEXT,
    duration_ms INTEGER NOT NULL
);
CREATE INDEX attempts_job ON attempts (job_id);
