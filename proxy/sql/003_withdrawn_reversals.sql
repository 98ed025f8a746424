-- A reversal never sent can be withdrawn: a repeat of its transaction delivered the
-- approval after all (the journal replayed it), so nothing is to be reversed.
ALTER TABLE reversals DROP CONSTRAINT IF EXISTS reversals_state_check;
ALTER TABLE reversals ADD CONSTRAINT reversals_state_check
    CHECK (state IN ('queued', 'acknowledged', 'failed', 'withdrawn'));
