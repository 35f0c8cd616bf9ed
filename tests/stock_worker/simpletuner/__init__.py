"""A stand-in ``simpletuner`` package for the stock-worker tests (see ``train.py``).

It is eventq's own test code: SimpleTuner's worker runs ``python -m simpletuner.train``,
and with this directory on PYTHONPATH that command runs the stand-in trainer.
"""
