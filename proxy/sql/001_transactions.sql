-- The journal: one row per transaction key, claimed before anything is forwarded.
-- No PAN (only first 6 + last 4 and a keyed HMAC), no track, PIN or chip data.
CREATE TABLE IF NOT EXISTS transactions (
    id              bigserial PRIMARY KEY,
    tx_key          text NOT NULL UNIQUE,
    mti             text NOT NULL,
    terminal        text NOT NULL,
    stan            text NOT NULL,
    acquirer        text,
    rrn             text,
    tx_date         date NOT NULL,
    fingerprint     bytea NOT NULL,
    pan_masked      text,
    pan_hash        bytea,
    request         jsonb NOT NULL,
    state           text NOT NULL CHECK (state IN ('claimed', 'answered', 'timed_out', 'failed')),
    instance        text NOT NULL,
    switch          text,
    link            text,
    rc              text,
    response_mti    text,
    auth_code       text,
    response        jsonb,
    response_fields text[],
    latency_ms      double precision,
    claimed_at      timestamptz NOT NULL DEFAULT now(),
    completed_at    timestamptz
);

CREATE INDEX IF NOT EXISTS transactions_rrn ON transactions (rrn) WHERE rrn IS NOT NULL;
CREATE INDEX IF NOT EXISTS transactions_open ON transactions (claimed_at) WHERE state = 'claimed';
