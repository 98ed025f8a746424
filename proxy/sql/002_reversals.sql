-- Store-and-forward reversals: one per transaction, sent until the switch acknowledges it.
CREATE TABLE IF NOT EXISTS reversals (
    id              bigserial PRIMARY KEY,
    tx_key          text NOT NULL UNIQUE REFERENCES transactions (tx_key),
    switch          text,
    mti             text NOT NULL,
    message         jsonb NOT NULL,
    state           text NOT NULL CHECK (state IN ('queued', 'acknowledged', 'failed')),
    reason          text NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    leased_by       text,
    lease_until     timestamptz,
    last_rc         text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS reversals_due ON reversals (next_attempt_at, id) WHERE state = 'queued';

ALTER TABLE transactions
    ADD COLUMN IF NOT EXISTS late_rc text,
    ADD COLUMN IF NOT EXISTS late_latency_ms double precision;
