"""What every service shares: the call context, interceptors, tenant-scoped database access,
migrations, logging and the server start-up."""
