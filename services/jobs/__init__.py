"""The Jobs service: the life of a pipeline job, each owned by one profile."""
