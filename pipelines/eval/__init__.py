"""The evaluation stage (``omni eval`` / ``sweep`` / ``generate`` / ``eval compare``), one
module per job: :mod:`.session` (what one command shares), :mod:`.child_run` (one
checkpoint into one child MLflow run), :mod:`.exactly_once` (that under a claim, with
retries), :mod:`.single` (``omni eval``), :mod:`.sweep` and :mod:`.sweep_report`
(``omni sweep``), :mod:`.generate` and :mod:`.compare`. ``pipelines.eval.stage`` is the
stage's public face and re-exports the entry points."""
