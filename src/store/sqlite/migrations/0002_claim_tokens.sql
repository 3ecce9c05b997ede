-- A claim token on each job: an outcome counts only under the claim it was made with.
ALTER TABLE jobs ADD COLUMN claim_token INTEGER NOT NULL DEFAULT 0;
