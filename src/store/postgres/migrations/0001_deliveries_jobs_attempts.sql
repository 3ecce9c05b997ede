-- The first schema: deliveries, deduplicated across every relay by their key; the decisions
-- (jobs) they carry, claimed under a token and a lease; and the attempts made at each.
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
