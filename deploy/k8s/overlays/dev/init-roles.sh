# Sourced by the postgres image's entrypoint once, when it initialises an empty volume.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v jobs_password="$JOBS_PASSWORD" -v jobs_owner_password="$JOBS_OWNER_PASSWORD" \
    -v costs_password="$COSTS_PASSWORD" -v costs_owner_password="$COSTS_OWNER_PASSWORD" \
    -v publisher_password="$PUBLISHER_PASSWORD" \
    -v publisher_owner_password="$PUBLISHER_OWNER_PASSWORD" \
    -f /bootstrap/bootstrap.sql
