from tests.supervisor_fixture import start

__all__ = ["start"]  # the `start` fixture, shared by the supervisor tests
