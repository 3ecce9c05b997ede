-- Subjects that ended (an incident resolved, an alert closed, an issue closed): approves
-- under one are refused until it reopens, and a replay never sends an approve asked before
-- its subject's latest end. `refused` is why the store refused a job as it was accepted.
-- `gate` is the on-call check an approve must pass before it is sent (JSON), `evidence` what
-- the check found.
CREATE TABLE subject_ends (
    source      TEXT NOT NULL,
    subject     TEXT NOT NULL,
    ended_at    INTEGER NOT NULL,
    delivery_id INTEGER NOT NULL,
    reopened_at INTEGER,
    PRIMARY KEY (source, subject)
) WITHOUT ROWID;
CREATE INDEX subject_ends_at ON subject_ends (ended_at);
ALTER TABLE jobs ADD COLUMN refused TEXT;
ALTER TABLE jobs ADD COLUMN gate TEXT;
ALTER TABLE jobs ADD COLUMN evidence TEXT;
