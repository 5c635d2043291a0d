"""The suite's services (jobs, costs, publisher) and the runtime they share."""
