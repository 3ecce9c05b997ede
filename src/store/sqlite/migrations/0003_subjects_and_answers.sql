-- Each decision's subject, where to answer, and the revocation a subject's end made; the
-- answers back, claimed and sent like jobs.
ALTER TABLE jobs ADD COLUMN subject TEXT;
ALTER TABLE jobs ADD COLUMN reply TEXT;
ALTER TABLE jobs ADD COLUMN ended_by INTEGER;
CREATE INDEX jobs_subject ON jobs (source, subject, id);
CREATE TABLE answers (
    id              INTEGER PRIMARY KEY,
    job_id          INTEGER NOT NULL REFERENCES jobs (id),
    via             TEXT NOT NULL,
    kind            TEXT NOT NULL,
    target          TEXT NOT NULL,
    body            TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    window_start    INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    last_status     INTEGER,
    last_error      TEXT,
    claim_token     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX answers_due ON answers (state, next_attempt_at);
CREATE INDEX answers_job ON answers (job_id);
