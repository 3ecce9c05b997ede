-- Batches without savepoints (a batch that fails is written again one delivery at a time by
-- the relay, so no subtransaction is opened per delivery), a subject's lock shared by the
-- decisions on it and taken alone only by its end, each delivery written in one INSERT.
-- No foreign keys on the hot path: each was a lookup and a row lock on the parent per
-- child written, and p0_relay_write is the only writer of parents and children alike.
ALTER TABLE jobs DROP CONSTRAINT IF EXISTS jobs_delivery_id_fkey;
ALTER TABLE attempts DROP CONSTRAINT IF EXISTS attempts_job_id_fkey;
-- The jobs table is a queue: rows go pending, sending, done within seconds, so it is vacuumed
-- and analysed sooner than the defaults would (dead rows slow every claim's index scan).
ALTER TABLE jobs SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02);
