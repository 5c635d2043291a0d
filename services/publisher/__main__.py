"""`python -m services.publisher [serve|migrate]`."""

from services.publisher.service import PUBLISHER
from services.runtime.server import main_for


def main() -> None:
    main_for(PUBLISHER)


if __name__ == "__main__":
    main()
