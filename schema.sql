-- reactor's schema. Idempotent: `reactor migrate` runs it whole, under an advisory lock, as often as it likes.
-- Additive changes only: a new column is `ADD COLUMN IF NOT EXISTS`, never a rewrite of a CREATE TABLE.

CREATE TABLE IF NOT EXISTS leads (
    lead_id            text PRIMARY KEY,            -- the source's own id, or one reactor generated
    seq                bigserial NOT NULL UNIQUE,   -- arrival order: the cursor of GET /leads
    email              text UNIQUE,                 -- normalised: trimmed, lowercased
    phone              text UNIQUE,                 -- normalised: E.164
    first_name         text,
    last_name          text,
    street             text,
    city               text,
    state              text,
    postal_code        text,
    country            text,
    vehicle_make       text,
    vehicle_model      text,
    vehicle_year       integer,
    employer           text,
    job_title          text,
    employment_status  text,
    years_employed     numeric,
    salary_min         numeric,
    salary_max         numeric,
    current_credit     numeric,
    consent            boolean,
    source             text,                        -- attribution as the payload gave it
    api_source         text NOT NULL,               -- the LEAD_API_KEYS source whose key posted it first
    utm_source         text,
    utm_medium         text,
    utm_campaign       text,
    utm_term           text,
    utm_content        text,
    raw                jsonb NOT NULL DEFAULT '{}', -- fields the schema does not know, verbatim
    created_at         timestamptz NOT NULL DEFAULT now(),
    last_seen_at       timestamptz NOT NULL DEFAULT now(),
    submission_count   integer NOT NULL DEFAULT 1,
    -- CRM state, written by the sync jobs.
    crm_person_id      text,
    crm_synced         boolean NOT NULL DEFAULT false,
    crm_synced_at      timestamptz,
    suppressed         boolean NOT NULL DEFAULT false,
    sync_attempts      integer NOT NULL DEFAULT 0,
    last_sync_error    text,
    CONSTRAINT leads_contact_required CHECK (email IS NOT NULL OR phone IS NOT NULL)
);

-- Sync leases and give-ups (added with the Twenty sync).
ALTER TABLE leads ADD COLUMN IF NOT EXISTS sync_claimed_until timestamptz;  -- a worker's lease on the lead
ALTER TABLE leads ADD COLUMN IF NOT EXISTS sync_gave_up_at timestamptz;     -- Twenty rejected it; replay retries

CREATE INDEX IF NOT EXISTS leads_first_name_ci ON leads (lower(first_name));
CREATE INDEX IF NOT EXISTS leads_last_name_ci ON leads (lower(last_name));
CREATE INDEX IF NOT EXISTS leads_full_name_ci ON leads (lower(first_name || ' ' || last_name));
CREATE INDEX IF NOT EXISTS leads_unsynced ON leads (seq) WHERE NOT crm_synced AND NOT suppressed;

-- Every accepted POST, verbatim: whatever the merge into `leads` could not keep (a second email for a person
-- already known by phone, say) is still here.
CREATE TABLE IF NOT EXISTS lead_submissions (
    id           bigserial PRIMARY KEY,
    lead_id      text NOT NULL REFERENCES leads (lead_id),
    api_source   text NOT NULL,
    outcome      text NOT NULL CHECK (outcome IN ('created', 'existing')),
    payload      jsonb NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS lead_submissions_lead ON lead_submissions (lead_id);

-- Jobs that failed for good (a rejected request, or every retry spent); `reactor replay` re-enqueues them.
CREATE TABLE IF NOT EXISTS failed_jobs (
    id           bigserial PRIMARY KEY,
    job_name     text NOT NULL,
    job_id       text,
    args         jsonb NOT NULL DEFAULT '[]',
    error        text NOT NULL,
    attempts     integer NOT NULL,
    failed_at    timestamptz NOT NULL DEFAULT now(),
    replayed_at  timestamptz
);

CREATE INDEX IF NOT EXISTS failed_jobs_pending ON failed_jobs (failed_at) WHERE replayed_at IS NULL;

-- Follow-up tasks reactor created in Twenty, one open per person. The task's id is chosen here before Twenty is
-- called, so a retry (after a crash between Twenty's answer and our commit) upserts the same task, not a second.
CREATE TABLE IF NOT EXISTS follow_ups (
    id           bigserial PRIMARY KEY,
    person_id    text NOT NULL,
    task_id      text NOT NULL UNIQUE,
    target_id    text NOT NULL,
    assignee_id  text,
    state        text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'open', 'closed', 'failed')),
    llm_used     boolean,
    last_error   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    opened_at    timestamptz,
    closed_at    timestamptz
);

CREATE UNIQUE INDEX IF NOT EXISTS follow_ups_one_open ON follow_ups (person_id) WHERE state IN ('pending', 'open');

