"""``eventq worker``: the agent that runs jobs on a GPU machine for a remote orchestrator.

It speaks the websocket protocol of ``/api/workers/ws`` (SPEC 6): ``link`` is the
connection it sends through, ``attempts`` the processes it runs, ``agent`` the loop
that connects, reconnects and answers the orchestrator's messages.
"""
