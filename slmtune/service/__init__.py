"""The fine-tuning service: an OpenAI-shaped fine-tuning API over `slmtune train`.

    slmtune api [--db URL] [--workers N] [--models NAME=DIR]   # API server (+ embedded workers)
    slmtune worker --db URL                                    # more workers (scale-out)
    slmtune keys create --tenant NAME                          # an API key

settings.py (configuration), models.py (tables), store.py (every database operation),
auth.py (API keys), app.py (routes), worker.py (claims jobs and runs `slmtune train`).
"""
