-- Which link last announced each provision ('<gateway instance>:<session>').
-- A link that closes marks offline only the provisions it announced itself,
-- so a node that moved to a new link (on this or another gateway replica)
-- stays online.
ALTER TABLE provisions ADD COLUMN link_id TEXT;
