"""`python -m services.costs [serve|migrate]`."""

from services.costs.service import costs_definition
from services.runtime.server import main_for


def main() -> None:
    main_for(costs_definition())


if __name__ == "__main__":
    main()
