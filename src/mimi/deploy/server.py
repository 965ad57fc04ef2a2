"""The standard-library server under its first name (``mimi.deploy.server.BankServer``).

``mimi serve`` runs the ASGI app (``mimi.deploy.asgi``); this module keeps the earlier import path working.
"""

from mimi.deploy.stdlib_server import BankServer

__all__ = ["BankServer"]
