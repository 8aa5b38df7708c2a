"""The whole pipeline: :mod:`.dag` (the stages, in order), :mod:`.run` (``omni run``: plan,
skip what is done, retry what is transient), :mod:`.summary` (what a run did),
:mod:`.submit` (``omni submit``: Ray Jobs), :mod:`.status` (``omni status``), :mod:`.cli`
(the three commands) and :mod:`.config` (the ``workflow`` and ``submit`` sections)."""
