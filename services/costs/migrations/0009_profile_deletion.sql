-- DeleteProfile: an operator deletes a profile's budgets (and their crossings, which the
-- service could already delete); its cost lines stay, for accounting.
GRANT DELETE ON costs.budgets TO costs_service;
