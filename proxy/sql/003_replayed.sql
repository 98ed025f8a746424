-- When a repeat was given the approval held for a transaction (from the journal, on any
-- instance): an approval whose original answer never reached its terminal is then not
-- reversed. Nullable, no default: adding it rewrites nothing.
ALTER TABLE transactions ADD COLUMN IF NOT EXISTS replayed_at timestamptz;
