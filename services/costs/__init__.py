"""The Costs service: exact, idempotent spend tracking per profile, with budgets."""
