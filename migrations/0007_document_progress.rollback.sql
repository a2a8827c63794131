DROP INDEX documents_in_progress;
