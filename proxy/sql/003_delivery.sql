-- Who had the last word on an approval whose original answer could not be written: a
-- duplicate that carried it to the terminal (delivered), or the reversal of it. Both take
-- the transaction's row lock first, so exactly one of them wins.
ALTER TABLE transactions ADD COLUMN IF NOT EXISTS delivered boolean NOT NULL DEFAULT false;
