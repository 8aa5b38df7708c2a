"""The tokenizers stage (``omni tokenizers train | eval``): warm-up and quality of the
text, image, audio and video tokenizers, in :mod:`.stage`; its section, :mod:`.config`."""
