"""Example corpora built from data that ships inside installed packages (``omni examples``).

Nothing is downloaded: ``digits`` turns scikit-learn's copy of the UCI handwritten digits and
speech synthesised with eSpeak NG (the optional ``examples`` extra) into a learnable
omnimodal corpus in the ``jsonl`` Document format.
"""
