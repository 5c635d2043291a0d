"""`python -m services.jobs [serve|migrate]`."""

from services.jobs.service import JOBS
from services.runtime.server import main_for


def main() -> None:
    main_for(JOBS)


if __name__ == "__main__":
    main()
