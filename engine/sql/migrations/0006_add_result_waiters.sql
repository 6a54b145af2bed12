-- Migration 0006: runs' ends are announced only while someone awaits them.
--
-- durable.result_waiters: the processes with a caller awaiting a run's end (RunHandle.result),
-- each seen within the last minute. A run's end is announced on durable_done (one notification
-- per run) only while there is one, or a watcher (a dashboard): a NOTIFY wakes every listening
-- backend of the database at commit, every worker's own included, and each worker heard of
-- every end it had just written (durable.announce_ends).

CREATE TABLE durable.result_waiters (
    id    text PRIMARY KEY,
    seen  timestamptz NOT NULL
);
