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
CREATE INDEX IF NOT EXISTS leads_crm_person ON leads (crm_person_id) WHERE crm_person_id IS NOT NULL;

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

-- Lead identity (issue 14). reactor's own `lead_id` is the key; a source's id is (api_source, source_lead_id),
-- unique per source and a dedupe key only within that source. Leads stored before this change were keyed by the
-- source's id, so they keep it as their lead_id (every existing id stays valid) and get it as source_lead_id too;
-- the backfill skips reactor's generated `ld_` ids, which makes re-running it a no-op.
ALTER TABLE leads ADD COLUMN IF NOT EXISTS source_lead_id text;
UPDATE leads SET source_lead_id = lead_id WHERE source_lead_id IS NULL AND lead_id NOT LIKE 'ld\_%';
CREATE UNIQUE INDEX IF NOT EXISTS leads_source_lead_id ON leads (api_source, source_lead_id);

-- Versions and survivorship: every merge that changes the lead bumps `version`; a push records the version it sent
-- (`synced_version`) and the Person fields it sent (`pushed`), so a re-sync sends only what changed since.
ALTER TABLE leads ADD COLUMN IF NOT EXISTS version bigint NOT NULL DEFAULT 1;
ALTER TABLE leads ADD COLUMN IF NOT EXISTS synced_version bigint;
ALTER TABLE leads ADD COLUMN IF NOT EXISTS pushed jsonb;
-- A lead synced before versions existed was pushed whole, every column as it is now (any gain made it pending):
-- record that, so its next re-sync sends only what changes from here. Synced leads written since always have a
-- synced_version, so this touches nothing twice.
UPDATE leads SET synced_version = version,
                 pushed = jsonb_strip_nulls(jsonb_build_object('first_name', first_name, 'last_name', last_name,
                                                               'email', email, 'phone', phone,
                                                               'job_title', job_title, 'city', city))
 WHERE synced_version IS NULL AND crm_synced;

-- Intake in one round trip (issue 17): insert the lead or merge it into the one it matches, and record the
-- submission, in one call. Race-free as the unique indexes make it: INSERT … ON CONFLICT DO NOTHING waits for a
-- concurrent insert of the same email, phone or source id and then gives way; each statement of a VOLATILE
-- function takes a fresh snapshot, so the lookup that follows sees the winner. A merge that would take an email
-- or phone a concurrent writer just took fails in its own sub-transaction and goes round again.
-- Merge rules: a column the lead lacks is gained, one it has is kept, except the salary range, where the newer
-- range wins whole (so min <= max always holds); `raw` gains the new unknown keys only while the lead stays
-- under the key and byte caps (the submission itself is always kept whole in lead_submissions). Any change bumps
-- `version` and makes the lead pending again.
CREATE OR REPLACE FUNCTION reactor_submit_lead(
    p_lead_id text,
    p_api_source text,
    p_source_lead_id text,
    p_raw jsonb,
    p_payload jsonb,
    p_raw_max_keys integer,
    p_raw_max_bytes integer,
    p_email text,
    p_phone text,
    p_first_name text,
    p_last_name text,
    p_street text,
    p_city text,
    p_state text,
    p_postal_code text,
    p_country text,
    p_vehicle_make text,
    p_vehicle_model text,
    p_vehicle_year integer,
    p_employer text,
    p_job_title text,
    p_employment_status text,
    p_years_employed numeric,
    p_salary_min numeric,
    p_salary_max numeric,
    p_current_credit numeric,
    p_consent boolean,
    p_source text,
    p_utm_source text,
    p_utm_medium text,
    p_utm_campaign text,
    p_utm_term text,
    p_utm_content text
) RETURNS TABLE (lead_id text, created boolean)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_id text;
    v_raw jsonb;
