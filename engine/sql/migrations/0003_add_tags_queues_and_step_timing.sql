-- Migration 0003: what the dashboard shows and filters by.
--
-- durable.runs gains:
--   tags     String tags given at start (app.start(..., tags={"tenant": "acme"})), as a JSON
--            object of strings; runs_tags finds the runs carrying a tag (tags @> {"k": "v"})
--            or any tag of a value (tags @@ $.* == "v").
--   queue    The queue of the run's function when the starting code declared it (NULL: started
--            by name, by code that does not declare the function).
-- durable.journal gains:
--   started_at, duration_ms
--            For a step: when its body's last try began (the database's time as the worker
--            estimates it) and how long it ran. For an event a run waited for: when the wait
--            began. The entry's created_at is when it was journaled.
--   timing   For a step retried: its failed tries before the last ({"tries": [{"at": ...,
--            "ms": ..., "error": ...}]}). For an event waited for: its deadline.
-- runs_created orders the runs list (newest first, keyset pagination on created_at, id).
-- durable.watchers: the processes watching runs live (a dashboard with a page open), each
-- seen within the last minute; appends are announced only while there is one (below).

ALTER TABLE durable.runs
    ADD COLUMN tags  jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN queue text;

ALTER TABLE durable.journal
    ADD COLUMN started_at  timestamptz,
    ADD COLUMN duration_ms double precision,
    ADD COLUMN timing      jsonb;

-- Partial: a run started without tags costs the index nothing.
CREATE INDEX runs_tags ON durable.runs USING gin (tags) WHERE tags <> '{}';
CREATE INDEX runs_created ON durable.runs (created_at DESC, id DESC);

CREATE TABLE durable.watchers (
    id    text PRIMARY KEY,
    seen  timestamptz NOT NULL
);

-- Who watches runs live (the dashboard) hears of every journal append on channel
-- durable_journal: one notification per statement, its payload the ids of the runs written to,
-- comma-separated, or empty when there are too many to list (then: any run may have changed).
-- A run's end is on durable_done and a cancellation on durable_cancel already. Nothing is sent
-- while nobody watches: a NOTIFY wakes every listening backend of the database at commit, the
-- workers' own included, and they need not pay for a dashboard nobody has open.
CREATE FUNCTION durable.notify_journal() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_ids text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM durable.watchers w
                    WHERE w.seen > now() - interval '1 minute') THEN
        RETURN NULL;
    END IF;
    SELECT CASE WHEN count(DISTINCT n.run_id) <= 200
                THEN string_agg(DISTINCT n.run_id::text, ',') ELSE '' END
      INTO v_ids FROM new_entries n;
    IF v_ids IS NOT NULL THEN
        PERFORM pg_notify('durable_journal', v_ids);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER journal_notify
    AFTER INSERT ON durable.journal
    REFERENCING NEW TABLE AS new_entries
    FOR EACH STATEMENT EXECUTE FUNCTION durable.notify_journal();