-- Routing: availability and caps per workspace member (GET/PUT /members/{id}/availability).
CREATE TABLE IF NOT EXISTS member_availability (
    member_id       text PRIMARY KEY,
    away            boolean NOT NULL DEFAULT false,      -- away until further notice
    away_until      timestamptz,                          -- away until this moment
    working_hours   jsonb,                                -- {"timezone", "days": ["mon", …], "start": "09:00", "end": "17:30"}
    max_open_tasks  integer CHECK (max_open_tasks >= 0),  -- NULL: MEMBER_MAX_OPEN_TASKS applies
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Every assignment decision, with every candidate as it was at that moment (GET /assignments).
CREATE TABLE IF NOT EXISTS assignment_decisions (
    id             bigserial PRIMARY KEY,
    person_id      text,
    task_id        text NOT NULL,
    chosen_member  text,                                  -- NULL: nobody was available (the follow-up waits)
    rule           text NOT NULL,
    candidates     jsonb NOT NULL,
    decided_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS assignment_decisions_person ON assignment_decisions (person_id, decided_at DESC);

-- Follow-ups: waiting for an available member; SLA re-assignment bookkeeping.
ALTER TABLE follow_ups ADD COLUMN IF NOT EXISTS wait_until timestamptz;
ALTER TABLE follow_ups ADD COLUMN IF NOT EXISTS task_version text;       -- the task's updatedAt after our last write
ALTER TABLE follow_ups ADD COLUMN IF NOT EXISTS reassignments integer NOT NULL DEFAULT 0;

-- The write path as state machines (issue 13). A follow-up row is the whole record of the follow-up: owed
-- (`pending`: its assignee, once chosen, is the reservation), its task in Twenty (`created`), linked to the person
-- (`open`), and `closed` (done or deleted) or `failed` (Twenty refused it). Task events move it, guarded by the
-- task's version; the drain loop claims rows with a lease.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'follow_ups_state_v2') THEN
        ALTER TABLE follow_ups DROP CONSTRAINT IF EXISTS follow_ups_state_check;
        ALTER TABLE follow_ups ADD CONSTRAINT follow_ups_state_v2
            CHECK (state IN ('pending', 'created', 'open', 'closed', 'failed'));
    END IF;
END $$;
CREATE UNIQUE INDEX IF NOT EXISTS follow_ups_one_active ON follow_ups (person_id)
    WHERE state IN ('pending', 'created', 'open');
DROP INDEX IF EXISTS follow_ups_one_open;
ALTER TABLE follow_ups ADD COLUMN IF NOT EXISTS task_status text;              -- as the last event or write said
ALTER TABLE follow_ups ADD COLUMN IF NOT EXISTS event_version bigint NOT NULL DEFAULT 0;  -- task updatedAt, ms
ALTER TABLE follow_ups ADD COLUMN IF NOT EXISTS claimed_until timestamptz;     -- a drain loop's lease
ALTER TABLE follow_ups ADD COLUMN IF NOT EXISTS attempts integer NOT NULL DEFAULT 0;
ALTER TABLE follow_ups ADD COLUMN IF NOT EXISTS trigger text;                  -- what made it owed
ALTER TABLE follow_ups ADD COLUMN IF NOT EXISTS person jsonb;                  -- the Person record, when known
ALTER TABLE follow_ups ADD COLUMN IF NOT EXISTS assigned_at timestamptz;
ALTER TABLE follow_ups ADD COLUMN IF NOT EXISTS sla_due_at timestamptz;        -- SLA re-assignment sweep
ALTER TABLE follow_ups ADD COLUMN IF NOT EXISTS workspace text;                -- the Twenty workspace it belongs to
CREATE INDEX IF NOT EXISTS follow_ups_drainable ON follow_ups (id) WHERE state IN ('pending', 'created');
CREATE INDEX IF NOT EXISTS follow_ups_active_assignee ON follow_ups (assignee_id)
    WHERE state IN ('pending', 'created', 'open');
CREATE INDEX IF NOT EXISTS follow_ups_sla_due ON follow_ups (sla_due_at) WHERE state = 'open';

-- A lead owes its person an active follow-up after each submission (last_seen_at): the drain checks once per
-- submission and records when. Leads from before this column are taken as checked.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_name = 'leads' AND column_name = 'follow_up_checked_at') THEN
        ALTER TABLE leads ADD COLUMN follow_up_checked_at timestamptz;
        UPDATE leads SET follow_up_checked_at = last_seen_at WHERE crm_synced;
    END IF;
END $$;
CREATE INDEX IF NOT EXISTS leads_follow_up_due ON leads (seq)
    WHERE crm_synced AND crm_person_id IS NOT NULL AND NOT suppressed
      AND (follow_up_checked_at IS NULL OR follow_up_checked_at < last_seen_at);

-- Facts reactor keeps about its Twenty workspace, e.g. when its webhook subscription was installed.
CREATE TABLE IF NOT EXISTS reactor_facts (
    key         text PRIMARY KEY,
    value       text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
