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
