ALTER TABLE jobs DROP COLUMN retrieval_started_at, DROP COLUMN retrieved_at;
