-- Subjects that ended stay ended. A delivery asking to approve under a subject that ended
-- and did not reopen (GitHub `reopened`, an alert firing again) is refused whole: its
-- decisions are stored with the reason in `refused`, which the worker records as rejected
-- and answers back without calling P0. A delivery that reopens its subject takes the
-- subject's lock alone, as an end does, and is written one at a time like an end.
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
