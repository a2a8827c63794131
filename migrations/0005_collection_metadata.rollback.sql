ALTER TABLE collections DROP COLUMN metadata;
