"""The names of the files a server writes in its data directory.

Standard library only: the CLI finds a server through them without importing it.
"""

#: The local admin's token (0600), read by every client command on the server's machine.
TOKEN_FILE = "admin.token"
#: ``{"url", "pid"}`` of the running server.
SERVER_FILE = "server.json"
#: The event log.
LOG_FILE = "events.db"
