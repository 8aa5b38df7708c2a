"""The whole pipeline: :mod:`.dag` (the stages, in order), :mod:`.run` (``omni run``: plan,
skip what is done, retry what is transient), :mod:`.submit` (``omni submit``: Ray Jobs),
:mod:`.status` (``omni status``) and :mod:`.cli` (the three commands)."""
