-- Migration 0005: retention. The tables that grow with every run (runs, journal, events) become
-- partitioned by segment, so that what retention removes goes by dropping whole partitions: the
-- journal stays append-only, a day's cleanup costs the same whatever it removes, and the disk
-- space comes back.
--
-- durable.segments: one row per segment. A segment is one time window of one retention class
--   (retention: how long its finished runs are kept; NULL: for ever). New runs and events go to
--   the open segment of their class; a run's journal entries go to its run's segment. A class's
--   open segment is closed when a newer one is opened (durable.rotate_segments); a closed one is
--   dropped once its retention has passed since it closed (durable.drop_segment), after the
--   runs and events it must keep have been carried forward, by copy, into the open segment.
--   Segment 1, of the class "for ever", is made here; durable.add_segment makes the others,
--   each with one partition of each table: runs_N, journal_N, events_N.
-- durable.runs, durable.journal, durable.events gain the column segment and are partitioned by
--   it (LIST); their keys include it: runs (id, segment), journal (run_id, segment, position),
--   events (id, segment). A run's id and idempotency key stay unique across segments through
--   durable.create_runs, which looks in every segment before it inserts. The foreign keys to
--   durable.runs go (a key into a partitioned table must include its partition column); the
--   functions keep the references whole.
-- What was there moves to segment 1. The journal's triggers and the view queue_depths are made
-- again on the new tables.

CREATE TABLE durable.segments (
    id          integer PRIMARY KEY,
    retention   interval,
    opened_at   timestamptz NOT NULL,
    closed_at   timestamptz,
    dropped_at  timestamptz,
    removed     jsonb
);

CREATE INDEX segments_class ON durable.segments (retention, id) WHERE dropped_at IS NULL;

INSERT INTO durable.segments (id, retention, opened_at) VALUES (1, NULL, now());

DROP VIEW durable.queue_depths;
ALTER TABLE durable.waits DROP CONSTRAINT waits_run_id_fkey;

ALTER TABLE durable.runs RENAME TO runs_0004;
ALTER TABLE durable.journal RENAME TO journal_0004;
ALTER TABLE durable.events RENAME TO events_0004;

CREATE TABLE durable.runs (
    LIKE durable.runs_0004 INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
    segment integer NOT NULL
) PARTITION BY LIST (segment);
CREATE TABLE durable.journal (
    LIKE durable.journal_0004 INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
    segment integer NOT NULL
) PARTITION BY LIST (segment);
CREATE TABLE durable.events (
    LIKE durable.events_0004 INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
    segment integer NOT NULL
) PARTITION BY LIST (segment);
ALTER SEQUENCE durable.events_id_seq OWNED BY durable.events.id;

CREATE TABLE durable.runs_1 PARTITION OF durable.runs FOR VALUES IN (1);
CREATE TABLE durable.journal_1 PARTITION OF durable.journal FOR VALUES IN (1);
CREATE TABLE durable.events_1 PARTITION OF durable.events FOR VALUES IN (1);

INSERT INTO durable.runs SELECT o.*, 1 FROM durable.runs_0004 o;
INSERT INTO durable.journal SELECT o.*, 1 FROM durable.journal_0004 o;
INSERT INTO durable.events SELECT o.*, 1 FROM durable.events_0004 o;

DROP TABLE durable.journal_0004;
DROP TABLE durable.runs_0004;
DROP TABLE durable.events_0004;

ALTER TABLE durable.runs ADD PRIMARY KEY (id, segment);
ALTER TABLE durable.runs ADD CONSTRAINT runs_idempotency_key_key
    UNIQUE (idempotency_key, segment);
CREATE INDEX runs_claimable ON durable.runs (priority DESC, available_at)
    WHERE status IN ('pending', 'suspended', 'running');
CREATE INDEX runs_parent ON durable.runs (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX runs_slot_holders ON durable.runs (concurrency_key) WHERE holds_slot;
CREATE INDEX runs_awaiting_slot ON durable.runs (concurrency_key, priority DESC, created_at)
    WHERE awaiting_slot;
CREATE INDEX runs_active_by_key ON durable.runs (concurrency_key, created_at)
    WHERE concurrency_key IS NOT NULL
      AND status IN ('pending', 'running', 'suspended', 'paused');
CREATE INDEX runs_status_created ON durable.runs (status, created_at DESC);
CREATE INDEX runs_forked_from ON durable.runs (forked_from) WHERE forked_from IS NOT NULL;
CREATE INDEX runs_paused ON durable.runs (function) WHERE status = 'paused';
CREATE INDEX runs_tags ON durable.runs USING gin (tags) WHERE tags <> '{}';
CREATE INDEX runs_created ON durable.runs (created_at DESC, id DESC);
-- Retention asks which runs are unfinished (their event cursors, their families).
CREATE INDEX runs_unfinished ON durable.runs (event_cursor)
    WHERE status IN ('pending', 'running', 'suspended', 'paused');

ALTER TABLE durable.journal ADD PRIMARY KEY (run_id, position, segment);

ALTER TABLE durable.events ADD PRIMARY KEY (id, segment);
CREATE INDEX events_name_key ON durable.events (name, key, id);

CREATE TRIGGER journal_append_only
    BEFORE UPDATE OR DELETE ON durable.journal
    FOR EACH ROW EXECUTE FUNCTION durable.reject_journal_change();

CREATE TRIGGER journal_notify
    AFTER INSERT ON durable.journal
    REFERENCING NEW TABLE AS new_entries
    FOR EACH STATEMENT EXECUTE FUNCTION durable.notify_journal();

CREATE VIEW durable.queue_depths AS
SELECT r.queue,
       count(*) FILTER (WHERE r.status = 'pending' AND r.available_at <= now()) AS pending,
       count(*) FILTER (WHERE r.status = 'pending' AND r.available_at > now()) AS scheduled,
       count(*) FILTER (WHERE r.status = 'running') AS running,
       min(r.created_at) FILTER (WHERE r.status = 'pending' AND r.available_at <= now())
           AS oldest_pending
  FROM durable.runs r
 WHERE r.status IN ('pending', 'running')
 GROUP BY r.queue;
