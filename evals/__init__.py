"""Evaluation of the interventions: editing a prefilled context (``notekv eval-edits``) and
composing precompiled skills (``notekv eval-compose``), each against the full recompute
and the model's own noise floor. Interpretation (locating the notes) lives in ``circuits``."""
