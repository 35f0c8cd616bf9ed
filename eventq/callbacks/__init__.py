"""Completion callbacks: a JSON POST to a URL when a job ends (``eventq jobs submit
--notify URL``, ``eventq server --notify-url URL``), retried and recorded, and a local script
(``eventq server --on-finish CMD``).

``owed`` folds what is owed from the log (pure), ``notifier`` sends it and ``hooks`` runs
the script (the effects), ``urls`` checks a URL before it is stored.
"""
