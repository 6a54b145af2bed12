-- Migration 0002: code that changes under runs in flight.
--
-- durable.runs gains:
--   versions         The version of the code each attempt ran on, by attempt number (a claim
--                    appends the claiming worker's version of the function): versions[1] is the
--                    version the run started on.
--   pinned           A run of a function declared with versioning="pinned": once started, only
--                    workers whose version of the function is versions[1] claim it.
--   paused_versions  The versions whose code paused the run on a non-determinism: a worker of
--                    another version tries it again when it starts, once per version.
--   forked_from, fork_position
--                    A run forked (or retried) from another, and the journal position where
--                    the copy of the other's journal stops; the other run is untouched.
-- durable.journal admits a fourth kind of marker besides now/uuid/random: 'patch', which
-- ctx.patched and ctx.deprecate_patch write where a run passes a patch point live.

ALTER TABLE durable.runs
    ADD COLUMN versions        text[] NOT NULL DEFAULT '{}',
    ADD COLUMN pinned          boolean NOT NULL DEFAULT false,
    ADD COLUMN paused_versions text[] NOT NULL DEFAULT '{}',
    ADD COLUMN forked_from     uuid,
    ADD COLUMN fork_position   text;

CREATE INDEX runs_forked_from ON durable.runs (forked_from) WHERE forked_from IS NOT NULL;
CREATE INDEX runs_paused ON durable.runs (function) WHERE status = 'paused';

ALTER TABLE durable.journal
    DROP CONSTRAINT journal_kind_check,
    ADD CONSTRAINT journal_kind_check
        CHECK (kind IN ('step', 'sleep', 'event', 'now', 'uuid', 'random', 'start', 'join',
                        'patch'));