BEGIN
    v_raw := CASE WHEN p_raw = '{}'::jsonb
                    OR ((SELECT count(*) FROM jsonb_object_keys(p_raw)) <= p_raw_max_keys
                        AND octet_length(p_raw::text) <= p_raw_max_bytes)
                  THEN p_raw ELSE '{}'::jsonb END;
    FOR attempt IN 1..5 LOOP
        INSERT INTO leads AS l (lead_id, api_source, source_lead_id, raw, email, phone, first_name, last_name, street, city, state, postal_code, country, vehicle_make, vehicle_model, vehicle_year, employer, job_title, employment_status, years_employed, salary_min, salary_max, current_credit, consent, source, utm_source, utm_medium, utm_campaign, utm_term, utm_content)
        VALUES (p_lead_id, p_api_source, p_source_lead_id, v_raw, p_email, p_phone, p_first_name, p_last_name, p_street, p_city, p_state, p_postal_code, p_country, p_vehicle_make, p_vehicle_model, p_vehicle_year, p_employer, p_job_title, p_employment_status, p_years_employed, p_salary_min, p_salary_max, p_current_credit, p_consent, p_source, p_utm_source, p_utm_medium, p_utm_campaign, p_utm_term, p_utm_content)
        ON CONFLICT DO NOTHING
        RETURNING l.lead_id INTO v_id;
        IF v_id IS NOT NULL THEN
            INSERT INTO lead_submissions (lead_id, api_source, outcome, payload)
            VALUES (v_id, p_api_source, 'created', p_payload);
            RETURN QUERY SELECT v_id, true;
            RETURN;
        END IF;
        -- Dedupe order: email, then phone, then the source's own id (within that source only).
        SELECT m.lead_id INTO v_id FROM (
            SELECT o.lead_id, 1 AS rank FROM leads o WHERE o.email = p_email
            UNION ALL SELECT o.lead_id, 2 FROM leads o WHERE o.phone = p_phone
            UNION ALL SELECT o.lead_id, 3 FROM leads o
                      WHERE o.api_source = p_api_source AND o.source_lead_id = p_source_lead_id
        ) AS m ORDER BY m.rank LIMIT 1;
        CONTINUE WHEN v_id IS NULL;
        BEGIN
            UPDATE leads AS l SET
            email = COALESCE(l.email, (SELECT p_email WHERE NOT EXISTS (SELECT 1 FROM leads o WHERE o.email = p_email))),
            phone = COALESCE(l.phone, (SELECT p_phone WHERE NOT EXISTS (SELECT 1 FROM leads o WHERE o.phone = p_phone))),
            first_name = COALESCE(l.first_name, p_first_name),
            last_name = COALESCE(l.last_name, p_last_name),
            street = COALESCE(l.street, p_street),
            city = COALESCE(l.city, p_city),
            state = COALESCE(l.state, p_state),
            postal_code = COALESCE(l.postal_code, p_postal_code),
            country = COALESCE(l.country, p_country),
            vehicle_make = COALESCE(l.vehicle_make, p_vehicle_make),
            vehicle_model = COALESCE(l.vehicle_model, p_vehicle_model),
            vehicle_year = COALESCE(l.vehicle_year, p_vehicle_year),
            employer = COALESCE(l.employer, p_employer),
            job_title = COALESCE(l.job_title, p_job_title),
            employment_status = COALESCE(l.employment_status, p_employment_status),
            years_employed = COALESCE(l.years_employed, p_years_employed),
            current_credit = COALESCE(l.current_credit, p_current_credit),
            consent = COALESCE(l.consent, p_consent),
            source = COALESCE(l.source, p_source),
            utm_source = COALESCE(l.utm_source, p_utm_source),
            utm_medium = COALESCE(l.utm_medium, p_utm_medium),
            utm_campaign = COALESCE(l.utm_campaign, p_utm_campaign),
            utm_term = COALESCE(l.utm_term, p_utm_term),
            utm_content = COALESCE(l.utm_content, p_utm_content),
            salary_min = CASE WHEN p_salary_min IS NULL AND p_salary_max IS NULL THEN l.salary_min ELSE p_salary_min END,
            salary_max = CASE WHEN p_salary_min IS NULL AND p_salary_max IS NULL THEN l.salary_max ELSE p_salary_max END,
            raw = CASE WHEN p_raw = '{}'::jsonb THEN l.raw
                       WHEN (SELECT count(*) FROM jsonb_object_keys(p_raw || l.raw)) <= p_raw_max_keys
                            AND octet_length((p_raw || l.raw)::text) <= p_raw_max_bytes THEN p_raw || l.raw
                       ELSE l.raw END,
            -- Whether the submission gained the lead anything: a new version, and pending again (computed once).
            (version, crm_synced) = (SELECT l.version + gained::integer, l.crm_synced AND NOT gained
                                     FROM (SELECT (l.email IS NULL AND p_email IS NOT NULL AND NOT EXISTS (SELECT 1 FROM leads o WHERE o.email = p_email)) OR
                                           (l.phone IS NULL AND p_phone IS NOT NULL AND NOT EXISTS (SELECT 1 FROM leads o WHERE o.phone = p_phone)) OR
                                           (l.first_name IS NULL AND p_first_name IS NOT NULL) OR
                                           (l.last_name IS NULL AND p_last_name IS NOT NULL) OR
                                           (l.street IS NULL AND p_street IS NOT NULL) OR
                                           (l.city IS NULL AND p_city IS NOT NULL) OR
                                           (l.state IS NULL AND p_state IS NOT NULL) OR
                                           (l.postal_code IS NULL AND p_postal_code IS NOT NULL) OR
                                           (l.country IS NULL AND p_country IS NOT NULL) OR
                                           (l.vehicle_make IS NULL AND p_vehicle_make IS NOT NULL) OR
                                           (l.vehicle_model IS NULL AND p_vehicle_model IS NOT NULL) OR
                                           (l.vehicle_year IS NULL AND p_vehicle_year IS NOT NULL) OR
                                           (l.employer IS NULL AND p_employer IS NOT NULL) OR
                                           (l.job_title IS NULL AND p_job_title IS NOT NULL) OR
                                           (l.employment_status IS NULL AND p_employment_status IS NOT NULL) OR
                                           (l.years_employed IS NULL AND p_years_employed IS NOT NULL) OR
                                           (l.current_credit IS NULL AND p_current_credit IS NOT NULL) OR
                                           (l.consent IS NULL AND p_consent IS NOT NULL) OR
                                           (l.source IS NULL AND p_source IS NOT NULL) OR
                                           (l.utm_source IS NULL AND p_utm_source IS NOT NULL) OR
                                           (l.utm_medium IS NULL AND p_utm_medium IS NOT NULL) OR
                                           (l.utm_campaign IS NULL AND p_utm_campaign IS NOT NULL) OR
                                           (l.utm_term IS NULL AND p_utm_term IS NOT NULL) OR
                                           (l.utm_content IS NULL AND p_utm_content IS NOT NULL) OR
                                           ((p_salary_min IS NOT NULL OR p_salary_max IS NOT NULL)
                                            AND (l.salary_min IS DISTINCT FROM p_salary_min OR l.salary_max IS DISTINCT FROM p_salary_max)) AS gained) AS g),
            last_seen_at = now(),
            submission_count = l.submission_count + 1
            WHERE l.lead_id = v_id
            RETURNING l.lead_id INTO v_id;
        EXCEPTION WHEN unique_violation THEN
            CONTINUE;  -- a concurrent writer took the email or phone this merge wanted: look again
        END;
        CONTINUE WHEN v_id IS NULL;
        INSERT INTO lead_submissions (lead_id, api_source, outcome, payload)
        VALUES (v_id, p_api_source, 'existing', p_payload);
        RETURN QUERY SELECT v_id, false;
        RETURN;
    END LOOP;
    RAISE EXCEPTION 'lead upsert did not settle after 5 attempts';
END
$fn$;

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
CREATE INDEX IF NOT EXISTS follow_ups_person ON follow_ups (person_id, id DESC);
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
