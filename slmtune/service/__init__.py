"""The fine-tuning service: an OpenAI-shaped fine-tuning API over `slmtune train`.

    slmtune api [--db URL] [--workers N] [--models NAME=DIR]   # API server (+ embedded workers)
    slmtune worker --db URL [--executor kubernetes]            # more workers (scale-out)
    slmtune migrate --db URL                                   # the database schema, before a rollout
    slmtune keys create --tenant NAME                          # an API key

settings.py (configuration), models.py (tables), store.py (every database operation),
auth.py (API keys), app.py (routes), worker.py (claims jobs and runs `slmtune train`),
executors.py (where the trainer runs: a subprocess) and kubernetes.py (or a Kubernetes Job).
"""
